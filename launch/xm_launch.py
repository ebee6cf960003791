"""The stage DAG as XManager work units: one experiment per pipeline run.

    xmanager launch launch/xm_launch.py -- --config launch/configs/tiny.py [--xm_target=local]
    python -m launch.xm_launch --config launch/configs/tiny.py --workdir ./workdir
    python -m launch.xm_launch --config launch/configs/vit22b.py --workdir /gcs/BUCKET/vit22b \\
        --xm_target=vertex --xm_dry_run

The launcher plans the DAG exactly as `launch.run` does (same fingerprints and cache), then adds
one work unit per stage that is not a cache hit, in dependency order: a stage's work unit starts
only after all its upstream work units completed successfully; a failure stops its dependents and
is reported with the stage's log path. Each work unit runs `python -m launch.stage` with the
planned fingerprint (`--expect_fingerprint`), so a job never silently computes something else.

--xm_target=local packages the *current interpreter* with `xm.binary` (XManager's local executor
runs it as a subprocess: no Docker, no Bazel). --xm_target=vertex|gke packages the repo with
`xm.python_container` and sizes each stage from `config.xm.resources.<stage>` (TPU generation +
topology); --xm_dry_run prints the job specs instead of building and submitting. See
launch/cloud_tpu.py for what XManager's cloud executors lack and how it is bridged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

if __package__ in (None, ""):
    # `xmanager launch launch/xm_launch.py` imports this file as the top-level module `xm_launch`
    # with launch/ on sys.path; the repo root must be importable for `launch.*`.
    sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from absl import app
from absl import flags
from xmanager import xm
from xmanager import xm_local

from launch import cli
from launch import cloud_tpu
from launch import dag

flags.adopt_module_key_flags(cli)

TARGET = flags.DEFINE_enum(
    "xm_target",
    "local",
    ["local", "vertex", "gke"],
    "Where work units run: local subprocesses (current interpreter), Vertex AI, or GKE.",
)
DRY_RUN = flags.DEFINE_bool(
    "xm_dry_run", False, "Print the plan and each work unit's job spec; build and submit nothing."
)


@dataclasses.dataclass(frozen=True)
class Resources:
    """What one stage's work unit asks for on a cloud target."""

    tpu: cloud_tpu.TpuSlice | None
    cpu: float
    ram_gib: float

    def requirements(self) -> xm.JobRequirements:
        extra: dict[str, Any] = {}
        if self.cpu:
            extra["cpu"] = self.cpu
        if self.ram_gib:
            extra["ram"] = self.ram_gib * xm.GiB
        return self.tpu.requirements(**extra) if self.tpu else xm.JobRequirements(**extra)


DEFAULT_RESOURCES = Resources(tpu=None, cpu=8, ram_gib=32)


def stage_resources(config, registry: dag.Registry) -> dict[str, Resources]:
    """Parses `config.xm.resources` (validated at load: stage names, TPU types, topologies)."""
    xm_config = config.get("xm") if "xm" in config else None
    table = xm_config.get("resources", {}) if xm_config is not None else {}
    resources = {}
    for name, spec in dict(table).items():
        if name not in registry:
            raise ValueError(
                f"config.xm.resources.{name}: no such stage (registered: "
                f"{', '.join(registry.names)})"
            )
        tpu = (
            cloud_tpu.TpuSlice(spec["tpu_type"], spec["tpu_topology"])
            if spec.get("tpu_type")
            else None
        )
        resources[name] = Resources(
            tpu=tpu, cpu=float(spec.get("cpu", 0)), ram_gib=float(spec.get("ram_gib", 0))
        )
    return resources


def _xm_setting(config, key: str, default: str) -> str:
    if "xm" in config and key in config.xm and config.xm[key]:
        return str(config.xm[key])
    return default


