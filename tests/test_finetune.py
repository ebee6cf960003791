"""The finetune stage and label maps: params transfer (head, position embedding), plan-time errors,
instances in the real config, resume after SIGKILL, label-map scoring."""

import dataclasses
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data import label_maps, loader
from launch import dag
from launch.configs import tiny
from trainer import checkpoint, evaluators, sharding, transfer
from trainer.models import vit

import stage_resume


def _export(pretrain_export):
    model = checkpoint.open_model(pretrain_export.path, "test")
    return model.config, model.load()


def test_resize_to_the_same_grid_is_the_identity():
    posemb = jax.random.normal(jax.random.PRNGKey(0), (1, 64, 16))
    assert transfer.resize_posemb(posemb, (8, 8)) is posemb
    up = transfer.resize_posemb(posemb, (12, 12), "bicubic")
    assert up.shape == (1, 144, 16) and bool(jnp.all(jnp.isfinite(up)))
    # Bilinear up then back down to the same grid stays close (a smooth resampling, not a shuffle).
    back = transfer.resize_posemb(transfer.resize_posemb(posemb, (16, 16)), (8, 8))
    assert float(jnp.corrcoef(back.ravel(), posemb.ravel())[0, 1]) > 0.7


def test_new_head_is_zero_and_the_backbone_bit_identical(pretrain_export):
    source, params = _export(pretrain_export)
    same = transfer.transform_params(
        params,
        source,
        vit.make_config("mu/4", **{**source.to_json()["overrides"], "num_classes": 5}),
    )
    assert (
        not np.any(same["head_kernel"])
        and not np.any(same["head_bias"])
        and same["head_kernel"].shape[1] == 5
    )
    for key in params:
        if key not in ("head_kernel", "head_bias"):
            jax.tree_util.tree_map(np.testing.assert_array_equal, same[key], params[key])
    with pytest.raises(
        ValueError, match="head='keep' but the exported head has 10 classes and the data 5"
    ):
        transfer.transform_params(
            params,
            source,
            vit.make_config("mu/4", **{**source.to_json()["overrides"], "num_classes": 5}),
            head="keep",
        )


def test_a_resized_model_matches_the_original_on_upsampled_images(pretrain_export, prepared_digits):
    source, params = _export(pretrain_export)
    target = vit.make_config(source.variant, **{**source.to_json()["overrides"], "image_size": 48})
    mesh = sharding.make_mesh(data=8, model=1)
    boxed = vit.abstract_params(target)
    abstract = checkpoint.abstract_with_shardings(
        nn.unbox(boxed), sharding.param_shardings(boxed, mesh)
    )
    start = transfer.start_from(
        checkpoint.open_model(pretrain_export.path, "test"), target, mesh, head="keep"
    )
    resized = start(abstract)
    batch = next(
        iter(
            loader.eval_loader(
                prepared_digits / "digits" / "val",
                global_batch_size=64,
                image_size=32,
                sharding=sharding.batch_sharding(mesh),
            )
        )
    )
    images = np.asarray(batch["image"])
    logits, _ = vit.ViT(source).apply({"params": params}, images)
    bigger = jax.image.resize(images, (64, 48, 48, 3), "bilinear")
    resized = jax.device_get(resized)
    shuffled = dict(
        resized,
        pos_embedding=np.random.default_rng(0).permutation(resized["pos_embedding"], axis=1),
    )

    def agreement(p):
        logits48, _ = vit.ViT(target).apply({"params": p}, bigger)
        assert bool(jnp.all(jnp.isfinite(logits48)))
        return float(jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(logits48, -1)))

    # A 60-step mu/4 with 4-px patches is far from scale invariant, so "close" means: its decisions
    # on 1.5x upsampled digits stay well above chance (0.1), and far better than with the same
    # position embedding scrambled over the grid (the interpolation keeps the geometry).
    good, scrambled = agreement(resized), agreement(shuffled)
    assert good > 0.3 and good > scrambled + 0.1, (good, scrambled)


def _plan_error(**overrides):
    config = tiny.get_config()
    config.update_from_flattened_dict(overrides)
    with pytest.raises(dag.PlanError) as e:
        dag.plan(config, Path("/nonexistent-workdir"))
    assert "\n" not in str(e.value)
    return str(e.value)


def test_plan_time_errors_name_the_key():
    assert _plan_error(**{"finetune.runs.r48.model.patch_size": 8}).startswith(
        "finetune.runs.r48.model.patch_size: 8 differs from the exported model's 4"
    )
    assert _plan_error(**{"finetune.runs.r48.model.width": 32}).startswith(
        "finetune.runs.r48.model.width"
    )
    assert _plan_error(**{"finetune.runs.r48.init_from": "pretrian"}).startswith(
        "finetune.runs.r48.init_from: 'pretrian' is not another stage"
    )
    assert _plan_error(**{"finetune.runs.r48.init_from": "prepare"}).startswith(
        "finetune.runs.r48.init_from: stage 'prepare' exports no model params"
    )
    assert _plan_error(**{"finetune.runs.r32.head": "old"}).startswith("finetune.runs.r32.head")
    assert _plan_error(**{"finetune.runs.r32.posemb_resize": "nearest"}).startswith(
        "finetune.runs.r32.posemb_resize"
    )
    assert _plan_error(**{"pretrain.evals.pairs.map": "no_such_map"}).startswith(
        "pretrain.evals.pairs.map: label map"
    )


