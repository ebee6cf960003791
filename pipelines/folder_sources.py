"""Directory-tree sources for `pipelines.prepare`: an image folder (+ optional CSV) and the
model-vs-human cue-conflict layout. Both select splits by sub-dir of `root` ("" = root itself).

Documented layouts (anything else is a one-line SourceError naming the path, never a silently
wrong label):
    <root>/<class>/**/<image>              one split, "train" (files nested in a class dir keep it)
    <root>/<split>/<class>/**/<image>      split dirs train / val / validation / test, detected
                                           when no `splits` are given (`detect_splits`)
    <root>[/<split>]/<image> + a CSV       labels from the CSV; without a CSV: unlabeled, allowed
                                           only when no split of the dataset has class dirs
    <root>[/<split>]/<shape>/<shape>N-<texture>M.png   cue conflict
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pipelines.source_types import RawExample, SourceError, SourceInfo, image_files, read_file


# --- directory trees ------------------------------------------------------------------------------

# Sub-dirs of a folder root that are splits, not classes (lower-cased), and our name for each.
SPLIT_DIRS = {"train": "train", "val": "val", "validation": "val", "test": "test"}
# Class dirs looked into for a <class>/<split>/ inversion: a systematic mistake shows in a few.
_SAMPLED_CLASS_DIRS = 8


def _subdirs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_split_name(name: str) -> bool:
    return name.lower() in SPLIT_DIRS


def detect_splits(root: str) -> dict[str, str]:
    """A folder root given without `splits`: {our split name: sub-dir} for `<root>/<split>/<class>/`
    (train / val / validation -> "val" / test, any case), else {"train": ""} (`<root>/<class>/`).

    Split dirs next to other dirs or loose images are ambiguous: a one-line SourceError naming
    the root (a class really named `train` is selected explicitly with `--splits train=`)."""
    root_path = Path(root)
    if not root_path.is_dir():
        raise SourceError(f"folder: root {str(root_path)!r} is not a directory")
    dirs = _subdirs(root_path)
    splits = [d.name for d in dirs if _is_split_name(d.name)]
    if not splits:
        return {"train": ""}
    others = [d.name for d in dirs if not _is_split_name(d.name)]
    loose = image_files(root_path, recursive=False)
    if others or loose:
        what = (
            f"dirs {others[:3]}" if others else f"{len(loose)} image(s) such as {loose[0].name!r}"
        )
        raise SourceError(
            f"folder: root {str(root_path)!r} mixes split dirs {splits} with {what}: arrange it as "
            f"<root>/<split>/<class>/ or <root>/<class>/, or name the splits (e.g. --splits "
            f"train=train,val=val; --splits train= reads the root itself as one split)"
        )
    names: dict[str, str] = {}
    for name in splits:
        ours = SPLIT_DIRS[name.lower()]
        if ours in names:  # e.g. val/ and validation/, or Train/ and train/
            raise SourceError(
                f"folder: root {str(root_path)!r} has two dirs for split {ours!r} "
                f"({names[ours]!r}, {name!r}): name the splits with --splits"
            )
        names[ours] = name
    return names


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
        """Names of the (non-hidden) sub-dirs of every split dir, after checking that each split
        dir holds class dirs rather than more split dirs (`train/train/`, `--splits all=` on a
        split layout) and that the class dirs are not `<class>/<split>/` inverted."""
        names = set()
        for sel in self.selectors:
            split_dir = self._split_dir(sel)
            classes = _subdirs(split_dir)
            if classes and all(_is_split_name(c.name) for c in classes):
                raise SourceError(
                    f"{self.kind}: {str(split_dir)!r} holds split dirs "
                    f"{[c.name for c in classes]}, "
                    f"not class dirs: select them as splits (e.g. --splits "
                    f"{','.join(f'{c.name}={(Path(sel) / c.name).as_posix()}' for c in classes)})"
                )
            for c in classes[:_SAMPLED_CLASS_DIRS]:
                inner = [d.name for d in _subdirs(c)]
                if inner and all(_is_split_name(n) for n in inner):
                    raise SourceError(
                        f"{self.kind}: {str(c)!r} holds split dirs {inner}: the layout "
                        f"must be <split>/<class>/, not <class>/<split>/"
                    )
            names.update(c.name for c in classes)
        return names

    def _set_classes(self, ordered: Iterable[str]) -> None:
        self.class_names = tuple(ordered)
        self._class_index = {n: i for i, n in enumerate(self.class_names)}


# --- image folder -------------------------------------------------------------------------------


class FolderSource(_DirectorySource):
    """`<root>/<selector>/<class>/*.{jpg,png,...}` (selector "" = root itself). Without a CSV,
    images directly in a split dir are unlabeled, which is allowed only when no split has class
    dirs (else a SourceError: they would silently get no label). Class ids are the sorted
    class-dir names across all splits.

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
        if not csv_path:
            self._check_unlabeled(names)
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

    def _check_unlabeled(self, class_names: set[str]) -> None:
        """Without a CSV: no image may sit outside a class dir when the dataset has class dirs,
        and a split dir with neither images nor class dirs is an error, not an empty split."""
        for sel in self.selectors:
            split_dir = self._split_dir(sel)
            loose = image_files(split_dir, recursive=False)
            if loose and class_names:
                raise SourceError(
                    f"folder: {str(split_dir)!r} holds {len(loose)} image(s) outside class dirs "
                    f"(e.g. {loose[0].name!r}) while the dataset has class dirs "
                    f"{sorted(class_names)[:3]}: they would get no label; move them into "
                    "<class>/ dirs or label them with --csv"
                )
            if not loose and not _subdirs(split_dir):
                raise SourceError(f"folder: {str(split_dir)!r} holds no images and no class dirs")

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
        return SourceInfo(
            self.class_names,
            feats,
            {"type": "folder", "root": str(self.root.resolve()), "csv": self.csv_path},
        )

    def tasks(self, selector: str) -> list[tuple]:
        split_dir = self._split_dir(selector)
        if self.csv_path:
            # one task: its expand parses the CSV once, and the Reshuffle after Expand
            # spreads the rows
            return [("csv", selector, "")]
        dirs = [("dir", selector, "")]
        dirs += [
            ("dir", selector, p.name)
            for p in sorted(split_dir.iterdir())
            if p.is_dir() and not p.name.startswith(".")
        ]
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
        return (
            [self._class_index[parts[0]]]
            if len(parts) > 1 and parts[0] in self._class_index
            else []
        )

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
            yield RawExample(
                id=f"{csv_file.name}:{line}",
                source=source,
                error=("bad_metadata", "empty 'id' cell"),
            )
            return
        try:
            fields = self._parse_row(row, rel)
        except (ValueError, KeyError) as e:
            yield RawExample(
                id=rel, source=source, error=("bad_metadata", f"csv line {line} {row}: {e}")
            )
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
        for sel in self.selectors:  # e.g. root one level too high: <root>/cue-conflict/<shape>/
            for shape_dir in _subdirs(self._split_dir(sel)):
                if not image_files(shape_dir, recursive=False) and _subdirs(shape_dir):
                    raise SourceError(
                        f"cue_conflict: {str(shape_dir)!r} holds dirs, not "
                        f"<shape>N-<texture>M.png images: point root at the dir "
                        f"that holds the <shape>/ dirs"
                    )
        self._set_classes(sorted(names))

    def info(self) -> SourceInfo:
        return SourceInfo(
            self.class_names,
            ("shape_label", "texture_label"),
            {"type": "cue_conflict", "root": str(self.root.resolve())},
        )

    def tasks(self, selector: str) -> list[tuple[str, str]]:
        return [
            (selector, name)
            for name in self.class_names
            if (self._split_dir(selector) / name).is_dir()
        ]

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
            why = (
                "name is not <shape>N-<texture>M.png"
                if not m
                else f"shape {m['shape']!r} is not its dir {shape_dir!r}"
                if m["shape"] != shape_dir
                else f"texture {m['texture']!r} is not a class"
            )
            yield RawExample(id=rel, source=str(path), error=("bad_name", why))
            return
        shape = index[shape_dir]
        yield read_file(
            path,
            str(path),
            rel,
            label=(shape,),
            shape_label=shape,
            texture_label=index[m["texture"]],
        )
