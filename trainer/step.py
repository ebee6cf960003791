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
    """Shapes -> optimizer -> state shardings -> sharded initializer (big_vision's "shard"
    section)."""
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
        return {
            "params": params,
            "opt_state": tx.init(params),
            "step": jnp.zeros((), jnp.int32),
            "rng": train_rng,
            "bad_step": jnp.full((), -1, jnp.int32),
        }

    return under_mesh(jax.jit(init, out_shardings=shardings), shardings["step"].mesh)


def _split_microbatches(batch, microbatches: int):
    """[B, ...] -> [microbatches, B / microbatches, ...]; microbatch i = rows i, i + m, i + 2m, ...
    so that every data shard keeps its own rows (a reshape of the sharded dim, no communication)."""

    def split(x):
        x = x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:])
        return jnp.moveaxis(x, 1, 0)

    return jax.tree_util.tree_map(split, batch)


def value_and_grad(
    task: Task, params, frozen, batch, rng, microbatches: int = 1, batch_sharding=None
):
    """((loss, aux), grads) of the Task's batch-mean loss; with `microbatches` > 1 the batch is
    split and the per-microbatch losses, aux metrics and gradients are averaged in a scan
    (gradient accumulation: activations of one microbatch live at a time; equal to the full batch up
    to float summation order when the loss is a mean over examples, as every Task's is)."""
    grad_fn = jax.value_and_grad(lambda p, b, r: task.loss(p, frozen, b, r), has_aux=True)
    if microbatches == 1:
        return grad_fn(params, batch, rng)
    size = jax.tree_util.tree_leaves(batch)[0].shape[0]
    sharding.check_batch(size, batch_sharding, "batch", microbatches=microbatches)
    parts = _split_microbatches(batch, microbatches)

    def one(carry, xs):
        i, part = xs
        if batch_sharding is not None:  # each microbatch spread over the data shards like a batch
            part = jax.tree_util.tree_map(
                lambda x: jax.lax.with_sharding_constraint(x, batch_sharding), part
            )
        (value, aux), grads = grad_fn(params, part, jax.random.fold_in(rng, i))
        return jax.tree_util.tree_map(jnp.add, carry, ((value, aux), grads)), None

    shapes = jax.eval_shape(grad_fn, params, jax.tree_util.tree_map(lambda x: x[0], parts), rng)
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    total, _ = jax.lax.scan(one, zeros, (jnp.arange(microbatches), parts))
    return jax.tree_util.tree_map(lambda t: t / microbatches, total)


def make_train_step(
    task: Task,
    tx: optax.GradientTransformation,
    schedule: Callable,
    shardings,
    batch_sharding,
    frozen_shardings=None,
    microbatches: int = 1,
):
    """`(state, frozen, batch) -> (state, metrics)`: one optimizer step on `task.loss`, state
    donated.

    metrics: loss, grad/param norm, lr and the Task's aux metrics, replicated scalars.
    microbatches: gradient accumulation over that many equal slices of the batch (`value_and_grad`).
    """

    def step_fn(state, frozen, batch):
        step = state["step"] + 1
        rng = jax.random.fold_in(state["rng"], step)
        (value, aux), grads = value_and_grad(
            task, state["params"], frozen, batch, rng, microbatches, batch_sharding
        )
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        keep = lambda new, old: jax.tree_util.tree_map(
            lambda n, o: jnp.where(finite, n, o), new, old
        )
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
    return under_mesh(
        jax.jit(
            step_fn,
            in_shardings=(shardings, frozen_shardings, batch_sharding),
            out_shardings=(shardings, NamedSharding(mesh, P())),
            donate_argnums=(0,),
        ),
        mesh,
    )


def make_eval_step(fn: Callable, param_shardings, frozen_shardings, batch_sharding):
    """Jits an evaluator's per-batch `fn(params, frozen, batch) -> sums` with the state's shardings;
    the sums come back replicated (evaluators add them up over the split)."""
    mesh = batch_sharding.mesh
    return under_mesh(
        jax.jit(
            fn,
            in_shardings=(param_shardings, frozen_shardings, batch_sharding),
            out_shardings=NamedSharding(mesh, P()),
        ),
        mesh,
    )
