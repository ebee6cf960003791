"""model-vs-human (Geirhos et al. 2021; bethgelab/model-vs-human): the toolbox's definitions.

Decisions. A 1000-class ImageNet model answers in 16 entry-level categories (airplane, bear, ...,
truck; `helper/human_categories.py`): each category's score is the MEAN of the softmax
probabilities of its ImageNet classes (the table ships as the label map
`data/label_maps/imagenet_16.json`, ImageNet indices per category), the decision is the best
category. `decisions` = `data.label_maps.target_scores(probs, membership, "mean")` + argmax.

Trials. One row per (observer, image), the toolbox's raw-data layout:
`raw-data/<dataset>/<dataset>_<subject>_session_<n>.csv` with columns
`subj,session,trial,rt,object_response,category,condition,imagename`; human observers are the
`subj` values starting with "subject-" (their `object_response` may be "na": no answer, wrong).
Images are matched across observers by the toolbox's short image id (`image_id`: the part of
`imagename` after an experiment-specific prefix).

Metrics (`plotting/analyses.py`, `plotting/plot.py`):
- 16-class accuracy = mean(object_response == category). **OOD accuracy** = the model's 16-class
  accuracy over all its trials in the dataset's included conditions.
- **accuracy difference** (model, human, condition) = (acc_model - acc_human)^2.
- **observed consistency** c_obs = fraction of the human's images on which model and human are
  both right or both wrong; **error consistency** = Cohen's kappa (c_obs - c_exp) / (1 - c_exp),
  c_exp = p1 p2 + (1 - p1)(1 - p2) with p1, p2 the two accuracies; kappa = 1 when c_obs = 1.
- Aggregation of the three: per (human subject, condition), then the mean over conditions, then
  over subjects (`benchmark`), then over datasets (the evaluate stage). The human reference row
  ("humans") does the same over pairs of distinct subjects. Conditions listed in the toolbox's
  EXCLUDE_CONDITIONS for the dataset (control conditions, human accuracy < 0.2) are left out.
- **Shape bias** on cue-conflict images (Geirhos et al. ICLR 2019): rows whose shape category
  equals the texture category are dropped; of the rest, the decisions that name the shape count
  for shape, those that name the texture for texture; shape bias = shape / (shape + texture). The
  toolbox's fraction-correct-shape/-texture divide these counts by all trials.

Result tables use the toolbox's column names ("OOD accuracy", "accuracy difference", "observed
consistency", "error consistency"; "fraction-correct-shape", "fraction-correct-texture",
"shape-bias"; raw rows `model, human, dataset, metric, condition, value`) so they compare with
its published tables.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from data import label_maps

COLUMNS = (
    "subj",
    "session",
    "trial",
    "rt",
    "object_response",
    "category",
    "condition",
    "imagename",
)
HUMAN_PREFIX = "subject-"
PAIR_METRICS = ("accuracy difference", "observed consistency", "error consistency")
NO_CONDITION = "NaN"  # the toolbox's condition for datasets without conditions (e.g. cue-conflict)

# The toolbox's plotting/plot.py EXCLUDE_CONDITIONS: per dataset, conditions not counted in the
# benchmark (no manipulation, or mean human accuracy below 0.2).
EXCLUDE_CONDITIONS = {
    "colour": ("cr",),
    "contrast": ("c100", "c03", "c01"),
    "high-pass": ("inf", "0.55", "0.45", "0.4"),
    "low-pass": ("0", "15", "40"),
    "phase-scrambling": ("0", "150", "180"),
    "power-equalisation": ("0",),
    "false-colour": ("True",),
    "rotation": ("0",),
    "eidolonI": ("1-10-10", "64-10-10", "128-10-10"),
    "eidolonII": ("1-3-10", "32-3-10", "64-3-10", "128-3-10"),
    "eidolonIII": ("1-0-10", "16-0-10", "32-0-10", "64-0-10", "128-0-10"),
    "uniform-noise": ("0.0", "0.6", "0.9"),
}


def decisions(probs: np.ndarray, membership: np.ndarray) -> np.ndarray:
    """int [N]: the category decided for each image, from ImageNet probabilities [N, S] and the
    category map's membership [S, T] (mean over each category's classes, then argmax)."""
    return np.argmax(np.asarray(label_maps.target_scores(probs, membership, "mean")), axis=1)


def image_id(imagename: str) -> str:
    """The toolbox's short image id: "0000_cl_s01_bw_boat_40_n02951358_5952.JPEG" ->
    "n02951358_5952.JPEG" (an ImageNet file keeps its wnid), "0001_x_airplane1-bicycle2.png" ->
    "airplane1-bicycle2.png"; a path keeps only its file name."""
    parts = imagename.rsplit("/", 1)[-1].split("_")
    if len(parts) == 1:
        return parts[0]
    first, last = parts[-2:]
    return f"{first}_{last}" if first.startswith("n0") else last


def texture_category(imagename: str) -> str:
    """The texture class of a cue-conflict image name: "XXX_dog10-bird2.png" -> "bird"."""
    stem = imagename.rsplit("/", 1)[-1].split("_")[-1].split(".")[0]
    return "".join(ch for ch in stem.split("-")[-1] if not ch.isdigit())


def condition_from_name(imagename: str) -> str:
    """A condition from the toolbox's session file names
    (`<trial>_<x>_<subject>_<condition>_<category>_<...>`, its InfoMappingWithSessions); other
    names have none ("NaN")."""
    parts = imagename.rsplit("/", 1)[-1].split("_")
    return parts[3] if len(parts) >= 5 else NO_CONDITION


@dataclasses.dataclass(frozen=True)
class Trials:
    """Columns of the raw-data layout (str arrays of equal length); `session`, `trial` and `rt`
    are kept only to write the layout back."""

    subj: np.ndarray
    condition: np.ndarray
    imagename: np.ndarray
    category: np.ndarray
    object_response: np.ndarray

    @classmethod
    def of(cls, **columns: Iterable) -> "Trials":
        arrays = {
            f.name: np.asarray([str(v) for v in columns[f.name]], dtype=object)
            for f in dataclasses.fields(cls)
        }
        if len({len(a) for a in arrays.values()}) > 1:
            raise ValueError("trials: columns of different lengths")
        return cls(**arrays)

    def __len__(self) -> int:
        return len(self.subj)

    def select(self, rows: np.ndarray) -> "Trials":
        return Trials(**{f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)})

    def where(self, **equal: str) -> "Trials":
        rows = np.ones(len(self), bool)
        for column, value in equal.items():
            rows &= getattr(self, column) == value
        return self.select(rows)

    @property
    def image_ids(self) -> np.ndarray:
        return np.asarray([image_id(n) for n in self.imagename], dtype=object)

    @property
    def correct(self) -> np.ndarray:
        return self.object_response == self.category

    def subjects(self, humans: bool) -> list[str]:
        return sorted({s for s in self.subj if s.startswith(HUMAN_PREFIX) == humans})

    def csv_text(self) -> str:
        """The toolbox's raw-data layout (a model has no reaction time: rt "NaN")."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(COLUMNS)
        for i in range(len(self)):
            writer.writerow(
                [
                    self.subj[i],
                    1,
                    i + 1,
                    "NaN",
                    self.object_response[i],
                    self.category[i],
                    self.condition[i],
                    self.imagename[i],
                ]
            )
        return buffer.getvalue()


