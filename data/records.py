"""THE record schema (docs/DESIGN.md §3): one ArrayRecord record = one `tf.train.Example`.

| key | kind | meaning |
|---|---|---|
| image | bytes | encoded RGB image (JPEG, or PNG for lossless datasets) |
| label | int64 list | class ids (several allowed; empty = unlabeled) |
| id | bytes | stable unique id (TFDS id or relative source path), UTF-8 |
| real_labels | int64 list, optional | ImageNet-ReaL label set (present-but-empty = unlabeled) |
| attributes | int64 list, optional | e.g. CelebA binary attributes |
| text | bytes list, optional | one or more captions (LiT), UTF-8 |
| shape_label, texture_label | int64, optional | cue-conflict images (model-vs-human) |

TensorFlow is deliberately NOT imported (docs/DESIGN.md §6: 2.7-5 s and ~0.6 GB per process).
The Example/Feature messages are rebuilt here from their descriptors in a private descriptor pool
(so they never clash with TF's own registration when TF is imported in the same process) and
serialized by the same protobuf runtime TF uses; with `deterministic=True` (map keys sorted) the
bytes are identical to `tf.train.Example(...).SerializeToString(deterministic=True)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory


class RecordError(ValueError):
    """A record (or a value meant to become one) does not follow the schema."""


# --- tf.train.Example without TensorFlow -------------------------------------------------------


def _build_example_classes():
    """Returns (Example, Feature) message classes equivalent to tensorflow/core/example/*.proto."""
    fdp = descriptor_pb2.FileDescriptorProto(
        name="vit22b/data/tf_example.proto", package="tensorflow", syntax="proto3"
    )
    F = descriptor_pb2.FieldDescriptorProto
    packed = descriptor_pb2.FieldOptions(packed=True)

    def add_list(name: str, ftype: int, options=None) -> None:
        msg = fdp.message_type.add(name=name)
        field = msg.field.add(name="value", number=1, label=F.LABEL_REPEATED, type=ftype)
        if options is not None:
            field.options.CopyFrom(options)

    add_list("BytesList", F.TYPE_BYTES)
    add_list("FloatList", F.TYPE_FLOAT, packed)
    # TF's Int64List also carries jstype=JS_STRING; it changes no wire bytes but keeps the
    # descriptor an exact copy.
    add_list(
        "Int64List",
        F.TYPE_INT64,
        descriptor_pb2.FieldOptions(packed=True, jstype=descriptor_pb2.FieldOptions.JS_STRING),
    )

    feature = fdp.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    for number, (fname, tname) in enumerate(
        [("bytes_list", "BytesList"), ("float_list", "FloatList"), ("int64_list", "Int64List")], 1
    ):
        feature.field.add(
            name=fname,
            number=number,
            label=F.LABEL_OPTIONAL,
            type=F.TYPE_MESSAGE,
            type_name=f".tensorflow.{tname}",
            oneof_index=0,
        )

    features = fdp.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.field.add(name="key", number=1, label=F.LABEL_OPTIONAL, type=F.TYPE_STRING)
    entry.field.add(
        name="value",
        number=2,
        label=F.LABEL_OPTIONAL,
        type=F.TYPE_MESSAGE,
        type_name=".tensorflow.Feature",
    )
    entry.options.map_entry = True
    features.field.add(
        name="feature",
        number=1,
        label=F.LABEL_REPEATED,
        type=F.TYPE_MESSAGE,
        type_name=".tensorflow.Features.FeatureEntry",
    )

    example = fdp.message_type.add(name="Example")
    example.field.add(
        name="features",
        number=1,
        label=F.LABEL_OPTIONAL,
        type=F.TYPE_MESSAGE,
        type_name=".tensorflow.Features",
    )

    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Feature")),
    )


Example, Feature = _build_example_classes()

# kind of every schema key; "int64" keys holding a single value are marked in _SCALAR_KEYS.
FEATURE_KINDS: dict[str, str] = {
    "image": "bytes",
    "label": "int64",
    "id": "bytes",
    "real_labels": "int64",
    "attributes": "int64",
    "text": "bytes",
    "shape_label": "int64",
    "texture_label": "int64",
}
REQUIRED_FEATURES = ("image", "label", "id")
OPTIONAL_FEATURES = tuple(k for k in FEATURE_KINDS if k not in REQUIRED_FEATURES)
_SCALAR_KEYS = ("shape_label", "texture_label")
_KIND_FIELD = {"bytes": "bytes_list", "float": "float_list", "int64": "int64_list"}


def _parse(data: bytes):
    example = Example()
    try:
        example.ParseFromString(data)
    except Exception as e:  # protobuf raises its own DecodeError type
        raise RecordError(f"not a serialized tf.train.Example ({len(data)} bytes): {e}") from e
    return example


def parse_example(data: bytes) -> dict[str, tuple]:
    """Parses any serialized tf.train.Example into {key: tuple of values} (bytes/float/int)."""
    example = _parse(data)
    out = {}
    for key, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        out[key] = tuple(getattr(feature, kind).value) if kind else ()
    return out


def serialize_example(features: Mapping[str, tuple[str, Iterable[Any]]]) -> bytes:
    """{key: (kind, values)} -> canonical tf.train.Example bytes (map keys sorted).

    An empty `values` still records the feature (present-but-empty), which the schema uses for
    "ReaL-unlabeled"; kinds are "bytes", "float" or "int64".
    """
    example = Example()
    fmap = example.features.feature
    for key, (kind, values) in features.items():
        lst = getattr(fmap[key], _KIND_FIELD[kind])
        lst.SetInParent()
        lst.value.extend(values)
    return example.SerializeToString(deterministic=True)


# --- the schema ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Record:
    """One example of any prepared dataset; optional fields are None when absent."""

    image: bytes
    label: tuple[int, ...]
    id: str
    real_labels: tuple[int, ...] | None = None
    attributes: tuple[int, ...] | None = None
    text: tuple[str, ...] | None = None  # one or more captions (a single str is taken as one)
    shape_label: int | None = None
    texture_label: int | None = None

    def __post_init__(self):
        if isinstance(self.text, str):
            object.__setattr__(self, "text", (self.text,))

    def features(self) -> tuple[str, ...]:
        """The schema keys this record carries."""
        return REQUIRED_FEATURES + tuple(
            k for k in OPTIONAL_FEATURES if getattr(self, k) is not None
        )


def _int_list(name: str, values: Sequence[Any], rid: str) -> list[int]:
    try:
        return [int(v) for v in values]
    except (TypeError, ValueError) as e:
        raise RecordError(
            f"record {rid!r}: field {name!r} must hold integers, got {values!r}"
        ) from e


def encode(record: Record) -> bytes:
    """Record -> serialized tf.train.Example (canonical bytes)."""
    rid = record.id
    if not isinstance(rid, str) or not rid:
        raise RecordError(f"record id must be a non-empty str, got {rid!r}")
    if not isinstance(record.image, (bytes, bytearray, memoryview)) or not len(record.image):
        raise RecordError(f"record {rid!r}: field 'image' must be non-empty encoded bytes")
    feats: dict[str, tuple[str, list]] = {
        "image": ("bytes", [bytes(record.image)]),
        "label": ("int64", _int_list("label", record.label, rid)),
        "id": ("bytes", [rid.encode("utf-8")]),
    }
    for key in ("real_labels", "attributes"):
        value = getattr(record, key)
        if value is not None:
            feats[key] = ("int64", _int_list(key, value, rid))
    if record.text is not None:
        if (
            not isinstance(record.text, tuple)
            or not record.text
            or not all(isinstance(t, str) for t in record.text)
        ):
            raise RecordError(
                f"record {rid!r}: field 'text' must be a caption (str) or a non-empty tuple of "
                f"them, got {record.text!r:.80}"
            )
        feats["text"] = ("bytes", [t.encode("utf-8") for t in record.text])
    for key in _SCALAR_KEYS:
        value = getattr(record, key)
        if value is not None:
            feats[key] = ("int64", _int_list(key, [value], rid))
    return serialize_example(feats)


def decode(data: bytes) -> Record:
    """Serialized tf.train.Example -> Record; a clear RecordError names the offending field."""
    fmap = _parse(data).features.feature
    rid = (
        fmap["id"].bytes_list.value[0].decode("utf-8")
        if "id" in fmap and fmap["id"].bytes_list.value
        else "?"
    )

    def get(key: str):
        if key not in fmap:
            if key in REQUIRED_FEATURES:
                raise RecordError(f"record {rid!r}: missing required feature {key!r}")
            return None
        feature = fmap[key]
        kind = feature.WhichOneof("kind")
        want = _KIND_FIELD[FEATURE_KINDS[key]]
        if kind is not None and kind != want:
            raise RecordError(f"record {rid!r}: feature {key!r} must be {want}, got {kind}")
        return tuple(getattr(feature, want).value)

    image, text = get("image"), get("text")
    ident = get("id")
    if text is not None and not text:
        raise RecordError(f"record {rid!r}: feature 'text' holds no caption")
    for key, value in (("image", image), ("id", ident)):
        if value is not None and len(value) != 1:
            raise RecordError(
                f"record {rid!r}: feature {key!r} must hold exactly one value, got {len(value)}"
            )
    scalars = {}
    for key in _SCALAR_KEYS:
        value = get(key)
        if value is not None and len(value) != 1:
            raise RecordError(
                f"record {rid!r}: feature {key!r} must hold exactly one value, got {len(value)}"
            )
        scalars[key] = None if value is None else int(value[0])
    return Record(
        image=image[0],
        label=get("label"),
        id=ident[0].decode("utf-8"),
        real_labels=get("real_labels"),
        attributes=get("attributes"),
        text=None if text is None else tuple(t.decode("utf-8") for t in text),
        **scalars,
    )
