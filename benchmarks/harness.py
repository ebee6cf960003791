"""The benchmark scripts' shared harness: flags and presets, a compiled train step to time
(`Runner`, `build_runner`), interleaved timing, medians and ratios, the header lines.

    from benchmarks import harness
    runner = harness.build_runner(cfg, mesh, batch_size=8, warmup=1)
    seconds = runner.run(steps=2)

Used by benchmarks/model.py, mfu.py, device.py and distill.py; their tables go through
trainer/markdown.py. Imports only the standard library, numpy, jax and JAX-only trainer modules
(no ml_collections, Grain, CLU, TensorFlow or Beam): benchmarks/device.py runs on a bare GPU host
(tests/test_device_bench.py).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import gc
import os
import platform
import statistics
import time
from typing import Callable

import jax
import numpy as np

from trainer import flops, losses, sharding
from trainer import step as step_lib
from trainer.models import vit
from trainer.task import classifier


def parse_overrides(items) -> dict:
    """["depth=8", "dtype=bfloat16"] -> {"depth": 8, "dtype": "bfloat16"}; ViTConfig rejects
    unknown keys."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--override {item!r} must look like KEY=VALUE, e.g. depth=8")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value  # a bare string such as bfloat16
    return out


def add_common_flags(ap: argparse.ArgumentParser, presets: dict) -> None:
    ap.add_argument("--preset", default="cpu", choices=tuple(presets))
    ap.add_argument("--repeats", type=int, help="timed repeats per config (the median is reported)")
    ap.add_argument("--warmup", type=int, help="untimed steps after the compiling one")
    ap.add_argument("--steps", type=int, help="steps per timed repeat")
    ap.add_argument("--batch", type=int, help="global batch size")
    ap.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="ViT config field for every config, repeatable (e.g. depth=8, dtype=bfloat16)",
    )


def resolve(args: argparse.Namespace, presets: dict) -> dict:
    """The preset with the flags that were given on top."""
    p = dict(presets[args.preset])
    for key in ("repeats", "warmup", "steps", "batch"):
        if getattr(args, key) is not None:
            p[key] = getattr(args, key)
    for key in ("repeats", "steps", "batch"):
        if p[key] < 1:
            raise ValueError(f"--{key}={p[key]} must be >= 1")
    if p["warmup"] < 0:
        raise ValueError(f"--warmup={p['warmup']} must be >= 0")
    variant, overrides = p["model"]
    p["model"] = (variant, {**overrides, **parse_overrides(args.override)})
    return p


@dataclasses.dataclass
class Runner:
    """One config's compiled train step, its sharded state and a synthetic batch, ready to time."""

    cfg: vit.ViTConfig
    step: Callable
    state: dict
    batch: dict
    num_devices: int
    compile_s: float = 0.0
    # the compiled step's memory_analysis() (explicitly compiled runners only)
    memory: object = None

    def run(self, steps: int) -> float:
        """Mean seconds per step over `steps` steps, waiting for the last one to finish."""
        start = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.step(self.state, {}, self.batch)  # no frozen params
        jax.block_until_ready((self.state, metrics))
        return (time.perf_counter() - start) / steps


def build_runner(
    cfg: vit.ViTConfig,
    mesh,
    batch_size: int,
    warmup: int = 0,
    seed: int = 0,
    compiler_options: dict | None = None,
) -> Runner:
    """trainer/step.py's sharded init + train step for `cfg` on `mesh`; compiled and warmed up.

    compiler_options: not None = compile explicitly (lower + compile with these XLA options), which
    also records the step's memory_analysis() in `runner.memory`; compile_s then includes it.
    """
    task = classifier("benchmark", vit.ViT(cfg), losses.sigmoid_xent)
    image_shape = (cfg.image_size, cfg.image_size, 3)
    # {} = trainer/optim.py's defaults (Adafactor) without ml_collections, absent on the GPU host.
    setup = step_lib.setup(task, {}, 10_000, mesh, seed)
    batch_sharding = sharding.batch_sharding(mesh)
    sharding.check_batch(batch_size, batch_sharding, "batch")
    rng = np.random.default_rng(seed)
    classes = cfg.num_classes or cfg.width  # num_classes=0: the model outputs pre-logits [B, width]
    labels = np.eye(classes, dtype=np.float32)[rng.integers(0, classes, batch_size)]
    batch = jax.device_put(
        {"image": rng.standard_normal((batch_size, *image_shape), np.float32), "labels": labels},
        batch_sharding,
    )
    state = setup.init()
    step = step_lib.make_train_step(task, setup.tx, setup.schedule, setup.shardings, batch_sharding)
    runner = Runner(cfg, step, state, batch, mesh.devices.size)
    if compiler_options is not None:
        start = time.perf_counter()
        lowered = step.lower(state, {}, batch)
        runner.step = lowered.compile(compiler_options=compiler_options or None)
        runner.memory = runner.step.memory_analysis()
        runner.compile_s = time.perf_counter() - start + runner.run(1)
    else:
        runner.compile_s = runner.run(1)  # the first call compiles
    if warmup:
        runner.run(warmup)
    return runner