@dataclasses.dataclass(frozen=True)
class Invocation:
    """How every work unit calls `launch.stage` (same config, overrides, workdir, registry).

    launch_id names this launch; multi-host stages get `--run_id=<launch_id>` so all hosts of
    the slice share one temp dir (launch.produce.produce).
    """

    config_argument: str
    overrides: tuple[str, ...]
    workdir: str
    registry: str
    launch_id: str = dataclasses.field(default_factory=lambda: time.strftime("%Y%m%d-%H%M%S"))

    def cloud_args(self, p: dag.StagePlan, resources: Resources) -> list[str]:
        multi_host = resources.tpu is not None and resources.tpu.hosts > 1
        return self.stage_args(p, run_id=self.launch_id if multi_host else None)

    def stage_args(
        self, p: dag.StagePlan, *, log_file: Path | None = None, run_id: str | None = None
    ) -> list[str]:
        args = [
            f"--stage={p.name}",
            f"--config={self.config_argument}",
            *self.overrides,
            f"--workdir={self.workdir}",
            f"--registry={self.registry}",
            f"--expect_fingerprint={p.fingerprint}",
        ]
        if p.forced:
            args.append(f"--force={p.name}")
        if log_file is not None:
            args.append(f"--log_file={log_file}")
        if run_id is not None:
            args.append(f"--run_id={run_id}")
        return args


# ---------------------------------------------------------------------------------------------
# Work-unit scheduling (shared by every target)


async def run_work_units(
    experiment: xm.Experiment,
    plans: Sequence[dag.StagePlan],
    make_job: Callable[[dag.StagePlan], xm.Job],
    describe_failure: Callable[[dag.StagePlan], str],
    log: Callable[[str], None] = print,
) -> list[str]:
    """Adds one work unit per plan, each after its upstream units succeeded; returns failures."""
    tasks: dict[str, asyncio.Task] = {}
    failures: list[str] = []

    async def run_one(p: dag.StagePlan) -> bool:
        for up in p.stage.upstream:
            if up in tasks and not await tasks[up]:
                failures.append(f"{p.name}: not launched, upstream {up} failed")
                return False
        work_unit = await experiment.add(make_job(p))
        log(f"[{p.name}] work unit {work_unit.work_unit_id} started ({p.reason})")
        try:
            await work_unit.wait_until_complete()
        except xm.ExperimentUnitError as e:
            failures.append(f"{p.name}: FAILED ({e}); {describe_failure(p)}")
            return False
        log(f"[{p.name}] work unit {work_unit.work_unit_id} completed -> {p.path}")
        return True

    for p in plans:  # dependency order, so upstream tasks exist before their dependents
        tasks[p.name] = asyncio.ensure_future(run_one(p))
    await asyncio.gather(*tasks.values())
    return failures


def run_experiment(
    title: str,
    plans: Sequence[dag.StagePlan],
    packageable: xm.Packageable,
    make_job: Callable[[xm.Experiment, xm.Executable, dag.StagePlan], xm.Job],
    describe_failure: Callable[[xm.Experiment, dag.StagePlan], str],
) -> int:
    """One XManager experiment: package once, one work unit per plan; returns an exit code."""
    failures: list[str] = []

    async def main() -> None:
        async with xm_local.create_experiment(experiment_title=title) as experiment:
            print(f"XManager experiment {experiment.experiment_id}: {title}")
            [executable] = experiment.package([packageable])
            failures.extend(
                await run_work_units(
                    experiment,
                    plans,
                    lambda p: make_job(experiment, executable, p),
                    lambda p: describe_failure(experiment, p),
                )
            )

    try:
        asyncio.run(main())
    except RuntimeError:
        # Closing a local experiment re-raises a failed job's non-zero exit status, which
        # run_work_units has already reported (with the log path) below.
        if not failures:
            raise
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    return 1 if failures else 0


