"""Directory-tree sources for `pipelines.prepare`: an image folder (+ optional CSV) and the
model-vs-human cue-conflict layout. Both select splits by sub-dir of `root` ("" = root itself).
"""
from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pipelines.source_types import RawExample, SourceError, SourceInfo, image_files, read_file


# --- directory trees ------------------------------------------------------------------------------

class _DirectorySource:
    """A root dir whose split selectors are sub-dirs ("" = the root) holding one dir per class."""
    kind = ""

    def __init__(self, root: str, selectors: Iterable[str]):
        self.root = Path(root)
        if not self.root.is_dir():
            raise SourceError(f"{self.kind}: root {str(self.root)!r} is not a directory")
        self.selectors = tuple(selectors)

    def _split_dir(self, selector: str) -> Path:
        d = self.root / selector if selector else self.root
        if not d.is_dir():
            raise SourceError(f"{self.kind}: split dir {str(d)!r} does not exist")
        return d

    def _class_dirs(self) -> set[str]:
        """Names of the (non-hidden) sub-dirs of every split dir."""
        return {p.name for sel in self.selectors for p in self._split_dir(sel).iterdir()
                if p.is_dir() and not p.name.startswith(".")}

    def _set_classes(self, ordered: Iterable[str]) -> None:
        self.class_names = tuple(ordered)
        self._class_index = {n: i for i, n in enumerate(self.class_names)}


# --- image folder -------------------------------------------------------------------------------

class FolderSource(_DirectorySource):
    """`<root>/<selector>/<class>/*.{jpg,png,...}` (selector "" = root itself); images directly
    in the split dir are unlabeled. Class ids are the sorted class-dir names across all splits.

    Optional CSV (`csv`: absolute, or relative to each split dir) with a header naming `id`
    (path relative to the split dir) and any of `label`/`labels` (whitespace-separated class
    names or ids), `attributes` (whitespace-separated ints), `text`. With a CSV its rows ARE the
    inputs (a row whose file is missing is dead-lettered as "unreadable"); an empty label cell
    falls back to the class dir.
    """
    kind = "folder"

    def __init__(self, root: str, selectors: Iterable[str], csv_path: str = ""):
        super().__init__(root, selectors)
        self.csv_path = csv_path
        names = self._class_dirs()
        self._columns: set[str] = set()
        max_id = -1
        for sel in self.selectors:
            for row in self._csv_rows(sel) or ():
                self._columns.update(row)
                tokens = row.get("label", "").split()
                names.update(t for t in tokens if not t.isdigit())
                max_id = max([max_id] + [int(t) for t in tokens if t.isdigit()])
        if not names and max_id >= 0:  # flat folder, integer labels only: classes "0".."max"
            self._set_classes(str(i) for i in range(max_id + 1))
        else:
            self._set_classes(sorted(names))

    def _csv_file(self, selector: str) -> Path | None:
        if not self.csv_path:
            return None
        p = Path(self.csv_path)
        return p if p.is_absolute() else self._split_dir(selector) / p

    def _csv_rows(self, selector: str) -> list[dict[str, str]] | None:
        path = self._csv_file(selector)
        if path is None:
            return None
        if not path.is_file():
            raise SourceError(f"folder: csv {str(path)!r} does not exist")
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            cols = [c.strip() for c in (reader.fieldnames or [])]
            if "id" not in cols:
                raise SourceError(f"{path}: header must name an 'id' column, got {cols}")
            extra = set(cols) - {"id", "label", "labels", "attributes", "text"}
            if extra:
                raise SourceError(f"{path}: unknown column(s) {sorted(extra)}")
            rows = []
            for row in reader:
                row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
                if "labels" in row:
                    row["label"] = row.pop("labels")
                rows.append(row)
        return rows

    def info(self) -> SourceInfo:
        feats = tuple(k for k in ("attributes", "text") if k in self._columns)
        return SourceInfo(self.class_names, feats,
                          {"type": "folder", "root": str(self.root.resolve()), "csv": self.csv_path})

    def tasks(self, selector: str) -> list[tuple]:
        split_dir = self._split_dir(selector)
        if self.csv_path:
            # one task: its expand parses the CSV once, and the Reshuffle after Expand spreads the rows
            return [("csv", selector, "")]
        dirs = [("dir", selector, "")]
        dirs += [("dir", selector, p.name) for p in sorted(split_dir.iterdir())
                 if p.is_dir() and not p.name.startswith(".")]
        return dirs

    def expand(self, task: tuple) -> Iterator[tuple]:
        kind, selector, arg = task
        split_dir = self._split_dir(selector)
        if kind == "dir":
            for p in image_files(split_dir / arg if arg else split_dir, recursive=bool(arg)):
                yield ("file", selector, p.relative_to(split_dir).as_posix(), None)
            return
        for i, row in enumerate(self._csv_rows(selector)):
            yield ("row", selector, row.get("id", ""), {**row, "_line": str(i + 2)})

    def _parse_row(self, row: dict[str, str], rel: str) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        labels = []
        for tok in row.get("label", "").split():
            if tok.isdigit():
                if int(tok) >= len(self.class_names) and self.class_names:
                    raise ValueError(f"label id {tok} >= {len(self.class_names)} classes")
                labels.append(int(tok))
            else:
                labels.append(self._class_index[tok])
        if not labels:
            labels = self._dir_label(rel)
        fields["label"] = tuple(labels)
        if "attributes" in row:
            fields["attributes"] = tuple(int(t) for t in row["attributes"].split())
        if "text" in row:
            fields["text"] = row["text"]
        return fields

    def _dir_label(self, rel: str) -> list[int]:
        parts = rel.split("/")
        return [self._class_index[parts[0]]] if len(parts) > 1 and parts[0] in self._class_index else []

    def read(self, ref: tuple) -> Iterator[RawExample]:
        kind, selector, rel, row = ref
        path = self._split_dir(selector) / rel
        if kind == "file":
            yield read_file(path, str(path), rel, label=tuple(self._dir_label(rel)))
            return
        line = row.pop("_line")
        csv_file = self._csv_file(selector)
        # the same file may be listed twice: the source names the CSV line to tell them apart
        source = f"{path} ({csv_file.name} line {line})"
        if not rel:
            yield RawExample(id=f"{csv_file.name}:{line}", source=source,
                             error=("bad_metadata", "empty 'id' cell"))
            return
        try:
            fields = self._parse_row(row, rel)
        except (ValueError, KeyError) as e:
            yield RawExample(id=rel, source=source, error=("bad_metadata", f"csv line {line} {row}: {e}"))
            return
        yield read_file(path, source, rel, **fields)


