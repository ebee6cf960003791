"""Preflight: one go/no-go table before a training run pays for a TPU slice.

    python -m launch.preflight --config launch/configs/vit22b.py [--topology v4:8x8x16]
        [--workdir DIR] [--stages pretrain] [--step_time S] [--checksum_shards N]
        [--loader_batches N] [--device_memory_gib G] [--memory_headroom F] [--config.<k>=V ...]
    python -m launch.run --config ... --preflight   # the same checks after the data stages,
                                                    # before any training stage runs

For every training stage of the config (a group with `batch_size`, `mesh` and `data`), on its
target: `--topology` (e.g. `v4:8x8x16`), else the stage's `config.xm.resources` TPU slice, else
this machine's devices:

  config     the stage's plan-time validation; mesh vs the target's devices; batch vs the
             data-parallel size and the hosts; head_dim (width / heads; heads and MLP vs the model
             axis, which the rules table would otherwise silently replicate; a multiple of 128 on
             TPU); image size vs patch size
  manifest   every split the stage reads: record counts, `group_size:1`, dead letters and the
             sha256 of every shard (`--checksum_shards N`: N sampled shards, for huge splits);
             shard count vs host count
  compile    the real train step (trainer/step.py over the stage's own `make_task`) compiled for
             the target: this machine's devices, or a TPU topology ahead of time when libtpu is
             installed (`pip install -c constraints.txt '.[tpu]'`); without libtpu the memory row
             is the jax.eval_shape estimate of params + optimizer state + batch (no activations)
  memory     per-device bytes vs device memory (`--device_memory_gib`, else the TPU's HBM or this
             machine's) minus `--memory_headroom`
  MFU        model FLOPs / (devices x peak x step time): the step time is `--step_time`, else
             measured here (local target), else the roofline of the compiled cost (FLOPs, HBM
             bytes; no communication; only when XLA counts the whole step, i.e. not with scanned
             layers or microbatches, whose loop bodies it counts once), else the paper's 54.9% MFU
  loader     this host's images/s on the real shards (the stage's decode threads / workers) vs
             the per-host batch / step time the run needs

Exit status: 0 go, 1 no-go (each no-go row says why), 2 usage error. Importing this module is
cheap (no JAX): launch.run imports it for `--preflight`.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from absl import app
from absl import flags

from launch import cli
from launch import dag
from launch import produce
from trainer import aot  # standard library only at import; JAX loads inside its functions

# The per-chip tables and the AOT pieces live in trainer/aot.py (benchmarks/aot.py uses them too).
from trainer.aot import TPU_CHIP_CONFIG, TPU_HBM_BYTES_PER_S, TPU_HBM_GIB, TPU_PEAK_KEY  # noqa: F401

flags.adopt_module_key_flags(cli)

TOPOLOGY = flags.DEFINE_string(
    "topology",
    "",
    "Target TPU slice as TYPE:TOPOLOGY, e.g. v4:8x8x16 (default: each stage's "
    "config.xm.resources slice, else this machine's devices).",
)
STEP_TIME = flags.DEFINE_float(
    "step_time",
    0.0,
    "Target seconds per training step the loader must keep up with (default: "
    "measured here for a local target, else estimated from the compiled cost).",
)
CHECKSUM_SHARDS = flags.DEFINE_integer(
    "checksum_shards",
    0,
    "sha256 of this many randomly chosen shards per split (0 = all); counts "
    "and options are checked for every shard.",
)
LOADER_BATCHES = flags.DEFINE_integer(
    "loader_batches", 4, "Timed loader batches per training split."
)
DEVICE_MEMORY_GIB = flags.DEFINE_float(
    "device_memory_gib",
    0.0,
    "Memory per device in GiB (default: the TPU's HBM, or this machine's).",
)
MEMORY_HEADROOM = flags.DEFINE_float(
    "memory_headroom", 0.1, "Fraction of device memory kept free (fragmentation, runtime buffers)."
)
NUM_CLASSES = flags.DEFINE_integer(
    "num_classes", 1000, "Classes to compile with while the training split is not prepared yet."
)

GO, NO_GO, WARN, SKIP = "go", "NO-GO", "warn", "skip"

# A compiled cost below this share of the model's FLOPs has loop bodies counted once
# (see compile_step).
ROOFLINE_MIN_COUNTED = 0.9
PAPER_MFU = 0.549  # ViT-22B on TPU v4 (docs/DESIGN.md §4): step time to plan for, no compile
LOADER_MAX_BATCH = 256  # measure at most this many images a batch (the rate is per image)


@dataclasses.dataclass(frozen=True)
class Options:
    topology: str = ""
    step_time: float = 0.0
    checksum_shards: int = 0
    loader_batches: int = 4
    device_memory_gib: float = 0.0
    memory_headroom: float = 0.1
    num_classes: int = 1000

    @classmethod
    def from_flags(cls) -> "Options":
        return cls(
            TOPOLOGY.value,
            STEP_TIME.value,
            CHECKSUM_SHARDS.value,
            LOADER_BATCHES.value,
            DEVICE_MEMORY_GIB.value,
            MEMORY_HEADROOM.value,
            NUM_CLASSES.value,
        )


@dataclasses.dataclass(frozen=True)
class Row:
    stage: str
    check: str
    status: str
    detail: str


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a stage trains: a TPU slice (`tpu` set) or this machine's JAX devices."""

    name: str
    devices: int
    hosts: int
    memory: float  # bytes per device
    peak: float  # FLOP/s per device
    tpu: Any = None  # launch.cloud_tpu.TpuSlice


