"""The `evaluate` stage: scores every model the run produced on every eval its config names, writes
`metrics.json` and renders the run report (eval/report.py).

    # reuses every upstream
    python -m launch.run --config launch/configs/tiny.py --stages evaluate
    python -m launch.stage --stage evaluate --config launch/configs/tiny.py --workdir DIR

Inputs: `inputs["prepare"]` (the prepared splits) and any number of upstream stages. Every one that
exports a ViT classifier (`params/` + `model.json`: pretrain, `finetune/<run>`, `distill/<run>`) is
scored under its stage name (a LiT two-tower is not: the report shows its own zero-shot metrics);
a probe stage (`head/` + `head.json`) is scored as its backbone's export with the probe's linear
head on the pre-logits. `models` restricts the set (default: all).

Evals are the evaluator contract (trainer/evaluators): `evals.<name> = {type, split, [dataset],
[models], ...}` (`models`: the upstream stages this eval scores, e.g. only a CelebA fine-tune for a
fairness eval; default all),
`type` from `TABLE` = the training stages' table (classification, label_map, fewshot, ...) + this
package's (eval/evaluators.py: accuracy, ood, model_vs_human, calibration, fairness). Each runs once
per model at the model's own resolution (its model.json), with the model's class names (the
manifest of the split it was trained on, from its config.json; else `dataset`'s train split) for
label maps; evaluators of one split share one forward pass (eval/outputs.py).

Outputs: `metrics.json` = {model: {"<dataset>/<split>": {"<eval>/<metric>": value}}} (plus
"model-vs-human" = the toolbox's mean over datasets when a model has model_vs_human evals);
`details/<model>/<eval>.json` (reliability bins, fairness frontier, model-vs-human tables) and the
model-vs-human trials as the toolbox's CSVs; `upstream.json` (what was scored: stage, fingerprint,
path, config); `report.html` + `report.md`. outputs.json's metrics are the headline ones
(`HEADLINE`: top-1s, ECE, gaps, shape bias, consistencies) flattened as
`<model>/<dataset>/<split>/<eval>/<metric>`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Mapping

import ml_collections
import numpy as np

from data import paths
from eval import evaluators as eval_evaluators
from eval import outputs
from trainer import config_checks as checks
from trainer import evaluators, sharding

log = logging.getLogger(__name__)

TABLE: dict[str, type[evaluators.Evaluator]] = {**evaluators.TABLE, **eval_evaluators.TABLE}
SPLIT_KEYS = (
    "split",
    "fit_split",
    "train_split",
)  # eval keys that name a split of the eval's dataset
MVH_MEAN = "model-vs-human"  # metrics.json key of the toolbox's mean over datasets
# The metrics also returned in outputs.json (the run's headline, TensorBoard); metrics.json has all.
HEADLINE = (
    "top1",
    "real_top1",
    "ood_accuracy",
    "ece",
    "top1_gap",
    "dp_gap",
    "shape_bias",
    "accuracy_difference",
    "observed_consistency",
    "error_consistency",
)


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.dataset = "digits"  # the dataset of evals that name none
    c.train_split = (
        "train"  # with `dataset`: class names of a model whose config does not say its data
    )
    # upstream stages to score ("pretrain", "finetune/r48", "probe"); () = every model upstream
    c.models = ()
    c.batch_size = 256  # global eval batch
    c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
    c.evals = ml_collections.ConfigDict(
        {
            "val": dict(type="accuracy", split="val"),
            "test": dict(type="accuracy", split="test"),
            "calibration": dict(type="calibration", split="test"),
        }
    )
    c.report = ml_collections.ConfigDict(
        dict(
            title="Run report",
            # distill/<run> -> the model trained on labels it is compared with ("" = the upstream
            # model with the same model.json, if any): the seed's "student from labels vs
            # distilled" table
            distill_baselines=ml_collections.ConfigDict(),
        )
    )
    c.runtime = ml_collections.ConfigDict(dict(read_threads=2, worker_count=0))
    return c


# --- Plan-time checks -----------------------------------------------------------------------------


def validate(
    cfg, upstream: Mapping[str, ml_collections.ConfigDict] | None = None, where: str = "evaluate"
) -> None:
    """Plan-time checks (launch/dag.py; `run` repeats them without `upstream`): one line naming the
    key."""
    upstream = upstream or {}
    for key in ("dataset", "train_split"):
        checks.name(f"{where}.{key}", cfg[key])
    _check_models(cfg.models, upstream, f"{where}.models")
    checks.mesh(f"{where}.mesh", cfg.mesh, ("data", "model"))
    sharding.check_batch(cfg.batch_size, cfg.mesh, f"{where}.batch_size")  # and at run time
    if not len(cfg.evals):
        raise checks.fail(f"{where}.evals", "is empty: nothing to evaluate")
    for name, ev in cfg.evals.items():
        _check_models(ev.get("models", ()), upstream, f"{where}.evals.{name}.models")
    evaluators.check(eval_configs(cfg), f"{where}.evals", TABLE)
    if not isinstance(cfg.report.title, str):
        raise checks.fail(f"{where}.report.title", f"must be a string, got {cfg.report.title!r}")
    for run, base in cfg.report.distill_baselines.items():
        if not isinstance(base, str):
            raise checks.fail(
                f"{where}.report.distill_baselines.{run}", f"must be a stage name, got {base!r}"
            )
    for key, low in (("read_threads", 1), ("worker_count", 0)):
        checks.int_at_least(f"{where}.runtime.{key}", cfg.runtime[key], low)
    prepare = upstream.get("prepare")
    if prepare is not None:
        _check_splits(cfg, prepare, where)


def _check_models(models, upstream: Mapping, key: str) -> None:
    """A tuple of stage names, each upstream of this stage (when the upstream is known)."""
    checks.names(key, models, "a tuple of upstream stage names")
    for name in models:
        checks.upstream(key, name, upstream)


def eval_configs(cfg, model: str | None = None) -> dict[str, dict]:
    """The evals as the evaluator table reads them: each without this stage's `models` key (the
    models it scores; empty = all); given a model, only the evals that score it."""
    configs = {}
    for name, ev in cfg.evals.items():
        ev = ev.to_dict() if hasattr(ev, "to_dict") else dict(ev)
        scope = ev.pop("models", ())
        if model is None or not scope or model in scope:
            configs[name] = ev
    return configs


def _check_splits(cfg, prepare, where: str) -> None:
    """Every eval's dataset and splits must be ones the prepare stage produces."""
    for name, ev in cfg.evals.items():
        dataset = ev.get("dataset") or cfg.dataset
        key = f"{where}.evals.{name}.dataset" if ev.get("dataset") else f"{where}.dataset"
        checks.prepared(key, dataset, prepare)
        for split_key in SPLIT_KEYS:
            split = ev.get(split_key)
            if split is not None:
                checks.prepared_split(f"{where}.evals.{name}.{split_key}", split, dataset, prepare)


