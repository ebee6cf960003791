"""The `probe` stage: a frozen export's pre-logit features, probed with a linear classifier and with
big_vision's closed-form few-shot regression (the paper's "frozen features + thin layer" results).

    python -m launch.run --config launch/configs/tiny.py --stages probe
    python -m launch.stage --stage probe --config launch/configs/tiny.py --workdir DIR

Inputs: `inputs[cfg.model_from]`, an export (`params/` + `model.json`: pretrain, a fine-tune or a
distill run), and `inputs["prepare"]`, the prepared splits of `cfg.dataset`.

1. **Features, once.** The `pre_logits` of every split the probes read, computed sharded on the
   `mesh` (trainer/features.py) and streamed into `features/<dataset>/<split>.npy` (float32 [N, D],
   a memory map written one eval batch at a time, so no split is ever whole in RAM) with
   `<split>.labels.npy` (first class id), `<split>.ids.npy` (record ids) and `<split>.json` (what
   they are features of: the export's fingerprint, the image size, the split's shard checksums;
   written last). A split whose `.json` matches is read back instead: a rerun in the same stage dir
   (the DAG's resumable `.partial-*` dir) extracts nothing and loads no parameters.
2. **Linear probe.** A convex problem solved to convergence, not trained: the minimiser of the mean
   softmax cross-entropy + 0.5 * l2 * |kernel|^2 (the bias unpenalised) on features standardised
   with the fitting rows' mean/std, by L-BFGS (SciPy's L-BFGS-B driving a jitted objective and
   gradient over all the rows, sharded on the `mesh`) until the largest gradient component is at
   most `linear.tol` (else the stage fails naming `linear.max_iters`); deterministic. Each l2 of
   the grid is solved on the train split minus a random `holdout` slice, the best holdout top-1
   wins (first in grid order on ties), and that l2 is solved again on the whole train split. The
   standardisation is folded into
   the exported head, so it is a plain dense layer on raw pre-logits: `head/` (Orbax,
   {"kernel" [D, C], "bias" [C]}) + `head.json`; `logits = pre_logits @ kernel + bias`
   (`apply_head`), which is how the evaluate stage scores any split with backbone + head.
3. **Few-shot.** trainer/evaluators/fewshot.py on the cached features (the same implementation the
   `fewshot` evaluator runs during training): shots 1/5/10/25, 3 seeds, mean and std per shot
   count; per-seed values in `fewshot.json`. Checked first: a class with fewer train examples than
   the largest shot count fails before the linear probe is solved.

Outputs: artifacts `features`, `head`, `head_spec` (head.json), `fewshot` (fewshot.json); metrics
`linear/<split>_top1` per `linear.eval_splits`, `linear/holdout_top1`, `linear/l2`,
`linear/iterations` (L-BFGS iterations of the exported head),
`fewshot/<k>shot_top1`, `fewshot/<k>shot_top1_std`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import scipy.optimize
import threadpoolctl

from data import paths
from trainer import config_checks as checks
from trainer import checkpoint, evaluators, features, sharding
from trainer.evaluators import fewshot
from trainer.models import vit

PRED = "pre_logits"
_CHUNK = 8192  # rows read from a feature memory map at a time when scoring or taking moments
_LBFGS_MEMORY = 30  # L-BFGS correction pairs kept (SciPy's maxcor; its default 10 needs more steps)


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model_from = "pretrain"  # the upstream export probed (a stage name: the DAG edge follows it)
    c.dataset = "digits"  # a dataset of the prepare stage
    c.batch_size = 256  # global, feature extraction
    c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
    c.linear = ml_collections.ConfigDict(
        dict(
            train_split="train",
            eval_splits=("val", "test"),  # top-1 reported for each
            holdout=0.1,  # fraction of train_split held out to pick l2; then solved on all of it
            l2s=(
                1e-6,
                1e-5,
                1e-4,
                1e-3,
            ),  # L2 penalty 0.5 * l2 * |W|^2 on standardised features; > 0
            # solved when the largest gradient component is <= tol (float32: keep >= ~3e-5)
            tol=1e-4,
            max_iters=2000,  # L-BFGS iterations per l2; more fails the stage (features stay cached)
            seed=0,  # the holdout split
        )
    )
    c.fewshot = ml_collections.ConfigDict(
        dict(
            train_split="train",
            split="test",  # few-shot train sets drawn from train_split; scored on split
            shots=fewshot.SHOTS,
            seeds=fewshot.SEEDS,
            l2=fewshot.L2,
        )
    )
    c.runtime = ml_collections.ConfigDict(dict(read_threads=2, worker_count=0))
    return c


# --- Plan-time checks -----------------------------------------------------------------------------


def validate(
    cfg, upstream: Mapping[str, ml_collections.ConfigDict] | None = None, where: str = "probe"
) -> None:
    """Plan-time checks (launch/dag.py; `run` repeats them without `upstream`): one line naming the
    key."""
    upstream = upstream or {}
    checks.name(f"{where}.model_from", cfg.model_from, "the exporting stage (e.g. 'pretrain')")
    checks.upstream(f"{where}.model_from", cfg.model_from, upstream)
    checks.mesh(f"{where}.mesh", cfg.mesh, ("data", "model"))
    sharding.check_batch(cfg.batch_size, cfg.mesh, f"{where}.batch_size")  # and at run time

    lin = cfg.linear
    checks.names(f"{where}.linear.eval_splits", lin.eval_splits, "a tuple of split names")
    checks.number(f"{where}.linear.holdout", lin.holdout, gt=0, lt=1, what="a fraction")
    checks.number_tuple(f"{where}.linear.l2s", lin.l2s, gt=0)  # l2 = 0 may have no minimiser
    checks.number(f"{where}.linear.tol", lin.tol, gt=0)
    checks.positive_int(f"{where}.linear.max_iters", lin.max_iters)
    checks.int_at_least(f"{where}.linear.seed", lin.seed, 0)
    fs = cfg.fewshot
    fewshot.check_config(f"{where}.fewshot", shots=fs.shots, seeds=fs.seeds, l2=fs.l2)
    for key, low in (("read_threads", 1), ("worker_count", 0)):
        checks.int_at_least(f"{where}.runtime.{key}", cfg.runtime[key], low)

    splits = [
        (f"{where}.linear.train_split", lin.train_split),
        (f"{where}.fewshot.train_split", fs.train_split),
        (f"{where}.fewshot.split", fs.split),
    ]
    splits += [(f"{where}.linear.eval_splits", s) for s in lin.eval_splits]
    for key, split in splits:
        checks.name(key, split, "a split name")
    prepare = upstream.get("prepare")
    if prepare is not None:  # the dataset and every split must be ones the prepare stage produces
        checks.prepared(f"{where}.dataset", cfg.dataset, prepare)
        for key, split in splits:
            checks.prepared_split(key, split, cfg.dataset, prepare)


# --- Features, once -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Split:
    """A split's cached features: x may be a read-only memory map."""

    x: np.ndarray  # float32 [N, D]
    y: np.ndarray  # int64 [N], first class id
    ids: np.ndarray  # str [N]
    num_classes: int
    class_names: tuple[str, ...]