def is_training(group) -> bool:
    return all(key in group for key in ("batch_size", "mesh", "data"))


# --- target ---------------------------------------------------------------------------------------


def _local_target(memory_gib: float) -> Target:
    import jax
    import psutil

    from trainer import flops

    devices = jax.local_devices()
    limit = (devices[0].memory_stats() or {}).get("bytes_limit")
    memory = memory_gib * 2**30 or limit or psutil.virtual_memory().total / len(devices)
    peak, source = flops.peak_flops_per_device(devices)
    return Target(
        f"this machine: {len(devices)} x {devices[0].device_kind} (peak {source})",
        jax.device_count(),
        jax.process_count(),
        memory,
        peak,
    )


def target_for(stage: dag.Stage, config, options: Options) -> Target:
    """`--topology`, else the stage's `xm.resources` TPU slice, else this machine's devices."""
    spec = options.topology
    where = "--topology"
    resources = config.get("xm", {}).get("resources", {}) if "xm" in config else {}
    if not spec and stage.type_name in resources and resources[stage.type_name].get("tpu_type"):
        res = resources[stage.type_name]
        spec, where = f"{res.tpu_type}:{res.tpu_topology}", f"xm.resources.{stage.type_name}"
    if not spec:
        return _local_target(options.device_memory_gib)
    from launch import cloud_tpu  # imports xmanager: only for TPU targets

    from trainer import flops

    version, sep, topology = spec.partition(":")
    if not sep:
        raise ValueError(f"{where}={spec!r}: expected TYPE:TOPOLOGY, e.g. v4:8x8x16")
    tpu = cloud_tpu.TpuSlice(version, topology)  # validates the type and the topology's rank
    memory = options.device_memory_gib * 2**30 or TPU_HBM_GIB[version] * 2**30
    return Target(
        f"TPU {spec} ({tpu.chips} chips, {tpu.hosts} hosts)",
        tpu.chips,
        tpu.hosts,
        memory,
        flops.PEAK_FLOPS[TPU_PEAK_KEY[version]],
        tpu,
    )


# --- config ---------------------------------------------------------------------------------------


def _architecture(stage: dag.Stage, groups: dict, config) -> dict | None:
    """The ViT fields this stage trains (variant defaults + every set model.* override, following
    `init_from` while the variant comes from an upstream export), image size from its data; None
    when nothing in the config names the architecture."""
    from trainer.models import vit

    chain, name, group = [], stage.name, stage.group(config)
    while not group.model.variant:
        chain.append(group)
        source = group.get("init_from") if "init_from" in group else None
        if source not in groups or source == name or len(chain) > len(groups):
            return None
        name, group = source, groups[source]
    chain.append(group)
    fields = dataclasses.asdict(vit.make_config(group.model.variant))
    for g in reversed(chain):
        fields.update({k: v for k, v in g.model.items() if k != "variant" and v is not None})
    fields["image_size"] = stage.group(config).data.image_size
    return fields


