"""Compile before paying: the real ViT-22B train step compiled for TPU pod slices on this CPU host.

    python -m benchmarks.aot    # v4:8x8x16 and v5p:8x8x16, xla / collective / xla+flags
    python -m benchmarks.aot --topologies v4:2x2x1 --depth 2 --batch 16 --mesh_model 4
    python -m benchmarks.aot --variants xla,collective --microbatches 8 --remat dots_no_batch

For each topology and variant, the pretrain step of `launch/configs/vit22b.py` (scanned layers,
its remat policy, Adafactor state, its mesh; trainer/step.py over the stage's own Task) is lowered
on abstract state and batch and compiled by libtpu for the slice's abstract devices
(trainer/aot.py, which launch/preflight.py's memory row also uses). Printed per variant:

  memory   per-device arguments / outputs / temps (XLA's memory analysis) and their live total
           vs the chip's HBM less --headroom: fits or not. A program that cannot fit fails to
           compile with RESOURCE_EXHAUSTED; its row shows the bytes libtpu asked for.
  FLOPs    model FLOPs per device and step (trainer/flops.py, PaLM's formula, no remat) vs
           XLA's cost analysis (which counts the recomputation)
  compile  lower and compile seconds on this host
  overlap  async collective-permute start/done pairs in the optimized HLO, and how many have a
           dot scheduled between start and done (trainer/aot.py permute_overlap)

Variants: `xla` (XLA's sharded matmuls), `collective` (trainer/collective.py's rings),
`xla+<set>` (XLA's matmuls compiled with a flag set of trainer/xla_flags.py, e.g.
xla+collective_matmul, passed per compile so every variant runs in one process).

Without libtpu (`pip install -c constraints.txt -e '.[tpu]'`) it says so and prints the
jax.eval_shape estimate (params + optimizer state + batch per device, no activations). Module
imports: jax/numpy and trainer/markdown.py (standard library) only; the config (ml_collections)
and the other trainer modules load inside main().
"""

from __future__ import annotations

import argparse
import ast
import datetime
import os
import platform
import re
import time

import jax
import numpy as np

from trainer import markdown

GIB = 2**30
DEFAULT_TOPOLOGIES = "v4:8x8x16,v5p:8x8x16"
DEFAULT_VARIANTS = "xla,collective,xla+collective_matmul"


def parse_variant(spec: str) -> tuple[str, str]:
    """'xla' -> ('xla', 'default'); 'xla+collective_matmul' -> ('xla', 'collective_matmul')."""
    from trainer import xla_flags

    matmul, _, flags = spec.partition("+")
    if matmul not in ("xla", "collective"):
        raise ValueError(f"--variants: {spec!r}: the matmul must be xla or collective")
    flags = flags or "default"
    xla_flags.get("tpu", flags)  # one-line error naming the sets
    return matmul, flags


def pretrain_group(config_path: str, overrides: dict):
    """The config's pretrain group with `overrides` (dotted keys) applied."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("aot_config", config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    group = module.get_config("pretrain").pretrain
    with group.unlocked():
        for key, value in overrides.items():
            if value is None:
                continue
            *path, leaf = key.split(".")
            node = group
            for p in path:
                node = node[p]
            node[leaf] = value
    return group


def _oom_bytes(message: str) -> str:
    """libtpu's 'Used 33.7G of 15.25G hbm' from a RESOURCE_EXHAUSTED compile error."""
    m = re.search(r"Used ([\d.]+[KMGT]?) of ([\d.]+[KMGT]?) hbm", message)
    return f"needs {m.group(1)}B of {m.group(2)}B" if m else " ".join(message.split())[:160]


