"""`distillation`: how closely a student follows its teacher on a split (top-1 agreement, KL).

    c.evals.agree = dict(type="distillation", split="val", every=100)   # pred="student_teacher"

The predict function (default Task.predict entry `student_teacher`, trainer/distill.py) returns
`(student_logits, teacher_logits)` for one batch; both models see the same images (each resized to
its own resolution by the Task). Metrics, mask-aware (padded rows count nowhere):

- `agreement`: fraction of examples whose student top-1 class is the teacher's top-1 class
  (big_vision's `agree` distance with k=1);
- `kl`: mean `t²·KL(softmax(teacher/t) ‖ softmax(student/t))`, the distillation objective at the
  evaluator's `temperature` (default 1: the plain KL divergence, in nats).

`losses.kl_divergence` is also the training loss of trainer/distill.py (one definition for both).
"""

from __future__ import annotations

from typing import Iterator

import jax
import jax.numpy as jnp

from trainer import config_checks as checks
from trainer import losses
from trainer.evaluators import base


def agreement(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    """Per-example bool [B]: do student and teacher rank the same class first?"""
    return jnp.argmax(student_logits, axis=-1) == jnp.argmax(teacher_logits, axis=-1)


class Distillation(base.Evaluator):
    pred = "student_teacher"

    def __init__(
        self,
        predict_fn,
        *,
        ctx: base.Context,
        split: str,
        dataset: str = "",
        temperature: float = 1.0,
    ):
        super().__init__(predict_fn, ctx=ctx)
        self.check_values({"temperature": temperature}, "distillation")
        self.split, self.dataset = split, dataset or ctx.dataset
        self._loader = None

        def sums(params, frozen, batch):
            student, teacher = predict_fn(params, frozen, batch)
            mask = batch["mask"]
            return {
                "count": jnp.sum(mask.astype(jnp.float32)),
                "agreement": losses.masked_sum(agreement(student, teacher), mask),
                "kl": losses.masked_sum(losses.kl_divergence(student, teacher, temperature), mask),
            }

        self._step = ctx.jit(sums)

    @classmethod
    def check_values(cls, cfg: dict, where: str) -> None:
        checks.number(f"{where}.temperature", cfg.get("temperature", 1.0), gt=0)

    def run(self, params, frozen) -> Iterator[tuple[str, float]]:
        if self._loader is None:  # built on first use, like classification's
            self._loader = self.ctx.loader(self.split, self.dataset)
        totals = base.sum_over(self._step, params, frozen, self._loader)
        yield "agreement", totals["agreement"] / totals["count"]
        yield "kl", totals["kl"] / totals["count"]
