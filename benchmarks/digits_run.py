"""What the stage benchmarks on digits share: the prepared digits (the real Beam job) and the tiny
config's pretrain export, made once under a work dir and reused by later runs."""
from __future__ import annotations

from pathlib import Path


def prepared(root: Path) -> Path:
    """The prepare output root (digits train/val/test at 32 px) under `root`, created when missing."""
    from pipelines import prepare

    data = root / "prepared"
    if not (data / "digits" / "val" / "manifest.json").exists():
        prepare.prepare(prepare.default_config(), data)
    return data


def prepared_and_pretrained(root: Path, pretrain_steps: int) -> tuple[Path, Path]:
    """(prepare output root, pretrain export dir) under `root`, created when missing."""
    from launch.configs import tiny
    from trainer import pretrain

    data = prepared(root)
    export = root / f"pretrain-{pretrain_steps}"
    if not (export / "model.json").exists():
        cfg = tiny.pretrain_config()
        cfg.data.prepared_dir, cfg.steps, cfg.runtime.progress = str(data), pretrain_steps, "off"
        export.mkdir(parents=True, exist_ok=True)
        pretrain.run(cfg, {}, export)
    return data, export
