"""The ViT family in Flax Linen, including the ViT-22B parallel block.

ViT-22B block (docs/DESIGN.md §4):  h = LN(x);  [q|k|v|u] = h @ W_in  (ONE matmul; no q/k/v bias);
q, k = LN_head(q), LN_head(k);  x + [attn(q, k, v) | gelu(u + b_u)] @ W_out + b_out  (ONE matmul).

The fused kernels are laid out per head: W_in is [D, H, 3*hd + M/H] and W_out is [H, hd + M/H, D].
Sharding the `heads` axis over the `model` mesh axis then gives every shard whole heads AND an equal
slice of the MLP, while each projection stays a single matmul.
"""

from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from trainer import collective
from trainer.models.config import VARIANTS, ViTConfig, parse_variant  # noqa: F401  (re-exported)
from trainer.models.layers import (
    MAPHead,
    Norm,
    attention,
    concat_init,
    constrain,
    fan_in_init,
    gelu,
    param,
    project,
)

ACT = ("act_batch", "act_len", "act_embed")
ACT_HEADS = ("act_batch", "act_len", "act_heads", "act_kv")

# The dots policies also save the collective matmuls' outputs (trainer/collective.py hides each
# ring's per-step dots from them and names the result), as they save XLA's matmul outputs.
_RING_OUTPUT = jax.checkpoint_policies.save_only_these_names(collective.SAVE_NAME)
REMAT_POLICIES = {
    "full": None,  # save nothing but the block inputs
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots, _RING_OUTPUT
    ),
    "dots_no_batch": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims, _RING_OUTPUT
    ),
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
}


class _Dtypes:
    """`dtype` / `param_dtype` (what layers.project reads) of a module holding a ViTConfig."""

    @property
    def dtype(self):
        return jnp.dtype(self.config.dtype)

    @property
    def param_dtype(self):
        return jnp.dtype(self.config.param_dtype)


class _Block(_Dtypes, nn.Module):
    """What both block styles share: norms, per-head QK-norm + attention, residual dropout."""

    config: ViTConfig

    def norm(self, name: str, axis_name: str = "embed") -> Norm:
        c = self.config
        return Norm(
            c.norm, c.use_bias, c.norm_eps, axis_name, self.dtype, self.param_dtype, name=name
        )

    def attend(self, q, k, v):
        """QK-norm normalizes each head's query/key vector over head_dim (statistics per head)."""
        if self.config.qk_norm:
            q = self.norm("q_norm", "kv")(q)
            k = self.norm("k_norm", "kv")(k)
        q, k, v = (constrain(t, ACT_HEADS) for t in (q, k, v))
        if not self.config.attn_stats:
            return constrain(attention(q, k, v), ACT_HEADS)
        out, stats = attention(q, k, v, stats=True)
        for name, value in stats.items():
            self.sow("intermediates", name, value)  # a no-op unless the caller makes it mutable
        return constrain(out, ACT_HEADS)

    def qkv(self, h):
        """Separate q, k, v projections [b, t, H, hd] (the unfused path)."""
        c = self.config
        spec = dict(
            shape=(c.width, c.num_heads, c.head_dim), axes=("embed", "heads", "kv"), bias=c.use_bias
        )
        return [project(self, n, h, **spec) for n in ("query", "key", "value")]

    def residual(self, x, y, train: bool):
        y = nn.Dropout(self.config.dropout, deterministic=not train)(y)
        return constrain(x + y, ACT)


