"""The evaluator contract (big_vision's `evaluators/common.py`, docs/DESIGN.md §2.8).

    ev = SomeEvaluator(predict_fn, ctx=ctx, **cfg)    # cfg: the eval's config minus type/every/pred
    for name, value in ev.run(params, frozen): ...      # the loop logs "<eval name>/<name>"

`predict_fn(params, frozen, batch)` is one of the Task's `predict` functions (the class's `pred`
attribute names the default one, a config's `pred` key another). `ctx` is what every evaluator
needs from the running stage: the mesh, where prepared splits are, image/batch size, decode
threads and the shardings of the parameters it is handed. The same classes run inside training
(trainer/loop.py) and in the evaluate stage.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any, Callable, Iterator

import jax

from trainer import sharding, step as step_lib


@dataclasses.dataclass(frozen=True)
class Context:
    mesh: Any
    split_dir: Callable[[str, str], Path]  # (dataset, split) -> a prepared split dir
    dataset: str  # the default dataset of `split`
    image_size: int
    batch_size: int  # global eval batch
    param_shardings: Any
    frozen_shardings: Any = dataclasses.field(default_factory=dict)
    read_threads: int = 2
    worker_count: int = 0
    class_names: tuple[str, ...] = ()  # the model's output classes (its training split's manifest)
    loader_kwargs: dict = dataclasses.field(
        default_factory=dict
    )  # the stage's, e.g. LiT's tokenizer

    def loader(
        self, split: str, dataset: str | None = None, image_size: int | None = None, **loader_kwargs
    ):
        """A re-iterable EvalLoader over one prepared split (padded batches with `mask`); keyword
        args override the stage's `loader_kwargs` (e.g. `tokenizer=None` for a split without
        text)."""
        from data import loader  # Grain: only where data is read

        return loader.eval_loader(
            self.split_dir(dataset or self.dataset, split),
            global_batch_size=self.batch_size,
            image_size=image_size or self.image_size,
            sharding=self.batch_sharding,
            read_threads=self.read_threads,
            worker_count=self.worker_count,
            **{**self.loader_kwargs, **loader_kwargs},
        )

    @property
    def batch_sharding(self):
        """`sharding.batch_sharding(mesh)`: the loaders' batches and `jit`'s batch argument."""
        return sharding.batch_sharding(self.mesh)

    def jit(self, fn: Callable) -> Callable:
        """Jits `fn(params, frozen, batch) -> sums` with these shardings (trainer/step.py)."""
        return step_lib.make_eval_step(
            fn, self.param_shardings, self.frozen_shardings, self.batch_sharding
        )


class Evaluator:
    """Base class: subclasses define `__init__(self, predict_fn, *, ctx, <their config keys>)` and
    `run(params, frozen) -> Iterator[(metric name, float)]`."""

    pred = "logits"  # the Task.predict entry used unless the config says `pred=...`

    def __init__(self, predict_fn: Callable, *, ctx: Context):
        self.predict_fn = predict_fn
        self.ctx = ctx

    def run(self, params, frozen) -> Iterator[tuple[str, float]]:
        raise NotImplementedError(f"{type(self).__name__}.run")

    @classmethod
    def check_values(cls, cfg: dict, where: str) -> None:
        """Plan-time checks of config values (keys are checked from the signature); override to add
        them. Raise ValueError with one line starting with `where.<key>`."""

    @classmethod
    def config_keys(cls) -> tuple[set[str], set[str]]:
        """(required, optional) config keys: the keyword-only parameters of __init__ after ctx."""
        params = [
            p
            for p in inspect.signature(cls.__init__).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "ctx"
        ]
        required = {p.name for p in params if p.default is inspect.Parameter.empty}
        return required, {p.name for p in params} - required


def sum_over(eval_step: Callable, params, frozen, batches) -> dict[str, float]:
    """Adds the per-batch sums of `eval_step` over every batch (on device), then to floats."""
    totals = None
    for batch in batches:
        sums = eval_step(params, frozen, batch)
        totals = (
            sums if totals is None else jax.tree_util.tree_map(lambda a, b: a + b, totals, sums)
        )
    if totals is None:
        raise ValueError("evaluation split is empty")
    return {k: float(v) for k, v in jax.device_get(totals).items()}
