"""The `distill` stage: a student trained to match a frozen teacher, as a Task on the loop.

    python -m launch.run --config launch/configs/tiny.py --stages distill/mu4      # one instance
    python -m launch.stage --stage distill/mu4 --config launch/configs/tiny.py --workdir DIR

big_vision's trainers/proj/distill ("Knowledge distillation: A good teacher is patient and
consistent", Beyer et al. 2022), on trainer/loop.py: everything but the Task below (mesh, data,
checkpoints, metrics, evaluators, export) is the loop's.

Objective, per example, averaged over the batch:

    t² · KL(softmax(teacher / t) ‖ softmax(student / t))
        [+ label_weight · label_loss(student, labels)]

with `t = temperature` (big_vision's distill configs: 1) and the label term off by default.

The teacher is the export of any params-exporting stage named by `teacher` ("pretrain",
"finetune/<run>", even another "distill/<run>"); launch/dag.py makes that stage this one's
upstream. Its `model.json` rebuilds the model, its `params/` are the Task's `Frozen` params:
read straight into the shardings the rules table gives `vit.abstract_params(teacher config)`,
a jit argument of the same step as the student (forward only, under `stop_gradient`, no dropout),
never in the optimizer state, never checkpointed, re-read on every (re)start. `teacher` may
instead be a checkpoint file from elsewhere (a timm `.safetensors`, a big_vision `.npz`), read as
the architecture `teacher_model` names (trainer/interop/weights_import.py); no DAG
edge then.

Consistent teaching. The loader makes ONE augmentation draw per example (one crop, one flip,
data/augment.py) at `data.image_size` and ONE mixup draw per batch (a ~ Beta(p, p),
a = max(a, 1 − a), the same a for images and labels); that single batch is what both models receive
inside the jitted step, so the teacher scores exactly the pixels the student learns from (no
precomputed teacher logits: they would freeze one augmentation). Resolution: each model gets the
batch resized to its own `image_size` inside the step (`jax.image.resize`, bilinear, antialiased
when shrinking); a model at `data.image_size` gets the batch as is. So a teacher at another
resolution than the student sees the same crop at its own size. Set `data.image_size` to the
larger of the two (e.g. a 384 px teacher and a 224 px student: load 384 px crops and set the
student's `model.image_size=224`), so resizing only ever shrinks. Resizing is linear, so it
commutes with mixup: the resized mixed image is the mix of the resized images, with the same a.
Evaluators resize the same way (the eval central crop at `data.image_size`, then each model's
size).

MFU counts the model FLOPs actually run per example: the student's training step (forward +
backward) plus the teacher's forward.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from trainer import config_checks as checks
from trainer import flops, losses, stage_config
from trainer.evaluators.distillation import agreement
from trainer.models import vit
from trainer.task import Frozen, Task, vit_init


def default_config() -> ml_collections.ConfigDict:
    c = stage_config.training_group()
    c.teacher = (
        "pretrain"  # the stage whose params/ + model.json teach: pretrain | finetune/<run> | ...,
    )
    # or a timm .safetensors / big_vision .npz file, whose architecture `teacher_model` then names
    c.teacher_model = stage_config.model_group(
        variant=""
    )  # only for a teacher file (e.g. variant "L/16")
    c.temperature = 1.0  # t in t²·KL(softmax(teacher/t) ‖ softmax(student/t))
    c.label_loss = "softmax_xent"  # trainer/losses.py LOSSES, for the optional label term
    c.label_weight = 0.0  # weight of the label term; 0 = pure distillation (big_vision)
    c.data.augment.mixup_alpha = 1.0  # big_vision's distill configs: mixup p = 1
    c.evals.val = ml_collections.ConfigDict(
        dict(type="classification", split="val", every=100, loss="softmax_xent")
    )
    c.evals.agree = ml_collections.ConfigDict(dict(type="distillation", split="val", every=100))
    return c


def group() -> ml_collections.ConfigDict:
    """The stage type's group:
    `config.distill = group(); config.distill.runs.b16 = default_config()`."""
    return ml_collections.ConfigDict({"runs": ml_collections.ConfigDict()})


def _classes(cfg) -> tuple[int | None, str]:
    """(class count if the config fixes it, else None; how to say where the classes come from)."""
    n = cfg.model.get("num_classes")
    if n is not None:
        return n, f"{n} classes"
    return None, f"the classes of dataset {cfg.data.dataset!r}"


def validate(cfg, upstream: Mapping | None = None, where: str = "distill") -> None:
    """Plan-time checks (launch/dag.py): shared training keys, distillation keys and, given the
    upstream groups, that the teacher is a training stage of this plan with the student's
    classes."""
    stage_config.check(cfg, where, upstream)
    if not isinstance(cfg.teacher, str) or not cfg.teacher or cfg.teacher == "prepare":
        raise checks.fail(
            f"{where}.teacher",
            f"{cfg.teacher!r} must name a params-exporting "
            "stage, e.g. 'pretrain' or 'finetune/<run>'",
        )
    checks.number(f"{where}.temperature", cfg.temperature, gt=0)
    checks.number(f"{where}.label_weight", cfg.label_weight, ge=0)
    try:
        losses.get(cfg.label_loss)
    except ValueError as e:
        raise checks.fail(f"{where}.label_loss", str(e)) from None
    if _teacher_file(cfg):
        from trainer.interop import weights_import

        weights_import.check_file(cfg.teacher, f"{where}.teacher")
        weights_import.architecture(cfg.teacher_model, f"{where}.teacher_model")
        return  # its classes are known when the file is read (distill_task checks them)
    if upstream is None:
        return
    key = f"{where}.teacher"
    if cfg.teacher not in upstream:
        raise checks.fail(
            key,
            f"stage {cfg.teacher!r} is not in this pipeline (upstream stages: "
            f"{', '.join(sorted(upstream)) or 'none'})",
        )
    teacher = upstream[cfg.teacher]
    if "model" not in teacher or "data" not in teacher:
        raise checks.fail(
            key, f"stage {cfg.teacher!r} is not a training stage (no model to teach with)"
        )
    t_num, t_what = _classes(teacher)
    s_num, s_what = _classes(cfg)
    if t_num == 0:
        raise checks.fail(
            key, f"{cfg.teacher!r} has model.num_classes=0 (no head): no logits to distill"
        )
    if (t_num is not None and s_num is not None and t_num != s_num) or (
        t_num is None and s_num is None and teacher.data.dataset != cfg.data.dataset
    ):
        raise checks.fail(
            key,
            f"{cfg.teacher!r} predicts {t_what} but the student {s_what}; the "
            f"student's head must match the teacher's (set "
            f"{where}.model.num_classes)",
        )


def _teacher_file(cfg) -> bool:
    from trainer.interop import weights_import  # NumPy-only

    return weights_import.is_foreign(cfg.teacher)


def _at(images: jax.Array, size: int) -> jax.Array:
    """The batch at a model's resolution: as is, or resized (bilinear, antialiased when
    shrinking)."""
    b, h, w, c = images.shape
    if (h, w) == (size, size):
        return images
    return jax.image.resize(images, (b, size, size, c), method="linear", antialias=True)


def make_task(cfg, num_classes: int, teacher, where: str = "distill") -> Task:
    """The stage's Task: the student of `cfg.model` taught by `teacher`: the teacher stage's export
    dir, or the checkpoint file `cfg.teacher` names (read as the architecture `teacher_model`
    names)."""
    from trainer import (
        checkpoint,
    )  # Orbax + Grain: not needed by distill_task (benchmarks on bare hosts)
    from trainer.interop import weights_import

    arch = cfg.teacher_model
    arch = weights_import.architecture(arch, f"{where}.teacher_model") if arch.variant else None
    opened = checkpoint.open_model(teacher, f"{where}.teacher", arch=arch)
    return distill_task(
        cfg, num_classes, opened.config, opened.load, where=where, source=opened.source
    )


def distill_task(
    cfg,
    num_classes: int,
    tcfg: vit.ViTConfig,
    load_teacher: Callable[[Any], Any],
    *,
    where: str = "distill",
    source: str = "the teacher",
) -> Task:
    """The distillation Task for a teacher model `tcfg` whose params `load_teacher(abstract with
    shardings)` returns (an export, or random ones in benchmarks/distill.py)."""
    scfg = stage_config.model_config(cfg, num_classes)
    if tcfg.num_classes != scfg.num_classes:
        raise ValueError(
            f"{where}.teacher: {source} predicts {tcfg.num_classes} classes, the student "
            f"{scfg.num_classes}; the student's head must match the teacher's"
        )
    student, teacher = vit.ViT(scfg), vit.ViT(tcfg)
    label_loss = losses.get(cfg.label_loss)
    temperature, label_weight = float(cfg.temperature), float(cfg.label_weight)

    def student_out(params, batch, **kwargs):
        return student.apply({"params": params}, _at(batch["image"], scfg.image_size), **kwargs)

    def teacher_logits(params, frozen, batch):
        del params
        logits, _ = teacher.apply(
            {"params": frozen}, _at(batch["image"], tcfg.image_size), train=False
        )
        return jax.lax.stop_gradient(logits)

    def objective(params, frozen, batch, rng):
        logits, _ = student_out(params, batch, train=True, rngs={"dropout": rng})
        target = teacher_logits(None, frozen, batch)
        distill = jnp.mean(losses.kl_divergence(logits, target, temperature))
        labelled = jnp.mean(label_loss(logits, batch["labels"]))
        aux = {
            "distill_loss": distill,
            "label_loss": labelled,
            "train_top1": jnp.mean(losses.top1_correct(logits, batch["labels"])),
            "train_agreement": jnp.mean(agreement(logits, target)),
        }
        return (distill + label_weight * labelled if label_weight else distill), aux

    def student_logits(params, frozen, batch):
        del frozen
        return student_out(params, batch, train=False)[0]

    def pre_logits(params, frozen, batch):
        del frozen
        return student_out(params, batch, train=False)[1]["pre_logits"]

    def student_teacher(params, frozen, batch):
        return student_logits(params, frozen, batch), teacher_logits(params, frozen, batch)

    return Task(
        name="distill",
        init=vit_init(student),
        loss=objective,
        predict={
            "logits": student_logits,
            "pre_logits": pre_logits,
            "teacher_logits": teacher_logits,
            "student_teacher": student_teacher,
        },
        frozen=Frozen(vit.abstract_params(tcfg), load_teacher),
        flops_per_example=flops.model_flops_per_example(scfg)
        + flops.model_flops_per_example(tcfg, train=False),
        model_spec=scfg.to_json(),
    )


def run(cfg, inputs: dict, out: Path) -> dict:
    from trainer import loop

    validate(cfg, None, "distill")
    if cfg.teacher not in inputs and not _teacher_file(cfg):
        raise ValueError(
            f"distill.teacher: stage {cfg.teacher!r} is not among this stage's inputs "
            f"({', '.join(sorted(inputs)) or 'none'})"
        )
    teacher = inputs[cfg.teacher].path if cfg.teacher in inputs else cfg.teacher
    return loop.run(
        cfg, inputs, out, lambda env: make_task(cfg, env.num_classes, teacher), stage="distill"
    )
