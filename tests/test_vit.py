"""ViT family: parameter counts, the ViT-22B block against NumPy, fusion/scan equivalences,
configs."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from trainer import flops
from trainer.models import vit


def _init(cfg, batch=2, seed=0):
    model = vit.ViT(cfg)
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (batch, cfg.image_size, cfg.image_size, 3))
    params = nn.unbox(model.init(jax.random.PRNGKey(seed), x)["params"])
    return model, params, x


def _flat(params):
    return traverse_util.flatten_dict(params, sep="/")


def _tiny(**kw):
    base = dict(image_size=16, num_classes=5, depth=2)
    base.update(kw)
    return vit.make_config("mu/4", **base)


# --- parameter counts -------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(vit.VARIANTS))
def test_param_count_of_every_variant_matches_closed_form(name):
    patch = 4 if name == "mu" else 14
    cfg = vit.make_config(f"{name}/{patch}", image_size=32 if name == "mu" else 224)
    assert vit.count_params(vit.abstract_params(cfg)) == flops.param_count(cfg)


@pytest.mark.parametrize(
    "block,fused,use_bias,qk_norm,head,norm",
    [
        combo
        for combo in itertools.product(
            ("parallel", "sequential"),
            (True, False),
            (True, False),
            (True, False),
            ("map", "gap", "token"),
            ("rmsnorm", "layernorm"),
        )
        if combo[4] == "map" or (combo[1] and combo[3])
    ],
)  # fewer head combos: the head is independent
def test_param_count_of_every_toggle_matches_closed_form(
    block, fused, use_bias, qk_norm, head, norm
):
    cfg = _tiny(block=block, fused=fused, use_bias=use_bias, qk_norm=qk_norm, head=head, norm=norm)
    assert vit.count_params(vit.abstract_params(cfg)) == flops.param_count(cfg)


def test_encoder_only_and_representation_counts():
    for kw in (
        dict(num_classes=0),
        dict(representation_size=32),
        dict(num_classes=0, representation_size=8),
    ):
        cfg = _tiny(**kw)
        assert vit.count_params(vit.abstract_params(cfg)) == flops.param_count(cfg)


def test_vit22b_encoder_matmul_weights_are_exact():
    cfg = vit.make_config("22B/14")
    assert (cfg.width, cfg.depth, cfg.mlp_dim, cfg.num_heads, cfg.num_patches) == (
        6144,
        48,
        24576,
        48,
        256,
    )
    flat = _flat(nn.unbox(vit.abstract_params(cfg)))
    matmul = sum(
        int(np.prod(v.shape))
        for k, v in flat.items()
        if k.startswith("Transformer/encoderblock/") and k.endswith("_kernel")
    )
    assert matmul == 48 * (4 * 6144**2 + 2 * 6144 * 24576) == 21_743_271_936
    assert flops.encoder_matmul_params(cfg) == 21_743_271_936
    # Exactly two matmul kernels per block: the fused in- and out-projections.
    assert sorted(
        k for k in flat if k.startswith("Transformer/encoderblock/") and k.endswith("_kernel")
    ) == ["Transformer/encoderblock/in_kernel", "Transformer/encoderblock/out_kernel"]


def test_model_flops_follow_palm_formula():
    cfg = vit.make_config("22B/14", num_classes=0, head="gap")
    t, n = 256, flops.matmul_params_per_token(cfg)
    assert flops.model_flops_per_example(cfg) == pytest.approx(6 * n * t + 12 * 48 * t * t * 6144)
    assert flops.model_flops_per_example(cfg, train=False) == pytest.approx(
        2 * n * t + 4 * 48 * t * t * 6144
    )


# --- the ViT-22B block against an independent NumPy implementation ------------------------------


def _np_rms(x, scale, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _np_gelu(x):
    from scipy.special import erf

    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def _np_parallel_block(x, W_q, W_k, W_v, W_1, b_1, W_o, W_2, b_out, ln, qn, kn, heads):
    """y = x + Attn(LN(x)) + MLP(LN(x)), one head at a time, with plain 2-D weight matrices."""
    h = _np_rms(x, ln)
    q, k, v = h @ W_q, h @ W_k, h @ W_v
    hd = q.shape[-1] // heads
    attn = np.zeros_like(q)
    for i in range(heads):
        s = slice(i * hd, (i + 1) * hd)
        qi, ki = _np_rms(q[..., s], qn), _np_rms(k[..., s], kn)
        logits = qi @ np.swapaxes(ki, -1, -2) / np.sqrt(hd)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        attn[..., s] = (w / w.sum(-1, keepdims=True)) @ v[..., s]
    mlp = _np_gelu(h @ W_1 + b_1) @ W_2
    return x + attn @ W_o + mlp + b_out


def test_fused_parallel_block_equals_numpy_reference():
    cfg = _tiny(depth=1, width=32, num_heads=4, mlp_dim=64)
    block = vit.ParallelBlock(cfg)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 32))
    params = nn.unbox(block.init(jax.random.PRNGKey(1), x)["params"])
    # Random norm scales and biases so that every term matters.
    params = jax.tree_util.tree_map(
        lambda p: p + 0.3 * jax.random.normal(jax.random.PRNGKey(p.size), p.shape), params
    )
    y, _ = block.apply({"params": params}, x)

    p = jax.tree_util.tree_map(np.asarray, params)
    D, H, hd, m = 32, 4, 8, 16
    W_in, W_out = p["in_kernel"], p["out_kernel"]  # [D, H, 3hd+m], [H, hd+m, D]
    W_q, W_k, W_v = (W_in[:, :, i * hd : (i + 1) * hd].reshape(D, H * hd) for i in range(3))
    W_1 = W_in[:, :, 3 * hd :].reshape(D, H * m)
    b_1 = p["in_bias"].reshape(H * m)  # use_bias=False: only the MLP part has a bias
    W_o = W_out[:, :hd, :].reshape(H * hd, D)
    W_2 = W_out[:, hd:, :].reshape(H * m, D)
    ref = _np_parallel_block(
        np.asarray(x),
        W_q,
        W_k,
        W_v,
        W_1,
        b_1,
        W_o,
        W_2,
        p["out_bias"],
        p["norm"]["scale"],
        p["q_norm"]["scale"],
        p["k_norm"]["scale"],
        H,
    )
    np.testing.assert_allclose(np.asarray(y), ref, rtol=2e-5, atol=2e-5)


# --- equivalences ---------------------------------------------------------------------------------


def _unfuse(params, cfg):
    """Maps a fused model's parameters onto the unfused layout of the same math."""
    flat = _flat(params)
    out = {}
    H, hd, M = cfg.num_heads, cfg.head_dim, cfg.mlp_dim
    m = M // H
    for key, value in flat.items():
        prefix, _, name = key.rpartition("/")
        if not prefix.startswith("Transformer/encoderblock"):
            out[key] = value
            continue
        lead = value.shape[:-3] if name in ("in_kernel", "out_kernel", "qkv_kernel") else None
        if name == "in_kernel":  # [..., D, H, 3hd+m]
            for i, n in enumerate(("query", "key", "value")):
                out[f"{prefix}/{n}_kernel"] = value[..., i * hd : (i + 1) * hd]
            out[f"{prefix}/mlp_in_kernel"] = value[..., 3 * hd :].reshape(*lead, value.shape[-3], M)
        elif name == "in_bias":  # [..., H, (3hd+)m]
            if cfg.use_bias:
                for i, n in enumerate(("query", "key", "value")):
                    out[f"{prefix}/{n}_bias"] = value[..., i * hd : (i + 1) * hd]
            out[f"{prefix}/mlp_in_bias"] = value[..., -m:].reshape(*value.shape[:-2], M)
        elif name == "out_kernel":  # [..., H, hd+m, D]
            out[f"{prefix}/attn_out_kernel"] = value[..., :hd, :]
            out[f"{prefix}/mlp_out_kernel"] = value[..., hd:, :].reshape(*lead, M, value.shape[-1])
        elif name == "out_bias":
            out[f"{prefix}/mlp_out_bias"] = value
            if cfg.use_bias:
                out[f"{prefix}/attn_out_bias"] = jnp.zeros_like(value)
        elif name == "qkv_kernel" or name == "qkv_bias":
            for i, n in enumerate(("query", "key", "value")):
                out[f"{prefix}/{n}_{name[4:]}"] = value[..., i * hd : (i + 1) * hd]
        else:
            out[key] = value
    return traverse_util.unflatten_dict(out, sep="/")