def compile_row(
    group, topology: str, matmul: str, flags: str, num_classes: int, headroom: float
) -> dict:
    """One compiled variant: memory, FLOPs, compile time and permute overlap (or why it failed)."""
    from trainer import aot, flops, pretrain, sharding, stage_config, xla_flags

    version, _, shape = topology.partition(":")
    with group.unlocked():
        group.model.matmul = matmul
    # "cpu": this machine's devices (e.g. 8 simulated with --xla_force_host_platform_device_count).
    devices = jax.devices() if topology == "cpu" else aot.tpu_devices(version, shape)
    mesh = sharding.make_mesh(
        group.mesh.data, group.mesh.model, group.mesh.replica, devices=devices
    )
    task = pretrain.make_task(group, num_classes)
    mcfg = stage_config.model_config(group, num_classes)
    row = {
        "variant": matmul + ("" if flags == "default" else f"+{flags}"),
        "devices": len(devices),
        "mesh": "x".join(str(s) for s in mesh.devices.shape),
        "depth": mcfg.depth,
        "hbm": aot.TPU_HBM_GIB[version] * GIB if topology != "cpu" else float("inf"),
        "model_flops": flops.model_flops_per_example(mcfg) * group.batch_size / len(devices),
    }
    row["usable"] = row["hbm"] * (1 - headroom)
    options = xla_flags.compiler_options("tpu", flags) or None
    start = time.perf_counter()
    try:
        result = aot.compile_train_step(
            task,
            group.optim,
            group.steps,
            mesh,
            group.seed,
            group.batch_size,
            group.data.image_size,
            num_classes,
            microbatches=group.microbatches,
            compiler_options=options,
        )
    except Exception as e:  # libtpu's verdict: out of HBM, or an unsupported program
        text = f"{type(e).__name__}: {e}"
        row.update(
            error=("OOM: " + _oom_bytes(text))
            if "RESOURCE_EXHAUSTED" in text
            else " ".join(text.split())[:200],
            compile_s=time.perf_counter() - start,
        )
        return row
    stats = result.stats
    row.update(
        args=stats.argument_size_in_bytes,
        out=stats.output_size_in_bytes,
        alias=stats.alias_size_in_bytes,
        temp=stats.temp_size_in_bytes,
        total=result.memory,
        peak=getattr(stats, "peak_memory_in_bytes", 0) or 0,
        lower_s=result.lower_s,
        compile_s=result.compile_s,
    )
    row["xla_flops"], _ = aot.cost(result.compiled)
    hlo = result.compiled.as_text()
    row["overlap"] = aot.permute_overlap(hlo)
    # XLA's cost analysis counts a while loop's body once: with scanned layers / microbatches its
    # FLOPs are one iteration's, not comparable with the model's per-step FLOPs.
    row["loops"] = bool(re.search(r"\bwhile\(", hlo))
    return row


COLUMNS = [
    "variant",
    "args GiB",
    "temps GiB",
    "live GiB",
    "peak GiB",
    "fits",
    "model TFLOP/dev",
    "XLA TFLOP/dev",
    "XLA/model",
    "lower s",
    "compile s",
    "permutes overlapped",
]


def format_rows(topology: str, group, rows: list[dict]) -> str:
    head = (
        f"{topology}: {rows[0]['devices']} devices, mesh data x model = {rows[0]['mesh']}, batch "
        f"{group.batch_size} ({group.microbatches} microbatch{'es' * (group.microbatches > 1)}), "
        f"depth {rows[0]['depth']}, remat {group.model.remat}, HBM {rows[0]['hbm'] / GIB:.0f} GiB "
        f"(usable {rows[0]['usable'] / GIB:.1f} GiB)"
    )
    body = []
    for r in rows:
        model_tflops = f"{r['model_flops'] / 1e12:.1f}"
        if "error" in r:
            body.append(
                [
                    r["variant"],
                    "",
                    "",
                    "",
                    "",
                    f"**no** ({r['error']})",
                    model_tflops,
                    "",
                    "",
                    "",
                    f"{r['compile_s']:.0f}",
                    "",
                ]
            )
            continue
        fits = "yes" if r["total"] <= r["usable"] else "**no**"
        ratio = "loop" if r["loops"] else f"{r['xla_flops'] / r['model_flops']:.2f}"
        body.append(
            [
                r["variant"],
                f"{r['args'] / GIB:.3g}",
                f"{r['temp'] / GIB:.3g}",
                f"{r['total'] / GIB:.3g}",
                f"{r['peak'] / GIB:.3g}",
                fits,
                model_tflops,
                f"{r['xla_flops'] / 1e12:.1f}",
                ratio,
                f"{r['lower_s']:.0f}",
                f"{r['compile_s']:.0f}",
                r["overlap"],
            ]
        )
    return head + "\n" + markdown.table(COLUMNS, body, align=False)


