"""LiT at small scale: zero-shot top-1 of a LiT-tuned text tower vs chance and vs a linear probe on
the same frozen image features (digits), and the zero-shot curve over LiT steps.

    python -m benchmarks.lit                         # 300 LiT steps, zero-shot every 25
    python -m benchmarks.lit --steps 600 --every 50 --png benchmarks/lit_zeroshot.png

Prepares digits (the real Beam job), pretrains the tiny config's mu/4 once (the locked image
tower), runs the `lit` stage (tiny config's group) and the `probe` stage on that export, prints
one markdown table and writes the curve as a PNG.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import tempfile
from pathlib import Path

from benchmarks import digits_run
from trainer.markdown import table

COLUMNS = ["method (val split, 10 classes)", "top-1"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="LiT steps")
    parser.add_argument("--every", type=int, default=25, help="zero-shot evaluation cadence")
    parser.add_argument("--pretrain_steps", type=int, default=200)
    parser.add_argument("--workdir", default="", help="keep outputs here (default: a temp dir)")
    parser.add_argument(
        "--png", default="benchmarks/lit_zeroshot.png", help="where the curve goes ('' = none)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from eval import probe
    from launch.configs import tiny
    from launch.stage_types import StageOutput
    from trainer import lit

    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-lit-"))
    data, pre_out = digits_run.prepared_and_pretrained(root, args.pretrain_steps)
    inputs = {
        "prepare": StageOutput("prepare", "", data, {}),
        "pretrain": StageOutput("pretrain", "", pre_out, {}),
    }

    cfg = tiny.lit_config()
    cfg.data.prepared_dir, cfg.steps, cfg.runtime.progress = str(data), args.steps, "off"
    cfg.evals.zeroshot.every, cfg.evals.retrieval.every, cfg.checkpoint_every = args.every, 0, 0
    lit_out = root / f"lit-{args.steps}"
    lit_out.mkdir(parents=True, exist_ok=True)
    result = lit.run(cfg, inputs, lit_out)["metrics"]
    curve = [
        (r["step"], r["zeroshot/top1"])
        for r in map(json.loads, (lit_out / "metrics.jsonl").read_text().splitlines())
        if "zeroshot/top1" in r
    ]

    pcfg = tiny.probe_config()
    probe_out = root / "probe"
    probe_out.mkdir(parents=True, exist_ok=True)
    probed = probe.run(pcfg, inputs, probe_out)["metrics"]
    linear = probed["linear/val_top1"]

    print(
        f"\n{datetime.date.today()} {platform.node()} ({platform.machine()}): mu/4 pretrained "
        f"{args.pretrain_steps} steps on digits, locked; 1-layer text tower, "
        f"{args.steps} LiT steps\n"
    )
    print(
        table(
            COLUMNS,
            [
                ["chance", "0.1000"],
                [
                    f"LiT zero-shot (prompts {list(cfg.evals.zeroshot.templates)})",
                    f"{result['zeroshot/top1']:.4f}",
                ],
                ["linear probe on the same frozen pre-logits", f"{linear:.4f}"],
            ],
        )
    )
    print("\nzero-shot top-1 over LiT steps: " + ", ".join(f"{s}: {v:.3f}" for s, v in curve))
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
        ax.plot(*zip(*curve), marker="o", label="LiT zero-shot")
        ax.axhline(linear, color="gray", linestyle="--", label="linear probe")
        ax.axhline(0.1, color="red", linestyle=":", label="chance")
        ax.set(
            xlabel="LiT step",
            ylabel="val top-1",
            ylim=(0, 1),
            title="Zero-shot on digits (locked mu/4)",
        )
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(args.png)
        print(f"curve: {args.png}")
    return {"zeroshot": result["zeroshot/top1"], "linear": linear, "curve": curve}


if __name__ == "__main__":
    main()