@pytest.mark.parametrize(
    "block,use_bias",
    [("parallel", False), ("parallel", True), ("sequential", True), ("sequential", False)],
)
def test_unfused_equals_fused(block, use_bias):
    cfg = _tiny(block=block, use_bias=use_bias)
    model, params, x = _init(cfg)
    params = jax.tree_util.tree_map(
        lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(p.size), p.shape), params
    )
    unfused_cfg = _tiny(block=block, use_bias=use_bias, fused=False)
    unfused = _unfuse(params, cfg)
    # The unfused model has exactly the parameters the mapping produced.
    _, ref_params, _ = _init(unfused_cfg)
    assert jax.tree_util.tree_map(jnp.shape, unfused) == jax.tree_util.tree_map(
        jnp.shape, ref_params
    )
    y_fused, _ = model.apply({"params": params}, x)
    y_unfused, _ = vit.ViT(unfused_cfg).apply({"params": unfused}, x)
    np.testing.assert_allclose(y_fused, y_unfused, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", ["parallel", "sequential"])
def test_scan_equals_unrolled(block):
    cfg = _tiny(block=block, depth=3)
    model, params, x = _init(cfg)
    stacked = params["Transformer"]["encoderblock"]
    unrolled = dict(params)
    unrolled["Transformer"] = {"encoder_norm": params["Transformer"]["encoder_norm"]}
    for i in range(3):
        unrolled["Transformer"][f"encoderblock_{i}"] = jax.tree_util.tree_map(
            lambda p: p[i], stacked
        )
    y_scan, _ = model.apply({"params": params}, x)
    y_loop, _ = vit.ViT(_tiny(block=block, depth=3, scan=False)).apply({"params": unrolled}, x)
    np.testing.assert_allclose(y_scan, y_loop, rtol=1e-5, atol=1e-5)


def _loss_and_grads(model, params, x):
    def loss(p):
        logits, _ = model.apply({"params": p}, x)
        labels = jax.nn.one_hot(jnp.arange(x.shape[0]) % logits.shape[-1], logits.shape[-1])
        return jnp.mean(
            jnp.sum(
                -labels * jax.nn.log_sigmoid(logits) - (1 - labels) * jax.nn.log_sigmoid(-logits),
                -1,
            )
        )

    return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_gradients_finite_and_remat_invariant(remat):
    cfg = _tiny(head_zeroinit=False)
    model, params, x = _init(cfg)
    loss, grads = _loss_and_grads(model, params, x)
    assert np.isfinite(loss)
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
    assert any(np.any(g != 0) for g in jax.tree_util.tree_leaves(grads["Transformer"]))
    if remat != "none":
        loss_r, grads_r = _loss_and_grads(
            vit.ViT(_tiny(head_zeroinit=False, remat=remat)), params, x
        )
        np.testing.assert_allclose(loss, loss_r, rtol=1e-6)
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, grads_r
        )


