"""THE training loop: every training stage (pretrain, fine-tune, distill, LiT) is a Task run here.

    return loop.run(cfg, inputs, out, build_task, stage="pretrain")

`cfg` is the stage's config group (trainer/stage_config.py's shared keys + the stage's own);
`build_task(env)` turns the running environment (mesh, training data, where prepared splits are)
into a trainer/task.py Task. Sections follow big_vision's train.py: config -> mesh -> data ->
task -> shapes -> shard -> frozen params -> evaluators -> restore -> steps -> loop (log / eval /
checkpoint) -> export.

- Metrics every `runtime.log_every` steps to TensorBoard (`tb/`), `metrics.jsonl` and a tqdm bar:
  loss, lr, grad/param norm, the Task's aux metrics, examples/s, step time and MFU.
- Evaluators (trainer/evaluators) on their own cadence, logged as `<eval name>/<metric>`; each also
  runs at the last step, so every one has a final value in `outputs.json`.
- Orbax checkpoints of the state + the Grain iterator every `checkpoint_every` steps and on
  SIGTERM/SIGINT; resume order: own checkpoint > `resume` > `init_params` / the Task's `start` >
  scratch. A SIGKILLed run rerun finishes bit-identical to an uninterrupted one.
- NaN guard: a non-finite loss or gradient is never applied (trainer/step.py); the loop stops
  naming the step and no checkpoint of a later step is written.
- Export: `params/` + `model.json` (the Task's model_spec) for downstream stages.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax

from data import paths
from trainer import cadence, checkpoint, distributed, evaluators, flops, sharding, stage_config
from trainer import step as step_lib
from trainer import transfer
from trainer.interop import weights_import
from trainer.metrics_log import MetricsLog
from trainer.preemption import Preempted, PreemptionGuard
from trainer.task import Task

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """The loss or a gradient became NaN/Inf; the last good checkpoint is kept."""


@dataclasses.dataclass(frozen=True)
class Env:
    """What a stage's `build_task` sees."""

    cfg: Any
    inputs: dict
    mesh: Any
    train: Any  # data.loader.TrainLoader of the training split
    num_classes: int
    split_dir: Callable[[str, str], Path]  # (dataset, split) -> a prepared split dir
    loader_kwargs: dict = dataclasses.field(default_factory=dict)


def split_dir(cfg, inputs: dict, dataset: str, split: str, *, stage: str) -> Path:
    """Where the prepare stage put `<dataset>/<split>`; a one-line error when it is not there."""
    if "prepare" in inputs:
        root = paths.as_path(inputs["prepare"].path)  # a local dir or a bucket URI (data/paths.py)
    elif cfg.data.prepared_dir:
        root = paths.as_path(cfg.data.prepared_dir, f"{stage}.data.prepared_dir")
    else:
        raise ValueError(
            f"{stage}: no prepared data (run the prepare stage or set data.prepared_dir)"
        )
    path = root / dataset / split
    if not (path / "manifest.json").exists():
        raise FileNotFoundError(
            f"{stage}: dataset {dataset!r} split {split!r} not found: "
            f"{path / 'manifest.json'} does not exist"
        )
    return path


def check_mesh(cfg, mesh, stage: str) -> None:
    """Run-time checks that need the devices: batch vs the microbatches x the data-parallel size
    and the processes (`sharding.check_batch`, as at plan time where the mesh config is known)."""
    for field in ("batch_size", "eval_batch_size"):
        microbatches = cfg.get("microbatches", 1) if field == "batch_size" else 1
        sharding.check_batch(
            cfg[field],
            mesh,
            f"{stage}.{field}",
            microbatches=microbatches,
            processes=jax.process_count(),
        )


