"""Readers feeding `pipelines.prepare`: a local TFDS dataset, an image folder (+ optional CSV),
the model-vs-human cue-conflict layout, and scikit-learn's bundled digits (offline dry-runs).

Every source works in three steps so a large dataset never travels through the pipeline graph:
`tasks(selector)` runs in the driver and returns a few small picklable units (a class dir, a TFDS
shard, a chunk of digits); `expand(task)` runs on workers and lists cheap references (paths,
record ranges); `read(ref)` reads the bytes and yields `RawExample`s. Reading failures are not
exceptions: they come back as a RawExample with `error=(reason, detail)` for the dead letters.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import os
import re
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from data import images, records

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
SOURCE_KINDS = ("digits", "tfds", "folder", "cue_conflict")


class SourceError(ValueError):
    """A source is misconfigured or missing (not a per-image problem)."""


@dataclasses.dataclass(frozen=True)
class RawExample:
    """One input before validation; `error` set means it could not even be read."""
    id: str
    source: str
    image: bytes = b""
    label: tuple[int, ...] = ()
    real_labels: tuple[int, ...] | None = None
    attributes: tuple[int, ...] | None = None
    text: str | None = None
    shape_label: int | None = None
    texture_label: int | None = None
    error: tuple[str, str] | None = None


@dataclasses.dataclass(frozen=True)
class SourceInfo:
    """What the manifest says about the data: classes, optional features, provenance."""
    class_names: tuple[str, ...]
    features: tuple[str, ...]        # optional record features this source fills
    description: dict[str, Any]     # the manifest's "source" object


def _read_file(path: Path, source_id: str, rel: str, **fields) -> RawExample:
    try:
        data = path.read_bytes()
    except OSError as e:
        return RawExample(id=rel, source=source_id, error=("unreadable", f"{type(e).__name__}: {e}"))
    return RawExample(id=rel, source=source_id, image=data, **fields)


def _image_files(directory: Path, recursive: bool) -> list[Path]:
    it = directory.rglob("*") if recursive else directory.iterdir()
    return sorted(p for p in it if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


# --- scikit-learn digits ------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download
    d = load_digits()
    return d.images, d.target


class DigitsSource:
    """sklearn's 1,797 8x8 digits, upscaled to `image_size`, as PNG bytes (so they take the same
    decode/validate path as real files). Splits are a fixed permutation (seed 0): 80% train,
    10% val, 10% test; "all" is everything."""
    kind = "digits"
    FRACTIONS = {"train": (0.0, 0.8), "val": (0.8, 0.9), "test": (0.9, 1.0), "all": (0.0, 1.0)}
    CHUNK = 256

    def __init__(self, image_size: int = 32):
        if image_size < 8:
            raise SourceError(f"digits: image_size must be >= 8 (the native size), got {image_size}")
        self.image_size = image_size

    def info(self) -> SourceInfo:
        return SourceInfo(tuple(str(i) for i in range(10)), (),
                          {"type": "digits", "library": "sklearn.datasets.load_digits",
                           "image_size": self.image_size, "split_seed": 0})

    def _indices(self, selector: str) -> np.ndarray:
        if selector not in self.FRACTIONS:
            raise SourceError(f"digits: unknown split {selector!r}; choose from {sorted(self.FRACTIONS)}")
        n = len(_digits()[1])
        lo, hi = self.FRACTIONS[selector]
        return np.sort(np.random.default_rng(0).permutation(n)[round(lo * n):round(hi * n)])

    def tasks(self, selector: str) -> list[tuple[int, ...]]:
        idx = self._indices(selector).tolist()
        return [tuple(idx[i:i + self.CHUNK]) for i in range(0, len(idx), self.CHUNK)]

    def expand(self, task: tuple[int, ...]) -> Iterable[int]:
        return task

    def read(self, index: int) -> Iterator[RawExample]:
        import cv2
        imgs, target = _digits()
        gray = np.round(imgs[index] * (255 / 16)).astype(np.uint8)
        gray = cv2.resize(gray, (self.image_size, self.image_size), interpolation=cv2.INTER_LINEAR)
        yield RawExample(id=f"digits/{index:04d}", source=f"sklearn.digits[{index}]",
                         image=images.encode_png(np.repeat(gray[..., None], 3, axis=-1)),
                         label=(int(target[index]),))


# --- directory trees ------------------------------------------------------------------------------

class _DirectorySource:
    """A root dir whose split selectors are sub-dirs ("" = the root) holding one dir per class."""
    kind = ""

    def __init__(self, root: str, selectors: Iterable[str]):
        self.root = Path(root)
        if not self.root.is_dir():
            raise SourceError(f"{self.kind}: root {str(self.root)!r} is not a directory")
        self.selectors = tuple(selectors)

    def _split_dir(self, selector: str) -> Path:
        d = self.root / selector if selector else self.root
        if not d.is_dir():
            raise SourceError(f"{self.kind}: split dir {str(d)!r} does not exist")
        return d

    def _class_dirs(self) -> set[str]:
        """Names of the (non-hidden) sub-dirs of every split dir."""
        return {p.name for sel in self.selectors for p in self._split_dir(sel).iterdir()
                if p.is_dir() and not p.name.startswith(".")}

    def _set_classes(self, ordered: Iterable[str]) -> None:
        self.class_names = tuple(ordered)
        self._class_index = {n: i for i, n in enumerate(self.class_names)}


# --- image folder -------------------------------------------------------------------------------

class FolderSource(_DirectorySource):
    """`<root>/<selector>/<class>/*.{jpg,png,...}` (selector "" = root itself); images directly
    in the split dir are unlabeled. Class ids are the sorted class-dir names across all splits.

    Optional CSV (`csv`: absolute, or relative to each split dir) with a header naming `id`
    (path relative to the split dir) and any of `label`/`labels` (whitespace-separated class
    names or ids), `attributes` (whitespace-separated ints), `text`. With a CSV its rows ARE the
    inputs (a row whose file is missing is dead-lettered as "unreadable"); an empty label cell
    falls back to the class dir.
    """
    kind = "folder"
    CSV_CHUNKS = 16

    def __init__(self, root: str, selectors: Iterable[str], csv_path: str = ""):
        super().__init__(root, selectors)
        self.csv_path = csv_path
        names = self._class_dirs()
        self._columns: set[str] = set()
        max_id = -1
        for sel in self.selectors:
            for row in self._csv_rows(sel) or ():
                self._columns.update(row)
                tokens = row.get("label", "").split()
                names.update(t for t in tokens if not t.isdigit())
                max_id = max([max_id] + [int(t) for t in tokens if t.isdigit()])
        if not names and max_id >= 0:  # flat folder, integer labels only: classes "0".."max"
            self._set_classes(str(i) for i in range(max_id + 1))
        else:
            self._set_classes(sorted(names))

    def _csv_file(self, selector: str) -> Path | None:
        if not self.csv_path:
            return None
        p = Path(self.csv_path)
        return p if p.is_absolute() else self._split_dir(selector) / p

    def _csv_rows(self, selector: str) -> list[dict[str, str]] | None:
        path = self._csv_file(selector)
        if path is None:
            return None
        if not path.is_file():
            raise SourceError(f"folder: csv {str(path)!r} does not exist")
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            cols = [c.strip() for c in (reader.fieldnames or [])]
            if "id" not in cols:
                raise SourceError(f"{path}: header must name an 'id' column, got {cols}")
            extra = set(cols) - {"id", "label", "labels", "attributes", "text"}
            if extra:
                raise SourceError(f"{path}: unknown column(s) {sorted(extra)}")
            rows = []
            for row in reader:
                row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
                if "labels" in row:
                    row["label"] = row.pop("labels")
                rows.append(row)
        return rows

    def info(self) -> SourceInfo:
        feats = tuple(k for k in ("attributes", "text") if k in self._columns)
        return SourceInfo(self.class_names, feats,
                          {"type": "folder", "root": str(self.root.resolve()), "csv": self.csv_path})

    def tasks(self, selector: str) -> list[tuple]:
        split_dir = self._split_dir(selector)
        if self.csv_path:
            return [("csv", selector, k) for k in range(self.CSV_CHUNKS)]
        dirs = [("dir", selector, "")]
        dirs += [("dir", selector, p.name) for p in sorted(split_dir.iterdir())
                 if p.is_dir() and not p.name.startswith(".")]
        return dirs

    def expand(self, task: tuple) -> Iterator[tuple]:
        kind, selector, arg = task
        split_dir = self._split_dir(selector)
        if kind == "dir":
            for p in _image_files(split_dir / arg if arg else split_dir, recursive=bool(arg)):
                yield ("file", selector, p.relative_to(split_dir).as_posix(), None)
            return
        for i, row in enumerate(self._csv_rows(selector)):
            if i % self.CSV_CHUNKS == arg:
                yield ("row", selector, row.get("id", ""), {**row, "_line": str(i + 2)})

    def _parse_row(self, row: dict[str, str], rel: str) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        labels = []
        for tok in row.get("label", "").split():
            if tok.isdigit():
                if int(tok) >= len(self.class_names) and self.class_names:
                    raise ValueError(f"label id {tok} >= {len(self.class_names)} classes")
                labels.append(int(tok))
            else:
                labels.append(self._class_index[tok])
        if not labels:
            labels = self._dir_label(rel)
        fields["label"] = tuple(labels)
        if "attributes" in row:
            fields["attributes"] = tuple(int(t) for t in row["attributes"].split())
        if "text" in row:
            fields["text"] = row["text"]
        return fields

    def _dir_label(self, rel: str) -> list[int]:
        parts = rel.split("/")
        return [self._class_index[parts[0]]] if len(parts) > 1 and parts[0] in self._class_index else []

    def read(self, ref: tuple) -> Iterator[RawExample]:
        kind, selector, rel, row = ref
        path = self._split_dir(selector) / rel
        if kind == "file":
            yield _read_file(path, str(path), rel, label=tuple(self._dir_label(rel)))
            return
        line = row.pop("_line")
        csv_file = self._csv_file(selector)
        # the same file may be listed twice: the source names the CSV line to tell them apart
        source = f"{path} ({csv_file.name} line {line})"
        if not rel:
            yield RawExample(id=f"{csv_file.name}:{line}", source=source,
                             error=("bad_metadata", "empty 'id' cell"))
            return
        try:
            fields = self._parse_row(row, rel)
        except (ValueError, KeyError) as e:
            yield RawExample(id=rel, source=source, error=("bad_metadata", f"csv line {line} {row}: {e}"))
            return
        yield _read_file(path, source, rel, **fields)


# --- model-vs-human cue conflict ----------------------------------------------------------------

_CUE_NAME = re.compile(r"^(?P<shape>[a-z]+)(?P<n>\d+)-(?P<texture>[a-z]+)(?P<m>\d+)\.png$")


class CueConflictSource(_DirectorySource):
    """Geirhos et al. stimuli: `<root>/<selector>/<shape>/<shape>N-<texture>M.png`; label and
    shape_label are the shape's class id, texture_label the texture's (class ids = sorted shape
    dirs, i.e. the 16 model-vs-human classes)."""
    kind = "cue_conflict"

    def __init__(self, root: str, selectors: Iterable[str]):
        super().__init__(root, selectors)
        names = self._class_dirs()
        if not names:
            raise SourceError(f"cue_conflict: no <shape>/ dirs under {str(self.root)!r}")
        self._set_classes(sorted(names))

    def info(self) -> SourceInfo:
        return SourceInfo(self.class_names, ("shape_label", "texture_label"),
                          {"type": "cue_conflict", "root": str(self.root.resolve())})

    def tasks(self, selector: str) -> list[tuple[str, str]]:
        return [(selector, name) for name in self.class_names
                if (self._split_dir(selector) / name).is_dir()]

    def expand(self, task: tuple[str, str]) -> Iterator[tuple[str, str]]:
        selector, shape = task
        split_dir = self._split_dir(selector)
        for p in _image_files(split_dir / shape, recursive=False):
            yield selector, p.relative_to(split_dir).as_posix()

    def read(self, ref: tuple[str, str]) -> Iterator[RawExample]:
        selector, rel = ref
        path = self._split_dir(selector) / rel
        shape_dir, name = rel.split("/")
        m = _CUE_NAME.match(name)
        index = self._class_index
        if not m or m["shape"] != shape_dir or m["texture"] not in index:
            why = ("name is not <shape>N-<texture>M.png" if not m else
                   f"shape {m['shape']!r} is not its dir {shape_dir!r}" if m["shape"] != shape_dir else
                   f"texture {m['texture']!r} is not a class")
            yield RawExample(id=rel, source=str(path), error=("bad_name", why))
            return
        shape = index[shape_dir]
        yield _read_file(path, str(path), rel, label=(shape,), shape_label=shape,
                         texture_label=index[m["texture"]])


# --- TFDS (local data_dir only) -----------------------------------------------------------------

# Our schema field -> the TFDS feature it comes from, for datasets whose names differ from the
# defaults (image <- "image", label <- "label", id <- "id" | "file_name" | TFDS id).
TFDS_FIELD_MAP: dict[str, dict[str, str | None]] = {
    "imagenet2012_real": {"label": "original_label", "real_labels": "real_label"},
    "celeb_a": {"label": None, "attributes": "attributes"},
}
_ARRAY_RECORD_CHUNK = 1024


def find_tfds_dir(name: str, data_dir: str) -> Path:
    """`name[/config][:version]` -> the prepared version dir under data_dir (never downloads)."""
    base_name, _, version = name.partition(":")
    root = Path(data_dir).expanduser()
    base = root / base_name
    hint = (f"this job never downloads: prepare it first (e.g. `tfds build {base_name} "
            f"--data_dir {root}`, or place the TFDS files there)")
    if not base.is_dir():
        raise SourceError(f"tfds: dataset {base_name!r} is not prepared under {str(root)!r} "
                          f"(no {str(base)!r}); {hint}")
    infos = sorted(p.parent for p in list(base.glob("*/dataset_info.json")) + list(base.glob("*/*/dataset_info.json"))
                   if not p.parent.name.startswith(("incomplete.", ".")))  # interrupted tfds builds
    if version:
        infos = [p for p in infos if p.name == version]
    configs = sorted({p.parent.relative_to(base).as_posix() for p in infos} - {"."})
    if len(configs) > 1:
        raise SourceError(f"tfds: {base_name!r} has several configs under {str(base)!r} "
                          f"({configs}); name one as {base_name}/<config>")
    if not infos:
        raise SourceError(f"tfds: no dataset_info.json for {name!r} under {str(base)!r}; {hint}")

    def version_key(p: Path):
        return tuple(int(x) if x.isdigit() else -1 for x in p.name.split("."))
    return max(infos, key=version_key)


def _class_names(feature) -> tuple[str, ...]:
    feature = getattr(feature, "feature", feature)  # Sequence(ClassLabel) -> ClassLabel
    return tuple(getattr(feature, "names", ()) or ())


def _read_tfrecord(path: str, skip: int, take: int) -> Iterator[bytes]:
    """Records [skip, skip+take) of an uncompressed TFRecord file (take < 0: to the end)."""
    with open(path, "rb") as f:
        i = 0
        while take < 0 or i < skip + take:
            header = f.read(12)
            if not header:
                return
            if len(header) != 12:
                raise IOError(f"{path}: truncated TFRecord header at record {i}")
            (length,) = struct.unpack("<Q", header[:8])
            if i < skip:
                f.seek(length + 4, os.SEEK_CUR)
            else:
                data = f.read(length)
                if len(data) != length or len(f.read(4)) != 4:
                    raise IOError(f"{path}: truncated TFRecord data at record {i}")
                yield data
            i += 1


class TfdsSource:
    """A TFDS dataset already prepared in a local `data_dir` (tfrecord or array_record files).
    The files are read directly and parsed with data.records (no TensorFlow import)."""
    kind = "tfds"

    def __init__(self, name: str, data_dir: str):
        if not data_dir:
            raise SourceError(f"tfds: {name!r} needs tfds_data_dir (a local dir with prepared data)")
        import tensorflow_datasets as tfds  # reading metadata does not import TensorFlow

        self.name = name
        self.version_dir = find_tfds_dir(name, data_dir)
        builder = tfds.builder_from_directory(str(self.version_dir))
        self._info = builder.info
        self.file_format = str(getattr(self._info.file_format, "value", self._info.file_format) or "tfrecord")
        features = self._info.features
        mapping = {"image": "image", "label": "label", "real_labels": None, "attributes": None}
        mapping.update(TFDS_FIELD_MAP.get(name.split("/")[0].split(":")[0], {}))
        if mapping["label"] is not None and mapping["label"] not in features:
            mapping["label"] = None
        if mapping["image"] not in features:
            raise SourceError(f"tfds: {name!r} has no 'image' feature (features: {sorted(features.keys())})")
        self.id_key = next((k for k in ("id", "file_name") if k in features), None)
        self.attribute_names: tuple[str, ...] = ()
        if mapping["attributes"]:
            self.attribute_names = tuple(sorted(features[mapping["attributes"]].keys()))
        self.mapping = mapping
        self.class_names = _class_names(features[mapping["label"]]) if mapping["label"] else ()

    def __getstate__(self):
        # Workers only read files: the DatasetInfo (features, split metadata) stays in the driver.
        return {**self.__dict__, "_info": None}

    def split_names(self) -> list[str]:
        return sorted(self._info.splits.keys())

    def info(self) -> SourceInfo:
        feats = tuple(k for k in ("real_labels", "attributes") if self.mapping.get(k))
        desc = {"type": "tfds", "name": self.name, "version_dir": str(self.version_dir),
                "file_format": self.file_format, "label_feature": self.mapping["label"],
                "id_feature": self.id_key or "tfds_id"}
        if self.attribute_names:
            desc["attribute_names"] = list(self.attribute_names)
        return SourceInfo(self.class_names, feats, desc)

    def tasks(self, selector: str) -> list[tuple[str, int, int]]:
        try:
            instructions = self._info.splits[selector].file_instructions
        except (KeyError, ValueError) as e:
            raise SourceError(f"tfds: {self.name!r} has no split {selector!r} "
                              f"(splits: {sorted(self._info.splits.keys())}): {e}") from e
        return [(os.fspath(fi.filename), int(fi.skip), int(fi.take)) for fi in instructions]

    def expand(self, task: tuple[str, int, int]) -> Iterator[tuple[str, int, int]]:
        path, skip, take = task
        if self.file_format != "array_record" or take < 0:
            yield task  # tfrecord: sequential only, one reader per file instruction
            return
        for start in range(skip, skip + take, _ARRAY_RECORD_CHUNK):
            yield path, start, min(_ARRAY_RECORD_CHUNK, skip + take - start)

    def _raw(self, path: str, skip: int, take: int) -> Iterator[bytes]:
        if self.file_format == "array_record":
            from array_record.python import array_record_module
            reader = array_record_module.ArrayRecordReader(path)
            try:
                end = reader.num_records() if take < 0 else skip + take
                yield from reader.read(skip, end)
            finally:
                reader.close()
        else:
            yield from _read_tfrecord(path, skip, take)

    def read(self, ref: tuple[str, int, int]) -> Iterator[RawExample]:
        path, skip, take = ref
        basename = os.path.basename(path)
        for i, raw in enumerate(self._raw(path, skip, take), start=skip):
            tfds_id = f"{basename}__{i}"
            try:
                ex = records.parse_example(raw)
                yield self._convert(ex, tfds_id)
            except (records.RecordError, KeyError, IndexError, UnicodeDecodeError) as e:
                yield RawExample(id=tfds_id, source=tfds_id, error=("bad_metadata", f"{type(e).__name__}: {e}"))

    def _convert(self, ex: dict[str, tuple], tfds_id: str) -> RawExample:
        m = self.mapping
        rid = ex[self.id_key][0].decode("utf-8") if self.id_key and ex.get(self.id_key) else tfds_id
        images_ = ex.get(m["image"], ())
        if len(images_) != 1:
            return RawExample(id=rid, source=tfds_id, error=("bad_metadata", f"{len(images_)} images"))
        fields: dict[str, Any] = {"label": tuple(int(v) for v in ex[m["label"]]) if m["label"] else ()}
        if m["real_labels"]:
            fields["real_labels"] = tuple(int(v) for v in ex.get(m["real_labels"], ()))
        if self.attribute_names:
            fields["attributes"] = tuple(int(ex[f"{m['attributes']}/{a}"][0]) for a in self.attribute_names)
        return RawExample(id=rid, source=tfds_id, image=images_[0], **fields)


# --- construction from a dataset config -----------------------------------------------------------

def make_source(dataset: str, dcfg, selectors: Iterable[str]):
    """Builds the source for one dataset config group (see pipelines.prepare.dataset_config)."""
    selectors = tuple(selectors)
    kind = dcfg.source
    if kind == "digits":
        return DigitsSource(dcfg.image_size or 32)
    if kind == "tfds":
        return TfdsSource(dcfg.tfds_name or dataset, dcfg.tfds_data_dir)
    if kind == "folder":
        if not dcfg.root:
            raise SourceError(f"dataset {dataset!r}: source 'folder' needs root")
        return FolderSource(dcfg.root, selectors, dcfg.csv)
    if kind == "cue_conflict":
        if not dcfg.root:
            raise SourceError(f"dataset {dataset!r}: source 'cue_conflict' needs root")
        return CueConflictSource(dcfg.root, selectors)
    raise SourceError(f"dataset {dataset!r}: unknown source {kind!r}; choose from {SOURCE_KINDS}")