class FeatureCache:
    """`features/<dataset>/<split>.*` of one export; extracts on a miss, loading the params once."""

    def __init__(self, root: Path, cfg, export, prepared: Path, where: str = "probe"):
        self.root, self.cfg, self.export, self.prepared, self.where = (
            Path(root),
            cfg,
            export,
            paths.as_path(prepared),
            where,
        )
        self.opened = checkpoint.open_model(export.path, f"{where}.model_from")
        self.model = vit.ViT(self.opened.config)
        self.mesh = sharding.make_mesh(**cfg.mesh)
        sharding.check_batch(
            cfg.batch_size, self.mesh, f"{where}.batch_size", processes=jax.process_count()
        )
        self.boxed = vit.abstract_params(self.model.config)
        self.ctx = evaluators.Context(
            mesh=self.mesh,
            split_dir=self.split_dir,
            dataset=cfg.dataset,
            image_size=self.model.config.image_size,
            batch_size=cfg.batch_size,
            param_shardings=sharding.param_shardings(self.boxed, self.mesh),
            read_threads=cfg.runtime.read_threads,
            worker_count=cfg.runtime.worker_count,
        )
        self._params = None
        self._extract = None
        self.extracted, self.reused = [], []  # split names, for the log and the tests
        self._splits: dict[str, Split] = {}

    def split_dir(self, dataset: str, split: str) -> Path:
        path = self.prepared / dataset / split
        if not (path / "manifest.json").exists():
            raise FileNotFoundError(
                f"{self.where}: dataset {dataset!r} split {split!r} not found: "
                f"{path / 'manifest.json'} does not exist"
            )
        return path

    def _key(self, split: str) -> dict:
        """What the cached features are features of; a cached split is reused only if this
        matches."""
        from data import manifest  # json only

        m = manifest.read(self.split_dir(self.cfg.dataset, split))
        return {
            "model_from": self.cfg.model_from,
            "model_fingerprint": self.export.fingerprint,
            "pred": PRED,
            "image_size": self.model.config.image_size,
            "dataset": self.cfg.dataset,
            "split": split,
            "num_examples": m.num_records,
            "num_classes": m.num_classes,
            "class_names": list(m.class_names),
            "shards": [s.sha256 for s in m.shards],
        }

    def get(self, split: str) -> Split:
        if split not in self._splits:
            self._splits[split] = self._get(split)
        return self._splits[split]

    def _get(self, split: str) -> Split:
        directory = self.root / self.cfg.dataset
        key = self._key(split)
        try:
            cached = json.loads((directory / f"{split}.json").read_text())
        except (OSError, json.JSONDecodeError):
            cached = None
        if cached is not None and {k: cached.get(k) for k in key} == key:
            self.reused.append(split)
        else:
            self._write(directory, split, key)
            self.extracted.append(split)
        return Split(
            np.load(directory / f"{split}.npy", mmap_mode="r"),
            np.load(directory / f"{split}.labels.npy"),
            np.load(directory / f"{split}.ids.npy"),
            key["num_classes"],
            tuple(key["class_names"]),
        )

    def _load(self):
        if self._params is None:
            abstract = checkpoint.abstract_with_shardings(
                nn.unbox(self.boxed), self.ctx.param_shardings
            )
            self._params = self.opened.load(abstract)
            model = self.model
            self._extract = features.extractor(
                self.ctx,
                lambda p, f, b: model.apply({"params": p}, b["image"], train=False)[1][PRED],
            )
        return self._params

    def _write(self, directory: Path, split: str, key: dict) -> None:
        params = self._load()
        loader = self.ctx.loader(split)
        writer = jax.process_index() == 0  # every process computes (collectives); process 0 writes
        if writer:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / f"{split}.json").unlink(missing_ok=True)  # stale until rewritten, last
        n, rows, fmap, labels = loader.num_examples, 0, None, []
        for x, y in features.batches(self._extract, params, {}, loader):
            if writer:
                if fmap is None:
                    fmap = np.lib.format.open_memmap(
                        directory / f"{split}.npy.partial",
                        mode="w+",
                        dtype=np.float32,
                        shape=(n, x.shape[1]),
                    )
                fmap[rows : rows + len(x)] = x
            labels.append(y)
            rows += len(x)
        if rows != n:
            raise RuntimeError(f"{self.where}: {split}: {rows} feature rows for {n} records")
        if writer:
            fmap.flush()
            del fmap
            os.replace(directory / f"{split}.npy.partial", directory / f"{split}.npy")
            labels = np.concatenate(labels)
            np.save(directory / f"{split}.labels.npy", labels)
            np.save(
                directory / f"{split}.ids.npy",
                loader.record_ids(labels, f"{self.where}: {self.cfg.dataset}/{split}"),
            )
            (directory / f"{split}.json").write_text(json.dumps(key, indent=1) + "\n")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"probe features {self.cfg.dataset}/{split}")


