"""Test set-up: 8 simulated CPU devices, set before anything imports jax (DESIGN §6)."""
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
