"""Two small DAG stages for tests/test_cloud_paths.py: an Orbax params export and a consumer that
reads its upstream through whatever path type the DAG hands it (an epath.Path for a bucket)."""

from __future__ import annotations

import os

import numpy as np

from data import paths

PARAMS = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.float32(0.5)}


def run_export(cfg, inputs, out):
    from trainer import checkpoint

    del inputs
    if os.environ.get("CLOUD_STAGE_FAIL"):
        (out / "half.txt").write_text("written before the failure")
        raise RuntimeError("export failed on purpose")
    checkpoint.save_params(out / "params", {k: v * cfg.scale for k, v in PARAMS.items()})
    checkpoint.write_model_json(out / "model.json", {"variant": "test", "overrides": {}})
    return {
        "artifacts": {"params": "params", "model": "model.json"},
        "metrics": {"scale": cfg.scale},
    }


def run_consume(cfg, inputs, out):
    del cfg
    upstream = paths.as_path(inputs["export"].path)
    spec = (upstream / "model.json").read_text()
    (out / "seen.txt").write_text(f"{type(upstream).__name__} {upstream}\n{spec}")
    return {"artifacts": {"seen": "seen.txt"}, "metrics": {}}
