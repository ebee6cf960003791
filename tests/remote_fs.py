"""A local stand-in for a bucket: `ram://` URIs as `epath.Path`s on tf.io.gfile's RAM filesystem.

Why this one: with TensorFlow installed (prepare / launcher machines), epath sends `gs://` to its
tf.io.gfile backend, so `gs://b/x` and `ram://b/x` take the same code path down to the gfile
filesystem plugin (GCS vs. TF's in-process RAM filesystem, a real non-local filesystem with its
own listdir/rename/rmtree semantics). epath has no `ram://` of its own; the class below is
`epath.register_path_cls`'d and differs from epath's `gs://` class only in mapping the scheme to
the tf backend (it reads etils' gpath/backend internals, etils 1.15). What it does NOT cover:
the fsspec backend (gcsfs, used where TF is absent) and tensorstore's gcs driver (Orbax's array
I/O, reached only by `gs://`).
"""

from __future__ import annotations

import os
import uuid

from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath

SCHEME = "ram"


@epath.register_path_cls(f"{SCHEME}://")
class RamPath(gpath.PosixGPath):
    """`ram://bucket/key` through epath's tf.io.gfile backend (like `gs://` with TF installed)."""

    def __new__(cls, *parts):
        full = "/".join(os.fspath(p) for p in parts)
        if full.startswith(f"{SCHEME}://"):
            full = f"/{SCHEME}/" + full[len(SCHEME) + 3 :]
        return super().__new__(cls, full)

    @property
    def _uri_scheme(self):
        return SCHEME if len(self.parts) >= 2 and self.parts[:2] == ("/", SCHEME) else None

    @property
    def _backend(self):
        return epath_backend.tf_backend


def bucket() -> str:
    """A fresh, empty `ram://` prefix (the RAM filesystem lives for the whole process)."""
    return f"{SCHEME}://test-{uuid.uuid4().hex[:12]}"
