"""The train state created already sharded, and the jitted train / eval steps of any Task.

State = {"params", "opt_state", "step", "rng", "bad_step"}: a plain dict pytree that Orbax saves as
is. `bad_step` records the first step whose loss or gradient was not finite (-1 while healthy); such
an update is not applied, so the state never holds NaNs and the host can stop with the exact step.
A Task's frozen parameters are a separate jit argument (never donated, never in the state).

Imports only JAX/flax/optax (the benchmarks run this step on machines without Grain).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from trainer import optim, sharding
from trainer.task import Task


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
    """What the loop needs before restoring or initializing a state."""
    tx: optax.GradientTransformation
    schedule: Callable
    abstract: Any  # the state's shapes and dtypes
    shardings: Any  # NamedShardings of the state
    frozen_shardings: Any  # NamedShardings of the Task's frozen params ({} when it has none)
    init: Callable[[], Any]  # jitted: creates the state already sharded


def setup(task: Task, optim_cfg, total_steps: int, mesh, seed: int) -> Setup:
    """Shapes -> optimizer -> state shardings -> sharded initializer (big_vision's "shard" section)."""
    boxed = task.abstract_params()
    tx, schedule = optim.make_optimizer(optim_cfg, boxed, total_steps)
    abstract = abstract_state(boxed, tx)
    shardings = state_shardings(boxed, abstract, mesh)
    frozen_sh = sharding.param_shardings(task.frozen.abstract, mesh) if task.frozen else {}
    return Setup(tx, schedule, abstract, shardings, frozen_sh, make_init(task, tx, seed, shardings))


def under_mesh(fn: Callable, mesh) -> Callable:
    """Calls (and so traces) `fn` with the mesh and logical-axis rules active; `.lower(*args)`
    lowers a jitted `fn` the same way (AOT compiles: launch/preflight.py)."""
    def call(*args):
        with sharding.activate(mesh):
            return fn(*args)

    def lower(*args):
        with sharding.activate(mesh):
            return fn.lower(*args)
    call.lower = lower
    return call


def make_init(task: Task, tx: optax.GradientTransformation, seed: int, shardings):
    """A jitted initializer whose outputs are born sharded (no full copy on any one device)."""
    def init():
        rng = jax.random.PRNGKey(seed)
        init_rng, train_rng = jax.random.split(rng)
        params = nn.unbox(task.init(init_rng))
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
                "rng": train_rng, "bad_step": jnp.full((), -1, jnp.int32)}
    return under_mesh(jax.jit(init, out_shardings=shardings), shardings["step"].mesh)


def make_train_step(task: Task, tx: optax.GradientTransformation, schedule: Callable, shardings,
                    batch_sharding, frozen_shardings=None):
    """`(state, frozen, batch) -> (state, metrics)`: one optimizer step on `task.loss`, state donated.

    metrics: loss, grad/param norm, lr and the Task's aux metrics, replicated scalars.
    """
    def step_fn(state, frozen, batch):
        step = state["step"] + 1
        rng = jax.random.fold_in(state["rng"], step)
        (value, aux), grads = jax.value_and_grad(
            lambda p: task.loss(p, frozen, batch, rng), has_aux=True)(state["params"])
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
            **aux,
        }
        return new_state, metrics

    mesh = batch_sharding.mesh
    frozen_shardings = {} if frozen_shardings is None else frozen_shardings
    return under_mesh(jax.jit(step_fn, in_shardings=(shardings, frozen_shardings, batch_sharding),
                              out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=(0,)), mesh)


def make_eval_step(fn: Callable, param_shardings, frozen_shardings, batch_sharding):
    """Jits an evaluator's per-batch `fn(params, frozen, batch) -> sums` with the state's shardings;
    the sums come back replicated (evaluators add them up over the split)."""
    mesh = batch_sharding.mesh
    return under_mesh(jax.jit(fn, in_shardings=(param_shardings, frozen_shardings, batch_sharding),
                              out_shardings=NamedSharding(mesh, P())), mesh)
