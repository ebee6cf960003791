"""Model benchmark: train-step time of the ViT-22B block and its ablations, side by side in one run.

    python -m benchmarks.model                # --preset cpu: width 384, depth 4; < 3 min on 2 cores
    python -m benchmarks.model --preset gpu   # one H200: ViT-22B width 6144 x 4 layers, bf16
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
import statistics

import jax

from benchmarks import harness
from trainer import flops, markdown, sharding
from trainer.models import vit

# Each variant's overrides on top of the preset's model (a "22B/..." variant: the ViT-22B block).
VARIANTS: dict[str, dict] = {
    "vit22b": {},  # parallel + fused, no QKV/norm biases, QK-norm, RMSNorm
    "parallel_unfused": dict(fused=False),
    "sequential": dict(block="sequential", fused=False),  # the baseline: classic block order
    "sequential_fused_qkv": dict(block="sequential", fused=True),
    "bias": dict(use_bias=True),
    "no_qk_norm": dict(qk_norm=False),
    "layernorm": dict(norm="layernorm"),
    "classic": dict(
        block="sequential", fused=False, use_bias=True, qk_norm=False, norm="layernorm"
    ),
}
BASELINE = "sequential"

# model: the variant string and overrides every variant shares. batch: global batch per step.
PRESETS: dict[str, dict] = {
    "smoke": dict(
        model=(
            "22B/8",
            dict(
                width=32,
                depth=1,
                mlp_dim=128,
                num_heads=2,
                image_size=16,
                num_classes=10,
                head="gap",
            ),
        ),
        batch=2,
        repeats=1,
        warmup=0,
        steps=1,
        interleave=True,
    ),
    "cpu": dict(
        model=("22B/16", dict(width=384, depth=4, mlp_dim=1536, num_heads=6, image_size=160)),
        batch=8,
        repeats=15,
        warmup=1,
        steps=1,
        interleave=True,
    ),
    # ViT-22B's layer (width 6144, 48 heads, MLP 24576) x 4 on 256 tokens, bf16 compute, f32 params:
    # 2.28B parameters, 94 model TFLOP/step. XLA:CPU's buffer assignment for this fwd+bwd at
    # batch 32 needs 40 GiB of temporaries (+ 8.5 GiB params, 8.5 grads, ~5 Adafactor), under the
    # 75% of 141 GB that JAX preallocates on a GPU; batch 64 would need ~72 GiB of temporaries.
    "gpu": dict(
        model=("22B/14", dict(depth=4, image_size=224, dtype="bfloat16")),
        batch=32,
        repeats=10,
        warmup=2,
        steps=2,
        interleave=False,
    ),
}

PAPER = (
    "paper (ViT-22B §2, on TPU v4 at 22B scale): parallel layers ~15% faster training (PaLM), "
    "i.e. vit22b vs sequential ~1.15x; dropping QKV/LayerNorm biases +3% utilization "
    "(bias -> vit22b)"
)

COLUMNS = [
    "variant",
    "block",
    "fused",
    "bias",
    "qk_norm",
    "norm",
    "params M",
    "compile s",
    "step ms",
    "spread %",
    "ex/s",
    "model TFLOP/s",
    "MFU %",
    "speed vs sequential",
]


def run(p: dict, names, devices=None) -> tuple[list[dict], dict]:
    """Times every variant in `names`; returns (rows, context) for `report`."""
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant {unknown[0]!r}; known: {', '.join(VARIANTS)}")
    devices = list(devices or jax.devices()[:1])
    mesh = sharding.make_mesh(devices=devices)
    variant, overrides = p["model"]
    configs = {
        n: vit.make_config(variant, **{**overrides, **VARIANTS[n]}) for n in names
    }  # validate all first
    peak, peak_source = harness.peak_per_device(devices)
    build = lambda n: harness.build_runner(configs[n], mesh, p["batch"], p["warmup"])
    results = harness.time_runners(names, build, p["repeats"], p["steps"], p["interleave"])
    rows = []
    for n in names:
        cfg, compile_s, times = results[n]
        t = statistics.median(times)
        metrics = harness.step_metrics(cfg, p["batch"], t, len(devices), peak)
        rows.append(
            dict(
                variant=n,
                cfg=cfg,
                compile_s=compile_s,
                times=times,
                ms=1e3 * t,
                spread=harness.spread(times),
                params=flops.param_count(cfg),
                **metrics,
            )
        )
    for r in rows:
        r["vs_base"] = (
            harness.speedup(r["times"], results[BASELINE][2], p["interleave"])
            if BASELINE in results
            else float("nan")
        )
    return rows, dict(peak=peak, peak_source=peak_source, devices=len(devices))


def cells(r: dict) -> list:
    """A `run` row as the table's cells, in COLUMNS order."""
    cfg = r["cfg"]
    return [
        r["variant"],
        cfg.block,
        cfg.fused,
        cfg.use_bias,
        cfg.qk_norm,
        cfg.norm,
        f"{r['params'] / 1e6:.2f}",
        f"{r['compile_s']:.1f}",
        f"{r['ms']:.2f}",
        f"{r['spread']:.1f}",
        f"{r['ex_s']:.1f}",
        harness.sig(r["tflops"]),
        harness.sig(100 * r["mfu"]),
        f"{r['vs_base']:.3f}",
    ]


