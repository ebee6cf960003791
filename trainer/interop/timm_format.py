"""Our ViT <-> timm's `vision_transformer.VisionTransformer` (state dict + config.json), NumPy only.

The mapping (timm 1.0.31, checked by tests/test_export.py against timm itself):

    ours                                   timm
    block="parallel"                       architecture vit_base_patch16_xp_224
                                           (ParallelScalingBlock, qk_norm, no_embed_class), every
                                           size overridden by model_args
    block="sequential"                     architecture vit_base_patch16_224 (Block)
    norm="rmsnorm" | "layernorm"           norm_layer "rmsnorm" | "layernorm"; a bias-free
                                           LayerNorm is timm's LayerNorm with zero bias (timm has
                                           no bias-free one)
    use_bias=False                         qkv_bias=False; attention / MAP biases written as zeros
    embedding_kernel [p, p, C, D]          patch_embed.proj.weight [D, C, p, p]
    pos_embedding (sincos: its table)      pos_embed [1, N, D]
                                           (no_embed_class=True: not on the cls)
    cls                                    cls_token (head="token", global_pool "token")
    parallel in_kernel (canonical q,k,v,u) blocks.i.in_proj.weight rows
                                           [u (M) | q (D) | k (D) | v (D)], q/k/v columns of head h
                                           at h*hd.., u feature h*m + j
    in_bias (MLP part)                     blocks.i.mlp_bias (qkv_bias=False) or in_proj.bias
    out_kernel [H, hd+m, D], out_bias      attn_out_proj.weight / mlp_out_proj.weight; the one bias
                                           goes to mlp_out_proj.bias, attn_out_proj.bias = 0
                                           (VisionTransformer builds ParallelScalingBlock without
                                           fuse_out_proj, so its out-projection is two Linears
                                           whose outputs are summed)
    head="map" (qk_norm=False)             attn_pool (AttentionPoolLatent: q, kv, proj, norm, mlp)
    head="gap"                             global_pool "avg" with fc_norm=False (norm, then mean)
    head_kernel [F, C]                     head.weight [C, F]

Not representable in timm's VisionTransformer, so exported as the encoder alone (num_classes=0,
global_pool '', "head_exported": false in config.json and a note): a MAP head with QK-norm (timm's
attention pool has none), a `representation_size` pre-logits layer. An RMSNorm with a bias or a
norm_eps other than 1e-6 cannot be written at all (a ValueError naming the field).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from trainer.interop import param_layout
from trainer.models.config import ViTConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
_ARCH = {"parallel": "vit_base_patch16_xp_224", "sequential": "vit_base_patch16_224"}


def head_maps(cfg: ViTConfig) -> tuple[bool, str]:
    """(whether timm can hold the model's head, why not)."""
    if not cfg.num_classes and cfg.head != "map":
        return True, ""
    if cfg.representation_size:
        return False, "timm's VisionTransformer has no representation_size (pre-logits) layer"
    if cfg.head == "map" and cfg.qk_norm:
        return False, "timm's MAP head (AttentionPoolLatent in VisionTransformer) has no QK-norm"
    return True, ""


def model_args(cfg: ViTConfig) -> tuple[str, dict, bool, str]:
    """(architecture, timm model_args, head exported, note) for `cfg`; ValueError if impossible."""
    if cfg.norm == "rmsnorm" and cfg.use_bias:
        raise ValueError("model.norm='rmsnorm' with use_bias=True: timm's RmsNorm has no bias")
    if cfg.norm_eps != 1e-6:
        raise ValueError(f"model.norm_eps={cfg.norm_eps}: timm's norms are built with eps 1e-6")
    ratio = cfg.mlp_dim / cfg.width
    if int(ratio * cfg.width) != cfg.mlp_dim:
        raise ValueError(
            f"model.mlp_dim={cfg.mlp_dim} is not int(mlp_ratio * width) for any float ratio"
        )
    with_head, why = head_maps(cfg)
    pool = {"map": "map", "gap": "avg", "token": "token"}[cfg.head]
    args = dict(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.width,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=ratio,
        qkv_bias=cfg.use_bias,
        qk_norm=cfg.qk_norm,
        proj_bias=True,
        norm_layer=cfg.norm,
        class_token=cfg.head == "token",
        no_embed_class=True,
        reg_tokens=0,
        pre_norm=False,
        final_norm=True,
        fc_norm=False,
        num_classes=cfg.num_classes if with_head else 0,
        global_pool=pool if with_head else "",
    )
    note = (
        "" if with_head else f"encoder only: {why}; compare forward_features (the encoder's output)"
    )
    return _ARCH[cfg.block], args, with_head, note


def config_json(cfg: ViTConfig) -> dict:
    """timm's Hugging Face Hub config (what `timm.create_model('local-dir:DIR')` reads)."""
    arch, args, with_head, note = model_args(cfg)
    size = [3, cfg.image_size, cfg.image_size]
    return {
        "architecture": arch,
        "num_classes": args["num_classes"],
        "num_features": cfg.width,
        "global_pool": args["global_pool"],
        "model_args": args,
        # Our loaders map pixels to [-1, 1]: x / 127.5 - 1 == (x / 255 - 0.5) / 0.5.
        "pretrained_cfg": {
            "input_size": size,
            "fixed_input_size": True,
            "interpolation": "bilinear",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
            "num_classes": args["num_classes"],
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
        "head_exported": with_head,
        "note": note,
        "vit22b_model": cfg.to_json(),
    }


def _linear(w: np.ndarray, n_in: int = 1) -> np.ndarray:
    """Our kernel [in (n_in dims)..., out...] flattened to torch Linear's [out, in]."""
    return np.ascontiguousarray(w.reshape(int(np.prod(w.shape[:n_in])), -1).T)


def _norm(prefix: str, p: dict, cfg: ViTConfig) -> dict:
    out = {f"{prefix}.weight": p["scale"]}
    if cfg.norm == "layernorm":
        out[f"{prefix}.bias"] = p.get("bias", np.zeros_like(p["scale"]))
    return out


def _zeros_or(p: dict, key: str, n: int, like: np.ndarray) -> np.ndarray:
    return p[key].reshape(-1) if key in p else np.zeros((n,), like.dtype)


def _mha_in(p: dict, names=("query", "key", "value")) -> list[np.ndarray]:
    return [_linear(p[f"{n}_kernel"]) for n in names]


def to_timm(params: dict, cfg: ViTConfig) -> dict[str, np.ndarray]:
    """Our params (any layout) -> timm state dict (NumPy arrays, timm's names and layouts)."""
    _, args, with_head, _ = model_args(cfg)
    c = param_layout.to_canonical(params, cfg)
    d = cfg.width
    sd = {
        "patch_embed.proj.weight": np.ascontiguousarray(
            c["embedding_kernel"].transpose(3, 2, 0, 1)
        ),
        "patch_embed.proj.bias": c["embedding_bias"],
    }
    if cfg.posemb == "learn":
        sd["pos_embed"] = c["pos_embedding"]
    else:
        from trainer.models.vit import posemb_sincos_2d

        g = cfg.image_size // cfg.patch_size
        sd["pos_embed"] = posemb_sincos_2d(g, g, d).astype(c["embedding_bias"].dtype)
    if cfg.head == "token":
        sd["cls_token"] = c["cls"]
    enc = c["Transformer"]
    for i in range(cfg.depth):
        p, b = enc[f"{param_layout.BLOCK_PREFIX}_{i}"], f"blocks.{i}."
        like = p["mlp_in_bias"]
        qkv_b = [_zeros_or(p, f"{n}_bias", d, like) for n in ("query", "key", "value")]
        if cfg.block == "parallel":
            sd.update(_norm(b + "in_norm", p["norm"], cfg))
            sd[b + "in_proj.weight"] = np.concatenate([_linear(p["mlp_in_kernel"])] + _mha_in(p))
            if cfg.use_bias:
                sd[b + "in_proj.bias"] = np.concatenate([p["mlp_in_bias"]] + qkv_b)
            else:
                sd[b + "mlp_bias"] = p["mlp_in_bias"]
            if cfg.qk_norm:
                sd.update(_norm(b + "q_norm", p["q_norm"], cfg))
                sd.update(_norm(b + "k_norm", p["k_norm"], cfg))
            sd[b + "attn_out_proj.weight"] = _linear(p["attn_out_kernel"], 2)
            sd[b + "attn_out_proj.bias"] = _zeros_or(p, "attn_out_bias", d, like)
            sd[b + "mlp_out_proj.weight"] = _linear(p["mlp_out_kernel"])
            sd[b + "mlp_out_proj.bias"] = p["mlp_out_bias"]
        else:
            sd.update(_norm(b + "norm1", p["norm1"], cfg))
            sd[b + "attn.qkv.weight"] = np.concatenate(_mha_in(p))
            if cfg.use_bias:
                sd[b + "attn.qkv.bias"] = np.concatenate(qkv_b)
            if cfg.qk_norm:
                sd.update(_norm(b + "attn.q_norm", p["q_norm"], cfg))
                sd.update(_norm(b + "attn.k_norm", p["k_norm"], cfg))
            sd[b + "attn.proj.weight"] = _linear(p["attn_out_kernel"], 2)
            sd[b + "attn.proj.bias"] = _zeros_or(p, "attn_out_bias", d, like)
            sd.update(_norm(b + "norm2", p["norm2"], cfg))
            sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"] = (
                _linear(p["mlp_in_kernel"]),
                p["mlp_in_bias"],
            )
            sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"] = (
                _linear(p["mlp_out_kernel"]),
                p["mlp_out_bias"],
            )
    sd.update(_norm("norm", enc["encoder_norm"], cfg))
    if with_head and cfg.head == "map":
        h, a = c["MAPHead_0"], "attn_pool."
        like = h["mlp_in_bias"]
        sd[a + "latent"] = h["probe"]
        sd[a + "q.weight"], sd[a + "q.bias"] = (
            _linear(h["query_kernel"]),
            _zeros_or(h, "query_bias", d, like),
        )
        sd[a + "kv.weight"] = np.concatenate(_mha_in(h, ("key", "value")))
        sd[a + "kv.bias"] = np.concatenate(
            [_zeros_or(h, f"{n}_bias", d, like) for n in ("key", "value")]
        )
        sd[a + "proj.weight"], sd[a + "proj.bias"] = (
            _linear(h["out_kernel"], 2),
            _zeros_or(h, "out_bias", d, like),
        )
        sd.update(_norm(a + "norm", h["norm"], cfg))
        sd[a + "mlp.fc1.weight"], sd[a + "mlp.fc1.bias"] = (
            _linear(h["mlp_in_kernel"]),
            h["mlp_in_bias"],
        )
        sd[a + "mlp.fc2.weight"], sd[a + "mlp.fc2.bias"] = (
            _linear(h["mlp_out_kernel"]),
            h["mlp_out_bias"],
        )
    if with_head and cfg.num_classes:
        sd["head.weight"], sd["head.bias"] = _linear(c["head_kernel"]), c["head_bias"]
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}