def config_rows(
    stage: dag.Stage, group, target: Target, arch: dict | None, upstream: dict
) -> list[Row]:
    from trainer import sharding

    where = stage.config_path
    rows = []

    def row(check, problem, ok, status=NO_GO):
        rows.append(Row(stage.name, check, status if problem else GO, problem or ok))

    try:
        stage.check(group, upstream)
        row("config", "", "plan-time validation passes")
    except dag.PlanError as e:
        row("config", str(e), "")
    try:
        replica, data, model = sharding.mesh_shape(
            target.devices, group.mesh.data, group.mesh.model, group.mesh.replica
        )
        row(
            "mesh",
            "",
            f"replica {replica} x data {data} x model {model} on {target.devices} devices",
        )
    except ValueError as e:
        replica, data, model = None, None, group.mesh.model
        row("mesh", f"{where}.{e} (target: {target.name})", "")
    problems = []
    dp = replica * data if replica else None  # None: no mesh of the target (the mesh row says why)
    for key in ("batch_size", "eval_batch_size"):
        microbatches = group.get("microbatches", 1) if key == "batch_size" else 1
        # the stage's own run-time check, once per divisor so that both reasons show
        for kw in (
            dict(mesh=dp, microbatches=microbatches),
            dict(mesh=None, processes=target.hosts),
        ):
            try:
                sharding.check_batch(group[key], key=f"{where}.{key}", **kw)
            except ValueError as e:
                problems += [str(e)] if str(e) not in problems else []
    row(
        "batch",
        "; ".join(problems),
        f"{group.batch_size} = {group.batch_size // target.hosts} per host"
        + (f", {group.batch_size // (replica * data)} per data shard" if replica else ""),
    )
    if arch is None:
        rows.append(Row(stage.name, "head_dim", SKIP, "architecture comes from an upstream export"))
        rows.append(
            Row(stage.name, "image vs patch", SKIP, "architecture comes from an upstream export")
        )
        return rows
    width, heads, mlp = arch["width"], arch["num_heads"], arch["mlp_dim"]
    problems = (
        [] if width % heads == 0 else [f"width {width} is not divisible by num_heads {heads}"]
    )
    if isinstance(model, int) and model > 1:
        problems += [
            f"{name} {value} is not divisible by the model axis {model} (its weights would be "
            f"replicated on every device)"
            for name, value in (("num_heads", heads), ("mlp_dim", mlp))
            if value % model
        ]
    head_dim = width // heads
    if problems:
        row("head_dim", f"{where}.model: " + "; ".join(problems), "")
    elif target.tpu is not None and head_dim % 128:
        rows.append(
            Row(
                stage.name,
                "head_dim",
                WARN,
                f"head_dim {head_dim} is not a multiple of 128: "
                "the TPU matrix units run partly empty",
            )
        )
    else:
        row("head_dim", "", f"{width} / {heads} heads = {head_dim}")
    image, patch = arch["image_size"], arch["patch_size"]
    row(
        "image vs patch",
        f"{where}.data.image_size={image} is not divisible by the patch size {patch}"
        if image % patch
        else "",
        f"{image} px / {patch} = {(image // patch) ** 2} tokens",
    )
    return rows


# --- data -----------------------------------------------------------------------------------------


def splits_read(group) -> list[tuple[str, str]]:
    """(dataset, split) of the training split and of every evaluator's split."""
    wanted = [(group.data.dataset, group.data.train_split)]
    for ev in group.get("evals", {}).values():
        if "split" in ev:
            wanted.append((ev.get("dataset") or group.data.dataset, ev.split))
    return list(dict.fromkeys(wanted))


