"""`zeroshot` and `retrieval`: image-text evaluators of a two-tower (LiT) Task.

Both call the Task's `embed` predict function, `(params, frozen, batch) -> {"img", "txt"}` with
L2-normalised embeddings, and the stage's tokenizer (`ctx.loader_kwargs["tokenizer"]`; the
stage's loaders then carry `tokens` + `text_mask`).

zeroshot (LiT / CLIP): for each class, the text embeddings of the class name in every prompt
template are averaged and renormalised; an image's prediction is the class with the highest
similarity; correct when it is one of the image's labels (ReaL-style for multi-label data).

retrieval: image->text and text->image recall@k on a split with captions (each image's first
caption). A retrieved item counts when its caption is the query's caption (identical text), so
duplicate captions — several images described alike — are not counted as misses.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import jax
import numpy as np

from trainer import config_checks as checks
from trainer.evaluators import base

DEFAULT_TEMPLATES = ("a photo of {}.", "{}")


def _tokenizer(ctx: base.Context, kind: str):
    tok = ctx.loader_kwargs.get("tokenizer")
    if tok is None:
        raise ValueError(f"a {kind!r} evaluator needs a stage with a text tokenizer (e.g. lit)")
    return tok


def _embed_batches(evaluator: base.Evaluator, params, frozen, keys: Sequence[str]):
    """Per-batch host arrays of `keys` (embeddings and batch fields), padding rows dropped."""

    def fn(p, f, batch):
        z = evaluator.predict_fn(p, f, batch)
        return {k: (z[k] if k in z else batch[k]) for k in keys} | {"mask": batch["mask"]}

    if evaluator._step is None:
        evaluator._step = evaluator.ctx.jit(fn)
    for batch in evaluator._loader:
        got = jax.device_get(evaluator._step(params, frozen, batch))
        keep = np.asarray(got.pop("mask"), bool)
        yield {k: np.asarray(v)[keep] for k, v in got.items()}


class ZeroShot(base.Evaluator):
    pred = "embed"

    def __init__(
        self,
        predict_fn,
        *,
        ctx: base.Context,
        split: str,
        dataset: str = "",
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        class_names: Sequence[str] = (),
    ):
        super().__init__(predict_fn, ctx=ctx)
        self.tokenizer = _tokenizer(ctx, "zeroshot")
        self.split, self.dataset = split, dataset or ctx.dataset
        self.templates, self.class_names = tuple(templates), tuple(class_names)
        self._loader = self._step = None
        self._text = jax.jit(
            lambda p, f, tokens, mask: predict_fn(p, f, {"tokens": tokens, "text_mask": mask})[
                "txt"
            ]
        )

    @classmethod
    def check_values(cls, cfg: dict, where: str) -> None:
        templates = cfg.get("templates", DEFAULT_TEMPLATES)
        if not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
            raise checks.fail(
                f"{where}.templates",
                "need a non-empty list of strings with a '{}' for the class name",
            )

    def class_embeddings(self, params, frozen, names: Sequence[str]) -> np.ndarray:
        """[C, D]: per class, the mean of its prompts' text embeddings, renormalised."""
        prompts = [t.format(name) for name in names for t in self.templates]
        tokens, mask = self.tokenizer.encode(prompts)
        z = np.asarray(self._text(params, frozen, tokens, mask), np.float64).reshape(
            len(names), len(self.templates), -1
        )
        z = z.mean(axis=1)
        return z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)

    def run(self, params, frozen) -> Iterator[tuple[str, float]]:
        if self._loader is None:  # images only: the split needs no captions
            self._loader = self.ctx.loader(self.split, self.dataset, tokenizer=None)
            names = self.class_names or tuple(self._loader.manifest.class_names)
            if len(names) != self._loader.num_classes:
                raise ValueError(
                    f"zeroshot on {self.dataset}/{self.split}: {len(names)} class names for "
                    f"{self._loader.num_classes} classes"
                )
            self._names = names
        classes = self.class_embeddings(params, frozen, self._names)
        correct = count = 0
        for got in _embed_batches(self, params, frozen, ("img", "labels")):
            pred = np.argmax(got["img"] @ classes.T, axis=1)
            correct += int(np.sum(got["labels"][np.arange(len(pred)), pred] > 0))
            count += len(pred)
        yield "top1", correct / count


def recall_at_k(sims: np.ndarray, query_ids: np.ndarray, key_ids: np.ndarray, k: int) -> float:
    """Fraction of queries (rows of `sims`) whose k most similar keys include one with the query's
    id."""
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(key_ids[top] == query_ids[:, None], axis=1)))


class Retrieval(base.Evaluator):
    pred = "embed"

    def __init__(
        self,
        predict_fn,
        *,
        ctx: base.Context,
        split: str,
        dataset: str = "",
        ks: Sequence[int] = (1, 5),
    ):
        super().__init__(predict_fn, ctx=ctx)
        _tokenizer(ctx, "retrieval")
        self.split, self.dataset, self.ks = split, dataset or ctx.dataset, tuple(int(k) for k in ks)
        self._loader = self._step = None

    @classmethod
    def check_values(cls, cfg: dict, where: str) -> None:
        ks = cfg.get("ks", (1, 5))
        if not ks or not all(checks.is_int(k, 1) for k in ks):
            raise checks.fail(f"{where}.ks", f"need positive ints, got {ks!r}")

    def run(self, params, frozen) -> Iterator[tuple[str, float]]:
        if self._loader is None:
            self._loader = self.ctx.loader(self.split, self.dataset)
        parts = list(_embed_batches(self, params, frozen, ("img", "txt", "tokens")))
        zimg, ztxt, tokens = (
            np.concatenate([p[k] for p in parts]) for k in ("img", "txt", "tokens")
        )
        _, ids = np.unique(tokens, axis=0, return_inverse=True)  # same caption text = same id
        ids = ids.reshape(-1)
        sims = zimg.astype(np.float64) @ ztxt.astype(np.float64).T
        for k in self.ks:
            yield f"i2t_recall@{k}", recall_at_k(sims, ids, ids, k)
            yield f"t2i_recall@{k}", recall_at_k(sims.T, ids, ids, k)
