"""Training durations and cadence: the one place that turns durations into steps.

Two helpers, after big_vision's `utils.steps` and `utils.itstime`:

- `total_steps` converts a duration given as steps, epochs or examples into an integer number
  of optimizer steps, so the rest of the trainer only ever deals with steps. It serves any
  duration (the run length, a warmup, a checkpoint interval ...), not only the run length.
- `itstime` decides whether a periodic action (log, eval, checkpoint) runs at a step.

Steps are 1-based here: `step` is the number of optimizer updates applied so far, so the first
update ends at step 1 and the last at step `total_steps`.
"""

from __future__ import annotations

from trainer import config_checks as checks

__all__ = ["total_steps", "itstime"]


def _to_integer(x: float) -> int:
    # Round to nearest, but never round a non-zero duration down to 0 steps: `epochs=1e-4` means
    # "at least one step", only an explicit 0 means none (big_vision's convention).
    return max(1, round(x)) if x else 0


def _check_number(name: str, value, *, positive: bool = False) -> float:
    if not checks.is_number(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return value


def total_steps(
    *,
    steps: int | None = None,
    epochs: float | None = None,
    examples: int | None = None,
    num_examples: int | None = None,
    batch_size: int,
) -> int:
    """Returns the number of optimizer steps for a duration given in exactly one unit.

    Args:
      steps: duration in optimizer steps (an integer; returned as is).
      epochs: duration in passes over the training set; needs `num_examples`.
      examples: duration in training examples seen.
      num_examples: size of one epoch of the training set, in examples.
      batch_size: global batch size (examples per step).

    Epoch and example durations are rounded to the nearest step, with any non-zero duration
    giving at least one step.

    Raises:
      ValueError: if not exactly one of steps/epochs/examples is given, or a value is invalid.
    """
    given = {
        k: v
        for k, v in (("steps", steps), ("epochs", epochs), ("examples", examples))
        if v is not None
    }
    if len(given) != 1:
        raise ValueError(
            "exactly one of steps/epochs/examples must be set, got "
            + (", ".join(f"{k}={v!r}" for k, v in given.items()) or "none")
        )
    if not checks.is_int(batch_size, 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    ((unit, value),) = given.items()
    _check_number(unit, value)

    if unit == "steps":
        if value != int(value):
            raise ValueError(f"steps must be a whole number, got {value!r}")
        return int(value)
    if unit == "examples":
        return _to_integer(value / batch_size)
    if num_examples is None:
        raise ValueError("epochs needs num_examples (the number of examples in one epoch)")
    _check_number("num_examples", num_examples, positive=True)
    return _to_integer(value * num_examples / batch_size)


def itstime(
    step: int,
    every: int | None,
    total_steps: int,  # pylint: disable=redefined-outer-name
    *,
    first: bool = False,
    last: bool = True,
) -> bool:
    """Whether a periodic action runs at (1-based) `step`.

    True when `step` is a multiple of `every`; also at step 1 when `first` (and `every` is set);
    and always at the last step (`step == total_steps`) when `last`, even with `every` unset.
    `every=None` or `0` means "never periodically".

    Unlike big_vision's `itstime` this has no notion of hosts (the caller decides who acts) and
    does not skip an action that falls just before the last step.
    """
    if every is not None and (isinstance(every, bool) or every < 0):
        raise ValueError(f"every must be None or >= 0, got {every!r}")
    is_last = last and step == total_steps
    if not every:
        return bool(is_last)
    return bool(step % every == 0 or (first and step == 1) or is_last)
