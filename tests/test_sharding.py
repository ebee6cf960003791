"""Mesh, the logical-axis rules table, state shardings and per-device memory on 8 simulated
devices."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from trainer import losses, memory, optim, sharding
from trainer import step as step_lib
from trainer.task import classifier
from trainer.models import vit


def _setup(mesh, optimizer="adafactor", **model_kw):
    cfg = vit.make_config("mu/4", image_size=16, num_classes=8, head_zeroinit=False, **model_kw)
    model = vit.ViT(cfg)
    ocfg = optim.default_config()
    ocfg.optimizer = optimizer
    ocfg.lr = 1e-2
    ocfg.wd_rules = [("head_kernel", 1e-3)]
    task = classifier("test", model, losses.sigmoid_xent)
    return task, step_lib.setup(task, ocfg, 10, mesh, seed=0)


def _batch(mesh, n=16):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 8, n)
    batch = {
        "image": rng.normal(size=(n, 16, 16, 3)).astype(np.float32),
        "labels": np.eye(8, dtype=np.float32)[labels],
        "label": labels.astype(np.int32),
        "mask": np.ones(n, bool),
    }
    return jax.device_put(batch, sharding.batch_sharding(mesh))


def _train(mesh, steps=3, optimizer="adafactor"):
    task, setup = _setup(mesh, optimizer)
    st = setup.init()
    step = step_lib.make_train_step(
        task, setup.tx, setup.schedule, setup.shardings, sharding.batch_sharding(mesh)
    )
    values = []
    for _ in range(steps):
        st, metrics = step(st, {}, _batch(mesh))
        values.append(float(metrics["loss"]))
    return values, jax.device_get(st["params"])


def test_mesh_sizes_are_validated_with_one_line_errors():
    assert sharding.mesh_shape(8, data=-1, model=2) == (1, 4, 2)
    assert sharding.mesh_shape(8, data=2, model=2, replica=-1) == (2, 2, 2)
    for kw in (
        dict(data=3, model=2),
        dict(data=-1, model=3),
        dict(data=-1, model=-1),
        dict(data=0, model=8),
    ):
        with pytest.raises(ValueError) as e:
            sharding.make_mesh(**kw)
        assert "mesh" in str(e.value) and "\n" not in str(e.value)
    mesh = sharding.make_mesh(data=2, model=2, replica=2)
    assert mesh.axis_names == ("replica", "data", "model")
    assert sharding.batch_spec(mesh) == P(("replica", "data"))
    assert sharding.batch_sharding(mesh).spec == sharding.batch_spec(mesh)
    assert sharding.batch_sharding(mesh).mesh is mesh and sharding.data_parallel_size(mesh) == 4


def test_one_batch_divisibility_check_for_plan_time_run_time_and_the_step():
    """`check_batch` takes a mesh, a batch sharding, a mesh config (-1: unknown until run time)
    or a size; one message format naming the key."""
    mesh = sharding.make_mesh(data=4, model=2)
    for where in (
        mesh,
        sharding.batch_sharding(mesh),
        {"data": 4, "model": 2},
        4,
        {"replica": 2, "data": 2},
    ):
        sharding.check_batch(16, where, "k", microbatches=2, processes=2)
        with pytest.raises(
            ValueError,
            match=r"^g\.batch_size: 18 is not divisible by the "
            r"data-parallel size 4$",
        ):
            sharding.check_batch(18, where, "g.batch_size")
        with pytest.raises(
            ValueError,
            match=r"^k: 16 is not divisible by 8 microbatches x the "
            r"data-parallel size 4$",
        ):
            sharding.check_batch(16, where, "k", microbatches=8)
    for unknown in ({"data": -1, "model": 2}, {"replica": -1, "data": 4}, None, 1):
        sharding.check_batch(18, unknown, "k")
        with pytest.raises(ValueError, match=r"^k: 18 is not divisible by 4 microbatches$"):
            sharding.check_batch(18, unknown, "k", microbatches=4)
    with pytest.raises(ValueError, match=r"^k: 16 is not divisible by 3 processes$"):
        sharding.check_batch(16, mesh, "k", processes=3)
    for bad in (0, -8, 8.0, True, None):
        with pytest.raises(ValueError, match=r"^k: must be a positive int, got "):
            sharding.check_batch(bad, mesh, "k")


def test_rules_shard_params_on_both_axes_golden():
    cfg = vit.make_config("22B/14")
    specs = jax.tree_util.tree_map(
        lambda s: s.spec,
        sharding.param_shardings(vit.abstract_params(cfg), sharding.abstract_mesh(16, 16)),
    )
    block = specs["Transformer"]["encoderblock"]
    assert block["in_kernel"] == P(None, "data", "model", None)  # [layers, embed, heads, kv]
    assert block["out_kernel"] == P(None, "model", None, "data")  # [layers, heads, kv, embed]
    assert block["in_bias"] == P(None, "model", None)
    assert specs["head_kernel"] == P("data", None)  # 1000 classes do not divide over 16: replicated
    assert specs["MAPHead_0"]["mlp_in_kernel"] == P("data", "model")


def test_per_device_bytes_match_the_arrays_after_init():
    mesh = sharding.make_mesh(data=4, model=2)
    _, setup = _setup(mesh)
    st = setup.init()
    abstract, sh = setup.abstract, setup.shardings
    predicted = sharding.per_device_bytes(abstract, sh)
    per_device = {}
    for leaf in jax.tree_util.tree_leaves(st):
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    assert predicted == max(per_device.values())
    # Sharding really splits the parameters: well under the replicated total per device.
    total = sum(
        math.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(abstract["params"])
    )
    assert sharding.per_device_bytes(abstract["params"], sh["params"]) < total / 2


@pytest.mark.parametrize("optimizer", ["adafactor", "adamw"])
def test_sharded_training_equals_unsharded(optimizer):
    single = sharding.make_mesh(data=1, model=1, devices=jax.devices()[:1])
    ref_losses, ref_params = _train(single, optimizer=optimizer)
    for data, model in ((4, 2), (2, 4)):
        losses, params = _train(sharding.make_mesh(data=data, model=model), optimizer=optimizer)
        np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
        # Per-leaf relative error: Adam turns near-zero gradients into +-lr steps, so single
        # elements may differ by rounding while the tensors agree.
        rel = jax.tree_util.tree_map(
            lambda a, b: np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-12), params, ref_params
        )
        assert max(jax.tree_util.tree_leaves(rel)) < 2e-3
    assert ref_losses[-1] < ref_losses[0]


def test_activation_constraints_reach_the_compiled_step():
    mesh = sharding.make_mesh(data=4, model=2)
    task, setup = _setup(mesh)
    model = vit.ViT(vit.make_config("mu/4", image_size=16, num_classes=8, head_zeroinit=False))
    abstract = setup.abstract
    bsh = sharding.batch_sharding(mesh)
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])
    args = (abstract["params"], jax.ShapeDtypeStruct((16, 16, 16, 3), jnp.float32, sharding=bsh))
    assert "sharding_constraint" not in fn.lower(*args).as_text()
    with sharding.activate(mesh):
        text = jax.jit(lambda p, x: model.apply({"params": p}, x)[0]).lower(*args).as_text()
    assert text.count("sharding_constraint") >= 4


def test_memory_report_cli(capsys):
    memory.main(["--variant", "22B/14", "--mesh", "16,16"])
    out = capsys.readouterr().out
    assert "params" in out and "opt state" in out
    report = memory.memory_report("22B/14", 16, 16)
    # 22.2B f32 params over 256 devices: ~347 MB each when fully sharded on both axes.
    assert report["params"] == pytest.approx(report["params_total"] / 256, rel=0.02)
    assert (
        report["opt_state"] < report["params"]
    )  # Adafactor: factored second moment, bf16 momentum
