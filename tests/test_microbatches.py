"""Gradient accumulation (trainer/step.py `microbatches`): the same step as the full batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainer import losses, optim, sharding
from trainer import step as step_lib
from trainer.models import vit
from trainer.task import classifier

from batches import random_batch


def test_microbatched_step_equals_the_full_batch():
    mesh = sharding.make_mesh(data=4, model=2)
    batch, bsh = random_batch(mesh, 16)
    cfg = vit.make_config("mu/4", image_size=16, num_classes=5, head_zeroinit=False)
    task = classifier("pretrain", vit.ViT(cfg), losses.sigmoid_xent)
    setup = step_lib.setup(task, optim.default_config(), 10, mesh, seed=0)
    results = {}
    for m in (1, 4):
        step = step_lib.make_train_step(
            task, setup.tx, setup.schedule, setup.shardings, bsh, microbatches=m
        )
        results[m] = jax.device_get(step(setup.init(), {}, batch))
    (state, metrics), (ref_state, ref_metrics) = results[4], results[1]
    for key in ("loss", "grad_norm", "param_norm", "train_top1"):
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        state["params"],
        ref_state["params"],
    )
    # bf16 momentum (optim default): one rounding step apart at most.
    tol = lambda a: (
        dict(rtol=2**-7, atol=2**-9) if a.dtype == jnp.bfloat16 else dict(rtol=1e-4, atol=1e-6)
    )
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, **tol(a)),
        state["opt_state"],
        ref_state["opt_state"],
    )

    step = step_lib.make_train_step(
        task, setup.tx, setup.schedule, setup.shardings, bsh, microbatches=3
    )
    with pytest.raises(
        ValueError, match="^batch: 16 is not divisible by 3 microbatches x the data-parallel size 4"
    ):  # (jax appends a traceback note)
        step(setup.init(), {}, batch)


def test_microbatches_checked_at_plan_time():
    from launch.configs import tiny
    from trainer import stage_config

    group = tiny.get_config().pretrain
    with group.unlocked():
        group.mesh.data, group.batch_size, group.eval_batch_size, group.microbatches = 4, 64, 64, 32
    with pytest.raises(
        ValueError,
        match=r"^pretrain\.batch_size: 64 is not divisible by 32 "
        r"microbatches x the data-parallel size 4$",
    ):
        stage_config.check(group, "pretrain")


def test_microbatches_checked_at_run_time_when_the_mesh_is_sized_from_the_devices():
    from launch.configs import tiny
    from trainer import loop, stage_config

    group = tiny.get_config().pretrain
    with group.unlocked():
        group.mesh.data, group.mesh.model, group.batch_size, group.eval_batch_size = -1, 2, 64, 64
        group.microbatches = 32
    stage_config.check(group, "pretrain")  # data = -1: the data-parallel size is not known yet
    with pytest.raises(
        ValueError,
        match=r"^pretrain\.batch_size: 64 is not divisible by 32 "
        r"microbatches x the data-parallel size 4$",
    ):
        loop.check_mesh(group, sharding.make_mesh(**group.mesh), "pretrain")
