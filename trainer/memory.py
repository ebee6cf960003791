"""Per-device bytes of parameters + optimizer state for any model on any mesh, nothing allocated.

    python -m trainer.memory --variant 22B/14 --mesh 16,16 \\
        [--optimizer adamw] [--param_dtype bfloat16]

Apart from trainer/sharding.py so that the rules table imports neither the model nor the optimizer.
"""

from __future__ import annotations

import argparse
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from trainer import optim
from trainer.models import vit
from trainer.sharding import abstract_mesh, param_shardings, per_device_bytes, tree_shardings


def memory_report(
    variant: str, data: int, model: int, replica: int = 1, optimizer: str = "adafactor", **overrides
) -> dict[str, int]:
    """Per-device bytes of params and optimizer state for a model on a mesh, nothing allocated."""
    cfg = vit.make_config(variant, **overrides)
    mesh = abstract_mesh(data, model, replica)
    boxed = vit.abstract_params(cfg)
    params = nn.unbox(boxed)
    opt_cfg = optim.default_config()
    opt_cfg.optimizer = optimizer
    tx, _ = optim.make_optimizer(opt_cfg, params, total_steps=1000)
    opt_state = jax.eval_shape(tx.init, params)
    param_sh = param_shardings(boxed, mesh)
    return {
        "params": per_device_bytes(params, param_sh),
        "opt_state": per_device_bytes(opt_state, tree_shardings(opt_state, params, param_sh, mesh)),
        "params_total": sum(
            math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
            for x in jax.tree_util.tree_leaves(params)
        ),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description="Per-device memory of params + optimizer state.")
    parser.add_argument("--variant", default="22B/14")
    parser.add_argument("--mesh", default="16,16", help="DATA,MODEL[,REPLICA] sizes")
    parser.add_argument("--optimizer", default="adafactor", choices=("adafactor", "adamw"))
    parser.add_argument("--param_dtype", default="float32")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.mesh.split(",")]
    report = memory_report(
        args.variant, *sizes, optimizer=args.optimizer, param_dtype=args.param_dtype
    )
    gib = 2**30
    print(
        f"{args.variant} on mesh data x model = {args.mesh} "
        f"({args.optimizer}, params {args.param_dtype}):"
    )
    print(
        f"  params     {report['params'] / gib:9.3f} GiB / device  "
        f"(total {report['params_total'] / gib:.1f} GiB)"
    )
    print(f"  opt state  {report['opt_state'] / gib:9.3f} GiB / device")
    print(f"  sum        {(report['params'] + report['opt_state']) / gib:9.3f} GiB / device")


if __name__ == "__main__":
    main()
