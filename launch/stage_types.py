"""The stage DAG's data types, shared by planning (dag), fingerprinting and producing outputs.

Kept apart from launch/dag.py so launch/fingerprint.py and launch/produce.py can use them without
importing the planner (launch.dag re-exports every name here).
"""
from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any, Callable

Log = Callable[[str], None]


class PlanError(ValueError):
    """The requested run cannot be planned (unknown stage, missing upstream, bad config)."""


@dataclasses.dataclass(frozen=True)
class StageOutput:
    """A completed stage: what downstream stages receive in `inputs[name]`."""
    name: str
    fingerprint: str
    path: Path
    outputs: dict


@dataclasses.dataclass(frozen=True)
class Stage:
    """One registered stage.

    target: "package.module:function", imported only when the stage runs.
    upstream: names of the stages whose outputs this one reads (`inputs[name]`).
    extra_sources: globs (relative to the registry root) of non-Python files the stage reads;
      they join the stage's source hash next to its static import closure (launch/sources.py).
    resumable: the stage checkpoints into its output dir and resumes from what it finds there; its
      unfinished dir (`.partial-<fp16>`) survives a crash or preemption (`--force` starts afresh).
    validate: "package.module:function" `(cfg, upstream) -> None` that `dag.plan` calls for the
      stage's group before anything runs (also under --dry_run and before XManager submits);
      `upstream` maps each upstream stage name to its config group (e.g. which datasets `prepare`
      produces). It raises ValueError with one line naming the key; "" = no checks.
    """
    name: str
    target: str
    upstream: tuple[str, ...] = ()
    extra_sources: tuple[str, ...] = ()
    resumable: bool = False
    validate: str = ""

    @property
    def module(self) -> str:
        return self.target.partition(":")[0]

    def load(self) -> Callable[[Any, dict, Path], dict]:
        return _resolve(self.target)

    def check(self, cfg, upstream: dict) -> None:
        """Runs the stage's plan-time `validate`; its error becomes a one-line PlanError."""
        if not self.validate:
            return
        try:
            _resolve(self.validate)(cfg, upstream)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            message = " ".join(str(e).split()) or type(e).__name__
            raise PlanError(message if message.startswith(self.name) else f"{self.name}: {message}") from e


def _resolve(target: str) -> Callable:
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)



@dataclasses.dataclass(frozen=True)
class StagePlan:
    """What one invocation will do with one stage.

    action: "run" (produce it), "reuse" (cache hit) or "skip" (not selected by --stages and not
      needed upstream of a selected stage).
    reason: why — "cache hit", "forced", or which fingerprint input changed since the last
      completed run ("config changed: pretrain.steps 5 -> 10", "upstream changed: prepare", ...).
    """
    stage: Stage
    fingerprint: str
    components: dict
    path: Path
    action: str
    reason: str
    forced: bool = False

    @property
    def name(self) -> str:
        return self.stage.name
