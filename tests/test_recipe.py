"""The recipe card (launch/recipe.py): marks in the config, sources inferred, the card in every
stage's outputs.json (launch/produce.py), and the shipped configs' marks all name real values."""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections
import pytest

from launch import dag, recipe
from launch.configs import common

REPO = Path(__file__).resolve().parents[1]


def default_config() -> ml_collections.ConfigDict:
    """The toy stage's defaults (what the card calls "default")."""
    return ml_collections.ConfigDict(
        {
            "lr": 0.1,
            "steps": 10,
            "batch": 4,
            "seed": 0,
            "optim": {"wd": 0.0},
            "runtime": {"log_every": 1},
        }
    )


def run_toy(cfg, inputs, out):
    (out / "metrics.jsonl").write_text("")
    (out / "tb").mkdir()  # so the framework writes no TensorBoard file (no TensorFlow import)
    return {"metrics": {"lr": cfg.lr}}


def test_every_stage_outputs_json_carries_its_recipe_card(tmp_path):
    registry = dag.Registry([dag.Stage("toy", "test_recipe:run_toy")], root=REPO / "tests")
    toy = default_config()
    toy.lr, toy.steps, toy.batch = 1e-3, 20, 8
    marks = {
        "toy.lr": recipe.mark("paper", False, "as we recall it"),
        "toy.steps": recipe.mark("reference", True),
    }
    config = common.build({"toy": toy}, ml_collections.ConfigDict(), None, marks)
    config.toy.steps = 30  # a command-line override of a marked value
    out = dag.run_pipeline(config, tmp_path / "work", registry=registry, log=lambda *_: None)["toy"]
    card = json.loads((out.path / "outputs.json").read_text())["recipe"]
    assert card == out.outputs["recipe"]
    assert card["lr"] == {
        "value": 1e-3,
        "source": "paper",
        "confirmed": False,
        "note": "as we recall it",
    }
    assert card["steps"] == {
        "value": 30,
        "source": "user",
        "confirmed": True,
        "note": "overrides the reference value 20",
    }
    assert card["batch"] == {"value": 8, "source": "user", "confirmed": True}
    assert card["seed"] == {"value": 0, "source": "default", "confirmed": False}
    assert card["optim.wd"] == {"value": 0.0, "source": "default", "confirmed": False}
    assert not any(key.startswith("runtime") for key in card)


def test_marks_name_real_values_and_wildcards_cover_every_run():
    runs = ml_collections.ConfigDict({"runs": {"a": {"lr": 1.0}, "b": {"lr": 2.0}}})
    config = common.build(
        {"ft": runs},
        ml_collections.ConfigDict(),
        None,
        {"ft.runs.*.lr": recipe.mark("reference", False, "big_vision")},
    )
    marks = json.loads(config.recipe)
    assert {k: v["value"] for k, v in marks.items()} == {"ft.runs.a.lr": 1.0, "ft.runs.b.lr": 2.0}
    with pytest.raises(ValueError, match=r"RECIPE\['ft.runs.\*.lrr'\]: no such config value"):
        common.build(
            {"ft": runs},
            ml_collections.ConfigDict(),
            None,
            {"ft.runs.*.lrr": recipe.mark("paper", True)},
        )
    with pytest.raises(ValueError, match="must be 'paper', 'reference' or 'user'"):
        recipe.mark("default", True)


@pytest.mark.parametrize("name", ["tiny", "vit22b"])
def test_shipped_configs_build_with_their_marks(name):
    import importlib

    module = importlib.import_module(f"launch.configs.{name}")
    marks = json.loads(module.get_config().recipe)
    assert marks and all(m["source"] in recipe.SOURCES for m in marks.values())
