"""Fairness: subgroup accuracy, demographic parity and DP-constrained randomized-threshold
debiasing.

Groups are the values of one sensitive attribute (e.g. CelebA's `Male`, the digits' `heavy_ink`).

- Subgroup accuracy: the accuracy within each group; the **largest subgroup gap** = max - min.
- **Demographic parity (DP) gap** of a binary classifier = max - min over groups of its
  positive-prediction rate (for a randomized classifier: of the mean probability of predicting
  positive).
- **Randomized-threshold debiasing** (Alabdulmohsin & Lucic, NeurIPS 2021, "A Near-Optimal
  Algorithm for Debiasing Trained Machine Learning Models"; google-research `ml_debiaser`). The
  classifier's score p = P(positive) is mapped to y = 2p - 1 in [-1, 1]. The debiased rule predicts
  positive with probability x_i = clip((y_i - theta_k) / gamma, 0, 1) for an example of group k;
  the thresholds theta_k solve

      minimize  sum_i gamma/2 x_i^2 - y_i x_i   s.t.  |mean_{i in k} x_i - rho| <= eps/2 for every k

  with rho = the mean of p over the fitting data (ml_debiaser's default). So every group's rate lies
  within eps/2 of rho and the DP gap is <= eps on the fitting data. The problem separates by group
  and a group's rate r_k(theta) = mean clip((y - theta)/gamma, 0, 1) is continuous and
  non-increasing in theta: theta_k = 0 (the unconstrained optimum) when r_k(0) is inside the band,
  otherwise the theta where r_k meets the band's nearer edge, found by bisection to float
  precision. ml_debiaser reaches the same dual optimum by projected SGD and gradient descent; the
  exact solve needs no learning rate and gives a DP gap <= eps up to rounding. gamma (our default
  0.1) trades randomization for accuracy: gamma -> 0 is a deterministic per-group threshold.
  The thresholds are fitted on a held-out split and applied to the evaluated one.
- **Frontier**: for each eps of a sweep, the rule fitted at that eps; the frontier's point at eps is
  the rule with the best fitting-split accuracy among those fitted at eps' <= eps (each satisfies
  DP <= eps' <= eps), so its accuracy cannot rise as eps shrinks. The ECE of each rule (its x as a
  probability of the positive class, `calibration.binary_confidence`) comes with it.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from eval.metrics import calibration

GAMMA = 0.1  # our choice; ml_debiaser's examples use 1 (randomizes every score in (0, 1))
_BISECTION_STEPS = 200


def groups_of(attribute: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct values, each example's index into them)."""
    values, index = np.unique(np.asarray(attribute), return_inverse=True)
    return values, index


def group_means(values: np.ndarray, attribute: np.ndarray) -> dict:
    """{group value: mean of `values` over that group's examples}."""
    values = np.asarray(values, np.float64)
    names, index = groups_of(attribute)
    return {name.item(): float(values[index == g].mean()) for g, name in enumerate(names)}


def largest_gap(per_group: Mapping) -> float:
    """max - min of the per-group values."""
    return float(max(per_group.values()) - min(per_group.values()))


def subgroup_accuracy(correct: np.ndarray, attribute: np.ndarray) -> dict:
    """{group: accuracy within the group}."""
    return group_means(np.asarray(correct, bool), attribute)


def demographic_parity_gap(positive: np.ndarray, attribute: np.ndarray) -> float:
    """max - min over groups of the positive-prediction rate (`positive`: bool predictions or the
    probabilities of predicting positive)."""
    return largest_gap(group_means(positive, attribute))


def expected_accuracy(x: np.ndarray, label: np.ndarray) -> float:
    """Accuracy of a randomized binary classifier predicting positive with probability x, in
    expectation: mean of x where the label is positive and 1 - x where it is negative."""
    x, label = np.asarray(x, np.float64), np.asarray(label, bool)
    return float(np.mean(np.where(label, x, 1.0 - x)))


@dataclasses.dataclass(frozen=True)
class RandomizedThreshold:
    """A fitted debiasing rule: one theta per group value."""

    groups: tuple
    thetas: tuple[float, ...]
    gamma: float
    eps: float
    rho: float

    def predict(self, p_positive: np.ndarray, attribute: np.ndarray) -> np.ndarray:
        """float [N]: the probability of predicting positive,
        x = clip((2p - 1 - theta_k)/gamma, 0, 1)."""
        attribute = np.asarray(attribute)
        unknown = set(np.unique(attribute).tolist()) - set(self.groups)
        if unknown:
            raise ValueError(
                f"debiasing: group(s) {sorted(unknown)} were not in the fitting data "
                f"(groups {list(self.groups)})"
            )
        theta = np.zeros(len(attribute))
        for group, t in zip(self.groups, self.thetas):
            theta[attribute == group] = t
        return _rate_terms(2.0 * np.asarray(p_positive, np.float64) - 1.0, theta, self.gamma)


