"""Fine-tuning from the pretrained params vs from random init: same steps, recipe and data (digits).

    python -m benchmarks.finetune                      # 3 seeds, 60 fine-tune steps at 32 px
    python -m benchmarks.finetune --image_size 48 --steps 100 --seeds 0,1,2,3,4

Prepares digits (the real Beam job), pretrains the tiny config's mu/4 once, then runs the
`finetune` stage (trainer/finetune.py, the tiny config's run) per seed twice: from the pretrain
export, and from an export of the same architecture at random init (seeded). Only the start
params differ; the data order and augmentation follow the seed in both. Prints val top-1 per seed
and mean ± std (markdown).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import statistics
import tempfile
from pathlib import Path

from benchmarks import digits_run
from trainer.markdown import table

COLUMNS = ["seed", "from pretrained", "from random init"]


def _random_export(pretrained: Path, out: Path, seed: int) -> Path:
    """An export with pretrain's model.json and freshly initialised params (seeded)."""
    import flax.linen as nn
    import jax

    from trainer import checkpoint
    from trainer.models import vit
    from trainer.task import vit_init

    model = checkpoint.open_model(pretrained, "benchmarks.finetune: pretrained")
    params = nn.unbox(vit_init(vit.ViT(model.config))(jax.random.PRNGKey(1000 + seed)))
    out.mkdir(parents=True)
    checkpoint.save_params(out / "params", params)
    checkpoint.write_model_json(out / "model.json", model.spec)
    return out


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=60, help="fine-tune steps (both arms)")
    parser.add_argument(
        "--image_size", type=int, default=32, help="fine-tune resolution (pretrain: 32)"
    )
    parser.add_argument("--pretrain_steps", type=int, default=200)
    parser.add_argument("--workdir", default="", help="keep outputs here (default: a temp dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from launch.configs import tiny
    from launch.stage_types import StageOutput
    from trainer import finetune

    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-finetune-"))
    data, pre_out = digits_run.prepared_and_pretrained(root, args.pretrain_steps)

    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        row = {"seed": seed}
        starts = {
            "from pretrained": pre_out,
            "from random init": _random_export(pre_out, root / f"random-{seed}", seed),
        }
        for arm, export in starts.items():
            cfg = tiny.finetune_run(args.image_size)
            cfg.data.prepared_dir, cfg.seed, cfg.steps = str(data), seed, args.steps
            cfg.checkpoint_every, cfg.evals.val.every, cfg.runtime.progress = 0, 0, "off"
            out = root / f"ft-{arm.replace(' ', '-')}-{seed}"
            out.mkdir(parents=True)
            result = finetune.run(cfg, {"pretrain": StageOutput("pretrain", "", export, {})}, out)
            row[arm] = result["metrics"]["val/top1"]
        rows.append(row)
        print(json.dumps(row), flush=True)

    def summary(arm):
        values = [r[arm] for r in rows]
        return (
            f"{statistics.mean(values):.4f} ± "
            f"{statistics.stdev(values) if len(values) > 1 else 0:.4f}"
        )

    print(
        f"\n{datetime.date.today()} {platform.node()} "
        f"({platform.processor() or platform.machine()}): "
        f"fine-tune mu/4 on digits, {args.steps} steps at {args.image_size} px, val top-1\n"
    )
    print(
        table(
            COLUMNS,
            [
                [r["seed"], f"{r['from pretrained']:.4f}", f"{r['from random init']:.4f}"]
                for r in rows
            ]
            + [["mean ± std", summary("from pretrained"), summary("from random init")]],
        )
    )
    return rows


if __name__ == "__main__":
    main()
