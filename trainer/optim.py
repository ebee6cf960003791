"""Optimizer and learning-rate schedules, composed from optax transforms.

    cfg = optim.default_config()          # or optim.vit22b_config()
    tx, schedule = optim.make_optimizer(cfg, params, total_steps)

Update rule (per trainable parameter p, gradient g, optimizer step t = updates applied so far):

    g  <- clip_by_global_norm(g, grad_clip_norm)      (over trainable params only; None = off)
    u  <- adafactor(g) | adam(g)                      (the preconditioned direction)
    p  <- p - lr(t) * (u + wd_p * p)

Weight-decay convention ("decoupled", multiplied by the learning rate): the decay `wd_p` is added
to the preconditioned update *after* the optimizer and scaled by the full learning rate `lr(t)`
(peak lr times warmup/decay/cooldown), so one step multiplies a parameter by `1 - lr(t) * wd_p`
(with zero gradient). This is optax.adamw's convention, and it is exactly big_vision's too: there
`config.wd` is written pre-multiplied by the peak lr and the decay is scaled by the normalized
schedule (the ViT-G/14 config sets `wd = 0.03 * lr` with a 100x head multiplier), i.e. the
Scaling-ViT / ViT-22B values head 3.0 / body 0.03 are used here as they are written in the paper.

`wd_p` comes from `cfg.wd_rules = [(regex, value), ...]`, matched with `re.search` against the
'/'-joined parameter path ("head/kernel", "Transformer/encoderblock_0/MlpBlock_0/Dense_0/bias");
the first matching rule wins and paths matching no rule get `cfg.wd`. A rule that matches no
parameter is logged as a warning (it is usually a typo). A value of `None` freezes
the parameter: it gets an exactly-zero update (`optax.set_to_zero`), is left out of gradient
clipping and holds no optimizer state (`optax.partition` masks it out of the trainable chain).

Optimizers (`cfg.optimizer`):
- "adafactor": big_vision's Adafactor variant from "Scaling Vision Transformers" (Zhai et al.
  2021, Sec. 3.4), used for ViT-G and ViT-22B: factored second moments
  (`optax.scale_by_factored_rms`) with Adafactor's decay 1 - (t+1)^-0.8 capped at 0.999, no
  parameter-scale lr multiplier, first momentum re-introduced (beta1 = 0.9, optionally stored in
  bfloat16, not debiased), optional Adafactor update clipping (`clip_by_block_rms`; off in the
  big_vision ViT-G recipe).
- "adamw": `optax.scale_by_adam` (optionally bf16 first moment) + the decoupled decay above.
- "sgd": heavy-ball momentum (`optax.trace`, 0.9 by default; Nesterov optional), big_vision's
  fine-tuning optimizer.

Schedules (`cfg.schedule`), all with a linear warmup from 0 over `warmup_steps` and an optional
linear cooldown to 0 over the last `cooldown_steps` (both multiplicative, as in big_vision's
`create_learning_rate_schedule`):
- "rsqrt":    lr / sqrt(1 + max(t - warmup_steps, 0) / timescale)
- "cosine":   lr * 0.5 * (1 + cos(pi * progress)),  progress = (t - warmup) / (total - warmup)
- "linear":   lr * (1 - progress)
- "constant": lr
The schedule is evaluated at the optimizer's update count, so the first update (count 0) uses
lr(0), which is 0 when there is a warmup — as in big_vision and optax's warmup schedules.

The optimizer is built for plain (unboxed) parameter pytrees; its state pytree's structure depends
only on the config and the parameter tree structure (never on values), so it can be created with
`jax.jit(tx.init, out_shardings=...)`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.core import meta

from trainer import config_checks as checks

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "OptimConfig",
    "default_config",
    "vit22b_config",
    "validate_config",
    "make_schedule",
    "make_optimizer",
    "param_path",
    "wd_assignments",
]

log = logging.getLogger(__name__)

OPTIMIZERS = ("adafactor", "adamw", "sgd")
SCHEDULES = ("rsqrt", "cosine", "linear", "constant")

# Rules for ViT parameter names, in both flax spellings: nn.Dense's "head/kernel" and this repo's
# fused projections' "head_kernel" / "in_kernel" (trainer/models/layers.py:project). Only kernels
# are decayed; biases, norm scales, position embeddings and the MAP probe match no rule and get
# `cfg.wd` (0 in vit22b_config), as with big_vision's default `wd_mults = [(".*/kernel$", 1)]`.
HEAD_KERNEL = r"(^|/)head[/_]kernel$"
ANY_KERNEL = r"(^|[/_])kernel$"

Schedule = Callable[[Any], jax.Array]


# ----------------------------------------------------------------------------------------------
# The config: frozen dataclasses (the complete key set, small-scale defaults), checked when built
# (no params or step counts needed) from a ConfigDict or a partial dict, without ml_collections.


def _key(field: str) -> str:
    """What an error names; trainer/stage_config.py turns it into `<stage>.optim.<field>`."""
    return f"optim config field {field!r}"


def _check_dtype(field: str, value) -> None:
    if value is None:
        return
    try:
        jnp.dtype(value)
    except TypeError:
        raise checks.fail(_key(field), f"unknown dtype {value!r}") from None


def _compile_rules(rules) -> list[tuple[re.Pattern, float | None]]:
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
        raise checks.fail(
            _key("wd_rules"), f"expected a list of (regex, value) pairs, got {rules!r}"
        )
    compiled = []
    for i, rule in enumerate(rules):
        key = _key(f"wd_rules[{i}]")
        if isinstance(rule, (str, bytes)) or not isinstance(rule, Sequence) or len(rule) != 2:
            raise checks.fail(key, f"expected a (regex, value) pair, got {rule!r}")
        pattern, value = rule
        if not isinstance(pattern, str):
            raise checks.fail(key, f"regex must be a string, got {pattern!r}")
        if pattern.startswith("/"):
            raise checks.fail(key, f"parameter paths never start with '/': {pattern!r}")
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise checks.fail(key, f"invalid regex {pattern!r}: {e}") from None
        checks.number(key, value, ge=0, none=True)
        compiled.append((regex, None if value is None else float(value)))
    return compiled


@dataclasses.dataclass(frozen=True)
class Adafactor:
    """big_vision's Adafactor variant (the module docstring)."""

    decay_rate: float = 0.8  # second-moment decay 1 - (t+1)^-decay_rate ...
    beta2_cap: float | None = 0.999  # ... capped here (Zhai et al. 2021); None = uncapped
    momentum: float | None = 0.9  # first momentum (EMA, not debiased); None/0 = off
    momentum_dtype: str | None = "bfloat16"  # storage dtype of the momentum; None = param dtype
    min_dim_size_to_factor: int = 32  # factor v only if two dims are at least this big
    clipping_threshold: float | None = None  # Adafactor update clipping (block RMS); None = off
    eps: float = 1e-30  # added to squared gradients


