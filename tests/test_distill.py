"""The distill stage on digits: the objective, consistent teaching (identical pixels, also with
mixup and a resized teacher), a teacher that only ever teaches, SIGKILL-resume, plan-time errors.

The teacher is the session's one tiny mu/4 pretrain export (conftest `pretrain_export`); students
are a classic (sequential-block) mu/4 on a 4 x 2 mesh of simulated CPU devices.
"""

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from data import loader
from launch.configs import tiny
from pipelines import prepare
from trainer import checkpoint, distill, sharding
from trainer.losses import kl_divergence
from trainer.models import vit

import stage_resume

CLASSIC = dict(block="sequential", use_bias=True, norm="layernorm", head="gap", qk_norm=False)


def student_cfg(prepared_dir, **overrides):
    """A classic mu/4 student on 32 px digits, distilled from `pretrain` on a 4 x 2 mesh."""
    cfg = distill.default_config()
    cfg.model.update(CLASSIC)
    cfg.data.prepared_dir = str(prepared_dir)
    cfg.data.augment.update(inception_crop=False, flip=False, mixup_alpha=0.0)
    cfg.batch_size = cfg.eval_batch_size = 32
    cfg.steps, cfg.checkpoint_every = 12, 0
    cfg.mesh.data, cfg.mesh.model = 4, 2
    cfg.optim.update(optimizer="adamw", lr=3e-3, warmup_steps=0)
    cfg.evals.val.every = cfg.evals.agree.every = 0
    # The teacher's own top-1 through the Task's `teacher_logits` predict seam.
    cfg.evals.teacher = dict(
        type="classification", split="val", pred="teacher_logits", loss="softmax_xent"
    )
    cfg.runtime.update(log_every=1, progress="off", async_checkpoint=False)
    cfg.update_from_flattened_dict(overrides)
    return cfg


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _state_leaves(step_dir: Path) -> dict[tuple, tuple]:
    with ocp.StandardCheckpointer() as ckpt:
        tree = ckpt.metadata((step_dir / "state").absolute()).item_metadata.tree
    return {
        tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


# --- The objective ------------------------------------------------------------------------------


def _kl_reference(student, teacher, t):
    def log_softmax(x):
        x = x / t
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    log_s, log_t = log_softmax(student.astype(np.float64)), log_softmax(teacher.astype(np.float64))
    return t * t * (np.exp(log_t) * (log_t - log_s)).sum(-1)


@pytest.mark.parametrize("t", [0.5, 1.0, 4.0])
def test_temperature_scaled_kl_matches_numpy(t):
    rng = np.random.default_rng(0)
    student, teacher = (
        rng.normal(0, 3, (6, 10)).astype(np.float32),
        rng.normal(0, 3, (6, 10)).astype(np.float32),
    )
    got = np.asarray(kl_divergence(jnp.asarray(student), jnp.asarray(teacher), t))
    np.testing.assert_allclose(got, _kl_reference(student, teacher, t), rtol=1e-5, atol=1e-6)
    assert (got > 0).all()


def test_kl_and_its_gradient_are_zero_when_student_equals_teacher():
    logits = jnp.asarray(np.random.default_rng(1).normal(0, 5, (4, 10)), jnp.float32)
    value, grad = jax.value_and_grad(lambda s: jnp.sum(kl_divergence(s, logits, 2.0)))(logits)
    assert float(jnp.max(jnp.abs(kl_divergence(logits, logits, 2.0)))) < 1e-6
    assert abs(float(value)) < 1e-5 and float(jnp.max(jnp.abs(grad))) < 1e-6


def test_gradients_reach_only_the_student(prepared_digits, pretrain_export):
    task = distill.make_task(student_cfg(prepared_digits), 10, pretrain_export.path)
    labelled = distill.make_task(
        student_cfg(prepared_digits, label_weight=0.5), 10, pretrain_export.path
    )
    batch = {
        "image": jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (4, 32, 32, 3)), jnp.float32),
        "labels": jnp.eye(10)[jnp.arange(4)],
    }
    rng = jax.random.PRNGKey(1)

    @jax.jit  # one compilation: init, the gradient w.r.t. student and teacher, the labelled loss
    def probe(frozen):
        params = nn.unbox(task.init(jax.random.PRNGKey(0)))
        (loss, aux), grads = jax.value_and_grad(
            lambda p, f: task.loss(p, f, batch, rng), argnums=(0, 1), has_aux=True
        )(params, frozen)
        return loss, aux, grads, labelled.loss(params, frozen, batch, rng)[0]

    loss0, aux, (g_student, g_teacher), loss1 = probe(
        checkpoint.load_params(pretrain_export.path / "params")
    )
    assert all(not np.any(g) for g in jax.tree_util.tree_leaves(g_teacher))
    assert any(np.any(g) for g in jax.tree_util.tree_leaves(g_student))
    # The label term is off by default and joins the loss only with its weight.
    assert float(loss0) == float(aux["distill_loss"])
    assert float(loss1) == pytest.approx(
        float(aux["distill_loss"] + 0.5 * aux["label_loss"]), rel=1e-6
    )


