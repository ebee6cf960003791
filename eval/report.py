"""The run report: `report.html` (standalone: every figure a PNG data URI, inline CSS, no script, no
network) and `report.md` (the same tables; figures as `figures/*.png`), from an evaluate stage dir.

    python -m eval.report <evaluate stage dir>       # re-render from its files

Reads `metrics.json`, `upstream.json` and `details/` (eval/evaluate.py writes them) and each
upstream stage's `metrics.jsonl` (training curves). Sections, in order: accuracy across eval
splits and models; training curves (loss, lr, MFU of every stage that logged steps); distillation
(student from labels vs distilled vs teacher); linear probe and few-shot; zero-shot (LiT);
model-vs-human (the toolbox's columns) and shape bias; calibration (reliability diagrams); fairness
(subgroup bars, the debiasing frontier); the run's config and fingerprints. A section whose inputs
the run does not have is left out with a one-line note.

Figures use matplotlib's object API (`Figure` + the Agg canvas): no pyplot global state.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from data import paths
from trainer import markdown

FIGURE_DPI = 100


# --- building blocks ------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:.4f}"
    return "—" if value is None else str(value)


class Page:
    """Collects one report as HTML and Markdown in parallel."""

    def __init__(self, out: Path, title: str):
        self.out, self.title = Path(out), title
        self.html: list[str] = []
        self.md: list[str] = [f"# {title}", ""]
        self.notes: list[str] = []
        self.figures = 0

    def section(self, title: str) -> None:
        self.html.append(f"<h2>{html.escape(title)}</h2>")
        self.md += [f"## {title}", ""]

    def text(self, line: str) -> None:
        self.html.append(f"<p>{html.escape(line)}</p>")
        self.md += [line, ""]

    def note(self, title: str, why: str) -> None:
        """A section left out: one line saying why."""
        self.section(title)
        self.html.append(f'<p class="note">{html.escape(why)}</p>')
        self.md += [f"_{why}_", ""]
        self.notes.append(f"{title}: {why}")

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        cells = [[_fmt(v) for v in row] for row in rows]
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells
        )
        self.html.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        self.md += [markdown.table(header, cells, align=False), ""]

    def figure(self, fig, name: str, caption: str) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(fig)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=FIGURE_DPI, bbox_inches="tight")
        data = buffer.getvalue()
        self.figures += 1
        path = self.out / "figures" / f"{self.figures:02d}-{name}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        self.html.append(
            f'<figure><img alt="{html.escape(caption)}" src="{uri}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
        self.md += [f"![{caption}](figures/{path.name})", ""]

    def details(self, summary: str, text: str) -> None:
        self.html.append(
            f"<details><summary>{html.escape(summary)}</summary><pre>{html.escape(text)}</pre></details>"
        )
        self.md += [
            f"<details><summary>{summary}</summary>",
            "",
            "```json",
            text,
            "```",
            "",
            "</details>",
            "",
        ]

    def write(self) -> None:
        style = (
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
            "table{border-collapse:collapse;margin:.5em 0 1.5em}"
            "td,th{border:1px solid #bbb;padding:3px 8px;"
            "text-align:right}th{background:#eee}td:first-child{text-align:left}img{max-width:100%}"
            ".note{color:#777;font-style:italic}pre{background:#f6f6f6;padding:.5em;overflow:auto}"
        )
        page = (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(self.title)}"
            f"</title><style>{style}</style></head><body><h1>{html.escape(self.title)}</h1>\n"
            + "\n".join(self.html)
            + "\n</body></html>\n"
        )
        (self.out / "report.html").write_text(page)
        (self.out / "report.md").write_text("\n".join(self.md).rstrip() + "\n")


def _figure(ncols: int = 1, nrows: int = 1, width: float = 5.0, height: float = 3.6):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


# --- the run's data -------------------------------------------------------------------------------


class Run:
    """What an evaluate stage dir holds."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.metrics: dict[str, dict[str, dict[str, float]]] = json.loads(
            (self.out / "metrics.json").read_text()
        )
        self.upstream: dict = json.loads((self.out / "upstream.json").read_text())
        self.stages = {s["name"]: s for s in self.upstream["stages"]}
        self.evals: dict[str, dict] = self.upstream["evaluate"]["evals"]
        self.models: list[str] = self.upstream["models"]

    def details(self, kind: str) -> list[tuple[str, str, dict]]:
        """(model, eval name, details) of every eval of one type, in model then eval order."""
        found = []
        for model in self.models:
            for name, ev in self.evals.items():
                path = self.out / "details" / model / f"{name}.json"
                if ev["type"] == kind and path.exists():
                    found.append((model, name, json.loads(path.read_text())))
        return found

    def value(self, model: str, eval_name: str, metric: str) -> float | None:
        for values in self.metrics.get(model, {}).values():
            if f"{eval_name}/{metric}" in values:
                return values[f"{eval_name}/{metric}"]
        return None

    def dataset_of(self, eval_name: str) -> str:
        ev = self.evals[eval_name]
        dataset = ev.get("dataset") or self.upstream["evaluate"]["dataset"]
        return f"{dataset}/{ev['split']}" if ev.get("split") else dataset

    def accuracy_columns(self) -> list[tuple[str, str]]:
        """(eval name, metric) of every top-1-like result of the run."""
        columns = []
        for name, ev in self.evals.items():
            if ev["type"] in ("calibration", "fairness"):  # their top-1 repeats an accuracy eval's
                continue
            for metric in ("top1", "real_top1", "ood_accuracy"):
                if any(self.value(m, name, metric) is not None for m in self.models):
                    columns.append((name, metric))
        return columns


