"""Import hygiene: no cycles among the repo's modules, and the model's closure free of optimizer and
checkpoint code (the cache hashes closures). `launch` without JAX/Beam/TF: tests/test_dag.py."""

from pathlib import Path

from launch import code_hashes

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("data", "pipelines", "trainer", "eval", "launch", "benchmarks")


def _modules() -> list[str]:
    names = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _local_imports(module: str) -> set[str]:
    """The repo modules `module` imports directly, each named as precisely as possible: `from pkg
    import sub` is an edge to `pkg.sub` when that is a module (else to `pkg`). Parent packages,
    which Python executes implicitly, are not edges."""
    path = code_hashes.module_file(REPO, module)
    if path is None:
        raise FileNotFoundError(f"module {module!r} has no source file under {REPO}")
    edges: set[str] = set()
    for base, imported in code_hashes.import_statements(module, path):
        subs = [f"{base}.{name}" if base else name for name in imported]
        found = [sub for sub in subs if code_hashes.module_file(REPO, sub)]
        if found:
            edges.update(found)
        if len(found) < len(subs) or not imported:  # names that are attributes of `base` itself
            if base and code_hashes.module_file(REPO, base):
                edges.add(base)
    edges.discard(module)
    return edges


def test_the_static_import_graph_has_no_cycle():
    graph = {m: _local_imports(m) for m in _modules()}
    state, cycles = {}, []

    def visit(node, path):
        if state.get(node) == "done":
            return
        if state.get(node) == "open":
            cycles.append(path[path.index(node) :] + [node])
            return
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, path + [node])
        state[node] = "done"

    for module in graph:
        visit(module, [])
    assert not cycles, " | ".join(" -> ".join(c) for c in cycles)


def test_the_model_closure_has_no_optimizer_checkpoint_or_stage_code():
    closure = {
        p.relative_to(REPO).as_posix()
        for p in code_hashes.import_closure(REPO, "trainer.models.vit")
    }
    assert "trainer/models/vit.py" in closure and "trainer/sharding.py" in closure
    for banned in (
        "trainer/optim.py",
        "trainer/checkpoint.py",
        "trainer/loop.py",
        "trainer/pretrain.py",
        "trainer/memory.py",
        "trainer/step.py",
    ):
        assert banned not in closure, banned
    assert not [f for f in closure if f.startswith(("launch/", "eval/", "pipelines/", "data/"))]