def _python_path() -> str:
    return os.pathsep.join(p for p in (str(dag.REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)


def launch_local(plans: Sequence[dag.StagePlan], invocation: Invocation, title: str) -> int:
    """Runs the work units as local subprocesses of the current interpreter."""

    def log_file(experiment: xm.Experiment, p: dag.StagePlan) -> Path:
        return (
            Path(invocation.workdir)
            / ".xm"
            / str(experiment.experiment_id)
            / f"{p.name.replace('/', '-')}.log"
        )

    def make_job(experiment: xm.Experiment, executable: xm.Executable, p: dag.StagePlan) -> xm.Job:
        args = ["-m", "launch.stage", *invocation.stage_args(p, log_file=log_file(experiment, p))]
        return xm.Job(
            executable, executor=xm_local.Local(), name=p.name.replace("/", "-"), args=args
        )

    packageable = xm.binary(
        executor_spec=xm_local.LocalSpec(),
        path=sys.executable,
        env_vars={"PYTHONPATH": _python_path()},
    )
    return run_experiment(
        title, plans, packageable, make_job, lambda experiment, p: f"log: {log_file(experiment, p)}"
    )


# ---------------------------------------------------------------------------------------------
# Cloud targets


def repo_relative_config(config_argument: str, root: Path) -> str:
    """The config as the image sees it: relative to the project root, the image's workdir."""
    path, sep, arg = config_argument.partition(":")
    try:
        relative = Path(path).resolve().relative_to(root)
    except ValueError:
        raise ValueError(f"--config {path} is outside {root}, so it is not in the image") from None
    return relative.as_posix() + sep + arg


def image_packages(root: Path) -> list[str]:
    """Top-level packages under the project root (what the image needs; .venv/, workdir/ stay
    out)."""
    return sorted(
        p.name for p in root.iterdir() if (p / "__init__.py").is_file() and p.name != "tests"
    )


def docker_instructions(root: Path) -> list[str]:
    """Dockerfile steps for `xm.python_container`: copy the packages, install with constraints.

    XManager's default steps need a requirements.txt and copy the whole directory (.venv and
    workdir included); this repo pins with pyproject.toml + constraints.txt instead.
    """
    repo = root.name
    return [
        "ENV LANG=C.UTF-8 PYTHONUNBUFFERED=1",
        "RUN mkdir -p -m 775 /workdir/vit22b && chown 1000:root /workdir/vit22b",
        "WORKDIR /workdir/vit22b",
        f"COPY --chown=1000:root {repo}/pyproject.toml {repo}/constraints.txt {repo}/README.md ./",
        *(
            f"COPY --chown=1000:root {repo}/{package} ./{package}"
            for package in image_packages(root)
        ),
        "RUN python -m pip install --no-cache-dir -c constraints.txt -e '.[tpu]'",
    ]


def cloud_job_specs(
    plans: Sequence[dag.StagePlan],
    invocation: Invocation,
    config,
    resources: dict[str, Resources],
    target: str,
    root: Path,
) -> list[dict]:
    """What --xm_dry_run prints for vertex/gke: per work unit, requirements + full job spec."""
    image = _xm_setting(config, "image", "gcr.io/YOUR_PROJECT/vit22b:latest")
    base_image = _xm_setting(config, "base_image", "python:3.11-slim")
    machine_type = _xm_setting(config, "vertex_machine_type", "")
    specs = []
    for p in plans:
        res = resources.get(p.stage.type_name, DEFAULT_RESOURCES)  # instances share their type's
        requirements = res.requirements()
        args = invocation.cloud_args(p, res)
        spec: dict[str, Any] = {
            "stage": p.name,
            "fingerprint": p.fingerprint,
            "reason": p.reason,
            "requirements": repr(requirements),
            "tpu": dataclasses.asdict(res.tpu) | {"chips": res.tpu.chips, "hosts": res.tpu.hosts}
            if res.tpu
            else None,
            "command": shlex.join(["python", "-m", "launch.stage", *args]),
            "image": {
                "push_tag": image,
                "base_image": base_image,
                "path": str(root),
                "entrypoint": "python -m launch.stage",
                "docker_instructions": docker_instructions(root),
            },
        }
        if target == "vertex":
            spec["worker_pool_specs"] = cloud_tpu.vertex_worker_pool_specs(
                image_uri=image,
                args=args,
                env={},
                requirements=requirements,
                machine_type=machine_type,
            )
        else:
            spec["manifests"] = cloud_tpu.gke_manifests(
                name=f"vit22b-{p.name.replace('/', '-')}-{p.fingerprint[:8]}",
                image=image,
                command=["python", "-m", "launch.stage"],
                args=args,
                env={},
                requirements=requirements,
            )
        specs.append(spec)
    return specs


def launch_cloud(
    plans: Sequence[dag.StagePlan],
    invocation: Invocation,
    config,
    resources: dict[str, Resources],
    target: str,
    title: str,
    root: Path,
) -> int:
    """Builds the image and submits the work units through XManager's Vertex/Kubernetes
    executors."""
    cloud_tpu.install_xmanager_adapters(_xm_setting(config, "vertex_machine_type", ""))
    image = _xm_setting(config, "image", "")
    if not image or "YOUR_PROJECT" in image:
        raise ValueError(
            f"config.xm.image={image!r}: set the registry tag to push, e.g. "
            "--config.xm.image=us-docker.pkg.dev/PROJECT/REPO/vit22b:TAG"
        )
    executor_type = xm_local.Vertex if target == "vertex" else xm_local.Kubernetes
    packageable = xm.python_container(
        executor_spec=executor_type.Spec(push_image_tag=image),
        path=str(root),
        base_image=_xm_setting(config, "base_image", "python:3.11-slim"),
        docker_instructions=docker_instructions(root),
        entrypoint=xm.ModuleName("launch.stage"),
    )

    def make_job(experiment: xm.Experiment, executable: xm.Executable, p: dag.StagePlan) -> xm.Job:
        res = resources.get(p.stage.type_name, DEFAULT_RESOURCES)
        return xm.Job(
            executable,
            executor=executor_type(requirements=res.requirements()),
            name=p.name.replace("/", "-"),
            args=invocation.cloud_args(p, res),
        )

    return run_experiment(
        title,
        plans,
        packageable,
        make_job,
        lambda experiment, p: f"see the {target} logs of work unit '{p.name}'",
    )


# ---------------------------------------------------------------------------------------------


def main(argv):
    cli.no_positional(argv)
    config = cli.config()
    registry = cli.registry()
    target = TARGET.value
    try:
        plans = dag.plan(
            config, cli.workdir(), registry, only=cli.STAGES.value or None, force=cli.FORCE.value
        )
        resources = stage_resources(config, registry)
        config_argument = cli.config_argument()
        if target != "local":
            config_argument = repo_relative_config(config_argument, registry.root)
    except (dag.PlanError, ValueError) as e:
        cli.fail(e)
    print(dag.format_plan(plans))
    to_run = [p for p in plans if p.action == "run"]
    if not to_run:
        print("Nothing to launch: every stage is a cache hit.")
        return
    invocation = Invocation(
        config_argument, tuple(cli.override_arguments()), str(cli.workdir()), cli.REGISTRY.value
    )
    title = f"vit22b {Path(config_argument.partition(':')[0]).stem} " + ",".join(
        p.name for p in to_run
    )
    if target == "local":
        if DRY_RUN.value:
            for p in to_run:
                print(shlex.join([sys.executable, "-m", "launch.stage", *invocation.stage_args(p)]))
            return
        sys.exit(launch_local(to_run, invocation, title))
    try:
        if DRY_RUN.value:
            specs = cloud_job_specs(to_run, invocation, config, resources, target, registry.root)
            print(json.dumps(specs, indent=2))
            return
        sys.exit(launch_cloud(to_run, invocation, config, resources, target, title, registry.root))
    except ValueError as e:
        cli.fail(e)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
