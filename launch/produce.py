"""Producing one stage's output into the cache: lock, run into a temp dir, `_SUCCESS`, rename.

Concurrent runs of one stage serialise on the lock (launch/cache.py has the layout); the loser of
the race finds `_SUCCESS` after the lock is released and reuses the winner's output.

A bucket workdir (`--workdir gs://...`): the stage runs into a local staging dir
(`$VIT22B_STAGING_DIR`, default under the system temp dir), which is then copied into
`<workdir>/<stage>/<fp16>/` with `_SUCCESS` copied last (data/paths.install_dir: object stores
have no directory rename). The lock and a resumable stage's `.partial-<fp16>/` live in the staging
dir, so they serialise runs and resume only on this machine; multi-host runs need a workdir every
host mounts (e.g. a gcsfuse `/gcs/BUCKET/...`), since the hosts write one checkpoint together.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import shutil
import hashlib
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from data import paths
from launch import recipe
from launch.cache import FINGERPRINT_FILE, SUCCESS, is_complete, load_output
from launch.stage_types import Log, StageOutput, StagePlan


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
        raise TypeError(
            f"stage {name!r} returned {type(result).__name__}, expected a dict "
            "({'artifacts': {...}, 'metrics': {...}})"
        )
    for artifact, rel in result.get("artifacts", {}).items():
        if Path(rel).is_absolute() or not (out / rel).exists():
            raise ValueError(
                f"stage {name!r}: artifact {artifact!r} -> {rel!r} must be a path "
                "relative to the stage's out dir that exists"
            )
    for metric, value in result.get("metrics", {}).items():
        number = value.item() if hasattr(value, "item") and callable(value.item) else value
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise TypeError(f"stage {name!r}: metric {metric!r} = {value!r} is not a number")
    return json.loads(json.dumps(result, default=_json_default))


def _write_framework_files(p: StagePlan, result: dict, out: Path, cfg) -> None:
    (out / "outputs.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    # The whole group as run, `runtime` included (the fingerprint leaves that out).
    (out / "config.json").write_text(
        json.dumps(json.loads(cfg.to_json(sort_keys=True)), indent=2, sort_keys=True) + "\n"
    )
    (out / FINGERPRINT_FILE).write_text(
        json.dumps(
            {"fingerprint": p.fingerprint, "components": p.components}, indent=2, sort_keys=True
        )
        + "\n"
    )
    metrics = {k: float(v) for k, v in result.get("metrics", {}).items()}
    # Stages that log per-step metrics write metrics.jsonl and tb/ themselves (INTERFACES.md).
    if not (out / "metrics.jsonl").exists():
        with open(out / "metrics.jsonl", "w") as f:
            if metrics:
                f.write(json.dumps({"step": 0, **metrics}, sort_keys=True) + "\n")
    if not (out / "tb").exists():
        _write_tensorboard(out / "tb", metrics)


def _write_tensorboard(logdir: Path, metrics: Mapping[str, float]) -> None:
    """The returned metrics as one TensorBoard step via CLU (imported here: it imports
    TensorFlow)."""
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


STAGING_ENV = "VIT22B_STAGING_DIR"


def _local_stage_root(p: StagePlan) -> Path:
    """Where the temp/partial dirs and the lock of `p` live: beside its output dir when that is
    local (so the rename is atomic), else in a local staging dir keyed by the output's URI."""
    if not paths.is_remote(p.path):
        return p.path.parent
    base = Path(os.environ.get(STAGING_ENV) or Path(tempfile.gettempdir()) / "vit22b-staging")
    return base / hashlib.sha256(str(p.path.parent).encode()).hexdigest()[:16]


def _run_into(p: StagePlan, cfg, inputs: Mapping[str, StageOutput], out: Path, card: dict) -> dict:
    # A copy, so a stage that mutates its config cannot change what was fingerprinted.
    result = _validate_result(p.name, p.stage.load()(copy.deepcopy(cfg), dict(inputs), out), out)
    result["recipe"] = card  # every hyperparameter with its source (launch/recipe.py)
    return result


