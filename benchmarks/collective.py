"""Collective vs XLA matmuls: step time of the fused ViT-22B block, forward + backward, side by
side.

    python -m benchmarks.collective                                   # all local devices
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.collective   # CPU
    python -m benchmarks.collective --widths 2048,4096 --seq 256 --batch 32 --dtype bfloat16

For each width, one `ParallelBlock` (fused, head_dim 64, MLP 4x width) with its parameters sharded
by THE rules table (FSDP on "data", heads on "model") runs value_and_grad over params and input
under `sharding.activate(mesh)`, once with `matmul="xla"` and once with `matmul="collective"`
(trainer/collective.py), compiled from the same parameters. The two are timed in alternating
rounds of `--steps` steps; the best round of each is reported, so both saw the same machine load.
"permutes" counts the collective-permutes in each compiled step, forward and backward: the rings
add 4 x (model - 1) to what XLA's step has (none added = the collective path fell back to XLA's
matmul, e.g. on a model axis of size 1).

Imports only jax/flax/numpy + trainer.models/sharding/collective: runs on an accelerator host as is.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from trainer import markdown, sharding
from trainer.models import vit


def block_step(cfg: vit.ViTConfig, mesh, batch: int, seq: int, seed: int = 0):
    """(jitted fwd+bwd step, its args) for one fused block; params and input sharded as in
    training."""
    block = vit.ParallelBlock(cfg)
    x_sharding = sharding.batch_sharding(mesh)  # x [batch, seq, width]: laid out as a batch
    x = jax.device_put(
        jax.random.normal(jax.random.PRNGKey(seed), (batch, seq, cfg.width), jnp.dtype(cfg.dtype)),
        x_sharding,
    )
    boxed = jax.eval_shape(lambda: block.init(jax.random.PRNGKey(seed), x[:1])["params"])
    param_sh = sharding.param_shardings(boxed, mesh)
    with sharding.activate(mesh):
        params = jax.jit(
            lambda: nn.unbox(block.init(jax.random.PRNGKey(seed), x[:1])["params"]),
            out_shardings=param_sh,
        )()

    def loss(p, x):
        y, _ = block.apply({"params": p}, x)
        return jnp.mean(jnp.square(y.astype(jnp.float32)))

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), in_shardings=(param_sh, x_sharding))

    def run(p, x):
        with sharding.activate(mesh):
            return step(p, x)

    with sharding.activate(mesh):
        hlo = step.lower(params, x).compile().as_text()
    return run, (params, x), len(re.findall(r" collective-permute(?:-start)?\(", hlo))


def time_steps(run, args, steps: int) -> float:
    """Seconds per step over `steps` back-to-back steps (dispatch is async; one sync at the end)."""
    out = run(*args)
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(steps):
        out = run(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps


def measure(width: int, mesh, batch: int, seq: int, steps: int, rounds: int, dtype: str) -> dict:
    cfg = vit.make_config(
        "custom",
        width=width,
        depth=1,
        mlp_dim=4 * width,
        num_heads=width // 64,
        patch_size=16,
        num_classes=0,
        dtype=dtype,
        scan=False,
    )
    variants = {
        m: block_step(dataclasses.replace(cfg, matmul=m), mesh, batch, seq)
        for m in ("xla", "collective")
    }
    best = {m: float("inf") for m in variants}
    for _ in range(rounds):  # alternate, so slow phases of a shared machine hit both
        for m, (run, args, _) in variants.items():
            best[m] = min(best[m], time_steps(run, args, steps))
    return {
        "width": width,
        "heads": cfg.num_heads,
        "xla_ms": best["xla"] * 1e3,
        "collective_ms": best["collective"] * 1e3,
        "ratio": best["collective"] / best["xla"],
        "permutes": f"{variants['xla'][2]} / {variants['collective'][2]}",
    }


COLUMNS = [
    "width",
    "heads",
    "xla ms/step",
    "collective ms/step",
    "collective/xla",
    "permutes xla / coll",
]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--widths", default="256,512,1024", help="comma-separated; head_dim 64, so width/64 heads"
    )
    parser.add_argument(
        "--mesh", default="", help="DATA,MODEL (default: model = min(4, devices), data = the rest)"
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64, help="tokens per example")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args(argv)

    n = jax.device_count()
    data, model = (int(s) for s in args.mesh.split(",")) if args.mesh else (-1, min(4, n))
    mesh = sharding.make_mesh(data=data, model=model)
    load = f"  load avg {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    print(
        f"# collective matmul benchmark  {datetime.date.today()}  jax {jax.__version__}  "
        f"{platform.machine()}  {n} x {jax.devices()[0].device_kind}{load}"
    )
    print(
        f"fused ViT-22B block fwd+bwd, batch {args.batch} x {args.seq} tokens, {args.dtype}, mesh "
        f"data={mesh.shape['data']} x model={mesh.shape['model']}; "
        f"best of {args.rounds} rounds of {args.steps} steps"
    )
    widths = [len(h) for h in COLUMNS]  # rows print as measured: columns as wide as the header
    print(markdown.header(COLUMNS, widths))
    for width in (int(w) for w in args.widths.split(",")):
        r = measure(width, mesh, args.batch, args.seq, args.steps, args.rounds, args.dtype)
        cells = [
            r["width"],
            r["heads"],
            f"{r['xla_ms']:.2f}",
            f"{r['collective_ms']:.2f}",
            f"{r['ratio']:.2f}",
            r["permutes"],
        ]
        print(markdown.row(cells, widths), flush=True)


if __name__ == "__main__":
    main()
