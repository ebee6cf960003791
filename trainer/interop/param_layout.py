"""Our ViT params in one canonical layout: unfused projections, one dict per layer (NumPy only).

The model stores the same math in several layouts (trainer/models/vit.py): scanned layers (params
stacked on a leading axis under `encoderblock`) or unrolled (`encoderblock_<i>`), and the parallel
block's fused kernels, laid out per head:

    in_kernel  [D, H, 3*hd + m]   head h's slot = [q_h | k_h | v_h | u_h],  m = mlp_dim / H
    in_bias    [H, m]             the MLP part only (or [H, 3*hd + m] with use_bias)
    out_kernel [H, hd + m, D]     head h's slot = [attn-out rows of head h | MLP-out rows h*m..]
    out_bias   [D]                one bias for the summed attention + MLP output

The canonical layout is what `fused=False, scan=False` builds: `query/key/value_kernel [D, H, hd]`,
`attn_out_kernel [H, hd, D]`, `mlp_in_kernel [D, M]`, `mlp_out_kernel [M, D]`, ...: MLP feature
`h*m + j` is slot j of head h. Both directions are pure slicing/concatenation, so a round trip is
bit-exact; the exporters (trainer/interop/timm_format.py, trainer/interop/npz_format.py) read and
write only this layout.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from trainer.models.config import ViTConfig

BLOCK_PREFIX = "encoderblock"


def canonical_config(cfg: ViTConfig) -> ViTConfig:
    """The config whose params tree is the canonical layout (same math as `cfg`)."""
    return dataclasses.replace(cfg, fused=False, scan=False, matmul="xla")


def _layers(tree: dict, cfg: ViTConfig) -> list[dict]:
    enc = tree["Transformer"]
    if cfg.scan:
        stacked = enc[BLOCK_PREFIX]
        return [_index(stacked, i) for i in range(cfg.depth)]
    return [enc[f"{BLOCK_PREFIX}_{i}"] for i in range(cfg.depth)]


def _index(tree, i):
    if isinstance(tree, dict):
        return {k: _index(v, i) for k, v in tree.items()}
    return np.asarray(tree)[i]


def _stack(layers: list):
    if isinstance(layers[0], dict):
        return {k: _stack([layer[k] for layer in layers]) for k in layers[0]}
    return np.stack([np.asarray(x) for x in layers])


def _unfuse_layer(p: dict, cfg: ViTConfig) -> dict:
    """One layer of `cfg`'s block (fused or not) -> its canonical (unfused) params."""
    if not cfg.fused:
        return {k: _np(v) for k, v in p.items()}
    hd, heads, d = cfg.head_dim, cfg.num_heads, cfg.width
    out = {
        k: _np(v)
        for k, v in p.items()
        if k not in ("in_kernel", "in_bias", "out_kernel", "out_bias", "qkv_kernel", "qkv_bias")
    }
    if cfg.block == "sequential":
        for i, name in enumerate(("query", "key", "value")):
            out[f"{name}_kernel"] = np.asarray(p["qkv_kernel"])[..., i * hd : (i + 1) * hd]
            if cfg.use_bias:
                out[f"{name}_bias"] = np.asarray(p["qkv_bias"])[..., i * hd : (i + 1) * hd]
        return out
    m = cfg.mlp_dim // heads
    w_in = np.asarray(p["in_kernel"])  # [D, H, 3hd + m]
    for i, name in enumerate(("query", "key", "value")):
        out[f"{name}_kernel"] = w_in[..., i * hd : (i + 1) * hd]
    out["mlp_in_kernel"] = w_in[..., 3 * hd :].reshape(d, heads * m)
    b_in = np.asarray(p["in_bias"])  # [H, m] or [H, 3hd + m]
    if cfg.use_bias:
        for i, name in enumerate(("query", "key", "value")):
            out[f"{name}_bias"] = b_in[:, i * hd : (i + 1) * hd]
    out["mlp_in_bias"] = b_in[:, -m:].reshape(heads * m)
    w_out = np.asarray(p["out_kernel"])  # [H, hd + m, D]
    out["attn_out_kernel"] = w_out[:, :hd]
    out["mlp_out_kernel"] = w_out[:, hd:].reshape(heads * m, d)
    # The fused block has one output bias; canonically it is the MLP's (the attention's is zero).
    out["mlp_out_bias"] = _np(p["out_bias"])
    if cfg.use_bias:
        out["attn_out_bias"] = np.zeros_like(out["mlp_out_bias"])
    return out


