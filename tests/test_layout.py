"""The layout rules: the library never imports an application, and no module imports itself
back through others (no import cycle anywhere in the package).

Library: every module of ``regionmed`` outside ``regionmed.apps`` (model, data,
losses, the training task, optimisation, distributed helpers, evaluation
primitives). Applications: ``regionmed.apps.*``. The check reads every import
statement (top level and inside functions) of every library module, so a lazy
import inside a function counts too. ``regionmed/__main__.py`` is the command's
entry point, not library code.
"""

from __future__ import annotations

import ast
from pathlib import Path

import regionmed

PACKAGE = Path(regionmed.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return found


def _library_files() -> list[Path]:
    apps = PACKAGE / "apps"
    return [p for p in PACKAGE.rglob("*.py") if apps not in p.parents and p.name != "__main__.py"]


def test_library_never_imports_an_application():
    files = _library_files()
    assert len(files) > 15  # the walk found the library
    offences = [
        f"{p.relative_to(PACKAGE.parent)}:{line} imports {target}"
        for p in files
        for line, target in _imports(p)
        if target == "regionmed.apps" or target.startswith("regionmed.apps.")
    ]
    assert not offences, "\n".join(offences)


def test_the_model_does_not_import_run_configuration_or_the_optimiser():
    for p in (PACKAGE / "model").rglob("*.py"):
        targets = {t for _, t in _imports(p)}
        assert not any(t.startswith(("regionmed.apps.train", "regionmed.optim")) for t in targets), p


def test_no_source_folder_is_named_like_build_output():
    skipped = {"build", "dist", "out", "output", "target"}
    named = [p for p in PACKAGE.rglob("*") if p.is_dir() and p.name in skipped]
    assert not named, named


def _import_graph() -> dict[str, set[str]]:
    """Module → the regionmed modules it imports, from every import statement of the package
    (top level and inside functions alike: an import inside a function does not hide an edge)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: {t for _, t in _imports(p) if t in files and t != m} for m, p in files.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_check_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_anywhere_in_the_package():
    graph = _import_graph()
    assert len(graph) > 60 and "regionmed.model.clip" in graph and "regionmed.apps.curation.images" in graph
    assert "regionmed.model.weights" in graph["regionmed.model.clip"]  # the walk sees the package's own imports
    cycles = _cycles(graph)
    assert not cycles, "import cycles (counting imports inside functions): " + "; ".join(" <-> ".join(c) for c in cycles)


def test_every_deliberate_error_shares_one_base():
    from regionmed.errors import RegionmedError

    classes = []
    for p in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and node.name.endswith(("Error", "Reject")):
                classes.append((_module_name(p), node.name))
    assert len(classes) >= 10
    import importlib

    for module, name in classes:
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, RegionmedError), f"{module}.{name}"
