"""Export a stage's trained ViT for other libraries: timm (safetensors + config), or flat .npz.

    python -m trainer.interop.export --stage_dir WORKDIR/pretrain/<fp16> --format timm \
        --out exported/vit
    python -m trainer.interop.export --stage_dir WORKDIR/pretrain/<fp16> --format npz \
        --out exported/vit.npz

Reads `<stage_dir>/model.json` + `<stage_dir>/params/` (any training stage's export: pretrain,
finetune/<run>, distill/<run>; trainer/checkpoint.open_model) on one host, whatever mesh wrote them.

timm: OUT is a directory with model.safetensors and config.json (timm's Hugging Face Hub layout):

    model = timm.create_model("local-dir:OUT", pretrained=True)   # timm >= 1.0 (the [timm] extra)

The mapping onto timm's VisionTransformer (ParallelScalingBlock / Block, attention-pool head) is
in trainer/interop/timm_format.py; a head timm cannot hold (a MAP head with QK-norm, a pre-logits
layer) is left out, the export is the encoder (config.json: "head_exported": false, with the
reason).
npz: OUT is one file with our documented flat names + the model.json text
(trainer/interop/npz_format.py).
big_vision: OUT is one .npz with big_vision's ViT names (classic block only).

The reverse direction is `init_params` (trainer/interop/weights_import.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

FORMATS = ("timm", "npz", "big_vision")


def export(stage_dir: Path, fmt: str, out: Path) -> str:
    """Writes the export; returns a one-line summary."""
    from trainer import checkpoint
    from trainer.interop import npz_format, timm_format

    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not one of {FORMATS}")
    model = checkpoint.open_model(stage_dir, "--stage_dir")
    cfg, params = model.config, model.load()
    out = Path(out)
    if fmt == "timm":
        config = timm_format.save(out, params, cfg)
        what = (
            f"{config['architecture']} {'with head' if config['head_exported'] else config['note']}"
        )
        return f"timm: {out / timm_format.WEIGHTS} + {out / timm_format.CONFIG} ({what})"
    if fmt == "npz":
        npz_format.save(out, params, cfg)
    else:
        npz_format.save_big_vision(out, params, cfg)
    return f"{fmt}: {out} ({cfg.variant}, {cfg.block} block)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.interop.export",
        description=__doc__,
        epilog="Import: set a training stage's init_params to the .safetensors / .npz file "
        "(e.g. --config.pretrain.init_params=OUT/model.safetensors).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--stage_dir",
        required=True,
        type=Path,
        help="a training stage's output dir (holds model.json and params/)",
    )
    parser.add_argument(
        "--format",
        required=True,
        choices=FORMATS,
        help="timm: DIR with model.safetensors + config.json for "
        "timm.create_model('local-dir:DIR'); "
        "npz: one file, our flat documented names + model.json; "
        "big_vision: one .npz with big_vision's ViT names (sequential LayerNorm blocks only)",
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="output dir (timm) or .npz file (npz, big_vision)"
    )
    args = parser.parse_args(argv)
    try:
        print(export(args.stage_dir, args.format, args.out))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
