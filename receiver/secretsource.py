"""Secrets read from files: ``<NAME>_FILE`` variables and systemd credentials.

A secret given in the environment sits in the env file and in ``/proc/<pid>/environ``;
one read from a file can stay root-owned (``LoadCredential=`` hands the service a copy
only it can read).  Each secret variable may therefore come, instead, from the file named
by ``<NAME>_FILE`` or from the systemd credential named in
:data:`receiver.variables.CREDENTIALS` (``$CREDENTIALS_DIRECTORY/<name>``).  Two of those
for one secret is a problem, not a precedence rule: which one wins would be a guess.

Problems name the variable and the path, never the content.  A leaf of the base layer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from .configfile import NotARegularFile, read_small_file
from .variables import CREDENTIALS, SECRET_VARIABLES

MAX_SECRET_BYTES = 64 * 1024  # a token is a few dozen bytes; this only bounds the read


def secrets_from_files(env: Mapping[str, str]) -> tuple[dict[str, tuple[str, str, str]], list[str]]:
    """({variable: (value, source kind, source detail)}, problems) for each secret read from a file.

    The kind is ``environment`` (the detail names the ``_FILE`` variable and its path) or
    ``credential`` (the detail is the credential's name).  A trailing newline is not part
    of the secret (``echo secret > file`` writes one).
    """
    found: dict[str, tuple[str, str, str]] = {}
    problems: list[str] = []
    credentials_dir = env.get("CREDENTIALS_DIRECTORY", "")
    for name in SECRET_VARIABLES:
        file_variable = f"{name}_FILE"
        candidates = []  # (kind, detail, path)
        if env.get(file_variable):
            candidates.append(("environment", f"{file_variable}={env[file_variable]}", env[file_variable]))
        if credentials_dir:
            path = os.path.join(credentials_dir, CREDENTIALS[name])
            if "\0" not in path and os.path.lexists(path):
                candidates.append(("credential", CREDENTIALS[name], path))
        if not candidates:
            continue
        given = [name] * bool(env.get(name)) + [_given_as(name, kind, detail) for kind, detail, _ in candidates]
        if len(given) > 1:
            problems.append(f"{name} is given {len(given)} ways ({', '.join(given)}): give it one way")
            continue
        kind, detail, path = candidates[0]
        try:
            value = _read_secret(path)
        except ValueError as exc:
            problems.append(f"{_label(name, kind, detail)}: {exc}")
            continue
        found[name] = (value, kind, detail)
    return found, problems


def _given_as(name: str, kind: str, detail: str) -> str:
    return f"{name}_FILE" if kind == "environment" else f"the systemd credential {detail}"


def _label(name: str, kind: str, detail: str) -> str:
    return f"{name}_FILE" if kind == "environment" else f"{name} (systemd credential {detail})"


def _read_secret(path: str) -> str:
    """The secret in the file at ``path``, or ValueError saying why not (never quoting the file)."""
    if "\0" in path:
        raise ValueError(f"cannot read {path!r}: not a usable path")
    try:
        raw = read_small_file(path, MAX_SECRET_BYTES)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    except NotARegularFile as exc:
        raise ValueError(f"cannot read {path}: it {exc}") from None
    # surrogateescape: the exact bytes of a secret that is not UTF-8, as from the environment
    value = raw.decode("utf-8", "surrogateescape").rstrip("\r\n")
    if not value.strip():
        raise ValueError(f"is empty: {path}")
    return value
