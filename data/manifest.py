"""manifest.json of one prepared split (docs/DESIGN.md §3): read, write atomically, validate.

`<prepare out>/<dataset>/<split>/manifest.json`:
`{dataset, split, num_records, num_classes, class_names, image_size, features,
  shards: [{path, num_records, sha256}], dead_letters, num_dead_letters, source}`
Shard and dead-letter paths are relative to the split directory, so a split dir can be moved or
copied as a unit. Readers call `validate()` before training: every error is one line naming the
file and the field that disagrees. A split dir may be a remote URI (data/paths.py); `local_split`
gives the local copy that ArrayRecord readers need.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from data import paths
from data import records

MANIFEST_NAME = "manifest.json"
DEAD_LETTERS_NAME = "dead_letters.jsonl"
CACHE_ENV = "VIT22B_DATA_CACHE"  # where remote splits are copied (default ~/.cache/vit22b/splits)
ARRAY_RECORD_OPTIONS = "group_size:1"  # random access for Grain (docs/DESIGN.md §3)


class ManifestError(ValueError):
    """A manifest, or the files it describes, is missing, malformed or does not match."""


@dataclasses.dataclass(frozen=True)
class Shard:
    path: str  # relative to the split dir
    num_records: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class Manifest:
    dataset: str
    split: str
    num_records: int
    num_classes: int
    class_names: list[str]
    image_size: int | None  # shorter side the images were resized to; None = kept as is
    features: list[str]  # schema keys present in the records (data.records)
    shards: list[Shard]
    dead_letters: str
    num_dead_letters: int
    source: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: Any, where: str = MANIFEST_NAME) -> "Manifest":
        """Builds a Manifest from parsed JSON, checking every field's type."""
        if not isinstance(obj, dict):
            raise ManifestError(
                f"{where}: top level must be a JSON object, got {type(obj).__name__}"
            )
        expect = {
            "dataset": str,
            "split": str,
            "num_records": int,
            "num_classes": int,
            "class_names": list,
            "image_size": (int, type(None)),
            "features": list,
            "shards": list,
            "dead_letters": str,
            "num_dead_letters": int,
            "source": dict,
        }
        for key, typ in expect.items():
            if key not in obj:
                raise ManifestError(f"{where}: missing field {key!r}")
            if not isinstance(obj[key], typ) or isinstance(obj[key], bool):
                raise ManifestError(f"{where}: field {key!r} has type {type(obj[key]).__name__}")
        unknown = sorted(set(obj) - set(expect))
        if unknown:
            raise ManifestError(f"{where}: unknown field(s) {unknown}")
        shards = []
        for i, s in enumerate(obj["shards"]):
            if (
                not isinstance(s, dict)
                or set(s) != {"path", "num_records", "sha256"}
                or not isinstance(s["path"], str)
                or not isinstance(s["num_records"], int)
                or not isinstance(s["sha256"], str)
            ):
                raise ManifestError(
                    f"{where}: field 'shards[{i}]' must be "
                    f"{{path: str, num_records: int, sha256: str}}, got {s!r}"
                )
            shards.append(Shard(**s))
        bad = [f for f in obj["features"] if f not in records.FEATURE_KINDS]
        if bad:
            raise ManifestError(f"{where}: field 'features' names unknown feature(s) {bad}")
        if obj["num_classes"] != len(obj["class_names"]):
            raise ManifestError(
                f"{where}: field 'num_classes' is {obj['num_classes']} but "
                f"'class_names' has {len(obj['class_names'])} entries"
            )
        total = sum(s.num_records for s in shards)
        if total != obj["num_records"]:
            raise ManifestError(
                f"{where}: field 'num_records' is {obj['num_records']} but the shards "
                f"sum to {total}"
            )
        return cls(**{**obj, "shards": shards})

    def shard_paths(self, split_dir: str | os.PathLike) -> list[str]:
        return [os.fspath(Path(split_dir) / s.path) for s in self.shards]


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def _manifest_path(split_dir: str | os.PathLike):
    p = paths.as_path(split_dir)
    return p if p.name == MANIFEST_NAME else p / MANIFEST_NAME


def write(split_dir: str | os.PathLike, manifest: Manifest):
    """Writes manifest.json atomically (temp file + rename; one object write remotely) and
    returns its path."""
    path = _manifest_path(split_dir)
    paths.write_text_atomic(path, json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n")
    return path


def read(split_dir: str | os.PathLike) -> Manifest:
    """Parses and type-checks manifest.json (no file checks; see validate())."""
    path = _manifest_path(split_dir)
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest (is this a prepared split dir?)")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON: {e}") from e
    return Manifest.from_json(obj, where=str(path))


