"""A minimal TensorBoard event-file writer (scalars only), without TensorFlow or tensorboard.

Why not CLU's `SummaryWriter`: `clu.metric_writers` imports TensorFlow at package import, 3-5 s
and ~0.6 GB per stage process (DESIGN §6), only to write the one summary the framework writes
for stages that log no metrics of their own. (Until tensorboard joined the pins it did not
import at all.) Stages that log per-step metrics use CLU themselves; the files are the same
format. The format is small and stable: a TFRecord stream of `tensorflow.Event` protos, each
record framed as `uint64 length | masked crc32c(length) | data | masked crc32c(data)`. We encode
the four proto messages we need by hand:

    Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
    Summary { repeated Value value = 1; }
    Value   { string tag = 1; float simple_value = 2; }

tests/test_dag.py reads the file back with TensorFlow's own `summary_iterator`.
"""
from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path
from typing import Mapping

import google_crc32c


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64 is encoded as its two's-complement uint64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: str | None = None,
           scalars: Mapping[str, float] | None = None) -> bytes:
    data = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(step)
    if file_version is not None:
        data += _length_delimited(3, file_version.encode())
    if scalars:
        summary = b"".join(
            _length_delimited(1, _length_delimited(1, tag.encode())
                              + _varint(2 << 3 | 5) + struct.pack("<f", float(value)))
            for tag, value in scalars.items())
        data += _length_delimited(5, summary)
    return data


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _record(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return (header + struct.pack("<I", _masked_crc(header)) + data
            + struct.pack("<I", _masked_crc(data)))


def write_scalars(logdir: Path, rows: list[tuple[int, Mapping[str, float]]]) -> Path:
    """Writes one events file under `logdir` holding `(step, {tag: value})` rows; returns it."""
    logdir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    path = logdir / f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}.v2"
    with open(path, "wb") as f:
        f.write(_record(_event(now, 0, file_version="brain.Event:2")))
        for step, scalars in rows:
            f.write(_record(_event(now, step, scalars=scalars)))
    return path
