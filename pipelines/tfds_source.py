"""A TFDS dataset already prepared in a local data_dir, as a source for `pipelines.prepare`
(tfrecord or array_record files, read directly; never downloads, no TensorFlow import).
"""

from __future__ import annotations

import difflib
import fnmatch
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data import records
from pipelines.source_types import RawExample, SourceError, SourceInfo


# --- TFDS (local data_dir only) -----------------------------------------------------------------

# Our schema field -> the TFDS feature it comes from, for datasets whose names differ from the
# defaults (image <- "image", label <- "label", id <- "id" | "file_name" | TFDS id).
TFDS_FIELD_MAP: dict[str, dict[str, str | None]] = {
    "imagenet2012_real": {"label": "original_label", "real_labels": "real_label"},
    "celeb_a": {"label": None, "attributes": "attributes"},
    "coco_captions": {"label": None, "text": "captions/text"},
}
# Caption features looked for when a dataset has no entry above (flattened Example keys).
CAPTION_FEATURES = ("caption", "captions/text", "text")
_ARRAY_RECORD_CHUNK = 1024


def _version_dirs(directory: Path) -> list[Path]:
    """Complete version dirs (`<version>/dataset_info.json`) one or two levels (config) below."""
    found = list(directory.glob("*/dataset_info.json")) + list(
        directory.glob("*/*/dataset_info.json")
    )
    return sorted(
        p.parent for p in found if not p.parent.name.startswith(("incomplete.", "."))
    )  # interrupted builds