# --- sections -------------------------------------------------------------------------------------


def accuracy_section(page: Page, run: Run) -> None:
    columns = run.accuracy_columns()
    if not columns:
        return page.note("Accuracy", "no eval of this run reports a top-1 accuracy")
    page.section("Accuracy")
    page.text(
        "Top-1 of every model on every eval split (rows: models; columns: eval, its dataset/split)."
    )
    header = ["model"] + [f"{name} {metric} ({run.dataset_of(name)})" for name, metric in columns]
    page.table(header, [[m] + [run.value(m, n, k) for n, k in columns] for m in run.models])


def _curves(run: Run) -> dict[str, list[dict]]:
    curves = {}
    for name, stage in run.stages.items():
        path = paths.as_path(stage["metrics_jsonl"])
        if not path.exists():
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "loss" in r and isinstance(r["loss"], (int, float))]
        if len(rows) >= 2:
            curves[name] = rows
    return curves


def curves_section(page: Page, run: Run) -> None:
    curves = _curves(run)
    if not curves:
        return page.note(
            "Training curves",
            "no upstream stage logged per-step metrics (metrics.jsonl with a loss)",
        )
    page.section("Training curves")
    keys = [("loss", "loss"), ("lr", "learning rate"), ("mfu", "MFU")]
    fig, axes = _figure(ncols=len(keys))
    for ax, (key, label) in zip(axes, keys):
        for name, rows in curves.items():
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), label=name, linewidth=1)
        ax.set_xlabel("step")
        ax.set_title(label)
    axes[0].legend(fontsize=7)
    page.figure(fig, "curves", "loss, learning rate and MFU per step of every training stage")
    page.table(
        ["stage", "steps logged", "final loss", "mean MFU"],
        [
            [name, len(rows), rows[-1]["loss"], _mean([r.get("mfu") for r in rows])]
            for name, rows in curves.items()
        ],
    )


def _mean(values) -> float:
    values = [v for v in values if isinstance(v, (int, float))]
    return sum(values) / len(values) if values else float("nan")


def _top1_evals(run: Run) -> list[str]:
    return [
        name
        for name, metric in run.accuracy_columns()
        if metric == "top1" and run.evals[name]["type"] in ("accuracy", "classification")
    ]


def _same_model(run: Run, a: str, b: str) -> bool:
    ma, mb = run.stages.get(a, {}).get("model"), run.stages.get(b, {}).get("model")
    return ma is not None and ma == mb


