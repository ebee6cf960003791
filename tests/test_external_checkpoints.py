"""Fine-tune and distill from checkpoint files made elsewhere (a timm .safetensors, a big_vision
.npz): no DAG edge, the architecture from `model.variant` / `teacher_model.variant`, the file's
identity in the fingerprint, params bit-exact through the loop, and one-line plan-time errors."""

import json
import os
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

from launch import dag
from launch.configs import tiny
from trainer import checkpoint, distill, finetune, sharding
from trainer.interop import export, weights_import
from trainer.models import vit


@pytest.fixture(scope="module")
def files(pretrain_export, tmp_path_factory):
    """The shared pretrain export as a timm file (encoder only: timm's MAP head has no QK-norm) and
    an .npz (head included), and its params."""
    out = tmp_path_factory.mktemp("external")
    assert (
        export.main(
            [
                "--stage_dir",
                str(pretrain_export.path),
                "--format",
                "timm",
                "--out",
                str(out / "timm"),
            ]
        )
        == 0
    )
    # The parallel block has no big_vision naming: our flat .npz (same import path,
    # weights_import.read).
    assert (
        export.main(
            [
                "--stage_dir",
                str(pretrain_export.path),
                "--format",
                "npz",
                "--out",
                str(out / "p.npz"),
            ]
        )
        == 0
    )
    return (
        out / "timm" / "model.safetensors",
        out / "p.npz",
        checkpoint.load_params(pretrain_export.path / "params"),
    )


def _config(**overrides):
    config = tiny.get_config()
    config.update_from_flattened_dict(overrides)
    return config


@pytest.mark.xdist_group("external")
def test_plan_drops_the_edge_and_fingerprints_the_file(files, tmp_path):
    timm_file, npz, _ = files
    config = _config(
        **{
            "finetune.runs.r48.init_from": str(timm_file),
            "finetune.runs.r48.model.variant": "mu/4",
            "distill.runs.mu_seq.teacher": str(npz),
            "distill.runs.mu_seq.teacher_model.variant": "mu/4",
        }
    )
    plans = {p.name: p for p in dag.plan(config, tmp_path)}
    assert plans["finetune/r48"].stage.upstream == ("prepare",)
    assert plans["distill/mu_seq"].stage.upstream == ("prepare",)
    assert (
        plans["finetune/r48"].components["files"]["init_from"]["bytes"] == timm_file.stat().st_size
    )
    before = plans["finetune/r48"].fingerprint
    os.utime(timm_file, ns=(timm_file.stat().st_atime_ns, timm_file.stat().st_mtime_ns + 1))
    again = {p.name: p for p in dag.plan(config, tmp_path)}
    assert again["finetune/r48"].fingerprint != before  # a replaced file reruns the stage
    assert again["distill/mu_seq"].fingerprint == plans["distill/mu_seq"].fingerprint


@pytest.mark.parametrize(
    "overrides, starts",
    [
        (
            {
                "finetune.runs.r48.init_from": "/nonexistent/vit.safetensors",
                "finetune.runs.r48.model.variant": "mu/4",
            },
            "finetune.runs.r48.init_from: /nonexistent/vit.safetensors: no such checkpoint file",
        ),
        (
            {"finetune.runs.r48.init_from": "FILE"},
            "finetune.runs.r48.model.variant: name the checkpoint file's",
        ),
        (
            {"distill.runs.mu_seq.teacher": "FILE"},
            "distill.runs.mu_seq.teacher_model.variant: name the checkpoint",
        ),
        (
            {
                "distill.runs.mu_seq.teacher": "FILE",
                "distill.runs.mu_seq.teacher_model.variant": "nope/4",
            },
            "distill.runs.mu_seq.teacher_model: ",
        ),
    ],
)
@pytest.mark.xdist_group("external")
def test_bad_file_references_fail_at_plan_time_in_one_line(files, overrides, starts):
    overrides = {k: str(files[0]) if v == "FILE" else v for k, v in overrides.items()}
    with pytest.raises(dag.PlanError) as e:
        dag.plan(_config(**overrides), Path("/nonexistent-workdir"))
    assert str(e.value).startswith(starts) and "\n" not in str(e.value)