def check_split(split_dir: Path, checksum_shards: int):
    """(manifest, detail): counts, options and dead letters of every shard, sha256 of all or a
    seeded sample of `checksum_shards`; raises ManifestError (one line) otherwise."""
    from data import manifest as manifest_lib

    m = manifest_lib.validate(split_dir, check_checksums=False)
    chosen = range(len(m.shards))
    if 0 < checksum_shards < len(m.shards):
        chosen = sorted(random.Random(0).sample(chosen, checksum_shards))
    for i in chosen:
        shard = m.shards[i]
        digest = manifest_lib.sha256_file(split_dir / shard.path)
        if digest != shard.sha256:
            raise manifest_lib.ManifestError(
                f"{split_dir / shard.path}: sha256 {digest[:16]}... does not match "
                f"{split_dir / manifest_lib.MANIFEST_NAME} field shards[{i}].sha256 "
                f"{shard.sha256[:16]}..."
            )
    return m, (
        f"{m.num_records} records in {len(m.shards)} shards, group_size:1, "
        f"{m.num_dead_letters} dead letters, sha256 {len(chosen)}/{len(m.shards)} shards"
    )


def loader_rate(split_dir: Path, group, per_host_batch: int, batches: int) -> float:
    """Images/s of the stage's training loader on this host (host batches, before device
    transfer)."""
    import jax

    from data import loader
    from trainer import sharding

    batch = min(per_host_batch, LOADER_MAX_BATCH)
    bsh = sharding.batch_sharding(sharding.make_mesh(1, 1, devices=jax.local_devices()[:1]))
    train = loader.train_loader(
        split_dir,
        global_batch_size=batch,
        image_size=group.data.image_size,
        seed=group.seed,
        sharding=bsh,
        augment=group.data.augment.to_dict(),
        worker_count=group.runtime.worker_count,
        read_threads=group.runtime.read_threads,
        process_index=0,
        process_count=1,
    )
    try:
        next(train.iterator)  # start-up (and Grain workers) not counted
        start = time.perf_counter()
        for _ in range(batches):
            next(train.iterator)
        return batches * batch / (time.perf_counter() - start)
    finally:
        train.close()


# --- compile --------------------------------------------------------------------------------------


def make_task(stage: dag.Stage, group, num_classes: int):
    """The stage's own Task when it is built from its config alone (today: pretrain); None when
    it starts from an upstream export, which preflight does not read."""
    if stage.type_name == "pretrain":
        from trainer import pretrain

        return pretrain.make_task(group, num_classes)
    return None


libtpu_installed = aot.libtpu_installed  # a module attribute: tests patch it


@dataclasses.dataclass
class Compiled:
    memory: float  # per-device bytes
    how: str
    step_time: float = 0.0
    step_time_source: str = ""


