"""The config group every training stage shares, and its plan-time check.

    c = stage_config.training_group()      # then a stage adds its own keys (loss, teacher, ...)

Keys (a stage's `default_config()` starts from these; trainer/loop.py reads them):
    seed, model.* (every ViTConfig field, None = the variant's value), data.{dataset, train_split,
    image_size, prepared_dir, augment.*}, batch_size, eval_batch_size, exactly one of
    steps/epochs/examples, optim.* (trainer/optim.py), mesh.{data, model, replica},
    checkpoint_every, resume, init_params, evals.<name>.{type, every, ...} (trainer/evaluators),
    microbatches (gradient accumulation), xla_flags (trainer/xla_flags.py), runtime.* (below).

`runtime` holds what cannot change a stage's results, so launch/fingerprint.py leaves it out of
the cache key: progress bar, log cadence, decode threads / Grain workers, checkpoint retention and
async saving, the MFU peak, and the distributed set-up (addresses, process ids; the process count
changes only the order of float sums, docs/DESIGN.md §2.5). tests/test_dag_runtime.py proves the
artifacts are bit-identical across the runtime knobs.

`check(cfg, where, upstream)` runs at plan time (launch/dag.py calls each stage's `validate`):
everything that needs neither data nor devices, one line naming the key.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Mapping

import ml_collections

from trainer import config_checks as checks
from trainer import evaluators, losses, optim, sharding, xla_flags
from trainer.models import vit


def model_group(variant: str = "mu/4") -> ml_collections.ConfigDict:
    """Every ViTConfig field as a typed placeholder: None = the variant's value (image size and
    classes from the data); typed so that `--config.<stage>.model.depth=4` parses."""
    hints = typing.get_type_hints(vit.ViTConfig)
    fields = {}
    for f in dataclasses.fields(vit.ViTConfig):
        if f.name == "variant":
            continue
        kind = hints[f.name]
        kind = next(
            (a for a in typing.get_args(kind) if a is not type(None)), kind
        )  # int | None -> int
        fields[f.name] = ml_collections.config_dict.placeholder(kind)
    return ml_collections.ConfigDict({"variant": variant, **fields})


def augment_group(**overrides) -> ml_collections.ConfigDict:
    """data/augment.py AugmentConfig; big_vision's ViT recipe: Inception crop (area >= 5%) +
    flip."""
    values = dict(
        inception_crop=True,
        area_min=0.05,
        area_max=1.0,
        aspect_min=0.75,
        aspect_max=4 / 3,
        flip=True,
        mixup_alpha=0.0,
    )
    values.update(overrides)
    return ml_collections.ConfigDict(values)


def runtime_group() -> ml_collections.ConfigDict:
    """Knobs that cannot change results: not in the stage's fingerprint."""
    return ml_collections.ConfigDict(
        dict(
            progress="auto",  # tqdm bar: auto (if a terminal) | on | off
            # train metrics (loss, lr, MFU, ...) every N steps; also when the NaN guard looks
            log_every=10,
            read_threads=2,  # decode threads per process
            worker_count=0,  # >0: Grain worker processes, each with read_threads threads
            keep_checkpoints=2,
            async_checkpoint=True,
            peak_flops=0.0,  # per device, for MFU; 0 = the device table, or measured on CPU
            distributed=ml_collections.ConfigDict(
                dict(
                    coordinator="",
                    num_processes=0,
                    process_id=-1,
                    auto=False,
                    cpu_collectives=False,
                )
            ),
        )
    )


def training_group(variant: str = "mu/4") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = model_group(variant)
    c.data = ml_collections.ConfigDict(
        dict(
            dataset="digits",
            train_split="train",
            image_size=32,
            prepared_dir="",  # a prepare output dir, for runs outside the DAG (tests, notebooks)
            augment=augment_group(),
        )
    )
    c.batch_size = 128  # global, across all processes
    # Gradient accumulation: the step averages the gradients of this many equal slices of the
    # batch, one slice's activations live at a time (trainer/step.py; e.g. the 22B pod config).
    c.microbatches = 1
    # XLA's own async-collective schedule (trainer/xla_flags.py FLAG_SETS: default,
    # async_collectives, collective_matmul, latency_hiding), set by the stage's process before JAX
    # starts. Not in `runtime`: reordered / windowed collectives change float summation order.
    c.xla_flags = "default"
    c.eval_batch_size = 256
    # Training length: exactly one of these (cadence.total_steps).
    c.steps = ml_collections.config_dict.placeholder(int)
    c.epochs = ml_collections.config_dict.placeholder(float)
    c.examples = ml_collections.config_dict.placeholder(int)
    c.optim = optim.default_config()
    c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1, replica=1))
    c.checkpoint_every = 50
    c.resume = ""  # another run's checkpoints/ dir to continue from
    c.init_params = ""  # an exported params/ dir of the same shapes: params only, fresh optimizer
    c.evals = ml_collections.ConfigDict()
    c.runtime = runtime_group()
    return c


