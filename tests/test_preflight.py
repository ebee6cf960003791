"""launch/preflight.py: go for the tiny config on CPU, and each no-go reason with a small config.

The checks run in-process on the shared prepared digits (`prepared_digits`); a registry with the
pretrain stage alone lets them read `data.prepared_dir` instead of a cached prepare output. The
loader row compares with a given `step_time` so that no test depends on this machine's speed.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from launch import dag, preflight
from launch.configs import tiny

REPO = Path(__file__).resolve().parents[1]
PRETRAIN_ONLY = dag.Registry(
    [
        dag.Stage(
            "pretrain", "trainer.pretrain:run", resumable=True, validate="trainer.pretrain:validate"
        )
    ]
)


def _config(prepared, **overrides):
    c = tiny.pretrain_config()
    c.data.prepared_dir = str(prepared)
    c.update_from_flattened_dict(overrides)
    config = ml_collections.ConfigDict({"pretrain": c})
    config.lock()
    return config


def _check(prepared, tmp_path, options=preflight.Options(step_time=10.0), **overrides):
    rows = preflight.run_checks(
        _config(prepared, **overrides), tmp_path / "workdir", PRETRAIN_ONLY, options
    )
    return rows, {r.check: r for r in rows}


def test_tiny_config_is_go_on_cpu(prepared_digits, tmp_path):
    rows, by = _check(
        prepared_digits, tmp_path, preflight.Options(step_time=10.0, checksum_shards=1)
    )
    assert preflight.is_go(rows), preflight.format_table(rows)
    assert list(by) == [
        "target",
        "config",
        "mesh",
        "batch",
        "head_dim",
        "image vs patch",
        "manifest digits/train",
        "shards digits/train",
        "manifest digits/val",
        "shards digits/val",
        "compile",
        "memory",
        "MFU",
        "loader",
    ]
    assert all(r.status == preflight.GO for r in rows), preflight.format_table(rows)
    assert "sha256 1/2 shards" in by["manifest digits/train"].detail  # sampled on request
    assert by["mesh"].detail == "replica 1 x data 4 x model 2 on 8 devices"
    assert by["compile"].detail.startswith("compiled for this machine: 8 x cpu")
    assert "per device <=" in by["memory"].detail and "ms/step (--step_time)" in by["MFU"].detail
    assert preflight.format_table(rows).endswith("preflight: GO")


@pytest.mark.parametrize(
    "options,overrides,check,reason",
    [
        (
            preflight.Options(topology="v4:2x2x1"),
            {},
            "mesh",
            (
                "pretrain.mesh: replica=1 x data=4 x model=2 = 8 but there are 4 devices "
                "(target: TPU v4:2x2x1"
            ),
        ),
        (
            preflight.Options(),
            {"batch_size": 62},
            "batch",
            "pretrain.batch_size: 62 is not divisible by the data-parallel size 4",
        ),
        (
            preflight.Options(topology="v4:4x4x4"),
            {"mesh.data": 8, "mesh.model": 8, "batch_size": 72, "eval_batch_size": 64},
            "batch",
            "pretrain.batch_size: 72 is not divisible by 16 processes",
        ),
        (
            preflight.Options(),
            {"mesh.data": -1, "microbatches": 32},
            "batch",  # data known on the target
            (
                "pretrain.batch_size: 64 is not divisible by 32 microbatches x the data-parallel "
                "size 4"
            ),
        ),
        (
            preflight.Options(),
            {"mesh.data": 1, "mesh.model": 8},
            "head_dim",
            (
                "pretrain.model: num_heads 4 is not divisible by the model axis 8 (its weights "
                "would be replicated"
            ),
        ),
        (
            preflight.Options(),
            {"model.num_heads": 3},
            "head_dim",
            "width 64 is not divisible by num_heads 3",
        ),
        (
            preflight.Options(),
            {"data.image_size": 30},
            "image vs patch",
            "pretrain.data.image_size=30 is not divisible by the patch size 4",
        ),
    ],
)
def test_config_no_go_reasons(prepared_digits, tmp_path, options, overrides, check, reason):
    rows, by = _check(prepared_digits, tmp_path, options, **overrides)
    assert by[check].status == preflight.NO_GO and reason in by[check].detail, (
        preflight.format_table(rows)
    )
    # nothing is compiled or measured for a config that cannot run
    assert by["compile"].status == by["loader"].status == preflight.SKIP
    assert by["compile"].detail == "the config is no-go" and not preflight.is_go(rows)


def _rewrite_shard_options(split_dir, options):
    """Rewrites the split's one shard with other ArrayRecord options (counts and sha256 kept
    right)."""
    from array_record.python import array_record_module

    from data import manifest as manifest_lib

    m = manifest_lib.read(split_dir)
    path = split_dir / m.shards[0].path
    reader = array_record_module.ArrayRecordReader(str(path))
    records = reader.read_all()
    reader.close()
    writer = array_record_module.ArrayRecordWriter(str(path), options)
    for r in records:
        writer.write(r)
    writer.close()
    shard = manifest_lib.Shard(m.shards[0].path, len(records), manifest_lib.sha256_file(path))
    manifest_lib.write(split_dir, manifest_lib.Manifest(**{**m.to_json(), "shards": [shard]}))


def test_data_memory_and_loader_no_go_reasons(prepared_digits, tmp_path):
    prepared = tmp_path / "prepared"
    shutil.copytree(prepared_digits, prepared)
    val = prepared / "digits" / "val"
    shard = next(val.glob("*.array_record-*"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size and record count, other bytes
    shard.write_bytes(bytes(data))
    _rewrite_shard_options(prepared / "digits" / "test", "group_size:8")
    config = _config(prepared)
    with config.unlocked():
        config.pretrain.evals.test = ml_collections.ConfigDict(
            dict(type="classification", split="test", every=100)
        )
    options = preflight.Options(step_time=1e-9, device_memory_gib=1e-6)
    rows = preflight.run_checks(config, tmp_path / "workdir", PRETRAIN_ONLY, options)
    by = {r.check: r for r in rows}
    table = preflight.format_table(rows)
    assert {r.check for r in rows if r.status == preflight.NO_GO} == {
        "manifest digits/val",
        "manifest digits/test",
        "memory",
        "loader",
    }, table
    assert (
        "sha256" in by["manifest digits/val"].detail
        and "does not match" in by["manifest digits/val"].detail
    )
    assert (
        "group_size:8" in by["manifest digits/test"].detail
        and "needs 'group_size:1'" in by["manifest digits/test"].detail
    )
    assert "per device >" in by["memory"].detail
    assert "the run would be input-bound" in by["loader"].detail
    assert table.endswith("preflight: NO-GO (4 reasons)")


def test_tpu_target_without_libtpu_reports_the_eval_shape_estimate(
    prepared_digits, tmp_path, monkeypatch
):
    monkeypatch.setattr(preflight, "libtpu_installed", lambda: False)
    rows, by = _check(
        prepared_digits, tmp_path, preflight.Options(topology="v4:2x2x2", step_time=10.0)
    )
    assert preflight.is_go(rows), preflight.format_table(rows)
    assert by["target"].detail == "TPU v4:2x2x2 (8 chips, 2 hosts)"
    assert by["compile"].status == preflight.SKIP and by["compile"].detail.startswith(
        "AOT skipped: libtpu is not installed"
    )
    assert (
        "jax.eval_shape estimate" in by["compile"].detail
        and "per device <= 28.8 GiB" in by["memory"].detail
    )
    assert by["batch"].detail == "64 = 32 per host, 16 per data shard"


@pytest.mark.skipif(
    not preflight.libtpu_installed(),
    reason="AOT for a TPU topology needs libtpu (pip install -c constraints.txt '.[tpu]')",
)
def test_tpu_target_compiles_ahead_of_time_with_libtpu(prepared_digits, tmp_path):
    rows, by = _check(prepared_digits, tmp_path, preflight.Options(topology="v4:2x2x2"))
    assert by["compile"].status == preflight.GO and by["compile"].detail.startswith(
        "AOT for TPU v4:2x2x2"
    )
    # Scanned layers: XLA counts the loop body once, so no roofline (it once claimed 9558% MFU for
    # 22B).
    assert "loop bodies once, so no roofline step time" in by["compile"].detail
    assert by["MFU"].status == preflight.SKIP and "the paper's 54.9% MFU" in by["MFU"].detail
    rows, by = _check(
        prepared_digits, tmp_path, preflight.Options(topology="v4:2x2x2"), **{"model.scan": False}
    )
    assert "roofline of the compiled cost" in by["MFU"].detail
    assert 0 < float(by["MFU"].detail.split("%")[0]) <= 100, by["MFU"].detail


def test_cli_exit_codes_and_the_dag_gate(prepared_digits, tmp_path):
    """`launch.preflight` exits 1 with the table on no-go; `launch.run --preflight` runs prepare,
    then stops before pretrain when the checks say no-go (here: 8 mesh devices, 4 TPU chips)."""
    cmd = [
        sys.executable,
        "-m",
        "launch.preflight",
        "--config",
        "launch/configs/tiny.py:prepare,pretrain",
        "--workdir",
        str(tmp_path / "w1"),
        "--config.pretrain.batch_size=62",
    ]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "pretrain.batch_size: 62 is not divisible by the data-parallel size 4" in out.stdout
    assert "unknown until the config passes plan-time validation" in out.stdout
    assert out.stdout.rstrip().endswith("NO-GO (4 reasons)")

    config = tiny.get_config("prepare,pretrain")
    workdir = tmp_path / "w2"
    plans = dag.plan(config, workdir)
    lines = []
    with pytest.raises(SystemExit) as e:
        preflight.gate(
            config,
            plans,
            workdir,
            dag.STAGES,
            only=None,
            force=(),
            options=preflight.Options(topology="v4:2x2x1"),
            log=lines.append,
        )
    assert e.value.code == 1 and len(list((workdir / "prepare").glob("*/_SUCCESS"))) == 1
    assert "mesh" in lines[0] and "but there are 4 devices" in lines[0]
    assert "manifest digits/train  go" in lines[0]  # the prepare output the gate just made
    assert not (workdir / "pretrain").exists()
