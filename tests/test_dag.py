"""Stage DAG: fingerprints, cache hits/misses, --stages/--force, atomicity, concurrency.

Tests use a tiny fake pipeline written into tmp_path (`fakepipe`), registered in a Registry passed
explicitly. Every stage call appends its name to a calls file named in the config, so "did it run"
is checked by counting, not by timing; the calls file also works across processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Iterator

import ml_collections
import pytest

from launch import cache
from launch import code_hashes
from launch import dag
from launch import fingerprint

REPO = Path(__file__).resolve().parents[1]

_STAGES_PY = '''
"""Fake stages: a -> b -> c (b lives in stage_b.py), and `slow` for kill / concurrency tests."""
import os
import time

import ml_collections


def _record(cfg, name):
    with open(cfg.calls_file, "a") as f:
        f.write(name + "\\n")


def default_config():
    return ml_collections.ConfigDict({"value": 1, "calls_file": ""})


def run_a(cfg, inputs, out):
    _record(cfg, "a")
    (out / "a.txt").write_text(str(cfg.value))
    return {"artifacts": {"a": "a.txt"}, "metrics": {"value": cfg.value}}


def run_c(cfg, inputs, out):
    _record(cfg, "c")
    (out / "metrics.jsonl").write_text('{"step": 1, "own": 1.0}\\n')
    return {"metrics": {"b_total": int((inputs["b"].path / "b.txt").read_text())}}


def run_d(cfg, inputs, out):
    _record(cfg, f"d{cfg.value}:" + "+".join(sorted(inputs)))
    return {"metrics": {"value": cfg.value}}


def run_slow(cfg, inputs, out):
    _record(cfg, "slow")
    (out / "partial.txt").write_text("half-way")
    started = os.environ.get("FAKE_STARTED")
    if started:
        with open(started, "a") as f:
            f.write(f"{os.getpid()}\\n")
    time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
    (out / "done.txt").write_text("done")
    return {"artifacts": {"done": "done.txt"}, "metrics": {}}
'''

_STAGE_B_PY = '''
"""Stage b: the only fake stage that imports fakepipe.helpers."""
import os

from fakepipe import helpers
from fakepipe.stages import _record


def run_b(cfg, inputs, out):
    _record(cfg, "b")
    if os.environ.get("FAKE_FAIL") == "b":
        raise RuntimeError("stage b failed on purpose")
    total = helpers.double(int((inputs["a"].path / "a.txt").read_text())) + cfg.value
    (out / "b.txt").write_text(str(total))
    return {"artifacts": {"b": "b.txt"}, "metrics": {"total": total}}
'''

_REGISTRY_PY = '''
from pathlib import Path

from launch import dag

REGISTRY = dag.Registry([
    dag.Stage("a", "fakepipe.stages:run_a"),
    dag.Stage("b", "fakepipe.stage_b:run_b", upstream=("a",)),
    dag.Stage("c", "fakepipe.stages:run_c", upstream=("b",)),
    dag.Stage("slow", "fakepipe.stages:run_slow"),
    dag.Stage("d", "fakepipe.stages:run_d", upstream=("a",), instances=True, \
upstream_from=("extra",)),
    dag.Stage("e", "fakepipe.stages:run_a", optional_upstream=("b", "d")),
], root=Path(__file__).resolve().parents[1])
'''

_CONFIG_PY = '''
"""Fake pipeline config. Command: python -m launch.run --config {path}:a,b,c \
--registry fakepipe.registry:REGISTRY"""
import ml_collections

from fakepipe import stages


def get_config(arg="a,b,c"):
    config = ml_collections.ConfigDict()
    for name in arg.split(","):
        config[name] = stages.default_config()
        config[name].calls_file = {calls!r}
    config.xm = ml_collections.ConfigDict({{
        "image": "us-docker.pkg.dev/proj/repo/vit22b:test",
        "base_image": "python:3.11-slim",
        "vertex_machine_type": "",
        "resources": {{
            "a": {{"tpu_type": "", "tpu_topology": "", "cpu": 4, "ram_gib": 16}},
            "b": {{"tpu_type": "v4", "tpu_topology": "2x2x4", "cpu": 0, "ram_gib": 0}},
            "c": {{"tpu_type": "v5e", "tpu_topology": "2x2", "cpu": 0, "ram_gib": 0}},
        }},
    }})
    config.lock()
    return config
'''


class FakePipeline:
    """The fake pipeline's files, registry and helpers for one test."""

    def __init__(self, root: Path):
        self.root = root
        package = root / "fakepipe"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "helpers.py").write_text("def double(x):\n    return 2 * x\n")
        (package / "stages.py").write_text(textwrap.dedent(_STAGES_PY))
        (package / "stage_b.py").write_text(textwrap.dedent(_STAGE_B_PY))
        (package / "registry.py").write_text(textwrap.dedent(_REGISTRY_PY))
        self.calls_file = root / "calls.txt"
        self.config_path = root / "fake_config.py"
        self.config_path.write_text(
            _CONFIG_PY.format(path=self.config_path, calls=str(self.calls_file))
        )
        self.workdir = root / "workdir"
        self.registry_spec = "fakepipe.registry:REGISTRY"
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        for name in [m for m in sys.modules if m == "fakepipe" or m.startswith("fakepipe.")]:
            del sys.modules[name]  # each test gets its own copy of the package
        from fakepipe import registry

        self.registry: dag.Registry = registry.REGISTRY

    def config(self, stages: str = "a,b,c", **values) -> ml_collections.ConfigDict:
        namespace: dict = {}
        exec(compile(self.config_path.read_text(), str(self.config_path), "exec"), namespace)
        config = namespace["get_config"](stages)
        for key, value in values.items():
            stage, field = key.split("__")
            config[stage][field] = value
        return config

    def calls(self) -> list[str]:
        return self.calls_file.read_text().split() if self.calls_file.exists() else []

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(self.root), str(REPO), env.get("PYTHONPATH", "")])
        env.update(extra)
        return env

    def run(self, config=None, **kwargs) -> dict[str, dag.StageOutput]:
        return dag.run_pipeline(
            config or self.config(),
            self.workdir,
            registry=self.registry,
            log=lambda line: None,
            **kwargs,
        )

    def stage_command(self, stage: str, *extra: str) -> list[str]:
        groups = "slow" if stage == "slow" else "a,b,c"
        return [
            sys.executable,
            "-m",
            "launch.stage",
            f"--stage={stage}",
            f"--config={self.config_path}:{groups}",
            f"--workdir={self.workdir}",
            f"--registry={self.registry_spec}",
            *extra,
        ]