def test_each_run_is_its_own_dag_node(tmp_path):
    plans = {p.name: p for p in dag.plan(tiny.get_config(), tmp_path)}
    r32, r48 = plans["finetune/r32"], plans["finetune/r48"]
    assert r32.stage.upstream == r48.stage.upstream == ("prepare", "pretrain")
    assert r32.path.parent == tmp_path / "finetune" / "r32" and r32.fingerprint != r48.fingerprint
    only = {
        p.name: p.action
        for p in dag.plan(tiny.get_config(), tmp_path, only=["prepare", "pretrain", "finetune/r48"])
    }
    assert only["finetune/r32"] == "skip" and only["finetune/r48"] == "run"


def test_label_map_scores_equal_a_hand_computed_fixture():
    m = label_maps.LabelMap("fixture", ("a", "b"), (("x", "y"), ("z",)))
    membership = m.membership(["x", "y", "z"])
    scores = np.array([[1.0, 5.0, 2.0], [4.0, -1.0, 3.0]])
    np.testing.assert_allclose(
        label_maps.target_scores(scores, membership, "max"), [[5.0, 2.0], [4.0, 3.0]]
    )
    np.testing.assert_allclose(
        label_maps.target_scores(scores, membership, "mean"), [[3.0, 2.0], [1.5, 3.0]]
    )
    np.testing.assert_array_equal(m.target_index(["b", "a"]), [1, 0])
    with pytest.raises(ValueError, match="source class 'y' is not one of the model's classes"):
        m.membership(["x", "z"])
    with pytest.raises(ValueError, match="class 'c' of the data is not a target"):
        m.target_index(["c"])


def test_bad_label_map_files_fail_in_one_line(tmp_path):
    for text, message in (
        ("[1, 2]", "must be a non-empty JSON object"),
        ('{"a": []}', "target 'a' must map"),
        ("{", "cannot read"),
    ):
        path = tmp_path / "bad.json"
        path.write_text(text)
        with pytest.raises(ValueError, match=message) as e:
            label_maps.load(str(path))
        assert "\n" not in str(e.value)
    assert label_maps.load("digits_pairs").targets[0] == "zero_or_one"


def _label_plus_one(params, frozen, batch):
    del params, frozen
    return jax.nn.one_hot((batch["label"] + 1) % 10, 10)


def test_label_map_evaluator_on_digits(prepared_digits):
    mesh = sharding.make_mesh(data=4, model=2)
    ctx = evaluators.Context(
        mesh=mesh,
        split_dir=lambda d, s: prepared_digits / d / s,
        dataset="digits",
        image_size=32,
        batch_size=64,
        param_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
        class_names=tuple("0123456789"),
    )
    ev = evaluators.LabelMapAccuracy(
        _label_plus_one, ctx=ctx, split="val", map="digits_pairs", labels="source"
    )  # digits labelled in the model's classes
    got = dict(ev.run(jnp.zeros(()), {}))
    val = loader.eval_loader(
        prepared_digits / "digits" / "val",
        global_batch_size=64,
        image_size=32,
        sharding=ctx.batch_sharding,
    )
    labels = np.concatenate([np.asarray(b["label"])[np.asarray(b["mask"])] for b in val])
    # Predicting label+1: right pair exactly for even labels (0->1, 2->3, ...), wrong for odd ones.
    assert got["top1"] == pytest.approx(np.mean(labels % 2 == 0)) and got["count"] == len(labels)
    bad = tuple("0123456789"[:-1]) + ("nine",)
    with pytest.raises(ValueError, match="source class '9' is not one of the model's classes"):
        evaluators.LabelMapAccuracy(
            _label_plus_one,
            ctx=dataclasses.replace(ctx, class_names=bad),
            split="val",
            map="digits_pairs",
        )


WORKER = """
import json, sys
from pathlib import Path
from launch.configs import tiny
from launch.stage_types import StageOutput
from trainer import finetune
data_dir, export_dir, out = sys.argv[1:4]
cfg = tiny.finetune_run(48)
cfg.data.prepared_dir = data_dir
cfg.steps, cfg.checkpoint_every, cfg.evals.val.every = 16, 4, 0
cfg.runtime.log_every, cfg.runtime.async_checkpoint = 4, False
inputs = {"pretrain": StageOutput("pretrain", "0" * 64, Path(export_dir), {})}
print("RESULT", json.dumps(finetune.run(cfg, inputs, Path(out))["metrics"]))
"""


@pytest.mark.slow
def test_sigkill_mid_finetune_then_rerun_resumes_bit_identically(
    prepared_digits, pretrain_export, tmp_path
):
    metrics = stage_resume.kill_resume_and_compare(
        WORKER, (prepared_digits, pretrain_export.path), tmp_path, kill_after_step=8
    )
    assert metrics["start_step"] >= 8 and metrics["steps"] == 16