def distill_section(page: Page, run: Run, baselines: dict) -> None:
    students = [m for m in run.models if m.startswith("distill/")]
    if not students:
        return page.note("Distillation", "no distill stage in this run")
    evals = _top1_evals(run)
    page.section("Distillation")
    page.text(
        "The seed's table: the student trained from labels vs distilled from the teacher (top-1). "
        "'from labels' = the model named in evaluate.report.distill_baselines, else the upstream "
        "model with the student's architecture (same model.json) that is not distilled."
    )
    rows = []
    for student in students:
        teacher = ((run.stages.get(student, {}).get("config") or {}).get("teacher")) or "?"
        base = baselines.get(student.split("/", 1)[1]) or next(
            (
                m
                for m in run.models
                if not m.startswith("distill/") and _same_model(run, m, student)
            ),
            None,
        )
        for name in evals:
            rows.append(
                [
                    student,
                    run.dataset_of(name),
                    base or "— (none in this run)",
                    run.value(base, name, "top1") if base else None,
                    run.value(student, name, "top1"),
                    teacher,
                    run.value(teacher, name, "top1"),
                ]
            )
    page.table(
        [
            "student",
            "eval split",
            "from labels",
            "top-1",
            "distilled top-1",
            "teacher",
            "teacher top-1",
        ],
        rows,
    )


def probe_section(page: Page, run: Run) -> None:
    probes = {n: s for n, s in run.stages.items() if s.get("head")}
    if not probes:
        return page.note("Linear probe and few-shot", "no probe stage in this run")
    page.section("Linear probe and few-shot")
    rows = []
    for name, stage in probes.items():
        metrics = stage["metrics"]
        for key in sorted(metrics):
            if key.startswith(("linear/", "fewshot/")) and not key.endswith(("_std", "/lr", "/l2")):
                rows.append([name, stage["head"].get("model_from", "?"), key, metrics[key]])
    page.table(["probe", "backbone", "metric", "value"], rows)


def zeroshot_section(page: Page, run: Run) -> None:
    rows = [
        [name, key, value]
        for name, stage in run.stages.items()
        if name.startswith("lit")
        for key, value in sorted(stage["metrics"].items())
        if key.startswith(("zeroshot", "retrieval"))
    ]
    if not rows:
        return page.note("Zero-shot", "no LiT stage (zero-shot metrics) in this run")
    page.section("Zero-shot")
    page.text(
        "The LiT stage's own zero-shot classification and retrieval evaluators (its outputs.json)."
    )
    page.table(["stage", "metric", "value"], rows)


def _begin(
    page: Page, run: Run, kind: str, title: str, missing: str
) -> list[tuple[str, str, dict]]:
    """The details of every eval of `kind`; opens the section, or notes why it is left out."""
    found = run.details(kind)
    if found:
        page.section(title)
    else:
        page.note(title, missing)
    return found


def mvh_section(page: Page, run: Run) -> None:
    found = _begin(
        page, run, "model_vs_human", "Model-vs-human", "no model_vs_human eval in this run"
    )
    if not found:
        return
    columns = ["OOD accuracy", "accuracy difference", "observed consistency", "error consistency"]
    rows, humans = [], {}
    for model, name, d in found:
        rows.append(
            [model, d["experiment"]]
            + [d["summary"].get(c) for c in columns]
            + [d.get("shape_bias", {}).get("shape-bias")]
        )
        if "humans" in d:
            humans[d["experiment"]] = d["humans"]
    for experiment, h in humans.items():
        shape = next(
            (
                d.get("human_shape_bias", {}).get("shape-bias")
                for _, _, d in found
                if d["experiment"] == experiment
            ),
            None,
        )
        rows.append(["humans", experiment] + [h.get(c) for c in columns] + [shape])
    page.text(
        "The toolbox's columns (bethgelab/model-vs-human); accuracy difference and the "
        "consistencies need its human raw data (human_data)."
    )
    page.table(["model", "dataset"] + columns + ["shape-bias"], rows)
    if not humans:
        page.text(
            "No human reference data was given (model_vs_human.human_data): human rows left out."
        )
    shapes = [(m, d) for m, _, d in found if "shape_bias" in d]
    if not shapes:
        return page.text(
            "Shape bias: no cue-conflict split (shape/texture labels) among the "
            "model_vs_human evals."
        )
    fig, (ax,) = _figure(
        width=6, height=max(3.0, 0.3 * len(shapes[0][1]["shape_bias"]["per_category"]) + 1)
    )
    categories = sorted({c for _, d in shapes for c in d["shape_bias"]["per_category"]})
    for model, d in shapes:
        per = d["shape_bias"]["per_category"]
        ax.plot(
            [per.get(c, float("nan")) for c in categories], range(len(categories)), "o", label=model
        )
    ax.set_yticks(range(len(categories)), categories)
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel("shape bias (fraction of shape decisions)")
    ax.legend(fontsize=7)
    page.figure(fig, "shape-bias", "shape bias per category on cue-conflict images")


