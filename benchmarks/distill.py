"""Distillation benchmark: (1) what the teacher costs per train step, (2) the seed's claim on
digits.

    # both parts, small defaults
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.distill
    # B/16 student, L/16 and H/14 teachers, bf16
    python -m benchmarks.distill --part overhead --preset gpu
    # RESULTS.md
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.distill --part claim \
        --teacher_steps 300 --claim_steps 600 --eval_every 100 --plot benchmarks/distill_claim.png

(1) overhead: the train step of `trainer/step.py` for a student alone (the supervised classifier
    Task, softmax cross-entropy) and for the same student distilled from each teacher
    (`trainer.distill.distill_task`: the teacher's forward inside the same jitted step, random
    frozen params), synthetic batch, one device. A teacher can run at another resolution: the batch
    is then loaded at the larger size and the other model gets it resized inside the step, as in
    the stage. The step-time ratio (distill / student alone, median over interleaved rounds) is set
    against its FLOPs bound 1 + teacher forward FLOPs / student train-step FLOPs (PaLM's formula,
    `trainer/flops.py`): a ratio at or below the bound means the teacher costs no more than its
    FLOPs.
(2) claim: the seed's "distilled students beat students trained from labels" (ViT-B/16 88.6 vs
    84.2-86.7 on ImageNet), at toy scale on the prepared digits: a teacher pretrained with the tiny
    config's recipe (mu/4, ViT-22B block) for `--teacher_steps`, then per seed the same classic
    (sequential-block) student for `--claim_steps` (a) from labels (`trainer.pretrain`, softmax
    cross-entropy) and (b) distilled from the teacher (`trainer.distill`), identical data,
    augmentation, optimizer and steps; val top-1 mean +- std over seeds, learning curves in an
    optional PNG.

Part (1) imports only jax/flax/optax/numpy/ml_collections and `trainer.*` (no Grain or Orbax), so it
runs on a bare accelerator host; part (2) runs the real prepare, pretrain and distill stages.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import tempfile
import time
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

from benchmarks import digits_run
from benchmarks import harness
from trainer import distill, flops, losses, markdown, optim, sharding, stage_config
from trainer import step as step_lib
from trainer.models import vit
from trainer.task import Task, classifier

CLASSIC = dict(block="sequential", use_bias=True, norm="layernorm", head="gap", qk_norm=False)

# student: (variant, overrides) at `image_size`;
# teachers: name -> (variant, overrides incl. image_size).
PRESETS: dict[str, dict] = {
    "smoke": dict(
        student=("mu/8", dict(CLASSIC, width=32, depth=1, num_heads=2, mlp_dim=64)),
        image_size=16,
        teachers={
            "mu/8": ("mu/8", dict(depth=1, image_size=16)),
            "mu/8@24px": ("mu/8", dict(depth=1, image_size=24)),
        },
        num_classes=10,
        batch=4,
        repeats=1,
        warmup=0,
        steps=1,
    ),
    # A classic Ti-like student (width 192, 4 layers, 64 tokens) and ViT-22B-block teachers
    # 2x as wide.
    "cpu": dict(
        student=("Ti/16", dict(depth=4)),
        image_size=128,
        teachers={
            "22B-block w384 d4": (
                "mu/16",
                dict(width=384, depth=4, mlp_dim=1536, num_heads=6, image_size=128),
            ),
            "22B-block w384 d4 @160px": (
                "mu/16",
                dict(width=384, depth=4, mlp_dim=1536, num_heads=6, image_size=160),
            ),
        },
        num_classes=1000,
        batch=16,
        repeats=9,
        warmup=1,
        steps=1,
    ),
    # The paper's students: B/16 at 224 from bigger teachers, bf16 compute (not measured yet).
    "gpu": dict(
        student=("B/16", dict(dtype="bfloat16")),
        image_size=224,
        teachers={
            "L/16": ("L/16", dict(dtype="bfloat16", image_size=224)),
            "H/14": ("H/14", dict(dtype="bfloat16", image_size=224)),
            "L/16 @384px": ("L/16", dict(dtype="bfloat16", image_size=384)),
        },
        num_classes=1000,
        batch=64,
        repeats=10,
        warmup=2,
        steps=2,
    ),
}

OVERHEAD_COLUMNS = [
    "teacher",
    "teacher px",
    "student px",
    "data px",
    "student GFLOP/step (train)",
    "teacher GFLOP/step (fwd)",
    "FLOPs bound",
    "student alone ms",
    "distill ms",
    "spread %",
    "measured ratio",
    "ratio / bound",
]
CLAIM_COLUMNS = [
    "arm",
    "val top-1 per seed",
    "mean",
    "std",
    "agreement with teacher (mean)",
    "s per run",
]
PAPER = (
    "seed (ViT-22B paper, ImageNet top-1): distilled ViT-B/16 88.6 vs 84.2-86.7 trained from "
    "labels; ViT-L/16 89.6 vs 87.1-88.5"
)


# --------------------------------------------------------------------------------------------------
# (1) The teacher's cost per step.


def student_group(student: tuple[str, dict], image_size: int, data_size: int):
    """A distill config group with this student at `image_size`, loading batches at `data_size`."""
    cfg = distill.default_config()
    variant, overrides = student
    cfg.model.variant = variant
    cfg.model.update(overrides)
    cfg.model.image_size = image_size
    cfg.data.image_size = data_size
    return cfg


def random_teacher(tcfg: vit.ViTConfig, seed: int = 1):
    """`load_teacher` for distill_task: freshly initialised params, created in their shardings."""

    def load(abstract):
        init = lambda: nn.unbox(
            vit.ViT(tcfg).init(
                jax.random.PRNGKey(seed),
                np.zeros((1, tcfg.image_size, tcfg.image_size, 3), np.float32),
            )["params"]
        )
        return jax.jit(init, out_shardings=jax.tree_util.tree_map(lambda a: a.sharding, abstract))()

    return load


def build_runner(
    task: Task, cfg: vit.ViTConfig, data_size: int, mesh, batch: int, warmup: int, seed: int = 0
) -> harness.Runner:
    """trainer/step.py's sharded state + train step of any Task (frozen params bound), compiled
    and warm."""
    setup = step_lib.setup(task, optim.default_config(), 10_000, mesh, seed)
    frozen = {}
    if task.frozen is not None:
        frozen = task.frozen.load(
            jax.tree_util.tree_map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                nn.unbox(task.frozen.abstract),
                setup.frozen_shardings,
            )
        )
    batch_sharding = sharding.batch_sharding(mesh)
    rng = np.random.default_rng(seed)
    data = jax.device_put(
        {
            "image": rng.uniform(-1, 1, (batch, data_size, data_size, 3)).astype(np.float32),
            "labels": np.eye(cfg.num_classes, dtype=np.float32)[
                rng.integers(0, cfg.num_classes, batch)
            ],
        },
        batch_sharding,
    )
    train_step = step_lib.make_train_step(
        task, setup.tx, setup.schedule, setup.shardings, batch_sharding, setup.frozen_shardings
    )
    runner = harness.Runner(
        cfg, lambda state, _, b: train_step(state, frozen, b), setup.init(), data, mesh.devices.size
    )
    runner.compile_s = runner.run(1)
    if warmup:
        runner.run(warmup)
    return runner


def overhead(p: dict, devices=None) -> list[dict]:
    """Times the student alone and distilled from each teacher (interleaved); one row per
    teacher."""
    mesh = sharding.make_mesh(devices=list(devices or jax.devices()[:1]))
    size, classes = p["image_size"], p["num_classes"]
    teachers = {
        name: vit.make_config(v, num_classes=classes, **o) for name, (v, o) in p["teachers"].items()
    }
    student = student_group(p["student"], size, size)
    alone = stage_config.model_config(student, classes)
    builds = {
        "student": lambda: build_runner(
            classifier("student", vit.ViT(alone), losses.softmax_xent),
            alone,
            size,
            mesh,
            p["batch"],
            p["warmup"],
        )
    }
    for name, tcfg in teachers.items():
        data_size = max(size, tcfg.image_size)
        builds[name] = lambda tcfg=tcfg, data_size=data_size: build_runner(
            distill.distill_task(
                student_group(p["student"], size, data_size), classes, tcfg, random_teacher(tcfg)
            ),
            alone,
            data_size,
            mesh,
            p["batch"],
            p["warmup"],
        )
    results = harness.time_runners(
        list(builds), lambda n: builds[n](), p["repeats"], p["steps"], interleave=True
    )
    base = results["student"][2]
    student_flops = flops.model_flops_per_example(alone) * p["batch"]
    rows = []
    for name, tcfg in teachers.items():
        times = results[name][2]
        teacher_flops = flops.model_flops_per_example(tcfg, train=False) * p["batch"]
        bound = 1 + teacher_flops / student_flops
        # median over rounds of distill / student-alone time
        ratio = harness.speedup(base, times, paired=True)
        rows.append(
            dict(
                teacher=name,
                teacher_px=tcfg.image_size,
                student_px=size,
                data_px=max(size, tcfg.image_size),
                student_gflop=student_flops / 1e9,
                teacher_gflop=teacher_flops / 1e9,
                bound=bound,
                base_ms=1e3 * statistics.median(base),
                ms=1e3 * statistics.median(times),
                spread=harness.spread(times),
                ratio=ratio,
                compile_s=results[name][1],
            )
        )
    return rows


def overhead_report(p: dict, preset: str, rows: list[dict]) -> str:
    student = stage_config.model_config(
        student_group(p["student"], p["image_size"], p["image_size"]), p["num_classes"]
    )
    body = [
        [
            r["teacher"],
            r["teacher_px"],
            r["student_px"],
            r["data_px"],
            harness.sig(r["student_gflop"]),
            harness.sig(r["teacher_gflop"]),
            f"{r['bound']:.3f}",
            f"{r['base_ms']:.2f}",
            f"{r['ms']:.2f}",
            f"{r['spread']:.1f}",
            f"{r['ratio']:.3f}",
            f"{r['ratio'] / r['bound']:.3f}",
        ]
        for r in rows
    ]
    return "\n".join(
        [
            harness.run_header("distill overhead", preset),
            "student: "
            + harness.model_line(student, p["batch"]).replace(
                "sigmoid xent", "softmax xent / distill KL"
            ),
            f"median of {p['repeats']} interleaved rounds x {p['steps']} step(s) after 1 "
            f"compiling + {p['warmup']} warm-up step(s), one device; measured ratio = median over "
            "rounds of distill step / student-alone step; "
            "FLOPs bound = 1 + teacher forward FLOPs / student train-step FLOPs",
            "",
            markdown.table(OVERHEAD_COLUMNS, body),
        ]
    )


# --------------------------------------------------------------------------------------------------
# (2) The claim on digits: the same student from labels vs distilled, same steps, several seeds.


def _training(
    cfg, *, steps: int, seed: int, eval_every: int, mixup: float, lr: float, prepared: Path
):
    """What every run of the claim shares: data, batch, mesh, optimizer, cadences."""
    cfg.seed = seed
    cfg.data.prepared_dir = str(prepared)
    cfg.data.dataset, cfg.data.image_size = "digits", 32
    cfg.data.augment.update(
        inception_crop=False, flip=False, mixup_alpha=mixup
    )  # 8x8 digits: no crops/flips
    cfg.batch_size = cfg.eval_batch_size = 64
    cfg.steps, cfg.checkpoint_every = steps, 0
    cfg.mesh.data, cfg.mesh.model = 4, 2
    cfg.optim.update(lr=lr, warmup_steps=min(20, steps // 10), cooldown_steps=steps // 5)
    cfg.runtime.update(log_every=0, progress="off")
    cfg.evals.val.every = eval_every
    return cfg


def student_configs(args, seed: int, prepared: Path) -> dict:
    """{"labels": pretrain group, "distilled": distill group}: the same classic mu/4 student."""
    from trainer import pretrain

    labels = pretrain.default_config()
    labels.loss = "softmax_xent"
    taught = distill.default_config()
    taught.evals.agree.every = args.eval_every
    out = {}
    for arm, cfg in (("labels", labels), ("distilled", taught)):
        cfg.model.update(CLASSIC)
        cfg.evals.val.loss = "softmax_xent"
        out[arm] = _training(
            cfg,
            steps=args.claim_steps,
            seed=seed,
            eval_every=args.eval_every,
            mixup=args.mixup,
            lr=args.lr,
            prepared=prepared,
        )
    return out


def _curve(out: Path, key: str) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


def claim(args) -> dict:
    """Prepares digits and pretrains the teacher (or reuses them in --workdir), trains both arms per
    seed; returns every number."""
    from launch.stage_types import StageOutput
    from trainer import pretrain

    root = Path(args.workdir or tempfile.mkdtemp(prefix="distill_claim_"))
    start = time.perf_counter()
    prepared, teacher_out = digits_run.prepared_and_pretrained(root, args.teacher_steps)
    result = {
        "teacher_top1": _curve(teacher_out, "val/top1")[-1][1],
        "teacher_s": time.perf_counter() - start,
        "arms": {},
    }
    inputs = {"pretrain": StageOutput("pretrain", "0" * 64, teacher_out, {})}
    for seed in args.seeds:
        for arm, cfg in student_configs(args, seed, prepared).items():
            out = Path(tempfile.mkdtemp(prefix=f"{arm}_seed{seed}_", dir=root))
            start = time.perf_counter()
            metrics = (
                distill.run(cfg, inputs, out) if arm == "distilled" else pretrain.run(cfg, {}, out)
            )["metrics"]
            result["arms"].setdefault(arm, []).append(
                dict(
                    seed=seed,
                    top1=metrics["val/top1"],
                    agreement=metrics.get("agree/agreement"),
                    curve=_curve(out, "val/top1"),
                    seconds=time.perf_counter() - start,
                )
            )
    return result


def claim_report(args, result: dict) -> str:
    body = [
        [
            "teacher (mu/4, ViT-22B block)",
            f"{result['teacher_top1']:.4f}",
            f"{result['teacher_top1']:.4f}",
            "-",
            "-",
            "-",
        ]
    ]
    means = {}
    for arm, runs in result["arms"].items():
        top1 = [r["top1"] for r in runs]
        means[arm] = statistics.mean(top1)
        agree = [r["agreement"] for r in runs if r["agreement"] is not None]
        body.append(
            [
                f"student from {arm}" if arm == "labels" else "student distilled",
                ", ".join(f"{x:.4f}" for x in top1),
                f"{means[arm]:.4f}",
                f"{statistics.stdev(top1):.4f}" if len(top1) > 1 else "-",
                f"{statistics.mean(agree):.4f}" if agree else "-",
                f"{statistics.mean(r['seconds'] for r in runs):.0f}",
            ]
        )
    lines = [
        harness.run_header("distill claim", "digits"),
        "digits 32 px, batch 64, mesh 4 x 2; teacher: pretrain recipe of launch/configs/tiny.py "
        f"for {args.teacher_steps} steps; students: classic mu/4 (sequential block, biases, "
        f"LayerNorm, GAP, no QK-norm) for {args.claim_steps} steps, Adafactor lr {args.lr:g}, "
        f"mixup alpha {args.mixup}; seeds {', '.join(map(str, args.seeds))}; val split "
        f"(179 images); prepare + teacher {result['teacher_s']:.0f} s "
        "(~0 when reused from --workdir)",
        PAPER,
        "",
        markdown.table(CLAIM_COLUMNS, body),
    ]
    if {"labels", "distilled"} <= set(means):
        diff = means["distilled"] - means["labels"]
        lines.append(
            f"\ndistilled - labels: {100 * diff:+.2f} points of val top-1 (mean over seeds)"
        )
    return "\n".join(lines)


def plot(args, result: dict, path: Path) -> str:
    """Val top-1 curves (mean +- std over seeds) of both arms and the teacher's level, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed"
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, runs in result["arms"].items():
        steps = [s for s, _ in runs[0]["curve"]]
        values = np.array([[v for _, v in r["curve"]] for r in runs])
        mean, std = values.mean(0), values.std(0, ddof=1) if len(runs) > 1 else np.zeros(len(steps))
        ax.plot(
            steps,
            mean,
            marker="o",
            label=f"student from {arm}" if arm == "labels" else "student distilled",
        )
        ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    ax.axhline(result["teacher_top1"], color="k", linestyle="--", label="teacher")
    ax.set(
        xlabel="training step",
        ylabel="val top-1 (digits)",
        title=f"Distilled vs from labels, mean ± std over {len(args.seeds)} seeds",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("both", "overhead", "claim"), default="both")
    ap.add_argument(
        "--preset", choices=tuple(PRESETS), default="cpu", help="(1): models, batch, repeats"
    )
    ap.add_argument(
        "--repeats", type=int, help="(1): interleaved timing rounds (the median is reported)"
    )
    ap.add_argument("--batch", type=int, help="(1): global batch size")
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    ap.add_argument(
        "--teacher_steps", type=int, default=200, help="(2): the teacher's pretrain steps"
    )
    ap.add_argument(
        "--claim_steps", type=int, default=100, help="(2): steps of every student (both arms)"
    )
    ap.add_argument(
        "--lr", type=float, default=3e-3, help="(2): the students' peak learning rate (Adafactor)"
    )
    ap.add_argument(
        "--eval_every", type=int, default=25, help="(2): val top-1 cadence (the curves)"
    )
    ap.add_argument(
        "--mixup", type=float, default=0.0, help="(2): mixup alpha of both student arms"
    )
    ap.add_argument(
        "--workdir", default="", help="(2): keep prepared data and runs here (default: a temp dir)"
    )
    ap.add_argument("--plot", default="", help="(2): write the learning curves to this PNG")
    args = ap.parse_args(argv)
    p = dict(PRESETS[args.preset])
    p.update({k: getattr(args, k) for k in ("repeats", "batch") if getattr(args, k) is not None})
    for key, value in (
        ("repeats", p["repeats"]),
        ("batch", p["batch"]),
        ("teacher_steps", args.teacher_steps),
        ("claim_steps", args.claim_steps),
        ("eval_every", args.eval_every),
    ):
        if value < 1:
            raise ValueError(f"--{key}={value} must be >= 1")
    out = {}
    if args.part in ("both", "overhead"):
        started = time.perf_counter()
        out["overhead"] = overhead(p)
        print(
            overhead_report(p, args.preset, out["overhead"]),
            f"\n({time.perf_counter() - started:.0f} s)\n",
            flush=True,
        )
    if args.part in ("both", "claim"):
        started = time.perf_counter()
        out["claim"] = claim(args)
        print(claim_report(args, out["claim"]), flush=True)
        if args.plot:
            print(plot(args, out["claim"], Path(args.plot)))
        print(f"({time.perf_counter() - started:.0f} s, {datetime.date.today()})", flush=True)
    return out


if __name__ == "__main__":
    main()