@dataclasses.dataclass(frozen=True)
class AdamW:
    """`optax.scale_by_adam`'s settings; the decay is the decoupled one of the module docstring."""

    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    mu_dtype: str | None = None  # first-moment storage dtype, e.g. "bfloat16"; None = param dtype


@dataclasses.dataclass(frozen=True)
class SGD:
    """SGD with (heavy-ball) momentum: big_vision's fine-tuning optimizer (`momentum_hp`, 0.9)."""

    momentum: float | None = 0.9  # None/0 = plain SGD
    nesterov: bool = False
    momentum_dtype: str | None = None  # storage dtype of the momentum, e.g. "bfloat16"


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The optimizer config group, checked: `OptimConfig.of(cfg)` builds it from a ConfigDict or a
    partial (nested) dict (missing keys take these defaults; unknown keys, a group that is not a
    mapping and bad values raise one line naming the field)."""

    optimizer: str = "adafactor"  # one of OPTIMIZERS
    lr: float = 1e-3  # peak learning rate
    schedule: str = "rsqrt"  # one of SCHEDULES
    warmup_steps: int = 0  # linear warmup from 0 (all schedules)
    cooldown_steps: int = 0  # linear cooldown to 0 at the end (all schedules)
    timescale: int = 10_000  # rsqrt only: lr halves after 3 * timescale steps past warmup
    grad_clip_norm: float | None = 1.0  # clip gradients to this global norm; None = off
    wd: float = 0.0  # decoupled weight decay (lr-scaled) for params matching no rule
    wd_rules: tuple = ()  # ((regex, wd or None=frozen), ...); first re.search match wins
    adafactor: Adafactor = dataclasses.field(default_factory=Adafactor)
    adamw: AdamW = dataclasses.field(default_factory=AdamW)
    sgd: SGD = dataclasses.field(default_factory=SGD)

    def __post_init__(self):
        checks.one_of(_key("optimizer"), self.optimizer, OPTIMIZERS)
        checks.one_of(_key("schedule"), self.schedule, SCHEDULES)
        checks.number(_key("lr"), self.lr, ge=0)
        checks.number(_key("timescale"), self.timescale, gt=0)
        for field in ("warmup_steps", "cooldown_steps"):
            checks.int_at_least(_key(field), getattr(self, field), 0)
        checks.number(_key("grad_clip_norm"), self.grad_clip_norm, gt=0, none=True)
        checks.number(_key("wd"), self.wd, ge=0)
        _compile_rules(self.wd_rules)
        object.__setattr__(self, "wd_rules", tuple(tuple(rule) for rule in self.wd_rules))

        af = self.adafactor
        checks.number(_key("adafactor.decay_rate"), af.decay_rate, gt=0)
        checks.number(_key("adafactor.beta2_cap"), af.beta2_cap, gt=0, le=1, none=True)
        checks.number(_key("adafactor.momentum"), af.momentum, ge=0, lt=1, none=True)
        _check_dtype("adafactor.momentum_dtype", af.momentum_dtype)
        checks.int_at_least(_key("adafactor.min_dim_size_to_factor"), af.min_dim_size_to_factor, 0)
        checks.number(_key("adafactor.clipping_threshold"), af.clipping_threshold, gt=0, none=True)
        checks.number(_key("adafactor.eps"), af.eps, gt=0)
        for field in ("b1", "b2"):
            checks.number(_key(f"adamw.{field}"), getattr(self.adamw, field), ge=0, lt=1)
        checks.number(_key("adamw.eps"), self.adamw.eps, gt=0)
        _check_dtype("adamw.mu_dtype", self.adamw.mu_dtype)
        checks.number(_key("sgd.momentum"), self.sgd.momentum, ge=0, lt=1, none=True)
        checks.boolean(_key("sgd.nesterov"), self.sgd.nesterov)
        _check_dtype("sgd.momentum_dtype", self.sgd.momentum_dtype)

    @classmethod
    def of(cls, cfg) -> OptimConfig:
        """`cfg` as is if an OptimConfig, else built from a ConfigDict or a (partial) Mapping."""
        return cfg if isinstance(cfg, cls) else _build(cls, cfg)

    def to_dict(self) -> dict:
        """Nested plain dicts, `wd_rules` a list: the key set and types of `default_config()`."""
        return {**dataclasses.asdict(self), "wd_rules": list(self.wd_rules)}


def _build(cls, cfg, prefix: str = ""):
    """A config dataclass from a ConfigDict or Mapping (groups likewise, by field name)."""
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    if not isinstance(cfg, Mapping):
        raise checks.fail(
            _key(prefix[:-1]) if prefix else "optim config",
            f"expected a mapping, got {type(cfg).__name__}",
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [key for key in cfg if key not in fields]
    if unknown:
        raise checks.fail(
            _key(prefix + str(unknown[0])), f"unknown key; known: {', '.join(fields)}"
        )
    groups = {
        name: f.default_factory
        for name, f in fields.items()
        if dataclasses.is_dataclass(f.default_factory)
    }
    return cls(
        **{
            key: _build(groups[key], value, f"{prefix}{key}.") if key in groups else value
            for key, value in cfg.items()
        }
    )


def default_config():
    """The optimizer config group (an ml_collections.ConfigDict): `OptimConfig`'s defaults.
    ml_collections is imported here, not at module level, so that building an optimizer from a
    plain dict (`make_optimizer({}, ...)`, the benchmarks on the GPU host) needs only jax/optax."""
    import ml_collections

    return ml_collections.ConfigDict(OptimConfig().to_dict())


def vit22b_config():
    """The ViT-22B pre-training optimizer recipe (Dehghani et al. 2023, following ViT-G).

    Checked against big_vision's ViT-G/14 config and the Scaling-ViT paper: Adafactor variant
    (bf16 momentum 0.9, second moment capped at 0.999, no parameter scaling), rsqrt schedule with
    timescale 10k, 10k warmup steps and a linear cooldown, global-norm gradient clipping at 1.0,
    decoupled weight decay 3.0 on the head kernel and 0.03 on the other kernels, lr-scaled
    (big_vision writes them as `wd = 0.03 * lr`, head multiplier 100).
    Assumed (not verified against the ViT-22B paper text): peak lr 1e-3 (ViT-G used 8e-4) and a
    50k-step cooldown (ViT-G's length, 5% of its 1M steps) — override `cooldown_steps` for
    shorter runs.
    """
    c = default_config()
    c.optimizer = "adafactor"
    c.lr = 1e-3
    c.schedule = "rsqrt"
    c.timescale = 10_000
    c.warmup_steps = 10_000
    c.cooldown_steps = 50_000
    c.grad_clip_norm = 1.0
    c.wd = 0.0
    c.wd_rules = [(HEAD_KERNEL, 3.0), (ANY_KERNEL, 0.03)]
    return c


def validate_config(cfg):
    """Returns `cfg` merged over `default_config()`, checked, as an ml_collections.ConfigDict;
    raises a one-line ValueError. Accepts a partial config (missing keys take their defaults) but
    no unknown keys. (make_optimizer / make_schedule run the same checks, `OptimConfig.of`,
    without ml_collections.)
    """
    import ml_collections

    return ml_collections.ConfigDict(OptimConfig.of(cfg).to_dict())


# ----------------------------------------------------------------------------------------------
# Learning-rate schedule.


def _check_durations(cfg, total_steps: int) -> None:
    if not checks.is_int(total_steps, 0):
        raise ValueError(f"total_steps must be an integer >= 0, got {total_steps!r}")
    # Runs of 0/1 steps (evaluation only, debugging) may keep the config's warmup.
    if total_steps > 1 and cfg.warmup_steps >= total_steps:
        raise checks.fail(
            _key("warmup_steps"), f"{cfg.warmup_steps} must be < total_steps ({total_steps})"
        )
    if total_steps > 1 and cfg.warmup_steps + cfg.cooldown_steps > total_steps:
        raise checks.fail(
            _key("cooldown_steps"),
            f"warmup_steps + cooldown_steps ({cfg.warmup_steps} + "
            f"{cfg.cooldown_steps}) must be <= total_steps ({total_steps})",
        )


def make_schedule(cfg, total_steps: int) -> Schedule:
    """Returns `schedule(step) -> float32 learning rate` (absolute, peak `cfg.lr`)."""
    cfg = OptimConfig.of(cfg)
    _check_durations(cfg, total_steps)
    lr, kind = float(cfg.lr), cfg.schedule
    warmup, cooldown, timescale = (
        int(cfg.warmup_steps),
        int(cfg.cooldown_steps),
        float(cfg.timescale),
    )
    decay_steps = max(total_steps - warmup, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        if kind == "rsqrt":
            value = lr / jnp.sqrt(1.0 + jnp.maximum(step - warmup, 0.0) / timescale)
        else:
            progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
            if kind == "cosine":
                value = lr * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
            elif kind == "linear":
                value = lr * (1.0 - progress)
            else:  # constant
                value = jnp.full_like(step, lr)
        if warmup:
            value = value * jnp.minimum(1.0, step / warmup)
        if cooldown:
            value = value * jnp.clip((total_steps - step) / cooldown, 0.0, 1.0)
        return value.astype(jnp.float32)

    return schedule


# ----------------------------------------------------------------------------------------------
# Parameter paths and weight-decay rules.


def param_path(path: Sequence[Any]) -> str:
    """'/'-joined name of a pytree key path, e.g. "Transformer/encoderblock_0/attn/kernel"."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def _rule_value(name: str, rules, default: float) -> float | None:
    for regex, value in rules:
        if regex.search(name):
            return value
    return default


def _map_rule(fn: Callable[[float | None], Any], tree, *, rules, default: float):
    """Maps each leaf of `tree` to `fn(its weight-decay rule value)`; works on any nested dict."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: fn(_rule_value(param_path(path), rules, default)), tree
    )


def wd_assignments(cfg, params) -> dict[str, float | None]:
    """`{param path: weight decay}` (None = frozen) for every parameter, e.g. to log at start."""
    cfg = OptimConfig.of(cfg)
    rules, default = _compile_rules(cfg.wd_rules), float(cfg.wd)
    names = [
        param_path(path) for path, _ in jax.tree_util.tree_leaves_with_path(meta.unbox(params))
    ]
    return {name: _rule_value(name, rules, default) for name in names}


# ----------------------------------------------------------------------------------------------
# The optimizer.


def _adafactor(c) -> optax.GradientTransformation:
    cap = c.beta2_cap

    def decay_rate_fn(step, exponent):
        # Adafactor's second-moment decay 1 - (t + 1)^-0.8, which tends to 1 (freezing the
        # estimate); capped at Adam's 0.999 as in Zhai et al. 2021 / big_vision.
        rate = 1.0 - (jnp.asarray(step, jnp.float32) + 1.0) ** (-exponent)
        return rate if cap is None else jnp.minimum(cap, rate)

    txs = [
        optax.scale_by_factored_rms(
            factored=True,
            decay_rate=c.decay_rate,
            step_offset=0,
            min_dim_size_to_factor=int(c.min_dim_size_to_factor),
            epsilon=c.eps,
            decay_rate_fn=decay_rate_fn,
        )
    ]
    if c.clipping_threshold:
        txs.append(optax.clip_by_block_rms(c.clipping_threshold))
    if c.momentum:
        txs.append(optax.ema(c.momentum, debias=False, accumulator_dtype=c.momentum_dtype))
    return optax.chain(*txs)


def _adamw(c) -> optax.GradientTransformation:
    return optax.scale_by_adam(b1=c.b1, b2=c.b2, eps=c.eps, mu_dtype=c.mu_dtype)


def _sgd(c) -> optax.GradientTransformation:
    if not c.momentum:
        return optax.identity()
    return optax.trace(decay=c.momentum, nesterov=c.nesterov, accumulator_dtype=c.momentum_dtype)


_CORES = {"adafactor": _adafactor, "adamw": _adamw, "sgd": _sgd}


def make_optimizer(
    cfg,
    params,
    total_steps: int,
) -> tuple[optax.GradientTransformation, Schedule]:
    """Builds the optimizer for `params` (a plain pytree, or a flax-boxed one) and its schedule.

    `params` is only read for its parameter paths (to validate and log the weight-decay rules);
    the returned transformation recomputes its masks from whatever tree it is given, so it works
    with abstract (`jax.eval_shape`) and sharded parameters alike. Returns `(tx, schedule)` where
    `schedule(step)` is the absolute learning rate used at update count `step`. `tx.update` needs
    the current params (`tx.update(grads, opt_state, params)`): Adafactor and the decay read them.
    """
    cfg = OptimConfig.of(cfg)
    schedule = make_schedule(cfg, total_steps)
    rules, default = _compile_rules(cfg.wd_rules), float(cfg.wd)

    assigned = wd_assignments(cfg, params)
    for regex, value in rules:
        if not any(regex.search(name) for name in assigned):
            log.warning("optim: wd_rules entry (%r, %r) matches no parameter", regex.pattern, value)
    log.info(
        "optim: %d params trainable, %d frozen",
        sum(v is not None for v in assigned.values()),
        sum(v is None for v in assigned.values()),
    )

    rule_map = functools.partial(_map_rule, rules=rules, default=default)
    decays = sorted({v for v in [default, *(v for _, v in rules)] if v})  # non-zero, non-frozen
    trainable = optax.chain(
        *([optax.clip_by_global_norm(cfg.grad_clip_norm)] if cfg.grad_clip_norm else []),
        _CORES[cfg.optimizer](getattr(cfg, cfg.optimizer)),
        *(
            optax.add_decayed_weights(
                wd, mask=functools.partial(rule_map, lambda v, wd=wd: v == wd)
            )
            for wd in decays
        ),
        optax.scale_by_learning_rate(schedule),
    )
    labels = functools.partial(rule_map, lambda v: "frozen" if v is None else "trainable")
    tx = optax.partition({"trainable": trainable, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule
