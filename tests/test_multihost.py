"""Multi-host: 2 CPU processes (gloo collectives) train exactly like 1 process on the same global
batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data import loader
from trainer import sharding

REPO = Path(__file__).resolve().parents[1]

WORKER = """
import json, sys
from pathlib import Path
from launch.configs import tiny
from trainer import pretrain
data_dir, out, pid, nproc, port = sys.argv[1:6]
cfg = tiny.pretrain_config()
cfg.data.prepared_dir = data_dir
cfg.steps, cfg.runtime.log_every, cfg.evals.val.every, cfg.checkpoint_every = 6, 1, 0, 0
cfg.optim.warmup_steps, cfg.optim.cooldown_steps = 2, 0
if int(nproc) > 1:
    cfg.runtime.distributed.coordinator = f"127.0.0.1:{port}"
    cfg.runtime.distributed.num_processes = int(nproc)
    cfg.runtime.distributed.process_id = int(pid)
    cfg.runtime.distributed.cpu_collectives = True
result = pretrain.run(cfg, {}, Path(out))
print("RESULT", json.dumps(result["metrics"]))
"""


@pytest.fixture
def digits(prepared_digits):
    return prepared_digits


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(digits, out, pid, nproc, port, devices):
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",
    )
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(digits), str(out), str(pid), str(nproc), str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _losses(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_two_process_slices_form_the_single_process_global_batch(digits):
    mesh = sharding.make_mesh(data=8, model=1)
    split = digits / "digits" / "train"
    kw = dict(
        global_batch_size=32,
        image_size=32,
        seed=3,
        sharding=sharding.batch_sharding(mesh),
        augment=dict(flip=True, area_min=0.3),
    )
    single = loader.train_loader(split, **kw, process_index=0, process_count=1)
    parts = [loader.train_loader(split, **kw, process_index=i, process_count=2) for i in range(2)]
    for _ in range(3):
        whole = next(single.iterator)
        halves = [next(p.iterator) for p in parts]
        assert all(len(h["label"]) == 16 for h in halves)
        # Same examples, same augmentation: process i holds stream positions i, i+2, i+4, ...
        for key in ("image", "labels", "label"):
            np.testing.assert_array_equal(halves[0][key], whole[key][0::2])
            np.testing.assert_array_equal(halves[1][key], whole[key][1::2])


@pytest.mark.slow
def test_two_processes_match_one_process(digits, tmp_path):
    single = _spawn(digits, tmp_path / "single", 0, 1, 0, devices=8)
    out, _ = single.communicate(timeout=300)
    assert single.returncode == 0, out[-3000:]

    port = _free_port()
    procs = [_spawn(digits, tmp_path / "multi", i, 2, port, devices=4) for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, o in zip(procs, outputs):
        assert p.returncode == 0, o[-3000:]

    ref, multi = _losses(tmp_path / "single"), _losses(tmp_path / "multi")
    assert len(ref) == len(multi) == 6
    # The global batch holds the same examples in a different row order: equal up to summation
    # order.
    np.testing.assert_allclose(multi, ref, rtol=2e-5)
    result = [
        json.loads(line.split(" ", 1)[1])
        for line in outputs[0].splitlines()
        if line.startswith("RESULT")
    ][0]
    assert result["val/top1"] >= 0.0 and (tmp_path / "multi" / "params").exists()
