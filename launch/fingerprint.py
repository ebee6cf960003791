"""Stage fingerprints: everything a stage's output depends on, hashed; and why a fingerprint
changed.

A fingerprint covers the stage's name and target, its resolved config minus `runtime`, its upstream
fingerprints, the hashes of its sources (static import closure, launch/code_hashes.py) and
VERSIONED_DISTRIBUTIONS.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import Any, Mapping

from launch import code_hashes
from launch.stage_types import PlanError, Stage

# Distributions whose version is part of every fingerprint (a new jax may change numerics).
VERSIONED_DISTRIBUTIONS = ("jax", "jaxlib", "flax", "grain", "apache-beam")


# A stage group's subgroup of settings that cannot change its results (progress bars, log cadence,
# decode threads, checkpoint retention, distributed addresses): left out of the fingerprint, so
# changing one is a cache hit (docs/DESIGN.md §2.5; tests/test_dag_runtime.py: outputs identical).
RUNTIME = "runtime"


def canonical_config(cfg) -> dict:
    """The stage's resolved config as plain JSON data (FieldReferences resolved, tuples -> lists),
    without its `runtime` subgroup."""
    try:
        data = json.loads(cfg.to_json(sort_keys=True))
    except TypeError as e:
        raise PlanError(
            f"config is not JSON-serialisable, so it cannot be fingerprinted: {e}"
        ) from e
    data.pop(RUNTIME, None)
    return data


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


def fingerprint_components(
    stage: Stage, cfg, upstream: Mapping[str, str], root: Path, versions: Mapping[str, str]
) -> dict:
    """Everything a stage's output depends on; stored as fingerprint.json to explain misses."""
    try:
        source_files = code_hashes.source_hashes(root, stage.module, stage.extra_sources)
    except (FileNotFoundError, SyntaxError) as e:
        raise PlanError(f"stage {stage.name!r}: cannot hash its sources: {e}") from e
    return {
        "stage": stage.name,
        "target": stage.target,
        "config": canonical_config(cfg),
        "upstream": dict(sorted(upstream.items())),
        "sources": source_files,
        "versions": dict(versions),
        **({"files": files} if (files := file_inputs(stage, cfg)) else {}),
    }


def file_inputs(stage: Stage, cfg) -> dict:
    """Checkpoint files the stage reads from outside the DAG (a fine-tune's `init_from`, a distill
    `teacher`, an `init_params` naming a timm / big_vision file), each as (path, bytes, mtime_ns):
    replacing the file reruns the stage. Size + mtime, not a hash: hashing a multi-GB checkpoint at
    every plan would cost more than the plan."""
    from trainer.interop import weights_import  # NumPy only

    found = {}
    for key in (*stage.upstream_from, "init_params"):
        value = cfg.get(key) if key in cfg else None
        if isinstance(value, str) and value and weights_import.is_foreign(value):
            path = weights_import.checkpoint_file(value)
            st = path.stat() if path.is_file() else None
            found[key] = {
                "path": str(path.resolve()),
                "bytes": st.st_size if st else None,
                "mtime_ns": st.st_mtime_ns if st else None,
            }
    return found


def fingerprint(components: Mapping[str, Any]) -> str:
    return hashlib.sha256(_canonical_json(components).encode()).hexdigest()


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        flat: dict[str, Any] = {}
        for key, value in data.items():
            flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: data}


def _describe_dict_change(
    label: str, old: Mapping, new: Mapping, *, show_values: bool, limit: int = 3
) -> str | None:
    keys = sorted(
        k for k in set(old) | set(new) if old.get(k, "<absent>") != new.get(k, "<absent>")
    )
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
        "config",
        _flatten(old.get("config", {}), new["stage"]),
        _flatten(new["config"], new["stage"]),
        show_values=True,
    )
    upstream = _describe_dict_change(
        "upstream", old.get("upstream", {}), new["upstream"], show_values=False
    )
    source = _describe_dict_change(
        "source", old.get("sources", {}), new["sources"], show_values=False
    )
    versions = _describe_dict_change(
        "versions", old.get("versions", {}), new["versions"], show_values=True
    )
    reasons += [r for r in (config, upstream, source, versions) if r]
    return "; ".join(reasons) or "fingerprint format changed"
