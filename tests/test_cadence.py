"""trainer.cadence: durations -> steps, and when periodic actions run."""

import pytest

from trainer import cadence


@pytest.mark.parametrize(
    "kw, want",
    [
        (dict(steps=500), 500),
        (dict(steps=0), 0),  # explicit zero: evaluation-only run
        (dict(steps=1e4), 10_000),  # whole floats (1e4 from a config) are fine
        (dict(examples=10_000), 39),  # 10_000 / 256 = 39.06 -> nearest
        (dict(examples=10_000 - 150), 38),  # 38.48 -> 38
        (dict(epochs=3, num_examples=1000), 12),  # 3 * 1000 / 256 = 11.72 -> 12
        (dict(epochs=1e-6, num_examples=1000), 1),  # non-zero never rounds to 0 steps
        (dict(epochs=0, num_examples=1000), 0),
        (dict(examples=0), 0),
    ],
)
def test_total_steps_units(kw, want):
    assert cadence.total_steps(batch_size=256, **kw) == want


def test_total_steps_returns_python_int():
    assert type(cadence.total_steps(epochs=2.5, num_examples=100, batch_size=10)) is int


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(), "exactly one of steps/epochs/examples.*none"),
        (dict(steps=10, epochs=1, num_examples=10), "exactly one.*steps=10, epochs=1"),
        (dict(epochs=1), "num_examples"),
        (dict(steps=-1), "steps must be >= 0"),
        (dict(steps=2.5), "whole number"),
        (dict(examples="10"), "examples must be a number"),
        (dict(epochs=1, num_examples=0), "num_examples must be > 0"),
    ],
)
def test_total_steps_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        cadence.total_steps(batch_size=32, **kw)


@pytest.mark.parametrize("batch_size", [0, -8, 2.0, True])
def test_total_steps_bad_batch_size(batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        cadence.total_steps(steps=1, batch_size=batch_size)


def _when(every, total, **kw):
    return [s for s in range(1, total + 1) if cadence.itstime(s, every, total, **kw)]


def test_itstime_every_and_last():
    assert _when(10, 35) == [10, 20, 30, 35]
    assert _when(10, 30) == [10, 20, 30]  # last coincides with a multiple: once
    assert _when(10, 35, last=False) == [10, 20, 30]


def test_itstime_first():
    assert _when(10, 25, first=True) == [1, 10, 20, 25]
    assert _when(10, 25, first=True, last=False) == [1, 10, 20]
    assert _when(1, 3, first=True) == [1, 2, 3]


@pytest.mark.parametrize("every", [None, 0])
def test_itstime_never_except_last(every):
    assert _when(every, 12) == [12]
    assert _when(every, 12, first=True) == [12]  # `first` needs a period, like big_vision
    assert _when(every, 12, last=False) == []


def test_itstime_every_longer_than_run():
    assert _when(100, 7) == [7]


def test_itstime_bad_every():
    with pytest.raises(ValueError, match="every"):
        cadence.itstime(3, -5, 10)
