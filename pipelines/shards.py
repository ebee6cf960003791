"""Shard files of the `prepare` job (pipelines/transforms.py drives them): rolling ArrayRecord
writers, rewriting a shard without its duplicate records, and installing a finished split dir.

A shard is written as `part-<uuid>.array_record` in the split's temp dir; `_FinalizeFn` renames
the surviving ones to `<dataset>-<split>.array_record-NNNNN-of-NNNNN` once all are known.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

from data import manifest as manifest_lib
from data import records


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    key: str
    path: str
    num_records: int
    sha256: str
    min_id: str
    features: tuple[str, ...]


class OpenShard:
    def __init__(self, key: str, directory: str):
        from array_record.python import array_record_module

        self.key = key
        self.path = os.path.join(directory, f"part-{uuid.uuid4().hex}.array_record")
        self._writer = array_record_module.ArrayRecordWriter(self.path, manifest_lib.ARRAY_RECORD_OPTIONS)
        self.count = 0
        self.min_id = None
        self.features: set[str] = set()

    def add(self, data: bytes, rid: str, features: tuple[str, ...]) -> None:
        self._writer.write(data)
        self.count += 1
        self.min_id = rid if self.min_id is None else min(self.min_id, rid)
        self.features.update(features)

    def close(self) -> ShardInfo:
        self._writer.close()
        return ShardInfo(self.key, self.path, self.count, manifest_lib.sha256_file(self.path),
                          self.min_id, tuple(sorted(self.features)))


def write_shard(key: str, directory: str, raws: Sequence[bytes]) -> ShardInfo:
    shard = OpenShard(key, directory)
    for raw in raws:
        ex = records.parse_example(raw)
        shard.add(raw, ex["id"][0].decode("utf-8"), tuple(k for k in ex if k in records.FEATURE_KINDS))
    return shard.close()



def apply_drops(element):
    """Rewrites a shard without its duplicate records (only shards that have any)."""
    path, grouped = element
    (info,) = grouped["shards"]
    drops = set(grouped["drops"])
    if not drops:
        yield info.key, info
        return
    from array_record.python import array_record_module

    reader = array_record_module.ArrayRecordReader(path)
    keep = [raw for i, raw in enumerate(reader.read_all()) if i not in drops]
    reader.close()
    os.remove(path)
    if keep:  # memory: one shard (records_per_shard records), and only when it has duplicates
        yield info.key, write_shard(info.key, os.path.dirname(path), keep)


def install(tmp: Path, final: Path) -> None:
    """Renames a completed split dir into place, replacing an older one."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:12]}")
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
