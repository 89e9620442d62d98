"""The code's shape, checked: no import cycles in the training side, the MLflow SDK only behind
its backend, knob names only in the catalog."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from integrations.knobs import Knob

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("integrations", "manager_daemon")
# Recipes log to MLflow as users' scripts do; they are not the library.
RECIPES = ("manager_daemon/demo",)


def _modules(package: str) -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at its top or inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_no_import_cycle_inside_integrations() -> None:
    modules = _modules("integrations")
    edges = {
        name: {m for m in _imports(path) if m in modules} - {name} for name, path in modules.items()
    }
    # A package's __init__ is imported with each of its modules; that is no cycle.
    for name in edges:
        edges[name] = {m for m in edges[name] if not name.startswith(m + ".")}

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in edges[node]:
                if nxt == start:
                    return [*path, start]
                if nxt not in path:
                    stack.append((nxt, [*path, nxt]))
        return None

    cycles = [c for name in edges if (c := cycle_from(name))]
    assert not cycles, f"import cycles: {cycles[:3]}"


@pytest.mark.parametrize(
    ("sdk", "backend"),
    [
        ("mlflow", "integrations.trackers.mlflow_backend"),
        ("wandb", "integrations.trackers.wandb_backend"),
    ],
)
def test_a_tracker_sdk_is_imported_only_by_its_backend(sdk: str, backend: str) -> None:
    offenders = [
        name
        for package in LIBRARY
        for name, path in _modules(package).items()
        if name != backend
        and not str(path.relative_to(ROOT)).startswith(RECIPES)
        and any(m == sdk or m.startswith(f"{sdk}.") for m in _imports(path))
    ]
    assert not offenders


ATTRIBUTE_CALLS = {"getattr", "setattr", "hasattr"}
# Modules that speak to a framework's objects in its own words.
FRAMEWORK_MODULES = {f"integrations/{m}.py" for m in ("hf", "sb3", "torch_hooks", "torch_ops")}


def _string_constants(path: Path) -> list[tuple[int, str]]:
    """String constants in ``path`` other than docstrings and, in the framework modules, the
    framework's own attribute and key names (``getattr(model, "n_epochs")``,
    ``group["weight_decay"]``): knob names follow the frameworks' arguments, so there those
    spell the framework, not the knob."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    in_framework = str(path.relative_to(ROOT)) in FRAMEWORK_MODULES
    for node in ast.walk(tree) if in_framework else ():
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ATTRIBUTE_CALLS:
            skipped |= {id(arg) for arg in node.args[1:2]}
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "get":
            skipped |= {id(arg) for arg in node.args[:1]}
        elif isinstance(node, ast.Subscript):
            skipped.add(id(node.slice))
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in skipped
    ]


def test_knob_names_are_written_only_in_the_catalog() -> None:
    names = {k.value for k in Knob}
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: {value!r}"
        for package in LIBRARY
        for path in _modules(package).values()
        if path != ROOT / "integrations" / "knobs.py"
        and not str(path.relative_to(ROOT)).startswith(RECIPES)
        for line, value in _string_constants(path)
        if value in names
    ]
    assert not offenders
