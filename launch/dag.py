"""Stage registry, dependency graph, fingerprints and the content-addressed cache (DESIGN §2).

A stage is `run(cfg, inputs, out) -> dict`, named here lazily as "module:function" so that
importing `launch` never imports JAX, Beam or TensorFlow. The DAG runs exactly the registered
stages whose config group appears in the config (`config.<stage name>`).

Cache layout, per stage:

    <workdir>/<stage>/<fingerprint[:16]>/   completed outputs (renamed into place, `_SUCCESS` last)
        config.json  outputs.json  metrics.jsonl  tb/  fingerprint.json  _SUCCESS  <artifacts>
    <workdir>/<stage>/.tmp-<fp16>-*          a run in progress, or the debris of a crashed one
    <workdir>/<stage>/.partial-<fp16>/       a resumable stage's run in progress: kept when it crashes
                                             or is preempted, so the next run resumes from its checkpoints
    <workdir>/<stage>/.locks/<fp16>.lock     flock() held while a process produces <fp16>

A directory without `_SUCCESS` is never reused. Concurrent runs of one stage serialise on the lock;
the loser of the race finds `_SUCCESS` after the lock is released and reuses the winner's output.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import hashlib
import importlib
import importlib.metadata
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import ml_collections

from launch import sources

REPO_ROOT = Path(__file__).resolve().parents[1]
SUCCESS = "_SUCCESS"
FINGERPRINT_FILE = "fingerprint.json"
# Distributions whose version is part of every fingerprint (a new jax may change numerics).
VERSIONED_DISTRIBUTIONS = ("jax", "jaxlib", "flax", "grain", "apache-beam")

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
    """
    name: str
    target: str
    upstream: tuple[str, ...] = ()
    extra_sources: tuple[str, ...] = ()
    resumable: bool = False

    @property
    def module(self) -> str:
        return self.target.partition(":")[0]

    def load(self) -> Callable[[Any, dict, Path], dict]:
        module, _, function = self.target.partition(":")
        return getattr(importlib.import_module(module), function)


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
                raise ValueError(f"stage {stage.name!r}: target {stage.target!r} is not 'module:function'")
            self._stages[stage.name] = stage
        for stage in self._stages.values():
            for up in stage.upstream:
                if up not in self._stages:
                    raise ValueError(f"stage {stage.name!r}: unknown upstream {up!r}")
        self._order = self._toposort()

    def _toposort(self) -> list[str]:
        order: list[str] = []
        state: dict[str, str] = {}

        def visit(name: str, path: tuple[str, ...]) -> None:
            if state.get(name) == "done":
                return
            if state.get(name) == "visiting":
                raise ValueError(f"stage dependency cycle: {' -> '.join(path + (name,))}")
            state[name] = "visiting"
            for up in self._stages[name].upstream:
                visit(up, path + (name,))
            state[name] = "done"
            order.append(name)

        for name in self._stages:  # registration order breaks ties
            visit(name, ())
        return order

    def __getitem__(self, name: str) -> Stage:
        return self._stages[name]

    def __contains__(self, name: str) -> bool:
        return name in self._stages

    def __iter__(self) -> Iterator[Stage]:
        return (self._stages[name] for name in self._order)

    @property
    def names(self) -> list[str]:
        return list(self._order)

    def active(self, config) -> list[Stage]:
        """Registered stages whose config group is present, in dependency order."""
        return [stage for stage in self if stage.name in config]

    def upstream_closure(self, names: Iterable[str]) -> set[str]:
        """All transitive upstream stages of `names` (not including them)."""
        found: set[str] = set()
        todo = [up for name in names for up in self._stages[name].upstream]
        while todo:
            name = todo.pop()
            if name not in found:
                found.add(name)
                todo.extend(self._stages[name].upstream)
        return found


# The stage table (INTERFACES.md). Later stages (finetune, distill, probe, lit, evaluate) are added
# here by module path; each activates when a config has its group.
STAGES = Registry([
    Stage("prepare", "pipelines.prepare:run"),
    Stage("pretrain", "trainer.train:run", upstream=("prepare",), resumable=True),
])


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
        raise PlanError(f"--registry {spec!r} is a {type(registry).__name__}, not a launch.dag.Registry")
    return registry