# --- Linear probe ---------------------------------------------------------------------------------


def _moments(x: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std (float64) over `rows` (sorted) of x, read _CHUNK rows at a time."""
    total, squares = np.zeros(x.shape[1]), np.zeros(x.shape[1])
    for i in range(0, len(rows), _CHUNK):
        chunk = np.asarray(x[rows[i : i + _CHUNK]], np.float64)
        total += chunk.sum(axis=0)
        squares += np.square(chunk).sum(axis=0)
    mean = total / len(rows)
    std = np.sqrt(np.maximum(squares / len(rows) - np.square(mean), 0.0))
    return mean, np.where(std > 1e-6, std, 1.0)  # a constant feature is left unscaled


def _sharded_rows(
    mesh, x: np.ndarray, y: np.ndarray, rows: np.ndarray, mean: np.ndarray, std: np.ndarray
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(x, y, weight) of `rows`, on `mesh` with the rows sharded over all its devices: x[rows]
    standardised (float32), their labels, and 1 (0 on the padding up to a multiple of the mesh's
    size). Each process reads only the rows of its own devices from the memory map."""
    n, size = len(rows), mesh.devices.size
    padded = -(-n // size) * size
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names))

    def array(fill, dtype, *shape):
        def block(index):
            part = range(padded)[index[0]]
            idx = rows[part.start : min(part.stop, n)]
            out = np.zeros((len(part), *shape), dtype)
            out[: len(idx)] = fill(idx)
            return out

        return jax.make_array_from_callback((padded, *shape), sharding, block)

    return (
        array(lambda i: (x[i] - mean) / std, np.float32, x.shape[1]),
        array(lambda i: y[i], np.int32),
        array(lambda i: 1.0, np.float32),
    )