def estimate_rows(group, topology: str, num_classes: int, headroom: float) -> str:
    """No libtpu: the eval_shape bytes of params + optimizer state + batch on the config's mesh."""
    from trainer import aot, pretrain, sharding

    version, _, shape = topology.partition(":")
    chips = int(np.prod([int(s) for s in shape.split("x")]))
    r, d, m = sharding.mesh_shape(chips, group.mesh.data, group.mesh.model, group.mesh.replica)
    task = pretrain.make_task(group, num_classes)
    est = aot.estimate_bytes(
        task,
        group.optim,
        group.steps,
        d,
        m,
        r,
        group.seed,
        group.batch_size,
        group.data.image_size,
        num_classes,
    )
    usable = aot.TPU_HBM_GIB[version] * GIB * (1 - headroom)
    return (
        f"{topology}: {chips} chips, mesh data x model = {d}x{m}: eval_shape estimate "
        f"{est / GIB:.2f} GiB per device (params + Adafactor state + batch; activations and temps "
        f"NOT counted) vs {usable / GIB:.1f} GiB usable"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="launch/configs/vit22b.py")
    parser.add_argument(
        "--topologies",
        default=DEFAULT_TOPOLOGIES,
        help="comma-separated TYPE:TOPOLOGY, or cpu (this machine's devices)",
    )
    parser.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help="xla | collective | xla+<trainer/xla_flags set>",
    )
    parser.add_argument(
        "--depth", type=int, default=None, help="override model.depth (default: the config's)"
    )
    parser.add_argument(
        "--model_variant",
        default=None,
        help="override model.variant (e.g. B/16 for --topologies cpu)",
    )
    parser.add_argument("--image_size", type=int, default=None, help="override data.image_size")
    parser.add_argument("--batch", type=int, default=None, help="override the global batch size")
    parser.add_argument(
        "--microbatches", type=int, default=None, help="override gradient accumulation"
    )
    parser.add_argument("--remat", default=None, help="override model.remat")
    parser.add_argument("--mesh_model", type=int, default=None, help="override mesh.model")
    parser.add_argument(
        "--unrolled",
        action="store_true",
        help=(
            "model.scan=False: XLA's cost analysis then counts every layer "
            "(it counts a loop body once)"
        ),
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any pretrain-group key, e.g. model.width=512 (repeatable)",
    )
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--headroom", type=float, default=0.1, help="fraction of HBM kept free")
    args = parser.parse_args(argv)

    from trainer import aot

    variants = [parse_variant(v.strip()) for v in args.variants.split(",") if v.strip()]
    overrides = {
        "model.variant": args.model_variant,
        "data.image_size": args.image_size,
        "model.depth": args.depth,
        "batch_size": args.batch,
        "microbatches": args.microbatches,
        "model.remat": args.remat,
        "mesh.model": args.mesh_model,
        "model.scan": False if args.unrolled else None,
    }
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = (
            ast.literal_eval(value) if value[:1].isdigit() or value[:1] in "-[(" else value
        )
    group = pretrain_group(args.config, overrides)
    print(
        f"# AOT compile of {args.config} pretrain ({group.model.variant}), "
        f"{datetime.date.today()}, {platform.machine()} {os.cpu_count()} cores, "
        f"jax {jax.__version__}, load avg {os.getloadavg()[0]:.1f}"
    )
    topologies = [t.strip() for t in args.topologies.split(",") if t.strip()]
    if not aot.libtpu_installed() and topologies != ["cpu"]:
        print(aot.LIBTPU_MISSING + "; the jax.eval_shape estimate instead:")
        for topology in topologies:
            print(estimate_rows(group, topology, args.num_classes, args.headroom))
        return
    for topology in topologies:
        rows = [
            compile_row(group, topology, matmul, flags, args.num_classes, args.headroom)
            for matmul, flags in variants
        ]
        print(format_rows(topology, group, rows), flush=True)
    print(
        "XLA/model: XLA's cost-analysis FLOPs over the model's (remat recomputation included); "
        "'loop': the program has while loops (scanned layers / microbatches), whose bodies XLA's "
        "cost analysis counts once"
    )


if __name__ == "__main__":
    main()
