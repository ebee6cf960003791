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
      they join the stage's source hash next to its static import closure (launch/code_hashes.py).
    resumable: the stage checkpoints into its output dir and resumes from what it finds there; its
      unfinished dir (`.partial-<fp16>`) survives a crash or preemption (`--force` starts afresh).
    validate: "package.module:function" `(cfg, upstream, where) -> None` that `dag.plan` calls for
      the stage's group before anything runs (also under --dry_run and before XManager submits);
      `upstream` maps each upstream stage name to its config group (e.g. which datasets `prepare`
      produces), `where` is the group's config path ("pretrain", "finetune.runs.r48"). It raises
      ValueError with one line naming the key; "" = no checks.
    instances: the type runs once per entry of `config.<name>.runs` (docs/DESIGN.md §2.2): instance
      `<name>/<run>` has the group `config.<name>.runs.<run>`, its own fingerprint and cache dir
      `<workdir>/<name>/<run>/`; `--stages <name>/<run>` selects one, `--stages <name>` all.
    upstream_from: keys of the stage's group whose value names one more upstream stage (a distill
      teacher, a fine-tune's init): the DAG edge follows the config.
    optional_upstream: stage types this stage reads when the config has them (every instance of
      each; none when absent), e.g. `evaluate` scores whatever models the run made.
    run: set on an expanded instance (Registry.expand); "" for a plain stage and for a type.
    """

    name: str
    target: str
    upstream: tuple[str, ...] = ()
    extra_sources: tuple[str, ...] = ()
    resumable: bool = False
    validate: str = ""
    instances: bool = False
    upstream_from: tuple[str, ...] = ()
    optional_upstream: tuple[str, ...] = ()
    run: str = ""

    @property
    def module(self) -> str:
        return self.target.partition(":")[0]

    @property
    def type_name(self) -> str:
        """The registered stage type: `finetune` for the instance `finetune/r48`."""
        return self.name.partition("/")[0]

    @property
    def config_path(self) -> str:
        """Where the stage's group lives in the pipeline config (how overrides name it)."""
        return f"{self.type_name}.runs.{self.run}" if self.run else self.name

    def group(self, config):
        """The stage's own config group in the pipeline config."""
        return config[self.type_name].runs[self.run] if self.run else config[self.name]

    def load(self) -> Callable[[Any, dict, Path], dict]:
        return _resolve(self.target)

    def check(self, cfg, upstream: dict) -> None:
        """Runs the stage's plan-time `validate`; its error becomes a one-line PlanError."""
        if not self.validate:
            return
        try:
            _resolve(self.validate)(cfg, upstream, self.config_path)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            message = " ".join(str(e).split()) or type(e).__name__
            where = self.config_path
            raise PlanError(message if message.startswith(where) else f"{where}: {message}") from e


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
