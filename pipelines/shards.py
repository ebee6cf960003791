"""Shard files of the `prepare` job (pipelines/transforms.py drives them): rolling ArrayRecord
writers and rewriting a shard without its duplicate records.

A shard is written as `part-<uuid>.array_record` in the split's temp dir; `_FinalizeFn` renames
the surviving ones to `<dataset>-<split>.array_record-NNNNN-of-NNNNN` once all are known. When
that temp dir is in a bucket, ArrayRecord's writer (local files only) writes to a worker-local
temp file that is uploaded when the shard closes (data/paths.LocalFile: what works on Dataflow).
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Sequence

from data import manifest as manifest_lib
from data import paths
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
        self.path = paths.join(directory, f"part-{uuid.uuid4().hex}.array_record")  # final place
        self._file = paths.LocalFile(self.path)
        self._writer = array_record_module.ArrayRecordWriter(
            self._file.path, manifest_lib.ARRAY_RECORD_OPTIONS
        )
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
        digest = manifest_lib.sha256_file(self._file.path)
        self._file.commit()
        return ShardInfo(
            self.key, self.path, self.count, digest, self.min_id, tuple(sorted(self.features))
        )


def write_shard(key: str, directory: str, raws: Sequence[bytes]) -> ShardInfo:
    shard = OpenShard(key, directory)
    for raw in raws:
        ex = records.parse_example(raw)
        shard.add(
            raw, ex["id"][0].decode("utf-8"), tuple(k for k in ex if k in records.FEATURE_KINDS)
        )
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

    with paths.local_file(path) as local:
        reader = array_record_module.ArrayRecordReader(local)
        keep = [raw for i, raw in enumerate(reader.read_all()) if i not in drops]
        reader.close()
    paths.remove(path)
    if keep:  # memory: one shard (records_per_shard records), and only when it has duplicates
        yield info.key, write_shard(info.key, os.path.dirname(path), keep)
