"""The config checks every stage's plan-time `validate` is made of (launch/dag.py calls them before
anything runs): each raises one line, `ValueError("<key>: <what>, got <value>")`, so a bad key reads
the same whichever stage holds it.

    from trainer import config_checks as checks
    checks.positive_int(f"{where}.batch_size", cfg.batch_size)
    checks.mesh(f"{where}.mesh", cfg.mesh, ("data", "model"))      # positive ints, at most one -1
    checks.number(f"{where}.holdout", cfg.holdout, gt=0, lt=1, what="a fraction")
    raise checks.fail(f"{where}.teacher", "...")                     # a check of the stage's own

Standard library only (planning imports every stage's `validate`; the model's import closure has it
through trainer/sharding.py's `mesh_shape`). The prepare stage cannot use it: pipelines/ imports
only data/. `is_int` / `is_number` are the predicates, for checks with messages of their own.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Mapping, Sequence


def fail(key: str, message: str) -> ValueError:
    """The one-line error naming the key: raise it."""
    return ValueError(f"{key}: {message}")


def is_int(value, low: int | None = None) -> bool:
    """An integer (a bool is not one), >= `low` when given."""
    return (
        isinstance(value, numbers.Integral)
        and not isinstance(value, bool)
        and (low is None or value >= low)
    )


def is_number(value) -> bool:
    """A finite real number (a bool is not one)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def positive_int(key: str, value) -> None:
    if not is_int(value, 1):
        raise fail(key, f"must be a positive int, got {value!r}")


def int_at_least(key: str, value, low: int) -> None:
    if not is_int(value, low):
        raise fail(key, f"must be an int >= {low}, got {value!r}")


_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


def _bounds(gt, ge, lt, le) -> tuple[list, str]:
    """The bounds given, as [(operator, bound)] (a lower one first), and as text: "> 0",
    "in (0, 1]" or "" (none)."""
    given = [(op, b) for op, b in ((">", gt), (">=", ge), ("<", lt), ("<=", le)) if b is not None]
    if len(given) == 2:
        (low_op, low), (high_op, high) = given
        opening, closing = "(" if low_op == ">" else "[", ")" if high_op == "<" else "]"
        return given, f"in {opening}{low}, {high}{closing}"
    return given, " ".join(f"{op} {b}" for op, b in given)


def _within(value, bounds: list) -> bool:
    return is_number(value) and all(_OPS[op](value, b) for op, b in bounds)


def number(
    key: str, value, *, gt=None, ge=None, lt=None, le=None, none: bool = False, what: str = ""
) -> None:
    """A finite real number within the bounds given (`gt` >, `ge` >=, `lt` <, `le` <=); None too
    when `none`. The message says `must be [what ]<bounds>[ or None]`, e.g. "must be > 0", "must
    be a fraction in (0, 1)"; `what` defaults to "a finite number" when there are no bounds."""
    if value is None and none:
        return
    bounds, text = _bounds(gt, ge, lt, le)
    if not _within(value, bounds):
        what = " ".join(w for w in (what or ("" if text else "a finite number"), text) if w)
        raise fail(key, f"must be {what}{' or None' if none else ''}, got {value!r}")


def number_tuple(key: str, values, *, gt=None, ge=None) -> None:
    """A non-empty list or tuple of finite numbers, each within the bound."""
    bounds, text = _bounds(gt, ge, None, None)
    if not (
        isinstance(values, (list, tuple)) and values and all(_within(v, bounds) for v in values)
    ):
        shown = tuple(values) if isinstance(values, list) else values
        raise fail(key, f"must be a non-empty tuple of numbers {text}, got {shown!r}")


def boolean(key: str, value) -> None:
    if not isinstance(value, bool):
        raise fail(key, f"must be True or False, got {value!r}")


def one_of(key: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise fail(key, f"{value!r} is not one of {', '.join(map(str, choices))}")


def name(key: str, value, what: str = "a non-empty name") -> None:
    """A non-empty string (a dataset, a split, a stage)."""
    if not isinstance(value, str) or not value:
        raise fail(key, f"must be {what}, got {value!r}")


def names(key: str, values, what: str, *, empty: bool = True) -> None:
    """A list or tuple of non-empty strings; `empty=False`: at least one."""
    if not (
        isinstance(values, (list, tuple))
        and (empty or values)
        and all(isinstance(v, str) and v for v in values)
    ):
        raise fail(key, f"must be {what}, got {values!r}")


def mesh(key: str, sizes: Mapping[str, Any], axes: Sequence[str]) -> None:
    """`sizes[axis]` for each axis is a positive int or -1 (the devices left), at most one -1."""
    for axis in axes:
        value = sizes[axis]
        if value != -1 and not is_int(value, 1):
            raise fail(f"{key}.{axis}", f"must be a positive int or -1, got {value!r}")
    free = [a for a in axes if sizes[a] == -1]
    if len(free) > 1:
        raise fail(key, f"only one axis may be -1, got {', '.join(f'{a}=-1' for a in free)}")


def upstream(key: str, stage: str, stages: Mapping) -> None:
    """`stage` is upstream of this one (when the upstream is known: `stages` non-empty)."""
    if stages and stage not in stages:
        raise fail(
            key, f"{stage!r} is not upstream of this stage (upstream: {', '.join(sorted(stages))})"
        )


def prepared(key: str, dataset: str, prepare) -> None:
    """`dataset` is one the prepare stage's config group (`prepare.datasets`) produces."""
    if dataset not in prepare.datasets:
        raise fail(
            key,
            f"{dataset!r} is not prepared; prepare.datasets has "
            f"{', '.join(prepare.datasets) or 'nothing'}",
        )


def prepared_split(key: str, split: str, dataset: str, prepare) -> None:
    """`split` is one the prepare stage produces of `dataset` (a prepared one); a dataset with no
    `splits` listed has its source's natural splits, known only when it runs: anything passes."""
    known = tuple(prepare.datasets[dataset].splits)
    if known and split not in known:
        raise fail(
            key, f"{split!r} is not a split of prepared dataset {dataset!r} ({', '.join(known)})"
        )