# --- The models of the run ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Model:
    """One scored model: an export (params/ + model.json), optionally with a probe's linear head."""

    name: str
    stage: Any  # the StageOutput it comes from
    export: Path  # the dir with params/ + model.json (a probe: its backbone's)
    class_names: tuple[str, ...]
    head: dict | None = None  # {"kernel" [D, C], "bias" [C]} on the pre-logits


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(paths.as_path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _manifest_classes(prepared: Path, dataset: str, split: str) -> tuple[str, ...] | None:
    from data import manifest  # json only

    path = paths.as_path(prepared) / dataset / split
    if not (path / "manifest.json").exists():
        return None
    return tuple(manifest.read(path).class_names)


def _class_names(stage, num_classes: int, cfg, prepared: Path) -> tuple[str, ...]:
    """The model's classes: the manifest of the split its stage trained on (its config.json), else
    `cfg.dataset`/`cfg.train_split`'s when the class count matches, else none (label maps by class
    name then fail naming the model)."""
    config = _read_json(paths.as_path(stage.path) / "config.json") or {}
    data = config.get("data") or {}
    candidates = [(data.get("dataset"), data.get("train_split"))] if data.get("dataset") else []
    candidates.append((cfg.dataset, cfg.train_split))
    for dataset, split in candidates:
        names = _manifest_classes(prepared, dataset, split or "train")
        if names is not None and len(names) == num_classes:
            return names
    return ()


def find_models(cfg, inputs: Mapping[str, Any]) -> list[Model]:
    """Every model among the upstream outputs (module docstring), in upstream order."""
    from eval import probe
    from trainer import checkpoint

    prepared = paths.as_path(inputs["prepare"].path)
    wanted = set(cfg.models)
    missing = wanted - set(inputs)
    if missing:
        raise checks.fail(
            "evaluate.models",
            f"{sorted(missing)[0]!r} is not among the inputs ({', '.join(inputs)})",
        )
    models = []
    for name, stage in inputs.items():
        if name == "prepare" or (wanted and name not in wanted):
            continue
        path = paths.as_path(stage.path)
        spec = _read_json(path / "model.json")
        if spec is not None and "variant" not in spec:
            # not a ViT classifier export (a LiT two-tower: its zero-shot evals are its own)
            continue
        if (path / "params").is_dir() and spec is not None:
            num_classes = checkpoint.open_model(path, f"evaluate: {name}").config.num_classes
            models.append(Model(name, stage, path, _class_names(stage, num_classes, cfg, prepared)))
        elif (path / "head.json").exists() and (path / "head").is_dir():
            head, spec = probe.load_head(path)
            backbone = spec.get("model_from", "")
            if backbone not in inputs:
                raise ValueError(
                    f"evaluate: probe {name!r} probes {backbone!r}, which is not an input of this "
                    f"stage (inputs: {', '.join(inputs)})"
                )
            models.append(
                Model(
                    name,
                    stage,
                    paths.as_path(inputs[backbone].path),
                    tuple(spec.get("class_names", ())),
                    head,
                )
            )
    return models


# --- Scoring --------------------------------------------------------------------------------------


def _predict(model: Model, mesh):
    """(params, param shardings, {"logits", "pre_logits"}, image size) of a model, params loaded
    sharded."""
    import flax.linen as nn
    import jax

    from trainer import checkpoint, sharding
    from trainer.models import vit

    opened = checkpoint.open_model(model.export, f"evaluate: {model.name}")
    net = vit.ViT(opened.config)
    boxed = vit.abstract_params(net.config)
    shardings = sharding.param_shardings(boxed, mesh)
    params = opened.load(checkpoint.abstract_with_shardings(nn.unbox(boxed), shardings))

    def pre_logits(p, frozen, batch):
        return net.apply({"params": p}, batch["image"], train=False)[1]["pre_logits"]

    def logits(p, frozen, batch):
        return net.apply({"params": p}, batch["image"], train=False)[0]

    if model.head is None:
        return (
            params,
            shardings,
            {"logits": logits, "pre_logits": pre_logits},
            net.config.image_size,
        )
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    head = {k: jax.device_put(np.asarray(v, np.float32), replicated) for k, v in model.head.items()}
    return (
        {"backbone": params, "head": head},
        {"backbone": shardings, "head": {k: replicated for k in head}},
        {
            "logits": lambda p, f, b: (
                pre_logits(p["backbone"], f, b) @ p["head"]["kernel"] + p["head"]["bias"]
            ),
            "pre_logits": lambda p, f, b: pre_logits(p["backbone"], f, b),
        },
        net.config.image_size,
    )


def dataset_key(cfg, ev) -> str:
    """metrics.json's dataset key of an eval: "<dataset>/<split>"."""
    dataset = ev.get("dataset") or cfg.dataset
    return f"{dataset}/{ev['split']}" if ev.get("split") else dataset


def score(cfg, model: Model, mesh, split_dir, out: Path) -> dict[str, dict[str, float]]:
    """{dataset key: {"<eval>/<metric>": value}} of one model; details and files under `out`."""
    params, shardings, predict, image_size = _predict(model, mesh)
    ctx = outputs.EvalContext(
        mesh=mesh,
        split_dir=split_dir,
        dataset=cfg.dataset,
        image_size=image_size,
        batch_size=cfg.batch_size,
        param_shardings=shardings,
        read_threads=cfg.runtime.read_threads,
        worker_count=cfg.runtime.worker_count,
        class_names=model.class_names,
    )
    built = evaluators.build(
        eval_configs(cfg, model.name), predict, ctx, where="evaluate.evals", table=TABLE
    )
    results: dict[str, dict[str, float]] = {}
    mvh_summaries = {}
    for name, (_, ev) in built.items():
        if isinstance(ev, eval_evaluators.HostEvaluator):
            ev.observer = model.name.replace("/", "-")
        values = {f"{name}/{k}": float(v) for k, v in ev.run(params, {})}
        results.setdefault(dataset_key(cfg, cfg.evals[name]), {}).update(values)
        details = getattr(ev, "details", None)
        if details is not None:
            directory = out / "details" / model.name
            directory.mkdir(parents=True, exist_ok=True)
            (directory / f"{name}.json").write_text(
                json.dumps(
                    {
                        "type": cfg.evals[name].type,
                        "dataset": dataset_key(cfg, cfg.evals[name]),
                        **details,
                    },
                    indent=1,
                    default=_plain,
                )
                + "\n"
            )
            for filename, text in getattr(ev, "files", {}).items():
                (directory / filename).write_text(text)
            if isinstance(ev, eval_evaluators.ModelVsHuman):
                mvh_summaries[name] = details["summary"]
    if mvh_summaries:
        from eval.metrics import model_vs_human

        results[MVH_MEAN] = model_vs_human.mean_over_datasets(mvh_summaries)
    return results


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _upstream_record(name: str, stage) -> dict:
    path = paths.as_path(stage.path)
    return {
        "name": name,
        "fingerprint": stage.fingerprint,
        "path": str(path),
        "metrics": (stage.outputs or {}).get("metrics", {}),
        "recipe": (stage.outputs or {}).get("recipe")
        or {},  # launch/recipe.py: shown by the report
        "config": _read_json(path / "config.json"),
        "model": _read_json(path / "model.json"),
        "head": _read_json(path / "head.json"),
        "metrics_jsonl": str(path / "metrics.jsonl"),
    }


def run(cfg, inputs: dict, out: Path) -> dict:
    import jax

    from trainer import loop

    validate(cfg, None, "evaluate")
    out = Path(out)
    if "prepare" not in inputs:
        raise ValueError(
            f"evaluate: no prepared data among the inputs ({', '.join(inputs) or 'none'})"
        )
    models = find_models(cfg, inputs)
    if not models:
        raise ValueError(
            f"evaluate: no upstream stage exports a model (params/ + model.json or a probe head); "
            f"inputs: {', '.join(inputs)}"
        )
    mesh = sharding.make_mesh(**cfg.mesh)
    sharding.check_batch(cfg.batch_size, mesh, "evaluate.batch_size", processes=jax.process_count())
    locate = lambda dataset, split: loop.split_dir(cfg, inputs, dataset, split, stage="evaluate")

    metrics = {}
    for model in models:
        log.info("evaluate: scoring %s", model.name)
        metrics[model.name] = score(cfg, model, mesh, locate, out)

    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    (out / "upstream.json").write_text(
        json.dumps(
            {
                "evaluate": json.loads(cfg.to_json()),
                "models": [m.name for m in models],
                "probes": {m.name: str(m.export) for m in models if m.head is not None},
                "stages": [_upstream_record(name, stage) for name, stage in inputs.items()],
            },
            indent=1,
        )
        + "\n"
    )
    from eval import report

    notes = report.render(out)
    _print_summary(metrics, notes)
    flat = {
        f"{m}/{d}/{k}".replace(" ", "_"): v
        for m, per in metrics.items()
        for d, values in per.items()
        for k, v in values.items()
        if k.rsplit("/", 1)[-1].lower().replace(" ", "_") in HEADLINE
    }
    return {
        "artifacts": {
            "metrics": "metrics.json",
            "report": "report.html",
            "report_md": "report.md",
            "details": "details",
            "upstream": "upstream.json",
        },
        "metrics": flat,
    }


def _print_summary(metrics: dict, notes: list[str]) -> None:
    for model, per in metrics.items():
        tops = [
            f"{d} {k} {v:.4f}"
            for d, values in per.items()
            for k, v in values.items()
            if k.count("/") == 1 and k.endswith("/top1")
        ]
        print(f"[evaluate] {model}: " + (", ".join(tops) or "no top-1 evals"))
    for note in notes:
        print(f"[evaluate] report: {note}")
