"""Stage registry, DAG and planning against the content-addressed cache (docs/DESIGN.md §2).

A stage is `run(cfg, inputs, out) -> dict`, named here lazily as "module:function" so that
importing `launch` never imports JAX, Beam or TensorFlow. The DAG runs exactly the registered
stages whose config group appears in the config (`config.<stage name>`); a stage type registered
with `instances=True` runs once per entry of `config.<type>.runs` as `<type>/<run>`, and keys
named in `upstream_from` add the upstream stage their value names (a distill teacher), unless the
value is a checkpoint file from elsewhere (timm / big_vision; its identity is in the fingerprint).

Planning fingerprints every active stage (launch/fingerprint.py) and looks its output up in the
cache (launch/cache.py has the layout); launch/produce.py runs the misses.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import ml_collections

from data import paths
from launch import cache
from launch import fingerprint
from launch import produce
from launch.stage_types import Log, PlanError, Stage, StageOutput, StagePlan
from trainer.interop import weights_import

__all__ = [
    "REPO_ROOT",
    "STAGES",
    "Log",
    "PlanError",
    "Registry",
    "Stage",
    "StageOutput",
    "StagePlan",
    "format_plan",
    "load_registry",
    "plan",
    "run_pipeline",
    "run_stage",
]

REPO_ROOT = Path(__file__).resolve().parents[1]


class Registry:
    """An explicit, validated set of stages; iteration is in dependency (topological) order."""

    def __init__(self, stages: Iterable[Stage], *, root: Path = REPO_ROOT):
        self.root = Path(root).resolve()
        self._stages: dict[str, Stage] = {}
        for stage in stages:
            if not stage.name.isidentifier():
                raise ValueError(f"stage name {stage.name!r} must be a Python identifier")
            if stage.name in self._stages:
                raise ValueError(f"stage {stage.name!r} registered twice")
            module, sep, function = stage.target.partition(":")
            if not (sep and module and function.isidentifier()):
                raise ValueError(
                    f"stage {stage.name!r}: target {stage.target!r} is not 'module:function'"
                )
            if stage.validate and not all(stage.validate.partition(":")[::2]):
                raise ValueError(
                    f"stage {stage.name!r}: validate {stage.validate!r} is not 'module:function'"
                )
            if not all(key.isidentifier() for key in stage.upstream_from):
                raise ValueError(f"stage {stage.name!r}: upstream_from keys must be identifiers")
            self._stages[stage.name] = stage
        for stage in self._stages.values():
            for up in stage.upstream + stage.optional_upstream:
                if up not in self._stages:
                    raise ValueError(f"stage {stage.name!r}: unknown upstream {up!r}")
        self._order = [stage.name for stage in _toposort(self._stages)]

    def __getitem__(self, name: str) -> Stage:
        return self._stages[name]

    def __contains__(self, name: str) -> bool:
        return name in self._stages

    def __iter__(self) -> Iterator[Stage]:
        return (self._stages[name] for name in self._order)

    @property
    def names(self) -> list[str]:
        return list(self._order)

    def expand(self, config) -> list[Stage]:
        """The stages this config runs, instances expanded and config-named upstream resolved, in
        dependency order. Raises PlanError for malformed groups, unknown names and cycles."""
        found: dict[str, Stage] = {}
        by_type: dict[str, list[str]] = {}
        for stage in self:
            if stage.name not in config:
                continue
            group = config[stage.name]
            if not isinstance(group, ml_collections.ConfigDict):
                raise PlanError(
                    f"config.{stage.name} must be a ConfigDict (the stage's config group), "
                    f"got {type(group).__name__}"
                )
            if stage.instances:
                runs = group.get("runs")
                if set(group.keys()) != {"runs"} or not isinstance(runs, ml_collections.ConfigDict):
                    raise PlanError(
                        f"config.{stage.name} must hold only `runs`: one config group per "
                        f"{stage.name} instance (config.{stage.name}.runs.<name>)"
                    )
                members = []
                for run, run_group in runs.items():
                    if not run.isidentifier() or not isinstance(
                        run_group, ml_collections.ConfigDict
                    ):
                        raise PlanError(
                            f"config.{stage.name}.runs.{run}: run names must be identifiers "
                            "and each run a ConfigDict"
                        )
                    members.append(dataclasses.replace(stage, name=f"{stage.name}/{run}", run=run))
            else:
                members = [stage]
            by_type[stage.name] = [m.name for m in members]
            found.update((m.name, m) for m in members)
        resolved: dict[str, Stage] = {}
        for name, stage in found.items():
            upstream = []
            for up in stage.upstream:
                if up not in by_type:
                    raise PlanError(
                        f"stage {name!r} needs upstream {up}, which has no config group; "
                        f"add config.{up}"
                    )
                upstream += by_type[up]
            for up in stage.optional_upstream:
                upstream += by_type.get(up, [])
            group = stage.group(config)
            for key in stage.upstream_from:
                target = group.get(key) if key in group else None
                if (
                    isinstance(target, str)
                    and target not in found
                    and weights_import.is_foreign(target)
                ):
                    continue  # a checkpoint file from elsewhere (timm / big_vision): no DAG edge
                if target not in found or target == name:
                    raise PlanError(
                        f"{stage.config_path}.{key}: {target!r} is not another stage of this "
                        f"config (stages: {', '.join(found)})"
                    )
                upstream.append(target)
            resolved[name] = dataclasses.replace(stage, upstream=tuple(dict.fromkeys(upstream)))
        return _toposort(resolved)


def _toposort(stages: dict[str, Stage]) -> list[Stage]:
    """Dependency order, ties broken by the given order; PlanError on a cycle."""
    order: list[Stage] = []
    state: dict[str, str] = {}

    def visit(name: str, path: tuple[str, ...]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise PlanError(f"stage dependency cycle: {' -> '.join(path + (name,))}")
        state[name] = "visiting"
        for up in stages[name].upstream:
            visit(up, path + (name,))
        state[name] = "done"
        order.append(stages[name])

    for name in stages:
        visit(name, ())
    return order


def _closure(stages: dict[str, Stage], names: Iterable[str]) -> set[str]:
    found: set[str] = set()
    todo = [up for name in names for up in stages[name].upstream]
    while todo:
        name = todo.pop()
        if name not in found:
            found.add(name)
            todo.extend(stages[name].upstream)
    return found


# The stage table (INTERFACES.md). Later stages (finetune, distill, probe, lit, evaluate) are added
# here by module path; each activates when a config has its group.
STAGES = Registry(
    [
        Stage("prepare", "pipelines.prepare:run", validate="pipelines.prepare:validate"),
        Stage(
            "pretrain",
            "trainer.pretrain:run",
            upstream=("prepare",),
            resumable=True,
            validate="trainer.pretrain:validate",
        ),
        Stage(
            "finetune",
            "trainer.finetune:run",
            upstream=("prepare",),
            upstream_from=("init_from",),
            instances=True,
            resumable=True,
            validate="trainer.finetune:validate",
        ),
        Stage(
            "distill",
            "trainer.distill:run",
            upstream=("prepare",),
            upstream_from=("teacher",),
            instances=True,
            resumable=True,
            validate="trainer.distill:validate",
        ),
        Stage(
            "lit",
            "trainer.lit:run",
            upstream=("prepare",),
            upstream_from=("image_from",),
            resumable=True,
            validate="trainer.lit:validate",
        ),
        Stage(
            "probe",
            "eval.probe:run",
            upstream=("prepare",),
            upstream_from=("model_from",),
            resumable=True,
            validate="eval.probe:validate",
        ),
        Stage(
            "evaluate",
            "eval.evaluate:run",
            upstream=("prepare",),
            optional_upstream=("pretrain", "finetune", "distill", "lit", "probe"),
            validate="eval.evaluate:validate",
        ),
    ]
)


def load_registry(spec: str) -> Registry:
    """Resolves "module:attribute" to a Registry (the CLIs' --registry flag; tests use it)."""
    module, sep, attribute = spec.partition(":")
    if not (sep and module and attribute):
        raise PlanError(f"--registry {spec!r} is not 'module:attribute'")
    try:
        registry = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as e:
        raise PlanError(f"--registry {spec!r}: {e}") from e
    if not isinstance(registry, Registry):
        raise PlanError(
            f"--registry {spec!r} is a {type(registry).__name__}, not a launch.dag.Registry"
        )
    return registry


def _select(
    flag: str, names: Sequence[str], stages: dict[str, Stage], registry: Registry
) -> list[str]:
    """Stage names for --stages/--force: an instance (`finetune/r48`), a plain stage, or a type
    with instances (all of them)."""
    selected: list[str] = []
    for name in names:
        members = [s for s in stages if s == name or s.partition("/")[0] == name and "/" in s]
        if not members:
            if name.partition("/")[0] not in registry:
                raise PlanError(
                    f"{flag}: unknown stage {name!r} (registered: {', '.join(registry.names)})"
                )
            raise PlanError(
                f"{flag}: stage {name!r} has no config group in this config "
                f"(active stages: {', '.join(stages) or 'none'})"
            )
        selected += members
    return selected


def plan(
    config,
    workdir: Path,
    registry: Registry = STAGES,
    *,
    only: Sequence[str] | None = None,
    force: Sequence[str] = (),
) -> list[StagePlan]:
    """Validates and fingerprints every stage of the config and decides run / reuse / skip for each.

    only: run just these stages (`--stages`; a type name selects all its instances); their
      upstream must already be in the cache.
    force: rerun these even on a cache hit (`--force`); downstream stages keep their fingerprint,
      so they stay cache hits.
    """
    try:
        workdir = paths.as_path(workdir, "--workdir")  # a local dir or a bucket URI
    except paths.UnsupportedPath as e:
        raise PlanError(str(e)) from None
    stages = registry.expand(config)
    if not stages:
        raise PlanError(
            f"the config has no group for any registered stage "
            f"(registered: {', '.join(registry.names)}; config keys: {', '.join(config)})"
        )
    by_name = {stage.name: stage for stage in stages}
    for (
        stage
    ) in stages:  # every stage of the config, selected or not: a bad group fails before any work
        stage.check(stage.group(config), {up: by_name[up].group(config) for up in stage.upstream})
    active = list(by_name)
    chosen = _select("--stages", only or (), by_name, registry)
    forced = set(_select("--force", force, by_name, registry))
    selected = set(chosen) if only else set(active)
    for name in sorted(forced - selected):
        raise PlanError(f"--force {name}: not among --stages {','.join(only or ())}")
    needed = selected | _closure(by_name, selected)

    versions = fingerprint.package_versions()
    fingerprints: dict[str, str] = {}
    plans: list[StagePlan] = []
    missing: list[tuple[str, Path]] = []  # upstream of --stages that is not in the cache
    for stage in stages:
        components = fingerprint.fingerprint_components(
            stage,
            stage.group(config),
            {up: fingerprints[up] for up in stage.upstream},
            registry.root,
            versions,
        )
        fp = fingerprints[stage.name] = fingerprint.fingerprint(components)
        path = cache.stage_dir(workdir, stage.name, fp)
        complete = cache.is_complete(path)
        if stage.name not in needed:
            action, reason = "skip", "not selected by --stages"
        elif stage.name in forced:
            action, reason = "run", "forced" + ("; replaces the cached output" if complete else "")
        elif complete:
            action, reason = "reuse", "cache hit"
        elif stage.name in selected:
            previous = cache.latest_completed_components(workdir / stage.name)
            action = "run"
            reason = (
                "no cached output"
                if previous is None
                else fingerprint.explain_change(previous, components)
            )
        else:
            missing.append((stage.name, path))
            continue
        plans.append(
            StagePlan(stage, fp, components, path, action, reason, forced=stage.name in forced)
        )
    if missing:
        names = [name for name, _ in missing]
        wanted = ",".join(name for name in active if name in selected)
        raise PlanError(
            f"--stages {wanted} needs upstream {', '.join(names)}, not in the cache (expected "
            f"{', '.join(str(path) for _, path in missing)}); run "
            f"{'it' if len(names) == 1 else 'them'} first, "
            f"e.g. --stages {','.join(names + [wanted])}"
        )
    return plans


def format_plan(plans: Sequence[StagePlan]) -> str:
    """The --dry_run table: every stage, hit/miss, and why it misses."""
    width = max(len(p.name) for p in plans)
    label = {"run": "MISS", "reuse": "HIT", "skip": "SKIP"}
    lines = []
    for p in plans:
        label_text = "FORCE" if p.forced else label[p.action]
        lines.append(f"{p.name:<{width}}  {label_text:<5}  {p.fingerprint[:16]}  {p.reason}")
        lines.append(f"{'':<{width}}  {'':<5}  -> {p.path}")
    return "\n".join(lines)


def run_pipeline(
    config,
    workdir: Path,
    *,
    registry: Registry = STAGES,
    only: Sequence[str] | None = None,
    force: Sequence[str] = (),
    log: Log = print,
) -> dict[str, StageOutput]:
    """Plans and executes the DAG in this process; returns every non-skipped stage's output."""
    return produce.execute(plan(config, workdir, registry, only=only, force=force), config, log=log)


def run_stage(
    name: str,
    config,
    workdir: Path,
    *,
    registry: Registry = STAGES,
    force: bool = False,
    expect_fingerprint: str | None = None,
    run_id: str | None = None,
    log: Log = print,
) -> StageOutput:
    """Runs (or reuses) one stage as its own process does; its upstream must be in the cache.

    expect_fingerprint: what the launcher planned. A mismatch (sources edited after launch, an
    override that did not reach this process, other package versions in the job's image) fails
    before any work is done.
    run_id: set by launchers on multi-host jobs (same on every host); see `produce`.
    """
    plans = plan(config, workdir, registry, only=[name], force=[name] if force else [])
    mine = next(p for p in plans if p.name == name)
    if expect_fingerprint and mine.fingerprint != expect_fingerprint:
        raise PlanError(
            f"stage {name!r}: fingerprint {mine.fingerprint[:16]} differs from the "
            f"launcher's {expect_fingerprint[:16]}; its inputs changed since launch"
        )
    return produce.execute(plans, config, log=log, run_id=run_id)[name]
