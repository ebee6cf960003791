"""XLA's own asynchronous-collective schedules as named flag sets, per platform.

    from trainer import xla_flags
    xla_flags.apply("gpu", "collective_matmul")          # before the backend initialises
    compiled = lowered.compile(
        compiler_options=xla_flags.compiler_options("tpu", "async_collectives")
    )

A training stage names its set in `<stage>.xla_flags` (trainer/stage_config.py); the stage's
process (launch/stage.py) applies it for every platform before JAX starts, so one config serves
TPU and GPU hosts. The sets are in the training group, not `runtime`: windowed einsums and
reordered collectives change the order of float sums, so they can change results.

Where the flags go differs by platform (measured with jaxlib 0.10.2 + libtpu 0.0.42.1):
- GPU flags are XLA debug options, read from `XLA_FLAGS` by every jaxlib build (a CPU jaxlib
  accepts them too, so setting them on a TPU or CPU host is harmless).
- TPU flags belong to libtpu, read from `LIBTPU_INIT_ARGS` when libtpu loads; in `XLA_FLAGS` they
  abort the process ("Unknown flag in XLA_FLAGS"). For AOT compiles the same flags can be passed per
  compile (`compiler_options`), which libtpu validates ("No such compile option").

Every flag below is documented for the jax 0.10/0.11 era: JAX's "List of XLA compiler flags"
(docs/xla_flags.md), NVIDIA JAX-Toolbox's GPU performance guide (rosetta/docs/GPU_performance.md)
and MaxText's flag library (benchmarks/xla_flags_library.py). Imports only the standard library.
"""

from __future__ import annotations

import os
from typing import MutableMapping

# LHS = XLA's latency-hiding scheduler: it orders async -start/-done pairs so compute runs between.
FLAG_SETS: dict[str, dict[str, tuple[str, ...]]] = {
    "tpu": {
        "default": (),  # libtpu's defaults
        "async_collectives": (
            # Fuse async collectives with the compute ops (fusions, convolutions = dots) scheduled
            # between their -start and -done ("continuation fusion"): the transfer runs inside them.
            "--xla_tpu_enable_async_collective_fusion=true",
            # ... including all-gathers (the FSDP weight gathers of every layer).
            "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
            # ... and let one collective continue across several such fusions.
            "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
            # Overlap compute and communication on one TensorCore (megacore fusion's one-core form).
            "--xla_tpu_overlap_compute_collective_tc=true",
            # Give the data-parallel gradient all-reduces (DCN for multi-slice) more overlap...
            "--xla_tpu_enable_data_parallel_all_reduce_opt=true",
            # ... pipelining them across iterations even when their sizes differ (more memory).
            "--xla_tpu_data_parallel_opt_different_sized_ops=true",
        ),
        "collective_matmul": (
            # XLA's own collective matmul: decompose all-gather + einsum and einsum + reduce-scatter
            # into windowed loops of partial einsums and collective-permutes (what trainer/
            # collective.py writes by hand; MaxText lists both switches).
            "--xla_tpu_enable_windowed_einsum_for_all_gather=true",
            "--xla_tpu_enable_windowed_einsum_for_reduce_scatter=true",
            # ... for einsums of every size: the operand-size threshold in MiB (MaxText's flag
            # library disables collective matmul with 1000000; 0 = always windowed).
            "--xla_jf_spmd_threshold_for_windowed_einsum_mib=0",
            # ... with the async fusion above, so each permute hides behind its window's einsum.
            "--xla_tpu_enable_async_collective_fusion=true",
            "--xla_tpu_overlap_compute_collective_tc=true",
        ),
        # libtpu always schedules with its LHS; this set adds what MaxText pairs with it for FSDP:
        # pipelining all-gathers backwards through scan loops (the scanned layers' weight gathers).
        "latency_hiding": (
            "--xla_tpu_enable_ag_backward_pipelining=true",
            "--xla_tpu_enable_async_collective_fusion=true",
            "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
        ),
    },
    "gpu": {
        "default": (),  # jaxlib's defaults
        "async_collectives": (
            # Run the async collectives on the highest-priority stream, so kernels do not starve
            # them.
            "--xla_gpu_enable_highest_priority_async_stream=true",
            # Pipeline FSDP's all-gathers / reduce-scatters / all-reduces across loop iterations
            # (the scanned layers), so the next layer's gather overlaps this layer's compute.
            "--xla_gpu_enable_pipelined_all_gather=true",
            "--xla_gpu_enable_pipelined_reduce_scatter=true",
            "--xla_gpu_enable_pipelined_all_reduce=true",
            # Double-buffer while loops (unroll by two) so the pipelined collectives have room.
            "--xla_gpu_enable_while_loop_double_buffering=true",
            "--xla_gpu_enable_latency_hiding_scheduler=true",
        ),
        "collective_matmul": (
            # XLA's collective matmul on GPU: windowed einsums for every size (threshold 0 MiB)...
            "--xla_gpu_threshold_for_windowed_einsum_mib=0",
            # ... with the partial einsums on several streams, so they overlap the permutes.
            "--xla_gpu_multi_streamed_windowed_einsum=true",
            "--xla_gpu_enable_latency_hiding_scheduler=true",
        ),
        "latency_hiding": (
            # Let XLA move collectives to overlap compute (off by default on GPU).
            "--xla_gpu_enable_latency_hiding_scheduler=true",
        ),
    },
}

