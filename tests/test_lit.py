"""LiT: tokenizer, contrastive losses, recall@k, text through the loader, and the lit stage end to
end (locked tower bit-identical and absent from optimizer state/checkpoints, zero-shot above
chance)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data import loader
from data import tokenizer as tokenizer_lib
from launch.configs import tiny
from trainer import checkpoint, lit, losses, sharding
from trainer.evaluators import zeroshot
from trainer.models import vit

import stage_resume
from test_loop import _state_leaves


def test_tokenizer_round_trips_and_rejects_an_empty_caption_set(tmp_path):
    tok = tokenizer_lib.ByteTokenizer.fit(["a handwritten seven", "the digit 7", "é ü"])
    tokens, mask = tok.encode(["a handwritten seven", "é ü", ""])
    assert (
        tokens.dtype == np.int32 and tokens.shape == (3, tok.max_len) and mask[2].sum() == 2
    )  # BOS EOS
    assert tok.decode(tokens[0]) == "a handwritten seven" and tok.decode(tokens[1]) == "é ü"
    assert tokens[0, 0] == tokenizer_lib.BOS and tokens[0, mask[0].sum() - 1] == tokenizer_lib.EOS
    long, _ = tokenizer_lib.ByteTokenizer(8).encode(["abcdefghijkl"])
    assert long[0, -1] == tokenizer_lib.EOS  # truncated, EOS kept
    tok.save(tmp_path / "tok.json")
    assert tokenizer_lib.load(tmp_path / "tok.json") == tok
    with pytest.raises(ValueError, match="digits/train: no captions"):
        tokenizer_lib.ByteTokenizer.fit([], where="digits/train")


def _reference_softmax_loss(zimg, ztxt, t):
    logits = zimg @ ztxt.T * np.exp(t)

    def xent(l):  # row-wise softmax cross-entropy, positives on the diagonal
        l = l - l.max(axis=1, keepdims=True)
        return -np.mean(np.diag(l) - np.log(np.exp(l).sum(axis=1)))

    return 0.5 * (xent(logits) + xent(logits.T))


def test_contrastive_losses_equal_numpy_and_are_symmetric():
    rng = np.random.default_rng(0)
    zimg, ztxt = (z / np.linalg.norm(z, axis=1, keepdims=True) for z in rng.normal(size=(2, 6, 4)))
    t = np.log(10.0)
    got = float(losses.contrastive_softmax(jnp.asarray(zimg), jnp.asarray(ztxt), jnp.asarray(t)))
    assert got == pytest.approx(_reference_softmax_loss(zimg, ztxt, t), rel=1e-5)
    assert got == pytest.approx(
        float(losses.contrastive_softmax(jnp.asarray(ztxt), jnp.asarray(zimg), t)), rel=1e-6
    )
    logits = zimg @ ztxt.T * 10.0 - 10.0
    labels = 2 * np.eye(6) - 1
    ref = -np.sum(np.log(1 / (1 + np.exp(-labels * logits)))) / 6
    assert float(losses.contrastive_sigmoid(zimg, ztxt, t, -10.0)) == pytest.approx(ref, rel=1e-5)


def test_recall_at_k_equals_a_hand_computed_fixture():
    sims = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8], [0.1, 0.7, 0.6]])
    ids = np.array([0, 1, 2])
    # row 0: top1 = 0 (hit); row 1: top1 = 2 (miss), top2 = {2, 1} (hit); row 2: top1 = 1 (miss),
    # top2 hit.
    assert zeroshot.recall_at_k(sims, ids, ids, 1) == pytest.approx(1 / 3)
    assert zeroshot.recall_at_k(sims, ids, ids, 2) == pytest.approx(1.0)
    # Identical captions share an id: rows 1 and 2 retrieve each other's (identical) caption: hits.
    assert zeroshot.recall_at_k(sims, np.array([0, 1, 1]), np.array([0, 1, 1]), 1) == pytest.approx(
        1.0
    )
    # Keys relabelled [2, 1, 0]. Top-1: row 0 -> key 0 (id 2), row 1 -> key 2 (id 0),
    # row 2 -> key 1 (id 1): no hit. Top-2: row 0 {key 0, key 2} = ids {2, 0} hit;
    # row 1 {2, 1} = {0, 1} hit; row 2 {1, 2} = {1, 0} miss.
    assert zeroshot.recall_at_k(sims, ids, np.array([2, 1, 0]), 1) == 0.0
    assert zeroshot.recall_at_k(sims, ids, np.array([2, 1, 0]), 2) == pytest.approx(2 / 3)


def test_loader_yields_caption_tokens_and_rejects_a_split_without_text(prepared_digits, tmp_path):
    tok = tokenizer_lib.ByteTokenizer(40)
    mesh = sharding.make_mesh(data=8, model=1)
    split = prepared_digits / "digits" / "train"
    kw = dict(
        global_batch_size=16,
        image_size=32,
        seed=0,
        sharding=sharding.batch_sharding(mesh),
        tokenizer=tok,
    )
    batch = next(loader.train_loader(split, **kw).iterator)
    again = next(loader.train_loader(split, **kw, read_threads=1).iterator)
    np.testing.assert_array_equal(
        batch["tokens"], again["tokens"]
    )  # the draw depends on positions only
    captions = [tok.decode(row) for row in batch["tokens"]]
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for caption, label in zip(captions, batch["label"]):
        assert words[label] in caption or str(label) in caption, caption
    assert len(set(captions)) > 5 and batch["text_mask"].sum(axis=1).min() >= 3
    # A split without captions: one line naming it.
    from pipelines import prepare

    cfg = prepare.default_config()
    cfg.datasets.digits.source = "digits"
    no_text = tmp_path / "plain"
    (no_text / "digits" / "val").mkdir(parents=True)
    m = json.loads((prepared_digits / "digits" / "val" / "manifest.json").read_text())
    m["features"] = [f for f in m["features"] if f != "text"]
    for shard in m["shards"]:
        os.symlink(
            prepared_digits / "digits" / "val" / shard["path"],
            no_text / "digits" / "val" / shard["path"],
        )
    (no_text / "digits" / "val" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"split digits/val has no `text` field") as e:
        loader.eval_loader(
            no_text / "digits" / "val",
            global_batch_size=16,
            image_size=32,
            sharding=sharding.batch_sharding(mesh),
            tokenizer=tok,
        )
    assert "\n" not in str(e.value)


def _lit_cfg(prepared_digits, **overrides):
    cfg = tiny.lit_config()
    cfg.data.prepared_dir = str(prepared_digits)
    cfg.update_from_flattened_dict(overrides)
    return cfg


def test_lit_trains_a_text_tower_against_a_locked_image_tower(
    prepared_digits, pretrain_export, tmp_path
):
    cfg = _lit_cfg(prepared_digits, **{"runtime.async_checkpoint": False})
    result = lit.run(cfg, {"pretrain": pretrain_export}, tmp_path)
    m = result["metrics"]
    assert m["zeroshot/top1"] > 0.3, m  # 10 classes: chance 0.1
    # Each digit has 8 caption templates the image cannot tell apart, so even a perfect model finds
    # its image's exact caption at rank 1 only ~1/8 of the time; chance at 5 is ~5 x 2.2 / 179
    # ~ 0.06.
    assert m["retrieval/i2t_recall@5"] > 0.12 and m["retrieval/t2i_recall@5"] > 0.3, m
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert train[-1]["loss"] < train[0]["loss"] and "temperature" in train[-1]
    # The locked tower is neither trained nor checkpointed: the state holds the text tower + t only.
    spec = json.loads((tmp_path / "model.json").read_text())
    assert spec["kind"] == "lit" and (tmp_path / spec["tokenizer"]).exists()
    exported = checkpoint.load_params(tmp_path / "params")
    assert set(exported) == {"txt", "t"}
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    leaves = _state_leaves(tmp_path / "checkpoints" / str(steps[-1]))
    assert {k[1] for k in leaves if k[0] == "params"} == {"txt", "t"}
    n_trained = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(exported))
    assert sum(int(np.prod(s)) for k, s in leaves.items() if k[0] == "params") == n_trained
    image_cfg = vit.ViTConfig.from_spec(spec["image"])
    n_image = vit.count_params(vit.abstract_params(image_cfg))
    opt = sum(int(np.prod(s)) for k, s in leaves.items() if k[0] == "opt_state")
    assert (
        2 * n_trained <= opt <= 2 * n_trained + 16 < 2 * n_image
    )  # Adam's mu and nu of the text tower only
    # ... and the image embeddings LiT trained against are the export's own pre-logits.
    bsh = sharding.batch_sharding(sharding.make_mesh(data=8, model=1))
    batch = next(
        iter(
            loader.eval_loader(
                prepared_digits / "digits" / "val",
                global_batch_size=16,
                image_size=32,
                sharding=bsh,
            )
        )
    )
    image_params = checkpoint.load_params(pretrain_export.path / "params")
    pre = vit.ViT(image_cfg).apply({"params": image_params}, batch["image"])[1]["pre_logits"]
    task = lit.make_task(cfg, pretrain_export.path, tokenizer_lib.load(tmp_path / "tokenizer.json"))
    z = task.predict["embed"](exported, image_params, {"image": batch["image"]})["img"]
    np.testing.assert_allclose(
        z, pre / np.linalg.norm(pre, axis=1, keepdims=True), rtol=1e-5, atol=1e-6
    )


def test_bad_lit_configs_are_one_line(prepared_digits, pretrain_export, tmp_path):
    for overrides, message in (
        ({"loss": "hinge"}, "lit.loss"),
        ({"model.variant": "Z"}, "lit.model"),
        ({"max_len": 1}, "lit.max_len"),
        ({"image_from": "nope"}, "lit.image_from='nope'"),
    ):
        with pytest.raises(ValueError) as e:
            lit.run(_lit_cfg(prepared_digits, **overrides), {"pretrain": pretrain_export}, tmp_path)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_tfds_captions_become_record_text():
    from pipelines import tfds_source

    src = object.__new__(tfds_source.TfdsSource)  # the conversion alone: no TFDS data dir needed
    src.mapping = {
        "image": "image",
        "label": None,
        "real_labels": None,
        "attributes": None,
        "text": "captions/text",
    }
    src.id_key, src.attribute_names = "id", ()
    ex = {"id": (b"img1",), "image": (b"jpeg",), "captions/text": (b"a dog", b"a dog on grass")}
    assert src._convert(ex, "x__0").text == ("a dog", "a dog on grass")
    missing = src._convert({"id": (b"img2",), "image": (b"jpeg",)}, "x__1")
    assert missing.error == ("bad_metadata", "no caption in 'captions/text'")


RESUME_WORKER = """
import json, sys
from pathlib import Path
from launch.configs import tiny
from launch.stage_types import StageOutput
from trainer import lit
data_dir, export_dir, out = sys.argv[1:4]
cfg = tiny.lit_config()
cfg.data.prepared_dir = data_dir
cfg.steps, cfg.checkpoint_every, cfg.evals.zeroshot.every, cfg.evals.retrieval.every = 16, 4, 0, 0
cfg.runtime.log_every, cfg.runtime.async_checkpoint = 4, False
inputs = {"pretrain": StageOutput("pretrain", "0" * 64, Path(export_dir), {})}
print("RESULT", json.dumps(lit.run(cfg, inputs, Path(out))["metrics"]))
"""


@pytest.mark.slow
def test_sigkill_mid_lit_then_rerun_resumes_bit_identically(
    prepared_digits, pretrain_export, tmp_path
):
    metrics = stage_resume.kill_resume_and_compare(
        RESUME_WORKER, (prepared_digits, pretrain_export.path), tmp_path, kill_after_step=8
    )
    assert metrics["start_step"] >= 8 and metrics["steps"] == 16


def test_text_tower_flops_count_a_sequence_not_a_grid():
    from trainer import flops
    from trainer.models import text

    cfg = text.make_config("mu", max_len=16, embed_dim=64, depth=1)
    d, m = cfg.width, cfg.mlp_dim
    matmuls = 4 * d * d + 2 * d * m  # q, k, v, out + the MLP
    expected = 3 * (2 * matmuls * 16 + 4 * 16 * 16 * d + 2 * d * 64)
    assert flops.text_flops_per_example(cfg) == expected
    assert flops.text_flops_per_example(cfg, train=False) == expected / 3