def run(
    cfg,
    inputs: dict,
    out: Path,
    build_task: Callable[[Env], Task],
    *,
    stage: str,
    loader_kwargs: dict | None = None,
) -> dict:
    """Trains `build_task(env)`; `loader_kwargs` go to every data loader of the stage, its
    evaluators' included (e.g. LiT's `tokenizer`, which makes batches carry caption tokens)."""
    from data import (
        loader,
    )  # here, so that trainer/models + flops + step stay importable without Grain

    out = Path(out)
    rt = cfg.runtime
    # --- Config and mesh: everything is checked before anything compiles.
    distributed.initialize(rt.distributed)
    mesh = sharding.make_mesh(**cfg.mesh)
    check_mesh(cfg, mesh, stage)
    locate = lambda dataset, split: split_dir(cfg, inputs, dataset, split, stage=stage)
    train_dir = locate(cfg.data.dataset, cfg.data.train_split)
    for ev in cfg.evals.values():  # missing eval splits fail now, not after hours of training
        for key in stage_config.SPLIT_KEYS:
            if key in ev:
                locate(ev.get("dataset") or cfg.data.dataset, ev[key])

    # --- Data.
    train = loader.train_loader(
        train_dir,
        global_batch_size=cfg.batch_size,
        image_size=cfg.data.image_size,
        seed=cfg.seed,
        sharding=sharding.batch_sharding(mesh),
        augment=cfg.data.augment.to_dict(),
        worker_count=rt.worker_count,
        read_threads=rt.read_threads,
        **(loader_kwargs or {}),
    )
    try:
        env = Env(cfg, inputs, mesh, train, train.num_classes, locate, dict(loader_kwargs or {}))
        return _train(cfg, out, build_task(env), env, stage)
    finally:
        train.close()  # Grain worker processes (worker_count > 0) must not outlive the stage


