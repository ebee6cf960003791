"""`prepare` stage: sources -> decode/validate/resize -> re-encode -> ArrayRecord shards + manifest.

    python -m pipelines.prepare --source digits --out /tmp/x
    python -m pipelines.prepare --source tfds --dataset imagenet2012 \
        --tfds_data_dir ~/tensorflow_datasets --splits train,val=validation --image_size 384 \
        --out /data/prepared
    python -m pipelines.prepare --source folder --root /data/pets --csv labels.csv --out /tmp/x
    python -m pipelines.prepare --source digits --out gs://BUCKET/prepared \
        --runner=DataflowRunner ...
    # any other Beam option passes through (--project, --region, --temp_location, ...)

Layout (docs/DESIGN.md §3): `<out>/<dataset>/<split>/{manifest.json, dead_letters.jsonl,
<dataset>-<split>.array_record-NNNNN-of-NNNNN}`. Each split dir is assembled in a sibling temp
dir and renamed into place when complete; with a bucket `--out` (gs://, data/paths.py) shards are
written to worker-local temp files, uploaded to a temp prefix, and copied into the split dir with
manifest.json last (readers need it, so a half-copied split is never read). Every input ends up
either in a shard or as one line of dead_letters.jsonl ({id, source, reason, detail}); accepted +
rejected = read, always.

The Beam graph (one pipeline for all datasets and splits):

    Create(tasks) -> Expand (list refs) -> Reshuffle -> Read -> Process (decode, validate, resize,
    encode) -> WriteShards -> [ids] GroupByKey -> ResolveDuplicates -> [drops] CoGroupByKey with
    the shards -> ApplyDrops -> CoGroupByKey per split with dead letters -> Finalize (rename shards,
    manifest, dead letters, atomic install)

Write strategy (docs/DESIGN.md §6): `WriteToArrayRecord` with a fixed `num_shards` adds a
GroupByKey over the encoded images, and the local runner holds all of them in memory. Here a DoFn
streams each bundle's records straight into rolling ArrayRecord files (`group_size:1`) of at most
`records_per_shard` records - runner-chosen sharding, memory bounded by one open file per split.
Only small metadata is ever grouped: per-record (id -> source, file, position) for duplicate
detection, and per-shard summaries. Duplicate ids are resolved after writing: the copy with the
smallest source is kept, every other copy is dropped from its shard (the shard is rewritten,
normally never) and dead-lettered as "duplicate_id".

Modules: this one holds the config, planning, library entry (`prepare`), DAG stage entry (`run`)
and CLI; pipelines/transforms.py the DoFns and `build`; pipelines/shards.py the shard files.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import apache_beam as beam
import ml_collections
from apache_beam.options.pipeline_options import PipelineOptions

from data import images
from data import manifest as manifest_lib
from data import paths
from pipelines import folder_sources, sources
from pipelines.transforms import NAMESPACE, SplitPlan, build

# Beam 2.77's DirectRunner first tries to download Prism (no internet here); FnApiRunner is the
# in-process portable runner and honours --direct_num_workers/--direct_running_mode
# (docs/DESIGN.md §6).
LOCAL_RUNNER = "FnApiRunner"


# --- config -------------------------------------------------------------------------------------


def dataset_config(**overrides: Any) -> ml_collections.ConfigDict:
    """One dataset: where it comes from, which splits, and how images are normalised."""
    cfg = ml_collections.ConfigDict()
    cfg.source = "digits"  # digits | tfds | folder | cue_conflict
    # our split name -> source selector: digits train/val/test/all; a TFDS split spec
    # ("train[:99%]", "validation"); a sub-dir of `root` for folder/cue_conflict ("" = root).
    # Empty = the source's natural splits (digits: train/val/test; tfds: all; folder: its
    # train/val/validation(-> val)/test sub-dirs if it has them, else train = root;
    # cue_conflict: test).
    cfg.splits = ml_collections.ConfigDict()
    cfg.image_size = 32  # shorter side after resize (downscale only); 0 keeps size.
    #                                   digits: the size they are rendered at.
    cfg.lossless = False  # PNG instead of JPEG
    cfg.jpeg_quality = 95
    cfg.records_per_shard = 1024
    cfg.tfds_name = ""  # default: the dataset's name; "name[/config][:version]"
    cfg.tfds_data_dir = ""  # local TFDS data_dir (never downloads)
    cfg.root = ""  # folder / cue_conflict root dir
    cfg.csv = ""  # folder: CSV of id,label(s),attributes,text
    cfg.min_side = images.Limits.min_side
    cfg.max_side = images.Limits.max_side
    cfg.max_pixels = images.Limits.max_pixels
    cfg.max_bytes = images.Limits.max_bytes
    for key, value in overrides.items():
        if key == "splits":
            cfg.splits = ml_collections.ConfigDict(dict(value))
        else:
            setattr(cfg, key, value)  # ConfigDict keeps the type of each default
    return cfg


def default_config() -> ml_collections.ConfigDict:
    """The stage's config group (`config.prepare`): the tiny dry-run's digits at 32 px."""
    cfg = ml_collections.ConfigDict()
    cfg.datasets = ml_collections.ConfigDict(
        {
            "digits": dataset_config(
                source="digits",
                image_size=32,
                splits={"train": "train", "val": "val", "test": "test"},
            ),
        }
    )
    cfg.runner = LOCAL_RUNNER
    cfg.direct_num_workers = 1  # FnApiRunner workers (local runs)
    cfg.direct_running_mode = "in_memory"  # in_memory | multi_threading | multi_processing
    cfg.beam_args = ()  # extra Beam PipelineOptions, passed unchanged
    return cfg


_DATASET_KEYS = frozenset(dataset_config().keys())


def validate_config(cfg: ml_collections.ConfigDict) -> None:
    """Fails early, naming the key, on anything the job would trip over later."""
    if not len(cfg.datasets):
        raise ValueError("prepare.datasets is empty: nothing to prepare")
    if cfg.direct_running_mode not in ("in_memory", "multi_threading", "multi_processing"):
        raise ValueError(
            f"prepare.direct_running_mode={cfg.direct_running_mode!r} is not one of "
            "in_memory, multi_threading, multi_processing"
        )
    if cfg.direct_num_workers < 1:
        raise ValueError(f"prepare.direct_num_workers must be >= 1, got {cfg.direct_num_workers}")
    for name, d in cfg.datasets.items():
        where = f"prepare.datasets.{name}"
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"{where}: dataset names must be plain directory names")
        unknown = set(d.keys()) - _DATASET_KEYS
        if unknown:
            raise ValueError(
                f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(_DATASET_KEYS)}"
            )
        if d.source not in sources.SOURCE_KINDS:
            raise ValueError(f"{where}.source={d.source!r}; choose from {sources.SOURCE_KINDS}")
        if d.source == "tfds" and not d.tfds_data_dir:
            raise ValueError(
                f"{where}.tfds_data_dir is required for source 'tfds' (local data only)"
            )
        if d.source in ("folder", "cue_conflict") and not d.root:
            raise ValueError(f"{where}.root is required for source {d.source!r}")
        if d.source == "digits" and d.image_size < max(8, d.min_side):
            raise ValueError(
                f"{where}.image_size={d.image_size}: digits need >= max(8, min_side={d.min_side})"
            )
        if d.image_size < 0 or d.records_per_shard < 1 or not 1 <= d.jpeg_quality <= 100:
            raise ValueError(
                f"{where}: need image_size >= 0, records_per_shard >= 1, 1 <= jpeg_quality <= 100"
            )
        for split in d.splits.keys():
            if not split or "/" in split or split.startswith("."):
                raise ValueError(f"{where}.splits: {split!r} is not a plain directory name")


def validate(cfg: ml_collections.ConfigDict, upstream=None, where: str = "prepare") -> None:
    """The DAG's plan-time check (launch/dag.py): `validate_config`; prepare has no upstream.

    Prepare has no `runtime` group: its runner parallelism stays in the cache key, because the
    shard files' contents follow Beam's bundle boundaries, which the worker count changes.
    """
    del upstream, where  # validate_config's messages name "prepare.<key>"
    validate_config(cfg)


# --- planning (driver side) ---------------------------------------------------------------------


def _natural_splits(d: ml_collections.ConfigDict) -> dict[str, str]:
    """Non-tfds only: a tfds source's natural splits come from the source itself (see _plan).
    A folder root with train/val/validation/test sub-dirs has those splits, else one: train."""
    if d.source == "digits":
        return {"train": "train", "val": "val", "test": "test"}
    return folder_sources.detect_splits(d.root) if d.source == "folder" else {"test": ""}


def _plan(cfg: ml_collections.ConfigDict, out):
    """(plans, {key: source}, {key: tasks}); each split gets a temp dir next to its final dir."""
    plans, srcs, tasks = [], {}, {}
    for name, d in cfg.datasets.items():
        splits = dict(d.splits.items())
        if not splits and d.source == "tfds":
            # a TfdsSource ignores selectors: build it once (dir globs + builder) and ask it
            src = sources.make_source(name, d, ())
            splits = {s: s for s in src.split_names()}
        else:
            splits = splits or _natural_splits(d)
            src = sources.make_source(name, d, splits.values())
        info = src.info()
        limits = images.Limits(d.min_side, d.max_side, d.max_pixels, d.max_bytes)
        for split, selector in splits.items():
            final = out / name / split
            tmp = final.parent / f".{split}.tmp-{uuid.uuid4().hex[:12]}"
            plan = SplitPlan(
                f"{name}/{split}",
                name,
                split,
                selector,
                str(tmp),
                str(final),
                d.image_size,
                d.lossless,
                d.jpeg_quality,
                d.records_per_shard,
                limits,
                info.class_names,
                {**info.description, "selector": selector},
            )
            plans.append(plan)
            srcs[plan.key] = src
            tasks[plan.key] = src.tasks(selector)
    return plans, srcs, tasks


def pipeline_options(
    cfg: ml_collections.ConfigDict, extra_args: Sequence[str] = ()
) -> PipelineOptions:
    """Runner flags from the config, then any other Beam options unchanged (so the same job
    runs on Dataflow/Flink/Spark); explicit args win over the config."""
    args = [
        f"--runner={cfg.runner}",
        f"--direct_num_workers={cfg.direct_num_workers}",
        f"--direct_running_mode={cfg.direct_running_mode}",
    ]
    return PipelineOptions(args + list(cfg.beam_args) + list(extra_args))


# --- library entry ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PrepareResult:
    split_dirs: dict[str, str]  # "<dataset>/<split>" -> split dir
    manifests: dict[str, manifest_lib.Manifest]
    counters: dict[str, int]  # read, accepted, rejected, rejected.<reason>


def _counters(result) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in result.metrics().query()["counters"]:
        if c.key.metric.namespace == NAMESPACE:
            value = c.committed if c.committed is not None else c.attempted
            out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(value)
    for name in ("read", "accepted", "rejected"):
        out.setdefault(name, 0)
    return dict(sorted(out.items()))


def prepare(
    cfg: ml_collections.ConfigDict, out: str | os.PathLike, beam_args: Sequence[str] = ()
) -> PrepareResult:
    """Runs the prepare job for every dataset/split in `cfg` into `out`."""
    validate_config(cfg)
    out = paths.as_path(out, "--out")  # local dir or bucket URI (data/paths.py)
    out.mkdir(parents=True, exist_ok=True)
    plans, srcs, tasks = _plan(cfg, out)
    try:
        for plan in plans:
            paths.makedirs(plan.tmp_dir)
        p = beam.Pipeline(options=pipeline_options(cfg, beam_args))
        build(p, plans, srcs, tasks)
        result = p.run()
        result.wait_until_finish()
        counters = _counters(result)
    finally:
        for plan in plans:  # a failed run leaves no half-written split behind
            paths.rmtree(plan.tmp_dir)
    manifests = {plan.key: manifest_lib.read(plan.final_dir) for plan in plans}
    accepted = sum(m.num_records for m in manifests.values())
    rejected = sum(m.num_dead_letters for m in manifests.values())
    if accepted + rejected != counters["read"]:
        raise RuntimeError(
            f"prepare: accepted {accepted} + rejected {rejected} != read "
            f"{counters['read']} (lost inputs; this is a bug)"
        )
    return PrepareResult({p.key: p.final_dir for p in plans}, manifests, counters)


def summary(result: PrepareResult) -> str:
    """The end-of-job report: counters, then one line per split."""
    lines = ["prepare counters: " + "  ".join(f"{k}={v}" for k, v in result.counters.items())]
    width = max(len(k) for k in result.manifests)
    for key, m in result.manifests.items():
        lines.append(
            f"  {key:<{width}}  accepted {m.num_records:>8}  rejected {m.num_dead_letters:>6}"
            f"  shards {len(m.shards):>4}  -> {result.split_dirs[key]}"
        )
    return "\n".join(lines)


def run(cfg: ml_collections.ConfigDict, inputs: dict, out: Path) -> dict:
    """DAG stage entry (docs/INTERFACES.md): no upstream; writes `<out>/<dataset>/<split>/`."""
    del inputs  # prepare has no upstream stage
    result = prepare(cfg, out)
    print(summary(result))
    metrics: dict[str, int] = dict(result.counters)
    for key, m in result.manifests.items():
        metrics[f"{key}/accepted"] = m.num_records
        metrics[f"{key}/rejected"] = m.num_dead_letters
    return {"artifacts": {key: key for key in result.manifests}, "metrics": metrics}


# --- CLI ----------------------------------------------------------------------------------------


def _parse_splits(text: str) -> dict[str, str]:
    """ "train,val=validation" -> {"train": "train", "val": "validation"}."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, selector = item.partition("=")
        out[name.strip()] = selector.strip() if sep else name.strip()
    return out