# The environment variable each platform's runtime reads its flags from, once, at start-up.
ENV_VAR = {"tpu": "LIBTPU_INIT_ARGS", "gpu": "XLA_FLAGS"}


def get(platform: str, name: str) -> tuple[str, ...]:
    """The flags of set `name` on `platform`; one-line error naming what exists otherwise."""
    if platform not in FLAG_SETS:
        raise ValueError(f"xla_flags: unknown platform {platform!r}; known: {', '.join(FLAG_SETS)}")
    sets = FLAG_SETS[platform]
    if name not in sets:
        raise ValueError(
            f"xla_flags: unknown flag set {name!r} for {platform}; known: {', '.join(sets)}"
        )
    return sets[name]


def check_name(name: str) -> None:
    """A set name a config may use: defined for every platform (one config, any host)."""
    for platform in FLAG_SETS:
        get(platform, name)


def _key(flag: str) -> str:
    return flag.lstrip("-").split("=", 1)[0]


def merge(existing: str, flags: tuple[str, ...] | list[str]) -> str:
    """`existing` flags with `flags` added; a flag already present is replaced by the set's value,
    every other existing flag (e.g. --xla_force_host_platform_device_count) is kept in place."""
    new = {_key(f): f for f in flags}
    kept = [f for f in existing.split() if _key(f) not in new]
    return " ".join(kept + list(new.values()))


def apply(platform: str, name: str, env: MutableMapping[str, str] | None = None) -> str:
    """Merges set `name` into the platform's flag variable (`ENV_VAR`) of `env` (default
    os.environ) and returns the new value. Call before the backend starts: runtimes read it once."""
    env = os.environ if env is None else env
    flags = get(platform, name)
    var = ENV_VAR[platform]
    value = merge(env.get(var, ""), flags)
    if value or var in env:
        env[var] = value
    return value


def apply_all(name: str, env: MutableMapping[str, str] | None = None) -> None:
    """Set `name` for every platform (each runtime reads only its own variable): what a launch does
    before it knows which accelerator the process will find."""
    check_name(name)
    for platform in FLAG_SETS:
        apply(platform, name, env)


def compiler_options(platform: str, name: str) -> dict[str, str]:
    """The set as per-compile options (`jax.stages.Lowered.compile(compiler_options=...)`), for
    comparing sets in one process (benchmarks/aot.py); libtpu rejects unknown names there too."""
    out = {}
    for flag in get(platform, name):
        key, _, value = flag.lstrip("-").partition("=")
        out[key] = value
    return out
