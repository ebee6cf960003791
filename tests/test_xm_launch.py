"""XManager launcher: a real local launch of the fake pipeline, and Cloud TPU job specs.

The local test runs `python -m launch.xm_launch` as a subprocess: XManager's local executor starts
one `python -m launch.stage` process per work unit, and the experiment lands in an XManager SQLite
database pointed at tmp_path with `--xm_db_yaml_config_path`.
"""

from __future__ import annotations

import json
import runpy
import sqlite3
import subprocess
import sys

import pytest

from launch import cache
from launch import cloud_tpu
from launch import dag
from launch import produce
from launch import xm_launch
from test_dag import REPO, FakePipeline, fake  # noqa: F401 (fixture)
from xmanager import xm
from xmanager.cloud import kubernetes
from xmanager.cloud import vertex
from xmanager.xm_local import executors


def _launch(
    fake: FakePipeline, *flags: str, env: dict | None = None
) -> subprocess.CompletedProcess:
    db_config = fake.root / "xm_db.yaml"
    db_config.write_text(
        "sql_connector: sqlite\nsql_connection_settings:\n  backend: sqlite\n"
        f"  db_name: {fake.root / 'xm.sqlite3'}\n"
    )
    command = [
        sys.executable,
        "-m",
        "launch.xm_launch",
        f"--config={fake.config_path}:a,b,c",
        f"--workdir={fake.workdir}",
        f"--registry={fake.registry_spec}",
        f"--xm_db_yaml_config_path={db_config}",
        *flags,
    ]
    return subprocess.run(
        command,
        cwd=fake.root,
        env=env or fake.env(HOME=str(fake.root)),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _experiments(fake: FakePipeline) -> tuple[list, list]:
    with sqlite3.connect(fake.root / "xm.sqlite3") as db:
        return (
            db.execute("SELECT experiment_id, experiment_title FROM experiment").fetchall(),
            db.execute("SELECT experiment_id, work_unit_id FROM work_unit").fetchall(),
        )


def test_local_launch_runs_the_pipeline_as_work_units(fake):
    out = _launch(fake, "--config.b.value=3")
    assert out.returncode == 0, out.stdout + out.stderr
    assert fake.calls() == ["a", "b", "c"]  # one process per stage, in dependency order
    experiments, work_units = _experiments(fake)
    [(experiment_id, title)] = experiments
    assert title == "vit22b fake_config a,b,c"
    assert sorted(work_units) == [(experiment_id, 1), (experiment_id, 2), (experiment_id, 3)]
    # The override reached the work unit: same fingerprint as planning in this process.
    plans = dag.plan(fake.config(b__value=3), fake.workdir, fake.registry)
    assert [p.action for p in plans] == ["reuse"] * 3
    assert (plans[1].path / "b.txt").read_text() == "5"
    logs = fake.workdir / ".xm" / str(experiment_id)
    assert "b: running" in (logs / "b.log").read_text()

    again = _launch(fake, "--config.b.value=3")
    assert again.returncode == 0 and "Nothing to launch" in again.stdout
    assert len(_experiments(fake)[0]) == 1  # no experiment for an all-cache-hit run


def test_local_launch_failure_stops_dependents_and_names_the_log(fake):
    out = _launch(fake, env=fake.env(HOME=str(fake.root), FAKE_FAIL="b"))
    assert out.returncode == 1
    assert fake.calls() == ["a", "b"]  # c never started
    [(experiment_id, _)] = _experiments(fake)[0]
    log = fake.workdir / ".xm" / str(experiment_id) / "b.log"
    assert "error: b: FAILED" in out.stderr and f"log: {log}" in out.stderr
    assert "error: c: not launched, upstream b failed" in out.stderr
    assert "stage b failed on purpose" in log.read_text()


def test_local_dry_run_prints_commands(fake):
    out = _launch(fake, "--xm_dry_run", "--stages=a")
    assert out.returncode == 0, out.stderr
    assert "launch.stage --stage=a" in out.stdout and fake.calls() == []


def _specs(fake: FakePipeline, target: str) -> dict[str, dict]:
    config = fake.config()
    plans = dag.plan(config, fake.workdir, fake.registry)
    invocation = xm_launch.Invocation(
        xm_launch.repo_relative_config(f"{fake.config_path}:a,b,c", fake.root),
        ("--config.b.value=1",),
        "/gcs/bucket/run",
        fake.registry_spec,
        launch_id="L1",
    )
    resources = xm_launch.stage_resources(config, fake.registry)
    specs = xm_launch.cloud_job_specs(plans, invocation, config, resources, target, fake.root)
    return {spec["stage"]: spec for spec in specs}


def test_vertex_specs_carry_tpu_topology_and_command(fake):
    specs = _specs(fake, "vertex")
    [pool] = specs["b"]["worker_pool_specs"]
    assert pool["machine_spec"] == {
        "machine_type": "ct4p-hightpu-4t",
        "accelerator_type": "TPU_V4_POD",
        "accelerator_count": 4,
        "tpu_topology": "2x2x4",
        "gpu_partition_size": "",
    }
    args = pool["container_spec"]["args"]
    assert args[:3] == ["--stage=b", "--config=fake_config.py:a,b,c", "--config.b.value=1"]
    assert "--workdir=/gcs/bucket/run" in args and "--run_id=L1" in args  # 4 hosts share a run id
    assert f"--expect_fingerprint={specs['b']['fingerprint']}" in args
    assert specs["b"]["command"].startswith("python -m launch.stage --stage=b ")
    assert specs["b"]["tpu"] == {"version": "v4", "topology": "2x2x4", "chips": 16, "hosts": 4}
    assert (
        specs["c"]["worker_pool_specs"][0]["machine_spec"]["accelerator_type"] == "TPU_V5_LITEPOD"
    )
    assert "--run_id=L1" not in specs["c"]["command"]  # v5e 2x2 is one host
    cpu = specs["a"]["worker_pool_specs"][0]["machine_spec"]
    assert cpu["accelerator_type"] == "ACCELERATOR_TYPE_UNSPECIFIED" and cpu[
        "machine_type"
    ].startswith("n1-")
    assert "COPY --chown=1000:root " in " ".join(specs["a"]["image"]["docker_instructions"])


def test_gke_specs_are_indexed_jobs_on_tpu_node_pools(fake):
    service, job = _specs(fake, "gke")["b"]["manifests"]
    assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 4, 4)
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"]
    assert pod["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": "tpu-v4-podslice",
        "cloud.google.com/gke-tpu-topology": "2x2x4",
    }
    assert pod["tolerations"] == [cloud_tpu.TPU_TOLERATION]
    [container] = pod["containers"]
    assert container["resources"]["limits"] == {"google.com/tpu": "4"}
    assert container["command"] == ["python", "-m", "launch.stage"]
    assert container["args"][0] == "--stage=b"