def time_runners(names, build: Callable[[str], Runner], repeats: int, steps: int, interleave: bool):
    """{name: (runner's config, compile s, [seconds per step] x repeats)}.

    interleave: build every runner first, then time round-robin, each round starting one variant
    later (fair under changing load; repeat r of every variant ran in the same round).
    Otherwise: build, time and free one runner at a time (only one state in memory).
    """
    names, results = list(names), {}
    if interleave:
        runners = {n: build(n) for n in names}
        times = {n: [] for n in names}
        for r in range(repeats):
            # rotated: no variant always goes first
            for n in names[r % len(names) :] + names[: r % len(names)]:
                times[n].append(runners[n].run(steps))
        return {n: (runners[n].cfg, runners[n].compile_s, times[n]) for n in names}
    for n in names:
        runner = build(n)
        results[n] = (runner.cfg, runner.compile_s, [runner.run(steps) for _ in range(repeats)])
        del runner
        gc.collect()
    return results


def speedup(times, baseline_times, paired: bool) -> float:
    """How many times faster than the baseline (> 1 = faster).

    paired (interleaved runs): the median over rounds of baseline / time within the same round, so a
    change of load between rounds cancels out; otherwise the ratio of the medians.
    """
    if paired:
        return statistics.median(b / t for t, b in zip(times, baseline_times))
    return statistics.median(baseline_times) / statistics.median(times)


def spread(times) -> float:
    """(max - min) / median of the repeats, in percent: how noisy the median is."""
    return 100 * (max(times) - min(times)) / statistics.median(times)


def step_metrics(
    cfg: vit.ViTConfig, batch: int, seconds: float, num_devices: int, peak: float
) -> dict:
    """Model FLOPs/step, examples/s, achieved model TFLOP/s and MFU of a step taking `seconds`."""
    flops_per_step = flops.model_flops_per_example(cfg) * batch
    return {
        "flops": flops_per_step,
        "ex_s": batch / seconds,
        "tflops": flops_per_step / seconds / 1e12,
        "mfu": flops.mfu(flops_per_step, seconds, num_devices, peak),
    }


def peak_per_device(devices) -> tuple[float, str]:
    """trainer/flops.py's peak, with where it came from spelled out for the table header."""
    peak, source = flops.peak_flops_per_device(devices)
    kind = devices[0].device_kind
    if source == "table":
        return peak, f"vendor bf16 dense peak of {kind}"
    return peak, (
        f"measured here by flops.measure_matmul_peak: float32 matmuls on {len(devices)} "
        f"{kind} device(s)"
    )


def sig(x: float, digits: int = 4) -> str:
    """`x` to `digits` significant figures: a slow CPU step's MFU (1e-5 %) must not print as
    0.00."""
    return f"{x:.{digits}g}"


def run_header(name: str, preset: str) -> str:
    d = jax.devices()
    return (
        f"# {name} benchmark  {datetime.date.today()}  preset {preset}  jax {jax.__version__}  "
        f"{platform.machine()}  {len(d)} x {d[0].platform} ({d[0].device_kind})  "
        f"load avg {os.getloadavg()[0]:.2f}"
    )


def model_line(cfg: vit.ViTConfig, batch: int) -> str:
    return (
        f"model {cfg.variant}: width {cfg.width}, depth {cfg.depth}, MLP {cfg.mlp_dim}, "
        f"heads {cfg.num_heads}, {cfg.seq_len} tokens ({cfg.image_size}px / {cfg.patch_size}), "
        f"head {cfg.head}, {cfg.num_classes} classes; batch {batch}; compute {cfg.dtype}, "
        f"params {cfg.param_dtype}; Adafactor; "
        f"sigmoid xent; remat {cfg.remat}"
    )