# --- Through the loop ---------------------------------------------------------------------------

# The stage run every loop-level check below reads: an uninterrupted run (`ref/`) and a copy of it
# SIGKILLed after its step-8 checkpoint and rerun into the same dir (`killed/`), in subprocesses.
REFERENCE = {"steps": 16, "checkpoint_every": 4, "evals.val.every": 8, "evals.agree.every": 8}
WORKER = """
import json, sys
from pathlib import Path
sys.path.insert(0, "tests")
from launch.stage_types import StageOutput
from trainer import distill
import test_distill
data_dir, export_dir, out = sys.argv[1:4]
cfg = test_distill.student_cfg(data_dir, **test_distill.REFERENCE)
inputs = {"pretrain": StageOutput("pretrain", "0" * 64, Path(export_dir), {})}
print("RESULT", json.dumps(distill.run(cfg, inputs, Path(out))["metrics"]))
"""


@pytest.fixture(scope="module")
def runs(prepared_digits, pretrain_export, tmp_path_factory):
    root = tmp_path_factory.mktemp("distill_runs")
    teacher_before = checkpoint.load_params(pretrain_export.path / "params")
    rerun = stage_resume.kill_resume_and_compare(
        WORKER, (prepared_digits, pretrain_export.path), root, kill_after_step=8
    )
    return root, rerun, teacher_before


