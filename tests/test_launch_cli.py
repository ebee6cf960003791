"""`python -m launch.run` / the config files: flags, one-line errors, the tiny and vit22b
configs."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys

import pytest

from launch import dag
from test_dag import REPO, FakePipeline, fake  # noqa: F401 (fixture)

TINY = REPO / "launch" / "configs" / "tiny.py"
VIT22B = REPO / "launch" / "configs" / "vit22b.py"


def _run(fake: FakePipeline, *flags: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "launch.run",
        f"--config={fake.config_path}:a,b,c",
        f"--workdir={fake.workdir}",
        f"--registry={fake.registry_spec}",
        *flags,
    ]
    return subprocess.run(
        command, cwd=fake.root, env=fake.env(), capture_output=True, text=True, timeout=60
    )


def test_help_lists_the_flags():
    out = subprocess.run(
        [sys.executable, "-m", "launch.run", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode in (0, 1)  # absl's --help exits 1 after printing
    for flag in ("--config", "--workdir", "--stages", "--force", "--dry_run"):
        assert flag in out.stdout


def test_run_dry_run_and_progress(fake):
    out = _run(fake, "--dry_run")
    assert out.returncode == 0 and fake.calls() == []
    assert "MISS" in out.stdout and "no cached output" in out.stdout
    out = _run(fake)
    assert out.returncode == 0, out.stderr
    assert "[1/3] a: running (no cached output)" in out.stdout
    assert "[3/3] c: done in " in out.stdout
    assert f"  b: {fake.workdir / 'b'}" in out.stdout  # output paths at the end
    out = _run(fake, "--dry_run", "--config.a.value=2")
    lines = out.stdout.splitlines()
    assert any(
        line.startswith("a  MISS") and "config changed: a.value 1 -> 2" in line for line in lines
    )
    assert any(line.startswith("b  MISS") and "upstream changed: a" in line for line in lines)


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--config.a.valu=3"],
            'error: --config.a.valu: unknown config key \'valu\' (did you mean "value"?)',
        ),
        (["--config.zz.value=3"], "error: --config.zz.value: unknown config key 'zz'"),
        (["--config.a.value=abc"], "error: flag --config.a.value=abc: invalid literal for int()"),
        (["--stages=c"], "error: --stages c needs upstream a, b, not in the cache"),
        (["--stages=zz"], "error: --stages: unknown stage 'zz'"),
    ],
)
def test_errors_are_one_line(fake, flags, message):
    out = _run(fake, *flags)
    assert out.returncode == 2
    assert out.stderr.startswith(message), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert fake.calls() == []


@pytest.mark.parametrize("path", [TINY, VIT22B])
def test_configs_are_locked_default_config_groups(path):
    get_config = runpy.run_path(str(path))["get_config"]
    config = get_config()
    from pipelines import prepare

    assert set(config["prepare"].keys()) == set(prepare.default_config().keys())
    prepare.validate_config(config.prepare)
    assert config.is_locked
    with pytest.raises(AttributeError):
        config.prepare.no_such_key = 1
    assert "python -m launch." in get_config.__doc__  # the intended command
    # ARG keeps a subset of the stage groups; `xm` and `recipe` (launch/recipe.py's marks) are not
    # stages.
    assert list(get_config("prepare").keys()) == ["prepare", "recipe", "xm"]
    assert list(dict.fromkeys(s.type_name for s in dag.STAGES.expand(config))) == [
        n for n in dag.STAGES.names if n in config
    ]


def test_vit22b_xm_group_targets_a_tpu_v4_pod():
    config = runpy.run_path(str(VIT22B))["get_config"]()
    assert config.prepare.datasets.imagenet2012.source == "tfds"
    from launch import xm_launch

    resources = xm_launch.stage_resources(config, dag.STAGES)
    assert resources["pretrain"].tpu.version == "v4" and resources["pretrain"].tpu.chips == 1024


def test_vit22b_vertex_dry_run(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.xm_launch",
            f"--config={VIT22B}",
            f"--workdir={tmp_path}",
            "--xm_target=vertex",
            "--xm_dry_run",
            "--config.xm.resources.prepare.tpu_type=v4",
            "--config.xm.resources.prepare.tpu_topology=2x2x1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    specs = {s["stage"]: s for s in json.loads(out.stdout[out.stdout.index("\n[") + 1 :])}
    machine = specs["prepare"]["worker_pool_specs"][0]["machine_spec"]
    assert (machine["accelerator_type"], machine["tpu_topology"]) == ("TPU_V4_POD", "2x2x1")
    args = specs["prepare"]["worker_pool_specs"][0]["container_spec"]["args"]
    assert args[:2] == ["--stage=prepare", "--config=launch/configs/vit22b.py"]  # image-relative
    assert "--config.xm.resources.prepare.tpu_topology=2x2x1" in args


# Every training stage of the tiny config, shortened: the whole DAG still runs, each stage compiles.
SHORT = {
    "pretrain.steps": 8,
    "pretrain.checkpoint_every": 4,
    "pretrain.optim.warmup_steps": 2,
    "pretrain.optim.cooldown_steps": 2,
    "finetune.runs.r32.steps": 4,
    "finetune.runs.r48.steps": 4,
    "finetune.runs.r32.optim.warmup_steps": 1,
    "finetune.runs.r48.optim.warmup_steps": 1,
    "distill.runs.mu_seq.steps": 4,
    "distill.runs.mu_seq.optim.warmup_steps": 1,
    "lit.steps": 4,
    "lit.optim.warmup_steps": 1,
}


@pytest.mark.slow
def test_tiny_dryrun_then_all_hits_then_single_stage_rerun(tmp_path):
    """The issue's "done when": make dryrun, again (all hits, seconds), --stages/--force rerun."""

    def run(*flags):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "launch.run",
                f"--config={TINY}",
                f"--workdir={tmp_path}",
                *(f"--config.{k}={v}" for k, v in SHORT.items()),
                *flags,
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout

    first = run()
    stages = [
        line.split("] ", 1)[1].split(":")[0] for line in first.splitlines() if ": done in" in line
    ]
    assert (
        stages[0] == "prepare"
        and stages[-1] == "evaluate"
        and "finetune/r48" in stages
        and "lit" in stages
    )
    assert "Report: " in first and first.strip().endswith("report.html")
    second = (
        run()
    )  # all hits: nothing executes (its wall time is noted in the README, not asserted)
    assert "running" not in second and all(f"{name}: cache hit" in second for name in stages)
    third = run("--stages=prepare", "--force=prepare")
    assert "prepare: running (forced; replaces the cached output)" in third
    assert [line for line in third.splitlines() if ": running" in line] == [
        line for line in third.splitlines() if "] prepare: running" in line
    ]
    config = runpy.run_path(str(TINY))["get_config"]()
    config.update_from_flattened_dict(SHORT)
    assert all(p.action == "reuse" for p in dag.plan(config, tmp_path))
