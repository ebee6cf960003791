"""Test set-up: 8 simulated CPU devices, set before anything imports jax (docs/DESIGN.md §6)."""
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = " ".join(
    f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f
) + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


import pytest  # noqa: E402  (after the XLA_FLAGS set-up above)


@pytest.fixture(scope="session")
def prepared_digits(tmp_path_factory):
    """The tiny config's prepare output (digits train/val/test at 32 px, the real Beam job), made
    once per test worker and shared by every training-stage test."""
    from pipelines import prepare
    out = tmp_path_factory.mktemp("prepared_digits")
    prepare.prepare(prepare.default_config(), out)
    return out


@pytest.fixture(scope="session")
def prepare_output(prepared_digits):
    """`prepared_digits` as the DAG hands it to downstream stages: inputs["prepare"]."""
    from launch.stage_types import StageOutput
    return StageOutput("prepare", "0" * 64, prepared_digits, {})


@pytest.fixture(scope="session")
def pretrain_export(prepared_digits, tmp_path_factory):
    """ONE tiny pretrain export (mu/4 on 32 px digits, 60 steps, params/ + model.json +
    outputs.json) shared by every downstream-stage test: inputs["pretrain"]."""
    import json

    from launch.configs import tiny
    from launch.stage_types import StageOutput
    from trainer import pretrain
    cfg = tiny.pretrain_config()
    cfg.data.prepared_dir = str(prepared_digits)
    cfg.steps, cfg.checkpoint_every, cfg.evals.val.every = 60, 0, 0
    cfg.evals = {"val": cfg.evals.val, "pairs": cfg.evals.pairs}  # few-shot has its own tests (and costs)
    cfg.optim.warmup_steps, cfg.optim.cooldown_steps = 5, 10
    cfg.runtime.log_every, cfg.runtime.progress = 10, "off"
    out = tmp_path_factory.mktemp("pretrain_export")
    result = pretrain.run(cfg, {}, out)
    (out / "outputs.json").write_text(json.dumps(result, sort_keys=True))
    return StageOutput("pretrain", "1" * 64, out, result)
