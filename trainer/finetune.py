"""The `finetune` stage: full fine-tuning of an exported ViT on a target dataset, at any resolution.

    python -m launch.run --config launch/configs/tiny.py --stages finetune/r48     # one run
    python -m launch.run --config launch/configs/tiny.py --stages finetune         # every run

A stage type with instances: `config.finetune.runs.<name>` holds one fine-tune each (dataset,
resolution, recipe, upstream), run as the DAG node `finetune/<name>` with its own cache entry.
`init_from` names the export to start from ("pretrain" or another `finetune/<name>`); the DAG
edge follows it. It may instead be a checkpoint file from elsewhere — a timm `.safetensors` (or
a dir holding `model.safetensors`), a big_vision `.npz` ViT, or a `trainer.interop.export`
`.npz` — with `model.variant` (+ any differing `model.*` field) naming its architecture; then the
run has no upstream training stage and the file's identity (size, mtime) is in the fingerprint.
The params start as trainer/transfer.py turns the export into the fine-tuned
model: a zero-initialised head for the target classes, the position embedding resized to the new
patch grid, everything else bit-identical. The architecture is the export's (`model.json`);
`model.*` may change what does not change parameter shapes (dropout, dtype, remat, matmul, ...).
Everything else — checkpoints/resume, metrics and MFU, the NaN guard, evaluators — is the loop's.

Recipe defaults are big_vision's ImageNet fine-tuning ones (`configs/transfer.py`-style: SGD with
momentum 0.9, lr 0.03, 500 warmup steps then cosine decay, global-norm clipping at 1.0, no weight
decay, batch 512, 20k steps), except label smoothing 0.1, which is our choice.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import ml_collections

from trainer import config_checks as checks
from trainer import checkpoint, flops, loop, losses, optim, stage_config, transfer
from trainer.interop import weights_import
from trainer.models import vit
from trainer.task import Task, classifier

# ViTConfig fields that shape the parameters: fine-tuning keeps the export's values.
ARCHITECTURE = (
    "width",
    "depth",
    "mlp_dim",
    "num_heads",
    "patch_size",
    "block",
    "fused",
    "qk_norm",
    "use_bias",
    "norm",
    "head",
    "posemb",
    "representation_size",
    "param_dtype",
)


def default_config() -> ml_collections.ConfigDict:
    """One fine-tune run's group (`config.finetune.runs.<name>`)."""
    c = stage_config.training_group(variant="")  # "" = the export's architecture
    # The params-exporting stage to start from ("pretrain", "finetune/<name>"),
    # or a timm .safetensors / big_vision .npz file (then model.variant names its architecture).
    c.init_from = "pretrain"
    # "new": zero-initialised head for the target classes | "keep": the export's (same classes)
    c.head = "new"
    c.posemb_resize = "bilinear"  # | "bicubic": the position embedding over the new patch grid
    c.loss = "softmax_xent"
    c.label_smoothing = 0.1  # our choice (big_vision's fine-tunes use none)
    c.batch_size = 512  # big_vision
    c.steps = 20_000  # big_vision (ImageNet-1k)
    c.optim.optimizer = "sgd"  # big_vision: momentum 0.9
    c.optim.lr = 0.03  # big_vision
    c.optim.schedule = "cosine"  # big_vision
    c.optim.warmup_steps = 500  # big_vision
    c.optim.grad_clip_norm = 1.0  # big_vision
    c.optim.wd = 0.0  # big_vision
    c.optim.wd_rules = [(optim.HEAD_KERNEL, 0.0)]  # the head is never decayed, whatever `wd` says
    c.evals.val = ml_collections.ConfigDict(dict(type="classification", split="val", every=1000))
    c.evals.val.loss = c.get_ref("loss")
    return c


def group() -> ml_collections.ConfigDict:
    """The stage type's group:
    `config.finetune = group(); config.finetune.runs.r384 = default_config()`."""
    return ml_collections.ConfigDict({"runs": ml_collections.ConfigDict()})