def read_raw_data(root: Path, dataset: str) -> Trials:
    """Every `<root>/<dataset>/*.csv` of the toolbox's raw data, as one table (column names
    lower-cased, as the toolbox reads them). Errors are one line naming the file."""
    directory = Path(root) / dataset
    files = sorted(directory.glob("*.csv"))
    if not files:
        raise ValueError(f"model-vs-human raw data: no CSV files in {directory}")
    columns: dict[str, list[str]] = {f.name: [] for f in dataclasses.fields(Trials)}
    for path in files:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = [c.lower() for c in reader.fieldnames or ()]
            missing = [c for c in columns if c not in header]
            if missing:
                raise ValueError(
                    f"{path}: column {missing[0]!r} is missing (the toolbox's raw-data layout has "
                    f"{', '.join(COLUMNS)})"
                )
            for row in reader:
                row = {k.lower(): v for k, v in row.items()}
                for c in columns:
                    columns[c].append(row[c])
    return Trials.of(**columns)


def accuracy(trials: Trials) -> float:
    """16-class accuracy: mean(object_response == category)."""
    if not len(trials):
        raise ValueError("16-class accuracy of no trials")
    return float(np.mean(trials.correct))


def cohens_kappa(observed: float, expected: float) -> float:
    """(c_obs - c_exp) / (1 - c_exp); 1 when the observed consistency is 1."""
    if observed == 1.0:
        return 1.0
    return (observed - expected) / (1.0 - expected)


