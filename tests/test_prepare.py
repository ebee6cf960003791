"""pipelines/ (the prepare job and its sources) + data/images.py on real files the tests write."""

import io
import json
import struct
import subprocess
import sys
import zlib

import ml_collections
import numpy as np
import pytest
from PIL import Image

from data import images, records
from data import manifest as manifest_lib
from pipelines import folder_sources, prepare, sources, tfds_source

# --- image fixtures -------------------------------------------------------------------------------


def _save(img, fmt, **kw) -> bytes:
    b = io.BytesIO()
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(b, fmt, **kw)
    return b.getvalue()


def _halves(h=32, w=48):
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = (255, 0, 0)
    img[:, w // 2 :] = (0, 0, 255)
    return img


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90 degrees clockwise
    return _save(_halves(20, 40), "JPEG", exif=exif.tobytes(), quality=95)


def _rgba_png() -> bytes:
    rgba = np.zeros((32, 30, 4), np.uint8)
    rgba[:, :10] = (255, 0, 0, 0)  # fully transparent red -> white
    rgba[:, 10:20] = (0, 0, 255, 255)  # opaque blue
    rgba[:, 20:] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    return _save(rgba, "PNG")


def _png_bomb(side=60000) -> bytes:
    """A tiny PNG whose header claims side x side RGB pixels."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def _jpeg_bomb() -> bytes:
    """A valid small JPEG whose SOF header is patched to claim 60000 x 60000."""
    data = bytearray(_save(_halves(), "JPEG"))
    i = data.index(b"\xff\xc0")
    data[i + 5 : i + 9] = struct.pack(">HH", 60000, 60000)
    return bytes(data)


def _noise(h=64, w=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


GOOD = {  # name -> (bytes, expected check on the decoded RGB array)
    "cat/rgb.jpg": (
        _save(_halves(), "JPEG", quality=98),
        lambda a: a.shape == (32, 48, 3) and a[5, 5, 0] > 240 and a[5, 40, 2] > 240,
    ),
    "cat/gray.png": (_save(np.full((32, 32), 77, np.uint8), "PNG"), lambda a: (a == 77).all()),
    "cat/rgba.png": (
        _rgba_png(),
        lambda a: (
            (a[0, 0] == 255).all()
            and tuple(a[0, 15]) == (0, 0, 255)
            and (np.abs(a[0, 25].astype(int) - 127) <= 1).all()
        ),
    ),
    "dog/cmyk.jpg": (
        _save(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95),
        lambda a: a[5, 5, 0] > 240 and a[5, 5, 1] < 15 and a[5, 5, 2] < 15,
    ),
    "dog/gray16.png": (
        _save(np.full((32, 32), 40000, np.uint16), "PNG"),
        lambda a: (a == 40000 >> 8).all(),
    ),
    "dog/rotated.jpg": (
        _exif_rotated_jpeg(),
        lambda a: a.shape == (40, 20, 3) and a[3, 10, 0] > 240 and a[-3, 10, 2] > 240,
    ),
    "dog/palette.gif": (
        _save(Image.fromarray(_halves()).convert("P"), "GIF"),
        lambda a: a[5, 5, 0] > 240 and a[5, 40, 2] > 240,
    ),
}

_valid_jpeg = _save(_noise(), "JPEG", quality=90)
_valid_png = _save(_noise(seed=1), "PNG")
BAD = {  # name -> (bytes, reason)
    "cat/empty.jpg": (b"", "empty"),
    "cat/corrupt.jpg": (np.random.default_rng(3).bytes(3000), "undecodable"),
    "cat/corrupt_header.jpg": (
        b"\xff\xd8\xff" + np.random.default_rng(4).bytes(500),
        "undecodable",
    ),
    "cat/truncated.jpg": (_valid_jpeg[: len(_valid_jpeg) // 2], "truncated"),
    "dog/truncated.png": (_valid_png[: len(_valid_png) // 2], "truncated"),
    "dog/bomb.png": (_png_bomb(), "too_large"),
    "dog/bomb.jpg": (_jpeg_bomb(), "too_large"),
    "dog/tiny.png": (_save(np.zeros((4, 4, 3), np.uint8), "PNG"), "too_small"),
    "dog/float.tif": (_save(np.ones((32, 32), np.float32), "TIFF"), "unsupported_mode"),
    "dog/icon.png": (_save(np.zeros((32, 32, 3), np.uint8), "ICO"), "unsupported_format"),
}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_decode_accepts_and_converts(name):
    data, check = GOOD[name]
    arr = images.decode_rgb(data)
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    assert check(arr), name


@pytest.mark.parametrize("name", sorted(BAD))
def test_decode_rejects_with_reason(name):
    data, reason = BAD[name]
    with pytest.raises(images.ImageRejected) as e:
        images.decode_rgb(data)
    assert e.value.reason == reason and reason in images.REASONS
    assert "\n" not in str(e.value)


def test_resize_shorter_keeps_aspect_and_never_upscales():
    img = _noise(100, 200)
    assert images.resize_shorter(img, 50).shape == (50, 100, 3)
    assert images.resize_shorter(img, 400) is img
    assert images.resize_shorter(img, 0) is img


# --- the Beam job ---------------------------------------------------------------------------------


def _write_tree(root, files):
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _cfg(name, **dataset):
    cfg = prepare.default_config()
    cfg.datasets = ml_collections.ConfigDict({name: prepare.dataset_config(**dataset)})
    return cfg


def _letters(split_dir):
    lines = (split_dir / manifest_lib.DEAD_LETTERS_NAME).read_text().splitlines()
    return [json.loads(line) for line in lines]


def _read_all(split_dir):
    from array_record.python import array_record_module

    m = manifest_lib.validate(split_dir)
    out = []
    for path in m.shard_paths(split_dir):
        reader = array_record_module.ArrayRecordReader(path)
        out += [records.decode(r) for r in reader.read_all()]
        reader.close()
    return m, out


def test_folder_job_dead_letters_every_bad_input(tmp_path):
    _write_tree(
        tmp_path / "src",
        {**{k: v[0] for k, v in GOOD.items()}, **{k: v[0] for k, v in BAD.items()}},
    )
    (tmp_path / "src" / "notes.txt").write_text("not an image: ignored, not an input")
    result = prepare.prepare(
        _cfg("pets", source="folder", root=str(tmp_path / "src"), image_size=0, lossless=True),
        tmp_path / "out",
    )
    split = tmp_path / "out" / "pets" / "train"
    m, recs = _read_all(split)
    letters = _letters(split)
    # accepted + rejected = inputs, always
    assert m.num_records + m.num_dead_letters == len(GOOD) + len(BAD) == result.counters["read"]
    assert result.counters["accepted"] == len(GOOD) and result.counters["rejected"] == len(BAD)
    assert {d["id"]: d["reason"] for d in letters} == {k: v[1] for k, v in BAD.items()}
    assert all(set(d) >= {"id", "source", "reason"} for d in letters)
    for reason in {v[1] for v in BAD.values()}:
        assert result.counters[f"rejected.{reason}"] == sum(v[1] == reason for v in BAD.values())
    assert m.class_names == ["cat", "dog"] and m.image_size is None
    by_id = {r.id: r for r in recs}
    assert set(by_id) == set(GOOD)
    for name, (_, check) in GOOD.items():  # lossless: the stored pixels are the converted ones
        assert check(images.decode_scaled(by_id[name].image)), name
        assert by_id[name].label == ((0,) if name.startswith("cat/") else (1,))
    assert not list((tmp_path / "out" / "pets").glob(".*"))  # temp dirs renamed/removed


def test_csv_labels_attributes_text_and_duplicate_ids(tmp_path):
    root = tmp_path / "src"
    _write_tree(
        root,
        {
            "a/1.jpg": _save(_noise(seed=1), "JPEG"),
            "a/2.jpg": _save(_noise(seed=2), "JPEG"),
            "b/3.png": _save(_noise(seed=3), "PNG"),
        },
    )
    (root / "labels.csv").write_text(
        "id,labels,attributes,text\n"
        "a/1.jpg,a b,1 0,first caption\n"
        "a/2.jpg,,0 1,second\n"  # empty label cell: falls back to the class dir
        "b/3.png,1,1 1,third\n"
        "a/1.jpg,b,0 0,duplicate row\n"  # same id again: rejected, not merged
        "b/missing.jpg,a,0 0,gone\n"
        "a/2.jpg,7,0 0,dup with bad label\n"
    )
    result = prepare.prepare(
        _cfg(
            "capt",
            source="folder",
            root=str(root),
            csv="labels.csv",
            records_per_shard=2,
            image_size=0,
        ),
        tmp_path / "out",
    )
    split = tmp_path / "out" / "capt" / "train"
    m, recs = _read_all(split)
    assert m.num_records == 3 and m.num_dead_letters == 3 and result.counters["read"] == 6
    assert m.features == ["image", "label", "id", "attributes", "text"]
    by_id = {r.id: r for r in recs}
    assert by_id["a/1.jpg"].label == (0, 1) and by_id["a/1.jpg"].text == ("first caption",)
    assert by_id["a/1.jpg"].attributes == (1, 0)
    assert by_id["a/2.jpg"].label == (0,) and by_id["b/3.png"].label == (1,)
    reasons = sorted((d["id"], d["reason"]) for d in _letters(split))
    assert reasons == [
        ("a/1.jpg", "duplicate_id"),
        ("a/2.jpg", "bad_metadata"),
        ("b/missing.jpg", "unreadable"),
    ]
    assert all(s.num_records <= 2 for s in m.shards)  # rolling shards, even after the rewrite


def test_cue_conflict_layout(tmp_path):
    img = _save(_noise(), "PNG")
    _write_tree(
        tmp_path / "cc",
        {
            "cat/cat1-dog2.png": img,
            "dog/dog3-cat1.png": img,
            "car/car1-car1.png": img,
            "cat/cat2.png": img,
            "cat/cat3-zebra1.png": img,
        },
    )
    prepare.prepare(
        _cfg("cue", source="cue_conflict", root=str(tmp_path / "cc"), lossless=True, image_size=0),
        tmp_path / "out",
    )
    m, recs = _read_all(tmp_path / "out" / "cue" / "test")
    assert m.class_names == ["car", "cat", "dog"]
    assert {"shape_label", "texture_label"} <= set(m.features)
    got = {r.id: (r.label, r.shape_label, r.texture_label) for r in recs}
    assert got == {
        "cat/cat1-dog2.png": ((1,), 1, 2),
        "dog/dog3-cat1.png": ((2,), 2, 1),
        "car/car1-car1.png": ((0,), 0, 0),
    }
    assert sorted(d["reason"] for d in _letters(tmp_path / "out" / "cue" / "test")) == [
        "bad_name",
        "bad_name",
    ]


def test_stage_run_digits_default_config(tmp_path):
    cfg = prepare.default_config()
    cfg.lock()
    out = prepare.run(cfg, {}, tmp_path)
    assert out["artifacts"] == {
        "digits/train": "digits/train",
        "digits/val": "digits/val",
        "digits/test": "digits/test",
    }
    assert out["metrics"]["read"] == 1797 == out["metrics"]["accepted"]
    assert out["metrics"]["rejected"] == 0
    sizes = {}
    for key in out["artifacts"]:
        m = manifest_lib.validate(tmp_path / key)
        assert m.image_size == 32 and m.num_classes == 10
        sizes[m.split] = m.num_records
    assert sizes == {"train": 1438, "val": 179, "test": 180}
    m, recs = _read_all(tmp_path / "digits" / "val")
    assert images.decode_scaled(recs[0].image).shape == (32, 32, 3)
    json.dumps(out)  # outputs.json must be serialisable


def test_digits_splits_are_deterministic_and_disjoint():
    src = sources.DigitsSource(16)
    ids = {s: [i for t in src.tasks(s) for i in src.expand(t)] for s in ("train", "val", "test")}
    assert sum(map(len, ids.values())) == 1797
    assert len(set().union(*map(set, ids.values()))) == 1797
    assert ids["val"] == [i for t in sources.DigitsSource(16).tasks("val") for i in t]


def test_cli_digits_subset_and_records_per_shard(tmp_path, capsys):
    rc = prepare.main(
        [
            "--source",
            "digits",
            "--out",
            str(tmp_path),
            "--splits",
            "val",
            "--image_size",
            "24",
            "--records_per_shard",
            "50",
            "--direct_num_workers",
            "1",
        ]
    )
    assert rc == 0
    assert "digits/val" in capsys.readouterr().out
    m = manifest_lib.validate(tmp_path / "digits" / "val")
    assert (
        m.num_records == 179 and len(m.shards) == 4 and max(s.num_records for s in m.shards) == 50
    )
    assert [s.path for s in m.shards] == [
        f"digits-val.array_record-0000{i}-of-00004" for i in range(4)
    ]


def test_cli_help_and_clear_errors(tmp_path, capsys):
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.prepare", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for flag in ("--source", "--out", "--tfds_data_dir", "--lossless", "--direct_num_workers"):
        assert flag in out.stdout
    rc = prepare.main(
        [
            "--source",
            "tfds",
            "--tfds_name",
            "imagenet2012",
            "--tfds_data_dir",
            str(tmp_path / "tfds"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "not prepared under" in err and "never downloads" in err
    with pytest.raises(ValueError, match="prepare.datasets.x.source='nope'"):
        prepare.validate_config(_cfg("x", source="nope"))


def test_pipeline_options_pass_through():
    cfg = prepare.default_config()
    opts = prepare.pipeline_options(
        cfg, ["--job_name=abc", "--direct_num_workers=2"]
    ).get_all_options()
    assert opts["runner"] == "FnApiRunner" and opts["job_name"] == "abc"
    assert opts["direct_num_workers"] == 2 and opts["direct_running_mode"] == "in_memory"


# --- TFDS (a tiny dataset built locally; no download) ---------------------------------------------


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    tfds = pytest.importorskip("tensorflow_datasets")
    data_dir = tmp_path_factory.mktemp("tfds")

    class Cifar10(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("3.0.2")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "id": tfds.features.Text(),
                        "image": tfds.features.Image(shape=(32, 32, 3)),
                        "label": tfds.features.ClassLabel(names=["airplane", "bird", "cat"]),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(12), "test": self._generate_examples(4)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"id": f"ex_{i}", "image": _noise(32, 32, seed=i), "label": i % 3}

    class CelebA(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = "celeb_a"
        VERSION = tfds.core.Version("2.1.0")

        def _info(self):
            attrs = {
                a: tfds.features.Tensor(shape=(), dtype=np.bool_)
                for a in ("Smiling", "Male", "Young")
            }
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(40, 30, 3)),
                        "attributes": tfds.features.FeaturesDict(attrs),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"test": self._generate_examples()}

        def _generate_examples(self):
            for i in range(5):
                yield (
                    i,
                    {
                        "image": _noise(40, 30, seed=i),
                        "attributes": {"Smiling": i % 2 == 0, "Male": i >= 3, "Young": True},
                    },
                )

    Cifar10(data_dir=str(data_dir)).download_and_prepare()
    CelebA(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir


@pytest.mark.xdist_group("prepare_tfds")
def test_tfds_source_maps_features(tfds_dir, tmp_path):
    cfg = prepare.default_config()
    cfg.datasets = ml_collections.ConfigDict(
        {
            "cifar10": prepare.dataset_config(
                source="tfds",
                tfds_data_dir=str(tfds_dir),
                image_size=0,
                lossless=True,
                splits={"train": "train[:75%]", "test": "test"},
            ),
            "celeb_a": prepare.dataset_config(
                source="tfds", tfds_data_dir=str(tfds_dir), image_size=0
            ),
        }
    )
    result = prepare.prepare(cfg, tmp_path)
    assert result.counters["read"] == 9 + 4 + 5 and result.counters["rejected"] == 0
    m, recs = _read_all(tmp_path / "cifar10" / "train")
    assert m.class_names == ["airplane", "bird", "cat"] and m.num_records == 9
    assert m.source["type"] == "tfds" and m.source["selector"] == "train[:75%]"
    by_id = {r.id: r for r in recs}
    assert len(by_id) == 9 and set(by_id) <= {f"ex_{i}" for i in range(12)}  # TFDS shuffles
    for rid, rec in by_id.items():  # lossless: exact pixels
        i = int(rid[3:])
        np.testing.assert_array_equal(images.decode_scaled(rec.image), _noise(32, 32, seed=i))
        assert rec.label == (i % 3,)
    m, recs = _read_all(tmp_path / "celeb_a" / "test")
    assert m.source["attribute_names"] == ["Male", "Smiling", "Young"] and m.num_classes == 0
    assert "attributes" in m.features
    got = sorted((r.id, r.attributes, r.label) for r in recs)
    assert got[0][0].startswith("celeb_a-test.array_record-00000-of-00001__")
    assert sorted(r.attributes for r in recs) == sorted(
        (int(i >= 3), int(i % 2 == 0), 1) for i in range(5)
    )
    assert all(r.label == () for r in recs)


@pytest.mark.xdist_group("prepare_tfds")
def test_tfds_errors_are_clear(tfds_dir):
    with pytest.raises(sources.SourceError, match="has no split 'validation'"):
        tfds_source.TfdsSource("cifar10", str(tfds_dir)).tasks("validation")
    with pytest.raises(sources.SourceError, match="'imagenet_a' is not prepared"):
        tfds_source.TfdsSource("imagenet_a", str(tfds_dir))


@pytest.mark.xdist_group("prepare_tfds")
def test_tfds_names_versions_and_data_dirs_a_new_user_gets_wrong(tfds_dir):
    find = tfds_source.find_tfds_dir
    assert (
        find("cifar10:3.*.*", str(tfds_dir))
        == find("cifar10", str(tfds_dir))
        == tfds_dir / "cifar10" / "3.0.2"
    )
    for name, data_dir, message in [
        (
            "cifar10:4.0.0",
            tfds_dir,
            "has no version '4.0.0' under .*; prepared versions: \\['3.0.2'\\]",
        ),
        (
            "Cifar-10",
            tfds_dir,
            "dataset 'Cifar-10' is not prepared .*did you mean \\['cifar10'\\]\\?",
        ),
        (
            "cifar10/plain",
            tfds_dir,
            "'cifar10/plain' is not prepared under .*; prepared: \\['cifar10'\\]",
        ),
        (
            "cifar10",
            tfds_dir / "cifar10",
            "is itself inside a prepared dataset .*e.g. '" + str(tfds_dir) + "'",
        ),
        ("cifar10", tfds_dir / "cifar10" / "3.0.2", "is itself inside a prepared dataset"),
    ]:
        with pytest.raises(sources.SourceError, match=message):
            find(name, str(data_dir))


def test_cli_in_separate_beam_worker_processes(tmp_path):
    """multi_processing pickles every DoFn into SDK worker processes (as Dataflow would)."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.prepare",
            "--source",
            "digits",
            "--splits",
            "val",
            "--out",
            str(tmp_path),
            "--direct_num_workers",
            "2",
            "--direct_running_mode",
            "multi_processing",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "read=179" in out.stdout
    assert manifest_lib.validate(tmp_path / "digits" / "val").num_records == 179


def test_flat_folder_with_integer_csv_labels(tmp_path):
    _write_tree(
        tmp_path / "flat",
        {"x.png": _save(_noise(seed=5), "PNG"), "y.png": _save(_noise(seed=6), "PNG")},
    )
    (tmp_path / "flat" / "l.csv").write_text("id,label\nx.png,2\ny.png,0\n")
    src = folder_sources.FolderSource(str(tmp_path / "flat"), [""], "l.csv")
    assert src.class_names == ("0", "1", "2") and src.info().features == ()
    refs = [r for t in src.tasks("") for r in src.expand(t)]
    got = sorted((ex.id, ex.label) for ref in refs for ex in src.read(ref))
    assert got == [("x.png", (2,)), ("y.png", (0,))]


# --- real dataset layouts (the folder-layout trap) ------------------------------------------------


def _png(seed):
    return _save(_noise(32, 32, seed=seed), "PNG")


def test_folder_split_dirs_are_detected_without_splits(tmp_path, capsys):
    """`--source folder --root DIR` on DIR/train/<class>/, DIR/validation/<class>/ (no --splits):
    two splits with the class dirs' labels, not one split whose classes are `train`,
    `validation`."""
    _write_tree(
        tmp_path / "pets",
        {
            "train/cat/a.png": _png(0),
            "train/cat/nested/b.png": _png(1),
            "train/dog/c.png": _png(2),
            "validation/cat/d.png": _png(3),
            "validation/dog/e.png": _png(4),
            "validation/dog/f.png": _png(5),
        },
    )
    rc = prepare.main(
        [
            "--source",
            "folder",
            "--root",
            str(tmp_path / "pets"),
            "--out",
            str(tmp_path / "out"),
            "--image_size",
            "0",
            "--lossless",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out" / "folder").iterdir()) == ["train", "val"]
    labels = {}
    for split in ("train", "val"):
        m, recs = _read_all(tmp_path / "out" / "folder" / split)
        assert m.class_names == ["cat", "dog"] and m.num_dead_letters == 0
        labels[split] = sorted((r.id, r.label) for r in recs)
    # files nested deeper in a class dir keep that class; ids are relative to the split dir
    assert labels == {
        "train": [("cat/a.png", (0,)), ("cat/nested/b.png", (0,)), ("dog/c.png", (1,))],
        "val": [("cat/d.png", (0,)), ("dog/e.png", (1,)), ("dog/f.png", (1,))],
    }
    assert folder_sources.detect_splits(str(tmp_path / "pets")) == {
        "train": "train",
        "val": "validation",
    }


@pytest.mark.parametrize(
    "files,splits,bad_path,message",
    [
        # split dirs next to a class dir / next to loose images: ambiguous
        ({"train/cat/a.png", "dog/b.png"}, "", "", "mixes split dirs ['train'] with dirs ['dog']"),
        ({"train/cat/a.png", "b.png"}, "", "", "mixes split dirs ['train'] with 1 image(s)"),
        ({"val/cat/a.png", "validation/cat/b.png"}, "", "", "two dirs for split 'val'"),
        # a split dir that holds split dirs (tarball double nesting) / an inverted <class>/<split>/
        ({"train/train/cat/a.png"}, "train", "train", "holds split dirs ['train'], not class dirs"),
        (
            {"cat/train/a.png", "cat/val/b.png"},
            "",
            "cat",
            "must be <split>/<class>/, not <class>/<split>/",
        ),
        # images that would silently get no label
        ({"cat/a.png", "b.png"}, "", "", "holds 1 image(s) outside class dirs (e.g. 'b.png')"),
        ({"train/cat/a.png", "val/b.png"}, "", "val", "outside class dirs"),
        ({"train/cat/a.png", "val/.keep"}, "", "val", "holds no images and no class dirs"),
    ],
)
def test_folder_layouts_that_match_no_documented_one_fail_naming_the_path(
    tmp_path, capsys, files, splits, bad_path, message
):
    root = tmp_path / "data"
    _write_tree(root, {name: _png(i) for i, name in enumerate(sorted(files))})
    rc = prepare.main(
        ["--source", "folder", "--root", str(root), "--out", str(tmp_path / "out")]
        + (["--splits", splits] if splits else [])
    )
    err = capsys.readouterr().err
    assert (
        rc == 2 and message in err and repr(str(root / bad_path) if bad_path else str(root)) in err
    ), err
    assert err.count("\n") == 1
    assert not (tmp_path / "out" / "folder").exists()


def test_folder_explicit_splits_allow_a_class_named_like_a_split(tmp_path):
    """A class really called `train` (vehicles): `--splits train=` reads the root as one split."""
    _write_tree(tmp_path / "v", {"bus/a.png": _png(0), "train/b.png": _png(1)})
    with pytest.raises(sources.SourceError, match="mixes split dirs"):
        folder_sources.detect_splits(str(tmp_path / "v"))
    src = folder_sources.FolderSource(str(tmp_path / "v"), [""])
    assert src.class_names == ("bus", "train")
    # a folder with no class dirs at all is an unlabeled dataset (documented), not an error
    _write_tree(tmp_path / "flat", {"x.png": _png(2)})
    assert folder_sources.detect_splits(str(tmp_path / "flat")) == {"train": ""}
    assert folder_sources.FolderSource(str(tmp_path / "flat"), [""]).class_names == ()


def test_cue_conflict_root_one_level_too_high_fails_naming_the_dir(tmp_path):
    _write_tree(
        tmp_path / "mvh",
        {"cue-conflict/cat/cat1-dog1.png": _png(0), "cue-conflict/dog/dog1-cat1.png": _png(1)},
    )
    with pytest.raises(
        sources.SourceError, match=r"'.*mvh/cue-conflict' holds dirs, not <shape>N-<texture>M.png"
    ):
        folder_sources.CueConflictSource(str(tmp_path / "mvh"), [""])
    assert folder_sources.CueConflictSource(
        str(tmp_path / "mvh" / "cue-conflict"), [""]
    ).class_names == ("cat", "dog")


def test_two_multi_processing_workers_write_the_same_records_as_one(tmp_path):
    """FnApiRunner multi_processing x2 (SDK worker processes, as Dataflow pickles the DoFns) vs
    in_memory x1: the same records (ids, image bytes, labels), whatever the shard boundaries."""
    rng = np.random.default_rng(7)
    _write_tree(
        tmp_path / "src",
        {
            f"{c}/{i:02d}.jpg": _save(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8), "JPEG")
            for c in ("ant", "bee", "cow")
            for i in range(12)
        },
    )
    _write_tree(tmp_path / "src", {"bee/broken.jpg": b"\xff\xd8\xff not a jpeg"})
    got = {}
    for workers, mode in ((1, "in_memory"), (2, "multi_processing")):
        cfg = _cfg("zoo", source="folder", root=str(tmp_path / "src"), records_per_shard=8)
        cfg.direct_num_workers, cfg.direct_running_mode = workers, mode
        prepare.prepare(cfg, tmp_path / mode)
        m, recs = _read_all(tmp_path / mode / "zoo" / "train")
        got[mode] = (
            {r.id: (r.image, r.label) for r in recs},
            [(d["id"], d["reason"]) for d in _letters(tmp_path / mode / "zoo" / "train")],
            m.class_names,
            m.num_records,
        )
    assert len(got["in_memory"][0]) == 36 and got["in_memory"][1] == [
        ("bee/broken.jpg", "undecodable")
    ]
    assert got["multi_processing"] == got["in_memory"]