def model_config(cfg, source: vit.ViTConfig, num_classes: int) -> vit.ViTConfig:
    """The fine-tuned model: the export's architecture at the new image size and classes, plus the
    non-architecture `model.*` fields the run sets."""
    overrides = {k: v for k, v in cfg.model.items() if k != "variant" and v is not None}
    overrides.setdefault("image_size", cfg.data.image_size)
    overrides.setdefault("num_classes", num_classes)
    return dataclasses.replace(source, **overrides)


def _check_architecture(cfg, source: vit.ViTConfig, where: str) -> None:
    for field in ARCHITECTURE:
        value = cfg.model[field]
        if value is not None and value != getattr(source, field):
            why = (
                "the patch embedding is kept"
                if field == "patch_size"
                else "fine-tuning keeps the architecture"
            )
            raise checks.fail(
                f"{where}.model.{field}",
                f"{value!r} differs from the exported model's {getattr(source, field)!r} ({why})",
            )
    try:
        model_config(cfg, source, cfg.model.num_classes or 2)  # image vs patch size, field values
    except (ValueError, TypeError) as e:
        raise checks.fail(f"{where}.model", str(e)) from None


def validate(cfg, upstream=None, where: str = "finetune") -> None:
    """Plan-time checks: the shared training keys, the loss, head/resize options, and — when the
    upstream is a from-scratch training stage whose architecture the config fixes — the model."""
    stage_config.check(cfg, where, upstream)
    stage_config.check_loss(cfg, where)
    if weights_import.is_foreign(cfg.init_from):
        weights_import.check_file(cfg.init_from, f"{where}.init_from")
        weights_import.architecture(cfg.model, f"{where}.model")
    elif cfg.model.variant:
        raise checks.fail(
            f"{where}.model.variant",
            f"must be empty: fine-tuning keeps the architecture of init_from={cfg.init_from!r}",
        )
    checks.one_of(f"{where}.head", cfg.head, transfer.HEADS)
    checks.one_of(f"{where}.posemb_resize", cfg.posemb_resize, transfer.RESIZE_METHODS)
    source_group = (upstream or {}).get(cfg.init_from)
    if upstream and source_group is not None:
        if "model" not in source_group:
            raise checks.fail(
                f"{where}.init_from", f"stage {cfg.init_from!r} exports no model params"
            )
        if source_group.model.variant:  # e.g. pretrain: its architecture is known now
            _check_architecture(
                cfg,
                stage_config.model_config(source_group, source_group.model.num_classes or 2),
                where,
            )


def make_task(cfg, source_ref, env: loop.Env) -> Task:
    """`source_ref`: the upstream stage's export dir, or the checkpoint file `init_from` names (read
    as the architecture `model.variant` names)."""
    arch = weights_import.architecture(cfg.model, "finetune.model") if cfg.model.variant else None
    opened = checkpoint.open_model(source_ref, "finetune.init_from", arch=arch)
    source = opened.config
    _check_architecture(
        cfg, source, "finetune"
    )  # an upstream fine-tune's architecture is known only now
    target = model_config(cfg, source, env.num_classes)
    start = transfer.start_from(opened, target, env.mesh, head=cfg.head, resize=cfg.posemb_resize)
    if cfg.head == "keep" and source.num_classes != target.num_classes:
        raise ValueError(
            f"finetune.head='keep': the exported head has {source.num_classes} classes, the data "
            f"{target.num_classes}; use head='new'"
        )
    return classifier(
        "finetune",
        vit.ViT(target),
        losses.get(cfg.loss, cfg.label_smoothing),
        flops_per_example=flops.model_flops_per_example(target),
        model_spec=target.to_json(),
        start=start,
    )


def run(cfg, inputs: dict, out: Path) -> dict:
    validate(cfg, None, "finetune")
    if cfg.init_from not in inputs and not weights_import.is_foreign(cfg.init_from):
        raise ValueError(
            f"finetune.init_from={cfg.init_from!r}: no such upstream output "
            f"(inputs: {', '.join(inputs) or 'none'})"
        )
    source = inputs[cfg.init_from].path if cfg.init_from in inputs else cfg.init_from
    return loop.run(cfg, inputs, out, lambda env: make_task(cfg, source, env), stage="finetune")