def _paired(a: Trials, b: Trials) -> tuple[np.ndarray, np.ndarray]:
    """The two observers' `correct` on the same images (b's images, in b's order); a must have
    every image of b, once."""
    index = {}
    for i, key in enumerate(a.image_ids):
        if key in index:
            raise ValueError(
                f"model-vs-human: image {key!r} appears twice for observer {a.subj[i]!r}"
            )
        index[key] = i
    missing = [key for key in b.image_ids if key not in index]
    if missing:
        raise ValueError(
            f"model-vs-human: image {missing[0]!r} seen by {b.subj[0]!r} has no trial of "
            f"{a.subj[0] if len(a) else 'the other observer'!r}"
        )
    rows = np.asarray([index[key] for key in b.image_ids], np.int64)
    return a.correct[rows], b.correct


def consistency(a: Trials, b: Trials) -> dict[str, float]:
    """expected-, observed- and error-consistency of two observers over b's images (the toolbox's
    ErrorConsistency.analysis; p1 and p2 are the accuracies on those same trials)."""
    ca, cb = _paired(a, b)
    p1, p2 = float(ca.mean()), float(cb.mean())
    expected = p1 * p2 + (1 - p1) * (1 - p2)
    observed = float(np.mean(ca == cb))
    return {
        "expected-consistency": expected,
        "observed-consistency": observed,
        "error-consistency": cohens_kappa(observed, expected),
    }


def pair_metrics(a: Trials, b: Trials) -> dict[str, float]:
    """The three human-likeness metrics of observer a against observer b (b's images)."""
    ca, cb = _paired(a, b)
    c = consistency(a, b)
    return {
        "accuracy difference": float((ca.mean() - cb.mean()) ** 2),
        "observed consistency": c["observed-consistency"],
        "error consistency": c["error-consistency"],
    }


def with_conditions(model: Trials, humans: Trials) -> Trials:
    """The model's trials with each image's condition taken from the human trials of the same image
    (the model's image names need not carry it); images no human saw keep their own."""
    of_image = dict(zip(humans.image_ids, humans.condition))
    conditions = [of_image.get(key, own) for key, own in zip(model.image_ids, model.condition)]
    return dataclasses.replace(model, condition=np.asarray(conditions, dtype=object))


def included_conditions(
    trials: Trials, dataset: str, exclude: Sequence[str] | None = None
) -> list[str]:
    """Sorted conditions of the trials minus the excluded ones (default: the toolbox's list)."""
    excluded = set(EXCLUDE_CONDITIONS.get(dataset, ()) if exclude is None else exclude)
    return sorted(set(trials.condition) - excluded)


def _include(trials: Trials, conditions: Sequence[str]) -> Trials:
    return trials.select(np.isin(trials.condition, list(conditions)))