# ---------------------------------------------------------------------------------------------
# Fingerprints

def canonical_config(cfg) -> dict:
    """The stage's resolved config as plain JSON data (FieldReferences resolved, tuples -> lists)."""
    try:
        return json.loads(cfg.to_json(sort_keys=True))
    except TypeError as e:
        raise PlanError(f"config is not JSON-serialisable, so it cannot be fingerprinted: {e}") from e


def _canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def package_versions() -> dict[str, str]:
    versions = {}
    for dist in VERSIONED_DISTRIBUTIONS:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "absent"
    return versions


def fingerprint_components(stage: Stage, cfg, upstream: Mapping[str, str], root: Path,
                           versions: Mapping[str, str]) -> dict:
    """Everything a stage's output depends on; stored as fingerprint.json to explain misses."""
    try:
        source_files = sources.source_hashes(root, stage.module, stage.extra_sources)
    except (FileNotFoundError, SyntaxError) as e:
        raise PlanError(f"stage {stage.name!r}: cannot hash its sources: {e}") from e
    return {
        "stage": stage.name,
        "target": stage.target,
        "config": canonical_config(cfg),
        "upstream": dict(sorted(upstream.items())),
        "sources": source_files,
        "versions": dict(versions),
    }


def fingerprint(components: Mapping[str, Any]) -> str:
    return hashlib.sha256(_canonical_json(components).encode()).hexdigest()


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        flat: dict[str, Any] = {}
        for key, value in data.items():
            flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: data}


def _describe_dict_change(label: str, old: Mapping, new: Mapping, *, show_values: bool,
                          limit: int = 3) -> str | None:
    keys = sorted(k for k in set(old) | set(new) if old.get(k, "<absent>") != new.get(k, "<absent>"))
    if not keys:
        return None
    parts = []
    for key in keys[:limit]:
        if key not in old:
            parts.append(f"+{key}")
        elif key not in new:
            parts.append(f"-{key}")
        elif show_values:
            parts.append(f"{key} {json.dumps(old[key])} -> {json.dumps(new[key])}")
        else:
            parts.append(key)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{label} changed: {', '.join(parts)}{more}"


def explain_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """Which fingerprint inputs differ between a previous run's components and the current ones."""
    reasons = []
    if old.get("target") != new.get("target"):
        reasons.append(f"function changed: {old.get('target')} -> {new.get('target')}")
    config = _describe_dict_change(
        "config", _flatten(old.get("config", {}), new["stage"]),
        _flatten(new["config"], new["stage"]), show_values=True)
    upstream = _describe_dict_change("upstream", old.get("upstream", {}), new["upstream"],
                                     show_values=False)
    source = _describe_dict_change("source", old.get("sources", {}), new["sources"],
                                   show_values=False)
    versions = _describe_dict_change("versions", old.get("versions", {}), new["versions"],
                                     show_values=True)
    reasons += [r for r in (config, upstream, source, versions) if r]
    return "; ".join(reasons) or "fingerprint format changed"


# ---------------------------------------------------------------------------------------------
# Cache layout

def stage_dir(workdir: Path, name: str, fp: str) -> Path:
    return Path(workdir) / name / fp[:16]


def is_complete(path: Path) -> bool:
    return (path / SUCCESS).is_file()


def load_output(name: str, fp: str, path: Path) -> StageOutput:
    outputs = json.loads((path / "outputs.json").read_text())
    return StageOutput(name=name, fingerprint=fp, path=path, outputs=outputs)


def _latest_completed_components(stage_root: Path) -> dict | None:
    """fingerprint.json of the most recently completed run of a stage, if any."""
    candidates = []
    for child in stage_root.glob("*/" + SUCCESS):
        record = child.parent / FINGERPRINT_FILE
        if record.is_file():
            candidates.append((child.stat().st_mtime, record))
    if not candidates:
        return None
    _, record = max(candidates, key=lambda item: item[0])
    return json.loads(record.read_text())["components"]