def _rate_terms(y: np.ndarray, theta, gamma: float) -> np.ndarray:
    return np.clip((y - theta) / gamma, 0.0, 1.0)


def _solve_theta(y: np.ndarray, gamma: float, lo: float, hi: float) -> float:
    """The theta of one group: 0 if its rate is in [lo, hi], else where the rate meets the band."""
    rate = lambda t: float(_rate_terms(y, t, gamma).mean())
    r0 = rate(0.0)
    if lo <= r0 <= hi:
        return 0.0
    if r0 > hi:  # too many positives: raise theta until rate <= hi (rate(1) = 0)
        a, b, target, keep_high = 0.0, 1.0, hi, True
    else:  # too few: lower theta until rate >= lo (rate(-1 - gamma) = 1)
        a, b, target, keep_high = -1.0 - gamma, 0.0, lo, False
    for _ in range(_BISECTION_STEPS):  # invariant: rate(a) >= target >= rate(b)
        mid = 0.5 * (a + b)
        if rate(mid) >= target:
            a = mid
        else:
            b = mid
    # keep the end that satisfies the constraint
    return b if keep_high else a


def fit_randomized_threshold(
    p_positive: np.ndarray,
    attribute: np.ndarray,
    eps: float,
    gamma: float = GAMMA,
    rho: float | None = None,
) -> RandomizedThreshold:
    """Fits the per-group thresholds of the module docstring on (p, attribute)."""
    if eps < 0:
        raise ValueError(f"debiasing eps={eps!r} must be >= 0")
    if gamma <= 0:
        raise ValueError(f"debiasing gamma={gamma!r} must be > 0")
    p = np.asarray(p_positive, np.float64)
    y = 2.0 * p - 1.0
    rho = float(p.mean()) if rho is None else float(rho)
    lo, hi = max(0.0, rho - eps / 2), min(1.0, rho + eps / 2)
    names, index = groups_of(attribute)
    thetas = tuple(_solve_theta(y[index == g], gamma, lo, hi) for g in range(len(names)))
    return RandomizedThreshold(tuple(n.item() for n in names), thetas, gamma, float(eps), rho)


def debiased_metrics(
    rule: RandomizedThreshold,
    p_positive: np.ndarray,
    label: np.ndarray,
    attribute: np.ndarray,
    bins: int = calibration.BINS,
) -> dict[str, float]:
    """accuracy (expected), dp_gap and ece of a fitted rule on one split."""
    x = rule.predict(p_positive, attribute)
    conf, correct = calibration.binary_confidence(x, label)
    return {
        "accuracy": expected_accuracy(x, label),
        "dp_gap": demographic_parity_gap(x, attribute),
        "ece": calibration.ece(conf, correct, bins),
    }


def frontier(
    fit: tuple[np.ndarray, np.ndarray, np.ndarray],
    evaluated: tuple[np.ndarray, np.ndarray, np.ndarray],
    epsilons: Sequence[float],
    gamma: float = GAMMA,
    bins: int = calibration.BINS,
) -> list[dict]:
    """The accuracy-vs-eps frontier. `fit` and `evaluated` are (p_positive, bool label, attribute)
    of the fitting and the evaluated split. One row per eps (largest first):

        {"eps", "thetas", "fit": {accuracy, dp_gap, ece}, "eval": {...},  # the rule fitted at eps
         "frontier_eps", "frontier": {"fit": {...}, "eval": {...}}}       # the frontier's pick
    """
    rows = []
    for eps in sorted({float(e) for e in epsilons}, reverse=True):
        rule = fit_randomized_threshold(fit[0], fit[2], eps, gamma)
        rows.append(
            {
                "eps": eps,
                "thetas": {str(g): t for g, t in zip(rule.groups, rule.thetas)},
                "fit": debiased_metrics(rule, *fit, bins=bins),
                "eval": debiased_metrics(rule, *evaluated, bins=bins),
            }
        )
    for i, row in enumerate(rows):
        best = max(rows[i:], key=lambda r: r["fit"]["accuracy"])  # rows[i:] = fitted at eps' <= eps
        row["frontier_eps"] = best["eps"]
        row["frontier"] = {"fit": best["fit"], "eval": best["eval"]}
    return rows
