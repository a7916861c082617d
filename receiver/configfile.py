"""The TOML settings file named by ``CLEANUP_CONFIG``: read safely, keys checked by name.

The path comes from the environment, so it may name anything: only a regular file of at
most :data:`CONFIG_FILE_MAX_BYTES` is read, and every other answer is a problem that
names the variable, never an exception.  Keys are the variable names, in any case.
"""

from __future__ import annotations

import os
import stat
import sys
from typing import Any

from .variables import TABLE, did_you_mean

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CONFIG_FILE_MAX_BYTES = 1 << 20  # a settings file is a few lines; this is only a bound on reading

_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class NotARegularFile(Exception):
    """A path that cannot be a small file to read (a directory, a FIFO, a device, too large); the message says why."""


class FileTooLarge(NotARegularFile):
    """A regular file larger than the caller's bound."""


def _require_regular(mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = next((kind for test, kind in _FILE_KINDS if test(mode)), "something else")
        raise NotARegularFile(f"is {kind}, not a regular file")


def read_small_file(path: str, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``, promptly.

    The path comes from the environment: a FIFO without a writer would block ``open`` for
    ever, /dev/zero would fill memory.  So: stat before opening (opening some devices does
    something), then open without blocking and check again on the open file, the one that
    is read.  Raises OSError or NotARegularFile.
    """
    _require_regular(os.stat(path).st_mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as fh:
        _require_regular(os.fstat(fd).st_mode)
        raw = fh.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise FileTooLarge(f"is larger than {max_bytes} bytes")
    return raw


def read_toml(path: str) -> tuple[dict[str, Any], list[str]]:
    """(raw values by variable name, problems) of the settings file at ``path``."""
    if "\0" in path:
        return {}, [f"CLEANUP_CONFIG: cannot read {path!r}: not a usable path"]
    try:
        raw = read_small_file(path, CONFIG_FILE_MAX_BYTES)
    except OSError as exc:
        return {}, [f"CLEANUP_CONFIG: cannot read {path}: {exc.strerror}"]
    except FileTooLarge:
        limit = f"{CONFIG_FILE_MAX_BYTES >> 20} MiB"
        return {}, [f"CLEANUP_CONFIG: {path} is larger than {limit}; a settings file is a few lines"]
    except NotARegularFile as exc:
        return {}, [f"CLEANUP_CONFIG: {path} {exc}"]
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return {}, [f"CLEANUP_CONFIG: {path} is not UTF-8, as TOML must be ({exc.reason} at byte {exc.start})"]
    except tomllib.TOMLDecodeError as exc:
        return {}, [f"CLEANUP_CONFIG: {path} is not valid TOML: {exc}"]
    values, problems = {}, []
    for key, value in data.items():
        name = key.upper()
        if name not in TABLE:
            problems.append(f"CLEANUP_CONFIG: {path} has an unknown setting {key!r}{did_you_mean(name, TABLE)}")
            continue
        values[name] = value
    return values, problems