class ParallelBlock(_Block):
    """y = x + Attn(LN(x)) + MLP(LN(x)) with one shared, bias-free norm (ViT-22B)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = self.config
        d, heads, hd, mlp = c.width, c.num_heads, c.head_dim, c.mlp_dim
        m = mlp // heads  # MLP features per head slot in the fused layout
        x = constrain(x, ACT)
        h = self.norm("norm")(x)
        if c.fused:
            # Same parameters either way; "collective" only changes how the two matmuls communicate.
            mm_in, mm_out = (
                (collective.all_gather_matmul, collective.matmul_reduce_scatter)
                if c.matmul == "collective"
                else (None, None)
            )
            y = constrain(
                project(
                    self, "in", h, (d, heads, 3 * hd + m), ("embed", "heads", "kv"), matmul=mm_in
                ),
                ACT_HEADS,
            )
            # Biases: q, k, v only when use_bias; the MLP part always (the paper keeps MLP biases).
            bias_width = 3 * hd + m if c.use_bias else m
            y = y.at[..., -bias_width:].add(
                param(
                    self,
                    "in_bias",
                    nn.initializers.zeros,
                    (heads, bias_width),
                    ("heads", "kv"),
                    self.param_dtype,
                ).astype(self.dtype)
            )
            q, k, v, u = jnp.split(y, [hd, 2 * hd, 3 * hd], axis=-1)
            a = self.attend(q, k, v)
            z = jnp.concatenate([a, gelu(u)], axis=-1)  # [b, t, H, hd + m]
            out_init = concat_init([fan_in_init((0, 1))] * 2, [hd, m], axis=1)
            y = project(
                self,
                "out",
                z,
                (heads, hd + m, d),
                ("heads", "kv", "embed"),
                n_in=2,
                bias=True,
                init=out_init,
                matmul=mm_out,
            )
        else:
            q, k, v = self.qkv(h)
            u = gelu(project(self, "mlp_in", h, (d, mlp), ("embed", "mlp"), bias=True))
            u = constrain(u, ("act_batch", "act_len", "act_mlp"))
            a = self.attend(q, k, v)
            y = project(
                self,
                "attn_out",
                a,
                (heads, hd, d),
                ("heads", "kv", "embed"),
                n_in=2,
                bias=c.use_bias,
            ) + project(self, "mlp_out", u, (mlp, d), ("mlp", "embed"), bias=True)
        return self.residual(x, y, train), None


class SequentialBlock(_Block):
    """The classic pre-LN ViT block: x + Attn(LN1(x)), then + MLP(LN2(.))."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = self.config
        d, heads, hd, mlp = c.width, c.num_heads, c.head_dim, c.mlp_dim
        x = constrain(x, ACT)
        h = self.norm("norm1")(x)
        if c.fused:
            y = project(
                self, "qkv", h, (d, heads, 3 * hd), ("embed", "heads", "kv"), bias=c.use_bias
            )
            q, k, v = jnp.split(y, 3, axis=-1)
        else:
            q, k, v = self.qkv(h)
        a = self.attend(q, k, v)
        x = self.residual(
            x,
            project(
                self,
                "attn_out",
                a,
                (heads, hd, d),
                ("heads", "kv", "embed"),
                n_in=2,
                bias=c.use_bias,
            ),
            train,
        )
        h = self.norm("norm2")(x)
        u = gelu(project(self, "mlp_in", h, (d, mlp), ("embed", "mlp"), bias=True))
        u = constrain(u, ("act_batch", "act_len", "act_mlp"))
        return self.residual(
            x, project(self, "mlp_out", u, (mlp, d), ("mlp", "embed"), bias=True), train
        ), None


class Encoder(nn.Module):
    """`depth` blocks, scanned (params stacked on a leading "layers" axis) or unrolled, + final
    norm."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = self.config
        block = ParallelBlock if c.block == "parallel" else SequentialBlock
        if c.remat != "none":
            # static_argnums counts self as 0: `train` (arg 2) selects dropout, so it must be
            # static.
            block = nn.remat(
                block, prevent_cse=not c.scan, static_argnums=(2,), policy=REMAT_POLICIES[c.remat]
            )
        if c.scan:
            # "intermediates": 0 stacks sown attention stats per layer (attn_stats; else empty).
            x, _ = nn.scan(
                block,
                variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=nn.broadcast,
                length=c.depth,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(c, name="encoderblock")(x, train)
        else:
            for i in range(c.depth):
                x, _ = block(c, name=f"encoderblock_{i}")(x, train)
        return Norm(
            c.norm,
            c.use_bias,
            c.norm_eps,
            "embed",
            jnp.dtype(c.dtype),
            jnp.dtype(c.param_dtype),
            name="encoder_norm",
        )(x)


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding [1, h*w, width] (MoCo v3 / big_vision)."""
    y, x = np.mgrid[:h, :w]
    omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1 or 1))
    y = np.einsum("m,d->md", y.flatten(), omega)
    x = np.einsum("m,d->md", x.flatten(), omega)
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)[None].astype(
        np.float32
    )


