"""What the stage benchmarks and the tests on digits share: the tiny config's prepare output
(digits train/val/test at 32 px, the real Beam job) and a tiny pretrain export on it, produced as
stages of the DAG into a work dir's stage cache (launch/dag.py, launch/produce.py).

The cache makes each of them once: a later call with the same config reuses it (same fingerprint,
`_SUCCESS` present), and concurrent callers (pytest-xdist workers sharing one work dir) serialise
on produce's lock, so no output is built twice or read half-built.
"""

from __future__ import annotations

from pathlib import Path


def stages(workdir: Path, pretrain=None, *, log=print) -> dict:
    """{"prepare": StageOutput[, "pretrain": StageOutput]} under `workdir`: the tiny config's
    prepare stage and, given `pretrain` (a pretrain stage group, e.g. a tiny.pretrain_config()
    with fewer steps), that pretrain stage on it; each run only when not in the cache."""
    from launch import dag
    from launch.configs import tiny

    config = tiny.get_config("prepare" if pretrain is None else "prepare,pretrain")
    if pretrain is not None:
        with config.unlocked():
            config.pretrain = pretrain
    return dag.run_pipeline(config, Path(workdir), log=log)


def prepared(root: Path) -> Path:
    """The prepare output root (digits train/val/test at 32 px) in `root`'s stage cache."""
    return stages(root)["prepare"].path


def prepared_and_pretrained(root: Path, pretrain_steps: int) -> tuple[Path, Path]:
    """(prepare output root, pretrain export dir): the tiny config's pretrain run for
    `pretrain_steps` steps, in `root`'s stage cache."""
    from launch.configs import tiny

    cfg = tiny.pretrain_config()
    cfg.steps, cfg.runtime.progress = pretrain_steps, "off"
    outputs = stages(root, cfg)
    return outputs["prepare"].path, outputs["pretrain"].path