def test_cli_cloud_dry_run_prints_specs(fake):
    out = _launch(fake, "--xm_target=gke", "--xm_dry_run")
    assert out.returncode == 0, out.stderr
    specs = json.loads(out.stdout[out.stdout.index("\n[") + 1 :])
    assert [s["stage"] for s in specs] == ["a", "b", "c"] and fake.calls() == []
    assert (
        specs[2]["manifests"][1]["spec"]["template"]["spec"]["nodeSelector"][
            "cloud.google.com/gke-tpu-topology"
        ]
        == "2x2"
    )


@pytest.mark.parametrize(
    "version, topology, message",
    [
        ("v9", "2x2", "expected one of"),
        ("v4", "2x2", "expected 3 positive dims"),
        ("v5e", "4x0", "expected 2 positive dims"),
    ],
)
def test_tpu_slice_validation(version, topology, message):
    with pytest.raises(ValueError, match=message):
        cloud_tpu.TpuSlice(version, topology)


def test_tpu_slice_hosts():
    assert (cloud_tpu.TpuSlice("v4", "8x8x16").chips, cloud_tpu.TpuSlice("v4", "8x8x16").hosts) == (
        1024,
        256,
    )
    assert cloud_tpu.TpuSlice("v5e", "2x4").hosts == 1
    assert cloud_tpu.TpuSlice("v5e", "16x16").hosts == 64


def test_unknown_stage_in_resources_is_rejected(fake):
    config = fake.config()
    with config.unlocked():
        config.xm.resources.nope = dict(config.xm.resources.a)
    with pytest.raises(ValueError, match=r"config.xm.resources.nope: no such stage"):
        xm_launch.stage_resources(config, fake.registry)