@pytest.fixture
def fake(tmp_path) -> Iterator[FakePipeline]:
    """A fresh fake pipeline (other test modules import this fixture)."""
    pipeline = FakePipeline(tmp_path)
    yield pipeline
    sys.path.remove(str(tmp_path))


def test_registry_validates_and_orders():
    stages = [dag.Stage("b", "m:f", upstream=("a",)), dag.Stage("a", "m:g")]
    assert dag.Registry(stages).names == ["a", "b"]
    with pytest.raises(ValueError, match="unknown upstream"):
        dag.Registry([dag.Stage("b", "m:f", upstream=("zz",))])
    with pytest.raises(ValueError, match="cycle"):
        dag.Registry(
            [dag.Stage("a", "m:f", upstream=("b",)), dag.Stage("b", "m:f", upstream=("a",))]
        )
    with pytest.raises(ValueError, match="module:function"):
        dag.Registry([dag.Stage("a", "no_colon")])


def test_registered_stage_table():
    assert dag.STAGES.names[:2] == ["prepare", "pretrain"]
    assert dag.STAGES["prepare"].target == "pipelines.prepare:run"
    assert dag.STAGES["pretrain"].target == "trainer.pretrain:run"
    assert dag.STAGES["pretrain"].upstream == ("prepare",)


