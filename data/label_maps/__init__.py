"""Label maps: score a model in one label space on data labelled in another (docs/DESIGN.md §7).

A map is a JSON file `{target_class: [source_class, ...]}` — e.g. ImageNet -> ObjectNet (113
targets), JFT-style pretraining classes -> ImageNet, ImageNet -> the 16 model-vs-human categories.
Source classes are class *names* (strings, matched against the model's `class_names`) or class
*indices* (ints, as in model-vs-human's `human_categories.py`). Shipped maps live next to this
file (`load("digits_pairs")`); any other path works too (`load("/data/maps/objectnet.json")`).

`target_scores` is THE function that turns source-space scores into target-space scores: the
max (default; the ObjectNet convention for logits) or the mean (model-vs-human's convention for
probabilities) over each target's source classes. The `label_map` evaluator and the evaluate
stage both call it.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import jax.numpy as jnp
import numpy as np

HERE = Path(__file__).resolve().parent
REDUCTIONS = ("max", "mean")


@dataclasses.dataclass(frozen=True)
class LabelMap:
    name: str  # where it came from, for error messages
    targets: tuple[str, ...]
    sources: tuple[tuple[str | int, ...], ...]  # per target, its source classes

    def membership(self, source_classes: Sequence[str]) -> np.ndarray:
        """bool [S, T]: source class s belongs to target t. Unknown classes: one-line ValueError."""
        index = {name: i for i, name in enumerate(source_classes)}
        matrix = np.zeros((len(source_classes), len(self.targets)), bool)
        for t, (target, members) in enumerate(zip(self.targets, self.sources)):
            for member in members:
                if isinstance(member, int):
                    if not 0 <= member < len(source_classes):
                        raise ValueError(f"label map {self.name}: target {target!r}: source index {member} is "
                                         f"outside the model's {len(source_classes)} classes")
                    matrix[member, t] = True
                elif member in index:
                    matrix[index[member], t] = True
                else:
                    raise ValueError(f"label map {self.name}: target {target!r}: source class {member!r} is not "
                                     f"one of the model's classes ({', '.join(source_classes[:12])}"
                                     f"{', ...' if len(source_classes) > 12 else ''})")
        return matrix

    def target_index(self, names: Sequence[str]) -> np.ndarray:
        """int [len(names)]: each name's target index (for data labelled in the target space)."""
        index = {t: i for i, t in enumerate(self.targets)}
        missing = [n for n in names if n not in index]
        if missing:
            raise ValueError(f"label map {self.name}: class {missing[0]!r} of the data is not a target of the map")
        return np.array([index[n] for n in names], np.int32)


def path_of(name_or_path: str) -> Path:
    """A shipped map's name (`digits_pairs`) or a JSON file path."""
    path = Path(name_or_path)
    if path.suffix != ".json":
        path = HERE / f"{name_or_path}.json"
    return path


def load(name_or_path: str) -> LabelMap:
    """Reads and checks a map file; every problem is one line naming the file."""
    path = path_of(name_or_path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"label map {path}: cannot read ({e})") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"label map {path}: must be a non-empty JSON object {{target: [source, ...]}}")
    targets, sources = [], []
    for target, members in data.items():
        if not isinstance(members, list) or not members or not all(
                isinstance(m, (str, int)) and not isinstance(m, bool) for m in members):
            raise ValueError(f"label map {path}: target {target!r} must map to a non-empty list of class "
                             "names or indices")
        targets.append(target)
        sources.append(tuple(members))
    return LabelMap(str(path), tuple(targets), tuple(sources))


def target_scores(scores, membership, reduce: str = "max"):
    """[..., S] source-space scores -> [..., T] target-space scores (NumPy or JAX arrays).

    max: the best score among each target's source classes (ObjectNet's convention, on logits).
    mean: their mean (model-vs-human's decision rule, on softmax probabilities).
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"label map reduce={reduce!r} is not one of {REDUCTIONS}")
    m = jnp.asarray(membership)
    scores = jnp.asarray(scores, jnp.float32)
    if reduce == "mean":
        return (scores @ m.astype(jnp.float32)) / jnp.sum(m, axis=0).astype(jnp.float32)
    return jnp.max(jnp.where(m, scores[..., :, None], -jnp.inf), axis=-2)