class _Reader:
    """Takes tensors out of a timm state dict by name; names the first missing / unused one."""

    def __init__(self, sd: dict, source: str):
        self.sd, self.source, self.used = sd, source, set()

    def has(self, key: str) -> bool:
        return key in self.sd

    def get(self, key: str, shape: tuple | None = None) -> np.ndarray:
        if key not in self.sd:
            raise ValueError(f"{self.source}: parameter {key} is missing (the model needs it)")
        self.used.add(key)
        x = np.asarray(self.sd[key])
        if shape is not None and tuple(x.shape) != tuple(shape):
            raise ValueError(
                f"{self.source}: parameter {key} has shape {tuple(x.shape)}, the model needs "
                f"{tuple(shape)}"
            )
        return x

    def zero(self, key: str, what: str) -> None:
        """A timm tensor our model has no place for: only zeros carry over exactly."""
        if key in self.sd:
            self.used.add(key)
            if np.any(np.asarray(self.sd[key])):
                raise ValueError(
                    f"{self.source}: parameter {key} is non-zero but the model has no {what}"
                )

    def check_all_used(self) -> None:
        unused = sorted(set(self.sd) - self.used)
        if unused:
            raise ValueError(f"{self.source}: parameter {unused[0]} has no place in the model")


def _unlinear(w: np.ndarray, shape: tuple) -> np.ndarray:
    """torch Linear [out, in] -> our kernel of `shape` ([in..., out...])."""
    return np.ascontiguousarray(w.T).reshape(shape)


