"""The Beam graph of the `prepare` job (pipelines/prepare.py runs it): the DoFns that expand,
read, process (decode, validate, resize, encode), write, de-duplicate and finalize each split,
and `build`, which wires them into one pipeline for all datasets and splits.

The DoFns live in this importable module (not in a `__main__` copy) so Beam can pickle them by
reference into SDK worker processes (multi_processing, Dataflow).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms import window
from apache_beam.utils.windowed_value import WindowedValue

from data import images, records
from data import manifest as manifest_lib
from data import paths
from pipelines import shards as shards_lib
from pipelines import sources

NAMESPACE = "prepare"
_DEAD = "dead"
_IDS = "ids"


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    """One split's settings, made in the driver (pipelines.prepare._plan) and shipped in the
    DoFns."""

    key: str  # "<dataset>/<split>"
    dataset: str
    split: str
    selector: str
    tmp_dir: str
    final_dir: str
    image_size: int
    lossless: bool
    jpeg_quality: int
    records_per_shard: int
    limits: images.Limits
    class_names: tuple[str, ...]
    source_desc: dict


def _dead(ex_id: str, source: str, reason: str, detail: str) -> dict[str, str]:
    return {"id": ex_id, "source": source, "reason": reason, "detail": detail}


def _reject(key: str, letter: dict[str, str]):
    Metrics.counter(NAMESPACE, "rejected").inc()
    Metrics.counter(NAMESPACE, f"rejected.{letter['reason']}").inc()
    return beam.pvalue.TaggedOutput(_DEAD, (key, letter))


class _ExpandFn(beam.DoFn):
    def __init__(self, srcs):
        self._srcs = srcs

    def process(self, element):
        key, task = element
        for ref in self._srcs[key].expand(task):
            yield key, ref


class _ReadFn(beam.DoFn):
    def __init__(self, srcs):
        self._srcs = srcs
        self._read = Metrics.counter(NAMESPACE, "read")

    def process(self, element):
        key, ref = element
        for ex in self._srcs[key].read(ref):
            self._read.inc()
            yield key, ex


def _check_labels(ex: sources.RawExample, num_classes: int) -> None:
    if not num_classes:
        return
    for field in ("label", "real_labels"):
        bad = [v for v in (getattr(ex, field) or ()) if not 0 <= v < num_classes]
        if bad:
            raise records.RecordError(f"{field} {bad} outside [0, {num_classes})")


class _PlanFn(beam.DoFn):
    """A DoFn that looks up each element's SplitPlan by its "<dataset>/<split>" key."""

    def __init__(self, plans: dict[str, SplitPlan]):
        self._plans = plans


class _ProcessFn(_PlanFn):
    """RawExample -> (key, id, source, record bytes, features) or a dead letter."""

    def process(self, element):
        key, ex = element
        plan = self._plans[key]
        if ex.error is not None:
            yield _reject(key, _dead(ex.id, ex.source, *ex.error))
            return
        try:
            _check_labels(ex, len(plan.class_names))
            img = images.decode_rgb(ex.image, plan.limits)
            if plan.image_size:
                img = images.resize_shorter(img, plan.image_size)
            data = (
                images.encode_png(img)
                if plan.lossless
                else images.encode_jpeg(img, plan.jpeg_quality)
            )
            rec = records.Record(
                image=data,
                label=ex.label,
                id=ex.id,
                real_labels=ex.real_labels,
                attributes=ex.attributes,
                text=ex.text,
                shape_label=ex.shape_label,
                texture_label=ex.texture_label,
            )
            encoded = records.encode(rec)
        except images.ImageRejected as e:
            yield _reject(key, _dead(ex.id, ex.source, e.reason, e.detail))
            return
        except records.RecordError as e:
            yield _reject(key, _dead(ex.id, ex.source, "bad_metadata", str(e)))
            return
        except Exception as e:  # a bad input must never fail the job (cv2/PIL internals)
            yield _reject(key, _dead(ex.id, ex.source, "undecodable", f"{type(e).__name__}: {e}"))
            return
        yield key, ex.id, ex.source, encoded, rec.features()


class _WriteShardsFn(_PlanFn):
    """Streams records into rolling ArrayRecord files; emits one ShardInfo per closed file and,
    on the `ids` output, ((key, id), (source, file, position)) for duplicate detection."""

    def __init__(self, plans: dict[str, SplitPlan]):
        super().__init__(plans)
        self._open: dict[str, shards_lib.OpenShard] = {}

    def start_bundle(self):
        self._open = {}

    def process(self, element):
        key, rid, source, data, features = element
        shard = self._open.get(key)
        if shard is None:
            shard = self._open[key] = shards_lib.OpenShard(key, self._plans[key].tmp_dir)
        yield beam.pvalue.TaggedOutput(_IDS, ((key, rid), (source, shard.path, shard.count)))
        shard.add(data, rid, features)
        if shard.count >= self._plans[key].records_per_shard:
            del self._open[key]
            info = shard.close()
            yield info.path, info

    def finish_bundle(self):
        gw = window.GlobalWindow()
        for key in sorted(self._open):
            info = self._open.pop(key).close()
            yield WindowedValue((info.path, info), gw.max_timestamp(), [gw])


