"""QK-norm claim: a learning-rate sweep of a small parallel-block ViT on digits, with and without
QK-norm.

    python -m benchmarks.qk_norm   # 4 LRs x 2 variants x 3 seeds (RESULTS.md)
    python -m benchmarks.qk_norm --lrs 0.01,0.3 --seeds 0 --steps 100 --plot /tmp/qk.png
    python -m benchmarks.qk_norm --preset micro --prepared DIR   # the test's seconds-long smoke run

The seed's claim (ViT-22B §2): without QK-norm, attention logits grow without bound and attention
entropy collapses ("almost one-hot attention weights"), and the loss diverges; the paper saw it at
8B parameters. Small-scale proxies (Wortsman et al. 2023) reproduce the same mechanism in small
models at high learning rates. Each run here is the real pretrain stage (trainer/pretrain.py on
trainer/loop.py, the prepared digits from the real Beam job) of the same ViT-22B-block model
(parallel block, fused projections, RMSNorm, no QKV biases, MAP head), with `qk_norm` on or off and
everything else equal: data order, init seed, optimizer (Adafactor, constant LR, no warmup: the
fastest way to provoke the instability), steps. The model's `attn_stats` option makes the loop log,
every step, the max attention logit over all encoder layers/heads/queries/keys of that step's batch
and the min/mean over layers x heads of the mean attention-row entropy (`attn_logit_max`,
`attn_entropy_min`, `attn_entropy_mean` in metrics.jsonl).

Per LR x variant (mean ± sd over seeds): final train loss (mean of the last 10% of steps), val
top-1, the run's max attention logit and min attention entropy, loss spikes (steps whose loss
exceeds the median of the 20 steps before by more than 1 nat: batch noise at low loss is not a
spike) and divergences (the loop's NaN guard stopped the run, or the final loss is no better than
the loss at step 1). Learning curves as a PNG (--plot). Every run's curves go to
<workdir>/qk_norm_runs.json; `--report_from` prints the table (and --plot) again from such a file
without training.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path


from benchmarks import digits_run
from trainer.markdown import table

VARIANTS = {"qk_norm": dict(qk_norm=True), "no_qk_norm": dict(qk_norm=False)}

PRESETS = {
    # Seconds: one micro model, a few steps, no val eval (tests/test_qk_norm.py).
    "micro": dict(
        model=dict(width=32, depth=1, mlp_dim=64, num_heads=2),
        steps=4,
        batch=16,
        lrs=(0.1,),
        seeds=(0,),
        val=False,
    ),
    # The RESULTS.md sweep: mu/4 (width 64, depth 2, 4 heads, 64 tokens), 24 runs in ~22 min on
    # 2 busy cores. Calibrated at depth 4, lr 0.03: without QK-norm the max logit passed 100 within
    # 15 steps.
    "digits": dict(
        model=dict(width=64, depth=2, mlp_dim=256, num_heads=4),
        steps=120,
        batch=32,
        lrs=(0.003, 0.01, 0.03, 0.1),
        seeds=(0, 1, 2),
        val=True,
    ),
}
STATS = ("attn_logit_max", "attn_entropy_min", "attn_entropy_mean")
COLUMNS = [
    "lr",
    "variant",
    "final loss",
    "val top-1",
    "max attn logit",
    "min attn entropy",
    "loss spikes",
    "diverged",
    "s/run",
]


def run_config(prepared: Path, variant: str, lr: float, seed: int, p: dict):
    """The pretrain group of one run: the sweep's model, constant-LR Adafactor, per-step metrics."""
    from trainer import pretrain

    cfg = pretrain.default_config()
    cfg.model.variant = "mu/4"
    cfg.model.update(dict(p["model"], attn_stats=True, **VARIANTS[variant]))
    cfg.loss = "softmax_xent"
    cfg.evals.val.loss = "softmax_xent"
    cfg.data.update(prepared_dir=str(prepared), dataset="digits", image_size=32)
    cfg.data.augment.update(
        inception_crop=False, flip=False
    )  # 8x8 digits: crops cut strokes, flips change digits
    cfg.seed, cfg.steps = seed, p["steps"]
    cfg.batch_size = cfg.eval_batch_size = p["batch"]
    cfg.optim.update(lr=lr, schedule="constant", warmup_steps=0, cooldown_steps=0)
    cfg.mesh.data, cfg.mesh.model = -1, 1
    cfg.checkpoint_every, cfg.evals.val.every = 0, 0  # val once, at the last step
    if not p.get("val", True):
        del cfg.evals["val"]
    cfg.runtime.update(log_every=1, progress="off")
    return cfg


