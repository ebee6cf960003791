"""Top-k accuracy, multi-label "any correct" and ImageNet-ReaL accuracy.

Scores are [N, C] (logits or probabilities: only their order matters); labels are either class ids
[N] (-1 = no label) or a multi-hot [N, C] (several correct classes per example). Ties between
scores go to the lower class index (as `np.argmax` does), so results are deterministic.
"""

from __future__ import annotations

import numpy as np


def multi_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """bool [N, C] from class ids [N] (-1 = none) or a multi-hot [N, C]."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        if labels.shape[1] != num_classes:
            raise ValueError(f"labels have {labels.shape[1]} classes, the scores {num_classes}")
        return labels > 0
    out = np.zeros((len(labels), num_classes), bool)
    rows = np.flatnonzero(labels >= 0)
    if np.any(labels[rows] >= num_classes):
        raise ValueError(f"a label id is >= the {num_classes} classes of the scores")
    out[rows, labels[rows]] = True
    return out


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """int [N, k]: the k highest-scoring classes of each row, best first (ties: lower index
    first)."""
    scores = np.asarray(scores)
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def topk_correct(scores: np.ndarray, labels: np.ndarray, k: int = 1) -> np.ndarray:
    """bool [N]: at least one of the k highest-scoring classes is a label of the example.

    With one label per example this is plain top-k; with several (multi-label data, ReaL sets)
    it is "any correct": the prediction counts when it hits any of the example's labels.
    """
    scores = np.asarray(scores)
    truth = multi_hot(labels, scores.shape[1])
    return np.take_along_axis(truth, top_k(scores, k), axis=1).any(axis=1)


def accuracy(scores: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Top-k accuracy = mean over labelled examples of `topk_correct`; an example without any label
    counts nowhere (a split that is partly unlabelled is scored on its labelled part)."""
    truth = multi_hot(labels, np.asarray(scores).shape[1])
    labelled = truth.any(axis=1)
    if not labelled.any():
        raise ValueError("accuracy: no example has a label")
    return float(topk_correct(scores, truth, k)[labelled].mean())


def real_accuracy(scores: np.ndarray, real_labels: np.ndarray) -> float:
    """ImageNet-ReaL top-1 (Beyer et al. 2020): the top class is correct if it is in the image's
    ReaL label set; images whose set is empty (no ReaL label) are left out."""
    return accuracy(scores, real_labels, k=1)
