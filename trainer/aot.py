"""Ahead-of-time compiles of the train step for a TPU slice on a CPU host, and what to read off
them.

    devices = aot.tpu_devices("v4", "8x8x16")        # needs libtpu (the [tpu] extra); no TPU needed
    result = aot.compile_train_step(task, optim_cfg, total_steps, mesh, seed, batch)
    result.memory, result.stats, aot.permute_overlap(result.compiled.as_text())

Shared by launch/preflight.py (the go/no-go memory row) and benchmarks/aot.py (the fit/overlap
table), following MaxText's train_compile.py: `get_topology_desc` gives abstract devices, the
state's shapes come from `eval_shape`, and `jit(step).lower(ShapeDtypeStructs).compile()` gives
`memory_analysis()` and `cost_analysis()` as the chip's compiler sees them. Imports only the
standard library at module level (launch/preflight.py stays cheap to import); JAX and trainer.step
(with it the optimizer) are imported where they are used.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import time
from typing import Any

# Per TPU chip (one JAX device: v4 and v5p run as megacores): HBM bytes and bandwidth (vendor
# figures), the peak-table key of trainer/flops.py, and the chip config libtpu's AOT topology takes.
TPU_HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95}
TPU_HBM_BYTES_PER_S = {"v4": 1.2e12, "v5e": 8.19e11, "v5p": 2.765e12}
TPU_PEAK_KEY = {"v4": "tpu v4", "v5e": "tpu v5e", "v5p": "tpu v5p"}
TPU_CHIP_CONFIG = {"v4": "megacore", "v5e": "default", "v5p": "megacore"}

LIBTPU_MISSING = (
    "libtpu is not installed (pip install -c constraints.txt '.[tpu]'): no AOT compile for TPU "
    "on this host"
)


def libtpu_installed() -> bool:
    return bool(importlib.util.find_spec("libtpu") or os.environ.get("TPU_LIBRARY_PATH"))


def tpu_devices(version: str, topology: str) -> list:
    """Compile-only devices of a TPU slice, e.g. ("v4", "8x8x16") -> 1024 megacore devices."""
    if not libtpu_installed():
        raise RuntimeError(LIBTPU_MISSING)
    from jax.experimental import topologies

    if version not in TPU_CHIP_CONFIG:
        raise ValueError(f"TPU type {version!r}: one of {', '.join(TPU_CHIP_CONFIG)}")
    # libtpu looks its (absent) worker hosts up at load time; on a CPU host say there is one.
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # libtpu takes a machine-wide lock file at load ("Internal error when accessing libtpu
    # multi-process lockfile"); compile-only processes (parallel tests, a benchmark) may share it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    return list(
        topologies.get_topology_desc(
            platform="tpu",
            topology_name=f"{version}:{topology}",
            chip_config_name=TPU_CHIP_CONFIG[version],
        ).devices
    )


def abstract_batch(batch_size: int, image_size: int, num_classes: int, batch_sharding) -> dict:
    """The loader's training batch contract (docs/INTERFACES.md) as sharded shapes."""
    import jax
    import jax.numpy as jnp

    spec = {
        "image": ((batch_size, image_size, image_size, 3), jnp.float32),
        "labels": ((batch_size, num_classes), jnp.float32),
        "label": ((batch_size,), jnp.int32),
    }
    return {
        k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
        for k, (shape, dtype) in spec.items()
    }


def device_bytes(stats) -> int:
    """Per-device bytes a compiled program needs live: arguments + outputs (less the donated ones
    they alias) + temps + code."""
    return (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        - stats.alias_size_in_bytes
        + stats.temp_size_in_bytes
        + stats.generated_code_size_in_bytes
    )


def cost(compiled) -> tuple[float, float]:
    """(FLOPs, bytes accessed) per device and step from XLA's cost analysis."""
    c = compiled.cost_analysis()
    c = c[0] if isinstance(c, (list, tuple)) else c
    return float(c.get("flops", 0.0)), float(c.get("bytes accessed", 0.0))


@dataclasses.dataclass
class CompiledStep:
    compiled: Any  # jax.stages.Compiled
    setup: Any  # trainer.step.Setup
    batch: dict  # the abstract batch it was compiled for
    batch_sharding: Any
    lower_s: float
    compile_s: float

    @property
    def stats(self):
        return self.compiled.memory_analysis()

    @property
    def memory(self) -> int:
        return device_bytes(self.stats)


