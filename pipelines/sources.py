"""Readers feeding `pipelines.prepare`: a local TFDS dataset, an image folder (+ optional CSV),
the model-vs-human cue-conflict layout, and scikit-learn's bundled digits (offline dry-runs).

Every source works in three steps so a large dataset never travels through the pipeline graph:
`tasks(selector)` runs in the driver and returns a few small picklable units (a class dir, a TFDS
shard, a chunk of digits); `expand(task)` runs on workers and lists cheap references (paths,
record ranges); `read(ref)` reads the bytes and yields `RawExample`s. Reading failures are not
exceptions: they come back as a RawExample with `error=(reason, detail)` for the dead letters.

Modules: this one holds the digits source and `make_source` (config -> source);
pipelines/source_types.py the shared types; pipelines/tfds_source.py the TFDS reader;
pipelines/folder_sources.py the image-folder and cue-conflict sources.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator

import numpy as np

from data import images
from pipelines.folder_sources import CueConflictSource, FolderSource
from pipelines.source_types import RawExample, SourceError, SourceInfo
from pipelines.tfds_source import TfdsSource

SOURCE_KINDS = ("digits", "tfds", "folder", "cue_conflict")


# --- scikit-learn digits ------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    d = load_digits()
    return d.images, d.target


@functools.lru_cache(maxsize=1)
def _heavy_ink() -> np.ndarray:
    """bool [1797]: the digit's mean ink (its native 8x8 intensities, 0-16) is above the median
    over all 1,797 digits. A real property of the pixels, independent of the rendered size and of
    the split, that correlates with the class (a 1 has little ink, an 8 or a 0 much), so subgroup
    accuracies and positive-prediction rates differ between the two groups: the fairness metrics'
    "sensitive attribute" for the dry-run."""
    ink = _digits()[0].mean(axis=(1, 2))
    return ink > np.median(ink)


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Caption templates for the digits (LiT's text on the offline data): {w} = the digit in words,
# {d} = as a numeral. Each image gets three of them, chosen by its index.
CAPTION_TEMPLATES = (
    "a handwritten {w}",
    "the digit {d}",
    "a photo of the number {w}",
    "a {w} written by hand",
    "the number {d}, handwritten",
    "an image of a {w}",
    "a blurry {w}",
    "a small {d}",
)


def digit_captions(label: int, index: int) -> tuple[str, ...]:
    """Three varied captions of a digit image (deterministic in its sklearn index)."""
    picks = [(index + k * 3) % len(CAPTION_TEMPLATES) for k in range(3)]
    return tuple(CAPTION_TEMPLATES[i].format(w=DIGIT_WORDS[label], d=label) for i in picks)


class DigitsSource:
    """sklearn's 1,797 8x8 digits, upscaled to `image_size`, as PNG bytes (so they take the same
    decode/validate path as real files). Splits are a fixed permutation (seed 0): 80% train,
    10% val, 10% test; "all" is everything. One binary attribute per record, `heavy_ink`
    (`_heavy_ink`), for the fairness metrics, and three captions (`digit_captions`) for LiT."""

    ATTRIBUTES = ("heavy_ink",)
    kind = "digits"
    FRACTIONS = {"train": (0.0, 0.8), "val": (0.8, 0.9), "test": (0.9, 1.0), "all": (0.0, 1.0)}
    CHUNK = 256

    def __init__(self, image_size: int = 32):
        if image_size < 8:
            raise SourceError(
                f"digits: image_size must be >= 8 (the native size), got {image_size}"
            )
        self.image_size = image_size

    def info(self) -> SourceInfo:
        return SourceInfo(
            tuple(str(i) for i in range(10)),
            ("attributes", "text"),
            {
                "type": "digits",
                "library": "sklearn.datasets.load_digits",
                "image_size": self.image_size,
                "split_seed": 0,
                "attribute_names": list(self.ATTRIBUTES),
            },
        )

    def _indices(self, selector: str) -> np.ndarray:
        if selector not in self.FRACTIONS:
            raise SourceError(
                f"digits: unknown split {selector!r}; choose from {sorted(self.FRACTIONS)}"
            )
        n = len(_digits()[1])
        lo, hi = self.FRACTIONS[selector]
        return np.sort(np.random.default_rng(0).permutation(n)[round(lo * n) : round(hi * n)])

    def tasks(self, selector: str) -> list[tuple[int, ...]]:
        idx = self._indices(selector).tolist()
        return [tuple(idx[i : i + self.CHUNK]) for i in range(0, len(idx), self.CHUNK)]

    def expand(self, task: tuple[int, ...]) -> Iterable[int]:
        return task

    def read(self, index: int) -> Iterator[RawExample]:
        import cv2

        imgs, target = _digits()
        gray = np.round(imgs[index] * (255 / 16)).astype(np.uint8)
        gray = cv2.resize(gray, (self.image_size, self.image_size), interpolation=cv2.INTER_LINEAR)
        yield RawExample(
            id=f"digits/{index:04d}",
            source=f"sklearn.digits[{index}]",
            image=images.encode_png(np.repeat(gray[..., None], 3, axis=-1)),
            label=(int(target[index]),),
            attributes=(int(_heavy_ink()[index]),),
            text=digit_captions(int(target[index]), index),
        )


# --- construction from a dataset config -----------------------------------------------------------


def make_source(dataset: str, dcfg, selectors: Iterable[str]):
    """Builds the source for one dataset config group (see pipelines.prepare.dataset_config).

    `dcfg` must have passed pipelines.prepare.validate_config (its only caller, prepare._plan,
    runs after it): that is what rejects an unknown kind, a missing root and a digits
    image_size below the limit, so none of them is checked again here."""
    selectors = tuple(selectors)
    kind = dcfg.source
    if kind == "digits":
        return DigitsSource(dcfg.image_size)
    if kind == "tfds":
        return TfdsSource(dcfg.tfds_name or dataset, dcfg.tfds_data_dir)
    if kind == "folder":
        return FolderSource(dcfg.root, selectors, dcfg.csv)
    return CueConflictSource(dcfg.root, selectors)  # the one kind left in SOURCE_KINDS
