"""data/loader.py on digits prepared by the real Beam job, on 8 simulated CPU devices."""

import json
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from data import images, loader, records
from data import manifest as manifest_lib
from pipelines import prepare, sources
from trainer import sharding

# One xdist worker (make test: --dist loadgroup) runs these: they share the module's `digits`.
pytestmark = pytest.mark.xdist_group("loader")


def _mesh(shape=(8, 1)):
    return jax.make_mesh(shape, ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _bsh(shape=(8, 1)):
    return sharding.batch_sharding(_mesh(shape))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """digits train/val/test at 32 px, stored losslessly (exact pixels), several shards."""
    out = tmp_path_factory.mktemp("prepared")
    cfg = prepare.default_config()
    cfg.datasets.digits.records_per_shard = 300
    cfg.datasets.digits.lossless = True
    prepare.prepare(cfg, out)
    return out / "digits"


def _train(split_dir, **kw):
    args = dict(global_batch_size=64, image_size=32, seed=0, sharding=_bsh())
    return loader.train_loader(split_dir, **{**args, **kw})


def _ids(ds):
    return [records.decode(raw).id for raw in ds]


def _host(batch):
    return {k: np.asarray(v) for k, v in batch.items()}


def test_round_trip_image_record_eval_batch(digits):
    """source pixels -> prepare -> ArrayRecord -> loader batch, exactly (lossless, 32 px)."""
    el = loader.eval_loader(digits / "test", global_batch_size=64, image_size=32, sharding=_bsh())
    ids = _ids(el.records)
    batch = _host(next(iter(el)))
    src = sources.DigitsSource(32)
    for row in range(0, 64, 9):
        index = int(ids[row].split("/")[1])
        expected = images.decode_scaled(next(src.read(index)).image)
        np.testing.assert_allclose(batch["image"][row], expected / 127.5 - 1, atol=1e-6)
        assert batch["label"][row] == index_label(index)
        assert (
            batch["labels"][row].argmax() == batch["label"][row] and batch["labels"][row].sum() == 1
        )


def index_label(index):
    return int(sources._digits()[1][index])


@pytest.mark.parametrize("shape", [(8, 1), (4, 2)])
def test_sharded_batch_feeds_jitted_function(digits, shape):
    tl = _train(digits / "train", sharding=_bsh(shape))
    batch = next(tl)
    assert batch["image"].shape == (64, 32, 32, 3) and batch["image"].dtype == jnp.float32
    assert batch["labels"].shape == (64, 10) and batch["label"].dtype == jnp.int32
    for arr in batch.values():
        assert arr.sharding.spec[0] in ("data", ("data",))
        assert {s.data.shape[0] for s in arr.addressable_shards} == {64 // shape[0]}
    assert float(batch["image"].min()) >= -1.0 and float(batch["image"].max()) <= 1.0

    w = jnp.ones((32 * 32 * 3, 10), jnp.float32) / 3072

    @jax.jit
    def loss(b):
        logits = b["image"].reshape(b["image"].shape[0], -1) @ w
        return -(jax.nn.log_softmax(logits) * b["labels"]).sum(-1).mean()

    h = _host(batch)
    logits = h["image"].reshape(64, -1) @ np.asarray(w)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(float(loss(batch)), -(logp * h["labels"]).sum(-1).mean(), rtol=1e-5)


def _rows(images_):
    return sorted(x.tobytes() for x in images_)


def test_two_processes_read_disjoint_parts_covering_the_split(digits):
    parts = [
        _train(digits / "train", process_index=i, process_count=2, augment={"flip": False})
        for i in range(2)
    ]
    single = _train(digits / "train", augment={"flip": False})
    # one epoch of 1438 = 22 global batches of 64 (+ 30 examples into the next epoch)
    halves = [[next(p.iterator)["image"] for _ in range(22)] for p in parts]
    whole = [next(single.iterator)["image"] for _ in range(22)]
    for step in range(22):  # each process contributes global/process_count rows per batch, and
        assert halves[0][step].shape == (32, 32, 32, 3)  # together they are the 1-process batch
        assert _rows(np.concatenate([halves[0][step], halves[1][step]])) == _rows(whole[step])
    seen = [_rows(np.concatenate(h)) for h in halves]
    assert not set(seen[0]) & set(seen[1])  # disjoint within the epoch
    with pytest.raises(RuntimeError, match="process_count=2 but jax.process_count\\(\\)=1"):
        next(parts[0])
    evals = [
        loader.eval_loader(
            digits / "val",
            global_batch_size=64,
            image_size=32,
            sharding=_bsh(),
            process_index=i,
            process_count=2,
        )
        for i in range(2)
    ]
    batches = [list(e.host_batches()) for e in evals]
    assert len(batches[0]) == len(batches[1]) == evals[0].num_batches == 3
    assert sum(int(b["mask"].sum()) for bs in batches for b in bs) == 179
    assert not set(_ids(evals[0].records)) & set(_ids(evals[1].records))


def test_eval_record_order_and_ids_follow_the_rows_of_two_processes(digits):
    """EvalLoader.record_order / record_ids: the record behind each real row of a pass in global
    row order (batch b = process 0's b-th local batch, then process 1's), whatever the count."""
    args = dict(global_batch_size=64, image_size=32, sharding=_bsh())
    evals = [
        loader.eval_loader(digits / "val", **args, process_index=i, process_count=2)
        for i in range(2)
    ]
    batches = [list(e.host_batches()) for e in evals]
    rows = [b["label"][b["mask"]] for step in zip(*batches) for b in step]  # global row order
    labels = np.concatenate(rows)
    order = evals[0].record_order()
    assert sorted(order.tolist()) == list(range(179))
    np.testing.assert_array_equal(order, evals[1].record_order())
    ids = evals[1].record_ids(labels, "val")
    paths = manifest_lib.read(digits / "val").shard_paths(digits / "val")
    source = grain.sources.ArrayRecordDataSource(paths)
    expected = [records.decode(source[int(i)]) for i in order]
    assert ids.tolist() == [r.id for r in expected]
    assert labels.tolist() == [r.label[0] for r in expected]
    one = loader.eval_loader(digits / "val", **args)
    assert one.record_order().tolist() == list(range(179))  # one process: record order
    with pytest.raises(RuntimeError, match="^val: rows and records are out of order"):
        evals[0].record_ids(np.roll(labels, 1), "val")


def test_resume_gives_exactly_the_same_batches(digits):
    a = _train(digits / "train", global_batch_size=256)
    for _ in range(4):
        next(a)
    state = a.get_state()
    json.dumps(state)  # checkpointable as JSON (what Grain's Orbax handler writes)
    expected = [_host(next(a)) for _ in range(4)]  # crosses the epoch boundary (1438 / 256)
    b = _train(digits / "train", global_batch_size=256)
    b.set_state(state)
    for want in expected:
        got = _host(next(b))
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_resume_through_orbax_checkpoint_manager(digits, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    a = _train(digits / "train", seed=3)
    next(a), next(a)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",))
    mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(a.iterator)))
    mngr.wait_until_finished()
    expected = [_host(next(a)) for _ in range(2)]
    b = _train(digits / "train", seed=3)
    mngr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(b.iterator)))
    for want in expected:
        np.testing.assert_array_equal(_host(next(b))["image"], want["image"])
    mngr.close()