def model_config(cfg, num_classes: int) -> vit.ViTConfig:
    """The trained model: the variant + every set `model.*` field; image size and classes from
    data."""
    overrides = {k: v for k, v in cfg.model.items() if k != "variant" and v is not None}
    overrides.setdefault("image_size", cfg.data.image_size)
    overrides.setdefault("num_classes", num_classes)
    return vit.make_config(cfg.model.variant, **overrides)


def check(
    cfg,
    where: str,
    upstream: Mapping[str, ml_collections.ConfigDict] | None = None,
    *,
    model: bool = True,
) -> None:
    """Plan-time checks of the shared keys of a training stage group `where` (e.g. "pretrain");
    `model=False`: the stage checks its `model.*` itself (e.g. LiT's text tower)."""
    upstream = upstream or {}
    given = [k for k in ("steps", "epochs", "examples") if cfg[k] is not None]
    if len(given) != 1:
        raise checks.fail(
            f"{where}.steps",
            f"set exactly one of steps, epochs, examples (got {', '.join(given) or 'none'})",
        )
    checks.number(f"{where}.{given[0]}", cfg[given[0]], gt=0)

    checks.mesh(f"{where}.mesh", cfg.mesh, ("data", "model", "replica"))
    microbatches = cfg.get("microbatches", 1)
    checks.positive_int(f"{where}.microbatches", microbatches)
    for key in ("batch_size", "eval_batch_size"):
        # the run time's check (trainer/loop.py check_mesh); a -1 mesh axis leaves it to run time
        sharding.check_batch(
            cfg[key],
            cfg.mesh,
            f"{where}.{key}",
            microbatches=microbatches if key == "batch_size" else 1,
        )
    try:
        xla_flags.check_name(cfg.get("xla_flags", "default"))
    except ValueError as e:
        raise checks.fail(f"{where}.xla_flags", str(e).removeprefix("xla_flags: ")) from None
    checks.int_at_least(f"{where}.checkpoint_every", cfg.checkpoint_every, 0)

    try:
        optim.validate_config(cfg.optim)
        if (
            cfg.steps is not None
        ):  # warmup/cooldown vs the run length: known now when given in steps
            optim.make_schedule(cfg.optim, cfg.steps)
    except ValueError as e:  # "optim config field 'schedule': ..." -> "<where>.optim.schedule: ..."
        field = re.match(r"optim config field '([^']+)': (.*)", str(e))
        raise (
            checks.fail(f"{where}.optim.{field[1]}", field[2])
            if field
            else checks.fail(f"{where}.optim", str(e))
        ) from None

    if (
        model and cfg.model.variant
    ):  # "" = the upstream export's architecture (fine-tuning checks it)
        try:
            # field values, divisibility, image vs patch size
            model_config(cfg, cfg.model.num_classes or 2)
        except (ValueError, TypeError) as e:
            raise checks.fail(f"{where}.model", str(e)) from None

    _check_data(cfg, where, upstream.get("prepare"))
    evaluators.check(cfg.evals, f"{where}.evals")
    _check_runtime(cfg.runtime, f"{where}.runtime")


def check_loss(cfg, where: str) -> None:
    """`loss` + `label_smoothing` name a classification loss of trainer/losses.py."""
    try:
        losses.get(cfg.loss, cfg.label_smoothing)
    except ValueError as e:
        raise checks.fail(f"{where}.loss", str(e)) from None


SPLIT_KEYS = ("split", "train_split")  # evaluator config keys that name a split of its dataset


def _check_data(cfg, where: str, prepare) -> None:
    """The dataset and every split the stage reads must be ones the prepare stage produces."""
    if prepare is None:
        return
    checks.prepared(f"{where}.data.dataset", cfg.data.dataset, prepare)
    wanted = [(f"{where}.data.train_split", cfg.data.dataset, cfg.data.train_split)]
    for name, ev in cfg.evals.items():
        for key in SPLIT_KEYS:
            if key in ev:
                wanted.append(
                    (f"{where}.evals.{name}.{key}", ev.get("dataset") or cfg.data.dataset, ev[key])
                )
        if ev.get("dataset"):
            checks.prepared(f"{where}.evals.{name}.dataset", ev.dataset, prepare)
    for key, dataset, split in wanted:
        checks.prepared_split(key, split, dataset, prepare)


def _check_runtime(rt, where: str) -> None:
    checks.one_of(f"{where}.progress", rt.progress, ("auto", "on", "off"))
    for key, low in (
        ("log_every", 0),
        ("read_threads", 1),
        ("worker_count", 0),
        ("keep_checkpoints", 1),
    ):
        checks.int_at_least(f"{where}.{key}", rt[key], low)
    checks.number(f"{where}.peak_flops", rt.peak_flops, ge=0)
