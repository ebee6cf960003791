"""The probe stage (eval/probe.py) and the few-shot implementation it shares with the `fewshot`
evaluator (trainer/evaluators/fewshot.py): the ridge solve against an independent NumPy solve, the
nested few-shot subsets, train-only whitening, plan-time errors; then the stage on the shared tiny
pretrain export over digits on a 4 x 2 mesh: linear probe vs chance and vs scikit-learn, the
exported head applied by a function written here, the feature cache reused on rerun, and the
in-training evaluator agreeing with the stage."""

import json
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from eval import probe
from trainer import checkpoint, evaluators, features, sharding
from trainer.evaluators import fewshot
from trainer.models import vit


# --- The closed-form few-shot solve ---------------------------------------------------------------


def _reference_ridge(x, y, num_classes, l2):
    """Written from the description in docs/DESIGN.md §7, not from fewshot.py: whiten with the
    set's mean / population std + 1e-5, bias column 100, ±1 one-hot targets, primal ridge solve."""
    mean, std = x.mean(0), x.std(0) + 1e-5
    design = lambda z: np.hstack([(z - mean) / std, np.full((len(z), 1), 100.0)])
    a = design(x)
    targets = np.where(np.arange(num_classes)[None, :] == y[:, None], 1.0, -1.0)
    w = np.linalg.solve(a.T @ a + l2 * np.eye(a.shape[1]), a.T @ targets)
    return w, lambda z: np.argmax(design(z) @ w, axis=1)


@pytest.mark.parametrize("n,dim", [(200, 16), (12, 40)], ids=["N>=D", "D>N"])
def test_ridge_equals_an_independent_numpy_solve(n, dim):
    rng = np.random.default_rng(n)
    y = np.arange(n) % 4
    x = (
        rng.normal(size=(n, dim)) * rng.uniform(0.1, 5, dim)
        + rng.normal(size=dim)
        + y[:, None] * 0.3
    )
    x_test = rng.normal(size=(50, dim))
    for l2 in (fewshot.L2, 0.5):
        ridge = fewshot.fit(x.astype(np.float32), y, 4, l2)
        w, predict = _reference_ridge(x.astype(np.float32).astype(np.float64), y, 4, l2)
        np.testing.assert_allclose(ridge.w, w, rtol=1e-8, atol=1e-12 * np.abs(w).max())
        np.testing.assert_array_equal(ridge.predict(x_test), predict(x_test))


def test_subsets_are_seeded_and_nested_across_shot_counts():
    labels = np.random.default_rng(0).permutation(np.arange(300) % 6)
    sets = fewshot.subsets(labels, 6, (1, 5, 10, 25), seed=2)
    for k, idx in sets.items():
        assert np.array_equal(np.bincount(labels[idx], minlength=6), np.full(6, k))
        assert len(set(idx.tolist())) == len(idx)
    for small, large in ((1, 5), (5, 10), (10, 25)):
        assert set(sets[small].tolist()) <= set(sets[large].tolist())
    again = fewshot.subsets(labels, 6, (1, 5, 10, 25), seed=2)
    assert all(np.array_equal(sets[k], again[k]) for k in sets)
    other = fewshot.subsets(labels, 6, (25,), seed=3)[25]
    assert set(other.tolist()) != set(sets[25].tolist())


def test_whitening_uses_the_few_shot_train_set_only():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(40, 8)) * 3 + 1, np.arange(40) % 4
    ridge = fewshot.fit(x, y, 4)
    np.testing.assert_allclose(ridge.mean, x.mean(0))
    np.testing.assert_allclose(ridge.std, x.std(0) + 1e-5)
    test = rng.normal(size=(10, 8))
    # The prediction of a test row does not depend on the other test rows (no test statistics).
    alone = ridge.predict(test)
    with_outliers = ridge.predict(np.vstack([test, rng.normal(size=(30, 8)) * 1e6 + 1e3]))
    np.testing.assert_array_equal(with_outliers[:10], alone)


def test_shots_beyond_a_class_count_name_the_class():
    labels = np.array([0] * 30 + [1] * 4 + [2] * 30)
    with pytest.raises(ValueError) as e:
        fewshot.evaluate(
            np.zeros((64, 3)),
            labels,
            np.zeros((2, 3)),
            np.zeros(2),
            3,
            shots=(1, 5),
            class_names=("zero", "one", "two"),
            where="probe.fewshot",
        )
    assert str(e.value) == (
        "probe.fewshot.shots: 5 shots but class 1 ('one') has only 4 example(s) in the "
        "few-shot train split"
    )


