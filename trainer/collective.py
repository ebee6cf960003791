"""Collective matmuls with shard_map: the ViT-22B paper's "asynchronous parallel linear operations".

The ViT-22B block does two matmuls, and both have an operand sharded on the "model" mesh axis along
a dimension XLA would otherwise gather or reduce in one blocking collective:

- IN projection  `y[b,t,H,F] = x[b,t,D] @ W[D,H,F]`: x arrives with D on "model" (act_embed), W with
  H on "model" (heads). XLA's default all-gathers x over "model" and then multiplies.
  `all_gather_matmul` instead walks a ring of n = |model| steps: multiply the x chunk at hand with
  the matching rows of the local W, while `ppermute` passes that chunk to the neighbour.
- OUT projection `y[b,t,D] = z[b,t,H,F] @ W[H,F,D]`: contracts over H (on "model") and leaves D on
  "model" (act_embed). XLA's default multiplies then reduce-scatters. `matmul_reduce_scatter`
  instead computes one output chunk's partial product per step and ppermutes the running sum, which
  arrives complete, and already reduce-scattered, at the chunk's owner after n steps.

Each step's ppermute depends only on the previous step, never on that step's matmul, so XLA can
issue it asynchronously and hide it behind the dot. The backward passes are the transposed rings
(jax.grad through ppermute), so they overlap the same way.

Memory under remat: a ring's n partial products are n dots, and a dots policy
(`checkpoint_dots_with_no_batch_dims`) would save every one of them, f32 and output-sized: n times
what XLA's one matmul saves (measured 10-20x XLA's temp bytes for the 22B step on TPU v4). So each
ring runs under `jax.checkpoint(nothing_saveable)`: its backward recomputes only the permuted
operand chunks (a dot's gradient needs its operands, never its product, so the recomputed dots are
dead code), and the ring's output is tagged `SAVE_NAME`, which trainer/models/vit.py's dots
policies also save: the same one output a policy keeps of XLA's matmul. Both rings add their
partial products in the output dtype (bf16 on accelerators), as XLA's reduce-scatter adds the
shards' partial sums: a float32 accumulator of the output's shape was the rest of the ring's extra
memory (measured with libtpu, 22B shapes on v4:2x2x1: all-gather-matmul fwd+bwd temps 169 MiB with a
float32 accumulator, 97 MiB with bf16, 132 MiB for XLA's all-gather + dot). With FSDP the weights
also have their embed dim on "data"; it is all-gathered (`jax.lax.all_gather`) inside the shard_map
first, and its transpose is the usual gradient reduce-scatter.

Which mesh axis is which comes from THE rules table (`trainer.sharding.logical_rules`). The mesh
comes from the argument or from context (`sharding.activate(mesh)` / `jax.set_mesh`); without a
mesh, with a ring axis of size 1, or with a batch the data axes do not divide (model.init's batch of
1), both functions are the plain matmul XLA would do. Parameters are the model's either way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from trainer import sharding

SAVE_NAME = "collective_matmul"  # checkpoint_name of every ring's output (see the module docstring)


def context_mesh():
    """The mesh of the enclosing `jax.set_mesh` / `sharding.activate`, or None outside one."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def _plan(mesh, batch_size: int, width: int, heads: int):
    """(mesh, batch axes, ring axis, FSDP axis) for a collective matmul, or None for XLA's matmul.

    The axes come from THE rules table: the ring runs over the mesh axis of both `act_embed` and
    `heads`, the batch over `act_batch`'s, the FSDP gather over `embed`'s. XLA's matmul is used
    without a mesh, with a ring of size 1 (nothing to overlap), or when the batch does not divide
    the batch axes (model.init's batch of 1: a replicated batch would make the output replicated).
    """
    mesh = mesh if mesh is not None else context_mesh()
    if mesh is None:
        return None
    rules = dict(sharding.logical_rules(mesh.axis_names))
    ring = rules["act_embed"]
    if (
        ring is None
        or ring != rules["heads"]
        or ring not in mesh.axis_names
        or mesh.shape[ring] == 1
    ):
        return None
    if sharding.fit_dim(rules["act_batch"], batch_size, mesh) is None:
        return None
    for what, dim in (("width", width), ("heads", heads)):
        if dim % mesh.shape[ring]:
            raise ValueError(
                f"collective matmul: {what}={dim} is not divisible by the {ring!r} mesh axis "
                f"(size {mesh.shape[ring]}); use matmul='xla' or another mesh"
            )
    return mesh, rules["act_batch"], ring, sharding.fit_dim(rules["embed"], width, mesh)


def _dot(x: jax.Array, w: jax.Array, n_in: int) -> jax.Array:
    """x[..., *in] @ w[*in, *out], accumulated in float32 (what XLA's dot does for bf16 too)."""
    lhs = tuple(range(x.ndim - n_in, x.ndim))
    return jax.lax.dot_general(
        x, w, ((lhs, tuple(range(n_in))), ((), ())), preferred_element_type=jnp.float32
    )