def compile_step(
    task, group, target: Target, num_classes: int, total_steps: int, options: Options
) -> Compiled:
    """Lowers and compiles the stage's train step for the target; on a local target also runs it
    a few steps (unless --step_time is given) to measure the step time."""
    import jax
    import numpy as np

    from trainer import sharding

    args = (group.optim, total_steps)
    shapes = dict(
        seed=group.seed,
        batch_size=group.batch_size,
        image_size=group.data.image_size,
        num_classes=num_classes,
    )
    if target.tpu is not None and not libtpu_installed():
        # eval_shape only: params + optimizer state + batch per device; activations not counted
        r, d, m = sharding.mesh_shape(
            target.devices, group.mesh.data, group.mesh.model, group.mesh.replica
        )
        memory = aot.estimate_bytes(task, *args, data=d, model=m, replica=r, **shapes)
        return Compiled(
            memory,
            "AOT skipped: libtpu is not installed (pip install -c constraints.txt "
            "'.[tpu]'); jax.eval_shape estimate of params + optimizer state + batch, "
            "activations not counted",
        )
    devices = (
        aot.tpu_devices(target.tpu.version, target.tpu.topology)
        if target.tpu is not None
        else jax.devices()
    )
    mesh = sharding.make_mesh(
        group.mesh.data, group.mesh.model, group.mesh.replica, devices=devices
    )
    result = aot.compile_train_step(
        task, *args, mesh, microbatches=group.get("microbatches", 1), **shapes
    )
    compiled, frozen = (
        result.compiled,
        {},
    )  # Tasks preflight builds have no frozen params (see make_task)
    memory = result.memory
    flops_, bytes_ = aot.cost(compiled)
    where = "AOT for " + target.name if target.tpu is not None else "compiled for " + target.name
    out = Compiled(
        memory,
        f"{where}: XLA memory analysis; {flops_:.3g} FLOP and {bytes_:.3g} bytes "
        f"accessed per device and step",
    )
    model_flops = task.flops_per_example * group.batch_size / target.devices  # per device and step
    if target.tpu is not None and flops_ < ROOFLINE_MIN_COUNTED * model_flops:
        # XLA's cost analysis counts a while-loop body once (scanned layers, microbatches), so
        # its FLOPs and bytes undercount the step: a roofline from them would claim > 100% MFU.
        out.how += (
            f" (XLA counts {flops_ / model_flops:.1%} of the model's FLOPs: loop bodies once, "
            "so no roofline step time)"
        )
    elif target.tpu is not None:
        out.step_time = max(flops_ / target.peak, bytes_ / TPU_HBM_BYTES_PER_S[target.tpu.version])
        out.step_time_source = "roofline of the compiled cost (no communication)"
    elif not options.step_time:
        st = result.setup.init()
        arrays = {
            k: jax.device_put(np.zeros(v.shape, v.dtype), result.batch_sharding)
            for k, v in result.batch.items()
        }
        times = []
        for _ in range(4):  # the first call pays for transfers: not counted
            start = time.perf_counter()
            st, metrics = compiled(st, frozen, arrays)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        out.step_time, out.step_time_source = (
            statistics.median(times[1:]),
            "measured here (median of 3 steps)",
        )
    return out


def _total_steps(group, num_examples: int | None) -> int:
    """The schedule's length (shapes do not depend on it); an epoch-based run without data yet
    counts 1000 batches an epoch."""
    from trainer import cadence

    return cadence.total_steps(
        steps=group.steps,
        epochs=group.epochs,
        examples=group.examples,
        num_examples=num_examples or 1000 * group.batch_size,
        batch_size=group.batch_size,
    )


# --- the table ------------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB" if n >= 2**26 else f"{n / 2**20:.3g} MiB"


