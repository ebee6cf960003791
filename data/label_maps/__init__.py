"""Label maps: score a model in one label space on data labelled in another (docs/DESIGN.md §7).

A map is a JSON file `{target_class: [source_class, ...]}` — e.g. ImageNet -> ObjectNet (113
targets), JFT-style pretraining classes -> ImageNet, ImageNet -> the 16 model-vs-human categories.
Source classes are class *names* (strings, matched against the model's `class_names`) or class
*indices* (ints, as in model-vs-human's `human_categories.py`). Shipped maps live next to this
file (`load("digits_pairs")`); any other path works too (`load("/data/maps/objectnet.json")`).

`target_scores` is THE function that turns source-space scores into target-space scores: the
max (default; the ObjectNet convention for logits) or the mean (model-vs-human's convention for
probabilities) over each target's source classes. `correct` is THE label-map accuracy (per
example, on top of `target_scores`), jittable: the in-training `label_map` evaluator calls it per
batch on the device, the evaluate stage's `ood` evaluator (eval/metrics/ood.py) on the host.
A split's labels live in the map's target space by default (`labels="target"`: ObjectNet,
ImageNet-R/-A, cue-conflict) or in the model's own classes (`labels="source"`, e.g. digits scored
as digit pairs); `LabelMap.to_targets` turns either into the split-class -> target matrix.
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
LABEL_SPACES = ("target", "source")  # where a split's labels live; "target" is the one default


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
                        raise ValueError(
                            f"label map {self.name}: target {target!r}: source index {member} is "
                            f"outside the model's {len(source_classes)} classes"
                        )
                    matrix[member, t] = True
                elif member in index:
                    matrix[index[member], t] = True
                else:
                    raise ValueError(
                        f"label map {self.name}: target {target!r}: source class {member!r} is not "
                        f"one of the model's classes ({', '.join(source_classes[:12])}"
                        f"{', ...' if len(source_classes) > 12 else ''})"
                    )
        return matrix

    def target_index(self, names: Sequence[str]) -> np.ndarray:
        """int [len(names)]: each name's target index (for data labelled in the target space)."""
        index = {t: i for i, t in enumerate(self.targets)}
        missing = [n for n in names if n not in index]
        if missing:
            raise ValueError(
                f"label map {self.name}: class {missing[0]!r} of the data is not a target "
                "of the map"
            )
        return np.array([index[n] for n in names], np.int32)

    def to_targets(
        self,
        membership: np.ndarray,
        split_classes: Sequence[str],
        labels: str = "target",
        where: str = "label map",
    ) -> np.ndarray:
        """bool [K, T]: which targets each of a split's K classes means. labels="target": the
        split is labelled in the map's target space (its class names are targets); "source": in
        the model's own classes (`membership` [S, T], so K must be S)."""
        if labels not in LABEL_SPACES:
            raise ValueError(f"{where}: labels={labels!r} is not one of {LABEL_SPACES}")
        if labels == "source":
            model, split = membership.shape[0], len(split_classes)
            if split != model:
                raise ValueError(
                    f"{where}: labels='source' needs the split labelled in the "
                    f"model's {model} classes, it has {split}"
                )
            return np.asarray(membership, bool)
        return np.eye(len(self.targets), dtype=bool)[self.target_index(split_classes)]


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
        raise ValueError(
            f"label map {path}: must be a non-empty JSON object {{target: [source, ...]}}"
        )
    targets, sources = [], []
    for target, members in data.items():
        if (
            not isinstance(members, list)
            or not members
            or not all(isinstance(m, (str, int)) and not isinstance(m, bool) for m in members)
        ):
            raise ValueError(
                f"label map {path}: target {target!r} must map to a non-empty list of class "
                "names or indices"
            )
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


def target_truth(labels, to_targets):
    """bool [N, T]: the targets of each example, from its multi-hot labels [N, K] in the split's
    classes and the split-class -> target matrix [K, T] (`LabelMap.to_targets`). NumPy or JAX."""
    return (jnp.asarray(labels, jnp.float32) @ jnp.asarray(to_targets, jnp.float32)) > 0


def correct(scores, truth, membership, reduce: str = "max", restrict: bool = True):
    """THE label-map accuracy, per example: (correct bool [N], scored bool [N]) of source-space
    scores [N, S] against target truth [N, T] (`target_truth`) under `membership` [S, T]. NumPy or
    JAX arrays in, JAX arrays out; jittable.

    restrict=True (default): the best target by `target_scores` (`reduce`), correct if it is one of
    the example's targets. restrict=False: the argmax over all the model's classes, correct only if
    that class belongs to one of the example's targets (outside the map counts as wrong).
    An example none of whose labels is a target is not scored (and not correct).
    """
    truth = jnp.asarray(truth, bool)
    membership = jnp.asarray(membership, bool)
    scored = jnp.any(truth, axis=-1)
    if restrict:
        best = jnp.argmax(target_scores(scores, membership, reduce), axis=-1)
        hit = jnp.take_along_axis(truth, best[..., None], axis=-1)[..., 0]
    else:
        best = jnp.argmax(jnp.asarray(scores), axis=-1)  # a source class
        hit = jnp.any(membership[best] & truth, axis=-1)
    return hit & scored, scored