# --- the seed's architecture facts ----------------------------------------------------------------


def test_no_biases_where_the_seed_says_none():
    cfg = vit.make_config("22B/14")
    flat = _flat(nn.unbox(vit.abstract_params(cfg)))
    norms = [k for k in flat if len(k.split("/")) > 1 and "norm" in k.split("/")[-2]]
    assert norms and all(k.endswith("/scale") for k in norms), "LayerNorms must be bias-free"
    biases = sorted(k for k in flat if k.endswith("bias"))
    assert biases == [
        "MAPHead_0/mlp_in_bias",
        "MAPHead_0/mlp_out_bias",
        "Transformer/encoderblock/in_bias",
        "Transformer/encoderblock/out_bias",
        "embedding_bias",
        "head_bias",
    ]
    # The fused in-projection bias covers only the MLP part (no q/k/v bias).
    assert flat["Transformer/encoderblock/in_bias"].shape == (
        48,
        48,
        24576 // 48,
    )  # [layers, heads, m]
    assert cfg.norm == "rmsnorm" and cfg.qk_norm and cfg.block == "parallel" and cfg.head == "map"


def test_layernorm_option_centres_and_rmsnorm_does_not():
    x = jnp.arange(12.0).reshape(2, 6) + 3.0
    for kind, centred in (("layernorm", True), ("rmsnorm", False)):
        y, _ = vit.Norm(kind).init_with_output(jax.random.PRNGKey(0), x)
        assert np.allclose(np.mean(np.asarray(y), -1), 0, atol=1e-5) == centred