def _objective(theta, x, y, weight, l2):
    """(value, gradient) of the linear probe's objective at theta = [kernel; bias] [D + 1, C] on
    standardised rows: mean softmax cross-entropy + 0.5 * l2 * |kernel|^2 (the bias unpenalised).
    In float64 (traced under jax.enable_x64): float32 values stall the line search near the
    minimum, a gradient component ~1e-5 from it."""

    def value(theta):
        logits = x.astype(jnp.float64) @ theta[:-1] + theta[-1]
        xent = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.sum(weight * xent) / jnp.sum(weight) + 0.5 * l2 * jnp.sum(jnp.square(theta[:-1]))

    return jax.value_and_grad(value)(theta)


def _minimise(
    objective, data, l2: float, theta: np.ndarray, max_iters: int, tol: float, where: str
) -> tuple[np.ndarray, dict]:
    """SciPy's L-BFGS-B on `objective` from `theta` until the largest gradient component is at
    most `tol`; anything else (max_iters reached, a line search stopped by float32 noise) fails."""

    def value_and_grad(flat):
        with jax.enable_x64(True):
            value, grad = objective(flat.reshape(theta.shape), *data, np.float64(l2))
        return float(value), np.asarray(grad, np.float64).ravel()

    options = dict(maxiter=max_iters, gtol=tol, ftol=0.0, maxcor=_LBFGS_MEMORY)
    with threadpoolctl.threadpool_limits(1, user_api="blas"):  # threads slow its small updates 10x
        result = scipy.optimize.minimize(
            value_and_grad, theta.ravel(), jac=True, method="L-BFGS-B", options=options
        )
    grad_max = float(np.abs(result.jac).max())
    if not grad_max <= tol:
        raise RuntimeError(
            f"{where}: l2={l2:g} not solved: max |gradient| {grad_max:.2g} > "
            f"tol={tol:g} after {result.nit} L-BFGS iterations ({result.message}); "
            f"raise {where}.max_iters (or tol, if the line search stopped)"
        )
    return result.x.reshape(theta.shape), {"iterations": int(result.nit), "grad_max": grad_max}


