"""The evaluate stage end to end on the shared digits run (conftest's prepared digits + tiny
pretrain export): every evaluator type on three models (the export under two names and a
probe-style head), cross-checked against the training stage's own evaluators and hand formulas;
metrics.json layout, details, the report, the digits fairness attribute, and plan-time errors."""

import csv
import json
import os
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from eval import evaluate
from launch.stage_types import StageOutput

EVEN = ("0", "2", "4", "6", "8")


def _records(split_dir):
    import grain

    from data import manifest, records

    m = manifest.read(split_dir)
    source = grain.sources.ArrayRecordDataSource(m.shard_paths(split_dir))
    return m, [records.decode(source[i]) for i in range(len(source))]


def _human_raw_data(root, prepared, pairs):
    """Two observers of the digits val images, in the toolbox's raw-data layout: subject-01 always
    right, subject-02 right on even trials and 'na' otherwise; conditions c1/c2 alternate."""
    _, recs = _records(prepared / "digits" / "val")
    directory = root / "digits-pairs"
    directory.mkdir(parents=True)
    for subject in ("subject-01", "subject-02"):
        with open(directory / f"digits-pairs_{subject}_session_1.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(
                [
                    "subj",
                    "session",
                    "trial",
                    "rt",
                    "object_response",
                    "category",
                    "condition",
                    "imagename",
                ]
            )
            for i, rec in enumerate(recs):
                category = pairs[rec.label[0]]
                right = subject == "subject-01" or i % 2 == 0
                writer.writerow(
                    [
                        subject,
                        1,
                        i + 1,
                        800,
                        category if right else "na",
                        category,
                        f"c{i % 2 + 1}",
                        rec.id.rsplit("/", 1)[-1],
                    ]
                )
    return recs


def make_config(human_data: str) -> ml_collections.ConfigDict:
    c = evaluate.default_config()
    c.batch_size = 64
    c.mesh.data, c.mesh.model = 4, 2
    c.evals = ml_collections.ConfigDict(
        {
            "val": dict(type="accuracy", split="val"),
            "test": dict(type="accuracy", split="test"),
            "val_cls": dict(
                type="classification", split="val"
            ),  # the training table's evaluator, reused
            "pairs": dict(type="ood", split="val", map="digits_pairs", labels="source"),
            "pairs_mean": dict(
                type="ood",
                split="val",
                map="digits_pairs",
                labels="source",
                reduce="mean",
                softmax=True,
                models=("pretrain",),
            ),  # scores only the pretrain
            "calib": dict(type="calibration", split="test"),
            "fair": dict(
                type="fairness", split="test", fit_split="val", attribute="heavy_ink", positive=EVEN
            ),
            "mvh": dict(
                type="model_vs_human",
                split="val",
                map="digits_pairs",
                labels="source",
                experiment="digits-pairs",
                human_data=human_data,
            ),
        }
    )
    c.lock()
    return c


