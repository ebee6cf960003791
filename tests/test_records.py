"""data/records.py: the tf.train.Example codec without TensorFlow, and data/manifest.py."""

import json
import subprocess
import sys

import pytest

from data import manifest as manifest_lib
from data import records

FULL = records.Record(
    image=b"\xff\xd8\xffjpeg-bytes",
    label=(3, 7),
    id="n01440764/img_1.JPEG",
    real_labels=(),
    attributes=(0, 1, 1),
    text="a dog on a mat",
    shape_label=2,
    texture_label=5,
)


def test_round_trip_all_fields():
    assert records.decode(records.encode(FULL)) == FULL


def test_round_trip_minimal_record_keeps_absent_fields_absent():
    rec = records.Record(image=b"x", label=(), id="a")
    out = records.decode(records.encode(rec))
    assert out == rec and out.real_labels is None and out.text is None
    assert rec.features() == ("image", "label", "id")
    assert FULL.features() == tuple(records.FEATURE_KINDS)


def test_several_captions_round_trip_and_a_single_str_is_one_caption():
    rec = records.Record(image=b"x", label=(1,), id="a", text=("a seven", "the digit 7"))
    assert records.decode(records.encode(rec)).text == ("a seven", "the digit 7")
    assert records.Record(image=b"x", label=(1,), id="a", text="one").text == ("one",)
    with pytest.raises(records.RecordError, match="field 'text'"):
        records.encode(records.Record(image=b"x", label=(1,), id="a", text=()))


def test_present_but_empty_real_labels_differs_from_absent():
    with_empty = records.decode(
        records.encode(records.Record(image=b"x", label=(1,), id="a", real_labels=()))
    )
    assert with_empty.real_labels == ()


def test_encoding_is_canonical():
    assert records.encode(FULL) == records.encode(records.decode(records.encode(FULL)))


def test_module_does_not_import_tensorflow():
    code = (
        "import sys, data.records, data.manifest, data.loader; print('tensorflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_byte_identical_to_tensorflow():
    tf = pytest.importorskip("tensorflow")
    ex = tf.train.Example(
        features=tf.train.Features(
            feature={
                "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[FULL.image])),
                "label": tf.train.Feature(int64_list=tf.train.Int64List(value=list(FULL.label))),
                "id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[FULL.id.encode()])),
                "real_labels": tf.train.Feature(int64_list=tf.train.Int64List(value=[])),
                "attributes": tf.train.Feature(
                    int64_list=tf.train.Int64List(value=list(FULL.attributes))
                ),
                "text": tf.train.Feature(
                    bytes_list=tf.train.BytesList(value=[t.encode() for t in FULL.text])
                ),
                "shape_label": tf.train.Feature(int64_list=tf.train.Int64List(value=[2])),
                "texture_label": tf.train.Feature(int64_list=tf.train.Int64List(value=[5])),
            }
        )
    )
    assert ex.SerializeToString(deterministic=True) == records.encode(FULL)
    # and TF's own parser reads our bytes
    parsed = tf.io.parse_single_example(
        records.encode(FULL),
        {
            "image": tf.io.FixedLenFeature([], tf.string),
            "label": tf.io.VarLenFeature(tf.int64),
            "id": tf.io.FixedLenFeature([], tf.string),
        },
    )
    assert parsed["id"].numpy().decode() == FULL.id
    assert list(parsed["label"].values.numpy()) == [3, 7]


@pytest.mark.parametrize(
    "bad, msg",
    [
        (records.Record(image=b"", label=(1,), id="a"), "field 'image'"),
        (records.Record(image=b"x", label=("cat",), id="a"), "field 'label'"),
        (records.Record(image=b"x", label=(1,), id=""), "record id"),
        (records.Record(image=b"x", label=(1,), id="a", text=b"bytes"), "field 'text'"),
    ],
)
def test_encode_rejects_bad_values_naming_the_field(bad, msg):
    with pytest.raises(records.RecordError, match=msg):
        records.encode(bad)


def test_decode_errors_name_the_field():
    no_image = records.serialize_example({"label": ("int64", [1]), "id": ("bytes", [b"r1"])})
    with pytest.raises(records.RecordError, match="record 'r1': missing required feature 'image'"):
        records.decode(no_image)
    wrong_kind = records.serialize_example(
        {"image": ("bytes", [b"x"]), "label": ("bytes", [b"1"]), "id": ("bytes", [b"r2"])}
    )
    with pytest.raises(records.RecordError, match="feature 'label' must be int64_list"):
        records.decode(wrong_kind)
    with pytest.raises(records.RecordError, match="not a serialized tf.train.Example"):
        records.decode(b"\xff\xff\xff")


# --- manifest -------------------------------------------------------------------------------------


def _write_split(tmp_path, n=5, num_shards=1):
    from array_record.python import array_record_module

    shards = []
    for s in range(num_shards):
        name = f"s-{s:05d}"
        w = array_record_module.ArrayRecordWriter(
            str(tmp_path / name), manifest_lib.ARRAY_RECORD_OPTIONS
        )
        for i in range(n):
            w.write(
                records.encode(records.Record(image=b"img%d" % i, label=(i % 2,), id=f"r{s}-{i}"))
            )
        w.close()
        shards.append(manifest_lib.Shard(name, n, manifest_lib.sha256_file(tmp_path / name)))
    (tmp_path / manifest_lib.DEAD_LETTERS_NAME).write_text(
        json.dumps({"id": "bad", "source": "x", "reason": "undecodable"}) + "\n"
    )
    m = manifest_lib.Manifest(
        dataset="toy",
        split="train",
        num_records=n * num_shards,
        num_classes=2,
        class_names=["a", "b"],
        image_size=None,
        features=["image", "label", "id"],
        shards=shards,
        dead_letters=manifest_lib.DEAD_LETTERS_NAME,
        num_dead_letters=1,
        source={"type": "test"},
    )
    manifest_lib.write(tmp_path, m)
    return m


def test_manifest_write_read_validate(tmp_path):
    m = _write_split(tmp_path)
    assert manifest_lib.read(tmp_path) == m
    assert manifest_lib.validate(tmp_path / "manifest.json") == m
    assert not list(tmp_path.glob(".manifest*"))  # atomic write leaves no temp file


def _edit(tmp_path, fn):
    path = tmp_path / "manifest.json"
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj))


