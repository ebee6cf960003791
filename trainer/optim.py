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

import functools
import logging
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.core import meta

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
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


def _defaults() -> dict:
    """The optimizer config group's complete key set with small-scale defaults, as plain dicts."""
    return dict(
        optimizer="adafactor",  # one of OPTIMIZERS
        lr=1e-3,  # peak learning rate
        schedule="rsqrt",  # one of SCHEDULES
        warmup_steps=0,  # linear warmup from 0 (all schedules)
        cooldown_steps=0,  # linear cooldown to 0 at the end (all schedules)
        timescale=10_000,  # rsqrt only: lr halves after 3 * timescale steps past warmup
        grad_clip_norm=1.0,  # clip gradients to this global norm; None = off
        wd=0.0,  # decoupled weight decay (lr-scaled) for params matching no rule
        wd_rules=[],  # [(regex, wd or None=frozen), ...]; first re.search match wins
        adafactor=dict(
            decay_rate=0.8,  # second-moment decay 1 - (t+1)^-decay_rate ...
            beta2_cap=0.999,  # ... capped here (Zhai et al. 2021); None = uncapped
            momentum=0.9,  # first momentum (EMA, not debiased); None/0 = off
            momentum_dtype="bfloat16",  # storage dtype of the momentum; None = param dtype
            min_dim_size_to_factor=32,  # factor v only if two dims are at least this big
            clipping_threshold=None,  # Adafactor update clipping (block RMS); None = off
            eps=1e-30,  # added to squared gradients
        ),
        adamw=dict(
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            mu_dtype=None,  # first-moment storage dtype, e.g. "bfloat16"; None = param dtype
        ),
        # SGD with (heavy-ball) momentum: big_vision's fine-tuning optimizer (`momentum_hp`, 0.9).
        sgd=dict(
            momentum=0.9,  # None/0 = plain SGD
            nesterov=False,
            momentum_dtype=None,  # storage dtype of the momentum, e.g. "bfloat16"; None = param dtype
        ),
    )


def default_config():
    """The optimizer config group (an ml_collections.ConfigDict): its complete key set with
    small-scale defaults. ml_collections is imported here, not at module level, so that building an
    optimizer from a plain dict (`make_optimizer({}, ...)`, the benchmarks on the GPU host) needs
    only jax/optax."""
    import ml_collections
    return ml_collections.ConfigDict(_defaults())


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


# ----------------------------------------------------------------------------------------------
# Config validation (no params or step counts needed: call it when a config is loaded).


def _fail(field: str, msg: str) -> ValueError:
    return ValueError(f"optim config field '{field}': {msg}")