def _natural_key(text: str) -> list:
    """Sort key with digit runs compared as numbers ("row 9" < "row 10", "__9" < "__10")."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _resolve_duplicates(element):
    """Keeps the copy whose source sorts first (naturally; then file, position): in a CSV the
    first line, in TFDS the first record. Every other copy is dropped and dead-lettered."""
    (key, rid), locations = element
    locations = sorted(locations, key=lambda loc: (_natural_key(loc[0]), loc[1], loc[2]))
    for source, path, position in locations[1:]:
        yield _reject(
            key, _dead(rid, source, "duplicate_id", f"id also read from {locations[0][0]} (kept)")
        )
        yield path, position


class _FinalizeFn(_PlanFn):
    """Per split: deterministic shard names, dead_letters.jsonl, manifest.json, atomic install."""

    def process(self, element):
        key, grouped = element
        plan = self._plans[key]
        tmp = paths.as_path(plan.tmp_dir)
        shard_infos = sorted(grouped["shards"], key=lambda s: (s.min_id, s.path))
        letters = sorted(grouped["dead"], key=lambda d: (d["id"], d["source"], d["reason"]))
        n = len(shard_infos)
        shards = []
        for i, info in enumerate(shard_infos):
            name = f"{plan.dataset}-{plan.split}.array_record-{i:05d}-of-{n:05d}"
            paths.move_file(info.path, tmp / name)
            shards.append(manifest_lib.Shard(name, info.num_records, info.sha256))
        with (tmp / manifest_lib.DEAD_LETTERS_NAME).open("w") as f:
            for letter in letters:
                f.write(json.dumps(letter, sort_keys=True) + "\n")
        present = set().union(*(s.features for s in shard_infos)) if shard_infos else set()
        features = [
            k for k in records.FEATURE_KINDS if k in present or k in records.REQUIRED_FEATURES
        ]
        num_records = sum(s.num_records for s in shards)
        manifest_lib.write(
            tmp,
            manifest_lib.Manifest(
                dataset=plan.dataset,
                split=plan.split,
                num_records=num_records,
                num_classes=len(plan.class_names),
                class_names=list(plan.class_names),
                image_size=plan.image_size or None,
                features=features,
                shards=shards,
                dead_letters=manifest_lib.DEAD_LETTERS_NAME,
                num_dead_letters=len(letters),
                source=plan.source_desc,
            ),
        )
        # Local: rename into place. Bucket: copy, manifest.json last (readers need it).
        paths.install_dir(tmp, plan.final_dir, last=(manifest_lib.MANIFEST_NAME,))
        Metrics.counter(NAMESPACE, "accepted").inc(num_records)
        yield key, (num_records, len(letters))


def build(p: beam.Pipeline, plans: Sequence[SplitPlan], srcs: dict, tasks: dict) -> None:
    """Adds the whole prepare graph for `plans` to pipeline `p`."""
    by_key = {plan.key: plan for plan in plans}
    units = [(key, task) for key in by_key for task in tasks[key]]
    processed = (
        p
        | "ListTasks" >> beam.Create(units)
        | "Expand" >> beam.ParDo(_ExpandFn(srcs))
        | "Redistribute" >> beam.Reshuffle()
        | "Read" >> beam.ParDo(_ReadFn(srcs))
        | "Process" >> beam.ParDo(_ProcessFn(by_key)).with_outputs(_DEAD, main="ok")
    )
    written = processed.ok | "WriteShards" >> beam.ParDo(_WriteShardsFn(by_key)).with_outputs(
        _IDS, main="shards"
    )
    dups = (
        written[_IDS]
        | "GroupIds" >> beam.GroupByKey()
        | "ResolveDuplicates" >> beam.FlatMap(_resolve_duplicates).with_outputs(_DEAD, main="drops")
    )
    shards = (
        {"shards": written.shards, "drops": dups.drops}
        | "JoinDrops" >> beam.CoGroupByKey()
        | "ApplyDrops" >> beam.FlatMap(shards_lib.apply_drops)
    )
    dead = (processed[_DEAD], dups[_DEAD]) | "AllDeadLetters" >> beam.Flatten()
    splits = p | "ListSplits" >> beam.Create([(key, None) for key in by_key])
    _ = (
        {"split": splits, "shards": shards, "dead": dead}
        | "JoinSplit" >> beam.CoGroupByKey()
        | "Finalize" >> beam.ParDo(_FinalizeFn(by_key))
    )
