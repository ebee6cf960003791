"""Features of a frozen model over a prepared split: computed sharded on the mesh, handed to the
host one eval batch at a time with the padding dropped.

    extract = features.extractor(ctx, predict_fn)               # ctx: trainer/evaluators Context
    for x, y in features.batches(extract, params, frozen, ctx.loader("train")): ...   # streamed
    x, y = features.collect(extract, params, frozen, loader)    # or all of a (small) split at once

`predict_fn(params, frozen, batch) -> [B, D]` is a Task predict entry (`pre_logits` for few-shot and
probes). The jitted function returns the features, the batch's `label` (first class id) and its
`mask` replicated, i.e. gathered from the data shards (big_vision's few-shot evaluator does the
same); rows come out in the loader's global order. The `fewshot` evaluator keeps them in memory; the
probe stage (eval/probe.py) streams them to a `.npy` cache.

Imports only JAX and NumPy (the loader arrives through `ctx`).
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np


def extractor(ctx, predict_fn: Callable) -> Callable:
    """`(params, frozen, batch) -> {"features" f32 [B, D], "label" [B], "mask" [B]}`, jitted with
    ctx's parameter and batch shardings; the outputs replicated."""

    def fn(params, frozen, batch):
        x = predict_fn(params, frozen, batch)
        return {"features": x.astype(jnp.float32), "label": batch["label"], "mask": batch["mask"]}

    return ctx.jit(fn)


def _host(out) -> tuple[np.ndarray, np.ndarray]:
    out = jax.device_get(out)
    keep = np.asarray(out["mask"], bool)
    return np.asarray(out["features"])[keep], np.asarray(out["label"], np.int64)[keep]


def batches(
    extract: Callable, params, frozen, loader: Iterable
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(features [n, D] float32, labels [n] int64) per eval batch, padded rows dropped.

    One batch of look-ahead: batch i+1 is dispatched before batch i is copied to the host, so the
    device computes while the host writes.
    """
    pending = None
    for batch in loader:
        out = extract(params, frozen, batch)
        if pending is not None:
            yield _host(pending)
        pending = out
    if pending is not None:
        yield _host(pending)


def collect(extract: Callable, params, frozen, loader: Iterable) -> tuple[np.ndarray, np.ndarray]:
    """All of a split's features and labels in memory (the in-training few-shot splits are
    small)."""
    parts = list(batches(extract, params, frozen, loader))
    if not parts:
        raise ValueError("feature extraction: the split yielded no batches")
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])