def benchmark(
    model: Trials, humans: Trials, dataset: str, exclude: Sequence[str] | None = None
) -> tuple[list[dict], dict[str, float], dict[str, float]]:
    """(raw rows, the model's summary, the human reference summary) for one dataset.

    raw rows: {model, human, dataset, metric, condition, value} per (model or human subject, human
    subject, included condition, metric), as the toolbox's get_raw_benchmark_df. Summaries: the
    three pair metrics averaged over conditions, then subjects; plus "OOD accuracy" (the model's,
    and for "humans" all human trials pooled), over the included conditions.
    """
    subjects = humans.subjects(humans=True)
    if not subjects:
        raise ValueError(
            f"model-vs-human {dataset}: the raw data has no human observer ({HUMAN_PREFIX}*)"
        )
    humans = humans.select(np.isin(humans.subj, subjects))
    model = with_conditions(model, humans)
    conditions = included_conditions(humans, dataset, exclude)
    if not conditions:
        raise ValueError(f"model-vs-human {dataset}: every condition is excluded")
    rows: list[dict] = []

    def compare(observer: Trials, name: str, others: Sequence[str]) -> None:
        for human in others:
            for condition in conditions:
                theirs = humans.where(subj=human, condition=condition)
                if not len(theirs):
                    continue
                values = pair_metrics(observer.where(condition=condition), theirs)
                rows.extend(
                    {
                        "model": name,
                        "human": human,
                        "dataset": dataset,
                        "metric": metric,
                        "condition": condition,
                        "value": values[metric],
                    }
                    for metric in PAIR_METRICS
                )

    model_name = model.subj[0] if len(model) else "model"
    compare(model, model_name, subjects)
    for i, subject in enumerate(subjects):  # each pair of distinct subjects once (toolbox: j > i)
        compare(humans.where(subj=subject), subject, subjects[i + 1 :])

    def summarize(selected: list[dict]) -> dict[str, float]:
        out = {}
        for metric in PAIR_METRICS:
            per_human: dict[str, list[float]] = {}
            for r in selected:
                if r["metric"] == metric:
                    per_human.setdefault((r["model"], r["human"]), []).append(r["value"])
            out[metric] = (
                float(np.mean([np.mean(v) for v in per_human.values()]))
                if per_human
                else float("nan")
            )
        return out

    model_summary = {
        "OOD accuracy": accuracy(_include(model, conditions)),
        **summarize([r for r in rows if r["model"] == model_name]),
    }
    human_summary = {
        "OOD accuracy": accuracy(_include(humans, conditions)),
        **summarize([r for r in rows if r["model"] != model_name]),
    }
    return rows, model_summary, human_summary


def shape_bias(
    decision: Sequence[str], shape: Sequence[str], texture: Sequence[str]
) -> dict[str, float]:
    """Shape bias of cue-conflict decisions (category names); see the module docstring."""
    decision, shape, texture = (
        np.asarray(list(v), dtype=object) for v in (decision, shape, texture)
    )
    if not len(decision):
        raise ValueError("shape bias of no trials")
    conflict = shape != texture
    shape_hits = int(np.sum(conflict & (decision == shape)))
    texture_hits = int(np.sum(conflict & (decision == texture)))
    n = len(decision)
    return {
        "fraction-correct-shape": shape_hits / n,
        "fraction-correct-texture": texture_hits / n,
        "shape-bias": shape_hits / (shape_hits + texture_hits)
        if shape_hits + texture_hits
        else float("nan"),
    }


def human_shape_bias(humans: Trials) -> dict[str, float]:
    """Shape bias of the human observers' cue-conflict trials (shape = `category`, texture from the
    image name), all subjects pooled."""
    humans = humans.select(np.isin(humans.subj, humans.subjects(humans=True)))
    return shape_bias(
        humans.object_response, humans.category, [texture_category(n) for n in humans.imagename]
    )


def mean_over_datasets(summaries: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The toolbox's last aggregation step: each metric's mean over the datasets that have it."""
    metrics = sorted({m for s in summaries.values() for m in s})
    return {m: float(np.mean([s[m] for s in summaries.values() if m in s])) for m in metrics}
