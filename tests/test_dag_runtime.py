"""The cache key holds results only: every `runtime` knob of a training stage is a cache hit, and a
rerun with all of them changed produces bit-identical artifacts (docs/DESIGN.md §2.5)."""

import json
import time

import jax
import numpy as np
import psutil
import pytest

from launch import dag
from launch.configs import tiny
from trainer import checkpoint

# Each runtime knob with a value other than the tiny config's.
KNOBS = {
    "progress": "on",
    "log_every": 4,
    "read_threads": 1,
    "worker_count": 1,
    "keep_checkpoints": 1,
    "async_checkpoint": False,
    "peak_flops": 1e12,
    "distributed.coordinator": "127.0.0.1:1234",
    "distributed.num_processes": 1,
    "distributed.process_id": 0,
    "distributed.auto": False,
    "distributed.cpu_collectives": True,
}


def _config(**runtime):
    config = tiny.get_config("prepare,pretrain")
    p = config.pretrain
    p.steps, p.checkpoint_every, p.evals.val.every = 6, 3, 3
    p.optim.warmup_steps, p.optim.cooldown_steps = 2, 0
    for key, value in runtime.items():
        node = p.runtime
        *parents, leaf = key.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def _silent(_):
    pass


@pytest.mark.slow
def test_runtime_knobs_hit_the_cache_and_leave_artifacts_identical(prepare_into, tmp_path):
    prepare_into(tmp_path)  # a cache hit: only the pretrain stage runs here
    first = dag.run_pipeline(_config(), tmp_path, log=_silent)["pretrain"]
    params = jax.device_get(checkpoint.load_params(first.path / "params"))
    metrics = json.loads((first.path / "outputs.json").read_text())["metrics"]

    for key, value in KNOBS.items():
        plans = {p.name: p for p in dag.plan(_config(**{key: value}), tmp_path)}
        assert plans["pretrain"].action == "reuse", (key, plans["pretrain"].reason)
        assert plans["pretrain"].fingerprint == first.fingerprint
    # A knob that does change results is still a miss.
    changed = _config()
    changed.pretrain.seed = 1
    assert {p.name: p for p in dag.plan(changed, tmp_path)}["pretrain"].action == "run"

    # Every runtime knob changed at once (distributed ones aside: one process here), rerun for real.
    local = {k: v for k, v in KNOBS.items() if not k.startswith("distributed.")}
    before = set(psutil.Process().children(recursive=True))  # other tests' processes in this worker
    second = dag.run_pipeline(
        _config(**local), tmp_path, only=["pretrain"], force=["pretrain"], log=_silent
    )["pretrain"]
    assert second.path == first.path

    # worker_count=1 started Grain worker processes; the loop closed the loader, so none outlives
    # it.
    # Python's multiprocessing resource tracker lives as long as this process, by design
    def workers():
        new = set(psutil.Process().children(recursive=True)) - before
        return [p for p in new if "resource_tracker" not in " ".join(p.cmdline())]

    deadline = time.time() + 30
    while workers() and time.time() < deadline:
        time.sleep(0.2)
    assert not workers(), [p.cmdline() for p in workers()]
    jax.tree_util.tree_map(
        np.testing.assert_array_equal,
        jax.device_get(checkpoint.load_params(second.path / "params")),
        params,
    )
    again = json.loads((second.path / "outputs.json").read_text())["metrics"]
    for key in ("val/top1", "val/top5", "val/loss", "steps"):
        assert again[key] == metrics[key], key
    assert json.loads((second.path / "config.json").read_text())["runtime"]["read_threads"] == 1