def train(prepared: Path, root: Path, variant: str, lr: float, seed: int, p: dict) -> dict:
    """One pretrain run; its per-step metrics and summary (a NaN-guard stop is a result, not an
    error)."""
    from trainer import loop, pretrain

    out = Path(tempfile.mkdtemp(prefix=f"{variant}-lr{lr:g}-s{seed}-", dir=root))
    start = time.perf_counter()
    try:
        val = pretrain.run(run_config(prepared, variant, lr, seed, p), {}, out)["metrics"].get(
            "val/top1"
        )
        stopped = None
    except loop.NonFiniteError as e:
        val, stopped = None, str(e)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    return dict(
        variant=variant,
        lr=lr,
        seed=seed,
        val=val,
        stopped=stopped,
        seconds=time.perf_counter() - start,
        curve={k: [(r["step"], r[k]) for r in steps if k in r] for k in ("loss", *STATS)},
    )


def summarize(run: dict) -> dict:
    """Final loss, extreme attention stats, spikes and divergence of one run."""
    loss = [v for _, v in run["curve"]["loss"]]
    finite = [v for v in loss if math.isfinite(v)]
    tail = max(1, len(loss) // 10)
    final = statistics.mean(loss[-tail:]) if len(finite) == len(loss) and loss else float("nan")
    spikes = sum(
        v > statistics.median(finite[i - 20 : i]) + 1.0 for i, v in enumerate(finite) if i >= 20
    )
    logits = [v for _, v in run["curve"]["attn_logit_max"] if math.isfinite(v)]
    entropy = [v for _, v in run["curve"]["attn_entropy_min"] if math.isfinite(v)]
    diverged = run["stopped"] is not None or not (final < loss[0])
    return dict(
        final=final,
        val=run["val"],
        logit=max(logits, default=float("nan")),
        entropy=min(entropy, default=float("nan")),
        spikes=spikes,
        diverged=diverged,
    )


def _mean_sd(values, fmt: str) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{values and statistics.mean(values):{fmt}} ± {sd:{fmt}}" + (
        "" if len(values) > 1 else " (1 run)"
    )


def report(runs: list[dict], p: dict, seconds: float) -> str:
    body = []
    for lr in sorted({r["lr"] for r in runs}):
        for variant in VARIANTS:
            group = [r for r in runs if r["lr"] == lr and r["variant"] == variant]
            if not group:
                continue
            s = [summarize(r) for r in group]
            body.append(
                [
                    f"{lr:g}",
                    variant,
                    _mean_sd([x["final"] for x in s], ".3f"),
                    _mean_sd([x["val"] for x in s], ".3f"),
                    _mean_sd([x["logit"] for x in s], ".3g"),
                    _mean_sd([x["entropy"] for x in s], ".3g"),
                    sum(x["spikes"] for x in s),
                    f"{sum(x['diverged'] for x in s)}/{len(s)}",
                    f"{statistics.mean(r['seconds'] for r in group):.0f}",
                ]
            )
    m = p["model"]
    return "\n".join(
        [
            (
                f"# qk_norm sweep  {datetime.date.today()}  {platform.node()} "
                f"({platform.machine()}, {os.cpu_count()} cores)"
            ),
            "model: ViT-22B block (parallel, fused, RMSNorm, no QKV bias, MAP head), "
            f"width {m['width']}, depth {m['depth']}, MLP {m['mlp_dim']}, {m['num_heads']} heads, "
            f"patch 4 on 32 px digits (64 tokens); {p['steps']} steps, batch {p['batch']}, "
            "Adafactor, constant LR, no warmup, grad clip 1.0, softmax xent; "
            f"seeds {', '.join(map(str, p['seeds']))}; mean ± sd over seeds; "
            f"{seconds:.0f} s in all",
            "paper (ViT-22B §2): without QK-norm attention logits grow, entropy collapses and the "
            "loss diverges (at 8B parameters); small models show it at high LR "
            "(Wortsman et al. 2023)",
            "",
            table(COLUMNS, body),
        ]
    )