def fit_heads(
    x: np.ndarray,
    y: np.ndarray,
    rows: np.ndarray,
    num_classes: int,
    l2s: list[float],
    *,
    mesh,
    max_iters: int,
    tol: float,
    init: tuple[np.ndarray, np.ndarray] | None = None,
    where: str = "probe.linear",
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """One linear head per l2 on x[rows] (x may be a memory map): the minimiser, to `tol` (largest
    gradient component), of the mean softmax cross-entropy + 0.5 * l2 * |kernel|^2 on the rows'
    standardised features. A convex problem, solved by L-BFGS (SciPy's; the objective and its
    gradient computed on `mesh`, the rows sharded over its devices): no step size, no schedule, no
    minibatch order; deterministic. The l2s are solved largest first, each from the previous
    solution (the first from `init`, a raw-feature (kernel, bias), or zero).

    Returns kernels [G, D, C] and biases [G, C] in `l2s` order that apply to the raw features (the
    standardisation folded in), and per head {"iterations", "grad_max"}.
    """
    rows = np.sort(rows)
    mean, std = _moments(x, rows)
    data = _sharded_rows(mesh, x, y, rows, mean, std)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    objective = jax.jit(_objective, out_shardings=replicated)
    if init is None:
        theta = np.zeros((x.shape[1] + 1, num_classes))
    else:  # the same function of the raw features, in this standardisation
        theta = np.vstack([init[0] * std[:, None], init[1] + mean @ init[0]])
    thetas, solves = [None] * len(l2s), [None] * len(l2s)
    for g in sorted(range(len(l2s)), key=lambda g: -l2s[g]):
        theta, solves[g] = _minimise(objective, data, l2s[g], theta, max_iters, tol, where)
        thetas[g] = theta
    w = np.stack([t[:-1] for t in thetas])
    kernels = w / std[None, :, None]
    biases = np.stack([t[-1] for t in thetas]) - np.einsum("d,gdc->gc", mean / std, w)
    return kernels.astype(np.float32), biases.astype(np.float32), solves


def apply_head(head: Mapping[str, np.ndarray], pre_logits: np.ndarray) -> np.ndarray:
    """The exported head on raw pre-logits: logits [N, C]."""
    return np.asarray(pre_logits, np.float32) @ np.asarray(head["kernel"]) + np.asarray(
        head["bias"]
    )


def top1s(
    x: np.ndarray,
    y: np.ndarray,
    kernels: np.ndarray,
    biases: np.ndarray,
    rows: np.ndarray | None = None,
) -> list[float]:
    """Top-1 of each head [G, D, C] + [G, C] on x[rows] (x may be a memory map), _CHUNK rows at a
    time."""
    rows = np.arange(len(y)) if rows is None else np.sort(rows)
    hits = np.zeros(len(kernels), np.int64)
    for i in range(0, len(rows), _CHUNK):
        idx = rows[i : i + _CHUNK]
        chunk, labels = np.asarray(x[idx], np.float32), y[idx]
        for g, (kernel, bias) in enumerate(zip(kernels, biases)):
            hits[g] += int(
                np.sum(
                    np.argmax(apply_head({"kernel": kernel, "bias": bias}, chunk), axis=1) == labels
                )
            )
    return (hits / len(rows)).tolist()


def top1(x: np.ndarray, y: np.ndarray, head: Mapping[str, np.ndarray]) -> float:
    return top1s(x, y, head["kernel"][None], head["bias"][None])[0]


def linear_probe(train: Split, lin, mesh) -> tuple[dict[str, np.ndarray], dict]:
    """(head, info): l2 chosen on a held-out slice of train, then solved on all of it."""
    labelled = np.flatnonzero(train.y >= 0)  # records without a label (-1) fit nothing
    n = len(labelled)
    perm = labelled[np.random.default_rng([lin.seed, 0]).permutation(n)]
    n_hold = min(max(1, round(lin.holdout * n)), n - 1)
    hold, fit_rows = perm[:n_hold], perm[n_hold:]
    l2s = [float(l2) for l2 in lin.l2s]
    kwargs = dict(mesh=mesh, max_iters=lin.max_iters, tol=lin.tol)
    x, y, classes = train.x, train.y, train.num_classes
    kernels, biases, solves = fit_heads(x, y, fit_rows, classes, l2s, **kwargs)
    accs = top1s(x, y, kernels, biases, hold)
    best = int(np.argmax(accs))  # first in grid order on ties
    kernels, biases, (solve,) = fit_heads(
        x, y, labelled, classes, [l2s[best]], init=(kernels[best], biases[best]), **kwargs
    )
    info = {
        "l2": l2s[best],
        "holdout_top1": accs[best],
        **solve,
        "grid": [{"l2": l2, "holdout_top1": a, **s} for l2, a, s in zip(l2s, accs, solves)],
    }
    return {"kernel": kernels[0], "bias": biases[0]}, info


def load_head(stage_dir: Path) -> tuple[dict[str, np.ndarray], dict]:
    """(head, head.json) of a probe stage output: what the evaluate stage puts on the backbone."""
    stage_dir = paths.as_path(stage_dir)
    try:
        spec = json.loads((stage_dir / "head.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{stage_dir / 'head.json'}: cannot read the probe head spec ({e})"
        ) from None
    head = checkpoint.load_params(stage_dir / "head")
    return {k: np.asarray(head[k]) for k in ("kernel", "bias")}, spec


# --- The stage ------------------------------------------------------------------------------------


def _input(inputs: Mapping, name: str, key: str):
    if name not in inputs:
        raise ValueError(
            f"{key}: no upstream output {name!r} (inputs: {', '.join(sorted(inputs)) or 'none'})"
        )
    return inputs[name]


def run(cfg, inputs: dict, out: Path) -> dict:
    validate(cfg, None, "probe")
    out = Path(out)
    export = _input(inputs, cfg.model_from, "probe.model_from")
    prepared = _input(inputs, "prepare", "probe")
    cache = FeatureCache(out / "features", cfg, export, prepared.path)
    is_main = jax.process_index() == 0

    # Few-shot first: a class short of examples fails before the linear probe is solved.
    fs, lin = cfg.fewshot, cfg.linear
    fs_train = cache.get(fs.train_split)
    fewshot.check_shots(
        fs_train.y, fs_train.num_classes, fs.shots, fs_train.class_names, "probe.fewshot"
    )
    fs_test = cache.get(fs.split)
    results = fewshot.evaluate(
        fs_train.x,
        fs_train.y,
        fs_test.x,
        fs_test.y,
        fs_train.num_classes,
        shots=fs.shots,
        seeds=fs.seeds,
        l2=fs.l2,
        class_names=fs_train.class_names,
        where="probe.fewshot",
    )
    metrics = {f"fewshot/{name}": value for name, value in fewshot.summary(results)}

    train = cache.get(lin.train_split)
    head, info = linear_probe(train, lin, cache.mesh)
    metrics.update(
        {
            "linear/holdout_top1": info["holdout_top1"],
            "linear/l2": info["l2"],
            "linear/iterations": info["iterations"],
        }
    )
    for split in lin.eval_splits:
        data = cache.get(split)
        if data.num_classes != train.num_classes:
            raise ValueError(
                f"probe.linear.eval_splits: {split!r} has {data.num_classes} classes, "
                f"{lin.train_split!r} {train.num_classes}"
            )
        metrics[f"linear/{split}_top1"] = top1(data.x, data.y, head)

    # --- Export: the head (a dense layer on raw pre-logits) and the per-seed few-shot results.
    shutil.rmtree(out / "head", ignore_errors=True)  # a rerun in the same (resumed) dir
    checkpoint.save_params(out / "head", head)
    if is_main:
        spec = {
            "input": PRED,
            "model_from": cfg.model_from,
            "model_fingerprint": export.fingerprint,
            "dataset": cfg.dataset,
            "train_split": lin.train_split,
            "dim": int(head["kernel"].shape[0]),
            "num_classes": train.num_classes,
            "class_names": list(train.class_names),
            **info,
        }
        (out / "head.json").write_text(json.dumps(spec, indent=2) + "\n")
        (out / "fewshot.json").write_text(
            json.dumps(
                {
                    "dataset": cfg.dataset,
                    "train_split": fs.train_split,
                    "split": fs.split,
                    "l2": fs.l2,
                    "seeds": fs.seeds,
                    "top1": {str(k): v for k, v in results.items()},
                },
                indent=2,
            )
            + "\n"
        )
        print(
            f"[probe] {cfg.model_from} features: extracted {cache.extracted or 'none'}, "
            f"reused {cache.reused or 'none'}"
        )
        print(
            f"[probe] linear probe (l2 {info['l2']:g}, {info['iterations']} L-BFGS iterations, "
            f"holdout top-1 {info['holdout_top1']:.4f}): "
            + ", ".join(f"{s} top-1 {metrics[f'linear/{s}_top1']:.4f}" for s in lin.eval_splits)
        )
        print(
            f"[probe] few-shot {cfg.dataset} {fs.train_split} -> {fs.split} ({fs.seeds} seeds): "
            + ", ".join(
                f"{k}-shot {metrics[f'fewshot/{k}shot_top1']:.4f} ± "
                f"{metrics[f'fewshot/{k}shot_top1_std']:.4f}"
                for k in fs.shots
            )
        )
    return {
        "artifacts": {
            "features": "features",
            "head": "head",
            "head_spec": "head.json",
            "fewshot": "fewshot.json",
        },
        "metrics": metrics,
    }