class ViT(_Dtypes, nn.Module):
    """Patch embedding -> position embedding -> Encoder -> head (map | gap | token) -> logits.

    `apply(..., images [B, H, W, C], train)` returns `(logits, out)`; `out` holds "encoded",
    "pre_logits" and "logits". With `num_classes=0` the first element is the pre-logits.
    """

    config: ViTConfig

    @nn.compact
    def __call__(self, images, train: bool = False):
        c = self.config
        b, height, width, channels = images.shape
        p = c.patch_size
        if height != c.image_size or width != c.image_size:
            raise ValueError(
                f"ViT input images are {height}x{width} but config image_size={c.image_size}"
            )
        gh, gw = height // p, width // p
        x = images.astype(self.dtype).reshape(b, gh, p, gw, p, channels).transpose(0, 1, 3, 2, 4, 5)
        x = project(
            self,
            "embedding",
            x.reshape(b, gh * gw, p, p, channels),
            (p, p, channels, c.width),
            (None, None, None, "embed"),
            n_in=3,
            bias=True,
        )
        if c.posemb == "learn":
            x = x + param(
                self,
                "pos_embedding",
                nn.initializers.normal(1 / np.sqrt(c.width)),
                (1, gh * gw, c.width),
                (None, None, "embed"),
                self.param_dtype,
            ).astype(self.dtype)
        else:
            x = x + jnp.asarray(posemb_sincos_2d(gh, gw, c.width), self.dtype)
        if c.head == "token":
            cls = param(
                self,
                "cls",
                nn.initializers.zeros,
                (1, 1, c.width),
                (None, None, "embed"),
                self.param_dtype,
            )
            x = jnp.concatenate(
                [jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c.width)), x], axis=1
            )
        x = nn.Dropout(c.dropout, deterministic=not train)(x)
        x = Encoder(c, name="Transformer")(constrain(x, ACT), train)
        out = {"encoded": x}

        if c.head == "map":
            x = MAPHead(
                c.num_heads,
                c.mlp_dim,
                c.qk_norm,
                c.use_bias,
                c.norm,
                c.norm_eps,
                self.dtype,
                self.param_dtype,
                name="MAPHead_0",
            )(x)
        elif c.head == "gap":
            x = jnp.mean(x, axis=1)
        else:
            x = x[:, 0]
        if c.representation_size:
            x = jnp.tanh(
                project(
                    self,
                    "pre_logits",
                    x,
                    (c.width, c.representation_size),
                    ("embed", "mlp"),
                    bias=True,
                )
            )
        out["pre_logits"] = x
        if not c.num_classes:
            return x, out
        head_init = nn.initializers.zeros if c.head_zeroinit else fan_in_init(0)
        logits = project(
            self,
            "head",
            x,
            (x.shape[-1], c.num_classes),
            ("embed", "classes"),
            bias=True,
            init=head_init,
            bias_init=nn.initializers.constant(c.head_bias_init),
        ).astype(jnp.float32)
        out["logits"] = logits
        return logits, out


def make_config(variant: str, **overrides) -> ViTConfig:
    """A validated config from a variant string (or "custom" with every field given) + overrides.
    A `model.json` spec is read by `ViTConfig.from_spec` (stage exports: checkpoint.open_model)."""
    return ViTConfig.from_spec({"variant": variant, "overrides": overrides})


def build_model(variant: str, **overrides) -> ViT:
    """`build_model("B/16", num_classes=10)`: `ViT(make_config(variant, **overrides))`."""
    return ViT(make_config(variant, **overrides))


def abstract_params(cfg: ViTConfig, batch_size: int = 1):
    """Parameter shapes (boxed with logical names) via `jax.eval_shape`: nothing is allocated."""
    model = ViT(cfg)
    images = jax.ShapeDtypeStruct((batch_size, cfg.image_size, cfg.image_size, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x)["params"], images)


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(nn.unbox(params))))