def _fuse_layer(c: dict, cfg: ViTConfig) -> dict:
    """Canonical params of one layer -> `cfg`'s block layout (inverse of `_unfuse_layer`)."""
    if not cfg.fused:
        return dict(c)
    heads, d = cfg.num_heads, cfg.width
    out = {
        k: v
        for k, v in c.items()
        if not k.startswith(("query_", "key_", "value_", "mlp_in_", "mlp_out_", "attn_out_"))
    }
    if cfg.block == "sequential":
        out.update(
            {k: v for k, v in c.items() if k.startswith(("mlp_in_", "mlp_out_", "attn_out_"))}
        )
        out["qkv_kernel"] = np.concatenate(
            [c["query_kernel"], c["key_kernel"], c["value_kernel"]], axis=-1
        )
        if cfg.use_bias:
            out["qkv_bias"] = np.concatenate(
                [c["query_bias"], c["key_bias"], c["value_bias"]], axis=-1
            )
        return out
    m = cfg.mlp_dim // heads
    u = c["mlp_in_kernel"].reshape(d, heads, m)
    out["in_kernel"] = np.concatenate(
        [c["query_kernel"], c["key_kernel"], c["value_kernel"], u], axis=-1
    )
    b_u = c["mlp_in_bias"].reshape(heads, m)
    out["in_bias"] = (
        np.concatenate([c["query_bias"], c["key_bias"], c["value_bias"], b_u], axis=-1)
        if cfg.use_bias
        else b_u
    )
    out["out_kernel"] = np.concatenate(
        [c["attn_out_kernel"], c["mlp_out_kernel"].reshape(heads, m, d)], axis=1
    )
    bias = c["mlp_out_bias"]
    attn_bias = c.get("attn_out_bias")
    if attn_bias is not None and np.any(
        attn_bias
    ):  # adding zeros would still be exact but for -0.0
        bias = bias + attn_bias
    out["out_bias"] = bias
    return out


def _np(x):
    if isinstance(x, dict):
        return {k: _np(v) for k, v in x.items()}
    return np.asarray(x)


def to_canonical(params: dict, cfg: ViTConfig) -> dict:
    """`cfg`'s params tree (scanned / fused or not) -> the canonical tree (NumPy)."""
    tree = {k: _np(v) for k, v in params.items() if k != "Transformer"}
    enc = {k: _np(v) for k, v in params["Transformer"].items() if not k.startswith(BLOCK_PREFIX)}
    for i, layer in enumerate(_layers(params, cfg)):
        enc[f"{BLOCK_PREFIX}_{i}"] = _unfuse_layer(layer, cfg)
    tree["Transformer"] = enc
    return tree


def from_canonical(canon: dict, cfg: ViTConfig) -> dict:
    """The canonical tree -> `cfg`'s params tree (inverse of `to_canonical`, bit-exact)."""
    tree = {k: v for k, v in canon.items() if k != "Transformer"}
    enc = {k: v for k, v in canon["Transformer"].items() if not k.startswith(BLOCK_PREFIX)}
    layers = [
        _fuse_layer(canon["Transformer"][f"{BLOCK_PREFIX}_{i}"], cfg) for i in range(cfg.depth)
    ]
    if cfg.scan:
        enc[BLOCK_PREFIX] = _stack(layers)
    else:
        enc.update({f"{BLOCK_PREFIX}_{i}": layer for i, layer in enumerate(layers)})
    tree["Transformer"] = enc
    return tree


def check_tree(got: dict, want: dict, source: str, path: str = "") -> None:
    """Same keys, shapes (and dtypes) as `want` (e.g. `nn.unbox(vit.abstract_params(cfg))`), or a
    ValueError naming the first mismatched parameter in `source`."""
    for key in sorted(set(want) | set(got)):
        name = f"{path}/{key}" if path else key
        if key not in got:
            raise ValueError(f"{source}: parameter {name} is missing (the model needs it)")
        if key not in want:
            raise ValueError(f"{source}: parameter {name} has no place in the model")
        if isinstance(want[key], dict) or isinstance(got[key], dict):
            if not (isinstance(want[key], dict) and isinstance(got[key], dict)):
                raise ValueError(
                    f"{source}: parameter {name} is a "
                    f"{'group' if isinstance(got[key], dict) else 'leaf'}"
                    " where the model has the other"
                )
            check_tree(got[key], want[key], source, name)
            continue
        if tuple(got[key].shape) != tuple(want[key].shape):
            raise ValueError(
                f"{source}: parameter {name} has shape {tuple(got[key].shape)}, the model "
                f"needs {tuple(want[key].shape)}"
            )
