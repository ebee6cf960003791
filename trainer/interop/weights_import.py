"""Start a ViT from another library's checkpoint: a timm .safetensors or a big_vision .npz.

    init_params = "/ckpt/vit.safetensors"   # or a dir holding model.safetensors (+ config.json),
    init_params = "/ckpt/vit_b16.npz"       # a big_vision ViT, or our own
                                            # `trainer.interop.export --format npz`

Any training stage's `init_params` takes these (trainer/transfer.load_into), and so do a
fine-tune's `init_from` and a distill `teacher`; trainer/checkpoint.open_model reads them. The file
is mapped into the model's layout (trainer/interop/timm_format.py, trainer/interop/npz_format.py)
at the checkpoint's own image size and classes, then adapted like a fine-tune's upstream export
(trainer/transfer.py): the position embedding is resized to the model's grid, and a head for
another number of classes is replaced by a zero-initialised one. Anything else that differs is a
ValueError naming the first mismatched parameter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from trainer.interop import npz_format, param_layout, timm_format
from trainer.models.config import ViTConfig


checkpoint_file = (
    timm_format.weights_file
)  # a file reference: itself, or a timm export dir's weights


def is_foreign(path: str | Path) -> bool:
    """A checkpoint file `init_params` maps (not an Orbax params/ dir of ours)."""
    return checkpoint_file(path).suffix in (".safetensors", ".npz")


def check_file(value: str, where: str) -> None:
    """Plan-time: a checkpoint-file reference (a stage's `init_from` / `teacher`) exists."""
    if not checkpoint_file(value).is_file():
        raise ValueError(
            f"{where}: {value}: no such checkpoint file (a timm .safetensors or a dir holding "
            f"{timm_format.WEIGHTS}, a big_vision or trainer.interop.export .npz)"
        )


def architecture(model_group, where: str) -> ViTConfig:
    """The architecture a checkpoint file is read as: `model_group` (a config `model` group) names
    the variant (e.g. "B/16") and any field that differs from it; image size and classes come from
    the file itself (`read`)."""
    from trainer.models import vit

    if not model_group.variant:
        raise ValueError(
            f"{where}.variant: name the checkpoint file's architecture (e.g. 'B/16'); a file "
            "carries no model.json"
        )
    overrides = {k: v for k, v in model_group.items() if k != "variant" and v is not None}
    try:
        return vit.make_config(model_group.variant, **overrides)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def read(path: str | Path, cfg: ViTConfig) -> tuple[dict, ViTConfig, str]:
    """(params for `cfg` at the checkpoint's size/classes, that config, the format's name)."""
    path = Path(path)
    source = str(path)
    if path.suffix == ".npz":
        flat = npz_format.load(path)
        src = npz_format.source_shape(flat, cfg)
        if npz_format.is_ours(flat):
            return npz_format.from_ours(flat, src, source), src, "npz"
        if npz_format.is_big_vision(flat):
            return npz_format.from_big_vision(flat, src, source), src, "big_vision"
        raise ValueError(
            f"{path}: neither a big_vision ViT npz (embedding/kernel) nor ours (embedding_kernel)"
        )
    sd = timm_format.load_state_dict(path)
    src = timm_format.source_shape(sd, cfg)
    return timm_format.from_timm(sd, src, source), src, "timm"


def place(params: dict, abstract: Any, source: str) -> Any:
    """NumPy params -> arrays in the shardings of `abstract` (ShapeDtypeStructs with shardings):
    every process reads only the slices its devices hold."""
    import jax

    param_layout.check_tree(params, abstract, source)

    def put(x, a):
        return jax.make_array_from_callback(
            a.shape, a.sharding, lambda index: np.asarray(x[index], a.dtype)
        )

    return jax.tree_util.tree_map(put, params, abstract)