@pytest.mark.xdist_group("distill_runs")
def test_distill_trains_the_student_and_never_the_teacher(pretrain_export, runs):
    root, m, teacher_before = (
        runs  # m: the final metrics (of the resumed run; == the reference's, below)
    )
    out = root / "ref"
    rows = _lines(out / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    for key in ("distill_loss", "label_loss", "train_top1", "train_agreement", "mfu"):
        assert key in train[-1], key
    evals = [r for r in rows if "agree/kl" in r]
    assert [r["step"] for r in evals] == [8, 16]
    assert evals[1]["agree/kl"] < evals[0]["agree/kl"]  # the student moves toward the teacher
    assert 0 <= m["agree/agreement"] <= 1 and m["agree/kl"] > 0 and "val/top1" in m
    # The teacher's top-1 through the Task's predict seam = what its pretraining measured.
    assert m["teacher/top1"] == pytest.approx(
        pretrain_export.outputs["metrics"]["val/top1"], abs=1e-6
    )

    # The teacher is bit-identical, neither in the optimizer state nor in the checkpoint.
    jax.tree_util.tree_map(
        np.testing.assert_array_equal,
        checkpoint.load_params(pretrain_export.path / "params"),
        teacher_before,
    )
    s_cfg = vit.make_config("mu/4", image_size=32, num_classes=10, **CLASSIC)
    student_shapes = sorted(
        tuple(x.shape) for x in jax.tree_util.tree_leaves(nn.unbox(vit.abstract_params(s_cfg)))
    )
    leaves = _state_leaves(out / "checkpoints" / "16")
    assert sorted(s for k, s in leaves.items() if k[0] == "params") == student_shapes
    assert sorted(s for k, s in leaves.items() if k[0] == "opt_state" and s) == sorted(
        student_shapes * 2
    )
    assert checkpoint.open_model(out, "test").config == s_cfg


def test_both_models_see_the_pixels_of_one_augmentation_draw(
    prepared_digits, pretrain_export, tmp_path, monkeypatch
):
    """Mixup on, data at 48 px: the student (48 px) gets the loader's batch itself, the 32 px
    teacher that same batch resized; the batch is one mixup of one crop per example."""
    seen, batches = [], []
    real_next = loader.TrainLoader.__next__

    def recording_next(self):
        batch = real_next(self)
        batches.append({k: np.asarray(v) for k, v in batch.items()})
        return batch

    monkeypatch.setattr(loader.TrainLoader, "__next__", recording_next)

    def spy(
        next_fun, args, kwargs, context
    ):  # each ViT's input images, sent out of the jitted step
        module = context.module
        if (
            isinstance(module, vit.ViT)
            and context.method_name == "__call__"
            and not module.is_initializing()
        ):
            role = "student" if module.config.block == "sequential" else "teacher"
            jax.debug.callback(lambda x, role=role: seen.append((role, x)), args[0])
        return next_fun(*args, **kwargs)

    cfg = student_cfg(
        prepared_digits, steps=2, **{"data.image_size": 48, "data.augment.mixup_alpha": 1.0}
    )
    cfg.evals = ml_collections.ConfigDict()
    with nn.intercept_methods(spy):
        distill.run(cfg, {"pretrain": pretrain_export}, tmp_path)
    jax.effects_barrier()

    students = [np.asarray(x) for role, x in seen if role == "student"]
    teachers = [np.asarray(x) for role, x in seen if role == "teacher"]
    assert len(students) == len(teachers) == len(batches) == 2
    for batch, student_x, teacher_x in zip(batches, students, teachers):
        np.testing.assert_array_equal(student_x, batch["image"])
        assert teacher_x.shape == (32, 32, 32, 3)
        np.testing.assert_allclose(
            teacher_x, np.asarray(distill._at(jnp.asarray(batch["image"]), 32)), atol=1e-5
        )

    # The batch is one mixup draw (a >= 1/2, the same a for images and labels) of the plain crops.
    bsh = sharding.batch_sharding(sharding.make_mesh(data=4, model=2))
    plain = loader.train_loader(
        Path(prepared_digits) / "digits" / "train",
        global_batch_size=32,
        image_size=48,
        seed=cfg.seed,
        sharding=bsh,
        augment=dict(cfg.data.augment.to_dict(), mixup_alpha=0.0),
    )
    try:
        first = next(plain)
        x, y = np.asarray(first["image"]), np.asarray(first["labels"])
    finally:
        plain.close()
    dx, dy = x - np.roll(x, 1, axis=0), y - np.roll(y, 1, axis=0)
    a = float(np.sum((batches[0]["image"] - np.roll(x, 1, axis=0)) * dx) / np.sum(dx * dx))
    assert 0.5 <= a <= 1.0
    np.testing.assert_allclose(batches[0]["image"], np.roll(x, 1, axis=0) + a * dx, atol=1e-5)
    np.testing.assert_allclose(batches[0]["labels"], np.roll(y, 1, axis=0) + a * dy, atol=1e-5)


@pytest.mark.xdist_group("distill_runs")
def test_sigkill_mid_distill_then_rerun_resumes_bit_identically(runs):
    root, rerun, _ = runs  # the params are bit-identical (stage_resume asserts it)
    assert rerun["start_step"] >= 8 and rerun["steps"] == 16
    assert _final_metrics(root / "killed") == _final_metrics(
        root / "ref"
    )  # loss, evals, ... of the last step


def _final_metrics(out) -> list[dict]:
    """The last step's logged lines without the wall-clock ones (step time, examples/s, MFU)."""
    rows = _lines(out / "metrics.jsonl")
    last = max(r["step"] for r in rows)
    return [
        {k: v for k, v in r.items() if k not in ("step_time", "examples_per_sec", "mfu")}
        for r in rows
        if r["step"] == last
    ]


# --- Bad configs: one line naming the key, before anything compiles -----------------------------


def _upstream(**teacher_overrides):
    teacher = tiny.pretrain_config()
    teacher.model.update(teacher_overrides)
    return {"prepare": prepare.default_config(), "pretrain": teacher}


@pytest.mark.parametrize(
    "overrides,upstream,message",
    [
        (
            dict(teacher="finetune/nope"),
            {},
            "distill.runs.s.teacher: stage 'finetune/nope' is not in this pipeline",
        ),
        (
            dict(teacher="prepare"),
            {},
            "distill.runs.s.teacher: 'prepare' must name a params-exporting stage",
        ),
        (
            {"model.num_classes": 7},
            dict(num_classes=10),
            "distill.runs.s.teacher: 'pretrain' predicts 10 classes but the student 7 classes",
        ),
        ({}, dict(num_classes=0), "distill.runs.s.teacher: 'pretrain' has model.num_classes=0"),
        (dict(temperature=0.0), {}, "distill.runs.s.temperature: must be > 0"),
        (dict(label_weight=-1.0), {}, "distill.runs.s.label_weight: must be >= 0"),
        (dict(label_loss="hinge"), {}, "distill.runs.s.label_loss: loss='hinge'"),
        (
            {"evals.agree.type": "distilation"},
            {},
            "distill.runs.s.evals.agree.type='distilation' is not an evaluator",
        ),
        (
            {"evals.agree.temp": 2.0},
            {},
            "distill.runs.s.evals.agree.temp: unknown key for a 'distillation' evaluator",
        ),
    ],
)
def test_bad_configs_fail_at_plan_time_with_one_line(prepared_digits, overrides, upstream, message):
    with pytest.raises(ValueError) as e:
        distill.validate(
            student_cfg(prepared_digits, **overrides), _upstream(**upstream), "distill.runs.s"
        )
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_classes_from_another_dataset_must_be_stated(prepared_digits):
    distill.validate(
        student_cfg(prepared_digits), _upstream(), "distill.runs.s"
    )  # the teacher's dataset: fine
    other = student_cfg(prepared_digits, **{"data.dataset": "cifar10"})
    with pytest.raises(
        ValueError,
        match=r"^distill.runs.s.teacher: 'pretrain' predicts the classes of dataset "
        r"'digits' but the student the classes of dataset 'cifar10'",
    ):
        distill.validate(other, {"pretrain": tiny.pretrain_config()}, "distill.runs.s")
    other.model.num_classes = 10  # stated: checked against the teacher's model.json at run time
    distill.validate(other, {"pretrain": tiny.pretrain_config()}, "distill.runs.s")


@pytest.mark.parametrize(
    "overrides,inputs,message",
    [
        (
            {},
            "prepare_only",
            "distill.teacher: stage 'pretrain' is not among this stage's inputs (prepare)",
        ),
        (
            {"model.num_classes": 5},
            "teacher",
            "predicts 10 classes, the student 5; the student's head must match",
        ),
    ],
)
def test_run_time_teacher_errors_are_one_line(
    prepared_digits, prepare_output, pretrain_export, tmp_path, overrides, inputs, message
):
    given = (
        {"prepare": prepare_output} if inputs == "prepare_only" else {"pretrain": pretrain_export}
    )
    with pytest.raises(ValueError) as e:
        distill.run(student_cfg(prepared_digits, **overrides), given, tmp_path)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "checkpoints").exists()