def find_tfds_dir(name: str, data_dir: str) -> Path:
    """`name[/config][:version]` -> the prepared version dir under data_dir (never downloads).
    `version` may use TFDS wildcards (`5.*.*`); the newest match wins. Errors name what is there:
    the datasets (closest first), configs and versions, or that data_dir points into a dataset."""
    base_name, _, version = name.partition(":")
    root = Path(data_dir).expanduser()
    base = root / base_name
    hint = (
        f"this job never downloads: prepare it first (e.g. `tfds build {base_name.split('/')[0]} "
        f"--data_dir {root}`, or place the TFDS files there)"
    )
    if not base.is_dir():
        dataset = root / base_name.split("/")[0]
        if dataset.is_dir():  # the config is what is missing
            configs = sorted(
                {p.parent.relative_to(root).as_posix() for p in _version_dirs(dataset)}
            )
            raise SourceError(
                f"tfds: {base_name!r} is not prepared under {str(root)!r}; prepared: {configs}"
            )
        version_dir, dataset_dir = (
            (root / "dataset_info.json").is_file(),
            any(root.glob("*/dataset_info.json")),
        )
        if version_dir or dataset_dir:  # data_dir names a dataset's own dir or one of its versions
            raise SourceError(
                f"tfds: tfds_data_dir {str(root)!r} is itself inside a prepared dataset (it holds "
                f"dataset_info.json): give the data dir that holds <dataset>/<version>/, "
                f"e.g. {str(root.parent if dataset_dir else root.parent.parent)!r}"
            )
        present = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
        close = difflib.get_close_matches(
            base_name.lower(), [d.lower() for d in present], n=3, cutoff=0.6
        )
        guess = f"; did you mean {[d for d in present if d.lower() in close]}?" if close else ""
        raise SourceError(
            f"tfds: dataset {base_name!r} is not prepared under {str(root)!r} "
            f"(no {str(base)!r}){guess}; {hint}"
        )
    infos = _version_dirs(base)
    configs = sorted({p.parent.relative_to(base).as_posix() for p in infos} - {"."})
    if len(configs) > 1:
        raise SourceError(
            f"tfds: {base_name!r} has several configs under {str(base)!r} "
            f"({configs}); name one as {base_name}/<config>"
        )
    if version:
        matching = [p for p in infos if fnmatch.fnmatchcase(p.name, version)]
        if not matching and infos:
            raise SourceError(
                f"tfds: {base_name!r} has no version {version!r} under {str(base)!r}; "
                f"prepared versions: {[p.name for p in infos]}"
            )
        infos = matching
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
            raise SourceError(
                f"tfds: {name!r} needs tfds_data_dir (a local dir with prepared data)"
            )
        import tensorflow_datasets as tfds  # reading metadata does not import TensorFlow

        self.name = name
        self.version_dir = find_tfds_dir(name, data_dir)
        builder = tfds.builder_from_directory(str(self.version_dir))
        self._info = builder.info
        self.file_format = str(
            getattr(self._info.file_format, "value", self._info.file_format) or "tfrecord"
        )
        features = self._info.features
        mapping = {
            "image": "image",
            "label": "label",
            "real_labels": None,
            "attributes": None,
            "text": None,
        }
        known = TFDS_FIELD_MAP.get(name.split("/")[0].split(":")[0], {})
        if "text" not in known:  # e.g. "caption" (Text), "captions" (Sequence({"text": Text}))
            flat = set(features.keys()) | {
                f"{k}/text"
                for k in features.keys()
                if hasattr(features[k], "feature")
                and "text" in getattr(features[k].feature, "keys", lambda: ())()
            }
            mapping["text"] = next((f for f in CAPTION_FEATURES if f in flat), None)
        mapping.update(known)
        if mapping["label"] is not None and mapping["label"] not in features:
            mapping["label"] = None
        if mapping["image"] not in features:
            raise SourceError(
                f"tfds: {name!r} has no 'image' feature (features: {sorted(features.keys())})"
            )
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
        feats = tuple(k for k in ("real_labels", "attributes", "text") if self.mapping.get(k))
        desc = {
            "type": "tfds",
            "name": self.name,
            "version_dir": str(self.version_dir),
            "file_format": self.file_format,
            "label_feature": self.mapping["label"],
            "id_feature": self.id_key or "tfds_id",
        }
        if self.attribute_names:
            desc["attribute_names"] = list(self.attribute_names)
        return SourceInfo(self.class_names, feats, desc)

    def tasks(self, selector: str) -> list[tuple[str, int, int]]:
        try:
            instructions = self._info.splits[selector].file_instructions
        except (KeyError, ValueError) as e:
            raise SourceError(
                f"tfds: {self.name!r} has no split {selector!r} "
                f"(splits: {sorted(self._info.splits.keys())}): {e}"
            ) from e
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
                yield RawExample(
                    id=tfds_id, source=tfds_id, error=("bad_metadata", f"{type(e).__name__}: {e}")
                )

    def _convert(self, ex: dict[str, tuple], tfds_id: str) -> RawExample:
        m = self.mapping
        rid = ex[self.id_key][0].decode("utf-8") if self.id_key and ex.get(self.id_key) else tfds_id
        images_ = ex.get(m["image"], ())
        if len(images_) != 1:
            return RawExample(
                id=rid, source=tfds_id, error=("bad_metadata", f"{len(images_)} images")
            )
        fields: dict[str, Any] = {
            "label": tuple(int(v) for v in ex[m["label"]]) if m["label"] else ()
        }
        if m["real_labels"]:
            fields["real_labels"] = tuple(int(v) for v in ex.get(m["real_labels"], ()))
        if self.attribute_names:
            fields["attributes"] = tuple(
                int(ex[f"{m['attributes']}/{a}"][0]) for a in self.attribute_names
            )
        if m.get("text"):  # every caption of the example (LiT draws one per step)
            captions = tuple(v.decode("utf-8") for v in ex.get(m["text"], ()) if v)
            if not captions:
                return RawExample(
                    id=rid, source=tfds_id, error=("bad_metadata", f"no caption in {m['text']!r}")
                )
            fields["text"] = captions
        return RawExample(id=rid, source=tfds_id, image=images_[0], **fields)
