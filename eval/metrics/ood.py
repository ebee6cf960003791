"""Accuracy in another label space through a label map (data/label_maps: the format and THE
function `target_scores`; nothing here re-implements them).

A map sends each target class (an ObjectNet class, one of ImageNet-R's 200, an ImageNet class for
a JFT-style model) to a set of the model's (source) classes; `membership` is its bool [S, T]
matrix (`LabelMap.membership(model class names)`). Two public conventions score a model there:

- restrict=True (default): score each target from its source classes (`reduce="max"`: the best
  logit, ObjectNet's and ImageNet-R/-A's convention; `"mean"`: the mean, model-vs-human's on
  probabilities) and predict the best target. With "max" this equals taking the argmax over the
  union of the mapped source classes and reporting the target that contains it.
- restrict=False: the argmax over *all* the model's classes; correct only if that class belongs to
  one of the example's targets (a prediction outside the map counts as wrong).

Examples none of whose labels is a target of the map are left out (`scored` is False): ImageNet-R
and -A keep 200 of ImageNet's 1000 classes, and only the overlap of ObjectNet with ImageNet counts.
"""
from __future__ import annotations

import numpy as np

from data import label_maps


def target_truth(labels: np.ndarray, to_targets: np.ndarray) -> np.ndarray:
    """bool [N, T]: the targets of each example, from its multi-hot labels [N, K] in the split's
    classes and the split-class -> target matrix [K, T] (identity-like when the split is labelled in
    the target space, the map's membership when it is labelled in the model's own classes)."""
    return (np.asarray(labels, np.float32) @ np.asarray(to_targets, np.float32)) > 0


def label_map_correct(scores: np.ndarray, truth: np.ndarray, membership: np.ndarray, *,
                      reduce: str = "max", restrict: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(correct bool [N], scored bool [N]) of source-space scores [N, S] against target truth
    [N, T] under `membership` [S, T]; the module docstring defines the two conventions."""
    truth = np.asarray(truth, bool)
    membership = np.asarray(membership, bool)
    scored = truth.any(axis=1)
    if restrict:
        predicted = np.argmax(np.asarray(label_maps.target_scores(scores, membership, reduce)), axis=1)
        correct = truth[np.arange(len(truth)), predicted]
    else:
        best = np.argmax(np.asarray(scores), axis=1)  # [N] source class
        correct = (membership[best] & truth).any(axis=1)
    return correct & scored, scored


def label_map_accuracy(scores: np.ndarray, truth: np.ndarray, membership: np.ndarray, *,
                       reduce: str = "max", restrict: bool = True) -> float:
    """Mean of `label_map_correct` over the scored examples."""
    correct, scored = label_map_correct(scores, truth, membership, reduce=reduce, restrict=restrict)
    if not scored.any():
        raise ValueError("label map accuracy: no example's label is a target of the map")
    return float(correct[scored].mean())


def crop_border(images, pixels: int):
    """Cuts `pixels` from every side of [B, H, W, C] images and resizes them back to H x W
    (bilinear): ObjectNet's images carry a 1-px red border, its evaluations crop 2 px. JAX, so it
    runs inside the jitted predict function."""
    import jax
    if pixels <= 0:
        return images
    b, h, w, c = images.shape
    if 2 * pixels >= min(h, w):
        raise ValueError(f"border crop of {pixels} px leaves nothing of {h}x{w} images")
    inner = images[:, pixels:h - pixels, pixels:w - pixels, :]
    return jax.image.resize(inner, (b, h, w, c), method="bilinear", antialias=False)
