"""The LiT text tower: a transformer over tokens, with the ViT family's blocks and sizes.

    cfg = text.make_config("mu", max_len=32, embed_dim=64)      # the ViT variant table's sizes
    model = text.TextTower(cfg, vocab_size=tokenizer.VOCAB_SIZE)
    z, out = model.apply({"params": p}, tokens, mask)            # [B, embed_dim], out["encoded"]

A text tower is a ViT encoder on a 1-D token sequence, so its config IS a ViTConfig read as: one
"patch" per token (`patch_size=1`), `image_size` = the sequence length, `num_classes` = the output
embedding dimension (the locked image tower's feature width, so no image-side projection is
trained), and every block option (parallel/sequential, QK-norm, norms, biases, remat, scan) as in
the image tower. Token embedding + learned position embedding -> Encoder (trainer/models/vit.py,
the same blocks) -> mean over the real (unmasked) tokens -> linear projection. As in big_vision's
text transformer the encoder attends over the padded sequence too; pooling ignores padding.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from trainer.models.layers import constrain, fan_in_init, param, project
from trainer.models.vit import ACT, Encoder, ViTConfig, _Dtypes


def make_config(variant: str, *, max_len: int, embed_dim: int, **overrides) -> ViTConfig:
    """A text tower config from a ViT variant name ("mu", "B", ...; no patch size) + overrides."""
    if "/" in variant:
        raise ValueError(
            f"text tower variant {variant!r}: give the size only (e.g. 'B'), not a patch size"
        )
    # head="gap": the tower mean-pools, so trainer/flops.py counts its head as one projection.
    return ViTConfig.from_variant(
        f"{variant}/1",
        **{
            "image_size": max_len,
            "num_classes": embed_dim,
            "posemb": "learn",
            "head": "gap",
            **overrides,
        },
    )


class TextTower(_Dtypes, nn.Module):
    config: ViTConfig
    vocab_size: int

    @nn.compact
    def __call__(self, tokens, mask, train: bool = False):
        c = self.config
        if tokens.shape[1] != c.image_size:
            raise ValueError(
                f"text tower: token sequences of length {tokens.shape[1]} "
                f"but max_len={c.image_size}"
            )
        embedding = param(
            self,
            "token_embedding",
            nn.initializers.normal(1.0),
            (self.vocab_size, c.width),
            (None, "embed"),
            self.param_dtype,
        )
        x = jnp.take(embedding, tokens, axis=0).astype(self.dtype)
        x = x + param(
            self,
            "pos_embedding",
            nn.initializers.normal(1 / np.sqrt(c.width)),
            (1, c.image_size, c.width),
            (None, None, "embed"),
            self.param_dtype,
        ).astype(self.dtype)
        x = nn.Dropout(c.dropout, deterministic=not train)(x)
        x = Encoder(c, name="Transformer")(constrain(x, ACT), train)
        weights = mask.astype(x.dtype)[..., None]
        pooled = jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
        z = project(
            self,
            "head",
            pooled,
            (c.width, c.num_classes),
            ("embed", "classes"),
            bias=True,
            init=fan_in_init(0),
        ).astype(jnp.float32)
        return z, {"encoded": x, "pre_logits": pooled}
