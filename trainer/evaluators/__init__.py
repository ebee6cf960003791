"""Evaluators: the contract (base.py) and THE table of evaluator types (docs/DESIGN.md §2.8).

A stage lists its evals in config, each `evals.<name> = {type, every, [pred], **kwargs}`:

    c.evals.val = dict(type="classification", split="val", every=100, loss="sigmoid_xent")

`type` is looked up here when the config is checked (plan time), so an unknown type or an
unknown/missing key fails before anything runs, and every evaluator class is in the static import
closure of every training stage (the cache sees their edits). `every` is the loop's cadence in
steps (0 = only at the end); `pred` picks a Task.predict entry (default: the class's `pred`).
The evaluate stage extends this table with its own entries (eval/); trainer/ never imports eval/.
"""

from __future__ import annotations

from typing import Any, Mapping

from trainer import config_checks as checks
from trainer.evaluators.base import Context, Evaluator, sum_over
from trainer.evaluators.classification import Classification
from trainer.evaluators.fewshot import FewShot
from trainer.evaluators.label_map import LabelMapAccuracy
from trainer.evaluators.zeroshot import Retrieval, ZeroShot
from trainer.evaluators.distillation import Distillation

__all__ = ["TABLE", "LOOP_KEYS", "Context", "Evaluator", "build", "check", "sum_over"]

TABLE: dict[str, type[Evaluator]] = {
    "classification": Classification,
    # scores in another label space through data/label_maps (label_map.py)
    "label_map": LabelMapAccuracy,
    "zeroshot": ZeroShot,  # two-tower (LiT) zero-shot classification (zeroshot.py)
    "retrieval": Retrieval,  # two-tower image<->text recall@k (zeroshot.py)
    "fewshot": FewShot,  # closed-form few-shot on pre-logits, big_vision's fewshot_lsr (fewshot.py)
    "distillation": Distillation,  # student vs teacher: top-1 agreement, KL (trainer/distill.py)
}

LOOP_KEYS = ("type", "every", "pred")  # read by the loop, not passed to the evaluator


def _plain(cfg) -> dict:
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def check(
    evals: Mapping[str, Any], where: str, table: Mapping[str, type[Evaluator]] = TABLE
) -> None:
    """Plan-time check of an `evals` group; one-line ValueError naming the key."""
    for name, raw in evals.items():
        cfg = _plain(raw)
        key = f"{where}.{name}"
        if not name.isidentifier():
            raise checks.fail(
                key, "eval names must be identifiers (they prefix the logged metrics)"
            )
        kind = cfg.get("type")
        if kind not in table:
            raise ValueError(
                f"{key}.type={kind!r} is not an evaluator; known: {', '.join(sorted(table))}"
            )
        every = cfg.get("every", 0)
        if not checks.is_int(every, 0):
            raise ValueError(f"{key}.every={every!r} must be an int >= 0 (0 = only at the end)")
        required, optional = table[kind].config_keys()
        given = set(cfg) - set(LOOP_KEYS)
        unknown, missing = given - required - optional, required - given
        if unknown:
            raise checks.fail(
                f"{key}.{sorted(unknown)[0]}",
                f"unknown key for a {kind!r} evaluator; known: "
                f"{', '.join(sorted(required | optional))}",
            )
        if missing:
            raise ValueError(f"{key}.{sorted(missing)[0]} is required by a {kind!r} evaluator")
        table[kind].check_values({k: cfg[k] for k in given}, key)


def build(
    evals: Mapping[str, Any],
    predict: Mapping[str, Any],
    ctx: Context,
    where: str,
    table: Mapping[str, type[Evaluator]] = TABLE,
) -> dict[str, tuple[int, Evaluator]]:
    """{eval name: (every, evaluator)} from an `evals` group and a Task's predict functions."""
    check(evals, where, table)
    built = {}
    for name, raw in evals.items():
        cfg = _plain(raw)
        cls = table[cfg.pop("type")]
        every = cfg.pop("every", 0)
        pred = cfg.pop("pred", cls.pred)
        if pred not in predict:
            raise ValueError(
                f"{where}.{name}.pred={pred!r}: the task predicts only {', '.join(sorted(predict))}"
            )
        built[name] = (every, cls(predict[pred], ctx=ctx, **cfg))
    return built