def stage_rows(
    stage: dag.Stage, config, groups: dict, prepared: Path | str, options: Options, upstream: dict
) -> list[Row]:
    """All rows of one training stage; `prepared` is the prepared-data root, or why there is
    none."""
    group = stage.group(config)
    name = stage.name
    try:
        target = target_for(stage, config, options)
    except (ValueError, KeyError) as e:
        return [Row(name, "target", NO_GO, str(e))]
    rows = [Row(name, "target", GO, target.name)]
    arch = _architecture(stage, groups, config)
    rows += config_rows(stage, group, target, arch, upstream)
    config_ok = all(r.status != NO_GO for r in rows)

    manifests = {}
    for dataset, split in splits_read(group):
        key = f"manifest {dataset}/{split}"
        if isinstance(prepared, str):
            rows.append(Row(name, key, NO_GO, prepared))
            continue
        split_dir = prepared / dataset / split
        try:
            manifests[dataset, split], detail = check_split(split_dir, options.checksum_shards)
        except ValueError as e:  # ManifestError, or a missing split
            rows.append(Row(name, key, NO_GO, str(e)))
            continue
        rows.append(Row(name, key, GO, detail))
        shards = len(manifests[dataset, split].shards)
        if shards < target.hosts:
            rows.append(
                Row(
                    name,
                    f"shards {dataset}/{split}",
                    WARN,
                    f"{shards} shards for {target.hosts} hosts: every host reads records from all "
                    f"of them (strided), so it works, but re-prepare with smaller "
                    f"records_per_shard to spread the reads",
                )
            )
        else:
            rows.append(
                Row(
                    name,
                    f"shards {dataset}/{split}",
                    GO,
                    f"{shards} shards >= {target.hosts} hosts",
                )
            )
    train_key = (group.data.dataset, group.data.train_split)
    train_manifest = manifests.get(train_key)

    skip = "the config is no-go" if not config_ok else ""
    task = None
    num_classes = group.model.num_classes or (train_manifest.num_classes if train_manifest else 0)
    assumed = (
        ""
        if num_classes
        else f"; num_classes={options.num_classes} assumed (--num_classes) until prepared"
    )
    num_classes = num_classes or options.num_classes
    if not skip:
        task = make_task(stage, group, num_classes)
        skip = (
            ""
            if task is not None
            else "its Task starts from an upstream export, which preflight does not read"
        )
    compiled = None
    if skip:
        rows += [Row(name, check, SKIP, skip) for check in ("compile", "memory")]
    else:
        try:
            total = _total_steps(group, train_manifest.num_records if train_manifest else None)
            compiled = compile_step(task, group, target, num_classes, total, options)
            rows.append(
                Row(
                    name,
                    "compile",
                    SKIP if compiled.how.startswith("AOT skipped") else GO,
                    compiled.how + assumed,
                )
            )
        except Exception as e:  # XLA: out of memory at compile time, unsupported ops, ...
            error = " ".join(f"{type(e).__name__}: {e}".split())[:400]
            if "RESOURCE_EXHAUSTED" in error:  # XLA's own memory verdict for the target
                rows.append(Row(name, "compile", NO_GO, "out of device memory (see memory)"))
                rows.append(Row(name, "memory", NO_GO, error))
            else:
                rows.append(Row(name, "compile", NO_GO, error))
        if compiled is not None:
            usable = target.memory * (1 - options.memory_headroom)
            status = GO if compiled.memory <= usable else NO_GO
            rows.append(
                Row(
                    name,
                    "memory",
                    status,
                    f"{_gib(compiled.memory)} per device {'<=' if status == GO else '>'} "
                    f"{_gib(usable)} ({_gib(target.memory)} less "
                    f"{options.memory_headroom:.0%} headroom)",
                )
            )

    # Step time: --step_time > measured here > roofline of the compiled cost > the paper's MFU.
    flops_per_step = task.flops_per_example * group.batch_size if task is not None else 0.0
    if options.step_time:
        step_time, source = options.step_time, "--step_time"
    elif compiled is not None and compiled.step_time:
        step_time, source = compiled.step_time, compiled.step_time_source
    elif flops_per_step:
        step_time = flops_per_step / (target.devices * target.peak * PAPER_MFU)
        source = f"model FLOPs at the paper's {PAPER_MFU:.1%} MFU"
    else:
        step_time, source = 0.0, ""
    if flops_per_step and step_time:
        mfu = flops_per_step / (step_time * target.devices * target.peak)
        rows.append(
            Row(
                name,
                "MFU",
                SKIP if source.startswith("model FLOPs") else GO,
                f"{mfu:.1%} at {step_time * 1e3:.4g} ms/step ({source}); "
                f"{flops_per_step:.3g} model FLOP/step",
            )
        )
    else:
        rows.append(Row(name, "MFU", SKIP, skip or "no step time: give --step_time"))

    per_host = group.batch_size // target.hosts
    if train_manifest is None or not config_ok:
        rows.append(
            Row(name, "loader", SKIP, "the training split is not readable" if config_ok else skip)
        )
    elif not step_time:
        rows.append(Row(name, "loader", SKIP, "no step time to compare with: give --step_time"))
    else:
        try:
            rate = loader_rate(
                prepared / train_key[0] / train_key[1], group, per_host, options.loader_batches
            )
        except (
            Exception
        ) as e:  # a record the manifest check could not see (bad image bytes, labels)
            rate = 0.0
            source = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        need = per_host / step_time
        status = GO if rate >= need else NO_GO
        rows.append(
            Row(
                name,
                "loader",
                status,
                f"{rate:.0f} img/s per host measured here "
                f"(read_threads={group.runtime.read_threads}, "
                f"worker_count={group.runtime.worker_count}) {'>=' if status == GO else '<'} "
                f"{need:.0f} needed ({per_host} per host every {step_time * 1e3:.4g} ms, {source})"
                + ("" if status == GO else ": the run would be input-bound"),
            )
        )
    return rows


