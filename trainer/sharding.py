"""The device mesh and THE logical-axis rules table (docs/DESIGN.md §5).

Mesh axes: ("data", "model"), plus an optional outer "replica" for multi-slice data parallelism.
Parameters are sharded on both axes: their model dims (heads, mlp, classes) on "model" and their
embedding dim on "data" (FSDP-style). Activations keep the batch on "data" and hidden/heads on
"model". Model code names axes only logically (trainer/models/layers.py); this table maps them.

Imports no model, optimizer or stage module (the model imports this table; trainer/memory.py
has the per-device memory report, which needs both).
"""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec as P

from trainer import config_checks as checks

AXES = ("replica", "data", "model")


def _data_axes(mesh_axes: Sequence[str]) -> tuple[str, ...]:
    return tuple(a for a in ("replica", "data") if a in mesh_axes)


def logical_rules(mesh_axes: Sequence[str] = AXES) -> tuple[tuple[str, Any], ...]:
    """The one table. The batch spans "replica" too when the mesh has it."""
    batch = _data_axes(mesh_axes)
    return (
        # parameters
        ("embed", "data"),
        ("heads", "model"),
        ("mlp", "model"),
        ("classes", "model"),
        ("kv", None),
        ("layers", None),
        # activations
        ("act_batch", batch if len(batch) > 1 else batch[0]),
        ("act_len", None),
        ("act_embed", "model"),
        ("act_heads", "model"),
        ("act_mlp", "model"),
        ("act_kv", None),
    )


def mesh_shape(
    num_devices: int, data: int = -1, model: int = 1, replica: int = 1
) -> tuple[int, int, int]:
    """Resolves -1 (fill with what is left) and checks the product against the device count."""
    sizes = {"replica": replica, "data": data, "model": model}
    free = [k for k, v in sizes.items() if v == -1]
    checks.mesh("mesh", sizes, tuple(sizes))
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(
                f"mesh: {num_devices} devices are not divisible by the fixed axes "
                f"({' x '.join(f'{k}={v}' for k, v in sizes.items() if v != -1)})"
            )
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(
            f"mesh: replica={sizes['replica']} x data={sizes['data']} x model={sizes['model']} = "
            f"{math.prod(sizes.values())} but there are {num_devices} devices"
        )
    return sizes["replica"], sizes["data"], sizes["model"]


