"""benchmarks/device.py runs on the GPU machine as it comes: only jax/flax/optax/orbax/numpy.

The import-and-run test blocks ml_collections, Grain, CLU, TensorFlow, Beam and scikit-learn in a
fresh interpreter through a `sitecustomize` on PYTHONPATH, so the device entry's worker processes
are blocked too, then imports every module the GPU machine needs and runs the device entry's
micro smoke sweep (both tables, numbers finite). No timing assertions.
"""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import device
from md_tables import tables as _tables

REPO = Path(__file__).resolve().parents[1]
BLOCKED = ("ml_collections", "grain", "clu", "tensorflow", "apache_beam", "sklearn")
MODULES = (
    "benchmarks.harness",
    "benchmarks.model",
    "benchmarks.mfu",
    "benchmarks.device",
    "benchmarks.collective",
    "trainer.flops",
    "trainer.markdown",
    "trainer.models.config",
    "trainer.models.layers",
    "trainer.models.text",
    "trainer.models.vit",
)


def test_device_entry_imports_and_runs_without_the_blocked_packages(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        + "".join(f"sys.modules[{m!r}] = None  # import raises ImportError\n" for m in BLOCKED)
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
    code = (
        f"import importlib, sys\nfor m in {MODULES!r}: importlib.import_module(m)\n"
        f"assert all(sys.modules[m] is None for m in {BLOCKED!r})\n"
        "from benchmarks import device\ndevice.main(['--preset', 'smoke', '--budget_s', '150'])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep, blocks = _tables(proc.stdout)
    assert sweep[0] == device.MFU_COLUMNS and blocks[0] == device.model_bench.COLUMNS + ["status"]
    assert [r[0] for r in sweep[1:]] == ["base"]
    assert [r[0] for r in blocks[1:]] == ["vit22b", "sequential"]
    for header, rows in ((sweep[0], sweep[1:]), (blocks[0], blocks[1:])):
        for row in rows:
            assert row[-1] == "ok", row
            cells = dict(zip(header, row))
            for key in (
                "step ms",
                "ex/s",
                "model TFLOP/s",
                "MFU % vs peak",
                "MFU % vs matmul",
                "MFU %",
            ):
                if key in cells:
                    assert math.isfinite(float(cells[key])) and float(cells[key]) > 0, (key, row)
    assert (
        "measured float32 matmul" in proc.stdout
        and "parallel + fused block vs sequential" in proc.stdout
    )


def test_a_failing_config_is_a_row_and_the_worker_goes_on(capsys):
    p = dict(device.PRESETS["smoke"])
    bad = device.Job(
        "bad", "step", variant="22B/8", overrides=dict(p["model"][1], remat="bogus"), batch=2
    )
    device.worker([bad, device.Job("matmul", "matmul")], p, deadline=time.time() + 60)
    rows = [
        json.loads(line[len(device.TAG) :])
        for line in capsys.readouterr().out.splitlines()
        if line.startswith(device.TAG)
    ]
    by_id = {r["id"]: r for r in rows if r["type"] == "row"}
    assert by_id["bad"]["status"].startswith("error: ValueError: ViT config field remat='bogus'")
    assert by_id["matmul"]["status"] == "ok" and by_id["matmul"]["matmul_flops"] > 0
    device.worker([device.Job("late", "matmul")], p, deadline=time.time() - 1)
    late = [
        json.loads(line[len(device.TAG) :])
        for line in capsys.readouterr().out.splitlines()
        if line.startswith(device.TAG) and '"row"' in line
    ]
    assert late[0]["status"].startswith("skipped: time budget")


def test_a_flag_set_worker_gets_the_set_in_xla_flags_and_keeps_the_rest():
    from trainer import xla_flags

    env = device._flag_env("latency_hiding", "gpu")
    flags = env["XLA_FLAGS"].split()
    assert set(xla_flags.get("gpu", "latency_hiding")) <= set(flags)
    assert "--xla_force_host_platform_device_count=8" in flags  # tests/conftest.py's, kept
    assert device._flag_env("default", "gpu").get("XLA_FLAGS") == os.environ.get("XLA_FLAGS")
    jobs = [j for g in device.plan(device.PRESETS["gpu"]) for j in g]
    assert [j.flags for j in jobs if j.id.startswith("flags:")] == list(
        device.PRESETS["gpu"]["flag_sets"]
    )