# ---------------------------------------------------------------------------------------------
# Planning

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


def _check_names(flag: str, names: Sequence[str], active: Sequence[str], registry: Registry) -> None:
    for name in names:
        if name not in registry:
            raise PlanError(f"{flag}: unknown stage {name!r} (registered: {', '.join(registry.names)})")
        if name not in active:
            raise PlanError(f"{flag}: stage {name!r} has no config group in this config "
                            f"(active stages: {', '.join(active) or 'none'})")


def plan(config, workdir: Path, registry: Registry = STAGES, *,
         only: Sequence[str] | None = None, force: Sequence[str] = ()) -> list[StagePlan]:
    """Fingerprints every active stage and decides run / reuse / skip for each.

    only: run just these stages (`--stages`); their upstream must already be in the cache.
    force: rerun these even on a cache hit (`--force`); downstream stages keep their fingerprint,
      so they stay cache hits.
    """
    workdir = Path(workdir)
    stages = registry.active(config)
    active = [stage.name for stage in stages]
    if not stages:
        raise PlanError(f"the config has no group for any registered stage "
                        f"(registered: {', '.join(registry.names)}; config keys: {', '.join(config)})")
    for stage in stages:
        if not isinstance(config[stage.name], ml_collections.ConfigDict):
            raise PlanError(f"config.{stage.name} must be a ConfigDict (the stage's config group), "
                            f"got {type(config[stage.name]).__name__}")
        missing = [up for up in stage.upstream if up not in active]
        if missing:
            raise PlanError(f"stage {stage.name!r} needs upstream {', '.join(missing)}, which has no "
                            f"config group; add config.{missing[0]}")
    _check_names("--stages", only or (), active, registry)
    _check_names("--force", force, active, registry)
    selected = set(only) if only else set(active)
    for name in force:
        if name not in selected:
            raise PlanError(f"--force {name}: not among --stages {','.join(only or ())}")
    needed = selected | registry.upstream_closure(selected)

    versions = package_versions()
    fingerprints: dict[str, str] = {}
    plans: list[StagePlan] = []
    missing: list[tuple[str, Path]] = []  # upstream of --stages that is not in the cache
    for stage in stages:
        components = fingerprint_components(
            stage, config[stage.name], {up: fingerprints[up] for up in stage.upstream},
            registry.root, versions)
        fp = fingerprints[stage.name] = fingerprint(components)
        path = stage_dir(workdir, stage.name, fp)
        complete = is_complete(path)
        if stage.name not in needed:
            action, reason = "skip", "not selected by --stages"
        elif stage.name in force:
            action, reason = "run", "forced" + ("; replaces the cached output" if complete else "")
        elif complete:
            action, reason = "reuse", "cache hit"
        elif stage.name in selected:
            previous = _latest_completed_components(workdir / stage.name)
            action = "run"
            reason = "no cached output" if previous is None else explain_change(previous, components)
        else:
            missing.append((stage.name, path))
            continue
        plans.append(StagePlan(stage, fp, components, path, action, reason,
                               forced=stage.name in force))
    if missing:
        names = [name for name, _ in missing]
        wanted = ",".join(name for name in active if name in selected)
        raise PlanError(
            f"--stages {wanted} needs upstream {', '.join(names)}, not in the cache (expected "
            f"{', '.join(str(path) for _, path in missing)}); run "
            f"{'it' if len(names) == 1 else 'them'} first, e.g. --stages {','.join(names + [wanted])}")
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


# ---------------------------------------------------------------------------------------------
# Execution

