"""trainer/xla_flags.py: set lookup, merging into the environment, and that every flag is one the
pinned runtimes know (GPU flags: jaxlib's XLA_FLAGS parser; TPU flags: libtpu's compile options)."""

import os
import subprocess
import sys

import pytest

from trainer import xla_flags


def test_unknown_set_and_platform_are_one_line_errors():
    with pytest.raises(ValueError, match=r"unknown flag set 'fast' for gpu; known: default, "):
        xla_flags.get("gpu", "fast")
    with pytest.raises(ValueError, match=r"unknown platform 'npu'"):
        xla_flags.apply("npu", "default", {})
    with pytest.raises(ValueError, match=r"unknown flag set 'fast' for tpu"):
        xla_flags.apply_all("fast", {})


def test_every_set_exists_on_every_platform():
    names = [set(sets) for sets in xla_flags.FLAG_SETS.values()]
    assert all(n == names[0] for n in names)
    assert xla_flags.FLAG_SETS["tpu"]["default"] == xla_flags.FLAG_SETS["gpu"]["default"] == ()


def test_apply_merges_and_keeps_existing_flags():
    env = {
        "XLA_FLAGS": (
            "--xla_force_host_platform_device_count=8 "
            "--xla_gpu_enable_latency_hiding_scheduler=false"
        )
    }
    value = xla_flags.apply("gpu", "collective_matmul", env)
    flags = value.split()
    assert flags[0] == "--xla_force_host_platform_device_count=8"  # kept, in place
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags  # the set's value wins
    assert "--xla_gpu_enable_latency_hiding_scheduler=false" not in flags
    assert "--xla_gpu_threshold_for_windowed_einsum_mib=0" in flags
    assert env["XLA_FLAGS"] == value
    assert xla_flags.apply("gpu", "collective_matmul", env) == value  # idempotent

    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    xla_flags.apply_all("async_collectives", env)
    assert env["XLA_FLAGS"].startswith("--xla_force_host_platform_device_count=8 ")
    assert "--xla_tpu_enable_async_collective_fusion=true" in env["LIBTPU_INIT_ARGS"]
    assert "xla_tpu" not in env["XLA_FLAGS"]  # libtpu flags in XLA_FLAGS abort jaxlib

    env = {}
    xla_flags.apply_all("default", env)
    assert env == {}  # nothing to set, nothing created


def test_gpu_flags_are_known_to_jaxlib():
    """jaxlib aborts on an unknown XLA_FLAGS entry; the GPU flags parse on any build (CPU here)."""
    every = sorted({f for flags in xla_flags.FLAG_SETS["gpu"].values() for f in flags})
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(every))
    out = subprocess.run(
        [sys.executable, "-c", "import jax; jax.numpy.zeros(1).block_until_ready()"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]


def test_tpu_flags_are_known_to_libtpu():
    pytest.importorskip("libtpu", reason="needs the [tpu] extra (libtpu) for AOT compiles")
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from trainer import aot

    mesh = Mesh(np.array(aot.tpu_devices("v4", "2x2x1")).reshape(-1), ("x",))
    s = NamedSharding(mesh, P("x"))
    lowered = jax.jit(lambda a, b: a @ b.T).lower(
        *[jax.ShapeDtypeStruct((512, 256), jnp.bfloat16, sharding=s)] * 2
    )
    for name in xla_flags.FLAG_SETS["tpu"]:
        lowered.compile(
            compiler_options=xla_flags.compiler_options("tpu", name)
        )  # raises on unknown names
    with pytest.raises(Exception, match="No such compile option"):
        lowered.compile(compiler_options={"xla_tpu_no_such_flag": "true"})


def test_stage_process_applies_its_configs_set(monkeypatch):
    """launch.stage sets the stage's `xla_flags` before JAX starts; a bad name fails at plan
    time."""
    from launch import dag, stage
    from launch.configs import tiny

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    monkeypatch.delenv("LIBTPU_INIT_ARGS", raising=False)
    config = tiny.get_config()
    with config.unlocked():
        config.pretrain.xla_flags = "collective_matmul"
    stage.apply_xla_flags(config, dag.STAGES, "pretrain")
    assert os.environ["XLA_FLAGS"].split()[0] == "--xla_force_host_platform_device_count=8"
    assert "--xla_gpu_multi_streamed_windowed_einsum=true" in os.environ["XLA_FLAGS"]
    assert "--xla_tpu_enable_windowed_einsum_for_all_gather=true" in os.environ["LIBTPU_INIT_ARGS"]

    from trainer import stage_config

    with config.unlocked():
        config.pretrain.xla_flags = "fastest"
    with pytest.raises(
        ValueError, match=r"^pretrain.xla_flags: unknown flag set 'fastest' for tpu; known: default"
    ):
        stage_config.check(config.pretrain, "pretrain")
