"""Turning an exported ViT's params into the start params of a related ViT (fine-tuning).

    start = transfer.start_from(checkpoint.open_model(export_dir, "finetune.init_from"), target_cfg,
                                mesh, head="new")

- A new classification head: kernel and bias zero-initialised (big_vision's fine-tune convention:
  the first step's logits are 0, so the new head cannot destroy the backbone's features).
- A new resolution: the learned position embedding [1, gh*gw, D] is resized over its 2-D patch grid
  (bilinear by default, bicubic as an option; big_vision's `resample_posemb`). The same grid is the
  identity, bit for bit. A `token` head's class token is a separate parameter here (`cls`), so it
  is never interpolated.
- Every other parameter is copied unchanged; the patch embedding is kept, so the patch size must not
  change (a config error at plan time, trainer/finetune.py).

The export is read straight into the shardings the rules table gives the source model on this
mesh, and the transform runs jitted with the target's shardings as outputs: no parameter is ever
gathered onto one device. A checkpoint file as `init_params` is adapted the same way (`load_into`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from trainer import checkpoint, sharding
from trainer.models import vit

log = logging.getLogger(__name__)

RESIZE_METHODS = ("bilinear", "bicubic")
HEADS = ("new", "keep")


def resize_posemb(posemb: jax.Array, grid: tuple[int, int], method: str = "bilinear") -> jax.Array:
    """[1, gh*gw, D] learned position embedding -> [1, grid[0]*grid[1], D] over the patch grid.

    The old grid is square (ViT images are square here). Same grid: returned unchanged.
    """
    if method not in RESIZE_METHODS:
        raise ValueError(f"posemb resize method {method!r} is not one of {RESIZE_METHODS}")
    _, n, d = posemb.shape
    old = int(round(n**0.5))
    if old * old != n:
        raise ValueError(f"position embedding of {n} tokens is not a square patch grid")
    if (old, old) == tuple(grid):
        return posemb
    image = posemb.reshape(1, old, old, d).astype(jnp.float32)
    # antialias=False: a plain interpolation (big_vision's scipy zoom(order=1)), also when
    # shrinking.
    resized = jax.image.resize(image, (1, *grid, d), method=method, antialias=False)
    return resized.reshape(1, grid[0] * grid[1], d).astype(posemb.dtype)


def transform_params(
    params: dict,
    source: vit.ViTConfig,
    target: vit.ViTConfig,
    *,
    head: str = "new",
    resize: str = "bilinear",
) -> dict:
    """The source model's params as the target model's start params (pure; jittable)."""
    if head not in HEADS:
        raise ValueError(f"head={head!r} is not one of {HEADS}")
    if source.patch_size != target.patch_size:
        raise ValueError(
            f"patch_size {target.patch_size} differs from the exported model's "
            f"{source.patch_size}: "
            "the patch embedding is kept, so the patch size cannot change"
        )
    out = dict(params)
    if "pos_embedding" in out:
        grid = target.image_size // target.patch_size
        out["pos_embedding"] = resize_posemb(out["pos_embedding"], (grid, grid), resize)
    if head == "keep":
        if source.num_classes != target.num_classes:
            raise ValueError(
                f"head='keep' but the exported head has {source.num_classes} classes and the "
                f"data {target.num_classes}: use head='new'"
            )
    elif target.num_classes:
        features = target.representation_size or target.width  # the pre-logits the head reads
        dtype = jnp.dtype(target.param_dtype)
        out["head_kernel"] = jnp.zeros((features, target.num_classes), dtype)
        out["head_bias"] = jnp.zeros((target.num_classes,), dtype)
    else:  # an encoder-only target keeps no head
        out.pop("head_kernel", None)
        out.pop("head_bias", None)
    return out


def start_from(
    source: checkpoint.OpenedModel,
    target: vit.ViTConfig,
    mesh,
    *,
    head: str = "new",
    resize: str = "bilinear",
) -> Callable[[Any], Any]:
    """A Task `start`: `(target abstract params with shardings) -> params` from a model opened by
    `checkpoint.open_model` (a stage's export, or a timm / big_vision / our .npz file), its params
    read straight into the shardings the rules table gives the source model on `mesh`."""

    def start(abstract):
        boxed = vit.abstract_params(source.config)
        src_abstract = checkpoint.abstract_with_shardings(
            nn.unbox(boxed), sharding.param_shardings(boxed, mesh)
        )
        params = source.load(src_abstract)
        fn = lambda p: transform_params(p, source.config, target, head=head, resize=resize)
        got = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), jax.eval_shape(fn, src_abstract))
        want = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), abstract)
        if got != want:
            raise ValueError(
                f"{source.source}: the transformed source params do not match the "
                "fine-tuned model's parameters (architecture fields differ from the "
                "source's?)"
            )
        out_shardings = jax.tree_util.tree_map(lambda a: a.sharding, abstract)
        with sharding.activate(mesh):
            return jax.jit(fn, out_shardings=out_shardings)(params)

    return start


def load_into(
    path: str | Path,
    model_spec: dict | None,
    abstract_params: Any,
    mesh,
    where: str = "init_params",
) -> tuple[Any, str]:
    """`init_params` naming a checkpoint file (trainer/loop.py): the file read as this stage's
    model (`model_spec`, its model.json) at the file's own image size and classes, then adapted
    like a fine-tune's export (position embedding resized, a zero head for other classes) into
    `abstract_params`' shardings on `mesh`. Returns (params, a line saying what was adapted)."""
    if not model_spec or "variant" not in model_spec:
        raise ValueError(
            f"{where}: {path}: this stage's model is not one ViT (model spec "
            f"{model_spec!r}): nothing to map the checkpoint onto"
        )
    target = vit.ViTConfig.from_spec(model_spec)
    source = checkpoint.open_model(path, where, arch=target)
    src = source.config
    head = "keep" if src.num_classes == target.num_classes else "new"
    what = [f"{source.kind} checkpoint {path}"]
    if src.image_size != target.image_size:
        what.append(f"position embedding resized {src.image_size}px -> {target.image_size}px")
    if head == "new":
        what.append(f"new zero head: {src.num_classes} -> {target.num_classes} classes")
    log.info("%s: %s", where, "; ".join(what))
    return start_from(source, target, mesh, head=head)(abstract_params), "; ".join(what)
