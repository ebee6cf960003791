"""Shared by the stage tests: SIGKILL a stage run mid-training, rerun it, compare with an
uninterrupted run (the loop's own checkpoints make the rerun continue bit-exactly)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from trainer import checkpoint

REPO = Path(__file__).resolve().parents[1]


def spawn(script: str, *args) -> subprocess.Popen:
    """`python -c script args...` with 8 simulated CPU devices; the script prints
    `RESULT <metrics json>`."""
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def kill_resume_and_compare(
    script: str, args: tuple, tmp_path: Path, *, kill_after_step: int
) -> dict:
    """Runs `script args out` to completion in tmp/ref, and in tmp/killed killed by SIGKILL once a
    checkpoint of step >= kill_after_step exists, then rerun; asserts equal params. Returns the
    rerun's metrics."""
    # The reference first: the two runs after it reuse its compiled programs from the run's JAX
    # compilation cache (tests/conftest.py) instead of compiling them again.
    ref = spawn(script, *args, tmp_path / "ref")
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out[-3000:]
    killed = spawn(script, *args, tmp_path / "killed")
    deadline = time.time() + 300
    while time.time() < deadline:
        steps = [
            int(p.name) for p in (tmp_path / "killed" / "checkpoints").glob("*") if p.name.isdigit()
        ]
        if steps and max(steps) >= kill_after_step:
            break
        assert killed.poll() is None, killed.stdout.read()[-3000:]
        time.sleep(0.1)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "params").exists()
    rerun = spawn(script, *args, tmp_path / "killed")
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out[-3000:]
    jax.tree_util.tree_map(
        np.testing.assert_array_equal,
        checkpoint.load_params(tmp_path / "killed" / "params"),
        checkpoint.load_params(tmp_path / "ref" / "params"),
    )
    return json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