def claims(rows, paired: bool) -> list[str]:
    """The measured counterparts of the paper's claims, for the variants that ran."""
    by = {r["variant"]: r for r in rows}
    lines = []

    def speed(a, b, what, paper):
        if a in by and b in by:
            x = harness.speedup(by[a]["times"], by[b]["times"], paired)
            lines.append(f"  {what}: {x:.3f}x training speed ({a} vs {b}); {paper}")

    speed("vit22b", "sequential", "parallel + fused block vs sequential", "paper/PaLM: ~1.15x")
    speed(
        "vit22b",
        "parallel_unfused",
        "fused vs unfused parallel block",
        "paper: the parallel form is what lets the projections fuse; no separate figure",
    )
    speed(
        "sequential_fused_qkv", "sequential", "fused QKV in the sequential block", "no paper figure"
    )
    if "vit22b" in by and "bias" in by:  # same model FLOPs: utilization changes as speed does
        a, b = 100 * by["vit22b"]["mfu"], 100 * by["bias"]["mfu"]
        x = harness.speedup(by["vit22b"]["times"], by["bias"]["times"], paired)
        lines.append(
            f"  dropping biases (vit22b vs bias): MFU {harness.sig(b)}% -> "
            f"{harness.sig(a)}% (medians); utilization {100 * (x - 1):+.1f}% relative; "
            "paper: +3% utilization"
        )
    speed(
        "vit22b",
        "no_qk_norm",
        "QK-norm on vs off",
        "paper: without it the loss diverges at 8B+; cost not given",
    )
    speed("vit22b", "layernorm", "RMSNorm vs LayerNorm", "no paper figure")
    speed("vit22b", "classic", "ViT-22B block vs classic ViT block", "no single paper figure")
    return lines


def report(p: dict, preset: str, rows: list[dict], ctx: dict) -> str:
    cfg = rows[0]["cfg"]
    order = (
        "interleaved round-robin, rotated each round"
        if p["interleave"]
        else "one variant at a time"
    )
    lines = [
        harness.run_header("model", preset),
        harness.model_line(cfg, p["batch"]),
        f"device peak {ctx['peak'] / 1e12:.3f} TFLOP/s per device ({ctx['peak_source']}); "
        f"{ctx['devices']} device(s); model FLOPs/step {rows[0]['flops']:.4g}",
        f"median of {p['repeats']} repeats x {p['steps']} step(s) after 1 compiling + "
        f"{p['warmup']} warm-up step(s), {order}; "
        "speed vs sequential = sequential step time / step time (> 1: faster)"
        + (
            ", median over rounds of the ratio within a round"
            if p["interleave"]
            else ", of the medians"
        ),
        PAPER,
        "",
    ]
    lines += [
        markdown.table(COLUMNS, [cells(r) for r in rows]),
        "",
        "measured vs paper:",
        *claims(rows, p["interleave"]),
    ]
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_common_flags(ap, PRESETS)
    ap.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated subset of {', '.join(VARIANTS)}",
    )
    ap.add_argument(
        "--interleave",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time variants round-robin with all states live (default: on, off for --preset gpu)",
    )
    args = ap.parse_args(argv)
    p = harness.resolve(args, PRESETS)
    if args.interleave is not None:
        p["interleave"] = args.interleave
    rows, ctx = run(p, [n for n in args.variants.split(",") if n])
    print(report(p, args.preset, rows, ctx), flush=True)
    return rows


if __name__ == "__main__":
    main()