def test_importing_launch_is_cheap():
    code = (
        "import sys, launch.dag, launch.run, launch.stage; "
        "heavy = [m for m in ('jax', 'tensorflow', 'apache_beam', 'xmanager', 'flax', 'grain') "
        "if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == "[]"


def test_run_writes_stage_dirs(fake):
    outputs = fake.run()
    assert fake.calls() == ["a", "b", "c"]
    b = outputs["b"]
    assert b.path == fake.workdir / "b" / b.fingerprint[:16]
    assert sorted(p.name for p in b.path.iterdir()) == [
        "_SUCCESS",
        "b.txt",
        "config.json",
        "fingerprint.json",
        "metrics.jsonl",
        "outputs.json",
        "tb",
    ]
    assert {k: v for k, v in b.outputs.items() if k != "recipe"} == {
        "artifacts": {"b": "b.txt"},
        "metrics": {"total": 3},
    }
    # The recipe card (launch/recipe.py); stage_b.py has no default_config(): every value is the
    # config's.
    assert b.outputs["recipe"]["value"] == {"value": 1, "source": "user", "confirmed": True}
    assert json.loads((b.path / "config.json").read_text())["value"] == 1
    assert json.loads((b.path / "metrics.jsonl").read_text()) == {"step": 0, "total": 3.0}
    assert list((b.path / "tb").glob("events.out.tfevents.*"))
    # A stage that writes its own metrics.jsonl keeps it.
    assert (outputs["c"].path / "metrics.jsonl").read_text() == '{"step": 1, "own": 1.0}\n'


def test_identical_rerun_is_all_cache_hits(fake):
    first = fake.run()
    second = fake.run()
    assert fake.calls() == ["a", "b", "c"]  # nothing re-executed
    assert {k: v.path for k, v in first.items()} == {k: v.path for k, v in second.items()}
    plans = dag.plan(fake.config(), fake.workdir, fake.registry)
    assert [(p.name, p.action, p.reason) for p in plans] == [
        ("a", "reuse", "cache hit"),
        ("b", "reuse", "cache hit"),
        ("c", "reuse", "cache hit"),
    ]


def test_config_change_reruns_stage_and_dependents_only(fake):
    fake.run()
    plans = dag.plan(fake.config(b__value=5), fake.workdir, fake.registry)
    assert [(p.name, p.action) for p in plans] == [("a", "reuse"), ("b", "run"), ("c", "run")]
    reasons = {p.name: p.reason for p in plans}
    assert reasons["b"] == "config changed: b.value 1 -> 5"
    assert reasons["c"] == "upstream changed: b"
    fake.run(fake.config(b__value=5))
    assert fake.calls() == ["a", "b", "c", "b", "c"]


def test_source_edit_invalidates_only_stages_importing_it(fake):
    fake.run()
    assert (
        "fakepipe/helpers.py"
        in dag.plan(fake.config(), fake.workdir, fake.registry)[1].components["sources"]
    )
    (fake.root / "fakepipe" / "helpers.py").write_text("def double(x):\n    return x + x\n")
    plans = {p.name: p for p in dag.plan(fake.config(), fake.workdir, fake.registry)}
    assert plans["a"].action == "reuse"  # stage a does not import helpers
    assert plans["b"].reason == "source changed: fakepipe/helpers.py"
    assert plans["c"].reason == "upstream changed: b"


def test_version_change_is_explained(fake, monkeypatch):
    fake.run()
    old = fingerprint.package_versions()
    monkeypatch.setattr(fingerprint, "package_versions", lambda: {**old, "jax": "9.9"})
    plans = dag.plan(fake.config(), fake.workdir, fake.registry)
    assert [p.action for p in plans] == ["run"] * 3
    assert plans[0].reason == f'versions changed: jax "{old["jax"]}" -> "9.9"'


def test_import_closure_follows_relative_and_lazy_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "leaf.py").write_text("X = 1\n")
    (pkg / "other.py").write_text("import json\n")
    (pkg / "unused.py").write_text("")
    (pkg / "main.py").write_text("from .sub import leaf\n\ndef f():\n    from pkg import other\n")
    files = [
        p.relative_to(tmp_path).as_posix() for p in code_hashes.import_closure(tmp_path, "pkg.main")
    ]
    assert files == [
        "pkg/__init__.py",
        "pkg/main.py",
        "pkg/other.py",
        "pkg/sub/__init__.py",
        "pkg/sub/leaf.py",
    ]


def test_force_reruns_just_that_stage(fake):
    fake.run()
    before = {name: out.path for name, out in fake.run().items()}
    outputs = fake.run(only=["a"], force=["a"])
    assert fake.calls() == ["a", "b", "c", "a"]
    assert outputs["a"].path == before["a"]  # same fingerprint, replaced in place
    assert cache.is_complete(outputs["a"].path)
    assert [p.action for p in dag.plan(fake.config(), fake.workdir, fake.registry)] == ["reuse"] * 3


def test_stages_reuses_cached_upstream(fake):
    fake.run()
    outputs = fake.run(fake.config(c__value=7), only=["c"])
    assert fake.calls() == ["a", "b", "c", "c"]
    assert set(outputs) == {"a", "b", "c"}


