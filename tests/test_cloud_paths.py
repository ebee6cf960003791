"""Bucket URIs for prepare --out, the loader, and the DAG's --workdir, against a local stand-in.

The stand-in is tests/remote_fs.py: `ram://` on tf.io.gfile's RAM filesystem behind an
epath.Path, i.e. the code path `gs://` takes with TensorFlow installed, ending in a different
gfile filesystem. Nothing here talks to real cloud storage (no network); Orbax's own bucket I/O
(tensorstore's gcs driver, reached only by gs://) is not exercised: stages write Orbax files into a
local staging dir that the DAG then copies to the bucket, which these tests check byte for byte.
"""

import contextlib
import io
import pathlib
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from data import loader, paths, records
from data import manifest as manifest_lib
from launch import cache, dag
from pipelines import prepare
from tests import remote_fs
from trainer import sharding


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 36, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _records(split_dir) -> dict[str, bytes]:
    """id -> image bytes of every record of a (local) split."""
    from array_record.python import array_record_module

    out = {}
    for path in manifest_lib.validate(split_dir).shard_paths(split_dir):
        reader = array_record_module.ArrayRecordReader(path)
        out.update((r.id, r.image) for r in map(records.decode, reader.read_all()))
        reader.close()
    return out


@pytest.fixture(autouse=True)
def _local_dirs(tmp_path, monkeypatch):
    """Caches and staging under the test's tmp dir, never the user's ~/.cache."""
    monkeypatch.setenv(manifest_lib.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("VIT22B_STAGING_DIR", str(tmp_path / "staging"))


@pytest.fixture(scope="module")
def remote_prepared(tmp_path_factory):
    """One prepare run into the stand-in bucket: digits val (3 shards) and a folder dataset with a
    duplicate id (its shard is rewritten: download, drop, re-upload)."""
    root = tmp_path_factory.mktemp("folder_src")
    for rel, seed in (("a/1.png", 1), ("a/2.png", 2), ("b/3.png", 3)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(_png(seed))
    (root / "labels.csv").write_text("id,labels\na/1.png,a\na/2.png,a\nb/3.png,b\na/1.png,b\n")
    cfg = prepare.default_config()
    cfg.datasets = ml_collections.ConfigDict(
        {
            "digits": prepare.dataset_config(
                source="digits", image_size=32, records_per_shard=64, splits={"val": "val"}
            ),
            "dups": prepare.dataset_config(
                source="folder",
                root=str(root),
                csv="labels.csv",
                records_per_shard=2,
                image_size=0,
                lossless=True,
            ),
        }
    )
    out = remote_fs.bucket() + "/prepared"
    result = prepare.prepare(cfg, out)
    return out, result


def test_local_paths_unchanged_and_unknown_scheme_is_one_line(capsys, tmp_path):
    assert paths.as_path("rel/dir") == pathlib.Path("rel/dir")
    assert paths.as_path(f"file://{tmp_path}") == tmp_path
    assert str(paths.as_path("gs://bucket//a/b/")) == "gs://bucket/a/b"  # no network: naming only
    with pytest.raises(
        paths.UnsupportedPath, match=r"^--out: foo://b/x: unsupported storage scheme 'foo://'"
    ):
        paths.as_path("foo://b/x", "--out")
    assert prepare.main(["--source", "digits", "--out", "s4://bucket/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("prepare: error: --out: s4://bucket/x: unsupported storage scheme")
        and "\n" not in err
    )
    with pytest.raises(dag.PlanError, match="^--workdir: zz://w: unsupported storage scheme"):
        dag.plan(ml_collections.ConfigDict({"export": {"scale": 1.0}}), "zz://w", _registry())


@pytest.mark.xdist_group("cloud_paths")
def test_prepare_to_bucket_writes_the_same_records(remote_prepared, prepared_digits):
    out, result = remote_prepared
    files = paths.files_under(out)
    assert not [f for f in files if "/." in f or f.startswith(".")]  # temp prefixes removed
    assert result.counters["read"] == 179 + 4 and result.counters["rejected"] == 1
    digits = manifest_lib.read(f"{out}/digits/val")
    assert len(digits.shards) == 3 and digits.num_records == 179
    assert _records(manifest_lib.local_split(f"{out}/digits/val")) == _records(
        prepared_digits / "digits" / "val"
    )
    dups = manifest_lib.validate(f"{out}/dups/train")  # remote -> verified local copy -> checks
    assert dups.num_records == 3 and dups.num_dead_letters == 1
    assert all(s.num_records <= 2 for s in dups.shards)


@pytest.mark.xdist_group("cloud_paths")
def test_loader_reads_a_bucket_split_through_the_cache(remote_prepared, tmp_path, monkeypatch):
    out, _ = remote_prepared
    args = dict(
        global_batch_size=64,
        image_size=32,
        sharding=sharding.batch_sharding(sharding.make_mesh(data=8, model=1)),
    )
    remote = list(loader.eval_loader(f"{out}/digits/val", **args))
    local_dir = manifest_lib.local_split(f"{out}/digits/val")
    assert local_dir.parent == tmp_path / "cache"
    local = list(loader.eval_loader(local_dir, **args))
    assert sum(int(np.asarray(b["mask"]).sum()) for b in remote) == 179
    for a, b in zip(remote, local, strict=True):
        np.testing.assert_array_equal(np.asarray(a["image"]), np.asarray(b["image"]))


@pytest.mark.xdist_group("cloud_paths")
def test_cache_never_uses_a_partial_or_corrupt_file(remote_prepared, tmp_path, monkeypatch):
    out, _ = remote_prepared
    split = f"{out}/dups/train"
    m = manifest_lib.read(split)
    cache_dir = tmp_path / "cache"
    local = manifest_lib.local_split(split, cache_dir)
    first = local / m.shards[0].path
    stamp = first.stat().st_mtime_ns, first.stat().st_ino
    assert manifest_lib.local_split(split, cache_dir) == local  # verified copy reused, not fetched
    assert (first.stat().st_mtime_ns, first.stat().st_ino) == stamp

    first.write_bytes(first.read_bytes()[:-7])  # truncated (a crash of some other writer)
    manifest_lib.local_split(split, cache_dir)
    assert paths.file_sha256(first) == m.shards[0].sha256  # replaced by a verified download

    # A download that dies half-way leaves nothing under the shard's name and no manifest.
    fresh = tmp_path / "fresh"
    real_open = paths.as_path(split).__class__.open

    @contextlib.contextmanager
    def dying_open(self, mode="r", **kw):
        with real_open(self, mode, **kw) as handle:
            yield _Dies(handle.read(100)) if self.name == m.shards[-1].path else handle

    monkeypatch.setattr(remote_fs.RamPath, "open", dying_open)
    with pytest.raises(OSError, match="connection reset"):
        manifest_lib.local_split(split, fresh)
    monkeypatch.undo()
    assert not (fresh / m.shards[-1].path).exists() and not (fresh / "manifest.json").exists()
    assert not [p for p in fresh.iterdir() if ".part-" in p.name]

    # A shard that changed in the bucket without its manifest: refused, never cached.
    bad = paths.as_path(split) / m.shards[-1].path
    original = bad.read_bytes()
    try:
        bad.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        with pytest.raises(paths.ChecksumMismatch, match="does not match the manifest"):
            manifest_lib.local_split(split, tmp_path / "other")
        assert not (tmp_path / "other" / m.shards[-1].path).exists()
    finally:
        bad.write_bytes(original)


class _Dies(io.BytesIO):
    """A remote file that returns some bytes, then fails like a dropped connection."""

    def read(self, size=-1):
        chunk = super().read(size)
        if not chunk:
            raise ConnectionResetError("connection reset by peer")
        return chunk


def _registry():
    from pathlib import Path

    return dag.Registry(
        [
            dag.Stage("export", "tests.cloud_stages:run_export"),
            dag.Stage("consume", "tests.cloud_stages:run_consume", upstream=("export",)),
        ],
        root=Path(__file__).resolve().parents[1],
    )


def test_dag_commits_stage_outputs_to_a_bucket_workdir(tmp_path, monkeypatch):
    from trainer import checkpoint

    workdir = remote_fs.bucket() + "/work"
    config = ml_collections.ConfigDict({"export": {"scale": 2.0}, "consume": {"unused": 0}})
    registry = _registry()

    monkeypatch.setenv("CLOUD_STAGE_FAIL", "1")  # a failed stage commits nothing
    with pytest.raises(RuntimeError, match="on purpose"):
        dag.run_pipeline(config, workdir, registry=registry, log=lambda _: None)
    assert not paths.exists(workdir) or not [f for f in paths.files_under(workdir) if "/." not in f]
    monkeypatch.delenv("CLOUD_STAGE_FAIL")

    moves = []
    real_move = paths.move_file
    monkeypatch.setattr(
        paths, "move_file", lambda s, d: (moves.append(os.fspath(d)), real_move(s, d))
    )
    outputs = dag.run_pipeline(config, workdir, registry=registry, log=lambda _: None)
    export = outputs["export"]
    assert str(export.path).startswith(workdir + "/export/") and cache.is_complete(export.path)
    export_moves = [m for m in moves if m.startswith(str(export.path))]
    assert export_moves[-1].endswith("/_SUCCESS") and len(export_moves) > 5  # marker copied last
    seen = (outputs["consume"].path / "seen.txt").read_text()
    assert seen.startswith(f"RamPath {export.path}\n") and '"variant": "test"' in seen
    assert not [
        p for p in (tmp_path / "staging").rglob("*") if p.is_file() and "locks" not in str(p)
    ]

    # The uploaded Orbax export is complete: copied back, it restores the exact values.
    back = tmp_path / "back"
    for rel in paths.files_under(export.path / "params"):
        paths.copy_file(export.path / "params" / rel, back / rel)
    restored = checkpoint.load_params(back)
    np.testing.assert_array_equal(restored["w"], 2.0 * remote_fs_params()["w"])

    # Cached: the next plan reuses both; a forced rerun replaces the bucket dir.
    plans = dag.plan(config, workdir, registry)
    assert [p.action for p in plans] == ["reuse", "reuse"]
    forced = dag.run_pipeline(
        config, workdir, registry=registry, force=["export"], log=lambda _: None
    )
    assert forced["export"].path == export.path and cache.is_complete(export.path)
    # Multi-host hosts must share one checkpoint dir: a bucket URI workdir is refused, one line.
    with pytest.raises(
        ValueError, match=r"^\[export\] multi-host runs need a workdir every host mounts"
    ):
        dag.run_stage("export", config, workdir, registry=registry, force=True, run_id="job-1")


def remote_fs_params():
    from tests import cloud_stages

    return cloud_stages.PARAMS
