"""Test set-up: 8 simulated CPU devices, set before anything imports jax (docs/DESIGN.md §6)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = (
    " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
    + " --xla_force_host_platform_device_count=8"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


import pytest  # noqa: E402  (after the XLA_FLAGS set-up above)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Orders the `slow` tests (minutes each; none shares a module-scoped fixture) first, so that
    `make test`'s workers start them early and finish together on the short ones.

    `make test` runs `--dist loadgroup`: xdist sends the tests of one `xdist_group` mark to one
    worker, reading the group from an `@<group>` suffix its collection hook adds to each node id.
    pytest-xdist 3.8 writes that suffix to `item._nodeid`, which pytest 9.2's structured node ids
    no longer read (pytest-xdist#1386), so every mark was ignored; this adds it to the structured
    id, after xdist's hook, and only where it is missing."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: keeps the rest
    if not getattr(config.option, "loadgroup", False):  # set in xdist workers under loadgroup
        return
    from _pytest.nodeid import NodeId

    for item in items:
        groups = sorted(
            {
                str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
                for mark in item.iter_markers("xdist_group")
            }
        )
        suffix = "@" + "_".join(groups)
        if groups and not item.nodeid.endswith(suffix):
            item._id = NodeId.parse(item.nodeid + suffix)


def _run_dir(tmp_path_factory) -> Path:
    """A directory shared by the xdist workers of one test run: the parent of each worker's base
    temp dir (the run's base temp dir; pytest keeps the last few); without xdist, the base temp
    dir itself."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.hookimpl(trylast=True)  # after pytest's own configure made the temp path factory
def pytest_configure(config):
    """One JAX compilation cache per test run, for every worker and every stage process the tests
    spawn (they inherit the environment): a program compiled once (a tiny pretrain step, the
    evaluators' forward passes, a resumed run's step) is read back instead of compiled again.
    Set before any test module imports JAX; a cached executable is the same program, so results
    are bit-identical. An explicit JAX_COMPILATION_CACHE_DIR wins."""
    cache = _run_dir(config._tmp_path_factory) / "jax_cache"
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


@pytest.fixture(scope="session")
def stage_cache(tmp_path_factory):
    """A stage cache work dir shared by the xdist workers of one run: benchmarks/digits_run.py
    produces the shared digits stages there once, under launch/produce.py's lock and `_SUCCESS`
    commit."""
    return _run_dir(tmp_path_factory) / "stage_cache"


@pytest.fixture(scope="session")
def prepare_output(stage_cache):
    """The tiny config's prepare output (digits train/val/test at 32 px, the real Beam job) as the
    DAG hands it to downstream stages: inputs["prepare"]. Made once per test run."""
    from benchmarks import digits_run

    return digits_run.stages(stage_cache)["prepare"]


@pytest.fixture
def prepare_into(prepare_output):
    """`prepare_into(workdir)` copies the run's prepare output into `workdir`'s stage cache, where
    the tiny config's stages find it as a cache hit (the same prepare group, so the same
    fingerprint): a test of a later stage needs no Beam run of its own."""
    import shutil

    def copy(workdir: Path) -> Path:
        dest = Path(workdir) / "prepare" / prepare_output.path.name
        return Path(shutil.copytree(prepare_output.path, dest))

    return copy


@pytest.fixture(scope="session")
def prepared_digits(prepare_output):
    """`prepare_output`'s directory, shared by every training-stage test (read only)."""
    return prepare_output.path


def tiny_pretrain_group():
    """The pretrain group of the shared export: mu/4 on 32 px digits, 60 steps, no checkpoints."""
    from launch.configs import tiny

    cfg = tiny.pretrain_config()
    cfg.steps, cfg.checkpoint_every, cfg.evals.val.every = 60, 0, 0
    # Few-shot has its own tests (and costs).
    cfg.evals = {"val": cfg.evals.val, "pairs": cfg.evals.pairs}
    cfg.optim.warmup_steps, cfg.optim.cooldown_steps = 5, 10
    cfg.runtime.log_every, cfg.runtime.progress = 10, "off"
    return cfg


@pytest.fixture(scope="session")
def pretrain_export(stage_cache):
    """ONE tiny pretrain export (`tiny_pretrain_group`: params/ + model.json + outputs.json)
    shared by every downstream-stage test: inputs["pretrain"]. Made once per test run."""
    from benchmarks import digits_run

    return digits_run.stages(stage_cache, tiny_pretrain_group())["pretrain"]


@pytest.fixture(scope="session")
def chromium():
    """The Debian `chromium` package, installed by the test set-up when it is missing (so CI runs
    the browser test rather than skipping it): apt-get as root, `apt-get update` first if the
    package index is stale."""
    from eval import browser

    if browser.find_chromium() is None and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
        if subprocess.run(install, env=env, capture_output=True).returncode:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True)
            subprocess.run(install, env=env, capture_output=True)
    path = browser.find_chromium()
    if path is None:
        pytest.fail(
            f"no Chromium binary on PATH ({', '.join(browser.BINARIES)}) and `apt-get "
            "install chromium` could not install one (it needs root and the Debian package "
            "index)"
        )
    return path
