"""The recipe card: every hyperparameter of a stage, its value, where it comes from, and whether
that is confirmed. Written into each stage's outputs.json (`"recipe"`) by launch/produce.py and
shown by the evaluate report (eval/report.py).

A config file marks its values in ONE place, a `RECIPE` dict handed to `common.build`:

    RECIPE = {
        "pretrain.model.variant": recipe.mark("paper", True, "ViT-22B/14, Table 1"),
        "pretrain.batch_size": recipe.mark(
            "paper", False, "65,536 as we recall it; not found in the text"
        ),
        "finetune.runs.*.optim.lr": recipe.mark(
            "reference", False, "big_vision's ImageNet transfer recipe"
        ),
    }

Keys are config paths (`*` stands for one path segment, e.g. every run of an instanced stage);
a key naming no config value is an error when the config is built. Sources:

    paper      the ViT-22B paper (or the paper a value is quoted from)
    reference  a public reference implementation's value (e.g. a big_vision config default)
    default    the stage module's `default_config()` value, unmarked
    user       anything else: set by the config file (a mark can note an assumption, confirmed
               False), or a command-line override (a marked value overridden becomes "user")

`confirmed`: for paper / reference, whether the value was checked at the source (values
docs/DESIGN.md §4 lists as unconfirmed are marked False); a user value is what was asked for
(True); a default is our code's choice (False). The `runtime` subgroup (cannot change results)
is left out.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
from typing import Any, Mapping

import ml_collections

SOURCES = ("paper", "reference", "default", "user")
RUNTIME = "runtime"


def mark(source: str, confirmed: bool, note: str = "") -> dict:
    """A config file's mark for one value (module docstring)."""
    if source not in ("paper", "reference", "user"):
        raise ValueError(
            f"recipe mark source {source!r} must be 'paper', 'reference' or 'user' (an assumption "
            "the config makes; unmarked values are inferred as default / user)"
        )
    return {"source": source, "confirmed": bool(confirmed), "note": note}


def _plain(value: Any) -> Any:
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    return json.loads(json.dumps(value, default=str))


def flatten(group: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: JSON value} of every leaf of a config group, `runtime` left out."""
    plain = _plain(group) if prefix == "" else group
    out = {}
    for key, value in plain.items():
        if prefix == "" and key == RUNTIME:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def attach(config: ml_collections.ConfigDict, marks: Mapping[str, dict]) -> None:
    """Stores the marks, each with the value it marks, as `config.recipe` (before the lock)."""
    flat = flatten(config)
    recipe: dict[str, dict] = {}
    for pattern, m in marks.items():
        if not isinstance(m, dict) or m.get("source") not in ("paper", "reference", "user"):
            raise ValueError(f"RECIPE[{pattern!r}]: must be recipe.mark(...)")
        group = pattern.split(".", 1)[0]
        if group not in config:
            continue  # the config arg left that stage out
        hits = [
            key
            for key in flat
            if fnmatch.fnmatchcase(key, pattern) and len(key.split(".")) == len(pattern.split("."))
        ]
        if not hits:
            raise ValueError(f"RECIPE[{pattern!r}]: no such config value")
        for key in hits:
            recipe[key] = dict(m, value=flat[key])
    # A flat JSON text: config paths contain dots, which ConfigDict keys cannot.
    config.recipe = json.dumps(recipe, sort_keys=True)


def stage_defaults(stage) -> dict[str, Any]:
    """The flattened `default_config()` of the module that runs `stage` ({} if it has none)."""
    module = importlib.import_module(stage.target.partition(":")[0])
    default_config = getattr(module, "default_config", None)
    return flatten(default_config()) if default_config else {}


def card(group: Any, marks: Mapping[str, dict], defaults: Mapping[str, Any]) -> dict[str, dict]:
    """{key: {value, source, confirmed[, note]}} for every value of `group` (keys relative to
    it)."""
    out = {}
    for key, value in sorted(flatten(group).items()):
        m = marks.get(key)
        if m is not None and m["value"] == value:
            entry = {"value": value, "source": m["source"], "confirmed": m["confirmed"]}
            if m.get("note"):
                entry["note"] = m["note"]
        elif m is not None:
            entry = {
                "value": value,
                "source": "user",
                "confirmed": True,
                "note": f"overrides the {m['source']} value {json.dumps(m['value'])}",
            }
        elif key in defaults and defaults[key] == value:
            entry = {"value": value, "source": "default", "confirmed": False}
        else:
            entry = {"value": value, "source": "user", "confirmed": True}
        out[key] = entry
    return out


def for_stage(config: ml_collections.ConfigDict, stage) -> dict[str, dict]:
    """The recipe card of `stage` (a launch.stage_types.Stage) in the pipeline `config`."""
    path = stage.config_path + "."
    text = config.get("recipe") if "recipe" in config else None
    marks = {k[len(path) :]: v for k, v in json.loads(text or "{}").items() if k.startswith(path)}
    return card(stage.group(config), marks, stage_defaults(stage))


def counts(recipe: Mapping[str, dict]) -> dict[str, int]:
    """How many values of a card come from each source (the report's summary line)."""
    return {s: sum(1 for e in recipe.values() if e["source"] == s) for s in SOURCES}
