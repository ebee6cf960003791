"""eval/report.py: every section from a hand-built evaluate dir (no model needed), sections left
out with a note when their inputs are missing, and the page rendered in headless Chromium (every
figure decoded, no console error; a screenshot kept as a test artifact)."""

import json
import os
import time
from pathlib import Path

import numpy as np

from eval import browser, report
from eval.metrics import calibration, fairness

SECTIONS = (
    "Accuracy",
    "Recipe: where each hyperparameter comes from",
    "Training curves",
    "Distillation",
    "Linear probe and few-shot",
    "Zero-shot",
    "Model-vs-human",
    "Calibration",
    "Fairness",
    "Config and fingerprints",
)


def _stage(
    tmp_path, name, *, config=None, model=None, head=None, metrics=None, curve=False, recipe=None
):
    path = tmp_path / "stages" / name
    path.mkdir(parents=True)
    if curve:
        rows = [
            {"step": s, "loss": 2.0 / s, "lr": 1e-3 * min(1, s / 5), "mfu": 0.3 + 0.01 * s}
            for s in range(1, 11)
        ]
        (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "name": name,
        "fingerprint": f"{abs(hash(name)):064x}"[:64],
        "path": str(path),
        "metrics": metrics or {},
        "config": config,
        "model": model,
        "head": head,
        "metrics_jsonl": str(path / "metrics.jsonl"),
        "recipe": recipe or {},
    }


RECIPE = {
    "optim.lr": {
        "value": 1e-3,
        "source": "paper",
        "confirmed": False,
        "note": "peak lr as recalled",
    },
    "batch_size": {"value": 64, "source": "user", "confirmed": True},
    "seed": {"value": 0, "source": "default", "confirmed": False},
}


def _fairness_details():
    rng = np.random.default_rng(0)
    p, group = rng.random(300), rng.integers(0, 2, 300)
    data = (p, rng.random(300) < p, group)
    return {
        "attribute": "heavy_ink",
        "positive": ["even"],
        "fit_split": "val",
        "gamma": 0.1,
        "top1": {"0": 0.9, "1": 0.8},
        "ece": {"0": 0.05, "1": 0.07},
        "positive_rate": {"0": 0.4, "1": 0.6},
        "counts": {"0": 150, "1": 150},
        "frontier": fairness.frontier(data, data, (0.2, 0.05, 0.0)),
    }


def build_run(tmp_path, full=True):
    """An evaluate stage dir as eval/evaluate.py writes it; `full`: every section has its inputs."""
    out = tmp_path / "evaluate"
    out.mkdir()
    mu4 = {"variant": "mu/4", "overrides": {"num_classes": 10}}
    stages = [
        _stage(tmp_path, "prepare"),
        _stage(
            tmp_path,
            "pretrain",
            config={"data": {"dataset": "digits"}},
            model=mu4,
            curve=full,
            recipe=RECIPE,
        ),
    ]
    models = ["pretrain"]
    evals = {"test": {"type": "accuracy", "split": "test"}}
    metrics = {"pretrain": {"digits/test": {"test/top1": 0.9, "test/top5": 1.0}}}
    if full:
        stages += [
            _stage(
                tmp_path,
                "finetune/r48",
                model={"variant": "mu/4", "overrides": {"image_size": 48}},
                curve=True,
            ),
            _stage(
                tmp_path, "distill/s", config={"teacher": "finetune/r48"}, model=mu4, curve=True
            ),
            _stage(
                tmp_path,
                "probe",
                head={"model_from": "pretrain"},
                metrics={"linear/test_top1": 0.93, "fewshot/5shot": 0.7, "fewshot/5shot_std": 0.01},
            ),
            _stage(tmp_path, "lit", metrics={"zeroshot/imagenet_top1": 0.5}),
        ]
        models += ["finetune/r48", "distill/s", "probe"]
        evals.update(
            calib={"type": "calibration", "split": "test"},
            fair={"type": "fairness", "split": "test", "fit_split": "val"},
            mvh={"type": "model_vs_human", "dataset": "cue", "split": "test"},
        )
        rng = np.random.default_rng(1)
        for i, model in enumerate(models):
            conf, correct = rng.random(100), rng.random(100) < 0.8
            metrics.setdefault(model, {}).setdefault("digits/test", {}).update(
                {
                    "test/top1": 0.8 + 0.01 * i,
                    "calib/ece": calibration.ece(conf, correct),
                    "calib/top1": 0.8,
                    "calib/mean_confidence": 0.7,
                    "fair/top1_gap": 0.1,
                    "fair/ece_gap": 0.02,
                    "fair/dp_gap": 0.2,
                    "fair/binary_top1": 0.9,
                }
            )
            metrics[model]["cue/test"] = {"mvh/ood_accuracy": 0.5, "mvh/shape_bias": 0.6}
            details = {
                "calib": {
                    "type": "calibration",
                    "dataset": "digits/test",
                    "bins": 15,
                    "scheme": "width",
                    "reliability": calibration.reliability(conf, correct),
                },
                "fair": {"type": "fairness", "dataset": "digits/test", **_fairness_details()},
                "mvh": {
                    "type": "model_vs_human",
                    "dataset": "cue/test",
                    "experiment": "cue-conflict",
                    "summary": {
                        "OOD accuracy": 0.5,
                        "accuracy difference": 0.1,
                        "observed consistency": 0.6,
                        "error consistency": 0.2,
                    },
                    "humans": {
                        "OOD accuracy": 0.7,
                        "accuracy difference": 0.05,
                        "observed consistency": 0.7,
                        "error consistency": 0.3,
                    },
                    "shape_bias": {"shape-bias": 0.6, "per_category": {"cat": 0.5, "dog": 0.7}},
                    "human_shape_bias": {"shape-bias": 0.96},
                },
            }
            for name, d in details.items():
                (out / "details" / model).mkdir(parents=True, exist_ok=True)
                (out / "details" / model / f"{name}.json").write_text(json.dumps(d))
    (out / "metrics.json").write_text(json.dumps(metrics))
    (out / "upstream.json").write_text(
        json.dumps(
            {
                "evaluate": {
                    "dataset": "digits",
                    "evals": evals,
                    "report": {"title": "Test run", "distill_baselines": {}},
                },
                "models": models,
                "probes": {},
                "stages": stages,
            }
        )
    )
    return out


