"""Flat .npz checkpoints: our own documented names, and big_vision's ViT names (NumPy only).

Ours (`python -m trainer.interop.export --format npz`): one array per parameter of the canonical
layout (trainer/interop/param_layout.py: unrolled layers, unfused projections), named by its path
joined with "/":

    embedding_kernel [p, p, 3, D]   embedding_bias [D]   pos_embedding [1, N, D]   cls [1, 1, D]
    Transformer/encoderblock_<i>/{query,key,value}_kernel [D, H, hd]   ..._bias [H, hd]  (use_bias)
    Transformer/encoderblock_<i>/attn_out_kernel [H, hd, D]   attn_out_bias [D]
    Transformer/encoderblock_<i>/mlp_in_kernel [D, M]  mlp_in_bias [M]
    Transformer/encoderblock_<i>/mlp_out_kernel [M, D]  mlp_out_bias [D]
    Transformer/encoderblock_<i>/{norm (parallel) | norm1, norm2 (sequential)}/{scale, bias}
    Transformer/encoderblock_<i>/{q_norm,k_norm}/{scale, bias}   (qk_norm)
    Transformer/encoder_norm/{scale, bias}
    MAPHead_0/{probe, query_*, key_*, value_*, out_*, q_norm, k_norm, norm, mlp_in_*, mlp_out_*}
    pre_logits_kernel, pre_logits_bias, head_kernel [F, C], head_bias [C]
    model_json   the model.json text (a 0-d unicode array): the architecture, so nothing is guessed

MLP feature h*m + j of a parallel block is slot j of head h in the fused kernel (m = M / H).

big_vision (`--format big_vision`, and read by `init_params`): the names of big_vision's
models/vit.py (`embedding/kernel`, `pos_embedding`, `cls`,
`Transformer/encoderblock_<i>/LayerNorm_0`,
`MultiHeadDotProductAttention_0/{query,key,value,out}/{kernel,bias}`, `LayerNorm_1`,
`MlpBlock_0/Dense_{0,1}`, `Transformer/encoder_norm`, `MAPHead_0/...`, `pre_logits`, `head`);
scanned checkpoints (`Transformer/encoderblock/...` with a leading layer axis), a `params/` or
`opt/target/` prefix, and the original ViT names (`posembed_input/pos_embedding` with the class
token's position, `MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`) are read too. It
holds the classic block only: sequential, LayerNorm with biases, no QK-norm.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from trainer.interop import param_layout
from trainer.models.config import ViTConfig

MODEL_KEY = "model_json"


def flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "/"))
        else:
            out[name] = np.asarray(value)
    return out


def unflatten(flat: dict) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def save(path: Path, params: dict, cfg: ViTConfig) -> None:
    """Our documented flat names (module docstring) + the model.json text."""
    flat = flatten(param_layout.to_canonical(params, cfg))
    flat[MODEL_KEY] = np.array(json.dumps(cfg.to_json(), sort_keys=True))
    _write(path, flat)


def storable(x: np.ndarray) -> np.ndarray:
    """bfloat16 (ml_dtypes, unknown to .npz readers and safetensors.numpy) as float32: lossless."""
    return x.astype(np.float32) if x.dtype.name == "bfloat16" else x


def _write(path: Path, flat: dict) -> None:
    flat = {k: storable(v) for k, v in flat.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **flat)
    tmp.replace(path)


def load(path: Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such .npz file")
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def is_ours(flat: dict) -> bool:
    return "embedding_kernel" in flat


def from_ours(flat: dict, cfg: ViTConfig, source: str) -> dict:
    """Our flat npz -> `cfg`'s params tree; ValueError naming the first mismatched parameter."""
    flat = {k: v for k, v in flat.items() if k != MODEL_KEY}
    canon = unflatten(flat)
    want = param_layout.to_canonical(
        _zeros_like_abstract(param_layout.canonical_config(cfg)), param_layout.canonical_config(cfg)
    )
    param_layout.check_tree(canon, want, source)
    return param_layout.from_canonical(canon, cfg)


def _zeros_like_abstract(cfg: ViTConfig) -> dict:
    """Shape-only stand-ins for `cfg`'s params (numpy broadcasts: no memory per element)."""
    import flax.linen as nn
    import jax
    from trainer.models import vit

    abstract = nn.unbox(vit.abstract_params(cfg))
    return jax.tree_util.tree_map(
        lambda a: np.broadcast_to(np.zeros((), a.dtype), a.shape), abstract
    )


# --- big_vision ---------------------------------------------------------------------------------

