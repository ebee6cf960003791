"""`fewshot`: closed-form few-shot linear regression on frozen features, as big_vision's
`evaluators/fewshot_lsr.py` does it (docs/DESIGN.md §7).

Per seed s in range(seeds): `np.random.default_rng(s)` permutes each class's train examples (in
class order 0..C-1); the first `shots` of each permutation form the few-shot train set, so the sets
of one seed are nested across shot counts. On that set: whiten every feature with the set's own mean
and std (population std + 1e-5; the test features get the same, train-only, statistics), append a
constant bias column of 100 (large, so the bias is almost unregularised), targets `2 * onehot - 1`,
ridge regression with l2 = 2^10 in closed form; predict argmax, score top-1 on the test split.

The closed form goes through an eigendecomposition as big_vision's does: of AᵀA when the set has
at least as many examples as columns (N >= D+1), W = Q diag(1/(λ+l2)) Qᵀ AᵀY; of AAᵀ otherwise,
W = Aᵀ Q diag(1/(λ+l2)) Qᵀ Y. Both equal (AᵀA + l2 I)⁻¹ AᵀY. It runs on the host in float64
(big_vision: float32 on the CPU); tests/test_probe.py holds it to an independent NumPy solve at
rel. 1e-8 and benchmarks/fewshot.py measures the time and the float32 difference.

A class with fewer train examples than the largest shot count is an error naming the class
(big_vision silently takes fewer). The evaluator yields `<k>shot_top1` (mean top-1 over seeds) and
`<k>shot_top1_std`. The probe stage (eval/probe.py) calls `evaluate` on its cached features.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping, Sequence

import numpy as np

from trainer import config_checks as checks
from trainer import features
from trainer.evaluators import base

BIAS = 100.0  # the constant bias column
L2 = 2.0**10
SHOTS = (1, 5, 10, 25)
SEEDS = 3
STD_EPS = 1e-5
_CHUNK = 8192  # test rows whitened and scored at a time (bounded host memory at any split size)


@dataclasses.dataclass(frozen=True)
class Ridge:
    """A fitted few-shot classifier: the few-shot train set's whitening and the weights [D+1, C]."""

    mean: np.ndarray
    std: np.ndarray
    w: np.ndarray

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class ids [N]; x may be a memory map (read _CHUNK rows at a time)."""
        return np.concatenate(
            [
                np.argmax(_design(x[i : i + _CHUNK], self.mean, self.std) @ self.w, axis=1)
                for i in range(0, len(x), _CHUNK)
            ]
            or [np.zeros(0, np.int64)]
        )


def _design(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Whitened features with the bias column appended: the regression's A (dtype of `mean`)."""
    x = (np.asarray(x, mean.dtype) - mean) / std
    return np.concatenate([x, np.full((len(x), 1), BIAS, mean.dtype)], axis=1)


def fit(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float = L2, dtype=np.float64) -> Ridge:
    """Ridge regression of ±1 one-hot targets on whitened features + a bias column of 100."""
    x = np.asarray(x, dtype)
    mean = x.mean(axis=0)
    std = x.std(axis=0) + STD_EPS
    a = _design(x, mean, std)
    t = 2.0 * np.eye(num_classes, dtype=dtype)[np.asarray(y)] - 1.0
    if a.shape[0] >= a.shape[1]:  # N >= D+1: eigendecomposition of AᵀA (D+1 x D+1)
        eigs, q = np.linalg.eigh(a.T @ a)
        w = (q / (eigs + l2)) @ (q.T @ (a.T @ t))
    else:  # more columns than examples: of AAᵀ (N x N)
        eigs, q = np.linalg.eigh(a @ a.T)
        w = a.T @ ((q / (eigs + l2)) @ (q.T @ t))
    return Ridge(mean, std, w)


def subsets(
    labels: np.ndarray,
    num_classes: int,
    shots: Sequence[int],
    seed: int,
    class_names: Sequence[str] = (),
    where: str = "fewshot",
) -> dict[int, np.ndarray]:
    """{k: indices into `labels` of the k-shot train set} for one seed; nested across k."""
    check_shots(labels, num_classes, shots, class_names, where)
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    return {k: np.concatenate([idx[:k] for idx in per_class]) for k in shots}


