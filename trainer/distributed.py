"""Multi-host start-up: `jax.distributed.initialize` driven by config or environment.

Config (`cfg.distributed`) wins over the environment variables JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID. On TPU pods / GKE, leaving all of them empty lets JAX detect
the cluster itself (`auto=True`). On CPU hosts the collectives go through gloo
(docs/DESIGN.md §6). Must run before anything touches a JAX backend.
"""

from __future__ import annotations

import os

import jax


def settings(cfg) -> dict:
    """Resolved {coordinator, num_processes, process_id, auto}; validates with one-line errors."""
    coordinator = cfg.get("coordinator") or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    num = int(cfg.get("num_processes") or os.environ.get("JAX_NUM_PROCESSES", 1))
    pid_raw = cfg.get("process_id")
    pid = int(pid_raw if pid_raw not in (None, -1) else os.environ.get("JAX_PROCESS_ID", 0))
    if num < 1:
        raise ValueError(f"distributed.num_processes={num} must be >= 1")
    if not 0 <= pid < num:
        raise ValueError(f"distributed.process_id={pid} must be in [0, {num})")
    if num > 1 and not coordinator:
        raise ValueError("distributed.coordinator (host:port) is required when num_processes > 1")
    return {
        "coordinator": coordinator,
        "num_processes": num,
        "process_id": pid,
        "auto": bool(cfg.get("auto")),
    }


def initialize(cfg) -> bool:
    """Initializes the JAX distributed runtime if configured; returns whether it did."""
    s = settings(cfg)
    if not s["auto"] and s["num_processes"] == 1:
        return False
    # A second stage (or a test) in the same process: initializing twice raises in JAX.
    if jax.distributed.is_initialized():
        return True
    if s["auto"]:
        jax.distributed.initialize()
        return True
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or cfg.get("cpu_collectives", False):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        s["coordinator"], num_processes=s["num_processes"], process_id=s["process_id"]
    )
    return True