def test_qk_norm_is_applied_per_head():
    cfg = _tiny(depth=1, scan=False)
    model, params, x = _init(cfg)
    # Give the heads very different scales: per-head statistics must normalize each one separately.
    _, state = model.apply({"params": params}, x * 50.0, capture_intermediates=True)
    inter = _flat(state["intermediates"])
    q = np.asarray(inter["Transformer/encoderblock_0/q_norm/__call__"][0])
    assert q.shape[-2:] == (cfg.num_heads, cfg.head_dim)
    rms = np.sqrt(np.mean(q**2, axis=-1))  # scale is 1 at init: every head's vector has unit RMS
    np.testing.assert_allclose(rms, 1.0, rtol=1e-3)
    assert params["Transformer"]["encoderblock_0"]["q_norm"]["scale"].shape == (cfg.head_dim,)
    # Without QK-norm no such parameters exist.
    _, p2, _ = _init(_tiny(depth=1, scan=False, qk_norm=False))
    assert "q_norm" not in p2["Transformer"]["encoderblock_0"]


@pytest.mark.parametrize("head", ["map", "gap", "token"])
def test_heads_and_outputs(head):
    cfg = _tiny(head=head, representation_size=24)
    model, params, x = _init(cfg)
    logits, out = model.apply({"params": params}, x)
    assert logits.shape == (2, 5) and logits.dtype == jnp.float32
    assert out["pre_logits"].shape == (2, 24)
    assert out["encoded"].shape == (2, cfg.seq_len, cfg.width)
    enc_cfg = _tiny(head=head, num_classes=0)
    model, params, x = _init(enc_cfg)
    rep, out = model.apply({"params": params}, x)
    assert rep.shape == (2, enc_cfg.width) and "head_kernel" not in params


def test_bfloat16_compute_with_float32_params():
    cfg = _tiny(dtype="bfloat16")
    model, params, x = _init(cfg)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    logits, out = model.apply({"params": params}, x)
    assert out["encoded"].dtype == jnp.bfloat16 and np.all(np.isfinite(logits))


def test_sincos_posemb_has_no_parameter():
    cfg = _tiny(posemb="sincos2d")
    _, params, _ = _init(cfg)
    assert "pos_embedding" not in params
    assert vit.count_params(params) == flops.param_count(cfg)


def test_model_json_round_trip():
    cfg = vit.make_config("B/16", num_classes=10, dtype="bfloat16", depth=3)
    spec = cfg.to_json()
    assert spec == {
        "variant": "B/16",
        "overrides": {"depth": 3, "num_classes": 10, "dtype": "bfloat16"},
    }
    assert vit.ViTConfig.from_spec(spec) == cfg


# --- bad configs: one-line ValueError naming the field, before any tracing ------------------------


@pytest.mark.parametrize(
    "variant,kw,field",
    [
        ("B/16", dict(num_heads=7), "width"),
        ("B/16", dict(image_size=200), "image_size"),
        ("Q/16", {}, "Q/16"),
        ("B16", {}, "B16"),
        ("B/16", dict(widht=3), "widht"),
        ("B/16", dict(block="serial"), "block"),
        ("22B/14", dict(mlp_dim=1000), "mlp_dim"),
        ("B/16", dict(depth=0), "depth"),
        ("B/16", dict(remat="some"), "remat"),
    ],
)
def test_bad_configs_raise_one_line_value_error(variant, kw, field):
    with pytest.raises(ValueError) as e:
        vit.make_config(variant, **kw)
    message = str(e.value)
    assert field in message and "\n" not in message


def test_wrong_input_size_is_a_clear_error():
    cfg = _tiny()
    model, params, _ = _init(cfg)
    with pytest.raises(ValueError, match="image_size=16"):
        model.apply({"params": params}, jnp.zeros((1, 32, 32, 3)))
