"""MFU benchmark: achieved vs peak FLOP/s, for a matmul and for the full sharded train step.

    # CPU: mu/4, 8 devices
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.mfu
    # ViT-22B layers, bf16
    python -m benchmarks.mfu --preset gpu
    python -m benchmarks.mfu --variant B/16 --image_size 224 --batch 32 --mesh 4,2 \
        --override dtype=bfloat16

(a) matmul: `trainer.flops.measure_matmul_peak` (square matmuls on all devices at once, best of
    `--repeats`) per size, against the vendor bf16 dense peak where `trainer/flops.py` has one.
(b) train step: `trainer/step.py`'s sharded train step (forward + backward + Adafactor update) of
    `--variant` on a `trainer.sharding.make_mesh` mesh over all local devices (`--mesh DATA,MODEL`),
    synthetic batch; model FLOPs/step = flops.model_flops_per_example x batch (PaLM's formula, no
    rematerialization counted); MFU = model FLOPs/step / median step time / (devices x peak per
    device), where the peak is what the pretrain stage uses: the vendor table on accelerators, the
    matmul measured in this run on CPU. The paper's 54.9% (ViT-22B on TPU v4) is printed for
    reference.
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp

from benchmarks import harness
from benchmarks import model as model_bench
from trainer import flops, markdown, sharding
from trainer.models import vit

PRESETS: dict[str, dict] = {
    "smoke": dict(
        model=("mu/8", dict(depth=1, image_size=16, num_classes=10, head="gap")),
        batch=8,
        repeats=1,
        warmup=0,
        steps=1,
        mesh="-1,1",
        matmul_sizes=(64,),
        matmul_dtype="float32",
    ),
    "cpu": dict(
        model=("mu/4", dict(image_size=32, num_classes=1000)),
        batch=64,
        repeats=10,
        warmup=2,
        steps=1,
        mesh="-1,1",
        matmul_sizes=(256, 512, 1024),
        matmul_dtype="float32",
    ),
    # The model preset of benchmarks/model.py --preset gpu: ViT-22B's layer x 4, bf16 compute,
    # batch 32.
    "gpu": dict(
        model=model_bench.PRESETS["gpu"]["model"],
        batch=model_bench.PRESETS["gpu"]["batch"],
        repeats=10,
        warmup=2,
        steps=2,
        mesh="-1,1",
        matmul_sizes=(4096, 8192, 16384),
        matmul_dtype="bfloat16",
    ),
}

PAPER = (
    "paper: ViT-22B 54.9% MFU on TPU v4 (PaLM 46.2%, ViT-e 44.0%, same hardware); "
    "at 22B scale on a pod, not comparable to a small model on one host"
)

MATMUL_COLUMNS = [
    "dtype",
    "size",
    "devices",
    "measured TFLOP/s/device",
    "table peak TFLOP/s",
    "measured / table",
]
STEP_COLUMNS = [
    "model",
    "mesh (data x model)",
    "batch",
    "tokens",
    "params M",
    "model GFLOP/step",
    "compile s",
    "step ms",
    "spread %",
    "ex/s",
    "achieved TFLOP/s",
    "per device TFLOP/s",
    "peak TFLOP/s/device",
    "MFU %",
    "paper MFU %",
]


def matmul_rows(devices, sizes, dtype: str, repeats: int) -> list[list]:
    table_peak = flops.device_peak_flops(devices[0])
    rows = []
    for size in sizes:
        measured = flops.measure_matmul_peak(
            devices, size=size, dtype=jnp.dtype(dtype), repeats=repeats
        )
        rows.append(
            [
                dtype,
                size,
                len(devices),
                harness.sig(measured / 1e12),
                f"{table_peak / 1e12:.1f}" if table_peak else "n/a (CPU: none)",
                f"{measured / table_peak:.3f}" if table_peak else "n/a",
            ]
        )
    return rows


def parse_mesh(text: str) -> tuple[int, int]:
    try:
        data, model = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--mesh {text!r} must look like DATA,MODEL, e.g. -1,1 or 4,2") from None
    return data, model


def run(p: dict) -> str:
    devices = jax.devices()
    mesh = sharding.make_mesh(*parse_mesh(p["mesh"]), devices=devices)
    variant, overrides = p["model"]
    cfg = vit.make_config(variant, **overrides)
    peak, peak_source = harness.peak_per_device(devices)
    lines = [
        harness.run_header("mfu", p["preset"]),
        "",
        f"(a) matmul: trainer.flops.measure_matmul_peak, all {len(devices)} devices at once, "
        f"best of {p['repeats']}; table = vendor bf16 dense peak (trainer/flops.py)",
        markdown.table(
            MATMUL_COLUMNS, matmul_rows(devices, p["matmul_sizes"], p["matmul_dtype"], p["repeats"])
        ),
        "",
        "(b) sharded train step (trainer/step.py make_train_step): "
        + harness.model_line(cfg, p["batch"]),
        f"peak per device: {peak / 1e12:.4f} TFLOP/s ({peak_source}); "
        f"median of {p['repeats']} repeats x {p['steps']} step(s) after 1 compiling + "
        f"{p['warmup']} warm-up step(s)",
    ]
    runner = harness.build_runner(cfg, mesh, p["batch"], p["warmup"])
    times = [runner.run(p["steps"]) for _ in range(p["repeats"])]
    t = statistics.median(times)
    m = harness.step_metrics(cfg, p["batch"], t, mesh.devices.size, peak)
    row = [
        cfg.variant,
        " x ".join(str(mesh.shape[a]) for a in ("data", "model")),
        p["batch"],
        cfg.seq_len,
        f"{flops.param_count(cfg) / 1e6:.2f}",
        harness.sig(m["flops"] / 1e9),
        f"{runner.compile_s:.1f}",
        f"{1e3 * t:.2f}",
        f"{harness.spread(times):.1f}",
        f"{m['ex_s']:.1f}",
        harness.sig(m['tflops']),
        harness.sig(m['tflops'] / mesh.devices.size),
        harness.sig(peak / 1e12),
        harness.sig(100 * m['mfu']),
        "54.9",
    ]
    lines += [markdown.table(STEP_COLUMNS, [row]), PAPER]
    return "\n".join(lines)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_common_flags(ap, PRESETS)
    ap.add_argument(
        "--variant",
        help="ViT variant NAME/PATCH, e.g. mu/4, B/16, 22B/14; replaces the preset's "
        "model and its overrides (add e.g. --override dtype=bfloat16)",
    )
    ap.add_argument("--image_size", type=int)
    ap.add_argument("--mesh", help="DATA,MODEL mesh sizes over all local devices; -1 = the rest")
    ap.add_argument("--matmul_sizes", help="comma-separated square matmul sizes for (a)")
    ap.add_argument("--matmul_dtype", choices=("float32", "bfloat16"))
    args = ap.parse_args(argv)
    p = harness.resolve(args, PRESETS)
    p["preset"] = args.preset
    if args.variant:  # replaces the preset's model and its overrides; --override still applies
        p["model"] = (args.variant, harness.parse_overrides(args.override))
    if args.image_size:
        p["model"] = (p["model"][0], {**p["model"][1], "image_size": args.image_size})
    if args.mesh:
        p["mesh"] = args.mesh
    if args.matmul_sizes:
        p["matmul_sizes"] = tuple(int(s) for s in args.matmul_sizes.split(","))
    if args.matmul_dtype:
        p["matmul_dtype"] = args.matmul_dtype
    out = run(p)
    print(out, flush=True)
    return out


if __name__ == "__main__":
    main()
