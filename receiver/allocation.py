"""What an allocation asks for, checked, and why one reserved nothing.

The words and limits the allocator (:mod:`receiver.allocator`), its HTTP routes
(:mod:`receiver.api_allocations`) and ``pve-janitor allocate`` share: a :class:`Request`,
a hostname as a DNS name, port counts per configured column, hostname suffixes, and
:class:`Refused` with its HTTP status.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # types only: no import at run time
    from .config import Settings

MAX_PORTS = 32  # ports per column in one allocation
MAX_SUFFIX = 99  # hostname, hostname-2 ... hostname-99
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")

# Why an allocation reserved nothing -> HTTP status.
STATUS = {
    "invalid": 400,
    "hostname_taken": 409,
    "vmid_range_exhausted": 409,
    "port_range_exhausted": 409,
    "contention": 503,
    "proxmox": 503,
}


class Refused(Exception):
    """Nothing was reserved; ``kind`` (a key of :data:`STATUS`) says why, the message in words."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind

    @property
    def status(self) -> int:
        return STATUS[self.kind]


@dataclass(frozen=True)
class Request:
    """What a caller asks for: always a VMID; a hostname (``suffix``: the first free of name,
    name-2, name-3 ...); ports per column; a label kept with the reservation."""

    hostname: str | None = None
    suffix: bool = False
    ports: int | Mapping[str, int] = field(default_factory=dict)  # see port_counts
    label: str | None = None
    source: str = "http"


def normal_hostname(text: str) -> str:
    """A DNS name (RFC 1123 labels, at most 253 characters), in lower case: DNS names are
    case-insensitive, so ``Web`` and ``web`` are one reservation."""
    name = text.strip().lower()
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise Refused(
            "invalid",
            f"hostname {text[:80]!r} is not a DNS name (letters, digits and '-', dot-separated labels "
            "of at most 63 characters, 253 in all)",
        )
    return name


def port_counts(settings: Settings, spec: int | Mapping[str, int] | None) -> dict[str, int]:
    """How many ports of each column: a count (every column of ``CLEANUP_ALLOCATOR_PORTS``
    gets that many) or a mapping column -> count (only the columns named)."""
    if spec is None:
        return {}
    ranges = {column for column, _, _ in settings.allocator_ports}
    if isinstance(spec, Mapping):
        counts = dict(spec)
        unknown = sorted(set(counts) - ranges)
        if unknown:
            raise Refused(
                "invalid",
                f"no port range for {', '.join(map(repr, unknown))}: CLEANUP_ALLOCATOR_PORTS has "
                f"{', '.join(sorted(ranges)) or 'none'}",
            )
    else:
        if spec and not ranges:
            raise Refused("invalid", "ports asked for, but CLEANUP_ALLOCATOR_PORTS names no port range")
        counts = {column: spec for column in ranges}
    for column, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_PORTS:
            raise Refused("invalid", f"ports: the count for {column} must be a whole number 0-{MAX_PORTS}")
    return {column: n for column, n in counts.items() if n}


def with_suffix(name: str, n: int) -> str:
    """``web.apps.local`` -> ``web-2.apps.local``: the suffix goes on the first label."""
    first, dot, rest = name.partition(".")
    return f"{first}-{n}{dot}{rest}"


def name_candidates(name: str, suffix: bool) -> list[str]:
    """``[name]``, or with ``suffix`` name, name-2 ... name-99 (those that stay DNS names)."""
    candidates = [name]
    if suffix:
        candidates += [c for c in (with_suffix(name, k) for k in range(2, MAX_SUFFIX + 1)) if len(c) <= 253]
        candidates = [c for c in candidates if len(c.split(".", 1)[0]) <= 63]
    return candidates
