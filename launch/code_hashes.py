"""Which of this repo's source files a stage depends on, and their hashes.

Choice (documented in README "Running the pipeline"): a stage's sources are the *static import
closure* of its module inside the repo. Starting from the stage module's file we parse every
`import x.y` / `from x import y` / `from . import y` (at any nesting level, so lazy imports inside
functions count), keep the modules that resolve to a file under the repo root, add the
`__init__.py` of every package on their path (importing `a.b.c` executes them), and recurse. Files
are read, never imported, so planning stays cheap and a syntax error in a stage's code is reported
by the stage, not by the planner.

Not seen by the walk: modules imported by computed strings (`importlib.import_module(name)`) and
non-Python files a stage reads (label maps, templates). A stage lists the latter as
`Stage.extra_sources` globs.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path


def module_file(root: Path, module: str) -> Path | None:
    """The file that defines `module` under `root` (package `__init__.py` or `.py`), if any."""
    base = root.joinpath(*module.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _package_of(module: str, path: Path) -> str:
    """The package that relative imports inside `module` (defined at `path`) resolve against."""
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def import_statements(module: str, path: Path) -> list[tuple[str, list[str]]]:
    """Every import statement of `path` as (absolute base module, imported names): `import a.b` is
    ("a.b", []), `from a import b, c` is ("a", ["b", "c"]); relative imports resolved."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    package = _package_of(module, path)
    statements: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            statements.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                keep = len(parts) - (node.level - 1)
                if keep < 0:
                    continue  # relative import beyond the top level: Python would fail too
                base = ".".join(parts[:keep])
                base = ".".join(p for p in (base, node.module or "") if p)
            else:
                base = node.module or ""
            statements.append((base, [alias.name for alias in node.names if alias.name != "*"]))
    return statements


def _imported_modules(module: str, path: Path) -> set[str]:
    """Absolute names of every module `path` may import (candidates; non-local ones included)."""
    names: set[str] = set()
    for base, imported in import_statements(module, path):
        if base:
            names.add(base)
        # `from pkg import name` imports the submodule pkg.name when one exists.
        names.update(f"{base}.{name}" if base else name for name in imported)
    return names


def import_closure(root: Path, module: str) -> list[Path]:
    """Files under `root` that importing `module` may execute (sorted, module itself included)."""
    root = root.resolve()
    start = module_file(root, module)
    if start is None:
        raise FileNotFoundError(f"module {module!r} has no source file under {root}")
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = module_file(root, name)
        if path is None:
            continue  # third-party / stdlib module, or an attribute rather than a module
        seen[name] = path
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages
        todo.extend(_imported_modules(name, path))
    return sorted(set(seen.values()))


def hash_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def source_hashes(root: Path, module: str, extra_globs: tuple[str, ...] = ()) -> dict[str, str]:
    """{path relative to root: sha256} for the stage module's import closure + extra globs."""
    root = root.resolve()
    files = set(import_closure(root, module))
    for pattern in extra_globs:
        matched = [p for p in root.glob(pattern) if p.is_file()]
        if not matched:
            raise FileNotFoundError(f"extra source glob {pattern!r} matches no file under {root}")
        files.update(p.resolve() for p in matched)
    return {p.relative_to(root).as_posix(): hash_file(p) for p in sorted(files)}
