"""The simulator is tooling: the product's core never imports it, and without its extra
(``trustme``) only ``demo`` and ``simulator`` stop, with the install hint."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
from conftest import ROOT

CORE = sorted((ROOT / "receiver").glob("*.py"))


def _imported_modules(path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names.add(base)
            names.update(f"{base}.{alias.name}" if node.module else f"{base}{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.name)
def test_no_core_module_imports_the_simulator_at_its_top(path):
    if path.name == "cli.py":  # loads it inside the demo and simulator commands only (checked below)
        return
    assert not {n for n in _imported_modules(path) if "simulator" in n or n == "trustme"}


def test_loading_every_core_module_loads_neither_the_simulator_nor_trustme():
    modules = ", ".join(f"receiver.{p.stem}" for p in CORE if p.stem != "__init__")
    code = (
        f"import sys, {modules}\n"
        "leaked = sorted(m for m in sys.modules if m.startswith('receiver.simulator') or m == 'trustme')\n"
        "print(leaked)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("args", [["demo", "--once"], ["simulator", "--port", "0"]])
def test_without_trustme_demo_and_simulator_exit_2_with_the_install_hint(args):
    code = (
        "import sys\nsys.modules['trustme'] = None  # as if not installed\n"
        "from receiver.cli import main\n"
        f"sys.argv = ['pve-janitor'] + {args!r}\nmain()"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "install pve-janitor[simulator]" in proc.stderr
    assert "Traceback" not in proc.stderr
