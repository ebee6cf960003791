"""Tiny CPU dry-run of every stage that exists, on scikit-learn's bundled digits (offline).

    make dryrun     # = python -m launch.run --config launch/configs/tiny.py
    python -m launch.run --config launch/configs/tiny.py --dry_run
    python -m launch.run --config launch/configs/tiny.py:prepare --config.prepare.datasets.digits.image_size=16
    python -m launch.xm_launch --config launch/configs/tiny.py --workdir ./workdir   # as XManager work units

Each stage group starts from its module's `default_config()` (the complete key set), is adjusted
here, and the whole config is locked, so `--config.<stage>.<key>=...` cannot invent keys.
Adding a stage = import its module and add one entry to `groups` below.
"""
from __future__ import annotations

import ml_collections

from launch.configs import common
from pipelines import prepare


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """`python -m launch.run --config launch/configs/tiny.py[:STAGE,...]` (ARG keeps only those stages)."""
    groups = {
        # digits at 32 px, 1 in-process FnApiRunner worker (pipelines/prepare.py defaults)
        "prepare": prepare.default_config(),
    }
    xm = common.xm_group({name: common.resources(cpu=2, ram_gib=8) for name in groups})
    return common.build(groups, xm, arg)
