"""Local or remote (gs://, s3://, az://) paths: the one place that opens, copies and commits them.

A local path (no scheme, or file://) is a `pathlib.Path` and behaves exactly as before. A remote
URI is an etils `epath.Path` (tf.io.gfile when TensorFlow is installed, else fsspec: gcsfs/s3fs),
which Orbax also takes as is (its arrays then go through tensorstore's gcs driver). A scheme
neither handles is a one-line error, never a local directory named `xx:` (`pathlib.Path("gs://b")`
is the relative path `gs:/b`, so nothing here calls `Path()` on user input).

Committing a directory (a stage output, a prepared split), docs/DESIGN.md §2.4:
- local: it is built in a sibling temp dir and renamed into place (atomic on one filesystem);
- remote: object stores have no directory rename. The dir is built elsewhere (a local staging
  dir, or a temp prefix in the bucket), every file is copied into the final prefix, and the
  marker files (`_SUCCESS` for a stage, `manifest.json` for a split) are written LAST. Readers
  trust a dir only when its marker is there; replacing a dir deletes its marker first. A single
  object write is atomic on GCS/S3 (readers see the old object or the whole new one).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_CHUNK = 8 << 20


class UnsupportedPath(ValueError):
    """A URI scheme that no installed filesystem library handles."""


class ChecksumMismatch(OSError):
    """A downloaded file does not have the sha256 its manifest records."""


def scheme(path: Any) -> str | None:
    match = _SCHEME.match(os.fspath(path))
    return match[1].lower() if match else None


def is_remote(path: Any) -> bool:
    return scheme(path) not in (None, "file")


def as_path(path: Any, where: str = "") -> Any:
    """`pathlib.Path` for a local path, `epath.Path` for a remote URI; UnsupportedPath otherwise.

    `where` names the option in the error (e.g. "--out")."""
    text = os.fspath(path)
    kind = scheme(text)
    if kind is None:
        return path if isinstance(path, Path) else Path(text)
    if kind == "file":
        return Path(text[len("file://") :])
    from etils import epath  # lazy: local-only runs never import it

    # epath turns some URIs it has no backend for into a local path ("xx:/bucket") and raises
    # KeyError on others: check the round trip.
    rest = re.sub("/+", "/", text[len(kind) + 3 :]).rstrip("/")
    try:
        result = epath.Path(text)
    except KeyError:
        result = None
    if result is None or os.fspath(result) != f"{kind}://{rest}":
        raise UnsupportedPath(
            f"{where + ': ' if where else ''}{text}: unsupported storage scheme "
            f"'{kind}://' (epath handles gs://, s3://, az://; or give a local or "
            "mounted path, e.g. a gcsfuse mount)"
        )
    return result


def resolve(path: Any, where: str = "") -> Any:
    """`as_path`, made absolute (symlinks resolved) when local."""
    p = as_path(path, where)
    return p.resolve() if isinstance(p, Path) else p


def absolute(path: Any, where: str = "") -> Any:
    """`as_path`, made absolute (symlinks kept) when local."""
    p = as_path(path, where)
    return p.absolute() if isinstance(p, Path) else p


def join(base: Any, *parts: str) -> str:
    """`base/part/...` as a string (what Beam DoFns and manifests carry), local or remote."""
    return os.fspath(as_path(base).joinpath(*parts))


def exists(path: Any) -> bool:
    return as_path(path).exists()


def makedirs(path: Any) -> None:
    as_path(path).mkdir(parents=True, exist_ok=True)


def remove(path: Any) -> None:
    as_path(path).unlink(missing_ok=True)


def rmtree(path: Any) -> None:
    """Deletes a directory tree; a missing one is fine."""
    p = as_path(path)
    if isinstance(p, Path):
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists():
        with contextlib.suppress(FileNotFoundError):  # another process removed it meanwhile
            p.rmtree()


def mtime(path: Any) -> float:
    st = as_path(path).stat()
    return st.st_mtime if hasattr(st, "st_mtime") else st.mtime


def write_text_atomic(path: Any, text: str) -> None:
    """Local: temp file + rename. Remote: one object write (atomic for readers on GCS/S3)."""
    p = as_path(path)
    if isinstance(p, Path):
        tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            tmp.write_text(text)
            os.replace(tmp, p)
        finally:
            tmp.unlink(missing_ok=True)
    else:
        with p.open("w") as f:
            f.write(text)


def copy_file(src: Any, dst: Any) -> None:
    """Streams one file between any two backends (local -> bucket is an upload)."""
    s, d = as_path(src), as_path(dst)
    # Object stores need no parent "dirs", but listing through some filesystems (tf.io.gfile's
    # RAM fs, local disk) finds only files under created ones.
    d.parent.mkdir(parents=True, exist_ok=True)
    with s.open("rb") as fin, d.open("wb") as fout:
        shutil.copyfileobj(fin, fout, _CHUNK)


def move_file(src: Any, dst: Any) -> None:
    """A rename on one backend (server-side copy + delete on GCS), else copy + delete."""
    s, d = as_path(src), as_path(dst)
    if isinstance(s, Path) and isinstance(d, Path):
        os.replace(s, d)
    elif type(s) is type(d):
        d.parent.mkdir(parents=True, exist_ok=True)
        s.replace(d)
    else:
        copy_file(s, d)
        s.unlink()


def files_under(root: Any) -> list[str]:
    """Relative paths (with '/') of every file below `root`, sorted."""
    p = as_path(root)
    out = []
    for top, _, names in os.walk(p) if isinstance(p, Path) else p.walk():
        rel = os.path.relpath(os.fspath(top), os.fspath(p))
        out.extend(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/") for name in names)
    return sorted(out)


def install_dir(tmp: Any, final: Any, *, last: Iterable[str] = ()) -> None:
    """Commits a finished directory `tmp` as `final` (see the module doc for the two protocols).

    `last`: marker files (relative to the dir) copied after everything else on a remote
    destination; a local rename makes everything visible at once."""
    t, f = as_path(tmp), as_path(final)
    if isinstance(t, Path) and isinstance(f, Path):
        if f.exists():  # forced or incomplete: swap the old one out, then drop it
            old = f.with_name(f".old-{f.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.rename(f, old)
            os.rename(t, f)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(t, f)
        return
    markers = list(last)
    if f.exists():
        for name in markers:  # readers stop trusting the old dir before any of it changes
            remove(f / name)
        rmtree(f)
    makedirs(f)
    files = files_under(t)
    for rel in [r for r in files if r not in markers] + [m for m in markers if m in files]:
        move_file(t / rel, f / rel)
    rmtree(t)


def file_sha256(path: Any) -> str:
    h = hashlib.sha256()
    with as_path(path).open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fetch(src: Any, dst: Path, *, sha256: str | None = None) -> Path:
    """A local copy of `src` at `dst`, downloaded atomically: into a unique temp name beside `dst`,
    checked against `sha256` when given, then renamed. A partial or corrupt download never sits
    under `dst`'s name; with `sha256`, an existing `dst` is reused only when its digest matches."""
    dst = Path(dst)
    if sha256 is not None and dst.is_file() and file_sha256(dst) == sha256:
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.part-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        h = hashlib.sha256()
        with as_path(src).open("rb") as fin, open(tmp, "wb") as fout:
            while chunk := fin.read(_CHUNK):
                h.update(chunk)
                fout.write(chunk)
        if sha256 is not None and h.hexdigest() != sha256:
            raise ChecksumMismatch(
                f"{os.fspath(src)}: sha256 {h.hexdigest()[:16]}... does not match "
                f"the manifest's {sha256[:16]}..."
            )
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


@contextlib.contextmanager
def local_file(path: Any) -> Iterator[str]:
    """`path` itself when local, else a temporary local copy (deleted on exit): for libraries
    that only open local files (ArrayRecord's reader)."""
    if not is_remote(path):
        yield os.fspath(path)
        return
    with tempfile.TemporaryDirectory(prefix="vit22b-remote-") as tmp:
        yield os.fspath(fetch(path, Path(tmp) / as_path(path).name))


class LocalFile:
    """A local file that becomes `dest` on `commit()`: written in place when `dest` is local,
    else in a private temp dir and uploaded (ArrayRecord's writer needs local files; on Dataflow
    each worker writes its shard to local disk and copies it to the bucket)."""

    def __init__(self, dest: str):
        self.dest = dest
        self._tmpdir = None if not is_remote(dest) else tempfile.mkdtemp(prefix="vit22b-shard-")
        self.path = (
            dest if self._tmpdir is None else os.path.join(self._tmpdir, os.path.basename(dest))
        )

    def commit(self) -> None:
        if self._tmpdir is not None:
            copy_file(self.path, self.dest)
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
