"""Train state created already sharded, and the jitted train / eval steps.

State = {"params", "opt_state", "step", "rng", "bad_step"}: a plain dict pytree that Orbax saves as
is. `bad_step` records the first step whose loss or gradient was not finite (-1 while healthy); such
an update is not applied, so the state never holds NaNs and the host can stop with the exact step.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from trainer import losses, optim, sharding
from trainer.models import vit

LOSSES = {"sigmoid_xent": losses.sigmoid_xent, "softmax_xent": losses.softmax_xent}


def loss_fn(name: str, label_smoothing: float = 0.0) -> Callable:
    if name not in LOSSES:
        raise ValueError(f"loss={name!r} is not one of {tuple(LOSSES)}")
    if name == "softmax_xent":
        return lambda logits, labels: losses.softmax_xent(logits, labels, label_smoothing=label_smoothing)
    return LOSSES[name]


def abstract_state(boxed, tx: optax.GradientTransformation):
    """The train state's shapes and dtypes."""
    params = nn.unbox(boxed)
    return {
        "params": params,
        "opt_state": jax.eval_shape(tx.init, params),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
        "bad_step": jax.ShapeDtypeStruct((), jnp.int32),
    }


def state_shardings(boxed, state, mesh):
    param_sh = sharding.param_shardings(boxed, mesh)
    replicated = NamedSharding(mesh, P())
    return {
        "params": param_sh,
        "opt_state": sharding.tree_shardings(state["opt_state"], state["params"], param_sh, mesh),
        "step": replicated,
        "rng": replicated,
        "bad_step": replicated,
    }


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every training entry needs before restoring or initializing a state."""
    tx: optax.GradientTransformation
    schedule: Callable
    abstract: Any  # the state's shapes and dtypes
    shardings: Any  # NamedShardings of the state
    init: Callable[[], Any]  # jitted: creates the state already sharded


def setup(model: vit.ViT, optim_cfg, total_steps: int, mesh, seed: int) -> Setup:
    """Shapes -> optimizer -> state shardings -> sharded initializer (big_vision's "shard" section)."""
    boxed = vit.abstract_params(model.config)
    tx, schedule = optim.make_optimizer(optim_cfg, boxed, total_steps)
    abstract = abstract_state(boxed, tx)
    shardings = state_shardings(boxed, abstract, mesh)
    return Setup(tx, schedule, abstract, shardings, make_init(model, tx, seed, shardings))


def under_mesh(fn: Callable, mesh) -> Callable:
    """Calls (and so traces) `fn` with the mesh and logical-axis rules active."""
    def call(*args):
        with sharding.activate(mesh):
            return fn(*args)
    return call


def make_init(model: vit.ViT, tx: optax.GradientTransformation, seed: int, shardings):
    """A jitted initializer whose outputs are born sharded (no full copy on any one device)."""
    size = model.config.image_size

    def init():
        rng = jax.random.PRNGKey(seed)
        init_rng, train_rng = jax.random.split(rng)
        params = nn.unbox(model.init(init_rng, jnp.zeros((1, size, size, 3), jnp.float32))["params"])
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
                "rng": train_rng, "bad_step": jnp.full((), -1, jnp.int32)}
    return under_mesh(jax.jit(init, out_shardings=shardings), shardings["step"].mesh)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule: Callable, loss: Callable,
                    shardings, batch_sharding, nan_at_step: int = 0):
    """One optimizer step. `nan_at_step` (1-based, 0 = off) poisons that step's loss: the guard's test hook."""
    def step_fn(state, batch):
        step = state["step"] + 1
        dropout_rng = jax.random.fold_in(state["rng"], step)

        def objective(params):
            logits, _ = model.apply({"params": params}, batch["image"], train=True, rngs={"dropout": dropout_rng})
            value = jnp.mean(loss(logits, batch["labels"]))
            if nan_at_step:
                value = value * jnp.where(step == nan_at_step, jnp.nan, 1.0)
            return value, logits

        (value, logits), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = {
            "params": keep(params, state["params"]),
            "opt_state": keep(opt_state, state["opt_state"]),
            "step": step,
            "rng": state["rng"],
            "bad_step": jnp.where((state["bad_step"] < 0) & ~finite, step, state["bad_step"]),
        }
        metrics = {
            "loss": value,
            "grad_norm": grad_norm,
            "param_norm": optax.tree.norm(new_state["params"]),
            "lr": schedule(state["step"]),
            "train_top1": jnp.mean(losses.top1_correct(logits, batch["labels"])),
        }
        return new_state, metrics

    replicated = NamedSharding(shardings["step"].mesh, P())
    return under_mesh(jax.jit(step_fn, in_shardings=(shardings, batch_sharding),
                              out_shardings=(shardings, replicated), donate_argnums=(0,)), batch_sharding.mesh)


def make_eval_step(model: nn.Module, loss: Callable, param_sh, batch_sharding):
    """Sums of loss, correct and count over the real (mask=True) examples of one batch."""
    def eval_fn(params, batch):
        logits, _ = model.apply({"params": params}, batch["image"], train=False)
        mask = batch["mask"]
        return {"loss": losses.masked_sum(loss(logits, batch["labels"]), mask),
                "correct": losses.masked_sum(losses.top1_correct(logits, batch["labels"]), mask),
                "count": jnp.sum(mask.astype(jnp.float32))}

    replicated = NamedSharding(batch_sharding.mesh, P())
    return under_mesh(jax.jit(eval_fn, in_shardings=(param_sh, batch_sharding), out_shardings=replicated),
                      batch_sharding.mesh)


def evaluate(eval_step, params, eval_loader) -> dict[str, float]:
    totals = None
    for batch in eval_loader:
        sums = eval_step(params, batch)
        totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    if totals is None:
        raise ValueError("evaluation split is empty")
    count = float(totals["count"])
    return {"top1": float(totals["correct"]) / count, "loss": float(totals["loss"]) / count, "examples": count}