@contextlib.contextmanager
def _exclusive(lock_path: Path, on_wait: Callable[[], None]) -> Iterator[None]:
    """flock()-based mutual exclusion between processes producing the same stage output."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_debris(stage_root: Path, fp16: str) -> None:
    """Deletes temp/old dirs of `fp16` left by crashed runs (call only while holding the lock)."""
    for pattern in (f".tmp-{fp16}-*", f".old-{fp16}-*"):
        for debris in stage_root.glob(pattern):
            shutil.rmtree(debris, ignore_errors=True)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):  # numpy / jax scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _validate_result(name: str, result: Any, out: Path) -> dict:
    if not isinstance(result, dict):
        raise TypeError(f"stage {name!r} returned {type(result).__name__}, expected a dict "
                        "({'artifacts': {...}, 'metrics': {...}})")
    for artifact, rel in result.get("artifacts", {}).items():
        if Path(rel).is_absolute() or not (out / rel).exists():
            raise ValueError(f"stage {name!r}: artifact {artifact!r} -> {rel!r} must be a path "
                             "relative to the stage's out dir that exists")
    for metric, value in result.get("metrics", {}).items():
        number = value.item() if hasattr(value, "item") and callable(value.item) else value
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise TypeError(f"stage {name!r}: metric {metric!r} = {value!r} is not a number")
    return json.loads(json.dumps(result, default=_json_default))


def _write_framework_files(p: StagePlan, result: dict, out: Path) -> None:
    (out / "outputs.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    (out / "config.json").write_text(json.dumps(p.components["config"], indent=2, sort_keys=True) + "\n")
    (out / FINGERPRINT_FILE).write_text(json.dumps(
        {"fingerprint": p.fingerprint, "components": p.components}, indent=2, sort_keys=True) + "\n")
    metrics = {k: float(v) for k, v in result.get("metrics", {}).items()}
    # Stages that log per-step metrics write metrics.jsonl and tb/ themselves (INTERFACES.md).
    if not (out / "metrics.jsonl").exists():
        with open(out / "metrics.jsonl", "w") as f:
            if metrics:
                f.write(json.dumps({"step": 0, **metrics}, sort_keys=True) + "\n")
    if not (out / "tb").exists():
        _write_tensorboard(out / "tb", metrics)


def _write_tensorboard(logdir: Path, metrics: Mapping[str, float]) -> None:
    """The returned metrics as one TensorBoard step via CLU (imported here: it imports TensorFlow)."""
    from clu import metric_writers
    writer = metric_writers.create_default_writer(str(logdir), just_logging=False)
    if metrics:
        writer.write_scalars(0, dict(metrics))
    writer.close()


def _mark_success(out: Path) -> None:
    with open(out / SUCCESS, "w") as f:
        f.write(json.dumps({"completed_at": time.time(), "pid": os.getpid()}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _install(tmp: Path, final: Path) -> None:
    """Renames the finished temp dir into place; an existing (forced or incomplete) dir is swapped out."""
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


def _run_into(p: StagePlan, cfg, inputs: Mapping[str, StageOutput], out: Path) -> dict:
    # A copy, so a stage that mutates its config cannot change what was fingerprinted.
    return _validate_result(p.name, p.stage.load()(copy.deepcopy(cfg), dict(inputs), out), out)


def _commit(p: StagePlan, result: dict, tmp: Path) -> None:
    _write_framework_files(p, result, tmp)
    _mark_success(tmp)
    _install(tmp, p.path)


def jax_process() -> tuple[int, int]:
    """(index, count) of this process in a multi-controller JAX job; (0, 1) if JAX is unused.

    Read after the stage ran: the stage itself calls `jax.distributed.initialize()` on a
    multi-host slice. Never imports JAX.
    """
    jax = sys.modules.get("jax")
    if jax is None:
        return 0, 1
    return jax.process_index(), jax.process_count()


def produce(p: StagePlan, cfg, inputs: Mapping[str, StageOutput], *, log: Log = print,
            run_id: str | None = None) -> StageOutput:
    """Runs one stage into a sibling temp dir and renames it into place.

    Single process (run_id None): under the stage lock, in a private temp dir.
    Multi-host (run_id set, the same on every host of the job): every process runs the stage
    into the shared temp dir `.tmp-<fp16>-<run_id>` (collective checkpoints need one path), and
    only JAX process 0 writes the framework files and `_SUCCESS` and renames it into place. No
    lock: the hosts must run together, and flock() does not span machines anyway.
    """
    stage_root = p.path.parent
    fp16 = p.path.name
    stage_root.mkdir(parents=True, exist_ok=True)
    partial = stage_root / f".partial-{fp16}"
    if run_id is not None:
        if is_complete(p.path) and not p.forced:
            return load_output(p.name, p.fingerprint, p.path)
        tmp = partial if p.stage.resumable else stage_root / f".tmp-{fp16}-{run_id}"
        tmp.mkdir(exist_ok=True)
        result = _run_into(p, cfg, inputs, tmp)
        index, count = jax_process()
        if index == 0:
            _commit(p, result, tmp)
            return load_output(p.name, p.fingerprint, p.path)
        log(f"[{p.name}] process {index}/{count} done; process 0 commits {p.path}")
        return StageOutput(p.name, p.fingerprint, p.path, result)
    with _exclusive(stage_root / ".locks" / f"{fp16}.lock",
                    lambda: log(f"[{p.name}] waiting for another process producing {p.path}")):
        if is_complete(p.path) and not p.forced:
            log(f"[{p.name}] produced meanwhile by another process; reusing it")
            return load_output(p.name, p.fingerprint, p.path)
        _remove_debris(stage_root, fp16)
        if p.stage.resumable:
            if p.forced:
                shutil.rmtree(partial, ignore_errors=True)
            elif partial.exists():
                log(f"[{p.name}] resuming the unfinished run in {partial}")
            partial.mkdir(exist_ok=True)
            # Kept on failure: a preempted or killed run continues from its own checkpoints.
            _commit(p, _run_into(p, cfg, inputs, partial), partial)
            return load_output(p.name, p.fingerprint, p.path)
        tmp = stage_root / f".tmp-{fp16}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            _commit(p, _run_into(p, cfg, inputs, tmp), tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return load_output(p.name, p.fingerprint, p.path)


def execute(plans: Sequence[StagePlan], config, *, log: Log = print,
            run_id: str | None = None) -> dict[str, StageOutput]:
    """Runs the plan in order, printing one progress line per stage with its elapsed time."""
    outputs: dict[str, StageOutput] = {}
    todo = [p for p in plans if p.action != "skip"]
    for index, p in enumerate(todo, 1):
        prefix = f"[{index}/{len(todo)}] {p.name}"
        if p.action == "reuse":
            outputs[p.name] = load_output(p.name, p.fingerprint, p.path)
            log(f"{prefix}: cache hit -> {p.path}")
            continue
        log(f"{prefix}: running ({p.reason})")
        start = time.monotonic()
        inputs = {up: outputs[up] for up in p.stage.upstream}
        try:
            outputs[p.name] = produce(p, config[p.name], inputs, log=log, run_id=run_id)
        except BaseException:
            log(f"{prefix}: FAILED after {time.monotonic() - start:.1f}s")
            raise
        log(f"{prefix}: done in {time.monotonic() - start:.1f}s -> {p.path}")
    return outputs


def run_pipeline(config, workdir: Path, *, registry: Registry = STAGES,
                 only: Sequence[str] | None = None, force: Sequence[str] = (),
                 log: Log = print) -> dict[str, StageOutput]:
    """Plans and executes the DAG in this process; returns every non-skipped stage's output."""
    return execute(plan(config, workdir, registry, only=only, force=force), config, log=log)


def run_stage(name: str, config, workdir: Path, *, registry: Registry = STAGES,
              force: bool = False, expect_fingerprint: str | None = None,
              run_id: str | None = None, log: Log = print) -> StageOutput:
    """Runs (or reuses) one stage as its own process does; its upstream must be in the cache.

    expect_fingerprint: what the launcher planned. A mismatch (sources edited after launch, an
    override that did not reach this process, other package versions in the job's image) fails
    before any work is done.
    run_id: set by launchers on multi-host jobs (same on every host); see `produce`.
    """
    plans = plan(config, workdir, registry, only=[name], force=[name] if force else [])
    mine = next(p for p in plans if p.name == name)
    if expect_fingerprint and mine.fingerprint != expect_fingerprint:
        raise PlanError(f"stage {name!r}: fingerprint {mine.fingerprint[:16]} differs from the "
                        f"launcher's {expect_fingerprint[:16]}; its inputs changed since launch")
    return execute(plans, config, log=log, run_id=run_id)[name]