def compile_train_step(
    task,
    optim_cfg,
    total_steps: int,
    mesh,
    seed: int,
    batch_size: int,
    image_size: int,
    num_classes: int,
    *,
    microbatches: int = 1,
    compiler_options: dict | None = None,
) -> CompiledStep:
    """trainer/step.py's real train step over `task`, lowered on abstract state and batch with the
    state's shardings and compiled for `mesh`'s devices (a TPU topology's or this machine's)."""
    from trainer import checkpoint, sharding
    from trainer import step as step_lib

    setup = step_lib.setup(task, optim_cfg, total_steps, mesh, seed)
    batch_sharding = sharding.batch_sharding(mesh)
    train_step = step_lib.make_train_step(
        task,
        setup.tx,
        setup.schedule,
        setup.shardings,
        batch_sharding,
        setup.frozen_shardings,
        microbatches=microbatches,
    )
    state = checkpoint.abstract_with_shardings(setup.abstract, setup.shardings)
    batch = abstract_batch(batch_size, image_size, num_classes, batch_sharding)
    start = time.perf_counter()
    lowered = train_step.lower(state, {}, batch)  # traced under the mesh (step.under_mesh)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = (
        lowered.compile(compiler_options=compiler_options)
        if compiler_options
        else lowered.compile()
    )
    return CompiledStep(
        compiled, setup, batch, batch_sharding, lower_s, time.perf_counter() - start
    )


def estimate_bytes(
    task,
    optim_cfg,
    total_steps: int,
    data: int,
    model: int,
    replica: int,
    seed: int,
    batch_size: int,
    image_size: int,
    num_classes: int,
) -> int:
    """Without libtpu: jax.eval_shape's per-device bytes of params + optimizer state + batch on an
    abstract mesh (activations and temps not counted)."""
    from trainer import sharding
    from trainer import step as step_lib

    mesh = sharding.abstract_mesh(data, model, replica)
    setup = step_lib.setup(task, optim_cfg, total_steps, mesh, seed)
    batch = abstract_batch(batch_size, image_size, num_classes, sharding.batch_sharding(mesh))
    return sharding.per_device_bytes(setup.abstract, setup.shardings) + sharding.per_device_bytes(
        batch, {k: v.sharding for k, v in batch.items()}
    )


# --- the optimized HLO: are the collective-permutes overlapped with dots? ------------------------

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_NAME = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = ")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")


def _computations(hlo: str) -> dict[str, list[str]]:
    comps, current = {}, None
    for line in hlo.splitlines():
        if current is None:
            m = _COMPUTATION.match(line)
            if m and "->" in line:
                current = m.group(1)
                comps[current] = []
        elif line.strip() == "}":
            current = None
        else:
            comps[current].append(line)
    return comps


def _has_dot(name: str, comps: dict, memo: dict) -> bool:
    """A computation does matmul work: a dot/convolution in it or in what it calls (fusions)."""
    if name not in memo:
        memo[name] = False
        lines = comps.get(name, [])
        memo[name] = any(re.search(r"\b(dot|convolution)\(", l) for l in lines) or any(
            _has_dot(c, comps, memo) for l in lines for c in _CALLS.findall(l)
        )
    return memo[name]


@dataclasses.dataclass(frozen=True)
class Overlap:
    pairs: int  # async collective-permute start/done pairs
    overlapped: int  # pairs with at least one dot (or dot fusion) scheduled between start and done
    sync: int  # collective-permutes XLA left synchronous
    ring_pairs: int = 0  # of `pairs`: our `jax.lax.ppermute`s (trainer/collective.py), by op_name
    ring_overlapped: int = 0

    def __str__(self) -> str:
        return (
            f"{self.overlapped}/{self.pairs} (rings {self.ring_overlapped}/{self.ring_pairs})"
            + (f" +{self.sync} sync" if self.sync else "")
        )


def permute_overlap(hlo: str) -> Overlap:
    """Counts, in a compiled (scheduled) module's text, the collective-permute-start/-done pairs and
    how many have matmul work scheduled between them: instruction order in a scheduled
    computation is the execution order, so a dot between start and done runs while the data
    moves."""
    comps = _computations(hlo)
    memo: dict = {}
    pairs = overlapped = sync = ring_pairs = ring_overlapped = 0
    for lines in comps.values():
        open_starts: dict[str, bool] = {}  # start name -> a dot seen since
        ours: set[str] = (
            set()
        )  # starts whose op_name ends in ppermute: jax.lax.ppermute in our rings
        for line in lines:
            m = _NAME.match(line)
            if not m:
                continue
            name = m.group(1)
            rhs = line.split(" = ", 1)[1]
            if re.search(r"\bcollective-permute-start\(", rhs):
                open_starts[name] = False
                if re.search(r'op_name="[^"]*/ppermute"', rhs):
                    ours.add(name)
            elif re.search(r"\bcollective-permute-done\(", rhs):
                operand = re.search(r"collective-permute-done\(\S*?%?([\w.\-]+)\)", rhs)
                start = operand.group(1) if operand else None
                if start in open_starts:
                    pairs += 1
                    hidden = open_starts.pop(start)
                    overlapped += hidden
                    if start in ours:
                        ring_pairs += 1
                        ring_overlapped += hidden
            elif re.search(r"\bcollective-permute\(", rhs):
                sync += 1
            elif re.search(r"\b(dot|convolution)\(", rhs) or any(
                _has_dot(c, comps, memo)
                for c in _CALLS.findall(rhs)
                if "fusion" in rhs or "call(" in rhs
            ):
                for start in open_starts:
                    open_starts[start] = True
    return Overlap(pairs, overlapped, sync, ring_pairs, ring_overlapped)
