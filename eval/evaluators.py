"""The evaluate stage's evaluators: each metric of eval/metrics behind the evaluator contract
(trainer/evaluators/base.py), so a config lists them like any other eval:

    c.evals.test = dict(type="accuracy", split="test")
    c.evals.objectnet = dict(type="ood", dataset="objectnet", split="test",
                             map="/maps/objectnet.json", border=2)
    c.evals.mvh = dict(type="model_vs_human", dataset="cue_conflict", split="test",
                       human_data="/data/raw-data")
    c.evals.calib = dict(type="calibration", split="test")
    c.evals.fair = dict(type="fairness", dataset="celeb_a", split="test", fit_split="val",
                        attribute="Male", positive=("Smiling",))

Each collects the model's outputs over its split on the host (eval/outputs.py: one sharded pass,
shared by every evaluator of the same split inside the evaluate stage) and calls the pure
functions. Besides `(name, value)` pairs, an evaluator may leave `details` (JSON: reliability
bins, the fairness frontier, model-vs-human tables) and `files` (name -> text, e.g. the model's
trials in the toolbox's CSV layout) after `run`, which the evaluate stage writes next to
metrics.json and the report draws from. `observer` names the model in those tables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from data import label_maps
from eval import outputs
from eval.metrics import accuracy as acc_lib
from eval.metrics import calibration, fairness, ood
from eval.metrics import model_vs_human as mvh
from trainer import config_checks as checks
from trainer.evaluators import base
from trainer.evaluators.label_map import LabelMapAccuracy

ACTIVATIONS = ("softmax", "sigmoid")
EPSILONS = (0.2, 0.1, 0.05, 0.02, 0.01, 0.0)  # DP tolerances swept by `fairness` (our choice)


def _check_map(cfg: dict, where: str, default: str = "") -> None:
    """`map` (a shipped map's name or a JSON path), `labels` and `reduce`. A path that does not
    exist where the plan runs (a bucket only the workers mount) is read when the stage starts
    instead."""
    value = cfg.get("map", default)
    if Path(str(value)).suffix == ".json" and not Path(value).exists():
        value = None
    LabelMapAccuracy.check_values({**cfg, "map": value or "imagenet_16"}, where)


def _human_dir(human_data: str, experiment: str) -> Path:
    return Path(human_data) / experiment


class HostEvaluator(base.Evaluator):
    """An evaluator over a split's host-side outputs (eval/outputs.py)."""

    pred = "logits"
    observer = "model"

    def __init__(self, predict_fn, *, ctx: base.Context, split: str, dataset: str = ""):
        super().__init__(predict_fn, ctx=ctx)
        self.split, self.dataset = split, dataset or ctx.dataset
        self.details: dict[str, Any] | None = None
        self.files: dict[str, str] = {}

    @property
    def where(self) -> str:
        return f"{type(self).__name__} on {self.dataset}/{self.split}"

    def outputs(self, params, frozen, split: str | None = None, **kwargs) -> outputs.SplitOutputs:
        return outputs.collect(
            self.ctx, self.predict_fn, params, frozen, split or self.split, self.dataset, **kwargs
        )

    def same_classes(self, out: outputs.SplitOutputs) -> None:
        """The scores must be over the split's own classes (else a label map is needed)."""
        if out.scores.shape[1] != out.labels.shape[1]:
            raise ValueError(
                f"{self.where}: the model has {out.scores.shape[1]} classes, the split "
                f"{out.labels.shape[1]}; score it through a label map (type 'ood')"
            )


def probabilities(scores: np.ndarray, activation: str) -> np.ndarray:
    return calibration.softmax(scores) if activation == "softmax" else calibration.sigmoid(scores)


# --- accuracy -------------------------------------------------------------------------------------


class Accuracy(HostEvaluator):
    """`accuracy`: top-1, top-k ("any correct" on multi-label splits) and, when the split has ReaL
    labels, ImageNet-ReaL top-1 (eval/metrics/accuracy.py). `count` = labelled examples."""

    def __init__(self, predict_fn, *, ctx: base.Context, split: str, dataset: str = "", k: int = 5):
        super().__init__(predict_fn, ctx=ctx, split=split, dataset=dataset)
        self.k = k

    @classmethod
    def check_values(cls, cfg: dict, where: str) -> None:
        checks.positive_int(f"{where}.k", cfg.get("k", 5))

    def run(self, params, frozen) -> Iterator[tuple[str, float]]:
        out = self.outputs(params, frozen)
        self.same_classes(out)
        yield "top1", acc_lib.accuracy(out.scores, out.labels, 1)
        yield (
            f"top{self.k}",
            acc_lib.accuracy(out.scores, out.labels, min(self.k, out.scores.shape[1])),
        )
        if out.real_labels is not None and out.real_labels.any():
            yield "real_top1", acc_lib.real_accuracy(out.scores, out.real_labels)
        yield "count", float(out.labels.any(axis=1).sum())


# --- OOD through label maps -----------------------------------------------------------------------


class LabelMapOOD(HostEvaluator):
    """`ood`: top-1 in a label map's target space (eval/metrics/ood.py: `data.label_maps.correct`,
    the one implementation the in-training `label_map` evaluator runs too; `labels="target"` by
    default in both, `"source"` for a split labelled in the model's own classes): ImageNet-R/-A
    (`map="imagenet_r"`/`"imagenet_a"`: the 200-class subsets), ObjectNet (`map=` your 113-class
    JSON, `border=2`), JFT-style -> ImageNet (any map). `reduce` max|mean over each target's
    classes (`softmax=True` first turns logits into probabilities, for mean); `restrict=False` takes
    the argmax over all the model's classes instead (the other public convention)."""

    def __init__(
        self,
        predict_fn,
        *,
        ctx: base.Context,
        split: str,
        map: str,
        dataset: str = "",
        labels: str = "target",
        reduce: str = "max",
        restrict: bool = True,
        border: int = 0,
        softmax: bool = False,
    ):
        super().__init__(predict_fn, ctx=ctx, split=split, dataset=dataset)
        self.map = label_maps.load(map)
        self.membership = self.map.membership(
            ctx.class_names
        )  # unknown classes fail before any pass
        self.labels, self.reduce, self.restrict, self.border, self.softmax = (
            labels,
            reduce,
            restrict,
            border,
            softmax,
        )

    @classmethod
    def check_values(cls, cfg: dict, where: str) -> None:
        _check_map(cfg, where)
        checks.int_at_least(f"{where}.border", cfg.get("border", 0), 0)  # pixels
        for key in ("restrict", "softmax"):
            checks.boolean(f"{where}.{key}", cfg.get(key, False))

    def run(self, params, frozen) -> Iterator[tuple[str, float]]:
        border = self.border
        transform = (lambda images: ood.crop_border(images, border)) if border else None
        out = self.outputs(params, frozen, transform=transform, transform_key=("border", border))
        to_targets = self.map.to_targets(self.membership, out.class_names, self.labels, self.where)
        scores = calibration.softmax(out.scores) if self.softmax else out.scores
        truth = ood.target_truth(out.labels, to_targets)
        correct, scored = map(
            np.asarray,
            ood.label_map_correct(scores, truth, self.membership, self.reduce, self.restrict),
        )
        if not scored.any():
            raise ValueError(f"{self.where}: no example's label is a target of {self.map.name}")
        yield "top1", float(correct[scored].mean())
        yield "count", float(scored.sum())


# --- model-vs-human -------------------------------------------------------------------------------


class ModelVsHuman(HostEvaluator):
    """`model_vs_human` (eval/metrics/model_vs_human.py): 16-class decisions through `map` (the
    shipped `imagenet_16`; mean of softmax probabilities), OOD accuracy, shape bias when the split
    has cue-conflict labels, and — with `human_data` = the toolbox's `raw-data` dir — accuracy
    difference and observed/error consistency against its human observers (`experiment` = the
    toolbox's dataset name, default the dataset's). Image names are the records' ids (the file
    names); conditions come from the human trials of the same image, else from the file name.
    `exclude_conditions`: None = the toolbox's list for the experiment."""

    def __init__(
        self,
        predict_fn,
        *,
        ctx: base.Context,
        split: str,
        dataset: str = "",
        map: str = "imagenet_16",
        labels: str = "target",
        experiment: str = "",
        human_data: str = "",
        exclude_conditions: Sequence[str] | None = None,
    ):
        super().__init__(predict_fn, ctx=ctx, split=split, dataset=dataset)
        self.map = label_maps.load(map)
        self.membership = self.map.membership(ctx.class_names)
        self.labels, self.human_data = labels, human_data
        self.experiment = experiment or self.dataset
        self.exclude = None if exclude_conditions is None else tuple(exclude_conditions)
        if human_data and not _human_dir(human_data, self.experiment).is_dir():
            raise ValueError(
                f"model_vs_human: human_data {human_data!r} has no dir {self.experiment!r} (the "
                "toolbox's raw-data/<experiment>/*.csv)"
            )

    @classmethod
    def check_values(cls, cfg: dict, where: str) -> None:
        _check_map(cfg, where, default="imagenet_16")
        human, experiment = (
            cfg.get("human_data", ""),
            cfg.get("experiment") or cfg.get("dataset") or "",
        )
        if not isinstance(human, str):
            raise checks.fail(f"{where}.human_data", f"must be a path or '', got {human!r}")
        if (
            human and Path(human).is_dir() and not _human_dir(human, experiment).is_dir()
        ):  # else: at start
            raise checks.fail(
                f"{where}.human_data",
                f"{human!r} has no dir for the experiment {experiment or '(the dataset)'!r}",
            )
        exclude = cfg.get("exclude_conditions")
        if exclude is not None:
            checks.names(
                f"{where}.exclude_conditions", exclude, "None or a tuple of condition names"
            )

    def trials(self, out: outputs.SplitOutputs, decided: np.ndarray) -> mvh.Trials:
        """The model's trials in the toolbox's layout (category = the image's true category)."""
        to_targets = self.map.to_targets(self.membership, out.class_names, self.labels, self.where)
        truth = np.asarray(label_maps.target_truth(out.labels, to_targets))
        if not truth.any(axis=1).all():
            raise ValueError(
                f"{self.where}: {int((~truth.any(axis=1)).sum())} images have no category of "
                f"{self.map.name}"
            )
        names = np.asarray(self.map.targets, dtype=object)
        imagenames = [str(i).rsplit("/", 1)[-1] for i in out.ids]
        return mvh.Trials.of(
            subj=[self.observer] * len(out),
            condition=[mvh.condition_from_name(n) for n in imagenames],
            imagename=imagenames,
            category=names[np.argmax(truth, axis=1)],
            object_response=names[decided],
        )

    def run(self, params, frozen) -> Iterator[tuple[str, float]]:
        out = self.outputs(params, frozen)
        decided = mvh.decisions(calibration.softmax(out.scores), self.membership)
        trials = self.trials(out, decided)
        details: dict[str, Any] = {"experiment": self.experiment, "observer": self.observer}
        humans = (
            mvh.read_raw_data(Path(self.human_data), self.experiment) if self.human_data else None
        )
        if humans is not None:
            raw, summary, reference = mvh.benchmark(trials, humans, self.experiment, self.exclude)
            details.update(summary=summary, humans=reference, raw=raw)
        else:
            conditions = mvh.included_conditions(trials, self.experiment, self.exclude)
            summary = {
                "OOD accuracy": mvh.accuracy(trials.select(np.isin(trials.condition, conditions)))
            }
            details["summary"] = summary
        for column, value in summary.items():
            yield column.lower().replace(" ", "_"), value
        if humans is not None:
            yield "human_ood_accuracy", details["humans"]["OOD accuracy"]
        if out.shape_label is not None:
            yield from self._shape_bias(out, trials, humans, details)
        self.details = details
        self.files = {f"{self.experiment}_{self.observer}_session_1.csv": trials.csv_text()}

    def _shape_bias(self, out, trials: mvh.Trials, humans, details) -> Iterator[tuple[str, float]]:
        names = np.asarray(out.class_names, dtype=object)
        rows = (out.shape_label >= 0) & (out.texture_label >= 0)
        shape, texture = names[out.shape_label[rows]], names[out.texture_label[rows]]
        decision = trials.object_response[rows]
        result = mvh.shape_bias(decision, shape, texture)
        per_category = {}
        for category in sorted(set(shape)):
            sel = shape == category
            per_category[category] = mvh.shape_bias(decision[sel], shape[sel], texture[sel])[
                "shape-bias"
            ]
        details["shape_bias"] = {**result, "per_category": per_category}
        if humans is not None:
            details["human_shape_bias"] = mvh.human_shape_bias(humans)
        yield "shape_bias", result["shape-bias"]
        yield "fraction_correct_shape", result["fraction-correct-shape"]
        yield "fraction_correct_texture", result["fraction-correct-texture"]
        if humans is not None:
            yield "human_shape_bias", details["human_shape_bias"]["shape-bias"]


# --- calibration ----------------------------------------------------------------------------------


class Calibration(HostEvaluator):
    """`calibration`: top-label ECE (15 equal-width bins; `scheme="mass"` for equal-mass) of the
    softmax (or, for sigmoid-trained models, `activation="sigmoid"`) probabilities, and the
    reliability diagram's bins in `details` (eval/metrics/calibration.py)."""

    def __init__(
        self,
        predict_fn,
        *,
        ctx: base.Context,
        split: str,
        dataset: str = "",
        bins: int = calibration.BINS,
        scheme: str = "width",
        activation: str = "softmax",
    ):
        super().__init__(predict_fn, ctx=ctx, split=split, dataset=dataset)
        self.bins, self.scheme, self.activation = bins, scheme, activation

    @classmethod
    def check_values(cls, cfg: dict, where: str) -> None:
        checks.positive_int(f"{where}.bins", cfg.get("bins", calibration.BINS))
        checks.one_of(f"{where}.scheme", cfg.get("scheme", "width"), calibration.SCHEMES)
        checks.one_of(f"{where}.activation", cfg.get("activation", "softmax"), ACTIVATIONS)

    def run(self, params, frozen) -> Iterator[tuple[str, float]]:
        out = self.outputs(params, frozen)
        self.same_classes(out)
        labelled = out.labels.any(axis=1)
        conf, pred = calibration.top_label(probabilities(out.scores[labelled], self.activation))
        correct = out.labels[labelled][np.arange(len(pred)), pred]
        self.details = {
            "bins": self.bins,
            "scheme": self.scheme,
            "activation": self.activation,
            "reliability": calibration.reliability(conf, correct, self.bins, self.scheme),
        }
        yield "ece", calibration.ece(conf, correct, self.bins, self.scheme)
        yield "top1", float(correct.mean())
        yield "mean_confidence", float(conf.mean())
        yield "count", float(len(conf))


# --- fairness -------------------------------------------------------------------------------------


class Fairness(HostEvaluator):
    """`fairness` (eval/metrics/fairness.py) on a split with an `attributes` field: groups = the
    values of `attribute` (an index, or a name from the manifest's `attribute_names`). Multi-class
    top-1 and top-label ECE per group and their largest gaps; the binary task "is the label one of
    `positive`" (class names; P(positive) = the softmax mass on them): positive-prediction rate per
    group, DP gap, binary top-1; then randomized-threshold debiasing fitted on `fit_split` for each
    eps in `epsilons`: the frontier's accuracy, DP gap and ECE on `split` as `eps<e>/...`."""

    def __init__(
        self,
        predict_fn,
        *,
        ctx: base.Context,
        split: str,
        fit_split: str,
        positive: Sequence[str],
        dataset: str = "",
        attribute: int | str = 0,
        epsilons: Sequence[float] = EPSILONS,
        gamma: float = fairness.GAMMA,
        bins: int = calibration.BINS,
    ):
        super().__init__(predict_fn, ctx=ctx, split=split, dataset=dataset)
        self.fit_split, self.attribute = fit_split, attribute
        self.epsilons, self.gamma, self.bins = tuple(float(e) for e in epsilons), float(gamma), bins
        missing = [p for p in positive if p not in ctx.class_names]
        if missing:
            raise ValueError(
                f"fairness: positive class {missing[0]!r} is not one of the model's classes "
                f"({', '.join(ctx.class_names[:12])})"
            )
        self.positive = tuple(positive)
        self.model_positive = np.asarray([ctx.class_names.index(p) for p in positive])

    @classmethod
    def check_values(cls, cfg: dict, where: str) -> None:
        positive = cfg["positive"]
        checks.names(f"{where}.positive", positive, "a non-empty tuple of class names", empty=False)
        if cfg["fit_split"] == cfg["split"]:
            raise checks.fail(
                f"{where}.fit_split",
                "must differ from split: the thresholds are fitted on held-out data",
            )
        attribute = cfg.get("attribute", 0)
        if not (checks.is_int(attribute, 0) or (isinstance(attribute, str) and attribute)):
            raise checks.fail(
                f"{where}.attribute",
                f"must be an index >= 0 or an attribute name, got {attribute!r}",
            )
        checks.number_tuple(f"{where}.epsilons", cfg.get("epsilons", EPSILONS), ge=0)
        checks.number(f"{where}.gamma", cfg.get("gamma", fairness.GAMMA), gt=0, what="a number")
        checks.positive_int(f"{where}.bins", cfg.get("bins", calibration.BINS))

    def _column(self, out: outputs.SplitOutputs) -> tuple[int, str]:
        """(index, name) of the sensitive attribute in the split's `attributes`."""
        if out.attributes is None:
            raise ValueError(f"{self.where}: the split has no `attributes` field")
        names = list(out.manifest.source.get("attribute_names") or ())
        if isinstance(self.attribute, str):
            if self.attribute not in names:
                raise ValueError(
                    f"{self.where}: attribute {self.attribute!r} is not one of the split's "
                    f"attribute_names ({', '.join(names) or 'none recorded'})"
                )
            index = names.index(self.attribute)
        else:
            index = int(self.attribute)
        if index >= out.attributes.shape[1]:
            raise ValueError(
                f"{self.where}: attribute index {index} >= the {out.attributes.shape[1]} attributes"
            )
        return index, names[index] if index < len(names) else f"attribute {index}"

    def _binary(self, out: outputs.SplitOutputs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(P(positive), bool label, group) of the labelled rows."""
        missing = [p for p in self.positive if p not in out.class_names]
        if missing:
            raise ValueError(
                f"{self.where}: positive class {missing[0]!r} is not a class of the split"
            )
        labelled = out.labels.any(axis=1)
        index, _ = self._column(out)
        p = calibration.softmax(out.scores[labelled])[:, self.model_positive].sum(axis=1)
        split_positive = [out.class_names.index(name) for name in self.positive]
        return (
            p,
            out.labels[labelled][:, split_positive].any(axis=1),
            out.attributes[labelled, index],
        )

    def run(self, params, frozen) -> Iterator[tuple[str, float]]:
        out = self.outputs(params, frozen)
        fit = self._binary(self.outputs(params, frozen, split=self.fit_split))
        p, label, group = evaluated = self._binary(out)
        _, attribute_name = self._column(out)
        details: dict[str, Any] = {
            "attribute": attribute_name,
            "positive": list(self.positive),
            "fit_split": self.fit_split,
            "gamma": self.gamma,
        }
        if (
            out.scores.shape[1] == out.labels.shape[1]
        ):  # multi-class metrics need the split's classes
            labelled = out.labels.any(axis=1)
            correct = acc_lib.topk_correct(out.scores[labelled], out.labels[labelled], 1)
            per_group = fairness.subgroup_accuracy(correct, group)
            conf, pred = calibration.top_label(calibration.softmax(out.scores[labelled]))
            hit = out.labels[labelled][np.arange(len(pred)), pred]
            eces = {
                g: calibration.ece(conf[group == g], hit[group == g], self.bins) for g in per_group
            }
            details.update(top1=per_group, ece=eces)
            yield from ((f"top1/{g}", v) for g, v in per_group.items())
            yield "top1_gap", fairness.largest_gap(per_group)
            yield from ((f"ece/{g}", v) for g, v in eces.items())
            yield "ece_gap", fairness.largest_gap(eces)
        rates = fairness.group_means(p >= 0.5, group)
        details.update(positive_rate=rates, counts={g: int(np.sum(group == g)) for g in rates})
        yield from ((f"positive_rate/{g}", v) for g, v in rates.items())
        yield "dp_gap", fairness.largest_gap(rates)
        yield "binary_top1", float(np.mean((p >= 0.5) == label))
        rows = fairness.frontier(fit, evaluated, self.epsilons, self.gamma, self.bins)
        details["frontier"] = rows
        for row in rows:
            for metric in ("accuracy", "dp_gap", "ece"):
                yield (
                    f"eps{row['eps']:g}/{'top1' if metric == 'accuracy' else metric}",
                    row["frontier"]["eval"][metric],
                )
        self.details = details


TABLE = {
    "accuracy": Accuracy,
    "ood": LabelMapOOD,
    "model_vs_human": ModelVsHuman,
    "calibration": Calibration,
    "fairness": Fairness,
}