def _check_real(field: str, value, *, allow_none: bool = False, positive: bool = False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise _fail(field, f"expected a finite number{' or None' if allow_none else ''}, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise _fail(field, f"must be {'> 0' if positive else '>= 0'}, got {value!r}")


def _check_dtype(field: str, value) -> None:
    if value is None:
        return
    try:
        jnp.dtype(value)
    except TypeError:
        raise _fail(field, f"unknown dtype {value!r}") from None


def _compile_rules(rules) -> list[tuple[re.Pattern, float | None]]:
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
        raise _fail("wd_rules", f"expected a list of (regex, value) pairs, got {rules!r}")
    compiled = []
    for i, rule in enumerate(rules):
        field = f"wd_rules[{i}]"
        if isinstance(rule, (str, bytes)) or not isinstance(rule, Sequence) or len(rule) != 2:
            raise _fail(field, f"expected a (regex, value) pair, got {rule!r}")
        pattern, value = rule
        if not isinstance(pattern, str):
            raise _fail(field, f"regex must be a string, got {pattern!r}")
        if pattern.startswith("/"):
            raise _fail(field, f"parameter paths never start with '/': {pattern!r}")
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise _fail(field, f"invalid regex {pattern!r}: {e}") from None
        _check_real(field, value, allow_none=True)
        compiled.append((regex, None if value is None else float(value)))
    return compiled


class _Fields(dict):
    """A validated config: plain nested dicts read by attribute (`cfg.lr`), no ml_collections."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _plain(cfg):
    """A ConfigDict (anything with `to_dict`) or nested Mapping as nested plain dicts."""
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    if isinstance(cfg, Mapping):
        return {k: _plain(v) for k, v in cfg.items()}
    return cfg


def _override(field: str, default, value):
    """`value` in place of `default`, typed as an ml_collections.ConfigDict field would be: None
    anywhere, an int where a float was, a tuple where a list was; else the default's type."""
    if value is None or default is None:
        return value
    if isinstance(default, float) and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, list) and isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(default, bool) and not isinstance(value, bool):
        ok = False
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ValueError(f"optim config: Could not override field '{field}': {value!r} is a "
                         f"{type(value).__name__}, the field holds a {type(default).__name__}")
    return value


def _merge(cfg, defaults: dict, prefix: str = "") -> _Fields:
    """`cfg` (partial) over `defaults`: unknown keys, non-mapping groups and mistyped values raise."""
    if not isinstance(cfg, Mapping):
        raise ValueError(f"optim config{' field ' + repr(prefix[:-1]) if prefix else ''}: "
                         f"expected a mapping, got {type(cfg).__name__}")
    for key in cfg:
        if key not in defaults:
            raise _fail(prefix + str(key), f"unknown key; known: {', '.join(defaults)}")
    out = _Fields()
    for key, default in defaults.items():
        if isinstance(default, dict):
            out[key] = _merge(cfg.get(key, {}), default, f"{prefix}{key}.")
        else:
            out[key] = _override(prefix + key, default, cfg[key]) if key in cfg else default
    return out


def _validated(cfg) -> _Fields:
    """`cfg` (a ConfigDict or a Mapping, possibly partial) merged over the defaults and checked."""
    full = _merge(_plain(cfg), _defaults())

    if full.optimizer not in OPTIMIZERS:
        raise _fail("optimizer", f"unknown optimizer {full.optimizer!r}; expected one of {OPTIMIZERS}")
    if full.schedule not in SCHEDULES:
        raise _fail("schedule", f"unknown schedule {full.schedule!r}; expected one of {SCHEDULES}")
    _check_real("lr", full.lr)
    _check_real("timescale", full.timescale, positive=True)
    for field in ("warmup_steps", "cooldown_steps"):
        value = full[field]
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise _fail(field, f"expected an integer >= 0, got {value!r}")
    _check_real("grad_clip_norm", full.grad_clip_norm, allow_none=True, positive=True)
    _check_real("wd", full.wd)
    _compile_rules(full.wd_rules)

    af = full.adafactor
    _check_real("adafactor.decay_rate", af.decay_rate, positive=True)
    if af.beta2_cap is not None and not 0.0 < af.beta2_cap <= 1.0:
        raise _fail("adafactor.beta2_cap", f"must be in (0, 1] or None, got {af.beta2_cap!r}")
    if af.momentum is not None and not 0.0 <= af.momentum < 1.0:
        raise _fail("adafactor.momentum", f"must be in [0, 1) or None, got {af.momentum!r}")
    _check_dtype("adafactor.momentum_dtype", af.momentum_dtype)
    _check_real("adafactor.min_dim_size_to_factor", af.min_dim_size_to_factor)
    _check_real("adafactor.clipping_threshold", af.clipping_threshold, allow_none=True, positive=True)
    _check_real("adafactor.eps", af.eps, positive=True)

    for field in ("b1", "b2"):
        if not 0.0 <= full.adamw[field] < 1.0:
            raise _fail(f"adamw.{field}", f"must be in [0, 1), got {full.adamw[field]!r}")
    _check_real("adamw.eps", full.adamw.eps, positive=True)
    _check_dtype("adamw.mu_dtype", full.adamw.mu_dtype)
    if full.sgd.momentum is not None and not 0.0 <= full.sgd.momentum < 1.0:
        raise _fail("sgd.momentum", f"must be in [0, 1) or None, got {full.sgd.momentum!r}")
    _check_dtype("sgd.momentum_dtype", full.sgd.momentum_dtype)
    return full


def validate_config(cfg):
    """Returns `cfg` merged over `default_config()`, checked, as an ml_collections.ConfigDict;
    raises a one-line ValueError. Accepts a partial config (missing keys take their defaults) but
    no unknown keys. (make_optimizer / make_schedule run the same checks without ml_collections.)
    """
    import ml_collections
    return ml_collections.ConfigDict(_validated(cfg))


# ----------------------------------------------------------------------------------------------
# Learning-rate schedule.


def _check_durations(cfg, total_steps: int) -> None:
    if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral) or total_steps < 0:
        raise ValueError(f"total_steps must be an integer >= 0, got {total_steps!r}")
    # Runs of 0/1 steps (evaluation only, debugging) may keep the config's warmup.
    if total_steps > 1 and cfg.warmup_steps >= total_steps:
        raise _fail("warmup_steps", f"{cfg.warmup_steps} must be < total_steps ({total_steps})")
    if total_steps > 1 and cfg.warmup_steps + cfg.cooldown_steps > total_steps:
        raise _fail("cooldown_steps", f"warmup_steps + cooldown_steps ({cfg.warmup_steps} + "
                    f"{cfg.cooldown_steps}) must be <= total_steps ({total_steps})")