_PREFIXES = ("params/img/", "params/", "opt/target/", "")


def is_big_vision(flat: dict) -> bool:
    return any(f"{p}embedding/kernel" in flat for p in _PREFIXES)


def to_big_vision(params: dict, cfg: ViTConfig) -> dict[str, np.ndarray]:
    """Our params -> big_vision's unscanned names (classic block only)."""
    _check_classic(cfg, "model")
    c = param_layout.to_canonical(params, cfg)
    out = {"embedding/kernel": c["embedding_kernel"], "embedding/bias": c["embedding_bias"]}
    for ours, theirs in (
        ("pos_embedding", "pos_embedding"),
        ("cls", "cls"),
        ("head_kernel", "head/kernel"),
        ("head_bias", "head/bias"),
        ("pre_logits_kernel", "pre_logits/kernel"),
        ("pre_logits_bias", "pre_logits/bias"),
    ):
        if ours in c:
            out[theirs] = c[ours]
    enc = c["Transformer"]
    for i in range(cfg.depth):
        out.update(
            _block_out(enc[f"{param_layout.BLOCK_PREFIX}_{i}"], f"Transformer/encoderblock_{i}/")
        )
    out.update(_norm_out(enc["encoder_norm"], "Transformer/encoder_norm/"))
    if "MAPHead_0" in c:
        h, b = c["MAPHead_0"], "MAPHead_0/"
        out[b + "probe"] = h["probe"]
        out.update(_mha_out(h, b + "MultiHeadDotProductAttention_0/", "out"))
        out.update(_norm_out(h["norm"], b + "LayerNorm_0/"))
        out.update(_mlp_out(h, b + "MlpBlock_0/"))
    return out


def save_big_vision(path: Path, params: dict, cfg: ViTConfig) -> None:
    _write(path, to_big_vision(params, cfg))


def _norm_out(p, prefix):
    return {prefix + "scale": p["scale"], prefix + "bias": p["bias"]}


def _mha_out(p, prefix, out_name):
    out = {}
    for name in ("query", "key", "value"):
        out[f"{prefix}{name}/kernel"], out[f"{prefix}{name}/bias"] = (
            p[f"{name}_kernel"],
            p[f"{name}_bias"],
        )
    out[prefix + "out/kernel"], out[prefix + "out/bias"] = (
        p[f"{out_name}_kernel"],
        p[f"{out_name}_bias"],
    )
    return out


def _mlp_out(p, prefix):
    return {
        prefix + "Dense_0/kernel": p["mlp_in_kernel"],
        prefix + "Dense_0/bias": p["mlp_in_bias"],
        prefix + "Dense_1/kernel": p["mlp_out_kernel"],
        prefix + "Dense_1/bias": p["mlp_out_bias"],
    }


def _block_out(p, prefix):
    out = _norm_out(p["norm1"], prefix + "LayerNorm_0/")
    out.update(_mha_out(p, prefix + "MultiHeadDotProductAttention_0/", "attn_out"))
    out.update(_norm_out(p["norm2"], prefix + "LayerNorm_1/"))
    out.update(_mlp_out(p, prefix + "MlpBlock_0/"))
    return out


def _check_classic(cfg: ViTConfig, where: str) -> None:
    for field, want in (
        ("block", "sequential"),
        ("norm", "layernorm"),
        ("use_bias", True),
        ("qk_norm", False),
    ):
        if getattr(cfg, field) != want:
            raise ValueError(
                f"{where}.{field}={getattr(cfg, field)!r}: big_vision ViT checkpoints hold the "
                f"classic block only ({field}={want!r})"
            )