# --- The linear probe's solve ---------------------------------------------------------------------


def _separable_ish(n=240, dim=6, classes=4, seed=0):
    """Overlapping Gaussian classes with a constant and a large-scale feature (standardisation)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.normal(size=(n, dim)) + rng.normal(size=(classes, dim))[y] * 1.5
    x[:, 0] = 3.0
    x[:, 1] *= 100.0
    return x.astype(np.float32), y


@pytest.mark.parametrize("l2", [1e-3, 1e-1])
def test_a_linear_head_is_the_minimiser_of_the_stated_objective(l2):
    """fit_heads solves mean softmax cross-entropy + 0.5 * l2 * |kernel|^2 on standardised features:
    the same solution as scikit-learn's multinomial LogisticRegression (C = 1 / (l2 * n), bias not
    penalised), a float64 gradient written here is ~0 at it, and it is bit-for-bit deterministic."""
    from sklearn.linear_model import LogisticRegression

    x, y = _separable_ish()
    rows = np.arange(len(y))
    mesh = sharding.make_mesh(data=4, model=2)
    kwargs = dict(mesh=mesh, max_iters=1000, tol=1e-5)
    kernels, biases, (solve,) = probe.fit_heads(x, y, rows, 4, [l2], **kwargs)
    assert solve["grad_max"] <= 1e-5 and solve["iterations"] > 0
    mean, std = x.astype(np.float64).mean(0), x.astype(np.float64).std(0)
    std[std < 1e-6] = 1.0
    z = (x - mean) / std
    w = kernels[0].astype(np.float64) * std[:, None]  # back in the standardised space
    b = biases[0] + mean @ kernels[0].astype(np.float64)
    logits = z @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    residual = (p - np.eye(4)[y]) / len(y)
    np.testing.assert_allclose(z.T @ residual + l2 * w, 0, atol=5e-5)  # d/d kernel
    np.testing.assert_allclose(residual.sum(0), 0, atol=5e-5)  # d/d bias
    ref = LogisticRegression(C=1 / (l2 * len(y)), tol=1e-10, max_iter=10_000).fit(z, y)
    np.testing.assert_allclose(p, ref.predict_proba(z), atol=2e-4)
    again = probe.fit_heads(x, y, rows, 4, [l2], **kwargs)
    np.testing.assert_array_equal(again[0], kernels)
    np.testing.assert_array_equal(again[1], biases)


def test_a_grid_is_solved_per_l2_and_an_unsolved_head_fails_naming_max_iters():
    x, y = _separable_ish(seed=1)
    rows = np.arange(len(y))
    mesh = sharding.make_mesh(data=4, model=2)
    kwargs = dict(mesh=mesh, max_iters=1000, tol=1e-7)
    grid = probe.fit_heads(x, y, rows, 4, [1e-1, 1e-3], **kwargs)
    for g, l2 in enumerate((1e-1, 1e-3)):  # each as solved alone (the path only warm-starts it)
        alone = probe.fit_heads(x, y, rows, 4, [l2], **kwargs)
        logits = lambda kernels, biases: x @ kernels[0] + biases[0]
        np.testing.assert_allclose(logits(grid[0][g:], grid[1][g:]), logits(*alone[:2]), atol=1e-3)
    message = r"^probe.linear: l2=0.001 not solved: max \|gradient\| .* > tol=1e-05 .*max_iters"
    with pytest.raises(RuntimeError, match=message):
        probe.fit_heads(x, y, rows, 4, [1e-3], mesh=mesh, max_iters=3, tol=1e-5)


# --- Plan-time errors -----------------------------------------------------------------------------


def _upstream():
    from pipelines import prepare
    from trainer import pretrain

    return {"prepare": prepare.default_config(), "pretrain": pretrain.default_config()}


@pytest.mark.parametrize(
    "key,value,message",
    [
        (
            "fewshot.split",
            "validation",
            "probe.fewshot.split: 'validation' is not a split of prepared dataset 'digits'",
        ),
        (
            "linear.eval_splits",
            ("val", "tset"),
            "probe.linear.eval_splits: 'tset' is not a split of prepared dataset",
        ),
        ("dataset", "cifar", "probe.dataset: 'cifar' is not prepared"),
        ("model_from", "distill", "probe.model_from: 'distill' is not upstream of this stage"),
        (
            "fewshot.shots",
            (1, 0),
            "probe.fewshot.shots=(1, 0): must be a non-empty tuple of positive ints",
        ),
        ("fewshot.l2", -1.0, "probe.fewshot.l2=-1.0: must be a number > 0"),
        ("linear.holdout", 1.5, "probe.linear.holdout: must be a fraction in (0, 1)"),
        ("linear.l2s", (), "probe.linear.l2s: must be a non-empty tuple"),
        ("linear.l2s", (0.0, 1e-4), "probe.linear.l2s: must be a non-empty tuple of numbers > 0"),
        ("linear.tol", 0.0, "probe.linear.tol: must be > 0"),
        ("linear.max_iters", 0, "probe.linear.max_iters: must be a positive int"),
        ("batch_size", 250, "probe.batch_size: 250 is not divisible by the data-parallel size 4"),
    ],
)
def test_bad_configs_fail_at_plan_time_in_one_line(key, value, message):
    cfg = probe.default_config()
    cfg.mesh.data = 4
    group, _, name = key.rpartition(".")
    (cfg[group] if group else cfg)[name] = value
    with pytest.raises(ValueError) as e:
        probe.validate(cfg, _upstream(), "probe")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    probe.validate(probe.default_config(), _upstream(), "probe")  # the defaults pass


def test_the_fewshot_evaluator_is_in_the_table_and_checks_its_values():
    assert evaluators.TABLE["fewshot"] is fewshot.FewShot
    entry = ml_collections.ConfigDict(
        {"fs": dict(type="fewshot", train_split="train", split="val", every=10)}
    )
    evaluators.check(entry, "pretrain.evals")
    with pytest.raises(ValueError, match=r"^pretrain.evals.fs.seeds=0: must be an int >= 1$"):
        fewshot.FewShot.check_values({"seeds": 0}, "pretrain.evals.fs")


# --- The stage on the shared tiny pretrain export -------------------------------------------------


def _config():
    cfg = probe.default_config()
    cfg.mesh.data, cfg.mesh.model = 4, 2
    cfg.batch_size = 128
    return cfg


@pytest.fixture(scope="module")
def probed(pretrain_export, prepare_output, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe")
    inputs = {"prepare": prepare_output, "pretrain": pretrain_export}
    return out, inputs, probe.run(_config(), inputs, out)


@pytest.mark.xdist_group("probe")
def test_stage_outputs_features_head_and_accuracies(probed, prepared_digits):
    out, inputs, result = probed
    metrics = result["metrics"]
    for split in ("val", "test"):  # chance is 0.1
        assert metrics[f"linear/{split}_top1"] > 0.5
    for k in fewshot.SHOTS:
        assert (
            0.15 < metrics[f"fewshot/{k}shot_top1"] <= 1
            and metrics[f"fewshot/{k}shot_top1_std"] >= 0
        )
    assert metrics["fewshot/25shot_top1"] > metrics["fewshot/1shot_top1"]
    assert metrics["linear/l2"] in probe.default_config().linear.l2s
    assert metrics["linear/iterations"] > 0
    assert all((out / path).exists() for path in result["artifacts"].values())
    per_seed = json.loads((out / "fewshot.json").read_text())["top1"]
    assert (
        np.mean(per_seed["10"]) == pytest.approx(metrics["fewshot/10shot_top1"])
        and len(per_seed["10"]) == 3
    )

    from data import manifest, records

    for split in ("train", "val", "test"):
        meta = json.loads((out / "features" / "digits" / f"{split}.json").read_text())
        x = np.load(out / "features" / "digits" / f"{split}.npy")
        ids = np.load(out / "features" / "digits" / f"{split}.ids.npy")
        assert meta["model_fingerprint"] == inputs["pretrain"].fingerprint
        assert x.shape == (meta["num_examples"], 64)
        assert np.isfinite(x).all()
        # Rows are the split's records, each once, in record order (one process).
        import grain

        split_dir = prepared_digits / "digits" / split
        source = grain.sources.ArrayRecordDataSource(
            manifest.read(split_dir).shard_paths(split_dir)
        )
        assert ids.tolist() == [records.decode(source[i]).id for i in range(len(source))]


@pytest.mark.xdist_group("probe")
def test_linear_probe_is_within_a_few_points_of_sklearn(probed):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    out, _, result = probed
    load = lambda s: (
        np.load(out / "features" / "digits" / f"{s}.npy"),
        np.load(out / "features" / "digits" / f"{s}.labels.npy"),
    )
    (x, y), (xv, yv), (xt, yt) = load("train"), load("val"), load("test")
    scaler = StandardScaler().fit(x)
    model = LogisticRegression(C=10.0, max_iter=5000).fit(scaler.transform(x), y)
    sklearn_acc = model.score(scaler.transform(np.vstack([xv, xt])), np.concatenate([yv, yt]))
    ours = (
        result["metrics"]["linear/val_top1"] * len(yv)
        + result["metrics"]["linear/test_top1"] * len(yt)
    ) / (len(yv) + len(yt))
    assert abs(ours - sklearn_acc) <= 0.04, (ours, sklearn_acc)


def _top1_of_backbone_plus_head(export_dir, head_dir, split_dir, mesh):
    """Independent of eval/probe.py: the backbone on the split's eval batches, then
    x @ kernel + b."""
    from data import loader

    opened = checkpoint.open_model(export_dir, "test")
    model, params = vit.ViT(opened.config), opened.load()
    head = checkpoint.load_params(head_dir)
    forward = jax.jit(lambda p, images: model.apply({"params": p}, images)[1]["pre_logits"])
    hits = count = 0
    with sharding.activate(mesh):
        for batch in loader.eval_loader(
            split_dir, global_batch_size=128, image_size=32, sharding=sharding.batch_sharding(mesh)
        ):
            x = np.asarray(forward(params, batch["image"]))
            mask = np.asarray(batch["mask"])
            pred = np.argmax(x @ np.asarray(head["kernel"]) + np.asarray(head["bias"]), axis=1)
            hits += int(np.sum((pred == np.asarray(batch["label"]))[mask]))
            count += int(mask.sum())
    return hits / count


@pytest.mark.xdist_group("probe")
def test_the_exported_head_reproduces_the_reported_top1(probed, pretrain_export, prepared_digits):
    out, _, result = probed
    mesh = sharding.make_mesh(data=4, model=2)
    got = _top1_of_backbone_plus_head(
        pretrain_export.path, out / "head", prepared_digits / "digits" / "val", mesh
    )
    assert got == pytest.approx(result["metrics"]["linear/val_top1"], abs=1 / 180 + 1e-9)
    head, spec = probe.load_head(out)
    assert (
        head["kernel"].shape == (64, 10)
        and spec["input"] == "pre_logits"
        and spec["num_classes"] == 10
    )


@pytest.mark.xdist_group("probe")
def test_a_rerun_reuses_the_cached_features(probed, tmp_path, monkeypatch):
    out, inputs, result = probed
    calls = []
    real = features.batches
    monkeypatch.setattr(features, "batches", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = tmp_path / "again"
    shutil.copytree(out, again)
    assert probe.run(_config(), inputs, again)["metrics"] == result["metrics"]
    assert calls == []  # nothing extracted (and no parameters loaded)
    # Features of another export (fingerprint) are not reused.
    other = dict(
        inputs, pretrain=type(inputs["pretrain"])("pretrain", "2" * 64, inputs["pretrain"].path, {})
    )
    probe.run(_config(), other, again)
    assert len(calls) == 3  # train, test, val


@pytest.mark.xdist_group("probe")
def test_the_in_training_evaluator_agrees_with_the_stage(probed, pretrain_export, prepared_digits):
    out, _, result = probed
    cfg = _config()
    opened = checkpoint.open_model(pretrain_export.path, "test")
    model = vit.ViT(opened.config)
    mesh = sharding.make_mesh(data=4, model=2)
    boxed = vit.abstract_params(model.config)
    param_sh = sharding.param_shardings(boxed, mesh)
    import flax.linen as nn

    params = opened.load(checkpoint.abstract_with_shardings(nn.unbox(boxed), param_sh))
    ctx = evaluators.Context(
        mesh=mesh,
        split_dir=lambda d, s: prepared_digits / d / s,
        dataset="digits",
        image_size=32,
        batch_size=cfg.batch_size,
        param_shardings=param_sh,
    )
    predict = {
        "pre_logits": lambda p, f, b: model.apply({"params": p}, b["image"])[1]["pre_logits"]
    }
    evals = ml_collections.ConfigDict(
        {"fewshot": dict(type="fewshot", train_split="train", split="test", every=50)}
    )
    every, ev = evaluators.build(evals, predict, ctx, "pretrain.evals")["fewshot"]
    got = dict(ev.run(params, {}))
    assert every == 50 and set(got) == {
        f"{k}shot_top1{s}" for k in fewshot.SHOTS for s in ("", "_std")
    }
    for name, value in got.items():
        assert value == pytest.approx(result["metrics"][f"fewshot/{name}"], abs=1e-12)


def test_fewshot_benchmark_smoke(capsys):
    from benchmarks import fewshot as bench

    bench.main(["--cases", "3x5", "--width", "8", "--test_per_class", "4", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "| classes x shots |" in out and "3 x 5" in out
