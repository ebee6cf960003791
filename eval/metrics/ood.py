"""Accuracy in another label space through a label map. The implementation is data/label_maps
(the map format, `target_scores`, `target_truth` and THE per-example `correct`, which the
in-training `label_map` evaluator runs on the device too); this module names them for the evaluate
stage and reduces them to a number.

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
from data.label_maps import correct as label_map_correct  # noqa: F401  (THE implementation)
from data.label_maps import target_truth  # noqa: F401


def label_map_accuracy(
    scores: np.ndarray,
    truth: np.ndarray,
    membership: np.ndarray,
    *,
    reduce: str = "max",
    restrict: bool = True,
) -> float:
    """Mean of `label_map_correct` (data.label_maps.correct) over the scored examples."""
    correct, scored = map(
        np.asarray, label_maps.correct(scores, truth, membership, reduce, restrict)
    )
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
    inner = images[:, pixels : h - pixels, pixels : w - pixels, :]
    return jax.image.resize(inner, (b, h, w, c), method="bilinear", antialias=False)
