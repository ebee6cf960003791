"""Orbax checkpoints: train state (params, opt_state, step, rng) + the Grain iterator (DESIGN §3).

Layout inside a stage output dir:
    checkpoints/<step>/{state,data}/   CheckpointManager items; a save is committed atomically by
                                       Orbax (a step dir exists only once complete)
    params/                            the final parameters alone (StandardCheckpointer)
    model.json                         {"variant", "overrides"}: rebuilds the model without the config

Resume order (big_vision / MaxText): own checkpoint > explicit `resume` > params-only `init_params`
> scratch; `initial_state` below implements it.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpoints:
    """A CheckpointManager with the two items every training stage saves: `state` and `data`."""

    def __init__(self, directory: Path, *, max_to_keep: int = 2, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any) -> None:
        """Starts a save (async for `state`); the iterator position is captured now."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)), force=True)

    def restore(self, abstract_state: Any, data_iterator: Any, step: int | None = None) -> tuple[Any, int]:
        """Restores `state` into the shardings of `abstract_state` and moves the iterator in place."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data_iterator)))
        return restored.state, step

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying target shardings: what Orbax restores into."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def save_params(directory: Path, params: Any) -> None:
    """Writes the final parameters alone (no optimizer state) for downstream stages."""
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(Path(directory).absolute(), params)
        ckpt.wait_until_finished()


def load_params(directory: Path, abstract_params: Any | None = None) -> Any:
    """Reads exported parameters, optionally straight into the given shapes/shardings."""
    directory = Path(directory).absolute()
    if not directory.exists():
        raise FileNotFoundError(f"params directory {directory} does not exist")
    with ocp.StandardCheckpointer() as ckpt:
        return ckpt.restore(directory, abstract_params) if abstract_params is not None else ckpt.restore(directory)


def write_model_json(path: Path, spec: dict) -> None:
    Path(path).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")


def read_model_json(path: Path) -> dict:
    path = Path(path)
    try:
        spec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read model spec ({e})") from None
    if not isinstance(spec, dict) or "variant" not in spec:
        raise ValueError(f"{path}: field 'variant' is missing")
    return spec


def initial_state(*, own: Checkpoints, resume: str, init_params: str, abstract_state: Any, data_iterator: Any,
                  init_fn: Callable[[], Any]) -> tuple[Any, str]:
    """The train state to start from and where it came from, in the documented resume order."""
    if own.latest_step() is not None:
        state, step = own.restore(abstract_state, data_iterator)
        return state, f"own checkpoint at step {step}"
    if resume:
        other = Checkpoints(Path(resume), async_save=False)
        try:
            state, step = other.restore(abstract_state, data_iterator)
        finally:
            other.close()
        return state, f"resumed from {resume} at step {step}"
    state = init_fn()
    if init_params:
        params = load_params(Path(init_params), abstract_state["params"])
        state = dict(state, params=params)
        return state, f"params initialized from {init_params}"
    return state, "scratch"