def make_mesh(
    data: int = -1, model: int = 1, replica: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A ("data", "model") mesh, or ("replica", "data", "model") when replica > 1.

    Auto axis types: we rely on sharding propagation (jax 0.10 defaults to Explicit,
    docs/DESIGN.md §6).
    """
    devices = list(devices or jax.devices())
    r, d, m = mesh_shape(len(devices), data, model, replica)
    shape, names = ((r, d, m), AXES) if r > 1 else ((d, m), AXES[1:])
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))
    return Mesh(np.asarray(devices).reshape(shape), names, axis_types=(AxisType.Auto,) * len(names))


@contextlib.contextmanager
def activate(mesh):
    """Mesh + rules in context while tracing, so the model's logical activation constraints apply.

    Without it flax's `with_logical_constraint` is a silent no-op.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules(mesh.axis_names)):
        yield


def abstract_mesh(data: int, model: int, replica: int = 1) -> AbstractMesh:
    """A mesh of the given shape without devices: enough to compute shard shapes for any pod."""
    shape, names = ((replica, data, model), AXES) if replica > 1 else ((data, model), AXES[1:])
    return AbstractMesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


def batch_spec(mesh) -> P:
    """Batch axis over replica x data (the table's act_batch); every other dim replicated."""
    return P(dict(logical_rules(mesh.axis_names))["act_batch"])


def batch_sharding(mesh) -> NamedSharding:
    """THE layout of every batch array, the one object the loaders, the train and eval steps, AOT,
    the benchmarks and the tests are handed: `batch_spec(mesh)` on `mesh` (concrete or abstract)."""
    return NamedSharding(mesh, batch_spec(mesh))


def data_parallel_size(mesh) -> int:
    """replica x data: how many shards a batch splits into (a mesh or a NamedSharding's mesh)."""
    mesh = mesh.mesh if isinstance(mesh, NamedSharding) else mesh
    return math.prod(mesh.shape[a] for a in _data_axes(mesh.axis_names))


def _data_parallel(mesh) -> int | None:
    """`data_parallel_size` of a mesh, sharding, int or None (unknown), or of a mesh config (keys
    data[, replica]; None while one is -1, i.e. sized from the devices at run time)."""
    if mesh is None or isinstance(mesh, numbers.Integral):
        return mesh
    if isinstance(mesh, (Mesh, AbstractMesh, NamedSharding)):
        return data_parallel_size(mesh)
    sizes = [mesh.get(a, 1) for a in ("replica", "data")]
    return None if -1 in sizes else math.prod(sizes)


def check_batch(
    batch_size: int, mesh, key: str, *, microbatches: int = 1, processes: int = 1
) -> None:
    """THE batch divisibility check, at plan time, at run time and in the train step: the batch
    splits into `microbatches` equal microbatches, each spread evenly over the data-parallel shards
    of `mesh` (`_data_parallel`: a mesh, a batch sharding or a mesh config), and into `processes`
    equal per-process parts. Raises "<key>: <batch_size> is not divisible by ..."."""
    checks.positive_int(key, batch_size)
    if not checks.is_int(microbatches, 1):
        raise checks.fail(key, f"microbatches must be a positive int, got {microbatches!r}")
    dp = _data_parallel(mesh)
    if batch_size % (microbatches * (dp or 1)):
        parts = ([f"{microbatches} microbatches"] if microbatches > 1 else []) + (
            [f"the data-parallel size {dp}"] if dp and dp > 1 else []
        )
        raise checks.fail(key, f"{batch_size} is not divisible by {' x '.join(parts)}")
    if batch_size % processes:
        raise checks.fail(key, f"{batch_size} is not divisible by {processes} processes")


def fit_dim(axes, dim: int, mesh):
    """`axes` (one mesh axis name, a tuple of them, or None) if their sizes' product divides
    `dim`, else None: replicate that dim. The one policy for parameters and the collective
    matmuls' plans."""
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    if not names or dim % math.prod(mesh.shape[a] for a in names):
        return None
    return axes


def _fit(spec: P, shape: Sequence[int], mesh) -> P:
    """Drops mesh axes from dims they do not divide (e.g. 10 classes over model=4): replicate
    those."""
    padded = tuple(spec) + (None,) * (len(shape) - len(spec))
    return P(*(fit_dim(axes, dim, mesh) for dim, axes in zip(shape, padded)))


def param_shardings(boxed_params, mesh):
    """NamedShardings for a boxed (logically partitioned) parameter pytree, abstract or concrete."""
    rules = logical_rules(mesh.axis_names)
    logical = nn.get_partition_spec(boxed_params)
    unboxed = nn.unbox(boxed_params)

    def one(spec, leaf):
        return NamedSharding(mesh, _fit(nn.logical_to_mesh_axes(spec, rules), leaf.shape, mesh))

    return jax.tree_util.tree_map(one, logical, unboxed, is_leaf=lambda x: isinstance(x, P))


def _keys(path) -> tuple[str, ...]:
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def fsdp_spec(shape: Sequence[int], mesh, min_size: int = 2**14) -> P:
    """For state without a parameter twin: shard the largest dim that "data" divides, if worth
    it."""
    size = mesh.shape["data"]
    if math.prod(shape) < min_size or size == 1:
        return P()
    for i in sorted(range(len(shape)), key=lambda i: -shape[i]):
        if shape[i] % size == 0:
            return P(*([None] * i + ["data"]))
    return P()


def tree_shardings(tree, params, param_sh, mesh):
    """Shardings for any pytree holding parameter-shaped leaves (optimizer state, EMA, ...).

    A leaf whose dict-key path and shape match a parameter gets that parameter's sharding (Adam's
    moments); any other leaf (Adafactor's factored rows/cols, counters) gets `fsdp_spec`.
    """
    by_path = {}
    for (path, leaf), sh in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_leaves(param_sh)
    ):
        by_path[_keys(path)] = (tuple(leaf.shape), sh)

    def one(path, leaf):
        # Optimizer wrappers may prefix dict keys (e.g. optax.partition's labels).
        keys = _keys(path)
        twin = next((by_path[keys[i:]] for i in range(len(keys)) if keys[i:] in by_path), None)
        if twin and twin[0] == tuple(leaf.shape):
            return twin[1]
        return NamedSharding(mesh, fsdp_spec(leaf.shape, mesh))

    return jax.tree_util.tree_map_with_path(one, tree)


def per_device_bytes(tree, shardings) -> int:
    """Bytes one device holds for `tree` (abstract or concrete) under `shardings` (max over
    devices)."""
    total = 0
    for leaf, sh in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings)):
        total += math.prod(sh.shard_shape(tuple(leaf.shape))) * jnp.dtype(leaf.dtype).itemsize
    return total