def _commit(p: StagePlan, result: dict, tmp: Path, cfg) -> StageOutput:
    _write_framework_files(p, result, tmp, cfg)
    _mark_success(tmp)
    # Local: rename (an existing forced/incomplete dir is swapped out). Bucket: copy, _SUCCESS last.
    paths.install_dir(tmp, p.path, last=(SUCCESS,))
    # Equal to load_output's, key order included: outputs.json is written with sorted keys.
    return StageOutput(
        p.name, p.fingerprint, p.path, json.loads(json.dumps(result, sort_keys=True))
    )


def jax_process() -> tuple[int, int]:
    """(index, count) of this process in a multi-controller JAX job; (0, 1) if JAX is unused.

    Read after the stage ran: the stage itself calls `jax.distributed.initialize()` on a
    multi-host slice. Never imports JAX.
    """
    jax = sys.modules.get("jax")
    if jax is None:
        return 0, 1
    return jax.process_index(), jax.process_count()


def produce(
    p: StagePlan,
    cfg,
    inputs: Mapping[str, StageOutput],
    *,
    log: Log = print,
    run_id: str | None = None,
    card: dict | None = None,
) -> StageOutput:
    """Runs one stage into a sibling temp dir and renames it into place.

    Single process (run_id None): under the stage lock, in a private temp dir.
    Multi-host (run_id set, the same on every host of the job): every process runs the stage
    into the shared temp dir `.tmp-<fp16>-<run_id>` (collective checkpoints need one path), and
    only JAX process 0 writes the framework files and `_SUCCESS` and renames it into place. No
    lock: the hosts must run together, and flock() does not span machines anyway.
    """
    if card is None:  # called without the pipeline config: the card knows no marks
        card = recipe.card(cfg, {}, recipe.stage_defaults(p.stage))
    stage_root = _local_stage_root(p)
    fp16 = p.path.name
    stage_root.mkdir(parents=True, exist_ok=True)
    partial = stage_root / f".partial-{fp16}"
    if run_id is not None and paths.is_remote(p.path):
        raise ValueError(
            f"[{p.name}] multi-host runs need a workdir every host mounts (e.g. a "
            f"gcsfuse /gcs/BUCKET/... path), not the URI {p.path.parent}: the hosts "
            "write one checkpoint into one shared directory"
        )
    if run_id is not None:
        if is_complete(p.path) and not p.forced:
            return load_output(p.name, p.fingerprint, p.path)
        tmp = partial if p.stage.resumable else stage_root / f".tmp-{fp16}-{run_id}"
        tmp.mkdir(exist_ok=True)
        result = _run_into(p, cfg, inputs, tmp, card)
        index, count = jax_process()
        if index == 0:
            return _commit(p, result, tmp, cfg)
        log(f"[{p.name}] process {index}/{count} done; process 0 commits {p.path}")
        return StageOutput(p.name, p.fingerprint, p.path, result)
    with _exclusive(
        stage_root / ".locks" / f"{fp16}.lock",
        lambda: log(f"[{p.name}] waiting for another process producing {p.path}"),
    ):
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
            return _commit(p, _run_into(p, cfg, inputs, partial, card), partial, cfg)
        tmp = stage_root / f".tmp-{fp16}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            return _commit(p, _run_into(p, cfg, inputs, tmp, card), tmp, cfg)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def execute(
    plans: Sequence[StagePlan], config, *, log: Log = print, run_id: str | None = None
) -> dict[str, StageOutput]:
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
            outputs[p.name] = produce(
                p,
                p.stage.group(config),
                inputs,
                log=log,
                run_id=run_id,
                card=recipe.for_stage(config, p.stage),
            )
        except BaseException:
            log(f"{prefix}: FAILED after {time.monotonic() - start:.1f}s")
            raise
        log(f"{prefix}: done in {time.monotonic() - start:.1f}s -> {p.path}")
    return outputs
