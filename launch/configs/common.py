"""Pieces shared by the pipeline configs: the `xm` group and stage selection by config arg."""

from __future__ import annotations

import ml_collections


def resources(
    *, tpu_type: str = "", tpu_topology: str = "", cpu: float = 0, ram_gib: float = 0
) -> ml_collections.ConfigDict:
    """One stage's cloud resources (launch/xm_launch.py): a TPU slice, or CPU/RAM only."""
    return ml_collections.ConfigDict(
        {
            "tpu_type": tpu_type,
            "tpu_topology": tpu_topology,
            "cpu": float(cpu),
            "ram_gib": float(ram_gib),
        }
    )


def xm_group(
    stage_resources: dict[str, ml_collections.ConfigDict],
    *,
    image: str = "gcr.io/YOUR_PROJECT/vit22b:latest",
    base_image: str = "python:3.11-slim",
) -> ml_collections.ConfigDict:
    """Launcher settings; not a stage group, so it is in no stage's fingerprint."""
    return ml_collections.ConfigDict(
        {
            "image": image,  # registry tag the cloud image is pushed to
            "base_image": base_image,  # Python 3.11 to match constraints.txt
            "vertex_machine_type": "",  # "" = launch/cloud_tpu.py's table for the TPU type
            "resources": ml_collections.ConfigDict(stage_resources),
        }
    )


def select(groups: dict[str, ml_collections.ConfigDict], arg: str | None) -> dict:
    """`get_config("prepare,pretrain")` keeps only those stage groups (default: all)."""
    if not arg:
        return groups
    wanted = [name.strip() for name in arg.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in groups]
    if unknown:
        raise ValueError(f"config arg: unknown stage group(s) {unknown}; known: {list(groups)}")
    return {name: groups[name] for name in wanted}


def build(
    groups: dict[str, ml_collections.ConfigDict],
    xm: ml_collections.ConfigDict,
    arg: str | None,
    recipe_marks: dict[str, dict] | None = None,
) -> ml_collections.ConfigDict:
    """The locked pipeline config: one group per stage + `xm` (+ `recipe`: the config file's marks,
    launch/recipe.py); overrides cannot invent keys."""
    from launch import recipe

    config = ml_collections.ConfigDict()
    for name, group in select(groups, arg).items():
        config[name] = group
    config.xm = xm
    recipe.attach(config, recipe_marks or {})
    config.lock()
    return config