@pytest.mark.xdist_group("external")
def test_finetune_from_a_file_through_the_loop(files, prepared_digits, tmp_path):
    """lr 0, head kept (same 10 classes), same resolution: the stage's exported params are the
    file's, bit for bit. The timm file is encoder only, so a MAP model cannot start from it: one
    line naming the missing parameter, before any step."""
    timm_file, npz, params = files
    cfg = finetune.default_config()
    cfg.init_from, cfg.model.variant, cfg.head = str(npz), "mu/4", "keep"
    cfg.data.prepared_dir, cfg.data.image_size = str(prepared_digits), 32
    cfg.batch_size, cfg.steps, cfg.checkpoint_every, cfg.evals = 16, 1, 0, {}
    cfg.optim.lr, cfg.optim.warmup_steps = 0.0, 0
    cfg.runtime.progress = "off"
    finetune.run(cfg, {}, tmp_path / "ft")
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, checkpoint.load_params(tmp_path / "ft" / "params"), params
    )
    cfg.init_from, cfg.head = str(timm_file), "new"
    with pytest.raises(ValueError, match=f"{timm_file}: parameter attn_pool.latent is missing"):
        finetune.run(cfg, {}, tmp_path / "ft_timm")


@pytest.mark.xdist_group("external")
def test_distill_teacher_from_an_npz_file(files):
    """The teacher's Frozen params, read from the .npz into the mesh's shardings, are the
    export's."""
    _, npz, params = files
    cfg = distill.default_config()
    cfg.teacher, cfg.teacher_model.variant = str(npz), "mu/4"
    cfg.model.variant, cfg.data.image_size = "mu/4", 32
    task = distill.make_task(cfg, 10, cfg.teacher)
    mesh = sharding.make_mesh(data=len(jax.devices()), model=1)
    boxed = task.frozen.abstract
    abstract = checkpoint.abstract_with_shardings(
        nn.unbox(boxed), sharding.param_shardings(boxed, mesh)
    )
    jax.tree_util.tree_map(np.testing.assert_array_equal, task.frozen.load(abstract), params)
    cfg.model.num_classes = 7
    with pytest.raises(
        ValueError, match=f"distill.teacher: {npz} predicts 10 classes, the student 7"
    ):
        distill.make_task(cfg, 7, cfg.teacher)


def test_only_a_dir_holding_model_safetensors_is_a_checkpoint_file(tmp_path):
    """A stage's export dir or an Orbax params/ dir is not a checkpoint file; a timm export dir
    is."""
    (tmp_path / "params").mkdir()
    assert not weights_import.is_foreign(tmp_path) and not weights_import.is_foreign(
        tmp_path / "params"
    )
    assert weights_import.is_foreign(tmp_path / "vit.npz") and weights_import.is_foreign(
        "x.safetensors"
    )
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert weights_import.is_foreign(tmp_path)
    assert weights_import.checkpoint_file(tmp_path) == tmp_path / "model.safetensors"


def test_open_model_errors_are_one_line_naming_the_key_and_the_path(tmp_path):
    """checkpoint.open_model, the one reader: ValueError("<where>: <path>: <what, and the fix>")."""

    def error(ref, **kw):
        with pytest.raises(ValueError) as e:
            checkpoint.open_model(ref, "finetune.init_from", **kw)
        assert str(e.value).startswith("finetune.init_from: ") and "\n" not in str(e.value)
        return str(e.value)

    assert f": {tmp_path}: no model.json: not a stage's export" in error(tmp_path)
    spec = tmp_path / "model.json"
    spec.write_text("{not json")
    assert f": {spec}: cannot read model spec" in error(tmp_path)
    spec.write_text(json.dumps({"kind": "lit", "image": {"variant": "mu/4"}, "text": {}}))
    assert f": {tmp_path}: a LiT export (model.json kind 'lit')" in error(tmp_path)
    spec.write_text(json.dumps({"variant": "nope/4", "overrides": {}}))
    assert f": {spec}: unknown ViT variant 'nope/4'" in error(tmp_path)
    spec.write_text(json.dumps(vit.make_config("mu/4", image_size=32).to_json()))
    assert f": {tmp_path / 'params'}: does not exist" in error(tmp_path)
    assert f": {tmp_path / 'p.npz'}: a checkpoint file carries no model.json" in error(
        tmp_path / "p.npz"
    )
    assert "no such .npz file" in error(tmp_path / "p.npz", arch=vit.make_config("mu/4"))
