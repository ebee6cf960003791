"""Parameter counts in closed form, model FLOPs (PaLM's formula), device peaks and MFU.

MFU = model FLOPs per step / step time / (num devices x peak FLOP/s)  (docs/DESIGN.md §4).
Model FLOPs count what the model needs, not what the implementation does (no rematerialization).
Importable without Beam, Grain or TensorFlow so that benchmarks run on accelerator hosts as-is.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from trainer.models.config import ViTConfig

# bf16 dense peak FLOP/s per device (vendor figures).
PEAK_FLOPS = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,  # v5e reports itself as "TPU v5 lite"
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "h100": 989e12,
    "h200": 989e12,
    "a100": 312e12,
}


def _norm_params(cfg: ViTConfig, features: int) -> int:
    return features * (2 if cfg.use_bias else 1)


def block_params(cfg: ViTConfig) -> int:
    """Parameters of one encoder block, in closed form."""
    d, m, hd = cfg.width, cfg.mlp_dim, cfg.head_dim
    n = 4 * d * d + 2 * d * m  # q, k, v, attention-out, MLP-in, MLP-out kernels
    n += m + d  # MLP biases (always kept)
    n += (2 if cfg.qk_norm else 0) * _norm_params(cfg, hd)
    if cfg.block == "parallel":
        n += _norm_params(cfg, d)
        # Unfused: separate q/k/v biases and an attention-out bias when use_bias. Fused: the q/k/v
        # biases sit in W_in's bias; attention-out and MLP-out share W_out's single bias.
        n += 3 * d if cfg.use_bias else 0
        n += d if cfg.use_bias and not cfg.fused else 0
    else:
        n += 2 * _norm_params(cfg, d)
        n += 4 * d if cfg.use_bias else 0
    return n


def encoder_matmul_params(cfg: ViTConfig) -> int:
    """The encoder's matmul weights: depth * (4 D^2 + 2 D M); 21,743,271,936 for ViT-22B/14."""
    return cfg.depth * (4 * cfg.width**2 + 2 * cfg.width * cfg.mlp_dim)


def head_params(cfg: ViTConfig) -> int:
    d, m = cfg.width, cfg.mlp_dim
    if cfg.head == "map":
        n = d + 4 * d * d + (4 * d if cfg.use_bias else 0)  # probe, q/k/v/out (+ biases)
        n += (2 if cfg.qk_norm else 0) * _norm_params(cfg, cfg.head_dim) + _norm_params(cfg, d)
        n += 2 * d * m + m + d
    else:
        n = d if cfg.head == "token" else 0  # the class token
    features = d
    if cfg.representation_size:
        n += d * cfg.representation_size + cfg.representation_size
        features = cfg.representation_size
    if cfg.num_classes:
        n += features * cfg.num_classes + cfg.num_classes
    return n


def param_count(cfg: ViTConfig) -> int:
    """Total parameters of `ViT(cfg)`, computed from the config alone."""
    p = cfg.patch_size
    n = p * p * 3 * cfg.width + cfg.width  # patch embedding
    n += cfg.num_patches * cfg.width if cfg.posemb == "learn" else 0
    n += cfg.depth * block_params(cfg)
    n += _norm_params(cfg, cfg.width)  # encoder norm
    return n + head_params(cfg)


def matmul_params_per_token(cfg: ViTConfig) -> int:
    """Weights every token is multiplied with: the patch embedding and the encoder matmuls."""
    return cfg.patch_size**2 * 3 * cfg.width + encoder_matmul_params(cfg)


def head_flops_per_example(cfg: ViTConfig, train: bool = True) -> float:
    """MAP head + logits: keys/values over all tokens, the rest on one token (x3 for training)."""
    d, t = cfg.width, cfg.seq_len
    f = 0.0
    if cfg.head == "map":
        f += 2 * (2 * d * d) * t + 2 * (2 * d * d + 2 * d * cfg.mlp_dim) + 4 * t * d
    features = cfg.representation_size or d
    if cfg.representation_size:
        f += 2 * d * features
    f += 2 * features * cfg.num_classes
    return f * (3 if train else 1)


def model_flops_per_example(cfg: ViTConfig, train: bool = True) -> float:
    """PaLM: 6 N T + 12 L T^2 D for a training step (forward + backward); a third of it for
    inference."""
    t = cfg.seq_len
    dense = 2 * matmul_params_per_token(cfg) * t
    attn = 4 * cfg.depth * t * t * cfg.width
    return (dense + attn) * (3 if train else 1) + head_flops_per_example(cfg, train)


def device_peak_flops(device: jax.Device | None = None) -> float | None:
    """The bf16 peak of a known accelerator, else None (e.g. CPU: measure it instead)."""
    device = device or jax.devices()[0]
    kind = device.device_kind.lower()
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):
        if name in kind:
            return PEAK_FLOPS[name]
    return None


def measure_matmul_peak(
    devices=None, size: int = 512, dtype=jnp.float32, repeats: int = 10
) -> float:
    """Per-device FLOP/s of square matmuls run on all `devices` at once.

    Measured concurrently because simulated CPU devices share the host's cores: a one-device figure
    would overstate what 8 of them reach together.
    """
    devices = list(devices or jax.devices())
    mesh = jax.sharding.Mesh(np.array(devices), ("d",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    a = jax.device_put(jnp.ones((len(devices), size, size), dtype), sharding)
    f = jax.jit(lambda x: jnp.einsum("nij,njk->nik", x, x), out_shardings=sharding)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops_per_device(devices=None) -> tuple[float, str]:
    """(peak FLOP/s per device, where it came from): the table for accelerators, measured on CPU."""
    devices = list(devices or jax.devices())
    peak = device_peak_flops(devices[0])
    if peak is not None:
        return peak, "table"
    return measure_matmul_peak(devices), "measured"


def mfu(
    flops_per_step: float, step_time_s: float, num_devices: int, peak_per_device: float
) -> float:
    return flops_per_step / step_time_s / (num_devices * peak_per_device)


def text_flops_per_example(cfg: ViTConfig, train: bool = True) -> float:
    """The same count for a text tower (trainer/models/text.py): `cfg.image_size` tokens of a 1-D
    sequence (not a square grid), a token-embedding lookup (no matmul), and a mean-pool + linear
    head."""
    t = cfg.image_size
    dense = 2 * encoder_matmul_params(cfg) * t
    attn = 4 * cfg.depth * t * t * cfg.width
    head = 2 * cfg.width * cfg.num_classes
    return (dense + attn + head) * (3 if train else 1)
