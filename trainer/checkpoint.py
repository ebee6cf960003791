"""Orbax checkpoints: train state + the Grain iterator, final params (docs/DESIGN.md §3).

Layout inside a stage output dir:
    checkpoints/<step>/{state,data}/   CheckpointManager items; a save is committed atomically by
                                       Orbax (a step dir exists only once complete)
    params/                            the final parameters alone (StandardCheckpointer)
    model.json                         {"variant", "overrides"}: rebuilds the model without the
                                       config

`open_model(ref, where)` is the one reader of a model to start from, teach with, score or export:
a stage's output dir (model.json + params/) or a checkpoint file from elsewhere (trainer/interop/).

Resume order (big_vision / MaxText): own checkpoint > explicit `resume` > params-only `init_params`
> scratch; `initial_state` below implements it.

Elastic restore: `state` restores into whatever shardings the caller's abstract state carries (a
checkpoint written on a 4x2 mesh restores on 2x4, 8x1 or 4 devices); the Grain iterator state
(`data/process_<i>-of-<n>.json`, one per process) is a position in the loader's one global stream,
the same in every process, so a checkpoint written by n processes resumes on any other number
(`data_state`); processes that disagree are reported, never guessed. `load_params(dir)` without
shapes reads plain NumPy on one host, whatever mesh wrote the params.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any, Callable

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from data import paths
from trainer.interop import weights_import
from trainer.models.config import ViTConfig

log = logging.getLogger(__name__)


class Checkpoints:
    """A CheckpointManager with the two items every training stage saves: `state` and `data`."""

    def __init__(self, directory: Path, *, max_to_keep: int = 2, async_save: bool = True):
        self.directory = paths.absolute(directory)  # gs:// goes to Orbax as an epath.Path
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any) -> None:
        """Starts a save (async for `state`); the iterator position is captured now."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator),
            ),
            force=True,
        )

    def restore(
        self, abstract_state: Any, data_iterator: Any, step: int | None = None
    ) -> tuple[Any, int]:
        """Restores `state` into the shardings of `abstract_state` (any mesh) and moves the iterator
        in place (any process count, see `data_state`)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        # The iterator first: its prefetch then overlaps the state's read (Grain's advice).
        data_iterator.set_state(self.data_state(step))
        data_iterator.start_prefetch()
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
        return restored.state, step

    def data_state(
        self, step: int, process_index: int | None = None, process_count: int | None = None
    ) -> Any:
        """This process's Grain iterator state at `step`. Written by another number of processes:
        their common state (all processes of a run stand at the same global batch); a ValueError
        naming the files when they disagree or some are missing."""
        pi = jax.process_index() if process_index is None else process_index
        pc = jax.process_count() if process_count is None else process_count
        directory = self.directory / str(step) / "data"
        own = directory / f"process_{pi}-of-{pc}.json"
        if own.is_file():
            return json.loads(own.read_text())
        found = {}
        for path in sorted(directory.glob("process_*-of-*.json")):
            match = re.fullmatch(r"process_(\d+)-of-(\d+)\.json", path.name)
            if match:
                found[int(match[1]), int(match[2])] = json.loads(path.read_text())
        counts = sorted({n for _, n in found})
        if len(counts) != 1:
            raise ValueError(
                f"{directory}: no iterator state for process {pi} of {pc}; files for process "
                f"counts {counts or 'none'}"
            )
        written = counts[0]
        missing = sorted(set(range(written)) - {i for i, _ in found})
        if missing:
            raise ValueError(
                f"{directory}: written by {written} processes but process_{missing[0]}-of-"
                f"{written}.json is missing"
            )
        states = [found[i, written] for i in range(written)]
        if any(state != states[0] for state in states):
            differ = next(i for i, state in enumerate(states) if state != states[0])
            raise ValueError(
                f"{directory}: the {written} processes' iterator states differ (process 0: "
                f"{states[0]}, process {differ}: {states[differ]}); "
                f"cannot map them to {pc} processes"
            )
        log.warning(
            "%s: iterator state written by %d processes, resumed on %d: the same global batches "
            "follow (mixup pairs rows within a process, so its pairs change)",
            directory,
            written,
            pc,
        )
        return states[0]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying target shardings: what Orbax restores into."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def save_params(directory: Path, params: Any) -> None:
    """Writes the final parameters alone (no optimizer state) for downstream stages."""
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(paths.absolute(directory), params)
        ckpt.wait_until_finished()


def load_params(directory: Path, abstract_params: Any | None = None) -> Any:
    """Reads exported parameters straight into the given shapes/shardings, or, without them, as
    plain NumPy arrays on this host (no mesh, any device count; the saved shardings are ignored)."""
    directory = paths.absolute(directory)
    if not directory.exists():
        raise FileNotFoundError(f"params directory {directory} does not exist")
    if abstract_params is not None:
        with ocp.StandardCheckpointer() as ckpt:
            return ckpt.restore(directory, abstract_params)
    # Orbax 0.12 restores into the saved shardings unless told otherwise, and those name the
    # writer's devices ("Topology mismatch"): ask for NumPy per leaf of the saved tree instead.
    with ocp.PyTreeCheckpointer() as ckpt:
        tree = ckpt.metadata(directory).item_metadata.tree
        restore_args = jax.tree_util.tree_map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree
        )
        return ckpt.restore(directory, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def write_model_json(path: Path, spec: dict) -> None:
    paths.as_path(path).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")


def read_model_json(path: Path) -> dict:
    """A model.json as written (a ViT's {"variant", "overrides"}, or LiT's two towers); one-line
    ValueError naming the file when it is unreadable or not a JSON object."""
    path = paths.as_path(path)
    try:
        spec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read model spec ({e})") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: a model spec is a JSON object, got {type(spec).__name__}")
    return spec


@dataclasses.dataclass(frozen=True)
class OpenedModel:
    """A ViT opened by `open_model`: its architecture, its spec and its params on demand.

    `load(abstract=None)`: the params, placed into the shardings of `abstract` (ShapeDtypeStructs
    with shardings, `abstract_with_shardings`: every process reads only its slices), or without it
    as plain NumPy on this host (any mesh wrote them)."""

    config: ViTConfig  # a file: `arch` at the file's own image size and classes
    spec: dict  # model.json's content (a file: `config.to_json()`)
    kind: str  # "export" (a stage's model.json + params/) | "timm" | "npz" | "big_vision"
    source: str  # what was opened, for messages
    load: Callable[..., Any] = dataclasses.field(repr=False, compare=False)


def open_model(ref: Any, where: str, *, arch: ViTConfig | None = None) -> OpenedModel:
    """The one reader of a ViT to start from, teach with, score or export. `ref`: a stage's output
    dir (model.json + params/, local or a bucket URI), or a checkpoint file from elsewhere (a timm
    .safetensors or a dir holding model.safetensors, a big_vision or our .npz: trainer/interop/),
    read as the architecture `arch` (a file carries no model.json) at its own image size and
    classes; a file is read now, an export's params by `load`. Every error is one line:
    ValueError("<where>: <path>: <what is wrong and the fix>")."""
    if weights_import.is_foreign(ref):
        return _open_file(ref, where, arch)
    directory = paths.as_path(ref)
    file = directory / "model.json"
    if not file.exists():
        raise ValueError(
            f"{where}: {directory}: no model.json: not a stage's export (a training stage's "
            "output dir: model.json + params/) nor a .safetensors / .npz checkpoint file"
        )
    try:
        spec = read_model_json(file)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if spec.get("kind") == "lit":
        raise ValueError(
            f"{where}: {directory}: a LiT export (model.json kind 'lit'): its params/ hold the "
            "text tower only; open the export its locked image tower came from (lit.image_from)"
        )
    try:
        config = ViTConfig.from_spec(spec)
    except ValueError as e:
        raise ValueError(f"{where}: {file}: {e}") from None
    params = directory / "params"
    if not params.is_dir():
        raise ValueError(
            f"{where}: {params}: does not exist (the stage exported no params; rerun it)"
        )
    return OpenedModel(
        config, spec, "export", str(directory), lambda abstract=None: load_params(params, abstract)
    )


def _open_file(ref: Any, where: str, arch: ViTConfig | None) -> OpenedModel:
    if arch is None:
        raise ValueError(
            f"{where}: {ref}: a checkpoint file carries no model.json: name its architecture "
            "(the stage's model group: variant, e.g. 'B/16', + any differing field)"
        )
    source = str(ref)
    try:
        params, config, kind = weights_import.read(ref, arch)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"{where}: {e}") from None
    log.info(
        "%s: %s checkpoint %s read as %s (%dpx, %d classes)",
        where,
        kind,
        source,
        arch.variant,
        config.image_size,
        config.num_classes,
    )

    def load(abstract=None):
        if abstract is None:
            return params
        try:
            return weights_import.place(params, abstract, source)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    return OpenedModel(config, config.to_json(), kind, source, load)


def initial_state(
    *,
    own: Checkpoints,
    resume: str,
    init_params: str,
    abstract_state: Any,
    data_iterator: Any,
    init_fn: Callable[[], Any],
) -> tuple[Any, str]:
    """The train state to start from and where it came from, in the documented resume order."""
    if own.latest_step() is not None:
        state, step = own.restore(abstract_state, data_iterator)
        return state, f"own checkpoint at step {step}"
    if resume:
        other = Checkpoints(resume, async_save=False)
        try:
            state, step = other.restore(abstract_state, data_iterator)
        finally:
            other.close()
        return state, f"resumed from {resume} at step {step}"
    state = init_fn()
    if init_params:
        params = load_params(init_params, abstract_state["params"])
        state = dict(state, params=params)
        return state, f"params initialized from {init_params}"
    return state, "scratch"
