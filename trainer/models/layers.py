"""Building blocks shared by the ViT blocks and heads.

Parameters carry logical axis names; activations are constrained with logical names prefixed
"act_" so that one rules table (trainer/sharding.py) can shard parameters FSDP-style on `data` while
activations keep their batch on `data` (the same dimension cannot use one mesh axis twice).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


# lecun_normal with fan_in over the named input axes; used for every projection so that a fused
# kernel and its separate parts have the same initial distribution.
def fan_in_init(in_axis) -> Callable:
    return nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=-1
    )


def concat_init(inits: Sequence[Callable], sizes: Sequence[int], axis: int) -> Callable:
    """Initializes a fused kernel part by part (each with its own fan), concatenated along
    `axis`."""

    def init(key, shape, dtype=jnp.float32):
        keys = jax.random.split(key, len(inits))
        parts = []
        for k, fn, size in zip(keys, inits, sizes):
            part_shape = list(shape)
            part_shape[axis] = size
            parts.append(fn(k, tuple(part_shape), dtype))
        return jnp.concatenate(parts, axis=axis)

    return init


def param(
    module: nn.Module,
    name: str,
    init: Callable,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype,
) -> jax.Array:
    """A parameter boxed with its logical axis names."""
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


def project(
    module: nn.Module,
    name: str,
    x: jax.Array,
    shape: Sequence[int],
    axes: Sequence[str | None],
    *,
    n_in: int = 1,
    bias: bool = False,
    init: Callable | None = None,
    bias_init: Callable = nn.initializers.zeros,
    matmul: Callable | None = None,
) -> jax.Array:
    """x[..., *in] @ kernel[*in, *out] (+ bias[*out]), contracting x's last `n_in` dims.

    Parameters `<name>_kernel` (stored in `module.param_dtype`, cast to `module.dtype` for the
    matmul) and `<name>_bias`. `matmul(x, kernel)` replaces the tensordot (e.g. a collective
    matmul from trainer/collective.py); the parameters stay the same.
    """
    init = init or fan_in_init(tuple(range(n_in)))
    kernel = param(module, name + "_kernel", init, shape, axes, module.param_dtype).astype(
        module.dtype
    )
    x = x.astype(module.dtype)
    y = matmul(x, kernel) if matmul else jnp.tensordot(x, kernel, axes=n_in)
    if bias:
        b = param(module, name + "_bias", bias_init, shape[n_in:], axes[n_in:], module.param_dtype)
        y = y + b.astype(module.dtype)
    return y


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside a mesh + rules context."""
    return nn.with_logical_constraint(x, tuple(axes))


class Norm(nn.Module):
    """LayerNorm ("layernorm": centred) or RMSNorm ("rmsnorm": no centring), over the last axis.

    Statistics are computed in float32. `use_bias=False` drops the additive bias (ViT-22B).
    """

    kind: str = "rmsnorm"
    use_bias: bool = False
    eps: float = 1e-6
    axis_name: str | None = "embed"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        y = x.astype(jnp.float32)
        if self.kind == "layernorm":
            y = y - jnp.mean(y, axis=-1, keepdims=True)
        y = y * jax.lax.rsqrt(jnp.mean(jnp.square(y), axis=-1, keepdims=True) + self.eps)
        y = y * param(
            self, "scale", nn.initializers.ones, (features,), (self.axis_name,), self.param_dtype
        )
        if self.use_bias:
            y = y + param(
                self,
                "bias",
                nn.initializers.zeros,
                (features,),
                (self.axis_name,),
                self.param_dtype,
            )
        return y.astype(self.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, stats: bool = False):
    """Softmax dot-product attention. q: [b, t, h, d]; k, v: [b, s, h, d] -> [b, t, h, d].

    Logits and softmax in float32 (bf16 logits lose the small differences that matter).
    stats=True also returns `{"attn_logit_max": max logit [], "attn_entropy": [h] mean entropy
    (nats) of each head's attention rows}`, without gradient: the QK-norm instability shows as
    logits growing by orders of magnitude and entropy collapsing (Dehghani et al. 2023, §2).
    """
    q = q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
    logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhts,bshd->bthd", weights, v)
    if not stats:
        return out
    logits = jax.lax.stop_gradient(logits)
    logp = jax.nn.log_softmax(logits, axis=-1)
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)  # [b, h, t]
    return out, {"attn_logit_max": jnp.max(logits), "attn_entropy": jnp.mean(entropy, axis=(0, 2))}


def attention_summary(intermediates) -> dict[str, jax.Array]:
    """Scalars to log from the sown attention stats of every layer (any nesting, scanned or not):
    the max logit over layers, the min and mean over layers x heads of the mean row entropy."""
    found = {"attn_logit_max": [], "attn_entropy": []}
    for path, leaf in jax.tree_util.tree_leaves_with_path(intermediates):
        names = [getattr(p, "key", None) for p in path]
        for name, values in found.items():
            if name in names:
                values.append(jnp.ravel(leaf))
    if not found["attn_logit_max"]:
        raise ValueError(
            "attention_summary: no sown attention stats (is the model's attn_stats on?)"
        )
    entropy = jnp.concatenate(found["attn_entropy"])
    return {
        "attn_logit_max": jnp.max(jnp.concatenate(found["attn_logit_max"])),
        "attn_entropy_min": jnp.min(entropy),
        "attn_entropy_mean": jnp.mean(entropy),
    }


def gelu(x: jax.Array) -> jax.Array:
    return nn.gelu(x, approximate=False)


class MAPHead(nn.Module):
    """Multi-head attention pooling: a learned probe attends over the tokens, then an MLP."""

    num_heads: int
    mlp_dim: int
    qk_norm: bool
    use_bias: bool
    norm: str
    norm_eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, _, d = x.shape
        h, hd = self.num_heads, d // self.num_heads
        probe = param(
            self,
            "probe",
            nn.initializers.xavier_uniform(),
            (1, 1, d),
            (None, None, "embed"),
            self.param_dtype,
        )
        probe = jnp.broadcast_to(probe.astype(self.dtype), (b, 1, d))
        qkv = dict(shape=(d, h, hd), axes=("embed", "heads", "kv"), bias=self.use_bias)
        q = project(self, "query", probe, **qkv)
        k = project(self, "key", x, **qkv)
        v = project(self, "value", x, **qkv)
        if self.qk_norm:
            q = self._norm("q_norm", "kv")(q)
            k = self._norm("k_norm", "kv")(k)
        y = project(
            self,
            "out",
            attention(q, k, v),
            (h, hd, d),
            ("heads", "kv", "embed"),
            n_in=2,
            bias=self.use_bias,
        )
        z = self._norm("norm", "embed")(y)
        z = gelu(project(self, "mlp_in", z, (d, self.mlp_dim), ("embed", "mlp"), bias=True))
        y = y + project(self, "mlp_out", z, (self.mlp_dim, d), ("mlp", "embed"), bias=True)
        return y[:, 0]

    def _norm(self, name: str, axis_name: str) -> Norm:
        return Norm(
            self.norm,
            self.use_bias,
            self.norm_eps,
            axis_name,
            self.dtype,
            self.param_dtype,
            name=name,
        )