def from_timm(sd: dict, cfg: ViTConfig, source: str = "timm state dict") -> dict:
    """timm state dict -> our params tree for `cfg` (any layout). ValueError naming the first
    parameter that is missing, of the wrong shape, unused, or not representable in `cfg`."""
    r = _Reader(sd, source)
    d, heads, hd, mlp = cfg.width, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
    p = cfg.patch_size

    def norm(prefix: str, n: int) -> dict:
        out = {"scale": r.get(prefix + ".weight", (n,))}
        if cfg.use_bias:
            out["bias"] = r.get(prefix + ".bias", (n,))
        else:
            r.zero(prefix + ".bias", f"norm bias (model.use_bias=False) at {prefix}")
        return out

    def bias(key: str, shape: tuple, what: str) -> dict:
        if cfg.use_bias:
            return (
                {what: r.get(key).reshape(shape)}
                if r.has(key)
                else {what: np.zeros(shape, np.float32)}
            )
        r.zero(key, f"{what} (model.use_bias=False)")
        return {}

    def split_qkv(w: np.ndarray, names=("query", "key", "value")) -> dict:
        return {
            f"{n}_kernel": _unlinear(w[i * d : (i + 1) * d], (d, heads, hd))
            for i, n in enumerate(names)
        }

    c: dict = {
        "embedding_kernel": r.get("patch_embed.proj.weight", (d, 3, p, p)).transpose(2, 3, 1, 0),
        "embedding_bias": r.get("patch_embed.proj.bias", (d,)),
    }
    n = cfg.num_patches
    if cfg.posemb == "learn":
        c["pos_embedding"] = r.get("pos_embed", (1, n, d))
    elif r.has("pos_embed"):
        from trainer.models.vit import posemb_sincos_2d

        g = cfg.image_size // p
        if not np.allclose(r.get("pos_embed", (1, n, d)), posemb_sincos_2d(g, g, d), atol=1e-6):
            raise ValueError(
                f"{source}: parameter pos_embed is learned but model.posemb='sincos2d'"
            )
    if cfg.head == "token":
        c["cls"] = r.get("cls_token", (1, 1, d))
    enc: dict = {}
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        layer: dict = {}
        if cfg.block == "parallel":
            layer["norm"] = norm(b + "in_norm", d)
            w_in = r.get(b + "in_proj.weight", (mlp + 3 * d, d))
            layer["mlp_in_kernel"] = _unlinear(w_in[:mlp], (d, mlp))
            layer.update(split_qkv(w_in[mlp:]))
            if r.has(b + "in_proj.bias"):
                b_in = r.get(b + "in_proj.bias", (mlp + 3 * d,))
                layer["mlp_in_bias"] = b_in[:mlp]
                for j, name in enumerate(("query", "key", "value")):
                    part = b_in[mlp + j * d : mlp + (j + 1) * d]
                    if cfg.use_bias:
                        layer[f"{name}_bias"] = part.reshape(heads, hd)
                    elif np.any(part):
                        raise ValueError(
                            f"{source}: parameter {b}in_proj.bias has a non-zero {name} part but "
                            "the model has no QKV bias (model.use_bias=False)"
                        )
            else:
                layer["mlp_in_bias"] = r.get(b + "mlp_bias", (mlp,))
                if cfg.use_bias:
                    layer.update(
                        {
                            f"{n_}_bias": np.zeros((heads, hd), np.float32)
                            for n_ in ("query", "key", "value")
                        }
                    )
            attn_w, mlp_w = b + "attn_out_proj.weight", b + "mlp_out_proj.weight"
            if r.has(
                b + "out_proj.weight"
            ):  # timm's fuse_out_proj=True block: [attn | mlp] columns
                w_out = r.get(b + "out_proj.weight", (d, d + mlp))
                layer["attn_out_kernel"] = _unlinear(w_out[:, :d], (heads, hd, d))
                layer["mlp_out_kernel"] = _unlinear(w_out[:, d:], (mlp, d))
                layer["mlp_out_bias"] = r.get(b + "out_proj.bias", (d,))
                attn_b = np.zeros((d,), np.float32)
            else:
                layer["attn_out_kernel"] = _unlinear(r.get(attn_w, (d, d)), (heads, hd, d))
                layer["mlp_out_kernel"] = _unlinear(r.get(mlp_w, (d, mlp)), (mlp, d))
                layer["mlp_out_bias"] = r.get(b + "mlp_out_proj.bias", (d,))
                attn_b = r.get(b + "attn_out_proj.bias", (d,))
            if cfg.use_bias:
                layer["attn_out_bias"] = attn_b
            elif np.any(
                attn_b
            ):  # the two projections' biases are summed: keep the sum in the MLP's
                layer["mlp_out_bias"] = layer["mlp_out_bias"] + attn_b
            qn = ("q_norm", "k_norm")
        else:
            layer["norm1"] = norm(b + "norm1", d)
            layer.update(split_qkv(r.get(b + "attn.qkv.weight", (3 * d, d))))
            for j, name in enumerate(("query", "key", "value")):
                if cfg.use_bias and not r.has(b + "attn.qkv.bias"):
                    layer[f"{name}_bias"] = np.zeros((heads, hd), np.float32)
            if r.has(b + "attn.qkv.bias"):
                b_qkv = r.get(b + "attn.qkv.bias", (3 * d,))
                for j, name in enumerate(("query", "key", "value")):
                    if cfg.use_bias:
                        layer[f"{name}_bias"] = b_qkv[j * d : (j + 1) * d].reshape(heads, hd)
                    elif np.any(b_qkv):
                        raise ValueError(
                            f"{source}: parameter {b}attn.qkv.bias is non-zero but the model has "
                            "no QKV bias (model.use_bias=False)"
                        )
            layer["attn_out_kernel"] = _unlinear(
                r.get(b + "attn.proj.weight", (d, d)), (heads, hd, d)
            )
            layer.update(bias(b + "attn.proj.bias", (d,), "attn_out_bias"))
            layer["norm2"] = norm(b + "norm2", d)
            layer["mlp_in_kernel"] = _unlinear(r.get(b + "mlp.fc1.weight", (mlp, d)), (d, mlp))
            layer["mlp_in_bias"] = r.get(b + "mlp.fc1.bias", (mlp,))
            layer["mlp_out_kernel"] = _unlinear(r.get(b + "mlp.fc2.weight", (d, mlp)), (mlp, d))
            layer["mlp_out_bias"] = r.get(b + "mlp.fc2.bias", (d,))
            qn = ("attn.q_norm", "attn.k_norm")
        if cfg.qk_norm:
            layer["q_norm"], layer["k_norm"] = norm(b + qn[0], hd), norm(b + qn[1], hd)
        enc[f"{param_layout.BLOCK_PREFIX}_{i}"] = layer
    enc["encoder_norm"] = norm("norm", d)
    c["Transformer"] = enc
    if cfg.head == "map":
        a = "attn_pool."
        h: dict = {
            "probe": r.get(a + "latent", (1, 1, d)),
            "query_kernel": _unlinear(r.get(a + "q.weight", (d, d)), (d, heads, hd)),
        }
        h.update(bias(a + "q.bias", (heads, hd), "query_bias"))
        kv = r.get(a + "kv.weight", (2 * d, d))
        h.update(split_qkv(kv, ("key", "value")))
        if r.has(a + "kv.bias"):
            kv_b = r.get(a + "kv.bias", (2 * d,))
            if cfg.use_bias:
                h["key_bias"], h["value_bias"] = (
                    kv_b[:d].reshape(heads, hd),
                    kv_b[d:].reshape(heads, hd),
                )
            elif np.any(kv_b):
                raise ValueError(
                    f"{source}: parameter {a}kv.bias is non-zero but the model's MAP head has no "
                    "bias (model.use_bias=False)"
                )
        h["out_kernel"] = _unlinear(r.get(a + "proj.weight", (d, d)), (heads, hd, d))
        h.update(bias(a + "proj.bias", (d,), "out_bias"))
        if cfg.qk_norm:
            raise ValueError(
                f"{source}: parameter {a}q_norm is missing: the model's MAP head has QK-norm "
                "(model.qk_norm=True) and timm's attention pool has none"
            )
        h["norm"] = norm(a + "norm", d)
        h["mlp_in_kernel"] = _unlinear(r.get(a + "mlp.fc1.weight", (mlp, d)), (d, mlp))
        h["mlp_in_bias"] = r.get(a + "mlp.fc1.bias", (mlp,))
        h["mlp_out_kernel"] = _unlinear(r.get(a + "mlp.fc2.weight", (d, mlp)), (mlp, d))
        h["mlp_out_bias"] = r.get(a + "mlp.fc2.bias", (d,))
        c["MAPHead_0"] = h
    if cfg.representation_size:
        raise ValueError(
            f"{source}: parameter pre_logits is missing: timm has no representation_size layer"
        )
    if cfg.num_classes:
        c["head_kernel"] = _unlinear(
            r.get("head.weight", (cfg.num_classes, d)), (d, cfg.num_classes)
        )
        c["head_bias"] = r.get("head.bias", (cfg.num_classes,))
    r.check_all_used()
    return param_layout.from_canonical(c, cfg)


