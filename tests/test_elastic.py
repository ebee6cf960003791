"""Elastic restore: a checkpoint written on one mesh / process count resumes on another, and
exported params load as plain NumPy on one CPU device with no mesh (trainer/checkpoint.py).

The checkpoint is the loop's own layout (`checkpoints/<step>/{state,data}` via
checkpoint.Checkpoints), written from the real pretrain Task's train step on the tiny config's
4 x 2 mesh over the shared prepared digits.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from data import loader
from launch.configs import tiny
from trainer import checkpoint, pretrain, sharding
from trainer import step as step_lib

REPO = Path(__file__).resolve().parents[1]
SAVED_AT, MORE = 2, 2  # steps before the checkpoint, steps trained after it
# One xdist worker (make test: --dist loadgroup) runs these: they share the module's `written`.
pytestmark = pytest.mark.xdist_group("elastic")


def _cfg():
    cfg = tiny.pretrain_config()
    cfg.optim.warmup_steps, cfg.optim.cooldown_steps = 2, 0
    cfg.model.depth = 1  # one block is enough to shard every kind of parameter; halves the compiles
    return cfg


def _parts(mesh, split_dir, *, process_index=None, process_count=None):
    """(setup, train step, train loader) of the pretrain Task on `mesh`, as trainer/loop.py builds
    them."""
    cfg = _cfg()
    task = pretrain.make_task(cfg, 10)
    setup = step_lib.setup(task, cfg.optim, 20, mesh, cfg.seed)
    train = loader.train_loader(
        split_dir,
        global_batch_size=cfg.batch_size,
        image_size=cfg.data.image_size,
        seed=cfg.seed,
        sharding=sharding.batch_sharding(mesh),
        augment=cfg.data.augment.to_dict(),
        process_index=process_index,
        process_count=process_count,
    )
    step = step_lib.make_train_step(task, setup.tx, setup.schedule, setup.shardings, train.sharding)
    return setup, step, train


def _train(step, st, train, n):
    losses = []
    for _ in range(n):
        st, metrics = step(st, {}, next(train))
        losses.append(float(metrics["loss"]))
    return st, losses


@pytest.fixture(scope="module")
def written(prepared_digits, tmp_path_factory):
    """A checkpoint at step 2 written on a 4 x 2 mesh, the state it holds (host copy), and the
    4 x 2 run's next steps (losses, final params) as the reference for the other meshes."""
    split = prepared_digits / "digits" / "train"
    out = tmp_path_factory.mktemp("elastic")
    setup, step, train = _parts(sharding.make_mesh(4, 2), split)
    st, _ = _train(step, setup.init(), train, SAVED_AT)
    ckpts = checkpoint.Checkpoints(out / "checkpoints", async_save=False)
    ckpts.save(SAVED_AT, st, train.iterator)
    ckpts.close()
    checkpoint.save_params(out / "params", st["params"])  # sharded over 4 x 2, as the loop exports
    saved = jax.device_get(st)
    st, losses = _train(step, st, train, MORE)
    train.close()
    return dict(
        dir=out, split=split, saved=saved, losses=losses, params=jax.device_get(st["params"])
    )


@pytest.mark.parametrize("data,model,devices", [(2, 4, 8), (8, 1, 8), (2, 2, 4)])
def test_checkpoint_from_4x2_restores_on_another_mesh_and_training_continues(
    written, data, model, devices
):
    mesh = sharding.make_mesh(data, model, devices=jax.devices()[:devices])
    setup, step, train = _parts(mesh, written["split"])
    ckpts = checkpoint.Checkpoints(written["dir"] / "checkpoints", async_save=False)
    try:
        st, at = ckpts.restore(
            checkpoint.abstract_with_shardings(setup.abstract, setup.shardings), train.iterator
        )
    finally:
        ckpts.close()
    assert at == SAVED_AT
    # identical values, laid out as this mesh's rules say
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(st), written["saved"])
    for leaf, want in zip(
        jax.tree_util.tree_leaves(st), jax.tree_util.tree_leaves(setup.shardings)
    ):
        assert leaf.sharding == want and len(leaf.sharding.device_set) == devices
    # training continues from the same batches: the same losses and parameters up to the float
    # summation order, which the mesh shape changes
    st, losses = _train(step, st, train, MORE)
    train.close()
    np.testing.assert_allclose(losses, written["losses"], rtol=1e-5)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        jax.device_get(st["params"]),
        written["params"],
    )


