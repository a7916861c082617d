"""The module table of docs/architecture.md is the house plan; the code is held to it.

Every module of ``receiver/`` is listed once, and a module imports (at run time) only
modules listed above it: so the import graph has no cycles and no arrow runs back up.
Imports needed only for annotations sit under ``TYPE_CHECKING``; the core never imports
the simulator at module level.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "receiver"
DOC = ROOT / "docs" / "architecture.md"
SHARED = {"model", "config"}  # the plain data every layer may import, for a type or not


def documented_order() -> list[str]:
    section = DOC.read_text(encoding="utf-8").split("## Modules", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| [a-zA-Z]+ \| `(\w+)\.py` \|", section, re.M)


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            inside.update(id(n) for n in ast.walk(node))
    return inside


def runtime_imports(path: Path) -> set[str]:
    """The package modules ``path`` imports at module level, outside ``TYPE_CHECKING``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    hidden = _type_checking_nodes(tree)
    found: set[str] = set()
    for node in tree.body:
        if id(node) in hidden or not isinstance(node, ast.ImportFrom) or node.level != 1:
            continue
        if node.module:
            found.add(node.module.split(".")[0])
        else:
            found.update(alias.name for alias in node.names)
    return found - {"__init__"}


def annotation_only_imports(path: Path) -> set[str]:
    """Package modules imported at run time whose names are used only in annotations."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    hidden = _type_checking_nodes(tree)
    in_annotations: set[int] = set()
    for node in ast.walk(tree):
        annotations: list[ast.expr] = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args
            every = arguments.posonlyargs + arguments.args + arguments.kwonlyargs
            every += [a for a in (arguments.vararg, arguments.kwarg) if a is not None]
            annotations += [a.annotation for a in every if a.annotation is not None]
            if node.returns is not None:
                annotations.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        for annotation in annotations:
            in_annotations.update(id(n) for n in ast.walk(annotation))
    module_of: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module and id(node) not in hidden:
            for alias in node.names:
                module_of[alias.asname or alias.name] = node.module.split(".")[0]
    uses: dict[str, list[bool]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in module_of:
            uses.setdefault(module_of[node.id], []).append(id(node) in in_annotations)
    return {module for module, flags in uses.items() if all(flags)} - SHARED


def product_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def test_the_module_table_lists_every_module_once():
    order = documented_order()
    assert len(order) == len(set(order)), f"listed twice: {[m for m in order if order.count(m) > 1]}"
    assert sorted(order) == sorted(p.stem for p in product_modules())


@pytest.mark.parametrize("path", product_modules(), ids=lambda p: p.stem)
def test_a_module_imports_only_modules_listed_above_it(path):
    order = documented_order()
    if path.stem not in order:
        pytest.fail(f"{path.stem}.py is not in the module table of docs/architecture.md")
    below = set(order[order.index(path.stem) :])
    wrong = sorted(runtime_imports(path) & below)
    assert not wrong, f"{path.stem}.py imports {wrong}, listed at or below it in docs/architecture.md"


@pytest.mark.parametrize("path", product_modules(), ids=lambda p: p.stem)
def test_no_module_imports_another_only_for_a_type(path):
    assert annotation_only_imports(path) == set()


@pytest.mark.parametrize("path", product_modules(), ids=lambda p: p.stem)
def test_the_core_never_imports_the_simulator_at_module_level(path):
    assert "simulator" not in runtime_imports(path)


def test_the_checks_see_what_they_look_for(tmp_path):
    """The helpers above find a run-time import, a type-only import and a TYPE_CHECKING one."""
    module = tmp_path / "sample.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "from .table import PlatformTable\n"
        "from .db import chunks\n"
        "from .model import Row\n"
        "if TYPE_CHECKING:\n"
        "    from .lease import Lease\n"
        "def f(t: PlatformTable, r: Row, lease: Lease) -> None:\n"
        "    chunks([r])\n",
        encoding="utf-8",
    )
    assert runtime_imports(module) == {"table", "db", "model"}
    assert annotation_only_imports(module) == {"table"}