def test_every_section_with_its_figures(tmp_path):
    out = build_run(tmp_path)
    assert report.render(out) == []  # nothing left out
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    for title in SECTIONS:
        assert f"## {title}" in md and f"<h2>{title}</h2>" in page
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert [f.split("-", 1)[1] for f in figures] == [
        "curves.png",
        "shape-bias.png",
        "reliability.png",
        "subgroups.png",
        "frontier.png",
    ]
    assert page.count('<img alt=') == len(figures) == page.count('src="data:image/png;base64,')
    assert "http://" not in page and "https://" not in page and "<script" not in page  # standalone
    # the seed-style distillation row: from labels = pretrain (same model.json as the student)
    assert "| distill/s | digits/test | pretrain | 0.8000 | 0.8200 | finetune/r48 | 0.8100 |" in md
    assert "| humans | cue-conflict | 0.7000 | 0.0500 | 0.7000 | 0.3000 | 0.9600 |" in md
    assert "| lit | zeroshot/imagenet_top1 | 0.5000 |" in md
    assert "fewshot/5shot_std" not in md
    # the recipe card: marked values in the table (with their notes), the whole card folded away
    assert "| pretrain | optim.lr | 0.001 | paper | no | peak lr as recalled |" in md
    assert "pretrain recipe card (paper 1, reference 0, default 1, user 1)" in md


def test_missing_inputs_leave_sections_out_with_a_note(tmp_path, capsys):
    out = build_run(tmp_path, full=False)
    notes = report.render(out)
    assert [n.split(":")[0] for n in notes] == [
        "Training curves",
        "Distillation",
        "Linear probe and few-shot",
        "Zero-shot",
        "Model-vs-human",
        "Calibration",
        "Fairness",
    ]
    assert "Zero-shot: no LiT stage (zero-shot metrics) in this run" in notes
    page = (out / "report.html").read_text()
    assert "<img" not in page and page.count('class="note"') == 7
    assert report.main([str(out)]) == 0
    assert str(out / "report.html") in capsys.readouterr().out


def test_report_renders_in_headless_chromium(tmp_path, chromium):
    out = build_run(tmp_path)
    report.render(out)
    artifacts = Path(
        os.environ.get("TEST_ARTIFACTS_DIR") or tmp_path
    )  # the screenshot: a test artifact
    artifacts.mkdir(parents=True, exist_ok=True)
    result = browser.check_page(out / "report.html", artifacts / "report_sections.png")
    assert result.errors == [] and result.broken_images == []
    assert len(result.images) == 5 and all(i["width"] > 100 for i in result.images)
    assert (artifacts / "report_sections.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_broken_image_is_caught_and_the_browser_leaves_nothing_behind(
    tmp_path, chromium, monkeypatch
):
    profiles = []
    mkdtemp = browser.tempfile.mkdtemp
    monkeypatch.setattr(
        browser.tempfile, "mkdtemp", lambda **kw: profiles.append(mkdtemp(**kw)) or profiles[-1]
    )
    page = tmp_path / "broken.html"
    page.write_text(
        '<!DOCTYPE html><html><body><img alt="x" src="data:image/png;base64,AAAA"></body></html>'
    )
    result = browser.check_page(page)
    assert len(result.broken_images) == 1
    # The private profile is gone and no Chromium helper (zygote, renderer, crashpad) still runs on
    # it: a helper writing into the profile during removal once failed CI with `Directory not
    # empty`.
    (profile,) = profiles
    assert not Path(profile).exists()
    time.sleep(0.5)  # SIGKILL is delivered asynchronously
    alive = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if profile.encode() in cmdline.read_bytes():
                alive.append(cmdline.parent.name)
        except OSError:
            pass
    assert alive == []
