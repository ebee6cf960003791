"""Calibration: expected calibration error (ECE) and the reliability diagram's bins.

Top-label calibration (Guo et al. 2017): each example's confidence is the probability of its
predicted class, `correct` whether that prediction is right. The confidences are binned; per bin b
with n_b examples, acc_b is the fraction correct and conf_b the mean confidence, and

    ECE = sum_b (n_b / N) * |acc_b - conf_b|

Bins: `width` (default) = 15 equal-width bins of [0, 1], bin b holding confidences in
(b/15, (b+1)/15] (0 itself in the first); `mass` = equal-mass bins: the examples sorted by
confidence and split into `bins` groups whose sizes differ by at most one.
"""

from __future__ import annotations

import numpy as np

BINS = 15
SCHEMES = ("width", "mass")


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))


def top_label(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(confidence [N], predicted class [N]) of probabilities [N, C]."""
    probs = np.asarray(probs)
    pred = np.argmax(probs, axis=1)
    return probs[np.arange(len(pred)), pred], pred


def bin_index(confidence: np.ndarray, bins: int = BINS, scheme: str = "width") -> np.ndarray:
    """int [N]: each example's bin under the scheme of the module docstring."""
    if scheme not in SCHEMES:
        raise ValueError(f"calibration bins scheme={scheme!r} is not one of {SCHEMES}")
    if bins < 1:
        raise ValueError(f"calibration bins={bins!r} must be >= 1")
    confidence = np.asarray(confidence, np.float64)
    if scheme == "width":
        inner = np.linspace(0.0, 1.0, bins + 1)[1:-1]
        return np.searchsorted(inner, confidence, side="left")
    index = np.empty(len(confidence), np.int64)
    for b, rows in enumerate(np.array_split(np.argsort(confidence, kind="stable"), bins)):
        index[rows] = b
    return index


def reliability(
    confidence: np.ndarray, correct: np.ndarray, bins: int = BINS, scheme: str = "width"
) -> dict[str, list]:
    """Per bin: `lo`/`hi` (its range: the bin's edges for `width`, the min/max confidence in it for
    `mass`), `count`, `accuracy`, `confidence` (None in an empty bin). What the diagram plots."""
    confidence = np.asarray(confidence, np.float64)
    correct = np.asarray(correct, bool)
    index = bin_index(confidence, bins, scheme)
    edges = np.linspace(0.0, 1.0, bins + 1)
    out = {"lo": [], "hi": [], "count": [], "accuracy": [], "confidence": []}
    for b in range(bins):
        rows = index == b
        n = int(rows.sum())
        if scheme == "width":
            lo, hi = float(edges[b]), float(edges[b + 1])
        else:
            lo, hi = (
                (float(confidence[rows].min()), float(confidence[rows].max()))
                if n
                else (None, None)
            )
        out["lo"].append(lo)
        out["hi"].append(hi)
        out["count"].append(n)
        out["accuracy"].append(float(correct[rows].mean()) if n else None)
        out["confidence"].append(float(confidence[rows].mean()) if n else None)
    return out


def ece(
    confidence: np.ndarray, correct: np.ndarray, bins: int = BINS, scheme: str = "width"
) -> float:
    """Expected calibration error, as defined in the module docstring."""
    confidence = np.asarray(confidence, np.float64)
    if not len(confidence):
        raise ValueError("ECE of no examples")
    table = reliability(confidence, correct, bins, scheme)
    total = len(confidence)
    return float(
        sum(
            n / total * abs(a - c)
            for n, a, c in zip(table["count"], table["accuracy"], table["confidence"])
            if n
        )
    )


def binary_confidence(
    p_positive: np.ndarray, positive: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, correct) of a binary classifier's P(positive) against bool labels: it predicts
    positive when p >= 0.5, with confidence max(p, 1 - p). For the ECE of debiased predictors."""
    p = np.asarray(p_positive, np.float64)
    return np.maximum(p, 1.0 - p), (p >= 0.5) == np.asarray(positive, bool)
