"""Classification losses and per-example metrics.

All functions return per-example values (shape [B]); reduce them with `jnp.mean` (training
batches) or `masked_sum`, which drops padded eval examples. Math is done in float32 whatever the
logits' dtype (bf16 logits from a bf16 model would otherwise lose most of the loss' precision).

`labels` are always dense [B, C] float targets, as the loader produces them: multi-hot for
multi-label data (several 1s), one-hot for single-label data, or mixup-mixed soft targets.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

__all__ = [
    "LOSSES",
    "get",
    "sigmoid_xent",
    "softmax_xent",
    "contrastive_softmax",
    "contrastive_sigmoid",
    "kl_divergence",
    "top1_correct",
    "topk_correct",
    "masked_sum",
]


def _check_shapes(logits: jax.Array, labels: jax.Array) -> None:
    if logits.shape != labels.shape:
        raise ValueError(
            f"logits {logits.shape} and labels {labels.shape} must have the same shape"
        )


def _f32(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    _check_shapes(logits, labels)
    return logits.astype(jnp.float32), labels.astype(jnp.float32)


def sigmoid_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example sigmoid cross-entropy summed over classes, [B].

    The multi-label pre-training loss of ViT-G/ViT-22B (every class is an independent binary
    problem; the JFT label hierarchy is flattened). Uses `log_sigmoid(x)` and `log_sigmoid(-x)`
    rather than `log(sigmoid(x))`, which is exact for large |x| instead of giving log(0).
    """
    logits, labels = _f32(logits, labels)
    log_p = jax.nn.log_sigmoid(logits)
    log_not_p = jax.nn.log_sigmoid(-logits)
    return -jnp.sum(labels * log_p + (1.0 - labels) * log_not_p, axis=-1)


def softmax_xent(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy, [B].

    Multi-hot labels are normalized into a distribution (k positives get 1/k each; an all-zero row
    stays zero, i.e. loss 0 without smoothing). Label smoothing then mixes in a uniform target:
    `target = (1 - label_smoothing) * labels / sum(labels) + label_smoothing / C`.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    logits, labels = _f32(logits, labels)
    total = jnp.sum(labels, axis=-1, keepdims=True)
    target = jnp.where(total > 0, labels / jnp.where(total > 0, total, 1.0), 0.0)
    if label_smoothing:
        target = (1.0 - label_smoothing) * target + label_smoothing / logits.shape[-1]
    return -jnp.sum(target * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def top1_correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example bool [B]: is the top-scoring class one of the example's positive labels?

    This is ImageNet-ReaL style accuracy for multi-hot labels and plain top-1 for one-hot labels.
    Ties in the logits resolve to the lowest class index (`argmax`).
    """
    _check_shapes(logits, labels)
    top1 = jnp.argmax(logits, axis=-1)
    return jnp.take_along_axis(labels, top1[..., None], axis=-1)[..., 0] > 0


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """Per-example bool [B]: is any of the k top-scoring classes a positive label?
    (k=1: top1_correct.)"""
    _check_shapes(logits, labels)
    k = min(k, logits.shape[-1])
    _, top = jax.lax.top_k(logits.astype(jnp.float32), k)
    return jnp.any(jnp.take_along_axis(labels, top, axis=-1) > 0, axis=-1)


def masked_sum(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Sum of per-example values `x` [B] over examples where `mask` [B] is True (float32).

    Masked-out values are selected away (not multiplied by 0, as NaN * 0 is NaN), so NaN/inf in
    padding rows cannot leak into the result.
    """
    x = jnp.asarray(x, jnp.float32)
    if mask.shape != x.shape:
        raise ValueError(f"mask {mask.shape} must have the shape of x {x.shape}")
    return jnp.sum(jnp.where(mask.astype(bool), x, 0.0))


# The loss table: a config names a classification loss by key; unknown names fail at plan time.
LOSSES: dict[str, Callable[..., jax.Array]] = {
    "sigmoid_xent": sigmoid_xent,
    "softmax_xent": softmax_xent,
}


def get(name: str, label_smoothing: float = 0.0) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """`(logits, labels) -> [B]` for a LOSSES key; label smoothing applies to softmax_xent only."""
    if name not in LOSSES:
        raise ValueError(f"loss={name!r} is not one of {tuple(LOSSES)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing!r} must be in [0, 1)")
    if name == "softmax_xent":
        return lambda logits, labels: softmax_xent(logits, labels, label_smoothing=label_smoothing)
    if label_smoothing:
        raise ValueError(
            f"label_smoothing={label_smoothing!r} applies to softmax_xent only, not loss={name!r}"
        )
    return LOSSES[name]


def contrastive_softmax(zimg: jax.Array, ztxt: jax.Array, log_temperature: jax.Array) -> jax.Array:
    """CLIP/LiT's symmetric contrastive loss over a batch of matching (image, text) pairs, scalar.

    logits = zimg @ ztxtᵀ * exp(t) (embeddings L2-normalised by the caller); the positives are on
    the diagonal; the loss is the mean of the image->text (row-wise) and text->image
    (column-wise) softmax cross-entropies. Swapping the towers gives the same value.
    """
    logits = (zimg.astype(jnp.float32) @ ztxt.astype(jnp.float32).T) * jnp.exp(log_temperature)
    i2t = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=1)))
    t2i = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=0)))
    return 0.5 * (i2t + t2i)


def contrastive_sigmoid(
    zimg: jax.Array, ztxt: jax.Array, log_temperature: jax.Array, bias: jax.Array
) -> jax.Array:
    """SigLIP's pairwise sigmoid loss, scalar: every (image, text) pair is a binary problem,
    +1 on the diagonal and -1 elsewhere; -sum log_sigmoid(label * (logit * exp(t) + b)) / batch."""
    logits = (zimg.astype(jnp.float32) @ ztxt.astype(jnp.float32).T) * jnp.exp(
        log_temperature
    ) + bias
    labels = 2.0 * jnp.eye(logits.shape[0], dtype=jnp.float32) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / logits.shape[0]


def kl_divergence(
    student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0
) -> jax.Array:
    """Per-example `t² · KL(softmax(teacher/t) ‖ softmax(student/t))`, [B], in float32.

    The t² factor keeps the gradient's scale independent of t (Hinton et al. 2015). Written as
    `sum p_t (log p_t - log p_s)` with log-softmaxes, exact for confident logits; zero (and with a
    zero gradient) when the two logit vectors are equal.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {student_logits.shape} and teacher logits {teacher_logits.shape} "
            "must have the same shape"
        )
    t = jnp.float32(temperature)
    log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    log_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
    return t * t * jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
