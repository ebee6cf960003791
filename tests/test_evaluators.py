"""The evaluator table and contract, and `classification` (top-1/top-5/loss/ReaL, mask-aware) on a
split the test writes, on a 4 x 2 mesh of simulated CPU devices."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from data import images, manifest, records
from pipelines import shards
from trainer import evaluators, losses, sharding

NUM_CLASSES = 5
# (label, real_labels): 10 records, some without a ReaL label (empty set).
ROWS = [
    (
        i % NUM_CLASSES,
        ((i + 1) % NUM_CLASSES,) if i % 3 == 0 else (() if i % 3 == 1 else (i % NUM_CLASSES,)),
    )
    for i in range(10)
]


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    split_dir = root / "toy" / "val"
    split_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    raws = [
        records.encode(
            records.Record(
                image=images.encode_png(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)),
                label=(label,),
                id=f"r{i:02d}",
                real_labels=real,
            )
        )
        for i, (label, real) in enumerate(ROWS)
    ]
    info = shards.write_shard("toy/val", str(split_dir), raws)
    name = os.path.basename(info.path)
    manifest.write(
        split_dir,
        manifest.Manifest(
            dataset="toy",
            split="val",
            num_records=len(raws),
            num_classes=NUM_CLASSES,
            class_names=[str(c) for c in range(NUM_CLASSES)],
            image_size=8,
            features=list(info.features),
            shards=[manifest.Shard(name, info.num_records, info.sha256)],
            dead_letters="dead_letters.jsonl",
            num_dead_letters=0,
            source={},
        ),
    )
    (split_dir / "dead_letters.jsonl").write_text("")
    return root


def _ctx(root, batch_size=8):
    mesh = sharding.make_mesh(data=4, model=2)
    return evaluators.Context(
        mesh=mesh,
        split_dir=lambda d, s: root / d / s,
        dataset="toy",
        image_size=8,
        batch_size=batch_size,
        param_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
    )


def _shifted_logits(params, frozen, batch):
    """Top class = label + 1 (wrong), second = the label: top-1 0, top-5 1; `params` scales them."""
    del frozen
    label = batch["label"]
    return params * (
        2.0 * jax.nn.one_hot((label + 1) % NUM_CLASSES, NUM_CLASSES)
        + jax.nn.one_hot(label, NUM_CLASSES)
    )


def test_classification_top1_top5_loss_real_over_a_padded_split(split):
    ev = evaluators.Classification(
        _shifted_logits, ctx=_ctx(split), split="val", loss="softmax_xent"
    )
    got = dict(ev.run(jnp.float32(1.0), {}))
    labels = np.array([r[0] for r in ROWS])
    logits = 2.0 * np.eye(NUM_CLASSES)[(labels + 1) % NUM_CLASSES] + np.eye(NUM_CLASSES)[labels]
    expected_loss = float(
        np.mean(losses.softmax_xent(jnp.asarray(logits), jnp.eye(NUM_CLASSES)[labels]))
    )
    real = [(label, r) for label, r in ROWS if r]
    expected_real = np.mean([(label + 1) % NUM_CLASSES in r for label, r in real])
    assert (
        got["top1"] == 0.0 and got["top5"] == 1.0
    )  # 10 records in 2 batches of 8: padding counted nowhere
    assert got["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert got["real_top1"] == pytest.approx(expected_real) and 0 < expected_real < 1
    # Re-running gives the same numbers (the loader is re-iterable, the jitted step reused).
    assert dict(ev.run(jnp.float32(1.0), {})) == got


def _evals(**entries):
    return ml_collections.ConfigDict({name: dict(e) for name, e in entries.items()})


@pytest.mark.parametrize(
    "entry,message",
    [
        (
            dict(type="nope", split="val"),
            "pretrain.evals.val.type='nope' is not an evaluator; known: classification",
        ),
        (
            dict(type="classification"),
            "pretrain.evals.val.split is required by a 'classification' evaluator",
        ),
        (
            dict(type="classification", split="val", spilt="x"),
            "pretrain.evals.val.spilt: unknown key",
        ),
        (
            dict(type="classification", split="val", every=-1),
            "pretrain.evals.val.every=-1 must be an int >= 0",
        ),
    ],
)
def test_table_lookup_errors_are_one_line_naming_the_key(entry, message):
    with pytest.raises(ValueError) as e:
        evaluators.check(_evals(val=entry), "pretrain.evals")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_build_picks_the_predict_function_and_rejects_an_unknown_one(split):
    evals = _evals(val=dict(type="classification", split="val", every=3))
    built = evaluators.build(evals, {"logits": _shifted_logits}, _ctx(split), "pretrain.evals")
    every, ev = built["val"]
    assert every == 3 and isinstance(ev, evaluators.Classification)
    with pytest.raises(
        ValueError, match="pretrain.evals.val.pred='logits': the task predicts only features"
    ):
        evaluators.build(evals, {"features": _shifted_logits}, _ctx(split), "pretrain.evals")
