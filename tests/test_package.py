"""The package: every import declared, the files it carries, and a wheel that holds the whole product.

The slow test builds a wheel from a copy of the tree, installs it with the tested versions
(constraints.txt) into a fresh venv outside the checkout, and runs what an operator would:
``pve-janitor hookscript --path`` / ``--print`` and ``pve-janitor demo --once``.
"""

from __future__ import annotations

import ast
import functools
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

import pytest
from conftest import ROOT, run_cli
from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from receiver.config import load_settings, without_settings
from receiver.shipped import EXAMPLES, HOOKSCRIPT, UNIT
from receiver.variables import TABLE

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
CHECKOUT_HOOK = ROOT / "hookscript" / "pve-janitor-hook"


def _names(requirements: list[str]) -> set[str]:
    return {Requirement(r).name.lower().replace("_", "-") for r in requirements}


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """Third-party top-level modules ``path`` imports: (at module level, anywhere)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top: set[str] = set()
    every: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found = {n.split(".")[0] for n in names} - set(sys.stdlib_module_names) - {"receiver"}
        every |= found
        if node in tree.body:
            top |= found
    return top, every


@functools.cache
def _owners() -> Mapping[str, list[str]]:
    return metadata.packages_distributions()


def _distributions(modules: set[str]) -> set[str]:
    owners = _owners()
    return {d.lower().replace("_", "-") for m in modules for d in owners.get(m, [m])}


@pytest.mark.parametrize(
    "path", sorted((ROOT / "receiver").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT / "receiver"))
)
def test_every_imported_package_is_declared(path: Path) -> None:
    core = _names(PROJECT["dependencies"])
    extras = {name: _names(reqs) for name, reqs in PROJECT["optional-dependencies"].items()}
    top, every = _imports(path)
    if "simulator" in path.parts:  # tooling: its own extra may bring what it needs
        assert _distributions(every) <= core | extras["simulator"], path
    else:  # the product: what it imports at the top is always installed; a driver loaded lazily has its extra
        assert _distributions(top) <= core, path
        assert _distributions(every) <= core | extras["postgres"] | extras["mysql"], path


def test_click_and_werkzeug_are_declared_not_borrowed_from_flask() -> None:
    assert {"click", "werkzeug"} <= _names(PROJECT["dependencies"])


def test_the_constraints_pin_every_core_dependency() -> None:
    pinned = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pinned[name] = version
    for line in PROJECT["dependencies"]:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate():
            name = req.name.lower().replace("_", "-")
            assert name in pinned, name
            assert req.specifier.contains(pinned[name]), f"{name}=={pinned[name]} outside {req.specifier}"


def test_the_package_carries_the_hookscript_the_unit_and_examples() -> None:
    assert HOOKSCRIPT.is_file() and os.access(HOOKSCRIPT, os.X_OK)
    assert HOOKSCRIPT.read_bytes() == CHECKOUT_HOOK.read_bytes()  # one copy, edited in hookscript/
    assert "ExecStart=/opt/pve-janitor/venv/bin/pve-janitor serve" in UNIT.read_text().splitlines()
    assert [p.name for p in EXAMPLES] == ["janitor.env.example", "janitor.toml.example", "hook.conf.example"]
    assert all(p.is_file() for p in EXAMPLES)


def test_the_example_settings_are_settings() -> None:
    env_example, toml_example, hook_example = EXAMPLES
    names = set(TABLE)
    for line in env_example.read_text().splitlines():
        key = line.lstrip("#").partition("=")[0]
        if "=" in line and key.isupper() and " " not in key:
            assert key in names, key
    env = without_settings(os.environ) | {"CLEANUP_CONFIG": str(toml_example), "PVE_TOKEN_VALUE": "x"}
    assert load_settings(env=env).table == "apps"
    keys = {line.partition("=")[0] for line in hook_example.read_text().splitlines() if "=" in line}
    assert keys == {"URL", "SECRET", "TIMEOUT", "SPOOL_DIR"}


def test_hookscript_command_prints_its_path_or_its_text() -> None:
    env = without_settings(os.environ)
    path = run_cli(["hookscript", "--path"], env)
    assert path.code == 0 and path.out == f"{HOOKSCRIPT}\n"
    assert run_cli(["hookscript"], env).out == path.out  # --path is the default
    text = subprocess.run([*_cli(), "hookscript", "--print"], env=env, capture_output=True, timeout=60)
    assert text.returncode == 0 and text.stdout == CHECKOUT_HOOK.read_bytes()


def _cli() -> list[str]:
    from receiver.simulator.launch import cli_command

    return cli_command()


# --- a wheel, installed outside the checkout ----------------------------------------

BUILD_WARNINGS = ("Deprecat", "BuildBackendWarning", "SetuptoolsWarning", "is absent from the `packages`")


def _offline(output: str) -> bool:
    return any(
        s in output for s in ("NewConnectionError", "Temporary failure in name resolution", "Network is unreachable")
    )


@pytest.mark.slow
def test_a_wheel_installs_the_whole_product_and_the_demo_runs_from_it(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "constraints.txt"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("receiver", "hookscript"):
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    build = subprocess.run(
        [*pip, "wheel", "--no-deps", "-v", str(src), "-w", str(tmp_path / "wheels")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    if build.returncode != 0 and _offline(build.stdout + build.stderr):
        pytest.skip("building a wheel needs setuptools from the package index, which does not answer")
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    for warning in BUILD_WARNINGS:
        assert warning not in build.stdout + build.stderr, warning
    (wheel,) = (tmp_path / "wheels").glob("pve_janitor-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        hook = zf.getinfo("receiver/data/pve-janitor-hook")
        assert hook.external_attr >> 16 & 0o111, "the hookscript is executable in the wheel"
        assert zf.read(hook) == CHECKOUT_HOOK.read_bytes()  # the file, not a link
        assert {
            "receiver/data/pve-janitor.service",
            "receiver/data/janitor.env.example",
            "receiver/templates/ui/base.html",  # the dashboard's templates
            "receiver/migrations/versions/0004_reservations_coverage.py",
        } <= set(zf.namelist())

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = without_settings(os.environ)
    env.pop("PYTHONPATH", None)
    install = subprocess.run(
        [str(venv / "bin/python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
        + ["-c", str(ROOT / "constraints.txt"), f"{wheel}[simulator]"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    if install.returncode != 0 and _offline(install.stdout + install.stderr):
        pytest.skip("installing the wheel's dependencies needs the package index, which does not answer")
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    command = venv / "bin" / "pve-janitor"
    found = subprocess.run([command, "hookscript", "--path"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    hook_path = Path(found.stdout.strip())
    assert hook_path.is_relative_to(venv) and hook_path.is_file() and not hook_path.is_symlink()
    assert os.access(hook_path, os.X_OK)
    printed = subprocess.run([command, "hookscript", "--print"], capture_output=True, env=env, cwd=tmp_path)
    assert printed.stdout == CHECKOUT_HOOK.read_bytes()
    data = hook_path.parent
    assert (data / "pve-janitor.service").read_text() == UNIT.read_text()
    assert all((data / p.name).read_text() == p.read_text() for p in EXAMPLES)

    demo = subprocess.run(
        [command, "demo", "--once"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180
    )
    assert demo.returncode == 0, demo.stdout[-4000:] + demo.stderr[-2000:]
    assert "Every step happened." in demo.stdout