def calibration_section(page: Page, run: Run) -> None:
    found = _begin(page, run, "calibration", "Calibration", "no calibration eval in this run")
    if not found:
        return
    page.table(
        ["model", "eval", "dataset", "ECE", "top-1", "mean confidence"],
        [
            [
                m,
                n,
                d["dataset"],
                run.value(m, n, "ece"),
                run.value(m, n, "top1"),
                run.value(m, n, "mean_confidence"),
            ]
            for m, n, d in found
        ],
    )
    fig, axes = _figure(
        ncols=min(len(found), 4), nrows=math.ceil(len(found) / 4), width=3.2, height=3.2
    )
    for ax, (model, name, d) in zip(axes, found):
        rel = d["reliability"]
        centers = [(lo + hi) / 2 for lo, hi in zip(rel["lo"], rel["hi"]) if lo is not None]
        widths = [hi - lo for lo, hi in zip(rel["lo"], rel["hi"]) if lo is not None]
        accs = [
            a if a is not None else 0.0
            for a, lo in zip(rel["accuracy"], rel["lo"])
            if lo is not None
        ]
        ax.bar(centers, accs, width=widths, edgecolor="k", linewidth=0.4, alpha=0.7)
        ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{model} {name}\nECE {run.value(model, name, 'ece'):.3f}", fontsize=8)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
    for ax in axes[len(found) :]:
        ax.set_visible(False)
    page.figure(
        fig,
        "reliability",
        "reliability diagrams (accuracy per confidence bin; dashed: perfect calibration)",
    )


def fairness_section(page: Page, run: Run) -> None:
    found = _begin(
        page,
        run,
        "fairness",
        "Fairness",
        "no fairness eval in this run (needs a split with an attributes field)",
    )
    if not found:
        return
    page.table(
        ["model", "eval", "attribute", "top-1 gap", "ECE gap", "DP gap", "binary top-1"],
        [
            [
                m,
                n,
                d["attribute"],
                run.value(m, n, "top1_gap"),
                run.value(m, n, "ece_gap"),
                run.value(m, n, "dp_gap"),
                run.value(m, n, "binary_top1"),
            ]
            for m, n, d in found
        ],
    )
    groups = [(m, n, d) for m, n, d in found if d.get("top1")]
    if groups:
        fig, (ax,) = _figure(width=max(5.0, 1.2 * len(groups)))
        names = sorted({g for _, _, d in groups for g in d["top1"]})
        width = 0.8 / len(names)
        for i, g in enumerate(names):
            ax.bar(
                [j + i * width for j in range(len(groups))],
                [d["top1"].get(g, 0.0) for _, _, d in groups],
                width=width,
                label=f"{groups[0][2]['attribute']} = {g}",
            )
        ax.set_xticks(
            [j + 0.4 - width / 2 for j in range(len(groups))],
            [f"{m}\n{n}" for m, n, _ in groups],
            fontsize=7,
        )
        ax.set_ylabel("top-1")
        ax.legend(fontsize=7)
        page.figure(fig, "subgroups", "top-1 per subgroup")
    fig, axes = _figure(ncols=2)
    for model, name, d in found:
        eps = [r["eps"] for r in d["frontier"]]
        axes[0].plot(
            eps,
            [r["frontier"]["eval"]["accuracy"] for r in d["frontier"]],
            "o-",
            label=f"{model} {name}",
        )
        axes[1].plot(
            eps,
            [r["frontier"]["eval"]["ece"] for r in d["frontier"]],
            "o-",
            label=f"{model} {name}",
        )
    for ax, label in zip(axes, ("binary accuracy (debiased)", "ECE (debiased)")):
        ax.set_xlabel("DP tolerance ε")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    page.figure(
        fig,
        "frontier",
        "randomized-threshold debiasing: accuracy and ECE vs the DP tolerance ε "
        "(thresholds fitted on the fit split, scored on the eval split)",
    )
    rows = [
        [
            m,
            n,
            r["eps"],
            r["frontier_eps"],
            r["frontier"]["fit"]["dp_gap"],
            r["frontier"]["eval"]["accuracy"],
            r["frontier"]["eval"]["dp_gap"],
            r["frontier"]["eval"]["ece"],
        ]
        for m, n, d in found
        for r in d["frontier"]
    ]
    page.table(
        ["model", "eval", "ε", "rule fitted at ε", "fit DP gap", "accuracy", "DP gap", "ECE"], rows
    )


