"""The `lit` stage: locked-image text tuning (LiT, Zhai et al. 2022) as a Task on the loop.

    python -m launch.run --config launch/configs/tiny.py --stages lit

The image tower is an exported ViT (`image_from`: "pretrain" or a "finetune/<run>"), LOCKED: its
params are the Task's frozen params (a jit argument sharded by the rules table, never optimised,
never checkpointed, bit-identical after training). The image embedding is its pre-logits. A text
transformer (trainer/models/text.py, sizes from the ViT variant table via `model.variant`) is
trained from scratch to map captions into that space. Both embeddings are L2-normalised; the loss
is the symmetric softmax contrastive loss with a learned log-temperature initialised at log(10)
(`loss="softmax"`), or SigLIP's sigmoid loss with a learned bias (`loss="sigmoid"`), over the
global batch (the jitted step sees the whole sharded batch; XLA gathers the embeddings).

The tokenizer (data/tokenizer.py, byte-level) is sized on the training split's captions and saved
as `tokenizer.json` in the stage dir; zero-shot and retrieval evaluators reuse it.
`model.json` = {"kind": "lit", "image": <image tower spec>, "text": <text tower spec>,
"vocab_size", "tokenizer": "tokenizer.json"}.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections

from data import manifest, records
from data import tokenizer as tokenizer_lib
from trainer import config_checks as checks
from trainer import checkpoint, flops, loop, losses, stage_config
from trainer.models import text, vit
from trainer.task import Frozen, Task

LOSSES = ("softmax", "sigmoid")
TEMPLATES = ("a photo of {}.", "{}", "an image of {}.")


def default_config() -> ml_collections.ConfigDict:
    c = stage_config.training_group(
        variant="mu"
    )  # the TEXT tower's size: a ViT variant name, no patch
    c.image_from = (
        "pretrain"  # the locked image tower: a params-exporting stage (the DAG edge follows it)
    )
    c.loss = "softmax"  # | "sigmoid" (SigLIP)
    c.temperature_init = 10.0  # LiT: log-temperature starts at log(10)
    c.bias_init = -10.0  # SigLIP only
    c.max_len = 0  # caption tokens; 0 = sized from the training captions
    c.data.augment.inception_crop = (
        False  # LiT pre-computes nothing, but a locked tower wants its own view
    )
    c.data.augment.flip = False
    c.optim.optimizer = "adamw"  # our choice (big_vision's LiT configs: Adafactor-style, lr 1e-3)
    c.optim.lr = 1e-3
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 100
    c.optim.wd = 1e-4
    c.evals.zeroshot = ml_collections.ConfigDict(
        dict(type="zeroshot", split="val", every=100, templates=list(TEMPLATES))
    )
    c.evals.retrieval = ml_collections.ConfigDict(dict(type="retrieval", split="val", every=100))
    return c


def validate(cfg, upstream=None, where: str = "lit") -> None:
    stage_config.check(cfg, where, upstream, model=False)
    try:
        text.make_config(
            cfg.model.variant, max_len=max(cfg.max_len, 3), embed_dim=8, **_overrides(cfg)
        )
    except (ValueError, TypeError) as e:
        raise checks.fail(f"{where}.model", str(e)) from None
    checks.one_of(f"{where}.loss", cfg.loss, LOSSES)
    checks.number(f"{where}.temperature_init", cfg.temperature_init, gt=0)
    if cfg.max_len:
        checks.number(
            f"{where}.max_len",
            cfg.max_len,
            ge=3,
            le=tokenizer_lib.MAX_LEN_CAP,
            what="0 (from the captions) or",
        )
    source = (upstream or {}).get(cfg.image_from)
    if upstream and source is not None:
        if "model" not in source:
            raise checks.fail(
                f"{where}.image_from", f"stage {cfg.image_from!r} exports no model params"
            )
        if source.data.image_size != cfg.data.image_size:
            raise checks.fail(
                f"{where}.data.image_size",
                f"{cfg.data.image_size} differs from the locked image tower's "
                f"{source.data.image_size} ({cfg.image_from})",
            )


def _overrides(cfg) -> dict:
    return {k: v for k, v in cfg.model.items() if k != "variant" and v is not None}


def fit_tokenizer(cfg, split_dir: Path, sample: int = 10_000) -> tokenizer_lib.ByteTokenizer:
    """The byte tokenizer sized on the training split's captions (a clear error if it has none);
    at most `sample` evenly spaced records are read, enough for a length percentile."""
    m = manifest.read(split_dir)
    where = f"lit: {cfg.data.dataset}/{cfg.data.train_split}"
    if "text" not in m.features:
        raise ValueError(
            f"{where} has no `text` field: LiT needs captions (prepare a source with captions)"
        )
    import grain

    source = grain.sources.ArrayRecordDataSource(m.shard_paths(split_dir))
    step = max(1, len(source) // sample)
    captions = [
        c for i in range(0, len(source), step) for c in (records.decode(source[i]).text or ())
    ]
    return tokenizer_lib.ByteTokenizer.fit(captions, cfg.max_len, where=where)


def _normalize(z):
    return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)


def make_task(cfg, export_dir: Path, tok: tokenizer_lib.ByteTokenizer) -> Task:
    image = checkpoint.open_model(export_dir, "lit.image_from")
    image_cfg = image.config
    if image_cfg.image_size != cfg.data.image_size:
        raise ValueError(
            f"lit.data.image_size={cfg.data.image_size} differs from the locked image tower's "
            f"{image_cfg.image_size}"
        )
    embed_dim = image_cfg.representation_size or image_cfg.width
    text_cfg = text.make_config(
        cfg.model.variant, max_len=tok.max_len, embed_dim=embed_dim, **_overrides(cfg)
    )
    image_tower, text_tower = vit.ViT(image_cfg), text.TextTower(text_cfg, tok.vocab_size)
    sigmoid = cfg.loss == "sigmoid"

    def init(rng):
        tokens = jnp.zeros((1, tok.max_len), jnp.int32)
        params = {
            "txt": text_tower.init(rng, tokens, tokens > 0)["params"],
            "t": jnp.asarray(math.log(cfg.temperature_init), jnp.float32),
        }
        if sigmoid:
            params["b"] = jnp.asarray(cfg.bias_init, jnp.float32)
        return params

    def embed(params, frozen, batch):
        """{"img": [B, D], "txt": [B, D]} (L2-normalised) for whichever of image/tokens the
        batch has."""
        out = {}
        if "image" in batch:
            out["img"] = _normalize(
                image_tower.apply({"params": frozen}, batch["image"])[1]["pre_logits"].astype(
                    jnp.float32
                )
            )
        if "tokens" in batch:
            out["txt"] = _normalize(
                text_tower.apply({"params": params["txt"]}, batch["tokens"], batch["text_mask"])[0]
            )
        return out

    def loss(params, frozen, batch, rng):
        del rng
        z = embed(params, frozen, batch)
        zimg = jax.lax.stop_gradient(
            z["img"]
        )  # locked: no gradient flows into (or is computed for) it
        value = (
            losses.contrastive_sigmoid(zimg, z["txt"], params["t"], params["b"])
            if sigmoid
            else losses.contrastive_softmax(zimg, z["txt"], params["t"])
        )
        sims = zimg @ z["txt"].T
        hits = jnp.argmax(sims, axis=1) == jnp.arange(sims.shape[0])
        return value, {
            "temperature": jnp.exp(params["t"]),
            "train_i2t_top1": jnp.mean(hits.astype(jnp.float32)),
        }

    model_spec = {
        "kind": "lit",
        "image": image_cfg.to_json(),
        "text": text_cfg.to_json(),
        "vocab_size": tok.vocab_size,
        "tokenizer": "tokenizer.json",
    }
    # Text tower trained (fwd + bwd) + image tower forward only.
    per_example = flops.text_flops_per_example(text_cfg) + flops.model_flops_per_example(
        image_cfg, train=False
    )
    return Task(
        name="lit",
        init=init,
        loss=loss,
        predict={"embed": embed},
        frozen=Frozen(vit.abstract_params(image_cfg), image.load),
        flops_per_example=per_example,
        model_spec=model_spec,
    )


def run(cfg, inputs: dict, out: Path) -> dict:
    validate(cfg, None, "lit")
    if cfg.image_from not in inputs:
        raise ValueError(
            f"lit.image_from={cfg.image_from!r}: no such upstream output "
            f"(inputs: {', '.join(inputs) or 'none'})"
        )
    train_dir = loop.split_dir(cfg, inputs, cfg.data.dataset, cfg.data.train_split, stage="lit")
    tok = fit_tokenizer(cfg, train_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)  # the DAG made it; a direct call may not have
    tok.save(out / "tokenizer.json")
    export = inputs[cfg.image_from].path
    result = loop.run(
        cfg,
        inputs,
        out,
        lambda env: make_task(cfg, export, tok),
        stage="lit",
        loader_kwargs={"tokenizer": tok},
    )
    result["artifacts"]["tokenizer"] = "tokenizer.json"
    return result