@pytest.mark.parametrize(
    "tamper, msg",
    [
        (
            lambda o: o["shards"][0].update(num_records=4),
            "field 'num_records' is 5 but the shards sum to 4",
        ),
        (
            lambda o: (o["shards"][0].update(num_records=4), o.update(num_records=4)),
            "has 5 records but .* shards\\[0\\].num_records says 4",
        ),
        (
            lambda o: o["shards"][0].update(sha256="0" * 64),
            "sha256 .* does not match .* shards\\[0\\].sha256",
        ),
        (
            lambda o: o["shards"][0].update(path="missing"),
            "shards\\[0\\].path 'missing' does not exist",
        ),
        (lambda o: o.update(num_dead_letters=3), "has 1 entries but .* 'num_dead_letters' says 3"),
        (lambda o: o.pop("class_names"), "missing field 'class_names'"),
        (lambda o: o.update(num_classes="2"), "field 'num_classes' has type str"),
        (lambda o: o.update(extra=1), "unknown field"),
        (lambda o: o.update(features=["image", "bogus"]), "unknown feature"),
    ],
)
def test_manifest_tamper_gives_one_line_error(tmp_path, tamper, msg):
    _write_split(tmp_path)
    _edit(tmp_path, tamper)
    with pytest.raises(manifest_lib.ManifestError, match=msg) as e:
        manifest_lib.validate(tmp_path)
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)


@pytest.mark.parametrize("threads", [1, 4])
def test_shards_checked_in_parallel_report_the_first_bad_one(tmp_path, threads):
    _write_split(tmp_path, num_shards=6)
    assert manifest_lib.validate(tmp_path, threads=threads).num_records == 30
    _edit(tmp_path, lambda o: [o["shards"][k].update(sha256="0" * 64) for k in (4, 2)])
    with pytest.raises(manifest_lib.ManifestError, match="s-00002: sha256 .* shards\\[2\\].sha256"):
        manifest_lib.validate(tmp_path, threads=threads)


def test_tampered_shard_bytes_detected(tmp_path):
    _write_split(tmp_path)
    shard = tmp_path / "s-00000"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(manifest_lib.ManifestError, match="sha256|records|readable"):
        manifest_lib.validate(tmp_path)


def test_missing_manifest(tmp_path):
    with pytest.raises(manifest_lib.ManifestError, match="no manifest"):
        manifest_lib.read(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(manifest_lib.ManifestError, match="not valid JSON"):
        manifest_lib.read(tmp_path)
