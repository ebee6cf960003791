"""A random image/label batch sharded over a mesh's data axis (step-level tests)."""

import jax
import numpy as np

from trainer import sharding


def random_batch(mesh, n: int, size: int = 16, classes: int = 5, seed: int = 0):
    """(batch of n `size`-px images with one-hot labels on the mesh, its NamedSharding)."""
    bsh = sharding.batch_sharding(mesh)
    rng = np.random.default_rng(seed)
    batch = jax.device_put(
        {
            "image": rng.normal(size=(n, size, size, 3)).astype(np.float32),
            "labels": np.eye(classes, dtype=np.float32)[rng.integers(0, classes, n)],
        },
        bsh,
    )
    return batch, bsh
