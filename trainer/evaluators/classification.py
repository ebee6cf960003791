"""`classification`: top-1, top-5, loss and (when the split has them) ImageNet-ReaL top-1.

Mask-aware: padded rows of the last eval batch count nowhere. Labels are the loader's multi-hot
`labels`, so "top-1" is "the top class is one of the example's labels" (plain top-1 for
single-label data). ReaL top-1 (Beyer et al. 2020) scores the top class against the example's
`real_labels` set and leaves out examples whose set is empty (no ReaL label), as the ReaL paper
does.
"""

from __future__ import annotations

from typing import Iterator

import jax.numpy as jnp

from trainer import losses
from trainer.evaluators import base


class Classification(base.Evaluator):
    pred = "logits"

    def __init__(
        self,
        predict_fn,
        *,
        ctx: base.Context,
        split: str,
        dataset: str = "",
        loss: str = "sigmoid_xent",
        label_smoothing: float = 0.0,
    ):
        super().__init__(predict_fn, ctx=ctx)
        self.split, self.dataset = split, dataset or ctx.dataset
        loss_fn = losses.get(loss, label_smoothing)
        self._loader = None

        def sums(params, frozen, batch):
            logits = predict_fn(params, frozen, batch)
            labels, mask = batch["labels"], batch["mask"]
            out = {
                "count": jnp.sum(mask.astype(jnp.float32)),
                "loss": losses.masked_sum(loss_fn(logits, labels), mask),
                "top1": losses.masked_sum(losses.top1_correct(logits, labels), mask),
                "top5": losses.masked_sum(losses.topk_correct(logits, labels, 5), mask),
            }
            if "real_labels" in batch:
                real = batch["real_labels"]
                labelled = mask & (jnp.sum(real, axis=-1) > 0)
                out["real_count"] = jnp.sum(labelled.astype(jnp.float32))
                out["real_top1"] = losses.masked_sum(losses.top1_correct(logits, real), labelled)
            return out

        self._step = ctx.jit(sums)

    def run(self, params, frozen) -> Iterator[tuple[str, float]]:
        if (
            self._loader is None
        ):  # built on first use: evaluators are constructed before training starts
            self._loader = self.ctx.loader(self.split, self.dataset)
        totals = base.sum_over(self._step, params, frozen, self._loader)
        count = totals["count"]
        yield "top1", totals["top1"] / count
        yield "top5", totals["top5"] / count
        yield "loss", totals["loss"] / count
        if totals.get("real_count"):
            yield "real_top1", totals["real_top1"] / totals["real_count"]