def local_split(split_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """`split_dir` itself when local (a mounted bucket included), else a local copy under
    `cache_dir/<sha256(uri)[:16]>/`: Grain's ArrayRecord reader opens local files only.

    Each shard is downloaded to a temp name, checked against the manifest's sha256 and renamed
    (data/paths.fetch), so a partial or corrupt file is never read; a cached shard whose sha256
    matches is reused. The manifest is written last: the copy has one only when complete."""
    if not paths.is_remote(split_dir):
        return Path(split_dir)
    m = read(split_dir)
    remote = paths.as_path(split_dir)
    cache = Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache/vit22b/splits")
    local = cache / hashlib.sha256(os.fspath(remote).encode()).hexdigest()[:16]
    for shard in m.shards:
        path = paths.fetch(remote / shard.path, local / shard.path, sha256=shard.sha256)
        st = path.stat()  # just verified: validate() need not hash it again in this process
        with _VERIFIED_LOCK:
            _VERIFIED.add((os.fspath(path.resolve()), st.st_size, st.st_mtime_ns, shard.sha256))
    if (remote / m.dead_letters).exists():
        paths.fetch(remote / m.dead_letters, local / m.dead_letters)
    write(local, m)
    return local


def count_records(path: str | os.PathLike) -> tuple[int, str]:
    """(num_records, writer options) of one ArrayRecord file."""
    from array_record.python import array_record_module  # C++ extension; imported when used

    try:
        reader = array_record_module.ArrayRecordReader(os.fspath(path))
        ok = reader.ok()
        result = (reader.num_records(), reader.writer_options_string()) if ok else None
        reader.close()
    except RuntimeError as e:  # riegeli reports corruption as RuntimeError, often at close()
        raise ManifestError(
            f"{path}: not a readable ArrayRecord file: {str(e).splitlines()[0]}"
        ) from e
    if result is None:
        raise ManifestError(f"{path}: not a readable ArrayRecord file")
    return result


# Shards already checksummed in this process, keyed by (path, size, mtime_ns): train and eval
# loaders over the same split (or a restart of the iterator) do not re-hash terabytes.
_VERIFIED: set[tuple[str, int, int, str]] = set()
_VERIFIED_LOCK = threading.Lock()


def _check_shard(split_dir: Path, where: Path, i: int, shard: Shard, check_checksums: bool) -> None:
    path = split_dir / shard.path
    if not path.is_file():
        raise ManifestError(f"{where}: shards[{i}].path {shard.path!r} does not exist")
    n, options = count_records(path)
    if n != shard.num_records:
        raise ManifestError(
            f"{path}: has {n} records but {where} field "
            f"shards[{i}].num_records says {shard.num_records}"
        )
    if "group_size:1," not in options + ",":
        raise ManifestError(
            f"{path}: written with options {options!r}; Grain random access "
            f"needs {ARRAY_RECORD_OPTIONS!r}"
        )
    if check_checksums:
        st = path.stat()
        key = (os.fspath(path.resolve()), st.st_size, st.st_mtime_ns, shard.sha256)
        with _VERIFIED_LOCK:
            known = key in _VERIFIED
        if not known:
            digest = sha256_file(path)
            if digest != shard.sha256:
                raise ManifestError(
                    f"{path}: sha256 {digest[:16]}... does not match {where} field "
                    f"shards[{i}].sha256 {shard.sha256[:16]}..."
                )
            with _VERIFIED_LOCK:
                _VERIFIED.add(key)


def validate(
    split_dir: str | os.PathLike, *, check_checksums: bool = True, threads: int | None = None
) -> Manifest:
    """Reads the manifest and checks every shard's existence, record count, options and sha256,
    and the dead-letter count. Returns the Manifest; raises ManifestError (one line) otherwise.
    Shards are checked by `threads` threads (default: one per CPU, at most 16; hashlib releases
    the GIL), so a host hashes an ImageNet-size split at disk speed rather than one core's;
    the error reported is the first failing shard's, in manifest order."""
    if paths.is_remote(split_dir):  # the checks run on the verified local copy readers use
        split_dir = local_split(split_dir)
    split_dir = Path(split_dir)
    if split_dir.name == MANIFEST_NAME:
        split_dir = split_dir.parent
    m = read(split_dir)
    where = split_dir / MANIFEST_NAME
    threads = threads or min(16, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(max(1, min(threads, len(m.shards)))) as pool:
        checks = [
            pool.submit(_check_shard, split_dir, where, i, shard, check_checksums)
            for i, shard in enumerate(m.shards)
        ]
        try:
            for check in checks:
                check.result()  # re-raises this shard's ManifestError
        except BaseException:
            for check in checks:
                check.cancel()
            raise
    dl = split_dir / m.dead_letters
    if m.num_dead_letters or dl.exists():
        if not dl.is_file():
            raise ManifestError(f"{where}: field 'dead_letters' {m.dead_letters!r} does not exist")
        with open(dl, "rb") as f:
            lines = sum(1 for line in f if line.strip())
        if lines != m.num_dead_letters:
            raise ManifestError(
                f"{dl}: has {lines} entries but {where} field 'num_dead_letters' "
                f"says {m.num_dead_letters}"
            )
    return m