def _cue_conflict(root, prepared_digits):
    """A tiny cue-conflict set in prepare's layout (<shape>/<shape>N-<texture>M.png; the image is a
    digit: 0-4 drawn for "low", 5-9 for "high"), prepared next to the digits (a symlink), and a
    label map digits -> {low, high}."""
    from data import images
    from pipelines import prepare
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(0)
    for n in range(12):
        shape, texture = (
            ("low", "high")[n % 2],
            ("low", "high")[(n // 2) % 2],
        )  # 3 of each (shape, texture)
        index = int(rng.choice(np.flatnonzero((digits.target >= 5) == (shape == "high"))))
        gray = np.kron(
            np.round(digits.images[index] * 255 / 16).astype(np.uint8), np.ones((4, 4), np.uint8)
        )
        path = root / "stimuli" / shape / f"{shape}{n}-{texture}{n}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(images.encode_png(np.repeat(gray[..., None], 3, axis=-1)))
    cfg = prepare.default_config()
    cfg.datasets = ml_collections.ConfigDict(
        {
            "cue": prepare.dataset_config(
                source="cue_conflict",
                root=str(root / "stimuli"),
                splits={"test": ""},
                image_size=32,
                lossless=True,
            )
        }
    )
    prepare.prepare(cfg, root / "prepared")
    (root / "prepared" / "digits").symlink_to(prepared_digits / "digits")
    (root / "low_high.json").write_text(
        json.dumps({"high": ["5", "6", "7", "8", "9"], "low": ["0", "1", "2", "3", "4"]})
    )
    return root / "prepared"


@pytest.fixture(scope="module")
def evaluated(prepared_digits, prepare_output, pretrain_export, tmp_path_factory):
    """One evaluate run of two models: pretrain and "probe" = a linear head equal to the export's
    own head on its pre-logits (so it must score exactly like the export)."""
    from data import label_maps
    from trainer import checkpoint

    root = tmp_path_factory.mktemp("evaluate")
    pairs_map = label_maps.load("digits_pairs")
    pairs = {int(s): t for t, members in zip(pairs_map.targets, pairs_map.sources) for s in members}
    recs = _human_raw_data(root / "raw-data", prepared_digits, pairs)
    probe_dir = root / "probe"
    probe_dir.mkdir()
    params = checkpoint.load_params(pretrain_export.path / "params")
    checkpoint.save_params(
        probe_dir / "head",
        {"kernel": np.asarray(params["head_kernel"]), "bias": np.asarray(params["head_bias"])},
    )
    (probe_dir / "head.json").write_text(
        json.dumps({"model_from": "pretrain", "class_names": [str(i) for i in range(10)]})
    )
    prepared = _cue_conflict(root, prepared_digits)
    inputs = {
        "prepare": StageOutput("prepare", prepare_output.fingerprint, prepared, {}),
        "pretrain": pretrain_export,
        "probe": StageOutput("probe", "3" * 64, probe_dir, {"metrics": {"linear/test_top1": 0.5}}),
    }
    out = root / "out"
    out.mkdir()
    cfg = make_config(str(root / "raw-data"))
    with cfg.unlocked():
        cfg.evals.cue = dict(
            type="model_vs_human",
            dataset="cue",
            split="test",
            map=str(root / "low_high.json"),
            experiment="cue-conflict",
            models=("pretrain",),
        )
    result = evaluate.run(cfg, inputs, out)
    return out, result, recs, pairs


@pytest.mark.xdist_group("evaluate")
def test_metrics_json_and_cross_checks(evaluated, pretrain_export):
    out, result, recs, _ = evaluated
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["pretrain", "probe"]  # sorted keys
    pre = metrics["pretrain"]
    assert set(pre) == {"digits/val", "digits/test", "cue/test", "model-vs-human"}
    trained = pretrain_export.outputs["metrics"]
    # host-side accuracy == the loop's in-training classification / label-map evaluators
    assert pre["digits/val"]["val/top1"] == pytest.approx(trained["val/top1"], abs=1e-6)
    assert pre["digits/val"]["val_cls/top1"] == pytest.approx(trained["val/top1"], abs=1e-6)
    assert pre["digits/val"]["pairs/top1"] == pytest.approx(trained["pairs/top1"], abs=1e-6)
    assert (
        pre["digits/val"]["val/count"] == len(recs) == 179
        and pre["digits/test"]["calib/count"] == 180
    )
    # model-vs-human decisions = mean of softmax probabilities per category = the ood eval with
    # reduce=mean
    assert pre["digits/val"]["mvh/ood_accuracy"] == pytest.approx(
        pre["digits/val"]["pairs_mean/top1"]
    )
    for key in ("val/top1", "val/top5"):  # a head equal to the model's own scores like the model
        assert metrics["probe"]["digits/val"][key] == pytest.approx(
            pre["digits/val"][key], abs=1e-6
        )
    assert (
        "pairs_mean/top1" not in metrics["probe"]["digits/val"]
    )  # that eval names only the pretrain
    assert result["artifacts"]["report"] == "report.html"
    assert result["metrics"]["pretrain/digits/test/test/top1"] == pre["digits/test"]["test/top1"]
    assert (
        result["metrics"]["pretrain/model-vs-human/error_consistency"]
        == pre["model-vs-human"]["error consistency"]
    )
    assert "pretrain/digits/test/test/count" not in result["metrics"]  # headline metrics only


@pytest.mark.xdist_group("evaluate")
def test_model_vs_human_against_hand_formulas(evaluated):
    out, _, recs, pairs = evaluated
    with open(out / "details" / "pretrain" / "digits-pairs_pretrain_session_1.csv") as f:
        model = {
            row["imagename"]: row["object_response"] == row["category"] for row in csv.DictReader(f)
        }
    names = [r.id.rsplit("/", 1)[-1] for r in recs]
    assert set(model) == set(names)
    diff, obs, kappa = [], [], []
    for subject in ("subject-01", "subject-02"):
        per = {"d": [], "o": [], "k": []}
        for cond in (0, 1):
            rows = [i for i in range(len(recs)) if i % 2 == cond]
            m = np.array([model[names[i]] for i in rows])
            h = np.array([subject == "subject-01" or i % 2 == 0 for i in rows])
            p1, p2 = m.mean(), h.mean()
            c_obs, c_exp = np.mean(m == h), p1 * p2 + (1 - p1) * (1 - p2)
            per["d"].append((p1 - p2) ** 2)
            per["o"].append(c_obs)
            per["k"].append(1.0 if c_obs == 1 else (c_obs - c_exp) / (1 - c_exp))
        diff.append(np.mean(per["d"]))
        obs.append(np.mean(per["o"]))
        kappa.append(np.mean(per["k"]))
    details = json.loads((out / "details" / "pretrain" / "mvh.json").read_text())
    assert details["summary"]["accuracy difference"] == pytest.approx(np.mean(diff))
    assert details["summary"]["observed consistency"] == pytest.approx(np.mean(obs))
    assert details["summary"]["error consistency"] == pytest.approx(np.mean(kappa))
    assert details["humans"]["OOD accuracy"] == pytest.approx(0.75, abs=0.01)  # 1 and ~1/2 pooled
    assert {r["condition"] for r in details["raw"]} == {"c1", "c2"}
    mean = json.loads((out / "metrics.json").read_text())["pretrain"]["model-vs-human"]
    assert mean["error consistency"] == pytest.approx(np.mean(kappa))


@pytest.mark.xdist_group("evaluate")
def test_shape_bias_of_cue_conflict_records(evaluated):
    """Shape/texture labels come from prepare's cue_conflict records; the shape bias equals the hand
    count over the model's trials (category = shape, texture from the file name)."""
    out, _, _, _ = evaluated
    with open(out / "details" / "pretrain" / "cue-conflict_pretrain_session_1.csv") as f:
        trials = list(csv.DictReader(f))
    assert len(trials) == 12 and all(
        t["category"] == t["imagename"].split("-")[0].rstrip("0123456789") for t in trials
    )
    texture = [t["imagename"].split("-")[1].rstrip(".png").rstrip("0123456789") for t in trials]
    conflict = [t for t, x in zip(trials, texture) if t["category"] != x]
    shape_hits = sum(t["object_response"] == t["category"] for t in conflict)
    texture_hits = sum(
        t["object_response"] != t["category"] for t in conflict
    )  # two categories: the other one
    cue = json.loads((out / "metrics.json").read_text())["pretrain"]["cue/test"]
    assert len(conflict) == 6 and shape_hits + texture_hits == 6
    assert cue["cue/shape_bias"] == pytest.approx(shape_hits / 6)
    assert cue["cue/fraction_correct_shape"] == pytest.approx(shape_hits / 12)
    details = json.loads((out / "details" / "pretrain" / "cue.json").read_text())
    assert set(details["shape_bias"]["per_category"]) == {"low", "high"}


@pytest.mark.xdist_group("evaluate")
def test_calibration_and_fairness_details(evaluated, prepared_digits):
    out, _, _, _ = evaluated
    calib = json.loads((out / "details" / "pretrain" / "calib.json").read_text())
    assert sum(calib["reliability"]["count"]) == 180 and len(calib["reliability"]["count"]) == 15
    fair = json.loads((out / "details" / "pretrain" / "fair.json").read_text())
    assert fair["attribute"] == "heavy_ink" and set(fair["counts"]) == {"0", "1"}
    assert sum(fair["counts"].values()) == 180
    for row in fair["frontier"]:
        assert row["fit"]["dp_gap"] <= row["eps"] + 1e-9
    accs = [r["frontier"]["fit"]["accuracy"] for r in fair["frontier"]]
    assert all(a >= b - 1e-12 for a, b in zip(accs, accs[1:]))
    # the digits attribute is derived from the pixels: about half the digits have heavy ink
    _, recs = _records(prepared_digits / "digits" / "train")
    share = np.mean([r.attributes[0] for r in recs])
    assert 0.35 < share < 0.65


@pytest.mark.xdist_group("evaluate")
def test_report_of_the_digits_run_in_chromium(evaluated, tmp_path, chromium):
    from eval import browser

    out, _, _, _ = evaluated
    md = (out / "report.md").read_text()
    assert (
        "_no distill stage in this run_" in md
        and "_no LiT stage (zero-shot metrics) in this run_" in md
    )
    assert "| humans | digits-pairs |" in md
    figures = len(list((out / "figures").iterdir()))
    assert figures == 5  # training curves, shape bias (cue), reliability, subgroups, frontier
    artifacts = Path(os.environ.get("TEST_ARTIFACTS_DIR") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    result = browser.check_page(out / "report.html", artifacts / "report_digits.png")
    assert result.errors == [] and result.broken_images == [] and len(result.images) == figures


def _upstream_groups():
    from pipelines import prepare

    return {"prepare": prepare.default_config(), "pretrain": ml_collections.ConfigDict()}


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda c: c.evals.val.update(type="nope"),
            r"evaluate\.evals\.val\.type='nope' is not an evaluator",
        ),
        (
            lambda c: c.evals.val.update(split="dev"),
            r"evaluate\.evals\.val\.split: 'dev' is not a split of prepared",
        ),
        (
            lambda c: c.evals.fair.update(fit_split="test"),
            r"evaluate\.evals\.fair\.fit_split: must differ from split",
        ),
        (
            lambda c: c.evals.calib.update(scheme="quantile"),
            r"evaluate\.evals\.calib\.scheme: 'quantile' is not one of",
        ),
        (
            lambda c: c.evals.pairs.update(map="no_such_map"),
            r"evaluate\.evals\.pairs\.map: label map .*no_such_map\.json",
        ),
        (
            lambda c: c.evals.mvh.update(experiment="sketch"),
            r"evaluate\.evals\.mvh\.human_data: '.*' has no dir for the "
            r"experiment 'sketch'",
        ),
        (
            lambda c: c.update(models=("distill/s",)),
            r"evaluate\.models: 'distill/s' is not upstream",
        ),
        (
            lambda c: c.evals.test.update(models=("lit",)),
            r"evaluate\.evals\.test\.models: 'lit' is not upstream",
        ),
        (
            lambda c: c.update(batch_size=30),
            r"evaluate\.batch_size: 30 is not divisible by the data-parallel size 4",
        ),
    ],
)
def test_plan_time_errors_name_the_key(edit, message, tmp_path):
    cfg = make_config(str(tmp_path))
    (tmp_path / "digits-pairs").mkdir()
    with cfg.unlocked():
        edit(cfg)
    with pytest.raises(ValueError, match=message):
        evaluate.validate(cfg, _upstream_groups())


def test_files_the_planning_machine_cannot_see_are_read_when_the_stage_starts(tmp_path):
    """A map or human-data path on storage only the workers mount passes the plan and fails, naming
    the file, when the evaluator is built (before any forward pass)."""
    from types import SimpleNamespace

    from eval import evaluators

    cfg = make_config("/bucket/raw-data")
    with cfg.unlocked():
        cfg.evals.pairs.map = "/bucket/maps/objectnet.json"
    evaluate.validate(cfg, _upstream_groups())
    ctx = SimpleNamespace(dataset="digits", class_names=tuple(str(i) for i in range(10)))
    with pytest.raises(ValueError, match=r"label map /bucket/maps/objectnet\.json: cannot read"):
        evaluators.LabelMapOOD(None, ctx=ctx, split="test", map="/bucket/maps/objectnet.json")
    with pytest.raises(
        ValueError, match=r"human_data '/bucket/raw-data' has no dir 'digits-pairs'"
    ):
        evaluators.ModelVsHuman(
            None,
            ctx=ctx,
            split="test",
            map="digits_pairs",
            labels="source",
            experiment="digits-pairs",
            human_data="/bucket/raw-data",
        )