def test_stages_with_missing_upstream_errors_clearly(fake):
    with pytest.raises(
        dag.PlanError,
        match=r"--stages c needs upstream a, b, not in the cache .*e\.g\. --stages a,b,c",
    ):
        fake.run(only=["c"])
    assert fake.calls() == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"only": ["zz"]}, "unknown stage 'zz'"),
        ({"only": ["slow"]}, "no config group"),
        ({"only": ["a"], "force": ["b"]}, "not among --stages"),
    ],
)
def test_bad_stage_names_error(fake, kwargs, message):
    with pytest.raises(dag.PlanError, match=message):
        fake.run(**kwargs)


def test_missing_upstream_group_errors(fake):
    with pytest.raises(dag.PlanError, match="needs upstream a, which has no config group"):
        fake.run(fake.config("b"))


def test_failing_stage_leaves_nothing_complete(fake, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL", "b")
    with pytest.raises(RuntimeError, match="failed on purpose"):
        fake.run()
    assert not list((fake.workdir / "b").glob("*/_SUCCESS"))
    assert not [p for p in (fake.workdir / "b").iterdir() if p.name != ".locks"]  # temp dir removed
    monkeypatch.delenv("FAKE_FAIL")
    fake.run()
    assert fake.calls() == ["a", "b", "b", "c"]


def test_stage_killed_midway_is_rerun(fake):
    started = fake.root / "started.txt"
    proc = subprocess.Popen(
        fake.stage_command("slow"),
        cwd=fake.root,
        env=fake.env(FAKE_SLEEP="60", FAKE_STARTED=str(started)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert started.exists(), "stage never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stage_root = fake.workdir / "slow"
    debris = [p for p in stage_root.iterdir() if p.name.startswith(".tmp-")]
    assert len(debris) == 1 and (debris[0] / "partial.txt").exists()
    assert not list(stage_root.glob("*/_SUCCESS")) and not list(stage_root.glob("[0-9a-f]*"))

    config = fake.config("slow")
    [p] = dag.plan(config, fake.workdir, fake.registry)
    assert p.action == "run"
    output = dag.run_pipeline(config, fake.workdir, registry=fake.registry, log=lambda _: None)[
        "slow"
    ]
    assert fake.calls() == ["slow", "slow"]
    assert (output.path / "done.txt").read_text() == "done" and cache.is_complete(output.path)
    assert not [p for p in stage_root.iterdir() if p.name.startswith(".tmp-")]  # debris cleaned


def test_concurrent_runs_of_one_stage_do_not_corrupt(fake):
    started = fake.root / "started.txt"
    env = fake.env(FAKE_SLEEP="1", FAKE_STARTED=str(started))
    procs = [
        subprocess.Popen(
            fake.stage_command("slow"),
            cwd=fake.root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    results = [proc.communicate(timeout=60) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], results
    assert fake.calls() == ["slow"]  # the second process waited on the lock, then reused
    assert any("reusing it" in out for out, _ in results)
    [final] = [p for p in (fake.workdir / "slow").iterdir() if not p.name.startswith(".")]
    assert cache.is_complete(final) and (final / "done.txt").read_text() == "done"
    assert json.loads((final / "outputs.json").read_text())["artifacts"] == {"done": "done.txt"}


def test_stage_entry_requires_cached_upstream_and_checks_fingerprint(fake):
    out = subprocess.run(
        fake.stage_command("b"), cwd=fake.root, env=fake.env(), capture_output=True, text=True
    )
    assert out.returncode == 2
    assert "--stages b needs upstream a, not in the cache" in out.stderr
    assert (
        subprocess.run(
            fake.stage_command("a"), cwd=fake.root, env=fake.env(), capture_output=True
        ).returncode
        == 0
    )
    out = subprocess.run(
        fake.stage_command("b", "--expect_fingerprint=0123"),
        cwd=fake.root,
        env=fake.env(),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "differs from the launcher's 0123" in out.stderr
    log = fake.root / "logs" / "b.log"
    out = subprocess.run(
        fake.stage_command("b", f"--log_file={log}"),
        cwd=fake.root,
        env=fake.env(FAKE_FAIL="b"),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1
    assert "stage b failed on purpose" in log.read_text()  # the traceback lands in the log


def test_framework_tb_events_are_readable_by_tensorflow(fake):
    outputs = fake.run(fake.config("a", a__value=4))
    [events] = (outputs["a"].path / "tb").glob("events.out.tfevents.*")
    code = textwrap.dedent(f"""
        import tensorflow as tf
        from tensorflow.python.summary.summary_iterator import summary_iterator
        for e in summary_iterator({str(events)!r}):
            for v in e.summary.value:
                print(e.step, v.tag, float(tf.make_ndarray(v.tensor)))
    """)
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "value", "4.0"]


# --- stage instances: <type>/<run> from config.<type>.runs.<run> ---------------------------------


def _with_runs(fake: FakePipeline, **runs: tuple[int, str]) -> ml_collections.ConfigDict:
    config = fake.config()
    config.unlock()
    groups = {}
    for run, (value, extra) in runs.items():
        group = ml_collections.ConfigDict(
            {"value": value, "calls_file": str(fake.calls_file), "extra": extra}
        )
        groups[run] = group
    config.d = ml_collections.ConfigDict({"runs": groups})
    config.lock()
    return config


def test_instances_are_dag_nodes_with_their_own_cache_entries(fake):
    config = _with_runs(fake, one=(1, "b"), two=(2, "a"))
    plans = {p.name: p for p in dag.plan(config, fake.workdir, fake.registry)}
    assert list(plans) == ["a", "b", "c", "d/one", "d/two"]
    assert plans["d/one"].stage.upstream == ("a", "b") and plans["d/two"].stage.upstream == ("a",)
    assert plans["d/one"].path.parent == fake.workdir / "d" / "one"
    assert plans["d/one"].fingerprint != plans["d/two"].fingerprint
    fake.run(config)
    assert sorted(c for c in fake.calls() if c.startswith("d")) == ["d1:a+b", "d2:a"]

    # --stages d/one reruns that instance alone; the type name selects every instance.
    fake.run(config, only=["d/one"], force=["d/one"])
    assert fake.calls()[-1] == "d1:a+b" and fake.calls().count("d2:a") == 1
    assert [
        p.action
        for p in dag.plan(config, fake.workdir, fake.registry, only=["d"])
        if p.name.startswith("d/")
    ] == ["reuse", "reuse"]

    # Adding a run reruns nothing else; changing one run's group invalidates that run only.
    bigger = _with_runs(fake, one=(1, "b"), two=(2, "a"), three=(3, "c"))
    actions = {p.name: p.action for p in dag.plan(bigger, fake.workdir, fake.registry)}
    assert actions == {
        "a": "reuse",
        "b": "reuse",
        "c": "reuse",
        "d/one": "reuse",
        "d/two": "reuse",
        "d/three": "run",
    }
    changed = _with_runs(fake, one=(5, "b"), two=(2, "a"))
    plans = {p.name: p for p in dag.plan(changed, fake.workdir, fake.registry)}
    assert plans["d/two"].action == "reuse" and plans["d/one"].action == "run"
    assert "config changed: d/one.value 1 -> 5" in plans["d/one"].reason


@pytest.mark.parametrize(
    "runs,message",
    [
        (dict(one=(1, "zz")), "d.runs.one.extra: 'zz' is not another stage of this config"),
        (dict(one=(1, "d/one")), "d.runs.one.extra: 'd/one' is not another stage"),
        (dict(one=(1, "d/two"), two=(2, "d/one")), "stage dependency cycle"),
    ],
)
def test_instance_upstream_errors(fake, runs, message):
    with pytest.raises(dag.PlanError, match=message.replace("(", r"\(")):
        dag.plan(_with_runs(fake, **runs), fake.workdir, fake.registry)


def test_instance_type_group_must_hold_runs(fake):
    config = fake.config()
    config.unlock()
    config.d = ml_collections.ConfigDict({"value": 1})
    with pytest.raises(dag.PlanError, match=r"config.d must hold only `runs`"):
        dag.plan(config, fake.workdir, fake.registry)
    with pytest.raises(dag.PlanError, match="--stages: unknown stage 'zz/one'"):
        dag.plan(_with_runs(fake, one=(1, "a")), fake.workdir, fake.registry, only=["zz/one"])


def test_optional_upstream_follows_what_the_config_has(fake):
    config = _with_runs(fake, one=(1, "a"), two=(2, "a"))
    config.unlock()
    config.e = fake.config()["a"]
    plans = {p.name: p for p in dag.plan(config, fake.workdir, fake.registry)}
    assert plans["e"].stage.upstream == ("b", "d/one", "d/two") and list(plans)[-1] == "e"
    alone = fake.config("a")
    alone.unlock()
    alone.e = fake.config()["a"]
    assert {p.name: p.stage.upstream for p in dag.plan(alone, fake.workdir, fake.registry)}[
        "e"
    ] == ()
