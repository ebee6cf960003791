"""What a training stage hands the loop (trainer/loop.py): a `Task` (docs/DESIGN.md §2.7).

A Task is the model(s) and the objective of one training stage, nothing about data, cadences or
checkpoints, which the loop owns:

- `init(rng) -> params`: the trained parameters from scratch, boxed with logical axis names (flax
  `nn.with_logical_partitioning`), so the one rules table in trainer/sharding.py shards them. The
  loop only ever traces it (`jax.eval_shape` for shapes, `jax.jit(..., out_shardings=...)` to
  create them already sharded).
- `loss(params, frozen, batch, rng) -> (loss, aux)`: a scalar to minimise and a dict of scalar
  metrics logged next to it (e.g. `train_top1`); `rng` is fresh every step (dropout, stochastic
  depth, ...).
- `frozen`: optional parameters the loss reads but never trains (a distillation teacher, LiT's
  locked image tower): a jit argument sharded by the same rules table, never in the optimizer
  state, never checkpointed (they are re-loaded from their export on every start).
- `predict`: named functions `(params, frozen, batch) -> outputs` that evaluators call
  (trainer/evaluators); e.g. `{"logits": ...}` for classification.
- `start`: how the trained parameters start when they are not from scratch: a transform of an
  upstream export (a new head, a resized position embedding) that receives the sharded abstract
  parameters and returns arrays of exactly those shapes. Own checkpoints and `resume` still win.
- `flops_per_example`: model FLOPs of one training example (PaLM's formula, trainer/flops.py)
  for MFU; `model_spec`: what `model.json` holds so downstream stages rebuild the trained model.

Imports only JAX/flax: benchmarks build Tasks on machines without Grain or ml_collections.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

Params = Any
Batch = Mapping[str, jax.Array]
LossFn = Callable[[Params, Params, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
PredictFn = Callable[[Params, Params, Batch], Any]


@dataclasses.dataclass(frozen=True)
class Frozen:
    """Parameters a Task reads but never trains.

    abstract: their boxed shapes (logical axis names), e.g. `vit.abstract_params(teacher_cfg)`.
    load: `(abstract_with_shardings) -> params`: reads them (e.g. `checkpoint.load_params`)
      straight into the shardings the rules table gives them.
    """

    abstract: Params
    load: Callable[[Params], Params]


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    init: Callable[[jax.Array], Params]
    loss: LossFn
    predict: Mapping[str, PredictFn] = dataclasses.field(default_factory=dict)
    frozen: Frozen | None = None
    start: Callable[[Params], Params] | None = None
    flops_per_example: float = 0.0
    model_spec: dict | None = None

    def abstract_params(self) -> Params:
        """The trained parameters' boxed shapes; nothing is allocated."""
        return jax.eval_shape(self.init, jax.random.PRNGKey(0))


def vit_init(model: nn.Module) -> Callable[[jax.Array], Params]:
    """`init` for an image model applied to one image of its config's size."""
    size = model.config.image_size

    def init(rng):
        return model.init(rng, jnp.zeros((1, size, size, 3), jnp.float32))["params"]

    return init


def classifier(
    name: str,
    model: nn.Module,
    loss: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    flops_per_example: float = 0.0,
    model_spec: dict | None = None,
    start: Callable[[Params], Params] | None = None,
) -> Task:
    """The supervised image-classification Task (pretrain, fine-tune, the benchmarks).

    loss: per-example `(logits, labels [B, C]) -> [B]` (trainer/losses.py); the Task's loss is
    its batch mean. aux: `train_top1`, and with the model's `attn_stats` on the encoder's
    attention stats of this step's batch (`attn_logit_max`, `attn_entropy_min`,
    `attn_entropy_mean`; trainer/models/layers.py). predict: `logits` (for the `classification`
    evaluator) and `pre_logits` (features for few-shot / probes).
    """
    from trainer import losses  # jax-only
    from trainer.models.layers import attention_summary

    stats = getattr(model.config, "attn_stats", False)

    def objective(params, frozen, batch, rng):
        del frozen
        kwargs = dict(train=True, rngs={"dropout": rng})
        if stats:  # only then is "intermediates" mutable, so the model sows anything at all
            (logits, _), sown = model.apply(
                {"params": params}, batch["image"], mutable=["intermediates"], **kwargs
            )
        else:
            logits, _ = model.apply({"params": params}, batch["image"], **kwargs)
        aux = {"train_top1": jnp.mean(losses.top1_correct(logits, batch["labels"]))}
        if stats:
            aux.update(attention_summary(sown))
        return jnp.mean(loss(logits, batch["labels"])), aux

    def logits(params, frozen, batch):
        del frozen
        return model.apply({"params": params}, batch["image"], train=False)[0]

    def pre_logits(params, frozen, batch):
        del frozen
        return model.apply({"params": params}, batch["image"], train=False)[1]["pre_logits"]

    return Task(
        name=name,
        init=vit_init(model),
        loss=objective,
        predict={"logits": logits, "pre_logits": pre_logits},
        flops_per_example=flops_per_example,
        model_spec=model_spec,
        start=start,
    )
