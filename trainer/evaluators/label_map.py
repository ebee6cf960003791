"""`label_map`: top-1 of a model scored in another label space through a label map.

    evals.objectnet = dict(type="label_map", split="test", dataset="objectnet",
                           map="/maps/in_to_objectnet.json", reduce="max")

The metric is `data.label_maps.correct` (THE label-map accuracy; the evaluate stage's `ood`
evaluator calls the same function on the host), run per batch on the device: the model's scores
over its own classes (`ctx.class_names`, the source space) become target-space scores (max or mean
over each target's source classes). The split's labels are either in the target space
(`labels="target"`, the default: its class names are the map's targets, e.g. ObjectNet) or in the
source space (`labels="source"`: each label is mapped through the map, e.g. digits -> digit
pairs). Examples whose labels fall in no target are left out (as ImageNet-R/-A's 200-class subsets
leave out the other 800 classes); `count` says how many were scored.
"""

from __future__ import annotations

from typing import Iterator

import jax.numpy as jnp

from data import label_maps
from trainer import config_checks as checks
from trainer import losses
from trainer.evaluators import base


class LabelMapAccuracy(base.Evaluator):
    pred = "logits"

    def __init__(
        self,
        predict_fn,
        *,
        ctx: base.Context,
        split: str,
        map: str,
        dataset: str = "",
        labels: str = "target",
        reduce: str = "max",
    ):
        super().__init__(predict_fn, ctx=ctx)
        self.split, self.dataset, self.labels, self.reduce = (
            split,
            dataset or ctx.dataset,
            labels,
            reduce,
        )
        self.map = label_maps.load(map)
        self.membership = self.map.membership(
            ctx.class_names
        )  # unknown classes fail before training
        self._loader = self._step = None

    @classmethod
    def check_values(cls, cfg: dict, where: str) -> None:
        checks.one_of(f"{where}.labels", cfg.get("labels", "target"), label_maps.LABEL_SPACES)
        checks.one_of(f"{where}.reduce", cfg.get("reduce", "max"), label_maps.REDUCTIONS)
        try:
            label_maps.load(cfg["map"])
        except ValueError as e:
            raise checks.fail(f"{where}.map", str(e)) from None

    def _build(self):
        self._loader = self.ctx.loader(self.split, self.dataset)
        to_targets = self.map.to_targets(
            self.membership,
            self._loader.manifest.class_names,
            self.labels,
            f"label_map on {self.dataset}/{self.split}",
        )
        membership, reduce, predict = self.membership, self.reduce, self.predict_fn

        def sums(params, frozen, batch):
            truth = label_maps.target_truth(batch["labels"], to_targets)  # [B, T]
            scores = predict(params, frozen, batch)
            correct, scored = label_maps.correct(scores, truth, membership, reduce)
            scored = batch["mask"] & scored
            return {
                "count": jnp.sum(scored.astype(jnp.float32)),
                "top1": losses.masked_sum(correct, scored),
            }

        self._step = self.ctx.jit(sums)

    def run(self, params, frozen) -> Iterator[tuple[str, float]]:
        if self._step is None:
            self._build()
        totals = base.sum_over(self._step, params, frozen, self._loader)
        if not totals["count"]:
            raise ValueError(
                f"label_map on {self.dataset}/{self.split}: no example's label is in the map"
            )
        yield "top1", totals["top1"] / totals["count"]
        yield "count", totals["count"]