def test_seeded_augmentation_is_reproducible(digits):
    first = _host(next(_train(digits / "train", seed=7)))
    again = _host(next(_train(digits / "train", seed=7)))
    other = _host(next(_train(digits / "train", seed=8)))
    np.testing.assert_array_equal(first["image"], again["image"])
    assert not np.array_equal(first["image"], other["image"])


def test_augmentation_is_per_record_not_per_batch_or_thread_count(digits):
    """A record's crop/flip depend only on the seed and its stream position: two batches of 32
    equal one batch of 64, whatever the number of decode threads."""
    big = _host(next(_train(digits / "train", seed=3, read_threads=1)))
    small = _train(
        digits / "train", seed=3, global_batch_size=32, sharding=_bsh((4, 2)), read_threads=3
    )
    halves = [_host(next(small)) for _ in range(2)]
    for key in ("image", "labels", "label"):
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), big[key])


def test_eval_pads_last_batch_and_is_reiterable(digits):
    el = loader.eval_loader(digits / "val", global_batch_size=64, image_size=32, sharding=_bsh())
    one, two = [_host(b) for b in el], [_host(b) for b in el]
    assert len(one) == el.num_batches == 3 and el.num_examples == 179
    assert [int(b["mask"].sum()) for b in one] == [64, 64, 51]
    assert (one[-1]["image"][51:] == -1).all() and (one[-1]["label"][51:] == -1).all()
    for x, y in zip(one, two):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    seen = np.concatenate([b["label"][b["mask"]] for b in one])
    ids = _ids(el.records)
    assert list(seen) == [index_label(int(i.split("/")[1])) for i in ids]  # source order