def _saving_only_output(ring_fn):
    """The ring with nothing inside saved for the backward pass, its output named `SAVE_NAME`."""
    inner = jax.checkpoint(ring_fn, policy=jax.checkpoint_policies.nothing_saveable)
    return lambda *args: checkpoint_name(inner(*args), SAVE_NAME)


def _ring(mesh, ring: str) -> tuple[int, list[tuple[int, int]]]:
    """Ring size and the send-to-next permutation (`jax.lax.ppermute`'s (source, destination)
    pairs)."""
    n = mesh.shape[ring]
    return n, [(j, (j + 1) % n) for j in range(n)]


def all_gather_matmul(x: jax.Array, w: jax.Array, mesh=None) -> jax.Array:
    """`x[B, ..., D] @ w[D, H, *out] -> [B, ..., H, *out]` with x's D and w's H on the ring axis.

    Equals `jnp.tensordot(x, w, 1)`; the result comes out with H on the ring axis (act_heads) and B
    on the batch axes. w's D may be FSDP-sharded. `mesh`: default from context.
    """
    plan = _plan(mesh, x.shape[0], w.shape[0], w.shape[1])
    if plan is None:
        return jnp.tensordot(x, w, axes=1)
    mesh, batch, ring, fsdp = plan
    n, perm = _ring(mesh, ring)
    middle, rest = (None,) * (x.ndim - 2), (None,) * (w.ndim - 2)
    y_dtype = jnp.result_type(x.dtype, w.dtype)

    def body(x, w):
        if fsdp is not None:
            w = jax.lax.all_gather(w, fsdp, axis=0, tiled=True)  # [D, H/n, ...]: FSDP gather
        idx = jax.lax.axis_index(ring)
        chunk = w.shape[0] // n
        acc = None
        for i in range(n):
            # After i hops this shard holds the x chunk that started on shard idx - i. The next hop
            # does not depend on this step's dot, so it runs while the dot does.
            nxt = jax.lax.ppermute(x, ring, perm) if i < n - 1 else None
            rows = jax.lax.dynamic_slice_in_dim(w, ((idx - i) % n) * chunk, chunk, axis=0)
            part = _dot(x, rows, 1).astype(
                y_dtype
            )  # f32 within the dot, summed in y_dtype (docstring)
            acc = part if acc is None else acc + part
            x = nxt
        return acc

    return _saving_only_output(
        jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(P(batch, *middle, ring), P(fsdp, ring, *rest)),
            out_specs=P(batch, *middle, ring, *rest),
        )
    )(x, w)


def matmul_reduce_scatter(z: jax.Array, w: jax.Array, mesh=None) -> jax.Array:
    """`z[B, ..., H, *in] @ w[H, *in, D] -> [B, ..., D]` with z's and w's H on the ring axis.

    Equals `jnp.tensordot(z, w, w.ndim - 1)`; the result comes out with D on the ring axis
    (act_embed) and B on the batch axes. w's D may be FSDP-sharded. `mesh`: default from context.
    """
    n_in = w.ndim - 1
    plan = _plan(mesh, z.shape[0], w.shape[-1], w.shape[0])
    if plan is None:
        return jnp.tensordot(z, w, axes=n_in)
    mesh, batch, ring, fsdp = plan
    n, perm = _ring(mesh, ring)
    middle, rest = (None,) * (z.ndim - 1 - n_in), (None,) * (n_in - 1)
    # The running sum travels in the output dtype (bf16 on accelerators), as XLA's reduce-scatter
    # does.
    y_dtype = jnp.result_type(z.dtype, w.dtype)

    def body(z, w):
        if fsdp is not None:
            w = jax.lax.all_gather(w, fsdp, axis=n_in, tiled=True)  # [H/n, ..., D]: FSDP gather
        idx = jax.lax.axis_index(ring)
        chunk = w.shape[-1] // n
        acc = None
        for i in range(n):
            # The sum arriving here was started for output chunk idx + n - 1 - i; after the last
            # step each shard holds its own chunk (idx), summed over every shard's heads. This
            # step's dot does not depend on the arriving sum, so it runs while the sum travels.
            cols = jax.lax.dynamic_slice_in_dim(
                w, ((idx + n - 1 - i) % n) * chunk, chunk, axis=n_in
            )
            part = _dot(z, cols, n_in).astype(y_dtype)
            acc = part if acc is None else jax.lax.ppermute(acc, ring, perm) + part
        return acc

    return _saving_only_output(
        jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(P(batch, *middle, ring, *rest), P(ring, *rest, fsdp)),
            out_specs=P(batch, *middle, ring),
        )
    )(z, w)