def test_xmanager_adapters_feed_xmanagers_own_executors(monkeypatch):
    for module, name in [
        (vertex, "get_machine_spec"),
        (kubernetes, "requirements_from_executor"),
        (kubernetes, "node_selector_from_executor"),
    ]:
        monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    monkeypatch.setattr(cloud_tpu, "_ORIGINAL", {})
    v4 = cloud_tpu.TpuSlice("v4", "2x2x1").requirements()
    job = xm.Job(executable=None, executor=executors.Vertex(requirements=v4))
    with pytest.raises(KeyError):  # XManager alone maps only TPU v2/v3
        vertex.get_machine_spec(job)
    cloud_tpu.install_xmanager_adapters()
    assert vertex.get_machine_spec(job)["tpu_topology"] == "2x2x1"
    assert vertex.get_machine_spec(job)["machine_type"] == "ct4p-hightpu-4t"
    cpu_job = xm.Job(
        executable=None, executor=executors.Vertex(requirements=xm.JobRequirements(cpu=4))
    )
    assert vertex.get_machine_spec(cpu_job)["machine_type"].startswith("n1-")
    cloud_tpu.install_xmanager_adapters(machine_type="ct4p-custom")  # config.xm.vertex_machine_type
    assert vertex.get_machine_spec(job)["machine_type"] == "ct4p-custom"
    assert vertex.get_machine_spec(cpu_job)["machine_type"].startswith("n1-")

    single = executors.Kubernetes(requirements=v4)
    assert kubernetes.node_selector_from_executor(single) == {
        "cloud.google.com/gke-tpu-accelerator": "tpu-v4-podslice",
        "cloud.google.com/gke-tpu-topology": "2x2x1",
    }
    assert kubernetes.requirements_from_executor(single).limits == {"google.com/tpu": "4"}
    multi = executors.Kubernetes(requirements=cloud_tpu.TpuSlice("v4", "2x2x2").requirements())
    with pytest.raises(ValueError, match="spans 2 hosts"):
        kubernetes.node_selector_from_executor(multi)


def test_multi_host_protocol_commits_once_from_process_zero(fake, monkeypatch):
    config = fake.config("a")
    [p] = dag.plan(config, fake.workdir, fake.registry)
    monkeypatch.setattr(produce, "jax_process", lambda: (1, 2))
    output = produce.produce(p, config.a, {}, log=lambda _: None, run_id="R")
    assert output.outputs["artifacts"] == {"a": "a.txt"} and not cache.is_complete(p.path)
    shared = p.path.parent / f".tmp-{p.path.name}-R"
    assert (shared / "a.txt").exists()  # host 1 wrote into the shared dir, did not commit
    monkeypatch.setattr(produce, "jax_process", lambda: (0, 2))
    output = produce.produce(p, config.a, {}, log=lambda _: None, run_id="R")
    assert cache.is_complete(p.path) and not shared.exists() and fake.calls() == ["a", "a"]


@pytest.mark.slow
def test_local_launch_of_the_tiny_pipeline(tmp_path):
    """The real tiny config's prepare + pretrain (shortened) as XManager work units; the whole DAG
    runs through launch.run in tests/test_launch_cli.py."""
    db_config = tmp_path / "xm_db.yaml"
    db_config.write_text(
        "sql_connector: sqlite\nsql_connection_settings:\n  backend: sqlite\n"
        f"  db_name: {tmp_path / 'xm.sqlite3'}\n"
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.xm_launch",
            f"--config={REPO / 'launch/configs/tiny.py'}:prepare,pretrain",
            f"--workdir={tmp_path / 'workdir'}",
            f"--xm_db_yaml_config_path={db_config}",
            "--config.pretrain.steps=10",
            "--config.pretrain.checkpoint_every=5",
            "--config.pretrain.optim.warmup_steps=2",
            "--config.pretrain.optim.cooldown_steps=2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    with sqlite3.connect(tmp_path / "xm.sqlite3") as db:
        [(experiment_id,)] = db.execute("SELECT experiment_id FROM experiment").fetchall()
        work_units = db.execute("SELECT work_unit_id FROM work_unit").fetchall()
    config = runpy.run_path(str(REPO / "launch/configs/tiny.py"))["get_config"]("prepare,pretrain")
    config.pretrain.steps, config.pretrain.checkpoint_every = 10, 5
    config.pretrain.optim.warmup_steps, config.pretrain.optim.cooldown_steps = 2, 2
    plans = dag.plan(config, tmp_path / "workdir")
    assert len(work_units) == len(plans) and all(p.action == "reuse" for p in plans)