def plot(runs: list[dict], path: Path) -> str:
    """Loss, max attention logit and min attention entropy per step; one panel column per LR."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed"
    lrs = sorted({r["lr"] for r in runs})
    keys = (
        ("loss", "train loss", "linear"),
        ("attn_logit_max", "max attention logit", "log"),
        ("attn_entropy_min", "min attention entropy (nats)", "linear"),
    )
    fig, axes = plt.subplots(
        len(keys), len(lrs), figsize=(max(6.0, 3.6 * len(lrs)), 2.8 * len(keys)), squeeze=False
    )
    colors = {"qk_norm": "tab:blue", "no_qk_norm": "tab:red"}
    for j, lr in enumerate(lrs):
        for i, (key, label, scale) in enumerate(keys):
            ax = axes[i][j]
            for r in runs:
                if r["lr"] != lr:
                    continue
                steps, values = zip(*r["curve"][key]) if r["curve"][key] else ((), ())
                ax.plot(
                    steps,
                    values,
                    color=colors[r["variant"]],
                    alpha=0.7,
                    lw=1,
                    label=r["variant"] if r["seed"] == min(x["seed"] for x in runs) else None,
                )
            ax.set_yscale(scale)
            if i == 0:
                ax.set_title(f"lr {lr:g}")
            if j == 0:
                ax.set_ylabel(label)
            if i == len(keys) - 1:
                ax.set_xlabel("step")
    axes[0][0].legend()
    fig.suptitle("Parallel-block ViT on digits with and without QK-norm (each line one seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return f"plot: {path}"


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=tuple(PRESETS), default="digits")
    ap.add_argument("--lrs", help="comma-separated peak learning rates (default: the preset's)")
    ap.add_argument("--seeds", help="comma-separated seeds (default: the preset's)")
    ap.add_argument("--steps", type=int)
    ap.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated subset of {', '.join(VARIANTS)}",
    )
    ap.add_argument(
        "--prepared",
        default="",
        help="a prepare output dir with digits (default: made under --workdir)",
    )
    ap.add_argument(
        "--workdir", default="", help="runs (and prepared digits) go here (default: a temp dir)"
    )
    ap.add_argument("--plot", default="", help="write the curves to this PNG")
    ap.add_argument(
        "--report_from",
        default="",
        help="a qk_norm_runs.json: print its table (and --plot), no training",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    p = dict(PRESETS[args.preset])
    if args.report_from:
        saved = json.loads(Path(args.report_from).read_text())
        p.update(saved["p"])
        print(report(saved["runs"], p, saved["seconds"]), flush=True)
        if args.plot:
            print(plot(saved["runs"], Path(args.plot)))
        return saved["runs"]
    if args.lrs:
        p["lrs"] = tuple(float(x) for x in args.lrs.split(","))
    if args.seeds:
        p["seeds"] = tuple(int(x) for x in args.seeds.split(","))
    if args.steps is not None:
        p["steps"] = args.steps
    variants = [v for v in args.variants.split(",") if v]
    if p["steps"] < 2 or not p["lrs"] or not p["seeds"] or not variants:
        raise ValueError("--steps must be >= 2 and --lrs / --seeds / --variants non-empty")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant {unknown[0]!r}; known: {', '.join(VARIANTS)}")
    root = Path(args.workdir or tempfile.mkdtemp(prefix="qk_norm_"))
    root.mkdir(parents=True, exist_ok=True)
    prepared = Path(args.prepared) if args.prepared else digits_run.prepared(root)
    start, runs = time.perf_counter(), []
    for lr in p["lrs"]:
        for seed in p["seeds"]:
            for variant in variants:
                runs.append(train(prepared, root, variant, lr, seed, p))
                s = summarize(runs[-1])
                print(
                    f"lr {lr:g} seed {seed} {variant}: final loss {s['final']:.3f}, "
                    f"max logit {s['logit']:.3g}, min entropy {s['entropy']:.3g}, "
                    f"{runs[-1]['seconds']:.0f} s"
                    + (" (stopped: non-finite)" if runs[-1]["stopped"] else ""),
                    flush=True,
                )
    seconds = time.perf_counter() - start
    print("\n" + report(runs, p, seconds), flush=True)
    if args.plot:
        print(plot(runs, Path(args.plot)))
    (root / "qk_norm_runs.json").write_text(json.dumps({"p": p, "runs": runs, "seconds": seconds}))
    return runs


if __name__ == "__main__":
    main()