def check_shots(
    labels: np.ndarray,
    num_classes: int,
    shots: Sequence[int],
    class_names: Sequence[str] = (),
    where: str = "fewshot",
) -> None:
    """Every class needs at least max(shots) train examples: a one-line error naming the first that
    has not."""
    labels = np.asarray(labels)
    counts = np.bincount(labels[labels >= 0], minlength=num_classes)
    most = max(shots)
    short = np.flatnonzero(counts[:num_classes] < most)
    if len(short):
        c = int(short[0])
        name = f" ({class_names[c]!r})" if c < len(class_names) else ""
        raise ValueError(
            f"{where}.shots: {most} shots but class {c}{name} has only {counts[c]} "
            f"example(s) in the few-shot train split"
        )


def evaluate(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    num_classes: int,
    *,
    shots: Sequence[int] = SHOTS,
    seeds: int = SEEDS,
    l2: float = L2,
    class_names: Sequence[str] = (),
    where: str = "fewshot",
    dtype=np.float64,
) -> dict[int, list[float]]:
    """{k: [top-1 on the test set for seed 0, 1, ...]}. The train/test features may be memory maps;
    `dtype` is the solve's (float32: benchmarks/fewshot.py's comparison)."""
    test_y = np.asarray(test_y)
    results: dict[int, list[float]] = {k: [] for k in shots}
    for seed in range(seeds):
        for k, idx in subsets(
            np.asarray(train_y), num_classes, shots, seed, class_names, where
        ).items():
            ridge = fit(train_x[idx], train_y[idx], num_classes, l2, dtype)
            results[k].append(float(np.mean(ridge.predict(test_x) == test_y)))
    return results


def summary(results: Mapping[int, Sequence[float]]) -> Iterator[tuple[str, float]]:
    """`<k>shot_top1` (mean over seeds) and `<k>shot_top1_std` (population std over seeds)."""
    for k, accs in results.items():
        yield f"{k}shot_top1", float(np.mean(accs))
        yield f"{k}shot_top1_std", float(np.std(accs))


def check_config(where: str, *, shots, seeds, l2) -> None:
    """Value checks (no data needed): one-line ValueError naming the key and its value."""
    shots = tuple(shots) if isinstance(shots, (list, tuple)) else shots
    if not isinstance(shots, tuple) or not shots or not all(checks.is_int(k, 1) for k in shots):
        raise checks.fail(f"{where}.shots={shots!r}", "must be a non-empty tuple of positive ints")
    if len(set(shots)) != len(shots):
        raise checks.fail(f"{where}.shots={shots!r}", "repeated shot count")
    if not checks.is_int(seeds, 1):
        raise checks.fail(f"{where}.seeds={seeds!r}", "must be an int >= 1")
    if not (checks.is_number(l2) and l2 > 0):
        raise checks.fail(f"{where}.l2={l2!r}", "must be a number > 0")


class FewShot(base.Evaluator):
    """In-training few-shot: features of `train_split` and `split` (the scored split) of `dataset`
    with ctx's loader and sharded jit, then the closed-form solves on the host."""

    pred = "pre_logits"

    def __init__(
        self,
        predict_fn,
        *,
        ctx: base.Context,
        train_split: str,
        split: str,
        dataset: str = "",
        shots: Sequence[int] = SHOTS,
        seeds: int = SEEDS,
        l2: float = L2,
    ):
        super().__init__(predict_fn, ctx=ctx)
        check_config("fewshot", shots=shots, seeds=seeds, l2=l2)
        self.dataset = dataset or ctx.dataset
        self.train_split, self.split = train_split, split
        self.shots, self.seeds, self.l2 = tuple(shots), seeds, float(l2)
        for s in (
            train_split,
            split,
        ):  # a missing split fails when the stage starts, not at the first eval
            ctx.split_dir(self.dataset, s)
        self._extract = features.extractor(ctx, predict_fn)
        self._loaders = None

    @classmethod
    def check_values(cls, cfg: dict, where: str) -> None:
        check_config(
            where,
            shots=cfg.get("shots", SHOTS),
            seeds=cfg.get("seeds", SEEDS),
            l2=cfg.get("l2", L2),
        )

    def run(self, params, frozen) -> Iterator[tuple[str, float]]:
        if self._loaders is None:  # built on first use, like classification's
            self._loaders = tuple(
                self.ctx.loader(s, self.dataset) for s in (self.train_split, self.split)
            )
        train, test = self._loaders
        train_x, train_y = features.collect(self._extract, params, frozen, train)
        test_x, test_y = features.collect(self._extract, params, frozen, test)
        yield from summary(
            evaluate(
                train_x,
                train_y,
                test_x,
                test_y,
                train.num_classes,
                shots=self.shots,
                seeds=self.seeds,
                l2=self.l2,
                class_names=train.manifest.class_names,
                where=f"fewshot[{self.dataset}/{self.train_split}]",
            )
        )
