"""trainer/distributed.py: settings from config/env, and no second initialisation of a live
runtime."""

import jax
import ml_collections
import pytest

from trainer import distributed


def _cfg(**kw):
    base = dict(coordinator="", num_processes=0, process_id=-1, auto=False, cpu_collectives=False)
    return ml_collections.ConfigDict({**base, **kw})


@pytest.mark.parametrize("auto", [True, False])
def test_an_initialized_runtime_is_not_initialized_again(monkeypatch, auto):
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    cfg = _cfg(auto=auto, coordinator="127.0.0.1:1", num_processes=1 if auto else 2, process_id=0)
    assert distributed.initialize(cfg) is True and calls == []


def test_auto_initializes_once_and_single_process_not_at_all(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: bool(calls))
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    assert distributed.initialize(_cfg()) is False and calls == []
    assert (
        distributed.initialize(_cfg(auto=True)) is True
        and distributed.initialize(_cfg(auto=True)) is True
    )
    assert len(calls) == 1


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(num_processes=2, process_id=0), "distributed.coordinator"),
        (dict(num_processes=2, process_id=2, coordinator="h:1"), "process_id=2 must be in [0, 2)"),
    ],
)
def test_bad_settings_are_one_line(kw, message):
    with pytest.raises(ValueError) as e:
        distributed.settings(_cfg(**kw))
    assert message in str(e.value)