def _train(cfg, out: Path, task: Task, env: Env, stage: str) -> dict:
    rt, mesh, train = cfg.runtime, env.mesh, env.train
    total = cadence.total_steps(
        steps=cfg.steps,
        epochs=cfg.epochs,
        examples=cfg.examples,
        num_examples=train.num_examples,
        batch_size=cfg.batch_size,
    )

    # --- Shapes and shardings, then the state created already sharded.
    setup = step_lib.setup(task, cfg.optim, total, mesh, cfg.seed)
    frozen = {}
    if task.frozen is not None:  # loaded on every start: never in a checkpoint
        frozen = task.frozen.load(
            checkpoint.abstract_with_shardings(
                nn.unbox(task.frozen.abstract), setup.frozen_shardings
            )
        )

    # --- Evaluators.
    ctx = evaluators.Context(
        mesh=mesh,
        split_dir=env.split_dir,
        dataset=cfg.data.dataset,
        image_size=cfg.data.image_size,
        batch_size=cfg.eval_batch_size,
        param_shardings=setup.shardings["params"],
        frozen_shardings=setup.frozen_shardings,
        read_threads=rt.read_threads,
        worker_count=rt.worker_count,
        class_names=tuple(train.manifest.class_names),
        loader_kwargs=env.loader_kwargs,
    )
    evals = evaluators.build(cfg.evals, task.predict, ctx, where=f"{stage}.evals")

    # --- Restore: own checkpoint > resume > init_params / the task's start > scratch.
    ckpts = checkpoint.Checkpoints(
        out / "checkpoints", max_to_keep=rt.keep_checkpoints, async_save=rt.async_checkpoint
    )
    abstract = checkpoint.abstract_with_shardings(setup.abstract, setup.shardings)
    init_fn, init_params, foreign = setup.init, cfg.init_params, ""
    if task.start is not None:
        init_fn = lambda: dict(setup.init(), params=task.start(abstract["params"]))
    if init_params and weights_import.is_foreign(init_params):
        # A timm .safetensors / big_vision .npz: mapped into this model's layout and adapted like an
        # upstream export (new head, resized position embedding); own checkpoint and resume still
        # win.
        foreign, init_params = init_params, ""
        init_fn = lambda: dict(
            setup.init(),
            params=transfer.load_into(
                foreign, task.model_spec, abstract["params"], mesh, f"{stage}.init_params"
            )[0],
        )
    st, origin = checkpoint.initial_state(
        own=ckpts,
        resume=cfg.resume,
        init_params=init_params,
        abstract_state=abstract,
        data_iterator=train.iterator,
        init_fn=init_fn,
    )
    if foreign and origin == "scratch":
        origin = f"params imported from {foreign}"
    start = int(st["step"])
    log.info(
        "%s: %d params, %d steps, start at step %d (%s)",
        stage,
        sum(x.size for x in jax.tree_util.tree_leaves(st["params"])),
        total,
        start,
        origin,
    )

    # --- Steps.
    train_step = step_lib.make_train_step(
        task,
        setup.tx,
        setup.schedule,
        setup.shardings,
        train.sharding,
        setup.frozen_shardings,
        microbatches=cfg.get("microbatches", 1),
    )
    flops_per_step = task.flops_per_example * cfg.batch_size
    peak, peak_source = (
        (rt.peak_flops, "config")
        if rt.peak_flops
        else flops.peak_flops_per_device(mesh.devices.flat)
    )

    # --- Loop.
    is_main = jax.process_index() == 0
    metrics_log = MetricsLog(
        out,
        total_steps=total,
        start_step=start,
        enabled=is_main,
        progress=None if rt.progress == "auto" else rt.progress == "on",
    )
    summary: dict[str, Any] = {
        "steps": total,
        "start_step": start,
        "peak_flops_per_device": peak,
        "peak_source": peak_source,
        "flops_per_step": flops_per_step,
    }
    mfus = []
    step = start
    timer = None  # (time, step) after the first, compiling, step of this process

    def check_finite():
        bad = int(st["bad_step"])
        if bad >= 0:
            ckpts.wait()
            raise NonFiniteError(
                f"{stage}: loss or gradient is not finite at step {bad}; stopped; last good "
                f"checkpoint: step {ckpts.latest_step()} in {ckpts.directory}"
            )

    evaluated = set()

    def run_evals(names):
        for name in names:
            evaluated.add(name)
            values = {f"{name}/{k}": v for k, v in evals[name][1].run(st["params"], frozen)}
            metrics_log.write(step, values)
            summary.update(values)

    try:
        with PreemptionGuard() as guard:
            while step < total:
                st, metrics = train_step(st, frozen, next(train))
                step += 1
                metrics_log.advance()
                if timer is None:
                    jax.block_until_ready(metrics)
                    timer = (time.perf_counter(), step)
                if cadence.itstime(step, rt.log_every, total):
                    check_finite()
                    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    now = time.perf_counter()
                    if step > timer[1]:
                        step_time = (now - timer[0]) / (step - timer[1])
                        values.update(
                            step_time=step_time,
                            examples_per_sec=cfg.batch_size / step_time,
                            mfu=flops.mfu(flops_per_step, step_time, mesh.devices.size, peak),
                        )
                        mfus.append(values["mfu"])
                        timer = (now, step)
                    metrics_log.write(step, values)
                    summary["train_loss"] = values["loss"]
                due = [
                    name
                    for name, (every, _) in evals.items()
                    if cadence.itstime(step, every, total)
                ]
                if due:
                    check_finite()
                    run_evals(due)
                    timer = None  # eval time is not step time
                if cadence.itstime(step, cfg.checkpoint_every, total) or guard.requested:
                    check_finite()
                    ckpts.save(step, st, train.iterator)
                if guard.requested:
                    # Not left to close(): here the guard still holds SIGTERM/SIGINT, so a second
                    # signal cannot cut the save short.
                    ckpts.wait()
                    raise Preempted(
                        f"{stage}: signal {guard.requested} at step {step}; checkpoint saved in "
                        f"{ckpts.directory}; rerun to resume"
                    )
        check_finite()
        # A run resumed from its final checkpoint did no step: its evals still get a value.
        run_evals([name for name in evals if name not in evaluated])
    finally:
        metrics_log.close()
        ckpts.close()

    # --- Export: the final params + model.json, for downstream stages.
    checkpoint.save_params(out / "params", st["params"])
    artifacts = {"params": "params", "checkpoints": "checkpoints"}
    if task.model_spec is not None:
        if is_main:
            checkpoint.write_model_json(out / "model.json", task.model_spec)
        artifacts["model"] = "model.json"
    if mfus:
        summary["mfu_mean"] = sum(mfus) / len(mfus)
    result = {
        "artifacts": artifacts,
        "metrics": {k: v for k, v in summary.items() if isinstance(v, (int, float))},
    }
    if task.model_spec is not None:
        result["model"] = task.model_spec
    return result