def test_mixup_and_no_inception_crop(digits):
    tl = _train(
        digits / "train", augment={"mixup_alpha": 0.4, "inception_crop": False, "flip": False}
    )
    b = _host(next(tl))
    np.testing.assert_allclose(b["labels"].sum(-1), 1.0, rtol=1e-6)
    assert (b["labels"].max(-1) >= 0.5).all() and (b["labels"].max(-1) < 1).any()
    assert b["image"].dtype == np.float32 and b["image"].min() >= -1 and b["image"].max() <= 1


def test_multiprocess_workers_match_in_process(digits):
    ref = _train(digits / "train", seed=5)
    want = [_host(next(ref)) for _ in range(3)]
    mp = _train(digits / "train", seed=5, worker_count=1)
    try:
        np.testing.assert_array_equal(_host(next(mp))["image"], want[0]["image"])
        state = mp.get_state()
        for w in want[1:]:
            np.testing.assert_array_equal(_host(next(mp))["image"], w["image"])
        mp.set_state(state)  # restore rewinds the worker too
        np.testing.assert_array_equal(_host(next(mp))["image"], want[1]["image"])
    finally:
        mp.close()


def test_bad_inputs_fail_clearly(digits, tmp_path):
    with pytest.raises(ValueError, match="global_batch_size=60 must be divisible"):
        _train(digits / "train", global_batch_size=60)
    with pytest.raises(ValueError, match="unknown key"):
        _train(digits / "train", augment={"mixup": 0.2})
    with pytest.raises(
        ValueError, match="global_batch_size=64 must be divisible by process_count=3"
    ):
        _train(digits / "train", process_index=0, process_count=3)
    for not_a_batch_sharding in (_mesh(), NamedSharding(_mesh((4, 2)), P("data", "model"))):
        with pytest.raises(ValueError, match=r"NamedSharding of the batch \(leading\) axis only"):
            _train(digits / "train", sharding=not_a_batch_sharding)
    with pytest.raises(ValueError, match="read_threads >= 1"):
        _train(digits / "train", read_threads=0)
    bad = tmp_path / "val"
    shutil.copytree(digits / "val", bad)
    obj = json.loads((bad / "manifest.json").read_text())
    obj["shards"][0]["sha256"] = "f" * 64
    (bad / "manifest.json").write_text(json.dumps(obj))
    with pytest.raises(manifest_lib.ManifestError, match="sha256 .* does not match"):
        loader.eval_loader(bad, global_batch_size=64, image_size=32, sharding=_bsh())
    with pytest.raises(manifest_lib.ManifestError, match="no manifest"):
        _train(tmp_path)
