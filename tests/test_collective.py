"""Collective matmuls (trainer/collective.py) against XLA's sharded matmul, on 8 simulated
devices."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from trainer import collective, losses, optim, sharding
from trainer import step as step_lib
from trainer.models import vit
from trainer.task import classifier

from batches import random_batch

MESHES = [(4, 2), (2, 4), (1, 8)]
# Error allowed on top of 3x XLA's own error (both relative to the largest element of the f32
# result). f32: XLA and the rings add the same products in another order. bf16: the rings add their
# n partial products in bf16 (both forward rings sum in the output dtype, as XLA's own
# reduce-scatter does, and the backward rings accumulate bf16 cotangents), where XLA's single dot
# rounds once; measured here: up to ~2x XLA's error on a ring of 8.
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2**-8}

# name: (collective fn, contracted dims, operand shapes, operand specs as the model's
# params/activations have)
OPS = {
    "all_gather_matmul": (
        collective.all_gather_matmul,
        1,
        ((8, 3, 64), (64, 8, 6)),
        (P("data", None, "model"), P("data", "model", None)),
    ),
    "matmul_reduce_scatter": (
        collective.matmul_reduce_scatter,
        2,
        ((8, 3, 8, 6), (8, 6, 64)),
        (P("data", None, "model", None), P("model", None, "data")),
    ),
}


def _operands(mesh, name, dtype=jnp.float32):
    _, _, shapes, specs = OPS[name]
    keys = jax.random.split(jax.random.PRNGKey(0), len(shapes))
    return [
        jax.device_put(
            jax.random.normal(k, s, jnp.float32).astype(dtype), NamedSharding(mesh, spec)
        )
        for k, s, spec in zip(keys, shapes, specs)
    ]


def _output_and_grads(fn, args):
    """[fn(a, b), d/da, d/db] of a nonlinear scalar, so both gradients depend on every output
    element."""
    loss = lambda a, b: jnp.sum(jnp.sin(fn(a, b).astype(jnp.float32)))
    return [jax.jit(fn)(*args), *jax.jit(jax.grad(loss, (0, 1)))(*args)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("data,model", MESHES)
@pytest.mark.parametrize("name", list(OPS))
def test_collective_op_equals_xla_forward_and_grad(name, data, model, dtype):
    fn, n_in, _, _ = OPS[name]
    mesh = sharding.make_mesh(data=data, model=model)
    args = _operands(mesh, name, dtype)
    xla = lambda a, b: jnp.tensordot(a, b, n_in)
    got = _output_and_grads(lambda a, b: fn(a, b, mesh), args)
    ref = _output_and_grads(xla, args)
    exact = _output_and_grads(xla, [a.astype(jnp.float32) for a in args])  # == ref for f32
    for g, r, e in zip(got, ref, exact):
        assert g.shape == r.shape and g.dtype == r.dtype == dtype
        g, r, e = (np.asarray(t, np.float32) for t in (g, r, e))
        scale = np.max(np.abs(e))
        assert np.max(np.abs(g - e)) / scale <= 3 * np.max(np.abs(r - e)) / scale + TOL[dtype]
    # The output comes out sharded as the model's activations are: heads (in) / width (out) on
    # "model".
    assert got[0].sharding.spec[-1 if name == "matmul_reduce_scatter" else 2] == "model"


@pytest.mark.parametrize("name", list(OPS))
def test_context_mesh_and_fallbacks(name):
    fn, n_in, shapes, _ = OPS[name]
    args = _operands(sharding.make_mesh(data=4, model=2), name)
    ref = jnp.tensordot(*args, axes=n_in)
    ring = sharding.make_mesh(data=4, model=2)
    with sharding.activate(ring):  # the mesh from context, as the model uses it
        text = jax.jit(fn).lower(*args).as_text()
        np.testing.assert_allclose(jax.jit(fn)(*args), ref, rtol=1e-5, atol=1e-5)
    assert "collective_permute" in text
    # No mesh, a model axis of size 1, or a batch the data axis does not divide (model.init's batch
    # of 1): XLA's plain matmul, no shard_map.
    one = sharding.make_mesh(data=8, model=1)
    args_one = [jax.device_put(a, NamedSharding(one, P())) for a in args]
    for mesh, operands in ((None, args), (one, args_one), (ring, [args[0][:1], args[1]])):
        text = jax.jit(lambda a, b: fn(a, b, mesh)).lower(*operands).as_text()
        assert "collective_permute" not in text and "shard_map" not in text
        np.testing.assert_allclose(
            fn(*operands, mesh), jnp.tensordot(*operands, axes=n_in), rtol=1e-5, atol=1e-5
        )


def test_indivisible_heads_or_width_is_a_clear_error():
    mesh = sharding.make_mesh(data=1, model=8)
    x, w = jnp.ones((8, 3, 64)), jnp.ones((64, 4, 6))  # 4 heads over model=8
    with pytest.raises(
        ValueError, match=r"heads=4 is not divisible by the 'model' mesh axis \(size 8\)"
    ):
        collective.all_gather_matmul(x, w, mesh)
    with pytest.raises(ValueError, match="width=12 is not divisible"):
        collective.matmul_reduce_scatter(jnp.ones((8, 3, 8, 6)), jnp.ones((8, 6, 12)), mesh)


def _hlo_ops(text: str, op: str) -> list[str]:
    """Result shapes (e.g. 'f32[64,4,6]') of every `op` instruction in compiled HLO text."""
    return re.findall(rf"= (\w+\[[\d,]*\])\S* {op}\(", text)


@pytest.mark.parametrize("name", list(OPS))
def test_hlo_overlaps_with_collective_permutes_and_never_gathers_the_activation(name):
    fn, _, shapes, _ = OPS[name]
    mesh = sharding.make_mesh(data=4, model=2)
    args = _operands(mesh, name)
    text = jax.jit(lambda a, b: fn(a, b, mesh)).lower(*args).compile().as_text()
    assert len(_hlo_ops(text, "collective-permute")) == 1  # n - 1 hops on a ring of 2
    # The only all-gather is the FSDP gather of the weight over "data" (to its full embed dim with
    # its local heads); no all-reduce / reduce-scatter of the output either.
    w = list(shapes[1])
    w[1 if name == "all_gather_matmul" else 0] //= 2
    assert _hlo_ops(text, "all-gather") == [f"f32[{','.join(map(str, w))}]"]
    assert not _hlo_ops(text, "all-reduce") and not _hlo_ops(text, "reduce-scatter")


# --- the model switch -----------------------------------------------------------------------------


def _tiny(**kw):
    return vit.make_config("mu/4", image_size=16, num_classes=5, **kw)


def test_parameters_are_identical_for_both_matmuls():
    shapes = lambda cfg: jax.tree_util.tree_map(
        lambda a: (a.shape, a.dtype), vit.abstract_params(cfg)
    )
    specs = lambda cfg: nn.get_partition_spec(vit.abstract_params(cfg))
    assert shapes(_tiny()) == shapes(_tiny(matmul="collective"))
    assert specs(_tiny()) == specs(_tiny(matmul="collective"))
    cfg = _tiny(matmul="collective")
    assert vit.ViTConfig.from_spec(cfg.to_json()) == cfg


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(matmul="async"), "matmul='async' is not one of"),
        (
            dict(matmul="collective", block="sequential"),
            "matmul='collective' needs block='parallel' and fused=True",
        ),
        (
            dict(matmul="collective", fused=False),
            "matmul='collective' needs block='parallel' and fused=True",
        ),
    ],
)
def test_bad_matmul_configs_raise_one_line_value_error(kw, match):
    with pytest.raises(ValueError, match=match) as e:
        _tiny(**kw)
    assert "\n" not in str(e.value)


def test_vit_forward_and_grad_collective_equals_xla():
    cfg = _tiny(head_zeroinit=False)
    mesh = sharding.make_mesh(data=4, model=2)
    images = jax.random.normal(jax.random.PRNGKey(1), (8, 16, 16, 3))
    with sharding.activate(mesh):
        params = jax.jit(lambda x: nn.unbox(vit.ViT(cfg).init(jax.random.PRNGKey(0), x)["params"]))(
            images
        )
        results, texts = {}, {}
        for matmul in ("xla", "collective"):
            model = vit.ViT(dataclasses.replace(cfg, matmul=matmul))

            def loss(p):
                logits, out = model.apply({"params": p}, images)
                return jnp.mean(jax.nn.log_sigmoid(logits)) + jnp.mean(out["encoded"] ** 3), out[
                    "encoded"
                ]

            fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
            results[matmul] = fn(params)
            texts[matmul] = fn.lower(params).as_text()
    (value, encoded), grads = results["collective"]
    (ref_value, ref_encoded), ref_grads = results["xla"]
    np.testing.assert_allclose(encoded, ref_encoded, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    jax.tree_util.tree_map(
        lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6), grads, ref_grads
    )
    assert "collective_permute" in texts["collective"] and "collective_permute" not in texts["xla"]


def test_train_step_collective_equals_xla():
    mesh = sharding.make_mesh(data=4, model=2)
    batch, bsh = random_batch(mesh, 8)
    models = {m: vit.ViT(_tiny(head_zeroinit=False, matmul=m)) for m in ("xla", "collective")}
    tasks = {m: classifier(m, model, losses.sigmoid_xent) for m, model in models.items()}
    setup = step_lib.setup(tasks["xla"], optim.default_config(), 10, mesh, seed=0)
    tx, schedule, sh, init = setup.tx, setup.schedule, setup.shardings, setup.init
    results = {}
    for (
        matmul,
        task,
    ) in tasks.items():  # the same parameters for both (a fresh copy: the step donates it)
        step = step_lib.make_train_step(task, tx, schedule, sh, bsh)
        results[matmul] = jax.device_get(step(init(), {}, batch))
    (state, metrics), (ref_state, ref_metrics) = results["collective"], results["xla"]
    for key in ("loss", "grad_norm", "param_norm"):
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        state["params"],
        ref_state["params"],
    )


def test_benchmark_script_prints_a_complete_table(capsys):
    from benchmarks import collective as bench

    bench.main(
        [
            "--widths",
            "128",
            "--mesh",
            "4,2",
            "--batch",
            "8",
            "--seq",
            "8",
            "--steps",
            "1",
            "--rounds",
            "1",
        ]
    )
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|   128 |")]
    assert len(rows) == 1
    width, heads, xla_ms, coll_ms, ratio, permutes = (
        c.strip() for c in rows[0].strip("|").split("|")
    )
    assert (width, heads) == ("128", "2") and min(float(xla_ms), float(coll_ms), float(ratio)) > 0
    xla, coll = (int(n) for n in permutes.split("/"))
    assert coll == xla + 4  # two forward rings + their two transposes, one hop each on model=2
