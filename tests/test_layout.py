"""The layout rule: the library never imports an application.

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


def test_the_model_does_not_import_run_configuration():
    for p in (PACKAGE / "model").rglob("*.py"):
        targets = {t for _, t in _imports(p)}
        assert not any(t.startswith("regionmed.apps.train") for t in targets), p


def test_no_source_folder_is_named_like_build_output():
    skipped = {"build", "dist", "out", "output", "target"}
    named = [p for p in PACKAGE.rglob("*") if p.is_dir() and p.name in skipped]
    assert not named, named


def test_eval_primitives_have_no_import_cycle():
    graph = {}
    for p in (PACKAGE / "eval").glob("*.py"):
        graph[_module_name(p)] = {t for _, t in _imports(p) if t.startswith("regionmed.eval.")}
    graph = {m: {t for t in deps if t in graph} for m, deps in graph.items()}

    def reaches(start, goal, seen=()):
        return any(d == goal or (d not in seen and reaches(d, goal, (*seen, d))) for d in graph[start])

    cycles = [m for m in graph if reaches(m, m)]
    assert not cycles, cycles


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
