"""The settings' variables: their names, how a raw value becomes a setting, and which names are ours.

One table maps each variable to its field of :class:`receiver.config.Settings`, its kind and
its minimum; :func:`convert` turns a raw value (a string from the environment, or a TOML
value) into field values or raises ValueError with a message for the user.  A ``CLEANUP_*``
name that is not a variable is a problem (a typo of ``CLEANUP_DRY_RUN`` would delete for
real), and it is answered with the closest real name.

Like :mod:`receiver.config`, a leaf: it imports nothing of the package.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Mapping
from typing import Any

SECRET_VARIABLES = (
    "PVE_TOKEN_VALUE",
    "CLEANUP_HOOK_SECRET",
    "CLEANUP_HOOK_SECRET_PREVIOUS",
    "CLEANUP_ADMIN_TOKEN",
    "CLEANUP_WEBHOOK_SECRET",
    "CLEANUP_ALLOCATOR_TOKEN",
)
# Each secret may instead be read from a file (``<NAME>_FILE``, environment only) or from the
# systemd credential of this name (``LoadCredential=`` in the unit, read from $CREDENTIALS_DIRECTORY).
# The credential names carry a prefix: /etc/credstore is shared by every service of the host.
# Values never quoted in a message: the secrets, and the webhook URLs (a URL may carry a token).
UNQUOTED_VARIABLES = frozenset(SECRET_VARIABLES) | {"CLEANUP_WEBHOOK_URLS"}
SECRET_FILE_VARIABLES = {f"{name}_FILE": name for name in SECRET_VARIABLES}
CREDENTIALS = {
    "PVE_TOKEN_VALUE": "pve-janitor.pve-token-value",
    "CLEANUP_HOOK_SECRET": "pve-janitor.hook-secret",
    "CLEANUP_HOOK_SECRET_PREVIOUS": "pve-janitor.hook-secret-previous",
    "CLEANUP_ADMIN_TOKEN": "pve-janitor.admin-token",
    "CLEANUP_WEBHOOK_SECRET": "pve-janitor.webhook-secret",
    "CLEANUP_ALLOCATOR_TOKEN": "pve-janitor.allocator-token",
}
ACTIONS = ("delete", "mark")
LOG_FORMATS = ("text", "json")  # as receiver.logs.LOG_FORMATS (this module imports nothing of the package)
_TRUE = {"true", "1", "yes"}  # DESIGN.md: true/false/1/0/yes/no, anything else is an error
_FALSE = {"false", "0", "no"}

# Variable name -> (field name, kind, minimum).  Kinds: bool, int, float, str,
# list, action, log_format, verify, host, bind, urls, range, port_ranges.
TABLE: dict[str, tuple[str, str, float | None]] = {
    "CLEANUP_ENABLED": ("enabled", "bool", None),
    "ERROR_RETENTION_HOURS": ("error_retention_hours", "int", 1),
    "GHOST_CLEANUP_ENABLED": ("ghost_cleanup_enabled", "bool", None),
    "CLEANUP_INTERVAL_MINUTES": ("interval_minutes", "int", 5),
    "CLEANUP_DRY_RUN": ("dry_run", "bool", None),
    "DATABASE_URL": ("database_url", "str", None),
    "PVE_HOST": ("pve_host", "host", None),
    "PVE_USER": ("pve_user", "str", None),
    "PVE_TOKEN_NAME": ("pve_token_name", "str", None),
    "PVE_TOKEN_VALUE": ("pve_token_value", "str", None),
    "PVE_VERIFY_SSL": ("pve_verify_ssl", "verify", None),
    "PVE_TIMEOUT": ("pve_timeout", "float", 0.5),
    "CLEANUP_HOOK_SECRET": ("hook_secret", "str", None),
    "CLEANUP_HOOK_SECRET_PREVIOUS": ("hook_secret_previous", "str", None),
    "CLEANUP_ADMIN_TOKEN": ("admin_token", "str", None),
    "CLEANUP_BIND": ("bind_host", "bind", None),
    "CLEANUP_TABLE": ("table", "str", None),
    "CLEANUP_VMID_COLUMN": ("vmid_column", "str", None),
    "CLEANUP_HOSTNAME_COLUMN": ("hostname_column", "str", None),
    "CLEANUP_STATUS_COLUMN": ("status_column", "str", None),
    "CLEANUP_PORT_COLUMNS": ("port_columns", "list", None),
    "CLEANUP_CREATED_COLUMN": ("created_column", "str", None),
    "CLEANUP_UPDATED_COLUMN": ("updated_column", "str", None),
    "CLEANUP_ERROR_STATUSES": ("error_statuses", "list", None),
    "CLEANUP_PROTECTED_STATUSES": ("protected_statuses", "list", None),
    "CLEANUP_GRACE_MINUTES": ("grace_minutes", "int", 0),
    "CLEANUP_ACTION": ("action", "action", None),
    "CLEANUP_MARK_STATUS": ("mark_status", "str", None),
    "CLEANUP_MAX_DELETE_PERCENT": ("max_delete_percent", "int", 1),
    "CLEANUP_STOP_STATUS": ("stop_status", "str", None),
    "CLEANUP_RUNNING_STATUS": ("running_status", "str", None),
    "CLEANUP_WATCH_SECONDS": ("watch_seconds", "int", 10),
    "CLEANUP_WATCH_INTERVAL_SECONDS": ("watch_interval_seconds", "float", 0.1),
    "CLEANUP_TASK_POLL_SECONDS": ("task_poll_seconds", "float", 0.5),
    "CLEANUP_LEASE_SECONDS": ("lease_seconds", "int", 3),
    "CLEANUP_LOG_FORMAT": ("log_format", "log_format", None),
    "CLEANUP_PENDING_HOURS": ("pending_hours", "int", 1),
    "CLEANUP_WEBHOOK_URLS": ("webhook_urls", "urls", None),
    "CLEANUP_WEBHOOK_SECRET": ("webhook_secret", "str", None),
    "CLEANUP_WEBHOOK_FULL_ROW": ("webhook_full_row", "bool", None),
    "CLEANUP_WEBHOOK_VERIFY_SSL": ("webhook_verify_ssl", "verify", None),
    "CLEANUP_WEBHOOK_TIMEOUT_SECONDS": ("webhook_timeout", "float", 0.5),
    "CLEANUP_ALLOCATOR_TOKEN": ("allocator_token", "str", None),
    "CLEANUP_RESERVATION_MINUTES": ("reservation_minutes", "int", 1),
    "CLEANUP_ALLOCATOR_VMIDS": ("allocator_vmids", "range", None),
    "CLEANUP_ALLOCATOR_PORTS": ("allocator_ports", "port_ranges", None),
    "CLEANUP_COVERAGE_RPS": ("coverage_rps", "float", 0.1),
    "CLEANUP_COVERAGE_HOURS": ("coverage_hours", "float", 0.1),
    "CLEANUP_UI_PUBLIC": ("ui_public", "bool", None),
}
VARIABLES = tuple(TABLE)
# Every name pve-janitor reads from the environment: the settings, the files that may hold them.
KNOWN_VARIABLES = frozenset(TABLE) | {"CLEANUP_CONFIG"} | frozenset(SECRET_FILE_VARIABLES)
# Far beyond any sensible value, and small enough that every date, interval and timeout
# computed from them stays in range (a larger one made every sweep fail with OverflowError).
MAXIMUMS = {
    "CLEANUP_MAX_DELETE_PERCENT": 100,
    "ERROR_RETENTION_HOURS": 876_000,  # 100 years
    "CLEANUP_GRACE_MINUTES": 52_560_000,  # 100 years
    "CLEANUP_INTERVAL_MINUTES": 525_600,  # a year
    "CLEANUP_WATCH_SECONDS": 31_536_000,  # a year
    "CLEANUP_LEASE_SECONDS": 86_400,  # a day
    "CLEANUP_WATCH_INTERVAL_SECONDS": 3_600,
    "CLEANUP_TASK_POLL_SECONDS": 3_600,
    "PVE_TIMEOUT": 3_600,
    "CLEANUP_PENDING_HOURS": 8_760,  # a year
    "CLEANUP_WEBHOOK_TIMEOUT_SECONDS": 300,
    "CLEANUP_RESERVATION_MINUTES": 10_080,  # a week
    "CLEANUP_COVERAGE_RPS": 100,
    "CLEANUP_COVERAGE_HOURS": 8_760,  # a year
}
# A name with one of these prefixes is ours: if it is not a setting, it is a typo, and a typo
# of CLEANUP_DRY_RUN would delete for real.  Matched ignoring case (the TOML file ignores it too).
_OWN_PREFIXES = ("CLEANUP_", "GHOST_CLEANUP_", "ERROR_RETENTION_")
# PVE_* is shared with other tools: an unknown one is only worth a warning.  PVE_JANITOR_*
# belongs to the hookscript, which runs elsewhere and reads its own.
_SHARED_PREFIX, _HOOKSCRIPT_PREFIX = "PVE_", "PVE_JANITOR_"
# difflib's default (0.6) finds CLEANUP_BIND "close" to CLEANUP_X: the shared prefix alone
# scores that much.  0.8 keeps real typos (CLEANUP_DRYRUN, CLEANUP_INTERVAL, ERROR_RETENTION_DAYS).
_SUGGESTION_CUTOFF = 0.8


def convert(name: str, raw: Any) -> dict[str, Any]:
    """Turn the raw value of variable ``name`` into field values; raise ValueError with a user message."""
    field_name, kind, _ = TABLE[name]
    if kind == "bool":
        if isinstance(raw, bool):
            return {field_name: raw}
        text = str(raw).strip().lower()
        if text in _TRUE:
            return {field_name: True}
        if text in _FALSE:
            return {field_name: False}
        raise ValueError("must be true/false/1/0/yes/no")
    if kind in ("int", "float"):
        if isinstance(raw, bool):
            raise ValueError("must be a number")
        try:
            value = int(str(raw).strip()) if kind == "int" else float(str(raw).strip())
        except ValueError:
            raise ValueError("must be a whole number" if kind == "int" else "must be a number") from None
        if kind == "float" and not (value == value and abs(value) != float("inf")):
            raise ValueError("must be a finite number")
        return {field_name: value}
    if kind == "list":
        items = raw if isinstance(raw, (list, tuple)) else str(raw).split(",")
        return {field_name: tuple(str(i).strip() for i in items if str(i).strip())}
    if kind == "action":
        text = str(raw).strip().lower()
        if text not in ACTIONS:
            raise ValueError("must be 'delete' or 'mark'")
        return {field_name: text}
    if kind == "log_format":
        text = str(raw).strip().lower()
        if text not in LOG_FORMATS:
            raise ValueError("must be 'text' or 'json'")
        return {field_name: text}
    if kind == "verify":
        if isinstance(raw, bool):
            return {field_name: raw}
        text = str(raw).strip()
        if text.lower() in _TRUE:
            return {field_name: True}
        if text.lower() in _FALSE:
            return {field_name: False}
        if not os.path.isfile(text):
            raise ValueError("must be true/false or the path of a CA bundle that exists")
        return {field_name: text}
    if kind == "host":
        entries = [e.strip() for e in str(raw).split(",")]
        if not any(entries):
            return {"pve_host": "", "pve_endpoints": ()}
        if not all(entries):
            raise ValueError("has an empty entry (a comma-separated list of host or host:port)")
        endpoints = tuple(_split_host_port(e, 8006) for e in entries)
        if len(set(endpoints)) != len(endpoints):
            raise ValueError("names one endpoint twice")
        return {"pve_host": endpoints[0][0], "pve_port": endpoints[0][1], "pve_endpoints": endpoints}
    if kind == "urls":
        items = raw if isinstance(raw, (list, tuple)) else str(raw).split(",")
        urls = tuple(str(i).strip() for i in items if str(i).strip())
        for url in urls:
            _check_url(url)
        if len(set(urls)) != len(urls):
            raise ValueError("names one URL twice")
        return {field_name: urls}
    if kind == "range":
        return {field_name: _range(str(raw), VMID_LIMITS)}
    if kind == "port_ranges":
        ranges = []
        for entry in (e.strip() for e in str(raw).split(",")):
            if not entry:
                continue
            column, sep, span = entry.partition("=")
            if not sep or not column.strip():
                raise ValueError("must be column=low-high entries, comma-separated (public_port=20000-29999)")
            ranges.append((column.strip(), *_range(span, (1, 65535))))
        if len({c for c, _, _ in ranges}) != len(ranges):
            raise ValueError("names one column twice")
        return {field_name: tuple(ranges)}
    if kind == "bind":
        host, port = _split_host_port(str(raw).strip(), None)
        return {"bind_host": host, "bind_port": port}
    return {field_name: str(raw).strip()}


def _split_host_port(text: str, default_port: int | None) -> tuple[str, int]:
    if "://" in text or "/" in text:
        raise ValueError("must be host or host:port, without scheme or path")
    host, port = text, default_port
    if text.startswith("["):  # [IPv6]:port
        end = text.find("]")
        if end < 0:
            raise ValueError("has an unclosed '['")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError("must be host or host:port")
            port = _port(rest[1:])
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        port = _port(port_text)
    if not host:
        raise ValueError("has no host")
    if port is None:
        raise ValueError("must be host:port")
    return host, port


def _check_url(url: str) -> None:
    """An http(s) URL with a host; the message never quotes it (it may carry a token)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number or out of range
    except ValueError:
        raise ValueError("has an entry that is not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("has an entry that is not an http:// or https:// URL with a host")


VMID_LIMITS = (100, 999_999_999)  # Proxmox's pve-vmid (this module imports nothing of the package)


def _range(text: str, limits: tuple[int, int]) -> tuple[int, int]:
    """``low-high``, both whole numbers within ``limits``, low <= high."""
    low, sep, high = text.strip().partition("-")
    if not sep or not low.strip().isdigit() or not high.strip().isdigit():
        raise ValueError(f"must be low-high, whole numbers ({limits[0]}-{limits[1]})")
    lo, hi = int(low), int(high)
    if not limits[0] <= lo <= hi <= limits[1]:
        raise ValueError(f"must be low-high with {limits[0]} <= low <= high <= {limits[1]}")
    return lo, hi


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError("has a port that is not 1-65535")
    return int(text)


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """`` (did you mean X?)`` for the closest candidate, or nothing when none is close."""
    close = difflib.get_close_matches(name.upper(), sorted(candidates), n=1, cutoff=_SUGGESTION_CUTOFF)
    return f" (did you mean {close[0]}?)" if close else ""


def without_settings(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` without any variable pve-janitor would read or refuse (for a child process that
    is given its own settings: the demo, tests, benchmarks)."""
    ours = _OWN_PREFIXES + (_SHARED_PREFIX, "DATABASE_URL")
    return {k: v for k, v in env.items() if not k.upper().startswith(ours)}


def unknown_variables(env: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """(problems, warnings): problems for names of ours that are not settings, warnings for
    unknown PVE_* names.

    Only names are shown, never values: an unknown variable may well hold a secret.
    """
    problems, warnings = [], []
    for name in sorted(env):
        if name in KNOWN_VARIABLES:
            continue
        upper = name.upper()
        if upper.startswith(_OWN_PREFIXES):
            problems.append(f"{name} is not a setting{did_you_mean(name, KNOWN_VARIABLES)}")
        elif upper.startswith(_SHARED_PREFIX) and not upper.startswith(_HOOKSCRIPT_PREFIX):
            warnings.append(f"{name} is not a pve-janitor setting{did_you_mean(name, KNOWN_VARIABLES)}; ignored")
    return problems, warnings
