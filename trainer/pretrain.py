"""The `pretrain` stage: a ViT trained from scratch on prepared ArrayRecords, as a Task on the loop.

    python -m launch.run --config launch/configs/tiny.py --stages pretrain          # inside the DAG
    python -m launch.stage --stage pretrain --config launch/configs/tiny.py --workdir DIR  # one job

The paper's objective: sigmoid cross-entropy over (flattened, multi-hot) labels; softmax
cross-entropy with label smoothing as the alternative. Everything else (mesh, data, checkpoints,
metrics, evaluators, export) is trainer/loop.py's.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

from trainer import flops, loop, losses, stage_config
from trainer.models import vit
from trainer.task import Task, classifier


def default_config() -> ml_collections.ConfigDict:
    c = stage_config.training_group()
    c.loss = "sigmoid_xent"  # trainer/losses.py LOSSES
    c.label_smoothing = 0.0  # softmax_xent only
    c.evals.val = ml_collections.ConfigDict(dict(type="classification", split="val", every=100))
    c.evals.val.loss = c.get_ref(
        "loss"
    )  # val loss = the training loss unless a config says otherwise
    return c


def validate(cfg, upstream=None, where: str = "pretrain") -> None:
    """Plan-time checks (launch/dag.py): the shared training keys + the loss."""
    stage_config.check(cfg, where, upstream)
    stage_config.check_loss(cfg, where)


def make_task(cfg, num_classes: int) -> Task:
    mcfg = stage_config.model_config(cfg, num_classes)
    return classifier(
        "pretrain",
        vit.ViT(mcfg),
        losses.get(cfg.loss, cfg.label_smoothing),
        flops_per_example=flops.model_flops_per_example(mcfg),
        model_spec=mcfg.to_json(),
    )


def run(cfg, inputs: dict, out: Path) -> dict:
    validate(cfg)
    return loop.run(cfg, inputs, out, lambda env: make_task(cfg, env.num_classes), stage="pretrain")