def _host_batches(train, n):
    return [next(train.iterator) for _ in range(n)]


def test_iterator_state_maps_to_another_process_count(written, tmp_path):
    mesh = sharding.make_mesh(4, 2)
    # What 2 processes in lockstep write: process 1's state after the same batches is process 0's.
    _, _, second = _parts(mesh, written["split"], process_index=1, process_count=2)
    _host_batches(second, SAVED_AT)
    two = tmp_path / "checkpoints"
    shutil.copytree(written["dir"] / "checkpoints", two)
    data = two / str(SAVED_AT) / "data"
    one = json.loads((data / "process_0-of-1.json").read_text())
    assert second.get_state() == one
    second.close()
    (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")
    (data / "process_1-of-2.json").write_text(json.dumps(second.get_state()))

    # Written by 2 processes, resumed by 1: the same next global batch as the 1-process run.
    setup, _, train = _parts(mesh, written["split"])
    ckpts = checkpoint.Checkpoints(two, async_save=False)
    ckpts.restore(
        checkpoint.abstract_with_shardings(setup.abstract, setup.shardings), train.iterator
    )
    _, _, fresh = _parts(mesh, written["split"])
    want = _host_batches(fresh, SAVED_AT + 1)[-1]
    got = next(train.iterator)
    train.close()
    fresh.close()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    # ... and by 1 process, resumed by 2 (each process picks its rows of that global batch)
    original = checkpoint.Checkpoints(written["dir"] / "checkpoints", async_save=False)
    assert original.data_state(SAVED_AT, process_index=1, process_count=2) == one
    original.close()

    # Processes that disagree, or a missing file, are reported naming the files; never guessed.
    (data / "process_1-of-2.json").write_text(json.dumps({"next_index": SAVED_AT + 5}))
    with pytest.raises(
        ValueError, match=r"the 2 processes' iterator states differ .*cannot map them to 1"
    ):
        ckpts.data_state(SAVED_AT)
    (data / "process_1-of-2.json").unlink()
    with pytest.raises(
        ValueError, match=rf"{data}: written by 2 processes but process_1-of-2.json is missing"
    ):
        ckpts.data_state(SAVED_AT)
    ckpts.close()


def test_exported_params_load_as_numpy_on_one_cpu_without_a_mesh(written, tmp_path):
    """params/ written from arrays sharded over 8 devices, read by a process with ONE CPU device,
    no mesh and no abstract shapes (Orbax alone would ask for shardings: "Topology mismatch")."""
    script = (
        "import sys, jax, numpy as np\n"
        "from trainer import checkpoint\n"
        "assert jax.device_count() == 1, jax.devices()\n"
        "params = checkpoint.load_params(sys.argv[1])\n"
        "leaves = jax.tree_util.tree_flatten_with_path(params)[0]\n"
        "assert all(type(v) is np.ndarray for _, v in leaves), {type(v) for _, v in leaves}\n"
        "np.savez(sys.argv[2], **{jax.tree_util.keystr(k): v for k, v in leaves})\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    run = subprocess.run(
        [sys.executable, "-c", script, str(written["dir"] / "params"), str(tmp_path / "p.npz")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = np.load(tmp_path / "p.npz")
    want = {
        jax.tree_util.keystr(k): v
        for k, v in jax.tree_util.tree_flatten_with_path(written["saved"]["params"])[0]
    }
    assert sorted(loaded.files) == sorted(want)
    for key, value in want.items():
        np.testing.assert_array_equal(loaded[key], value)
