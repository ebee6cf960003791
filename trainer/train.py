"""The `pretrain` stage: sharded ViT training on prepared ArrayRecords.

    python -m launch.run --config launch/configs/tiny.py --stages pretrain      # inside the DAG
    python -m trainer.train --data_dir WORKDIR/prepare/<fp> --out /tmp/pretrain  # standalone

Sections follow big_vision's train.py: config -> mesh -> data -> shapes -> shard -> restore -> steps
-> loop (log / eval / checkpoint) -> export. Checkpoints make a killed run resume bit-exactly;
SIGTERM/SIGINT save one before exiting; a non-finite loss or gradient stops the run naming the step.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import time
import typing
from pathlib import Path
from typing import Any

import jax
import ml_collections

from trainer import cadence, checkpoint, distributed, flops, optim, sharding
from trainer import state as train_state
from trainer.metrics_log import MetricsLog
from trainer.models import vit
from trainer.preemption import Preempted, PreemptionGuard

log = logging.getLogger(__name__)

def _model_group() -> ml_collections.ConfigDict:
    """Every ViTConfig field as a typed placeholder: None = the variant's value (image size and
    classes from the data); typed so that `--config.pretrain.model.depth=4` parses."""
    hints = typing.get_type_hints(vit.ViTConfig)
    fields = {}
    for f in dataclasses.fields(vit.ViTConfig):
        if f.name == "variant":
            continue
        kind = hints[f.name]
        kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind)  # int | None -> int
        fields[f.name] = ml_collections.config_dict.placeholder(kind)
    return ml_collections.ConfigDict({"variant": "mu/4", **fields})


class NonFiniteError(FloatingPointError):
    """The loss or a gradient became NaN/Inf; the last good checkpoint is kept."""


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = _model_group()
    c.data = ml_collections.ConfigDict(dict(
        dataset="digits", train_split="train", val_split="val", image_size=32,
        read_threads=2, worker_count=0,  # decode threads per process; >0: Grain worker processes
        prepared_dir="",  # a prepare output dir, for runs outside the DAG
        # data/augment.py AugmentConfig; big_vision's ViT recipe: Inception crop (area >= 5%) + flip.
        augment=ml_collections.ConfigDict(dict(inception_crop=True, area_min=0.05, area_max=1.0, aspect_min=0.75,
                                               aspect_max=4 / 3, flip=True, mixup_alpha=0.0)),
    ))
    c.batch_size = 128  # global, across all processes
    c.eval_batch_size = 256
    # Training length: exactly one of these (cadence.total_steps).
    c.steps = ml_collections.config_dict.placeholder(int)
    c.epochs = ml_collections.config_dict.placeholder(float)
    c.examples = ml_collections.config_dict.placeholder(int)
    c.loss = "sigmoid_xent"
    c.label_smoothing = 0.0
    c.optim = optim.default_config()
    c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1, replica=1))
    c.log_every = 10
    c.eval_every = 100
    c.checkpoint_every = 50
    c.keep_checkpoints = 2
    c.async_checkpoint = True
    c.resume = ""  # another run's checkpoints/ dir to continue from
    c.init_params = ""  # an exported params/ dir: params only, fresh optimizer
    c.nan_at_step = 0  # >0 poisons that step's loss (exercises the NaN guard)
    c.peak_flops = 0.0  # per device; 0 = the device table, or measured on CPU
    c.progress = "auto"  # tqdm bar: auto (if a terminal) | on | off
    c.distributed = ml_collections.ConfigDict(dict(coordinator="", num_processes=0, process_id=-1, auto=False,
                                                   cpu_collectives=False))
    return c


def model_config(cfg, num_classes: int) -> vit.ViTConfig:
    overrides = {k: v for k, v in cfg.model.items() if k != "variant" and v is not None}
    overrides.setdefault("image_size", cfg.data.image_size)
    overrides.setdefault("num_classes", num_classes)
    return vit.make_config(cfg.model.variant, **overrides)


def split_dir(cfg, inputs: dict, split: str) -> Path:
    """Where the prepare stage put `<dataset>/<split>`; a one-line error when it is not there."""
    if "prepare" in inputs:
        root = Path(inputs["prepare"].path)
    elif cfg.data.prepared_dir:
        root = Path(cfg.data.prepared_dir)
    else:
        raise ValueError("pretrain: no prepared data (run the prepare stage or set data.prepared_dir)")
    path = root / cfg.data.dataset / split
    if not (path / "manifest.json").exists():
        raise FileNotFoundError(f"pretrain: data.dataset={cfg.data.dataset!r} split {split!r} not found: "
                                f"{path / 'manifest.json'} does not exist")
    return path


def validate(cfg, mesh) -> None:
    """Checks that need no compile: batch vs mesh and processes, training length."""
    dp = sharding.data_parallel_size(mesh)
    for field in ("batch_size", "eval_batch_size"):
        value = cfg[field]
        if value <= 0 or value % dp:
            raise ValueError(f"pretrain: {field}={value} is not divisible by the data-parallel size {dp}")
        if value % jax.process_count():
            raise ValueError(f"pretrain: {field}={value} is not divisible by {jax.process_count()} processes")
    if sum(x is not None for x in (cfg.steps, cfg.epochs, cfg.examples)) != 1:
        raise ValueError("pretrain: set exactly one of steps, epochs, examples")
    train_state.loss_fn(cfg.loss, cfg.label_smoothing)  # raises on an unknown loss name
    if cfg.progress not in ("auto", "on", "off"):
        raise ValueError(f"pretrain: progress={cfg.progress!r} is not one of auto, on, off")


def run(cfg, inputs: dict, out: Path) -> dict:
    from data import loader, manifest  # here, so that trainer/models + flops stay importable without Grain

    out = Path(out)
    # --- Config and mesh: everything is validated before anything compiles.
    distributed.initialize(cfg.distributed)
    train_dir, val_dir = split_dir(cfg, inputs, cfg.data.train_split), split_dir(cfg, inputs, cfg.data.val_split)
    mesh = sharding.make_mesh(**cfg.mesh)
    validate(cfg, mesh)
    mcfg = model_config(cfg, manifest.read(train_dir).num_classes)
    axes = sharding.data_axes(mesh)

    # --- Data.
    train = loader.train_loader(train_dir, global_batch_size=cfg.batch_size, image_size=cfg.data.image_size,
                                seed=cfg.seed, mesh=mesh, augment=cfg.data.augment.to_dict(),
                                worker_count=cfg.data.worker_count, read_threads=cfg.data.read_threads,
                                data_axes=axes)
    val = loader.eval_loader(val_dir, global_batch_size=cfg.eval_batch_size, image_size=cfg.data.image_size,
                             mesh=mesh, worker_count=cfg.data.worker_count, read_threads=cfg.data.read_threads,
                             data_axes=axes)
    model = vit.ViT(mcfg)
    total = cadence.total_steps(steps=cfg.steps, epochs=cfg.epochs, examples=cfg.examples,
                                num_examples=train.num_examples, batch_size=cfg.batch_size)

    # --- Shapes and shardings, then the state created already sharded.
    setup = train_state.setup(model, cfg.optim, total, mesh, cfg.seed)
    tx, schedule, shardings = setup.tx, setup.schedule, setup.shardings
    batch_sharding = jax.sharding.NamedSharding(mesh, sharding.batch_spec(mesh))

    # --- Restore: own checkpoint > resume > init_params > scratch.
    ckpts = checkpoint.Checkpoints(out / "checkpoints", max_to_keep=cfg.keep_checkpoints,
                                   async_save=cfg.async_checkpoint)
    st, origin = checkpoint.initial_state(own=ckpts, resume=cfg.resume, init_params=cfg.init_params,
                                          abstract_state=checkpoint.abstract_with_shardings(setup.abstract, shardings),
                                          data_iterator=train.iterator, init_fn=setup.init)
    start = int(st["step"])
    log.info("pretrain: %s, %d params, %d steps, start at step %d (%s)", mcfg.variant, vit.count_params(st["params"]),
             total, start, origin)

    # --- Steps.
    loss = train_state.loss_fn(cfg.loss, cfg.label_smoothing)
    train_step = train_state.make_train_step(model, tx, schedule, loss, shardings, batch_sharding, cfg.nan_at_step)
    eval_step = train_state.make_eval_step(model, loss, shardings["params"], batch_sharding)
    flops_per_step = flops.model_flops_per_example(mcfg) * cfg.batch_size
    peak, peak_source = (cfg.peak_flops, "config") if cfg.peak_flops else flops.peak_flops_per_device(mesh.devices.flat)
    n_devices = mesh.devices.size

    # --- Loop.
    is_main = jax.process_index() == 0
    metrics_log = MetricsLog(out, total_steps=total, start_step=start, enabled=is_main,
                             progress=None if cfg.progress == "auto" else cfg.progress == "on")
    summary: dict[str, Any] = {"steps": total, "start_step": start, "peak_flops_per_device": peak,
                               "peak_source": peak_source, "flops_per_step": flops_per_step}
    mfus = []
    step = start
    timer = None  # (time, step) after the first, compiling, step of this process

    def check_finite():
        bad = int(st["bad_step"])
        if bad >= 0:
            ckpts.wait()
            raise NonFiniteError(f"pretrain: loss or gradient is not finite at step {bad}; stopped; last good "
                                 f"checkpoint: step {ckpts.latest_step()} in {ckpts.directory}")

    try:
        with PreemptionGuard() as guard:
            while step < total:
                st, metrics = train_step(st, next(train))
                step += 1
                metrics_log.advance()
                if timer is None:
                    jax.block_until_ready(metrics)
                    timer = (time.perf_counter(), step)
                if cadence.itstime(step, cfg.log_every, total):
                    check_finite()
                    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    now = time.perf_counter()
                    if step > timer[1]:
                        step_time = (now - timer[0]) / (step - timer[1])
                        values.update(step_time=step_time, examples_per_sec=cfg.batch_size / step_time,
                                      mfu=flops.mfu(flops_per_step, step_time, n_devices, peak))
                        mfus.append(values["mfu"])
                        timer = (now, step)
                    metrics_log.write(step, values)
                    summary["train_loss"] = values["loss"]
                if cadence.itstime(step, cfg.eval_every, total):
                    check_finite()
                    result = train_state.evaluate(eval_step, st["params"], val)
                    metrics_log.write(step, {"val_top1": result["top1"], "val_loss": result["loss"]})
                    summary.update(val_top1=result["top1"], val_loss=result["loss"])
                    timer = None  # eval time is not step time
                if cadence.itstime(step, cfg.checkpoint_every, total) or guard.requested:
                    check_finite()
                    ckpts.save(step, st, train.iterator)
                if guard.requested:
                    # Not left to close(): here the guard still holds SIGTERM/SIGINT, so a second
                    # signal cannot cut the save short.
                    ckpts.wait()
                    raise Preempted(f"pretrain: signal {guard.requested} at step {step}; checkpoint saved in "
                                    f"{ckpts.directory}; rerun to resume")
        check_finite()
    finally:
        metrics_log.close()
        ckpts.close()

    # --- Export: the final params + model.json, for downstream stages.
    checkpoint.save_params(out / "params", st["params"])
    if is_main:
        checkpoint.write_model_json(out / "model.json", mcfg.to_json())
    if "val_top1" not in summary:
        result = train_state.evaluate(eval_step, st["params"], val)
        summary.update(val_top1=result["top1"], val_loss=result["loss"])
    if mfus:
        summary["mfu_mean"] = sum(mfus) / len(mfus)
    return {"artifacts": {"params": "params", "model": "model.json", "checkpoints": "checkpoints"},
            "metrics": {k: v for k, v in summary.items() if isinstance(v, (int, float))},
            "model": mcfg.to_json()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Run the pretrain stage outside the DAG.")
    parser.add_argument("--data_dir", required=True, help="a prepare stage output dir")
    parser.add_argument("--out", required=True, help="output dir (re-running resumes from its checkpoints)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set steps=100 --set model.variant=B/16 (repeatable)")
    args = parser.parse_args(argv)
    cfg = default_config()
    cfg.data.prepared_dir = args.data_dir
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        apply_override(cfg, key, value)
    if cfg.steps is None and cfg.epochs is None and cfg.examples is None:
        cfg.steps = 100
    Path(args.out).mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO)
    result = run(cfg, {}, Path(args.out))
    print(result["metrics"])


def apply_override(cfg, key: str, value: str) -> None:
    """`model.depth=4` style override: existing keys only, value parsed as a Python literal if possible."""
    import ast
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
        if p not in node:
            raise SystemExit(f"unknown config key {key!r}")
        node = node[p]
    if leaf not in node:
        raise SystemExit(f"unknown config key {key!r}")
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    node[leaf] = parsed


if __name__ == "__main__":
    main()
