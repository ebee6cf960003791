"""ViT variants and the validated model configuration.

A model is named like big_vision's "B/16" (variant name / patch size) plus overrides. Every field is
checked here, before anything is traced or compiled, with a one-line error naming the field.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

# Dimensions from the ViT, ViT-G (Zhai et al. 2022) and ViT-22B papers. "arch" holds the block style
# the variant is known for: the classic pre-LN ViT block, or the ViT-22B parallel block.
_CLASSIC = dict(block="sequential", qk_norm=False, use_bias=True, norm="layernorm", head="gap")
_VIT22B = dict(block="parallel", qk_norm=True, use_bias=False, norm="rmsnorm", head="map")

VARIANTS: dict[str, dict[str, Any]] = {
    # Tiny CPU variant for dry-runs and tests (32px inputs with patch 4): the ViT-22B architecture.
    "mu": dict(width=64, depth=2, mlp_dim=256, num_heads=4, **_VIT22B),
    "Ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3, **_CLASSIC),
    "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6, **_CLASSIC),
    "M": dict(width=512, depth=12, mlp_dim=2048, num_heads=8, **_CLASSIC),
    "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12, **_CLASSIC),
    "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16, **_CLASSIC),
    "H": dict(width=1280, depth=32, mlp_dim=5120, num_heads=16, **_CLASSIC),
    "g": dict(width=1408, depth=40, mlp_dim=6144, num_heads=16, **_CLASSIC),
    "G": dict(width=1664, depth=48, mlp_dim=8192, num_heads=16, **_CLASSIC),
    "e": dict(width=1792, depth=56, mlp_dim=15360, num_heads=16, **_CLASSIC),
    "22B": dict(width=6144, depth=48, mlp_dim=24576, num_heads=48, **_VIT22B),
}

_CHOICES = {
    "block": ("parallel", "sequential"),
    "norm": ("rmsnorm", "layernorm"),
    "head": ("map", "gap", "token"),
    "posemb": ("learn", "sincos2d"),
    "remat": ("none", "full", "dots", "dots_no_batch", "nothing_saveable"),
    "dtype": ("float32", "bfloat16", "float16"),
    "param_dtype": ("float32", "bfloat16"),
    "matmul": ("xla", "collective"),
}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Everything that defines a ViT. Hashable, so it can be a flax Module attribute."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int
    variant: str = "custom"
    image_size: int = 224
    num_classes: int = 1000  # 0 = encoder only: the model returns pre-logits.
    # "parallel" = ViT-22B block (one shared norm, attention and MLP in parallel);
    # "sequential" = ViT.
    block: str = "parallel"
    fused: bool = True  # one matmul for [QKV|MLP-in] and one for [attn-out|MLP-out]; same math.
    # How the two fused matmuls run on a mesh: "xla" (XLA's sharded matmul) or "collective"
    # (trainer/collective.py: ppermute rings that overlap communication with the matmul).
    matmul: str = "xla"
    qk_norm: bool = True  # normalize queries and keys per head over head_dim.
    # Biases of QKV, attention-out and every norm (the MLP keeps its biases).
    use_bias: bool = False
    # The paper applies its LayerNorms "without bias and centering" (Zhang & Sennrich 2019).
    norm: str = "rmsnorm"
    norm_eps: float = 1e-6
    head: str = "map"
    posemb: str = "learn"
    representation_size: int | None = None  # optional tanh pre-logits layer.
    head_zeroinit: bool = True
    head_bias_init: float = 0.0  # e.g. -10 for sigmoid cross-entropy over many classes.
    dropout: float = 0.0
    dtype: str = "float32"  # compute dtype; bfloat16 on accelerators.
    param_dtype: str = "float32"
    scan: bool = True  # nn.scan over layers: depth-48 models compile as fast as depth-1.
    remat: str = "none"
    # Sow each encoder layer's max attention logit and per-head attention entropy into the
    # "intermediates" collection; tasks then log them (trainer/task.py). Off: no extra ops at all.
    attn_stats: bool = False

    def __post_init__(self):
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"ViT config field {name}={getattr(self, name)!r} is not one of {choices}"
                )
        for name in ("width", "depth", "mlp_dim", "num_heads", "patch_size", "image_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ViT config field {name}={value!r} must be a positive int")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(
                f"ViT config field num_classes={self.num_classes!r} must be an int >= 0"
            )
        if self.width % self.num_heads:
            raise ValueError(
                f"ViT config field width={self.width} "
                f"is not divisible by num_heads={self.num_heads}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"ViT config field image_size={self.image_size} "
                f"is not divisible by patch_size={self.patch_size}"
            )
        if self.block == "parallel" and self.mlp_dim % self.num_heads:
            # The fused [QKV|MLP-in] kernel gives every head an equal slice of the MLP.
            raise ValueError(
                f"ViT config field mlp_dim={self.mlp_dim} "
                f"is not divisible by num_heads={self.num_heads} "
                "(required by the parallel block)"
            )
        if self.matmul == "collective" and (self.block != "parallel" or not self.fused):
            raise ValueError(
                f"ViT config field matmul='collective' needs block='parallel' and fused=True "
                f"(got block={self.block!r}, fused={self.fused})"
            )
        if self.posemb == "sincos2d" and self.width % 4:
            raise ValueError(
                f"ViT config field width={self.width} must be divisible by 4 for posemb='sincos2d'"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ViT config field dropout={self.dropout} must be in [0, 1)")
        if self.representation_size is not None and self.representation_size <= 0:
            raise ValueError(
                f"ViT config field representation_size={self.representation_size} must be > 0"
            )

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def seq_len(self) -> int:
        return self.num_patches + (1 if self.head == "token" else 0)

    @classmethod
    def from_variant(cls, variant: str, **overrides) -> "ViTConfig":
        """`ViTConfig.from_variant("22B/14", num_classes=0)`; overrides may change any field."""
        name, patch = parse_variant(variant)
        allowed = {f.name for f in dataclasses.fields(cls)} - {"variant"}
        unknown = sorted(set(overrides) - allowed)
        if unknown:
            raise ValueError(
                f"unknown ViT config field {unknown[0]!r} in overrides for variant {variant!r}"
            )
        fields = dict(VARIANTS[name], patch_size=patch, variant=variant)
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> "ViTConfig":
        """The one way from a model spec (`model.json`'s {"variant", "overrides"}, what `to_json`
        writes) to a config: a variant + overrides, or "custom" with every field an override.
        Any bad field or value is a one-line ValueError."""
        if not isinstance(spec, Mapping) or "variant" not in spec:
            what = (
                f"a {spec['kind']!r} spec"
                if isinstance(spec, Mapping) and "kind" in spec
                else repr(spec)
            )
            raise ValueError(f"not a ViT model spec ({{'variant', 'overrides'}}): {what}")
        variant, overrides = spec["variant"], dict(spec.get("overrides") or {})
        try:
            if variant == "custom":
                return cls(**overrides)
            return cls.from_variant(variant, **overrides)
        except TypeError as e:  # a missing or unknown field of a "custom" config
            raise ValueError(f"ViT variant {variant!r}: {e}") from None

    def to_json(self) -> dict:
        """{"variant", "overrides"}: what `model.json` stores and `from_spec` reads back."""
        try:
            base = dataclasses.asdict(ViTConfig.from_variant(self.variant))
        except ValueError:  # a "custom" config: every field is an override.
            base = {}
        overrides = {
            k: v
            for k, v in dataclasses.asdict(self).items()
            if k != "variant" and base.get(k, object()) != v
        }
        return {"variant": self.variant, "overrides": overrides}


def parse_variant(variant: str) -> tuple[str, int]:
    """ "B/16" -> ("B", 16), with a one-line error for anything else."""
    name, sep, patch = str(variant).partition("/")
    if not sep or not patch.isdigit() or int(patch) <= 0:
        raise ValueError(
            f"ViT variant {variant!r} must look like 'NAME/PATCH', e.g. 'B/16' or '22B/14'"
        )
    if name not in VARIANTS:
        raise ValueError(f"unknown ViT variant {variant!r}; known names: {', '.join(VARIANTS)}")
    return name, int(patch)
