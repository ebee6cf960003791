"""Configs are checked at plan time: `launch.run --dry_run` (and XManager before it submits) fails
with one line naming the key, before any stage runs — one case per checked key, through
`dag.plan` in this process; the CLI's exit code and one-line output in subprocesses."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch import dag
from launch.configs import tiny

REPO = Path(__file__).resolve().parents[1]

# (config key, bad value, the key the error names first): one per checked key.
CASES = [
    ("pretrain.loss", "hinge", "pretrain.loss"),
    ("pretrain.label_smoothing", 0.1, "pretrain.loss"),  # smoothing is for softmax_xent only
    ("pretrain.optim.optimizer", "sgdd", "pretrain.optim.optimizer"),
    ("pretrain.optim.schedule", "cosin", "pretrain.optim.schedule"),
    ("pretrain.evals.val.type", "nope", "pretrain.evals.val.type"),
    ("pretrain.evals.val.split", "minival", "pretrain.evals.val.split"),
    ("pretrain.batch_size", 62, "pretrain.batch_size"),
    ("pretrain.data.image_size", 30, "pretrain.model"),  # image vs patch size
    ("pretrain.model.norm", "batchnorm", "pretrain.model"),
    ("pretrain.model.variant", "Z/4", "pretrain.model"),
    ("pretrain.data.dataset", "imagenet2012", "pretrain.data.dataset"),
    ("pretrain.data.train_split", "training", "pretrain.data.train_split"),
    ("pretrain.steps", 0, "pretrain.steps"),
    ("pretrain.mesh.model", 0, "pretrain.mesh.model"),
    ("pretrain.runtime.progress", "maybe", "pretrain.runtime.progress"),
    ("prepare.direct_num_workers", 0, "prepare.direct_num_workers"),
]


def _nothing_ran(workdir: Path) -> bool:
    return not workdir.exists() or not any(workdir.iterdir())


@pytest.mark.parametrize("name,value,key", CASES)
def test_plan_rejects_a_bad_key_naming_it(tmp_path, name, value, key):
    config = tiny.get_config()
    config.update_from_flattened_dict({name: value})
    with pytest.raises(dag.PlanError) as e:
        dag.plan(config, tmp_path / "wd")
    message = str(e.value)
    assert message.startswith(key) and "\n" not in message, message
    assert _nothing_ran(tmp_path / "wd")


def _run(module, tmp_path, *flags):
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    return subprocess.run(
        [
            sys.executable,
            "-m",
            module,
            "--config",
            "launch/configs/tiny.py",
            "--workdir",
            str(tmp_path / "wd"),
            *flags,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "override,key",
    [
        ("pretrain.loss=hinge", "pretrain.loss"),
        ("prepare.direct_num_workers=0", "prepare.direct_num_workers"),
    ],
)
def test_dry_run_rejects_a_bad_key_naming_it(tmp_path, override, key):
    result = _run("launch.run", tmp_path, "--dry_run", f"--config.{override}")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and len(errors) == 1, result.stderr[-2000:]
    assert errors[0].startswith(f"error: {key}"), errors[0]
    assert _nothing_ran(tmp_path / "wd")


def test_xmanager_checks_before_submitting(tmp_path):
    result = _run("launch.xm_launch", tmp_path, "--xm_dry_run", "--config.pretrain.loss=hinge")
    assert result.returncode != 0 and "pretrain.loss" in result.stderr, result.stderr[-2000:]
    assert "work unit" not in result.stdout.lower()