def prepared_root(stage: dag.Stage, group, plans: dict) -> Path | str:
    """Where the prepared splits are (the plan's prepare output, else `data.prepared_dir`), or
    why they are not there yet."""
    if "prepare" in stage.upstream and "prepare" not in plans:
        return "unknown until the config passes plan-time validation (see config)"
    if "prepare" in plans:
        if plans["prepare"].action != "reuse":
            return (
                f"not prepared yet: {plans['prepare'].path} is not in the cache "
                "(run --stages prepare first)"
            )
        return plans["prepare"].path
    if group.data.prepared_dir:
        return Path(group.data.prepared_dir)
    return f"no prepared data: add a prepare stage or set {stage.config_path}.data.prepared_dir"


def run_checks(
    config,
    workdir: Path,
    registry: dag.Registry = dag.STAGES,
    options: Options = Options(),
    only: Sequence[str] | None = None,
    plans: Sequence[dag.StagePlan] | None = None,
) -> list[Row]:
    """The go/no-go rows for every training stage of the config (or of `only`)."""
    try:
        stages = registry.expand(config)
    except dag.PlanError as e:
        return [Row("plan", "stages", NO_GO, str(e))]
    groups = {s.name: s.group(config) for s in stages}
    by_name = {s.name: s for s in stages}
    if plans is None:
        try:
            plans = dag.plan(config, workdir, registry)
        except dag.PlanError:
            plans = []  # the stage rows name the failing key
    plans_by_name = {p.name: p for p in plans}
    chosen = [
        s
        for s in stages
        if is_training(groups[s.name]) and (not only or s.name in only or s.type_name in only)
    ]
    if not chosen:
        return [
            Row("plan", "stages", NO_GO, f"no training stage to check among {', '.join(groups)}")
        ]
    rows = []
    for stage in chosen:
        upstream = {up: groups[up] for up in stage.upstream if up in by_name}
        rows += stage_rows(
            stage,
            config,
            groups,
            prepared_root(stage, groups[stage.name], plans_by_name),
            options,
            upstream,
        )
    return rows


def format_table(rows: Sequence[Row]) -> str:
    widths = [max(len(getattr(r, f)) for r in rows) for f in ("stage", "check", "status")]
    lines = [
        f"{r.stage:<{widths[0]}}  {r.check:<{widths[1]}}  {r.status:<{widths[2]}}  {r.detail}"
        for r in rows
    ]
    no_go = [r for r in rows if r.status == NO_GO]
    verdict = (
        f"preflight: NO-GO ({len(no_go)} reason{'s' * (len(no_go) != 1)})"
        if no_go
        else "preflight: GO"
    )
    return "\n".join(lines + [verdict])


def is_go(rows: Sequence[Row]) -> bool:
    return not any(r.status == NO_GO for r in rows)


# --- the DAG hook (launch.run --preflight) --------------------------------------------------------


def gate(
    config,
    plans: list[dag.StagePlan],
    workdir: Path,
    registry: dag.Registry,
    *,
    only,
    force,
    options: Options,
    execute: Callable = produce.execute,
    log: Callable = print,
) -> list[dag.StagePlan]:
    """Runs the stages before the first training stage to run (prepare), then the checks for the
    training stages about to run; returns the plans left to execute (re-planned: what ran is now
    a cache hit), or exits 1 on no-go with the table."""
    training = [p for p in plans if p.action == "run" and is_training(p.stage.group(config))]
    if not training:
        return plans
    first = plans.index(training[0])
    before = [p for p in plans[:first] if p.action == "run"]
    if before:
        execute(plans[:first], config)
        done = {p.name for p in before}
        plans = dag.plan(
            config, workdir, registry, only=only, force=[f for f in force if f not in done]
        )
    rows = run_checks(
        config, workdir, registry, options, only=[p.name for p in training], plans=plans
    )
    log(format_table(rows))
    if not is_go(rows):
        sys.exit(1)
    return plans


# --- CLI ------------------------------------------------------------------------------------------


def main(argv):
    cli.no_positional(argv)
    config = cli.config()
    rows = run_checks(
        config, cli.workdir(), cli.registry(), Options.from_flags(), only=cli.STAGES.value or None
    )
    print(format_table(rows))
    sys.exit(0 if is_go(rows) else 1)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