def from_big_vision(flat: dict, cfg: ViTConfig, source: str) -> dict:
    """A big_vision ViT npz -> `cfg`'s params tree; ValueError naming the first mismatched
    parameter."""
    _check_classic(cfg, f"{source}: the model's")
    prefix = next(p for p in _PREFIXES if f"{p}embedding/kernel" in flat)
    w = {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
    scanned = "Transformer/encoderblock/LayerNorm_0/scale" in w
    original = "Transformer/posembed_input/pos_embedding" in w  # google-research/vision_transformer
    mha, ln2, mlp = (
        ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
        if original
        else ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
    )
    used: set[str] = set()

    def get(name, index=None):
        if name not in w:
            raise ValueError(f"{source}: parameter {prefix}{name} is missing (the model needs it)")
        used.add(name)
        return np.asarray(w[name]) if index is None else np.asarray(w[name])[index]

    c = {"embedding_kernel": get("embedding/kernel"), "embedding_bias": get("embedding/bias")}
    if original:
        pos = get("Transformer/posembed_input/pos_embedding")
        if cfg.head == "token" and pos.shape[1] == cfg.num_patches + 1:
            # The original ViT adds a position to the class token; ours has none: fold it into cls.
            c["cls"] = get("cls") + pos[:, :1]
            pos = pos[:, 1:]
        c["pos_embedding"] = pos
    elif "pos_embedding" in w:
        c["pos_embedding"] = get("pos_embedding")
    if cfg.head == "token" and "cls" not in c:
        c["cls"] = get("cls")
    enc: dict = {}
    for i in range(cfg.depth):
        base, idx = (
            ("Transformer/encoderblock/", i)
            if scanned
            else (f"Transformer/encoderblock_{i}/", None)
        )
        layer = {
            "norm1": _norm_in(get, base + "LayerNorm_0/", idx),
            "norm2": _norm_in(get, base + ln2 + "/", idx),
        }
        layer.update(_mha_in(get, base + mha + "/", "attn_out", idx))
        layer.update(_mlp_in(get, base + mlp + "/", idx))
        enc[f"{param_layout.BLOCK_PREFIX}_{i}"] = layer
    enc["encoder_norm"] = _norm_in(get, "Transformer/encoder_norm/", None)
    c["Transformer"] = enc
    if cfg.head == "map":
        b = "MAPHead_0/"
        h = {"probe": get(b + "probe"), "norm": _norm_in(get, b + "LayerNorm_0/", None)}
        h.update(_mha_in(get, b + "MultiHeadDotProductAttention_0/", "out", None))
        h.update(_mlp_in(get, b + "MlpBlock_0/", None))
        c["MAPHead_0"] = h
    if cfg.representation_size:
        c["pre_logits_kernel"], c["pre_logits_bias"] = (
            get("pre_logits/kernel"),
            get("pre_logits/bias"),
        )
    if cfg.num_classes:
        c["head_kernel"], c["head_bias"] = get("head/kernel"), get("head/bias")
    unused = sorted(set(w) - used)
    if unused and not (scanned and all(n.startswith("Transformer/encoderblock/") for n in unused)):
        raise ValueError(f"{source}: parameter {prefix}{unused[0]} has no place in the model")
    canonical = param_layout.canonical_config(cfg)
    want = param_layout.to_canonical(_zeros_like_abstract(canonical), canonical)
    param_layout.check_tree(c, want, source)
    return param_layout.from_canonical(c, cfg)


def _norm_in(get, prefix, idx):
    return {"scale": get(prefix + "scale", idx), "bias": get(prefix + "bias", idx)}


def _mha_in(get, prefix, out_name, idx):
    out = {}
    for name in ("query", "key", "value"):
        out[f"{name}_kernel"], out[f"{name}_bias"] = (
            get(f"{prefix}{name}/kernel", idx),
            get(f"{prefix}{name}/bias", idx),
        )
    out[f"{out_name}_kernel"], out[f"{out_name}_bias"] = (
        get(prefix + "out/kernel", idx),
        get(prefix + "out/bias", idx),
    )
    return out


def _mlp_in(get, prefix, idx):
    return {
        "mlp_in_kernel": get(prefix + "Dense_0/kernel", idx),
        "mlp_in_bias": get(prefix + "Dense_0/bias", idx),
        "mlp_out_kernel": get(prefix + "Dense_1/kernel", idx),
        "mlp_out_bias": get(prefix + "Dense_1/bias", idx),
    }


def source_shape(flat: dict, cfg: ViTConfig):
    """`cfg` at the checkpoint's own image size and classes (see timm_format.source_shape)."""
    import dataclasses
    import math

    prefix = next((p for p in _PREFIXES if f"{p}embedding/kernel" in flat), "")
    pos = next(
        (
            flat[k]
            for k in (
                f"{prefix}pos_embedding",
                f"{prefix}Transformer/posembed_input/pos_embedding",
                "pos_embedding",
            )
            if k in flat
        ),
        None,
    )
    n = cfg.num_patches if pos is None else pos.shape[1]
    grid = int(round(math.sqrt(n)))
    if (
        grid * grid != n and math.isqrt(n - 1) ** 2 == n - 1
    ):  # the original ViT's class-token position
        grid = math.isqrt(n - 1)
    head = next((flat[k] for k in (f"{prefix}head/bias", "head_bias") if k in flat), None)
    return dataclasses.replace(
        cfg, image_size=grid * cfg.patch_size, num_classes=0 if head is None else int(head.shape[0])
    )