def make_schedule(cfg, total_steps: int) -> Schedule:
    """Returns `schedule(step) -> float32 learning rate` (absolute, peak `cfg.lr`)."""
    cfg = _validated(cfg)
    _check_durations(cfg, total_steps)
    lr, kind = float(cfg.lr), cfg.schedule
    warmup, cooldown, timescale = int(cfg.warmup_steps), int(cfg.cooldown_steps), float(cfg.timescale)
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
        lambda path, _: fn(_rule_value(param_path(path), rules, default)), tree)


def wd_assignments(cfg, params) -> dict[str, float | None]:
    """`{param path: weight decay}` (None = frozen) for every parameter, e.g. to log at start."""
    cfg = _validated(cfg)
    rules, default = _compile_rules(cfg.wd_rules), float(cfg.wd)
    names = [param_path(path) for path, _ in jax.tree_util.tree_leaves_with_path(meta.unbox(params))]
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

    txs = [optax.scale_by_factored_rms(
        factored=True, decay_rate=c.decay_rate, step_offset=0,
        min_dim_size_to_factor=int(c.min_dim_size_to_factor), epsilon=c.eps,
        decay_rate_fn=decay_rate_fn)]
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
    cfg, params, total_steps: int,
) -> tuple[optax.GradientTransformation, Schedule]:
    """Builds the optimizer for `params` (a plain pytree, or a flax-boxed one) and its schedule.

    `params` is only read for its parameter paths (to validate and log the weight-decay rules);
    the returned transformation recomputes its masks from whatever tree it is given, so it works
    with abstract (`jax.eval_shape`) and sharded parameters alike. Returns `(tx, schedule)` where
    `schedule(step)` is the absolute learning rate used at update count `step`. `tx.update` needs
    the current params (`tx.update(grads, opt_state, params)`): Adafactor and the decay read them.
    """
    cfg = _validated(cfg)
    schedule = make_schedule(cfg, total_steps)
    rules, default = _compile_rules(cfg.wd_rules), float(cfg.wd)

    assigned = wd_assignments(cfg, params)
    for regex, value in rules:
        if not any(regex.search(name) for name in assigned):
            log.warning("optim: wd_rules entry (%r, %r) matches no parameter", regex.pattern, value)
    log.info("optim: %d params trainable, %d frozen", sum(v is not None for v in assigned.values()),
             sum(v is None for v in assigned.values()))

    rule_map = functools.partial(_map_rule, rules=rules, default=default)
    decays = sorted({v for v in [default, *(v for _, v in rules)] if v})  # non-zero, non-frozen
    trainable = optax.chain(
        *([optax.clip_by_global_norm(cfg.grad_clip_norm)] if cfg.grad_clip_norm else []),
        _CORES[cfg.optimizer](cfg[cfg.optimizer]),
        *(optax.add_decayed_weights(wd, mask=functools.partial(rule_map, lambda v, wd=wd: v == wd))
          for wd in decays),
        optax.scale_by_learning_rate(schedule),
    )
    labels = functools.partial(rule_map, lambda v: "frozen" if v is None else "trainable")
    tx = optax.partition({"trainable": trainable, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule
