"""The pretrain stage end to end on real digits: learning, guards, checkpoints, export,
preemption."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from data import loader
from launch.configs import tiny
from trainer import checkpoint, loop, pretrain
from trainer.models import vit

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def digits(prepared_digits):
    return prepared_digits


def _cfg(digits, **overrides):
    cfg = tiny.pretrain_config()
    cfg.data.prepared_dir = str(digits)
    cfg.optim.warmup_steps, cfg.optim.cooldown_steps = (
        5,
        0,
    )  # runs here are shorter than the tiny config's
    cfg.update_from_flattened_dict(overrides)
    return cfg


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_pretrain_learns_and_exports(digits, tmp_path):
    result = pretrain.run(_cfg(digits, steps=120, **{"evals.val.every": 60}), {}, tmp_path)
    m = result["metrics"]
    assert m["val/top1"] > 0.5, m  # 10 classes: chance is 0.1
    assert m["val/top5"] >= m["val/top1"] and m["val/loss"] > 0
    logged = [r for r in _lines(tmp_path / "metrics.jsonl") if "loss" in r]
    assert logged[-1]["loss"] < logged[0]["loss"]
    for key in (
        "lr",
        "grad_norm",
        "param_norm",
        "examples_per_sec",
        "step_time",
        "mfu",
        "train_top1",
    ):
        assert key in logged[-1], key
    assert 0 < logged[-1]["mfu"] < 1.5
    assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl") if "val/top1" in r] == [60, 120]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    # Downstream stages rebuild the model from model.json and the exported params alone.
    opened = checkpoint.open_model(tmp_path, "test")
    model, params = vit.ViT(opened.config), opened.load()
    logits, _ = model.apply({"params": params}, np.zeros((2, 32, 32, 3), np.float32))
    assert logits.shape == (2, 10) and result["artifacts"]["params"] == "params"


def test_frozen_parameters_stay_bit_identical(digits, tmp_path):
    cfg = _cfg(
        digits, steps=6, checkpoint_every=0, **{"evals.val.every": 0, "runtime.log_every": 0}
    )
    cfg.optim.wd = 0.1
    cfg.optim.warmup_steps = 0
    cfg.optim.wd_rules = [("^embedding_", None), ("head_kernel", 1.0)]
    cfg.model.head_zeroinit = False
    pretrain.run(cfg, {}, tmp_path)
    trained = checkpoint.load_params(tmp_path / "params")
    init = jax.device_get(train_state_init(cfg))
    np.testing.assert_array_equal(trained["embedding_kernel"], init["embedding_kernel"])
    np.testing.assert_array_equal(trained["embedding_bias"], init["embedding_bias"])
    assert not np.array_equal(trained["head_kernel"], init["head_kernel"])
    assert not np.array_equal(trained["pos_embedding"], init["pos_embedding"])


def train_state_init(cfg):
    """The initial parameters the trainer creates for `cfg` (same seed, same init function)."""
    from trainer import sharding
    from trainer import step as step_lib

    setup = step_lib.setup(
        pretrain.make_task(cfg, num_classes=10),
        cfg.optim,
        10,
        sharding.make_mesh(**cfg.mesh),
        cfg.seed,
    )
    return setup.init()["params"]


def test_nan_guard_names_the_step_and_keeps_the_last_good_checkpoint(digits, tmp_path, monkeypatch):
    # The 7th training batch's images are NaN (injected here, not by a hook in the production step).
    real_next, calls = loader.TrainLoader.__next__, []

    def poisoned(self):
        batch = real_next(self)
        calls.append(1)
        return dict(batch, image=batch["image"] * np.nan) if len(calls) == 7 else batch

    monkeypatch.setattr(loader.TrainLoader, "__next__", poisoned)
    cfg = _cfg(
        digits,
        steps=20,
        checkpoint_every=5,
        **{"runtime.log_every": 3, "evals.val.every": 0, "runtime.async_checkpoint": False},
    )
    with pytest.raises(loop.NonFiniteError, match="at step 7;"):
        pretrain.run(cfg, {}, tmp_path)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [5]  # nothing at or after the bad step was ever saved
    assert not (tmp_path / "params").exists()


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(batch_size=62), "batch_size: 62 is not divisible by the data-parallel size 4"),
        (dict(eval_batch_size=6), "eval_batch_size: 6"),
        (
            {"mesh.data": 3, "batch_size": 48, "eval_batch_size": 48},
            "mesh: replica=1 x data=3 x model=2",
        ),
        (
            {
                "mesh.data": -1,
                "batch_size": 62,
            },  # known at run time only: the same check and message
            "pretrain.batch_size: 62 is not divisible by the data-parallel size 4",
        ),
        ({"data.dataset": "imagenet2012"}, "dataset 'imagenet2012' split 'train' not found"),
        ({"evals.val.split": "nope"}, "dataset 'digits' split 'nope' not found"),
        ({"data.image_size": 30}, "image_size=30"),
        ({"model.variant": "Z/4"}, "unknown ViT variant 'Z/4'"),
        (dict(steps=None), "exactly one of steps, epochs, examples"),
        (dict(loss="hinge"), "loss='hinge'"),
    ],
)
def test_bad_configs_fail_before_compiling(digits, tmp_path, overrides, message):
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        pretrain.run(_cfg(digits, **overrides), {}, tmp_path)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


# --- Preemption-safe resume through the DAG's single-stage entry (what a cluster job runs) -------


def _stage_cmd(workdir, *extra):
    return [
        sys.executable,
        "-m",
        "launch.stage",
        "--stage",
        "pretrain",
        "--config",
        "launch/configs/tiny.py",
        "--workdir",
        str(workdir),
        "--config.pretrain.steps=40",
        "--config.pretrain.checkpoint_every=5",
        "--config.pretrain.evals.val.every=0",
        "--config.pretrain.runtime.log_every=5",
        "--config.pretrain.optim.warmup_steps=5",
        "--config.pretrain.optim.cooldown_steps=0",
        *extra,
    ]


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    return env


def _wait_for_checkpoint(workdir, proc, min_step, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [
            int(p.name)
            for p in workdir.glob("pretrain/.partial-*/checkpoints/*")
            if p.name.isdigit()
        ]
        if steps and max(steps) >= min_step:
            return max(steps)
        if proc.poll() is not None:
            raise AssertionError(f"stage exited early: {proc.stdout.read()}")
        time.sleep(0.2)
    raise AssertionError("no checkpoint appeared")


def _final_params(workdir):
    (out,) = [p for p in workdir.glob("pretrain/*") if (p / "_SUCCESS").exists()]
    return out, checkpoint.load_params(out / "params")


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_bit_identically(prepare_into, tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    prepare_into(ref)
    prepare_into(killed)
    subprocess.run(_stage_cmd(ref), cwd=REPO, env=_env(), check=True, capture_output=True)

    proc = subprocess.Popen(
        _stage_cmd(killed),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _wait_for_checkpoint(killed, proc, min_step=10)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not [p for p in killed.glob("pretrain/*") if (p / "_SUCCESS").exists()]
    rerun = subprocess.run(_stage_cmd(killed), cwd=REPO, env=_env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming the unfinished run" in rerun.stdout + rerun.stderr

    ref_dir, ref_params = _final_params(ref)
    out_dir, params = _final_params(killed)
    assert ref_dir.name == out_dir.name  # same fingerprint
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, ref_params)
    assert json.loads((out_dir / "outputs.json").read_text())["metrics"]["start_step"] >= 10
    steps = [r["step"] for r in _lines(out_dir / "metrics.jsonl") if "loss" in r]
    assert (
        steps == sorted(set(steps)) and steps[-1] == 40
    )  # one line per logged step across the restart


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_preempted(prepare_into, tmp_path):
    prepare_into(tmp_path)
    proc = subprocess.Popen(
        _stage_cmd(
            tmp_path, "--config.pretrain.checkpoint_every=1000", "--config.pretrain.steps=400"
        ),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 240
    while not list(tmp_path.glob("pretrain/.partial-*/metrics.jsonl")) and time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, output[-2000:]
    assert "signal 15" in output and "rerun to resume" in output, output[-2000:]
    steps = [
        int(p.name) for p in tmp_path.glob("pretrain/.partial-*/checkpoints/*") if p.name.isdigit()
    ]
    assert steps and 0 < max(steps) < 400


def _planned(stdout: str) -> dict[str, str]:
    """{stage: fingerprint prefix} from a --dry_run table."""
    return {
        line.split()[0]: line.split()[2]
        for line in stdout.splitlines()
        if line and not line.startswith(" ")
    }


def test_model_fields_are_overridable_from_the_command_line(tmp_path):
    base = [
        sys.executable,
        "-m",
        "launch.run",
        "--config",
        "launch/configs/tiny.py",
        "--dry_run",
        "--workdir",
        str(tmp_path),
    ]
    plain = subprocess.run(base, cwd=REPO, env=_env(), capture_output=True, text=True)
    ok = subprocess.run(
        base
        + [
            "--config.pretrain.model.matmul=collective",
            "--config.pretrain.model.depth=1",
            "--config.pretrain.steps=100",
        ],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert plain.returncode == 0 and ok.returncode == 0, ok.stderr[-2000:]
    before, after = _planned(plain.stdout), _planned(ok.stdout)
    # The overrides reached the pretrain group (its fingerprint moved) and nothing else.
    assert before["prepare"] == after["prepare"] and before["pretrain"] != after["pretrain"]
    bad = subprocess.run(
        base + ["--config.pretrain.model.dept=1"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "dept" in bad.stderr
