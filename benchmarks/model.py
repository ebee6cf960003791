"""Model benchmark: train-step time of the ViT-22B block and its ablations, side by side in one run.

    python -m benchmarks.model                        # --preset cpu: width 384, depth 4; < 3 min on 2 cores
    python -m benchmarks.model --preset gpu           # one H200: ViT-22B width 6144 x 4 layers, bf16
    python -m benchmarks.model --variants vit22b,sequential --repeats 10 --override depth=8

Every variant has the same width, depth, heads and MLP size; each changes one thing relative to the
ViT-22B block ("vit22b": parallel attention + MLP with fused in/out matmuls, no QKV/norm biases,
QK-norm, RMSNorm): the block order (sequential, with separate or fused QKV), fusion, biases, QK-norm
or the norm; "classic" turns all of them back to the classic ViT block.

A step is the full train step of `trainer/step.py` (forward + backward + Adafactor update, the
pretrain loss) on a synthetic batch, on a one-device mesh. All variants are compiled and warmed up
first; then, with `--interleave` (default except on the GPU preset), the repeats run round-robin
across variants so that load from other jobs hits them alike. Without it each variant is timed and
freed before the next one is built (bounded memory for large widths). The table reports the median
over `--repeats` (each the mean of `--steps` steps), examples/s, model TFLOP/s (PaLM's formula,
`trainer/flops.py`), MFU against the device's peak (the vendor table on accelerators; a matmul
measured in the same run on CPU), and each variant's speed relative to the sequential baseline
(baseline step time / variant step time: > 1 is faster). The footer compares the measured ratios
with the paper's claims.
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
from jax.sharding import NamedSharding

from trainer import flops, losses, sharding
from trainer import step as step_lib
from trainer.models import vit
from trainer.task import classifier

# Each variant's overrides on top of the preset's model (a "22B/..." variant: the ViT-22B block).
VARIANTS: dict[str, dict] = {
    "vit22b": {},  # parallel + fused, no QKV/norm biases, QK-norm, RMSNorm
    "parallel_unfused": dict(fused=False),
    "sequential": dict(block="sequential", fused=False),  # the baseline: classic block order
    "sequential_fused_qkv": dict(block="sequential", fused=True),
    "bias": dict(use_bias=True),
    "no_qk_norm": dict(qk_norm=False),
    "layernorm": dict(norm="layernorm"),
    "classic": dict(block="sequential", fused=False, use_bias=True, qk_norm=False, norm="layernorm"),
}
BASELINE = "sequential"

# model: the variant string and overrides every variant shares. batch: global batch per step.
PRESETS: dict[str, dict] = {
    "smoke": dict(model=("22B/8", dict(width=32, depth=1, mlp_dim=128, num_heads=2, image_size=16, num_classes=10,
                                        head="gap")),
                  batch=2, repeats=1, warmup=0, steps=1, interleave=True),
    "cpu": dict(model=("22B/16", dict(width=384, depth=4, mlp_dim=1536, num_heads=6, image_size=160)),
                batch=8, repeats=15, warmup=1, steps=1, interleave=True),
    # ViT-22B's layer (width 6144, 48 heads, MLP 24576) x 4 on 256 tokens, bf16 compute, f32 params:
    # 2.28B parameters, 94 model TFLOP/step. XLA:CPU's buffer assignment for this fwd+bwd at batch 32
    # needs 40 GiB of temporaries (+ 8.5 GiB params, 8.5 grads, ~5 Adafactor), under the 75% of
    # 141 GB that JAX preallocates on a GPU; batch 64 would need ~72 GiB of temporaries.
    "gpu": dict(model=("22B/14", dict(depth=4, image_size=224, dtype="bfloat16")),
                batch=32, repeats=10, warmup=2, steps=2, interleave=False),
}

PAPER = ("paper (ViT-22B §2, on TPU v4 at 22B scale): parallel layers ~15% faster training (PaLM), "
         "i.e. vit22b vs sequential ~1.15x; dropping QKV/LayerNorm biases +3% utilization (bias -> vit22b)")


# ---------------------------------------------------------------------------------------------------
# Shared with benchmarks/mfu.py: flags, a compiled train step to time, medians and tables.


def parse_overrides(items) -> dict:
    """["depth=8", "dtype=bfloat16"] -> {"depth": 8, "dtype": "bfloat16"}; ViTConfig rejects unknown keys."""
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
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="ViT config field for every config, repeatable (e.g. depth=8, dtype=bfloat16)")


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
    memory: object = None  # the compiled step's memory_analysis() (explicitly compiled runners only)

    def run(self, steps: int) -> float:
        """Mean seconds per step over `steps` steps, waiting for the last one to finish."""
        start = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.step(self.state, {}, self.batch)  # no frozen params
        jax.block_until_ready((self.state, metrics))
        return (time.perf_counter() - start) / steps


def build_runner(cfg: vit.ViTConfig, mesh, batch_size: int, warmup: int = 0, seed: int = 0,
                 compiler_options: dict | None = None) -> Runner:
    """trainer/step.py's sharded init + train step for `cfg` on `mesh`; compiled and warmed up.

    compiler_options: not None = compile explicitly (lower + compile with these XLA options), which
    also records the step's memory_analysis() in `runner.memory`; compile_s then includes it.
    """
    task = classifier("benchmark", vit.ViT(cfg), losses.sigmoid_xent)
    image_shape = (cfg.image_size, cfg.image_size, 3)
    # {} = trainer/optim.py's defaults (Adafactor) without ml_collections, absent on the GPU host.
    setup = step_lib.setup(task, {}, 10_000, mesh, seed)
    batch_sharding = NamedSharding(mesh, sharding.batch_spec(mesh))
    if batch_size % sharding.data_parallel_size(mesh):
        raise ValueError(f"batch {batch_size} is not divisible by the data-parallel size "
                         f"{sharding.data_parallel_size(mesh)}")
    rng = np.random.default_rng(seed)
    classes = cfg.num_classes or cfg.width  # num_classes=0: the model outputs pre-logits [B, width]
    labels = np.eye(classes, dtype=np.float32)[rng.integers(0, classes, batch_size)]
    batch = jax.device_put({"image": rng.standard_normal((batch_size, *image_shape), np.float32),
                            "labels": labels}, batch_sharding)
    state = setup.init()
    step = step_lib.make_train_step(task, setup.tx, setup.schedule, setup.shardings, batch_sharding)
    runner = Runner(cfg, step, state, batch, mesh.devices.size)
    if compiler_options is not None:
        start = time.perf_counter()
        runner.step = step.lower(state, {}, batch).compile(compiler_options=compiler_options or None)
        runner.memory = runner.step.memory_analysis()
        runner.compile_s = time.perf_counter() - start + runner.run(1)
    else:
        runner.compile_s = runner.run(1)  # the first call compiles
    if warmup:
        runner.run(warmup)
    return runner


def time_runners(names, build: Callable[[str], Runner], repeats: int, steps: int, interleave: bool):
    """{name: (runner's config, compile s, [seconds per step] x repeats)}.

    interleave: build every runner first, then time round-robin, each round starting one variant later
    (fair under changing load; repeat r of every variant ran in the same round).
    Otherwise: build, time and free one runner at a time (only one state in memory).
    """
    names, results = list(names), {}
    if interleave:
        runners = {n: build(n) for n in names}
        times = {n: [] for n in names}
        for r in range(repeats):
            for n in names[r % len(names):] + names[:r % len(names)]:  # rotated: no variant always goes first
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


def step_metrics(cfg: vit.ViTConfig, batch: int, seconds: float, num_devices: int, peak: float) -> dict:
    """Model FLOPs/step, examples/s, achieved model TFLOP/s and MFU of a step taking `seconds`."""
    flops_per_step = flops.model_flops_per_example(cfg) * batch
    return {"flops": flops_per_step, "ex_s": batch / seconds, "tflops": flops_per_step / seconds / 1e12,
            "mfu": flops.mfu(flops_per_step, seconds, num_devices, peak)}


def peak_per_device(devices) -> tuple[float, str]:
    """trainer/flops.py's peak, with where it came from spelled out for the table header."""
    peak, source = flops.peak_flops_per_device(devices)
    kind = devices[0].device_kind
    if source == "table":
        return peak, f"vendor bf16 dense peak of {kind}"
    return peak, f"measured here by flops.measure_matmul_peak: float32 matmuls on {len(devices)} {kind} device(s)"


def sig(x: float, digits: int = 4) -> str:
    """`x` to `digits` significant figures: a slow CPU step's MFU (1e-5 %) must not print as 0.00."""
    return f"{x:.{digits}g}"


def table(headers, rows) -> str:
    """A right-aligned markdown table."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    fmt = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([fmt(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, cells)])


def run_header(name: str, preset: str) -> str:
    d = jax.devices()
    return (f"# {name} benchmark  {datetime.date.today()}  preset {preset}  jax {jax.__version__}  "
            f"{platform.machine()}  {len(d)} x {d[0].platform} ({d[0].device_kind})  load avg {os.getloadavg()[0]:.2f}")


def model_line(cfg: vit.ViTConfig, batch: int) -> str:
    return (f"model {cfg.variant}: width {cfg.width}, depth {cfg.depth}, MLP {cfg.mlp_dim}, heads {cfg.num_heads}, "
            f"{cfg.seq_len} tokens ({cfg.image_size}px / {cfg.patch_size}), head {cfg.head}, {cfg.num_classes} "
            f"classes; batch {batch}; compute {cfg.dtype}, params {cfg.param_dtype}; Adafactor; "
            f"sigmoid xent; remat {cfg.remat}")


# ---------------------------------------------------------------------------------------------------
# The block comparison.

COLUMNS = ["variant", "block", "fused", "bias", "qk_norm", "norm", "params M", "compile s", "step ms",
           "spread %", "ex/s", "model TFLOP/s", "MFU %", "speed vs sequential"]


def run(p: dict, names, devices=None) -> tuple[list[dict], dict]:
    """Times every variant in `names`; returns (rows, context) for `report`."""
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant {unknown[0]!r}; known: {', '.join(VARIANTS)}")
    devices = list(devices or jax.devices()[:1])
    mesh = sharding.make_mesh(devices=devices)
    variant, overrides = p["model"]
    configs = {n: vit.make_config(variant, **{**overrides, **VARIANTS[n]}) for n in names}  # validate all first
    peak, peak_source = peak_per_device(devices)
    results = time_runners(names, lambda n: build_runner(configs[n], mesh, p["batch"], p["warmup"]),
                           p["repeats"], p["steps"], p["interleave"])
    rows = []
    for n in names:
        cfg, compile_s, times = results[n]
        t = statistics.median(times)
        rows.append(dict(variant=n, cfg=cfg, compile_s=compile_s, times=times, ms=1e3 * t, spread=spread(times),
                         params=flops.param_count(cfg), **step_metrics(cfg, p["batch"], t, len(devices), peak)))
    for r in rows:
        r["vs_base"] = (speedup(r["times"], results[BASELINE][2], p["interleave"]) if BASELINE in results
                        else float("nan"))
    return rows, dict(peak=peak, peak_source=peak_source, devices=len(devices))


def _claims(rows, paired: bool) -> list[str]:
    """The measured counterparts of the paper's claims, for the variants that ran."""
    by = {r["variant"]: r for r in rows}
    lines = []

    def speed(a, b, what, paper):
        if a in by and b in by:
            x = speedup(by[a]["times"], by[b]["times"], paired)
            lines.append(f"  {what}: {x:.3f}x training speed ({a} vs {b}); {paper}")
    speed("vit22b", "sequential", "parallel + fused block vs sequential", "paper/PaLM: ~1.15x")
    speed("vit22b", "parallel_unfused", "fused vs unfused parallel block",
          "paper: the parallel form is what lets the projections fuse; no separate figure")
    speed("sequential_fused_qkv", "sequential", "fused QKV in the sequential block", "no paper figure")
    if "vit22b" in by and "bias" in by:  # same model FLOPs: utilization changes as speed does
        a, b = 100 * by["vit22b"]["mfu"], 100 * by["bias"]["mfu"]
        x = speedup(by["vit22b"]["times"], by["bias"]["times"], paired)
        lines.append(f"  dropping biases (vit22b vs bias): MFU {sig(b)}% -> {sig(a)}% (medians); utilization "
                     f"{100 * (x - 1):+.1f}% relative; paper: +3% utilization")
    speed("vit22b", "no_qk_norm", "QK-norm on vs off", "paper: without it the loss diverges at 8B+; cost not given")
    speed("vit22b", "layernorm", "RMSNorm vs LayerNorm", "no paper figure")
    speed("vit22b", "classic", "ViT-22B block vs classic ViT block", "no single paper figure")
    return lines


def report(p: dict, preset: str, rows: list[dict], ctx: dict) -> str:
    cfg = rows[0]["cfg"]
    order = "interleaved round-robin, rotated each round" if p["interleave"] else "one variant at a time"
    lines = [run_header("model", preset),
             model_line(cfg, p["batch"]),
             f"device peak {ctx['peak'] / 1e12:.3f} TFLOP/s per device ({ctx['peak_source']}); "
             f"{ctx['devices']} device(s); model FLOPs/step {rows[0]['flops']:.4g}",
             f"median of {p['repeats']} repeats x {p['steps']} step(s) after 1 compiling + {p['warmup']} warm-up "
             f"step(s), {order}; speed vs sequential = sequential step time / step time (> 1: faster)"
             + (", median over rounds of the ratio within a round" if p["interleave"] else ", of the medians"),
             PAPER, ""]
    body = [[r["variant"], r["cfg"].block, r["cfg"].fused, r["cfg"].use_bias, r["cfg"].qk_norm, r["cfg"].norm,
             f"{r['params'] / 1e6:.2f}", f"{r['compile_s']:.1f}", f"{r['ms']:.2f}", f"{r['spread']:.1f}",
             f"{r['ex_s']:.1f}", sig(r['tflops']), sig(100 * r['mfu']), f"{r['vs_base']:.3f}"]
            for r in rows]
    lines += [table(COLUMNS, body), "", "measured vs paper:", *_claims(rows, p["interleave"])]
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_flags(ap, PRESETS)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    ap.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                    help="time variants round-robin with all states live (default: on, off for --preset gpu)")
    args = ap.parse_args(argv)
    p = resolve(args, PRESETS)
    if args.interleave is not None:
        p["interleave"] = args.interleave
    rows, ctx = run(p, [n for n in args.variants.split(",") if n])
    print(report(p, args.preset, rows, ctx), flush=True)
    return rows


if __name__ == "__main__":
    main()