# --- model-vs-human cue conflict ----------------------------------------------------------------

_CUE_NAME = re.compile(r"^(?P<shape>[a-z]+)(?P<n>\d+)-(?P<texture>[a-z]+)(?P<m>\d+)\.png$")


class CueConflictSource(_DirectorySource):
    """Geirhos et al. stimuli: `<root>/<selector>/<shape>/<shape>N-<texture>M.png`; label and
    shape_label are the shape's class id, texture_label the texture's (class ids = sorted shape
    dirs, i.e. the 16 model-vs-human classes)."""
    kind = "cue_conflict"

    def __init__(self, root: str, selectors: Iterable[str]):
        super().__init__(root, selectors)
        names = self._class_dirs()
        if not names:
            raise SourceError(f"cue_conflict: no <shape>/ dirs under {str(self.root)!r}")
        self._set_classes(sorted(names))

    def info(self) -> SourceInfo:
        return SourceInfo(self.class_names, ("shape_label", "texture_label"),
                          {"type": "cue_conflict", "root": str(self.root.resolve())})

    def tasks(self, selector: str) -> list[tuple[str, str]]:
        return [(selector, name) for name in self.class_names
                if (self._split_dir(selector) / name).is_dir()]

    def expand(self, task: tuple[str, str]) -> Iterator[tuple[str, str]]:
        selector, shape = task
        split_dir = self._split_dir(selector)
        for p in image_files(split_dir / shape, recursive=False):
            yield selector, p.relative_to(split_dir).as_posix()

    def read(self, ref: tuple[str, str]) -> Iterator[RawExample]:
        selector, rel = ref
        path = self._split_dir(selector) / rel
        shape_dir, name = rel.split("/")
        m = _CUE_NAME.match(name)
        index = self._class_index
        if not m or m["shape"] != shape_dir or m["texture"] not in index:
            why = ("name is not <shape>N-<texture>M.png" if not m else
                   f"shape {m['shape']!r} is not its dir {shape_dir!r}" if m["shape"] != shape_dir else
                   f"texture {m['texture']!r} is not a class")
            yield RawExample(id=rel, source=str(path), error=("bad_name", why))
            return
        shape = index[shape_dir]
        yield read_file(path, str(path), rel, label=(shape,), shape_label=shape,
                         texture_label=index[m["texture"]])
