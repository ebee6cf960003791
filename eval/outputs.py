"""A model's outputs over a prepared split, on the host: what the evaluate stage's metrics read.

    out = outputs.collect(ctx, predict_fn, params, frozen, split, dataset)
    out.scores        # float32 [N, C] (the predict function's outputs, e.g. logits), loader order
    out.labels        # bool [N, K] multi-hot in the split's K classes; out.label: int [N] first id
    # when the split has them
    out.real_labels / out.attributes / out.shape_label / out.texture_label
    out.ids           # record ids, read on first use

The forward pass runs sharded on the mesh (ctx.jit, one batch of look-ahead as
trainer/features.py); everything the batch carries besides the image comes back with the scores,
padding dropped. Inside the evaluate stage, ctx is an `EvalContext` whose cache holds each
(predict function, dataset, split, image transform) once per model, so five evaluators on one split
cost one pass. Inside training (a plain `Context`) nothing is cached: the params change between
evaluations.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Hashable

import jax
import jax.numpy as jnp
import numpy as np

from trainer import evaluators


@dataclasses.dataclass(frozen=True)
class EvalContext(evaluators.Context):
    """The evaluators' Context with a per-model cache of collected outputs (the evaluate stage)."""

    outputs_cache: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class SplitOutputs:
    dataset: str
    split: str
    class_names: tuple[str, ...]  # the split's classes (its manifest)
    manifest: Any
    scores: np.ndarray
    labels: np.ndarray
    label: np.ndarray
    real_labels: np.ndarray | None = None
    attributes: np.ndarray | None = None
    shape_label: np.ndarray | None = None
    texture_label: np.ndarray | None = None
    _loader: Any = dataclasses.field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.label)

    @functools.cached_property
    def ids(self) -> np.ndarray:
        """str [N]: the record ids of the rows (read from the split's records, in loader order)."""
        return self._loader.record_ids(self.label, f"{self.dataset}/{self.split}")


_OPTIONAL = ("real_labels", "attributes", "shape_label", "texture_label")


def collect(
    ctx: evaluators.Context,
    predict_fn: Callable,
    params,
    frozen,
    split: str,
    dataset: str = "",
    *,
    transform: Callable | None = None,
    transform_key: Hashable = None,
) -> SplitOutputs:
    """The outputs of `predict_fn` over `dataset/split` (module docstring). `transform` maps the
    batch's images before the model sees them (jitted with it, e.g. a border crop); give it a
    `transform_key` so the cache can tell transformed passes apart."""
    dataset = dataset or ctx.dataset
    cache = getattr(ctx, "outputs_cache", None)
    key = (id(predict_fn), dataset, split, ctx.image_size, transform_key)
    if cache is not None and key in cache:
        return cache[key]
    loader = ctx.loader(split, dataset)

    def fn(params, frozen, batch):
        images = batch["image"] if transform is None else transform(batch["image"])
        scores = predict_fn(params, frozen, {**batch, "image": images})
        return {
            "scores": scores.astype(jnp.float32),
            **{k: v for k, v in batch.items() if k != "image"},
        }

    step = ctx.jit(fn)

    parts: list[dict[str, np.ndarray]] = []
    pending = None
    for batch in loader:
        out = step(params, frozen, batch)
        if pending is not None:
            parts.append(_host(pending))
        pending = out
    if pending is None:
        raise ValueError(f"evaluate: {dataset}/{split} yielded no batches")
    parts.append(_host(pending))
    host = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    manifest = loader.manifest
    result = SplitOutputs(
        dataset=dataset,
        split=split,
        class_names=tuple(manifest.class_names),
        manifest=manifest,
        scores=host["scores"],
        labels=host["labels"] > 0,
        label=host["label"].astype(np.int64),
        **{k: host[k] for k in _OPTIONAL if k in host},
        _loader=loader,
    )
    if cache is not None:
        cache[key] = result
    return result


def _host(out: dict) -> dict[str, np.ndarray]:
    out = jax.device_get(out)
    keep = np.asarray(out.pop("mask"), bool)
    return {k: np.asarray(v)[keep] for k, v in out.items()}
