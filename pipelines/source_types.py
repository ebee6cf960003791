"""What every source of `pipelines.prepare` hands over (pipelines/sources.py explains the
tasks -> expand -> read protocol): `RawExample`, `SourceInfo`, `SourceError`, and the file
helpers the file-based sources share.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


class SourceError(ValueError):
    """A source is misconfigured or missing (not a per-image problem)."""


@dataclasses.dataclass(frozen=True)
class RawExample:
    """One input before validation; `error` set means it could not even be read."""

    id: str
    source: str
    image: bytes = b""
    label: tuple[int, ...] = ()
    real_labels: tuple[int, ...] | None = None
    attributes: tuple[int, ...] | None = None
    text: str | tuple[str, ...] | None = None  # one caption or several
    shape_label: int | None = None
    texture_label: int | None = None
    error: tuple[str, str] | None = None


@dataclasses.dataclass(frozen=True)
class SourceInfo:
    """What the manifest says about the data: classes, optional features, provenance."""

    class_names: tuple[str, ...]
    features: tuple[str, ...]  # optional record features this source fills
    description: dict[str, Any]  # the manifest's "source" object


def read_file(path: Path, source_id: str, rel: str, **fields) -> RawExample:
    try:
        data = path.read_bytes()
    except OSError as e:
        return RawExample(
            id=rel, source=source_id, error=("unreadable", f"{type(e).__name__}: {e}")
        )
    return RawExample(id=rel, source=source_id, image=data, **fields)


def image_files(directory: Path, recursive: bool) -> list[Path]:
    it = directory.rglob("*") if recursive else directory.iterdir()
    return sorted(p for p in it if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
