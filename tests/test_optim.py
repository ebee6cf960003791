"""trainer.optim: schedules, both optimizers, clipping, head/body weight decay, freezing, config
errors."""

import dataclasses
import logging
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trainer import optim


def _cfg(**kw):
    cfg = optim.default_config()
    cfg.update(kw)
    return cfg


def _params(seed=0):
    """A ViT-shaped tree: both kernel spellings, biases, norm scales, a head."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    return {
        "embedding": {"kernel": normal(12, 32)},
        "pos_embedding": normal(1, 4, 32),
        "Transformer": {
            "encoderblock_0": {
                "in_kernel": normal(32, 2, 40),
                "in_bias": normal(2, 8),
                "norm": {"scale": 1.0 + normal(32)},
            },
        },
        "head": {"kernel": normal(32, 10), "bias": normal(10)},
    }


def _find(tree, cls):
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, cls))
    return [x for x in leaves if isinstance(x, cls)]


def _step(tx, params, grads, state):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state


# ----------------------------------------------------------------------------------------------
# Schedules.


def _lr(cfg, total, steps):
    schedule = jax.jit(optim.make_schedule(cfg, total))
    return np.array([float(schedule(jnp.int32(s))) for s in steps])


def test_rsqrt_schedule_key_steps():
    cfg = _cfg(schedule="rsqrt", lr=2.0, warmup_steps=100, timescale=50, cooldown_steps=200)
    got = _lr(cfg, 1000, [0, 50, 100, 250, 800, 900, 1000])
    want = [
        0.0,  # warmup starts at 0
        1.0,  # half-way through warmup: lr * 50/100 (no decay during warmup)
        2.0,  # warmup end: peak
        2.0 / math.sqrt(1 + 150 / 50),  # lr / sqrt(1 + (t - warmup) / timescale) = lr / 2
        2.0 / math.sqrt(1 + 700 / 50),  # cooldown start (total - cooldown): factor still 1
        2.0 / math.sqrt(1 + 800 / 50) * 0.5,  # half-way through cooldown
        0.0,  # cooldown end
    ]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_cosine_linear_constant_schedules():
    total, warmup = 1100, 100
    steps = [0, 50, 100, 350, 600, 1100]
    cos = _lr(_cfg(schedule="cosine", lr=1.0, warmup_steps=warmup), total, steps)
    np.testing.assert_allclose(
        cos, [0, 0.5, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.0], atol=1e-6
    )
    lin = _lr(_cfg(schedule="linear", lr=1.0, warmup_steps=warmup), total, steps)
    np.testing.assert_allclose(lin, [0, 0.5, 1.0, 0.75, 0.5, 0.0], atol=1e-6)
    const = _lr(
        _cfg(schedule="constant", lr=0.3, warmup_steps=warmup, cooldown_steps=200),
        total,
        [0, 50, 100, 900, 1000, 1100],
    )
    np.testing.assert_allclose(const, [0, 0.15, 0.3, 0.3, 0.15, 0.0], atol=1e-7)


def test_schedule_without_warmup_starts_at_peak():
    np.testing.assert_allclose(_lr(_cfg(schedule="rsqrt", lr=1e-3), 10, [0]), [1e-3], rtol=1e-6)


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(warmup_steps=100), "warmup_steps"),
        (dict(warmup_steps=60, cooldown_steps=50), "cooldown_steps"),
    ],
)
def test_schedule_durations_must_fit(kw, field):
    with pytest.raises(ValueError, match=f"'{field}'"):
        optim.make_schedule(_cfg(**kw), 100)
    optim.make_schedule(_cfg(**kw), 1)  # 0/1-step debug and eval runs are allowed


# ----------------------------------------------------------------------------------------------
# Both optimizers train.


@pytest.mark.parametrize("name, lr", [("adafactor", 0.02), ("adamw", 0.02)])
def test_optimizer_reduces_linear_regression_loss(name, lr):
    kx, kw = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (256, 64))
    w_true = jax.random.normal(kw, (64, 32)) / 8.0  # 64x32: adafactor factors this kernel
    y = x @ w_true
    params = {"dense": {"kernel": jnp.zeros((64, 32)), "bias": jnp.zeros((32,))}}

    def loss_fn(p):
        return jnp.mean((x @ p["dense"]["kernel"] + p["dense"]["bias"] - y) ** 2)

    cfg = _cfg(optimizer=name, lr=lr, schedule="cosine", warmup_steps=10, wd=1e-4)
    tx, _ = optim.make_optimizer(cfg, params, 150)

    @jax.jit
    def train(params):
        def body(carry, _):
            p, s = carry
            loss, g = jax.value_and_grad(loss_fn)(p)
            return _step(tx, p, g, s), loss

        (params, _), losses = jax.lax.scan(body, (params, tx.init(params)), None, length=150)
        return params, losses

    params, losses = train(params)
    assert float(loss_fn(params)) < 0.02 * float(losses[0]), (
        float(losses[0]),
        float(loss_fn(params)),
    )
    if name == "adafactor":  # factored second moment: row + column vectors, not a 64x32 matrix
        (fs,) = _find(tx.init(params), optax.FactoredState)
        assert {fs.v_row["dense"]["kernel"].shape, fs.v_col["dense"]["kernel"].shape} == {
            (64,),
            (32,),
        }
        assert fs.v["dense"]["kernel"].shape == (1,)


def test_momentum_dtypes():
    params = {"w": jnp.zeros((8, 8))}
    af = optim.make_optimizer(_cfg(), params, 10)[0].init(params)
    assert _find(af, optax.EmaState)[0].ema["w"].dtype == jnp.bfloat16
    adam = optim.make_optimizer(
        _cfg(optimizer="adamw", adamw=dict(mu_dtype="bfloat16")), params, 10
    )[0]
    (st,) = _find(adam.init(params), optax.ScaleByAdamState)
    assert st.mu["w"].dtype == jnp.bfloat16 and st.nu["w"].dtype == jnp.float32


# ----------------------------------------------------------------------------------------------
# Gradient clipping: read the clipped gradient back from Adam's first moment, mu = (1 - b1) * g.


def _adam_mu_after_one_step(grads, params, **cfg):
    tx, _ = optim.make_optimizer(_cfg(optimizer="adamw", **cfg), params, 10)
    _, state = jax.jit(tx.update)(grads, tx.init(params), params)
    (st,) = _find(state, optax.ScaleByAdamState)
    return st.mu


def test_grad_clipping_bounds_global_norm():
    params = _params()
    grads = jax.tree.map(lambda p: 1e6 * jnp.ones_like(p), params)
    raw_norm = float(optax.tree.norm(grads))
    mu = _adam_mu_after_one_step(grads, params, grad_clip_norm=1.0)
    np.testing.assert_allclose(float(optax.tree.norm(mu)), 0.1 * 1.0, rtol=1e-5)
    mu = _adam_mu_after_one_step(grads, params, grad_clip_norm=None)
    np.testing.assert_allclose(float(optax.tree.norm(mu)), 0.1 * raw_norm, rtol=1e-5)


def test_grad_clipping_ignores_frozen_params():
    params = _params()
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
    grads["Transformer"] = jax.tree.map(lambda p: jnp.full_like(p, 1e6), grads["Transformer"])
    mu = _adam_mu_after_one_step(
        grads, params, grad_clip_norm=1.0, wd_rules=[("^Transformer/", None)]
    )
    # The trainable gradients' norm is < 1: unclipped, despite huge frozen gradients.
    np.testing.assert_allclose(mu["head"]["kernel"], 0.1 * 1e-3, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Weight decay: p <- p - lr(t) * (u + wd * p); with zero gradients u = 0 for both optimizers.


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_head_and_body_weight_decay(name):
    params = _params()
    lr, wd_head, wd_body = 0.01, 3.0, 0.03
    cfg = _cfg(
        optimizer=name,
        schedule="constant",
        lr=lr,
        wd=0.0,
        wd_rules=[(optim.HEAD_KERNEL, wd_head), (optim.ANY_KERNEL, wd_body)],
    )
    tx, _ = optim.make_optimizer(cfg, params, 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    new, _ = jax.jit(lambda p, s: _step(tx, p, zeros, s))(params, tx.init(params))
    np.testing.assert_allclose(
        new["head"]["kernel"], params["head"]["kernel"] * (1 - lr * wd_head), rtol=1e-6
    )
    block, new_block = params["Transformer"]["encoderblock_0"], new["Transformer"]["encoderblock_0"]
    np.testing.assert_allclose(
        new_block["in_kernel"], block["in_kernel"] * (1 - lr * wd_body), rtol=1e-6
    )
    np.testing.assert_allclose(
        new["embedding"]["kernel"], params["embedding"]["kernel"] * (1 - lr * wd_body), rtol=1e-6
    )
    for path in (("head", "bias"), ("pos_embedding",)):  # unmatched -> cfg.wd = 0: untouched
        a, b = params, new
        for key in path:
            a, b = a[key], b[key]
        np.testing.assert_array_equal(a, b)


def test_weight_decay_follows_the_lr_schedule():
    params = {"head": {"kernel": jnp.ones((4, 3))}}
    lr, wd, warmup = 0.1, 2.0, 2
    cfg = _cfg(schedule="constant", lr=lr, warmup_steps=warmup, wd=wd)
    tx, schedule = optim.make_optimizer(cfg, params, 10)
    state, p = tx.init(params), params
    zeros = jax.tree.map(jnp.zeros_like, params)
    factor = 1.0
    for t in range(4):
        p, state = _step(tx, p, zeros, state)
        factor *= 1 - float(schedule(t)) * wd  # lr(t) = 0, lr/2, lr, lr
    np.testing.assert_allclose(p["head"]["kernel"], factor * np.ones((4, 3)), rtol=1e-6)
    np.testing.assert_allclose(factor, (1 - 0.05 * wd) * (1 - 0.1 * wd) ** 2, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Freezing.


def _size(tree):
    return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_frozen_params_are_bit_identical_and_stateless(name):
    params = _params()
    cfg = _cfg(
        optimizer=name, lr=0.1, wd=0.5, wd_rules=[("^Transformer/", None), ("pos_embedding", None)]
    )
    tx, _ = optim.make_optimizer(cfg, params, 10)
    state, p = tx.init(params), params
    grad_fn = jax.jit(jax.grad(lambda p: sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(p))))
    step = jax.jit(lambda p, s: _step(tx, p, grad_fn(p), s))
    for _ in range(4):
        p, state = step(p, state)
    assert jax.tree.all(jax.tree.map(np.array_equal, p["Transformer"], params["Transformer"]))
    np.testing.assert_array_equal(p["pos_embedding"], params["pos_embedding"])
    for path in (("head", "kernel"), ("head", "bias"), ("embedding", "kernel")):
        assert not np.allclose(p[path[0]][path[1]], params[path[0]][path[1]]), path
    # No optimizer state for frozen params: exactly the state of the trainable subtree alone.
    trainable = {k: v for k, v in params.items() if k not in ("Transformer", "pos_embedding")}
    cfg_trainable = _cfg(optimizer=name, lr=0.1, wd=0.5)
    alone = optim.make_optimizer(cfg_trainable, trainable, 10)[0].init(trainable)
    assert (
        _size(state)
        == _size(alone)
        < _size(optim.make_optimizer(cfg_trainable, params, 10)[0].init(params))
    )


def test_state_structure_independent_of_values():
    cfg = optim.vit22b_config()
    cfg.update(
        dict(warmup_steps=2, cooldown_steps=2, wd_rules=[("^Transformer/", None), *cfg.wd_rules])
    )
    tx, _ = optim.make_optimizer(cfg, _params(0), 10)
    concrete = tx.init(_params(0))
    abstract = jax.eval_shape(tx.init, _params(1))
    assert jax.tree.structure(concrete) == jax.tree.structure(abstract)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), concrete) == jax.tree.map(
        lambda x: (x.shape, x.dtype), abstract
    )
    # Creating the state under jit (as with out_shardings) gives the same tree.
    assert jax.tree.structure(jax.jit(tx.init)(_params(2))) == jax.tree.structure(concrete)


# ----------------------------------------------------------------------------------------------
# Rules, paths, recipe.


def test_wd_assignments_first_match_wins_and_boxed_params():
    cfg = optim.vit22b_config()
    cfg.wd = 0.5
    cfg.wd_rules = [("^embedding/", None), *cfg.wd_rules]
    boxed = jax.tree.map(lambda x: nn.LogicallyPartitioned(x, ("a",) * x.ndim), _params())
    want = {
        "embedding/kernel": None,  # listed first: frozen, although it is also a kernel
        "pos_embedding": 0.5,
        "Transformer/encoderblock_0/in_kernel": 0.03,
        "Transformer/encoderblock_0/in_bias": 0.5,
        "Transformer/encoderblock_0/norm/scale": 0.5,
        "head/kernel": 3.0,
        "head/bias": 0.5,
    }
    assert optim.wd_assignments(cfg, _params()) == want
    assert optim.wd_assignments(cfg, boxed) == want
    assert optim.wd_assignments(cfg, {"head_kernel": 0, "out_kernel": 0}) == {
        "head_kernel": 3.0,
        "out_kernel": 0.03,
    }


def test_unmatched_rule_is_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="trainer.optim"):
        optim.make_optimizer(_cfg(wd_rules=[("head/kernal", 1.0)]), _params(), 10)
    assert "head/kernal" in caplog.text


def test_vit22b_recipe():
    cfg = optim.vit22b_config()
    assert (cfg.optimizer, cfg.lr, cfg.schedule, cfg.timescale) == (
        "adafactor",
        1e-3,
        "rsqrt",
        10_000,
    )
    assert (cfg.warmup_steps, cfg.grad_clip_norm, cfg.wd) == (10_000, 1.0, 0.0)
    assert [v for _, v in cfg.wd_rules] == [3.0, 0.03]
    assert (cfg.adafactor.momentum, cfg.adafactor.momentum_dtype, cfg.adafactor.beta2_cap) == (
        0.9,
        "bfloat16",
        0.999,
    )
    assert optim.validate_config(cfg).to_dict() == cfg.to_dict()


def test_default_config_key_set():
    assert set(optim.default_config().keys()) == {
        "optimizer",
        "lr",
        "schedule",
        "warmup_steps",
        "cooldown_steps",
        "timescale",
        "grad_clip_norm",
        "wd",
        "wd_rules",
        "adafactor",
        "adamw",
        "sgd",
    }


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(optimizer="lamb"), "optimizer"),
        (dict(sgd=dict(momentum=1.5)), "sgd.momentum"),
        (dict(schedule="step"), "schedule"),
        (dict(wd_rules=[("head(", 1.0)]), r"wd_rules\[0\]"),
        (dict(wd_rules=[(".*", 1.0), ("[", None)]), r"wd_rules\[1\]"),
        (dict(wd_rules=[("/head", 1.0)]), r"wd_rules\[0\]"),
        (dict(wd_rules=[("head", "big")]), r"wd_rules\[0\]"),
        (dict(wd_rules=["head"]), r"wd_rules\[0\]"),
        (dict(wd=-1.0), "wd"),
        (dict(lr=float("nan")), "lr"),
        (dict(grad_clip_norm=0.0), "grad_clip_norm"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(adafactor=dict(momentum_dtype="bf17")), "adafactor.momentum_dtype"),
        (dict(adamw=dict(b2=1.0)), "adamw.b2"),
        (dict(momentum=0.9), "momentum"),  # unknown top-level key
        (dict(adamw=dict(beta1=0.9)), "adamw.beta1"),
    ],
)
def test_bad_configs_raise_one_line_value_error(kw, field):
    with pytest.raises(ValueError, match=f"'{field}'") as err:
        optim.make_optimizer(kw, _params(), 10)
    assert "\n" not in str(err.value)


def test_bad_total_steps():
    with pytest.raises(ValueError, match="total_steps"):
        optim.make_optimizer({}, _params(), -1)


def test_optim_config_is_a_frozen_dataclass_built_from_a_partial_dict():
    cfg = optim.OptimConfig.of({"lr": 0.5, "adamw": {"b1": 0.8}, "wd_rules": [["head", None]]})
    assert (cfg.lr, cfg.adamw.b1, cfg.adamw.b2, cfg.optimizer) == (0.5, 0.8, 0.999, "adafactor")
    assert cfg.wd_rules == (("head", None),) and optim.OptimConfig.of(cfg) is cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0
    assert optim.default_config().to_dict() == optim.OptimConfig().to_dict()
    assert optim.OptimConfig.of(optim.vit22b_config()).wd_rules[0] == (optim.HEAD_KERNEL, 3.0)
    for bad, message in (
        ({"adafactor": 3}, "'adafactor': expected a mapping, got int$"),
        ({"sgd": {"nesterov": "yes"}}, "'sgd.nesterov': must be True or False"),
    ):
        with pytest.raises(ValueError, match=r"^optim config field " + message):
            optim.OptimConfig.of(bad)