def source_shape(sd: dict, cfg: ViTConfig) -> ViTConfig:
    """`cfg` at the checkpoint's own image size and classes (from pos_embed and head), so that a
    checkpoint of another resolution / label set converts before trainer/transfer.py adapts it."""
    n = np.asarray(sd["pos_embed"]).shape[1] if "pos_embed" in sd else cfg.num_patches
    grid = int(round(math.sqrt(n)))
    classes = np.asarray(sd["head.bias"]).shape[0] if "head.bias" in sd else 0
    return dataclasses.replace(
        cfg,
        image_size=grid * cfg.patch_size if grid * grid == n else cfg.image_size,
        num_classes=classes,
    )


def save(path: Path, params: dict, cfg: ViTConfig) -> dict:
    """Writes DIR/model.safetensors + DIR/config.json; returns the config written."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = config_json(cfg)
    from trainer.interop.npz_format import storable

    save_file(
        {k: storable(v) for k, v in to_timm(params, cfg).items()},
        str(path / WEIGHTS),
        metadata={"format": "pt"},
    )
    (path / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


def weights_file(path) -> Path:
    """The file a reference names: a dir holding model.safetensors (a timm export) names that file,
    anything else (a file, a stage's export dir, an Orbax params/ dir) names itself."""
    path = Path(path)
    return path / WEIGHTS if path.is_dir() and (path / WEIGHTS).is_file() else path


def load_state_dict(path: Path) -> dict[str, np.ndarray]:
    """A timm .safetensors file (or a dir holding model.safetensors) as NumPy arrays."""
    from safetensors.numpy import load_file

    file = weights_file(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such timm safetensors file")
    return load_file(str(file))