def parse_args(
    argv: Sequence[str] | None = None,
) -> tuple[ml_collections.ConfigDict, str, list[str]]:
    """CLI flags -> (stage config with one dataset, out dir, pass-through Beam args)."""
    ap = argparse.ArgumentParser(
        prog="python -m pipelines.prepare",
        description=(
            "Prepare images into ArrayRecord shards + manifest.json (+ dead_letters.jsonl). "
            "Unknown flags are passed to Beam unchanged."
        ),
    )
    d = dataset_config()
    ap.add_argument("--source", required=True, choices=sources.SOURCE_KINDS)
    ap.add_argument("--out", required=True, help="output root: <out>/<dataset>/<split>/")
    ap.add_argument("--dataset", default="", help="dataset dir name (default: tfds name or source)")
    ap.add_argument(
        "--splits",
        default="",
        help="comma list of split[=selector] (default: the "
        "source's natural splits; digits: train,val,test; folder: its train/val/"
        "validation/test sub-dirs, else the root as train)",
    )
    ap.add_argument(
        "--image_size",
        type=int,
        default=d.image_size,
        help="shorter side to downscale to; 0 keeps the size (digits: render size)",
    )
    ap.add_argument("--lossless", action="store_true", help="store PNG instead of JPEG")
    ap.add_argument("--jpeg_quality", type=int, default=d.jpeg_quality)
    ap.add_argument("--records_per_shard", type=int, default=d.records_per_shard)
    ap.add_argument("--tfds_name", default="", help="TFDS name[/config][:version]")
    ap.add_argument("--tfds_data_dir", default="", help="local TFDS data_dir (never downloads)")
    ap.add_argument("--root", default="", help="image folder / cue-conflict root")
    ap.add_argument("--csv", default="", help="folder: CSV with id,label(s),attributes,text")
    for key in ("min_side", "max_side", "max_pixels", "max_bytes"):
        ap.add_argument(f"--{key}", type=int, default=d[key], help="acceptance limit")
    ap.add_argument("--runner", default=LOCAL_RUNNER)
    ap.add_argument("--direct_num_workers", type=int, default=1)
    ap.add_argument(
        "--direct_running_mode",
        default="in_memory",
        choices=("in_memory", "multi_threading", "multi_processing"),
    )
    args, beam_args = ap.parse_known_args(argv)
    if args.source == "tfds" and not (args.tfds_name or args.dataset):
        ap.error("--source tfds needs --tfds_name (or --dataset naming the TFDS dataset)")
    name = args.dataset or (
        args.tfds_name.split("/")[0].split(":")[0] if args.tfds_name else args.source
    )
    cfg = default_config()
    cfg.datasets = ml_collections.ConfigDict(
        {
            name: dataset_config(
                source=args.source,
                splits=_parse_splits(args.splits),
                image_size=args.image_size,
                lossless=args.lossless,
                jpeg_quality=args.jpeg_quality,
                records_per_shard=args.records_per_shard,
                tfds_name=args.tfds_name,
                tfds_data_dir=args.tfds_data_dir,
                root=args.root,
                csv=args.csv,
                min_side=args.min_side,
                max_side=args.max_side,
                max_pixels=args.max_pixels,
                max_bytes=args.max_bytes,
            )
        }
    )
    cfg.runner = args.runner
    cfg.direct_num_workers = args.direct_num_workers
    cfg.direct_running_mode = args.direct_running_mode
    return cfg, args.out, beam_args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg, out, beam_args = parse_args(argv)
    try:
        result = prepare(cfg, out, beam_args)
    except (ValueError, sources.SourceError, manifest_lib.ManifestError) as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 2
    print(summary(result))
    return 0


if __name__ == "__main__":
    # Run the importable module, not this __main__ copy: Beam pickles the DoFns and their types,
    # and SDK worker processes (multi_processing, Dataflow) can only find `pipelines.prepare.*`.
    from pipelines import prepare as _prepare

    sys.exit(_prepare.main())
