"""Print constraints.txt: the versions of pve-janitor's dependencies installed in this venv.

Run by ``make constraints`` after a deliberate upgrade that the tests passed with.  Only the
project's tree is pinned (pyproject.toml's requirements with every extra, and theirs, recursively), not
whatever else the venv holds; ``pip install -c constraints.txt`` then installs exactly these.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure() -> dict[str, str]:
    """Canonical name -> installed version, for every distribution the project pulls in."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    top = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    found: dict[str, str] = {}
    todo: list[tuple[str, frozenset[str]]] = []
    for line in top:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate():
            todo.append((req.name, frozenset(req.extras)))
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        if (canonical(name), extras) in seen:
            continue
        seen.add((canonical(name), extras))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an extra's package this venv does not have (py-spy of `bench`): not pinned
        found[canonical(name)] = dist.version
        for line in dist.requires or ():
            req = Requirement(line)
            env = default_environment()
            if any(req.marker is None or req.marker.evaluate({**env, "extra": e}) for e in extras or {""}):
                todo.append((req.name, frozenset(req.extras)))
    return found


def main() -> None:
    print("# The versions pve-janitor is tested with (`make constraints` writes this file from the")
    print("# venv the tests passed in). install.sh and `make venv` install with `-c constraints.txt`.")
    for name, version in sorted(closure().items()):
        print(f"{name}=={version}")


if __name__ == "__main__":
    main()