def recipe_section(page: Page, run: Run) -> None:
    """Each stage's recipe card (launch/recipe.py): the paper / reference / assumed values in a
    table, next to the numbers above; the whole card (defaults included) folded away."""
    cards = {name: s["recipe"] for name, s in run.stages.items() if s.get("recipe")}
    if not cards:
        page.note(
            "Recipe",
            "no upstream stage's outputs.json carries a recipe card (stages from before the card)",
        )
        return
    page.section("Recipe: where each hyperparameter comes from")
    page.text(
        "Source: paper, reference (a public implementation's value), default (the stage's own), "
        "user (this run's config or command line). Confirmed: checked at the source; unconfirmed "
        "values are recollections or assumptions."
    )
    rows = []
    for name, card in cards.items():
        for key, e in card.items():
            if e["source"] in ("paper", "reference") or e.get("note"):
                rows.append(
                    [
                        name,
                        key,
                        json.dumps(e["value"]),
                        e["source"],
                        "yes" if e["confirmed"] else "no",
                        e.get("note", ""),
                    ]
                )
    if rows:
        page.table(["stage", "hyperparameter", "value", "source", "confirmed", "note"], rows)
    for name, card in cards.items():
        tally = ", ".join(
            f"{s} {sum(1 for e in card.values() if e['source'] == s)}"
            for s in ("paper", "reference", "default", "user")
        )
        page.details(
            f"{name} recipe card ({tally})",
            "\n".join(
                f"{key} = {json.dumps(e['value'])}  "
                f"[{e['source']}{'' if e['confirmed'] else ', unconfirmed'}]"
                f"{'  ' + e['note'] if e.get('note') else ''}"
                for key, e in card.items()
            ),
        )


def config_section(page: Page, run: Run) -> None:
    page.section("Config and fingerprints")
    page.table(
        ["stage", "fingerprint", "output"],
        [[name, s["fingerprint"][:16], s["path"]] for name, s in run.stages.items()],
    )
    page.details("evaluate config", json.dumps(run.upstream["evaluate"], indent=1, sort_keys=True))
    for name, stage in run.stages.items():
        if stage.get("config"):
            page.details(f"{name} config", json.dumps(stage["config"], indent=1, sort_keys=True))


def render(out: Path) -> list[str]:
    """Writes report.html, report.md and figures/ into the evaluate stage dir `out`; returns the
    one-line notes of the sections left out."""
    run = Run(out)
    config = run.upstream["evaluate"]
    page = Page(out, config.get("report", {}).get("title") or "Run report")
    page.text(f"Models scored: {', '.join(run.models)}.")
    accuracy_section(page, run)
    recipe_section(page, run)
    curves_section(page, run)
    distill_section(page, run, config.get("report", {}).get("distill_baselines") or {})
    probe_section(page, run)
    zeroshot_section(page, run)
    mvh_section(page, run)
    calibration_section(page, run)
    fairness_section(page, run)
    config_section(page, run)
    page.write()
    return page.notes


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m eval.report <evaluate stage dir>", file=sys.stderr)
        return 2
    for note in render(Path(args[0])):
        print(f"left out: {note}")
    print(Path(args[0]) / "report.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
