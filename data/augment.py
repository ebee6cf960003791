"""Augmentations in numpy, seeded per record by the caller's `np.random.Generator`.

`train_image` / `eval_image` are what the loaders run per record: they pick the crop box from the
image header first and then decode only that box, at the smallest JPEG scale that still covers
it at the output size (docs/DESIGN.md §6, loader anchor: a cropped, reduced-scale decode wins).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np

from data import images

Box = images.Box


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation. The defaults are the Inception-crop + flip recipe of ViT
    pre-training; mixup is off unless `mixup_alpha` > 0."""

    inception_crop: bool = True  # False: resize shorter side + central crop (as in eval)
    area_min: float = 0.08  # crop area as a fraction of the image (big_vision ViT: 0.05)
    area_max: float = 1.0
    aspect_min: float = 3 / 4
    aspect_max: float = 4 / 3
    flip: bool = True
    mixup_alpha: float = 0.0  # Beta(alpha, alpha) mixing weight per batch; 0 disables

    def __post_init__(self):
        if not 0 < self.area_min <= self.area_max <= 1:
            raise ValueError(
                f"augment: need 0 < area_min <= area_max <= 1, got {self.area_min}, {self.area_max}"
            )
        if not 0 < self.aspect_min <= self.aspect_max:
            raise ValueError(
                f"augment: need 0 < aspect_min <= aspect_max, got "
                f"{self.aspect_min}, {self.aspect_max}"
            )
        if self.mixup_alpha < 0:
            raise ValueError(f"augment: mixup_alpha must be >= 0, got {self.mixup_alpha}")

    @classmethod
    def from_any(cls, value: "AugmentConfig | Mapping[str, Any] | None") -> "AugmentConfig":
        """None -> defaults; a mapping (dict, ConfigDict) -> fields by name (unknown keys fail)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        items = dict(value.to_dict() if hasattr(value, "to_dict") else value)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(items) - known)
        if unknown:
            raise ValueError(f"augment: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**items)


def sample_inception_crop(
    rng: np.random.Generator,
    height: int,
    width: int,
    cfg: AugmentConfig = AugmentConfig(),
    attempts: int = 10,
) -> Box:
    """Random area/aspect crop (Szegedy et al.; TF's sample_distorted_bounding_box), falling back
    to the largest central crop with an aspect ratio in range."""
    area = height * width
    log_lo, log_hi = math.log(cfg.aspect_min), math.log(cfg.aspect_max)
    for _ in range(attempts):
        target = area * rng.uniform(cfg.area_min, cfg.area_max)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    ratio = width / height
    if ratio < cfg.aspect_min:
        w, h = width, min(height, int(round(width / cfg.aspect_min)))
    elif ratio > cfg.aspect_max:
        h, w = height, min(width, int(round(height * cfg.aspect_max)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def central_square(height: int, width: int) -> Box:
    """The central square: cropping it and resizing equals resize-shorter-side + central crop."""
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def resize(
    image: np.ndarray, size: int | tuple[int, int], out: np.ndarray | None = None
) -> np.ndarray:
    """Resizes to size x size (or (height, width)); area filter when shrinking. With `out`
    (a C-contiguous [h, w, 3] uint8 view, e.g. a batch row) the result is written there."""
    h, w = (size, size) if isinstance(size, int) else size
    if image.shape[:2] == (h, w):
        if out is None:  # decode_crop may hand out the decoder's read-only bytes
            return image if image.flags.writeable else image.copy()
        out[...] = image
        return out
    shrink = h < image.shape[0] and w < image.shape[1]
    return cv2.resize(
        image, (w, h), dst=out, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    )


def decode_scale(need: float) -> int:
    """k of the k/8 JPEG decode scale for a crop that must keep `need` of its full-size pixels
    per side: the smallest of 1, 2, 4, 8 that does. libjpeg's other scales use slower IDCTs
    (5/8-7/8 decode slower than 8/8 here), so they are never picked."""
    return next((k for k in (1, 2, 4) if k >= 8 * need), 8)


def decode_crop_resize(
    data: bytes,
    box: Box,
    full_hw: tuple[int, int],
    size: int,
    *,
    fast: bool = False,
    flip: bool = False,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Decodes only as many pixels as the output needs, crops `box`, [mirrors,] resizes to
    size x size (into `out` when given)."""
    _, _, h, w = box
    height, width = full_hw
    k = decode_scale(max(size / h, size / w))
    crop = images.decode_crop(
        data,
        box,
        min_height=math.ceil(height * k / 8),
        min_width=math.ceil(width * k / 8),
        fast=fast,
    )
    if flip:  # before the resize: the crop has at most as many pixels as the output. cv2.flip:
        crop = cv2.flip(crop, 1)  # ~4x faster than copying numpy's negative-stride view
    return resize(crop, size, out)


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return (image.astype(np.float32) - np.float32(127.5)) / np.float32(127.5)


def train_image(
    data: bytes,
    rng: np.random.Generator,
    size: int,
    cfg: AugmentConfig = AugmentConfig(),
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Record image bytes -> augmented uint8 [size, size, 3] (normalize later: 4x less to copy),
    written into `out` when given."""
    hw = images.image_size(data)
    box = sample_inception_crop(rng, *hw, cfg) if cfg.inception_crop else central_square(*hw)
    flip = cfg.flip and rng.random() < 0.5
    return decode_crop_resize(data, box, hw, size, fast=True, flip=flip, out=out)


def eval_image(data: bytes, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """Deterministic: resize shorter side to `size`, central crop -> uint8 [size, size, 3]."""
    hw = images.image_size(data)
    return decode_crop_resize(data, central_square(*hw), hw, size, out=out)


def mixup(
    rng: np.random.Generator, images_: np.ndarray, labels: np.ndarray, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """Batch mixup (big_vision style): one weight a ~ Beta(alpha, alpha), folded to a >= 0.5,
    mixes every example with its neighbour (roll by 1). Images become float32 in [-1, 1]."""
    x = normalize(images_) if images_.dtype == np.uint8 else images_.astype(np.float32)
    a = rng.beta(alpha, alpha)
    a = np.float32(max(a, 1 - a))
    mixed_x = a * x + (1 - a) * np.roll(x, 1, axis=0)
    mixed_y = a * labels + (1 - a) * np.roll(labels, 1, axis=0)
    return mixed_x.astype(np.float32), mixed_y.astype(np.float32)
