"""``pve-janitor config``: every setting, its value, and where the value came from.

An operator who wonders why the receiver does what it does reads the settings as the
receiver resolved them: from the defaults, the ``CLEANUP_CONFIG`` file, the environment
(a ``*_FILE`` variable among it), a systemd credential.  Secrets show only whether they
are set, never a character of them; a database URL shows without its password.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import click

from .config import (
    SECRET_VARIABLES,
    VARIABLES,
    ConfigError,
    Resolved,
    Settings,
    redact_url,
    redact_webhook_url,
    resolve,
)
from .logs import setup_logging
from .variables import TABLE

EXIT_CONFIG = 2  # the CLI's "bad configuration"


def shown_value(settings: Settings, name: str) -> Any:
    """The value of variable ``name`` as JSON would hold it; secrets as None."""
    if name in SECRET_VARIABLES:
        return None
    if name == "DATABASE_URL":
        return redact_url(settings.database_url)
    if name == "PVE_HOST":
        return ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in settings.pve_endpoints)
    if name == "CLEANUP_WEBHOOK_URLS":
        return [redact_webhook_url(u) for u in settings.webhook_urls]
    if name == "CLEANUP_ALLOCATOR_VMIDS":
        return "{}-{}".format(*settings.allocator_vmids)
    if name == "CLEANUP_ALLOCATOR_PORTS":
        return ",".join(f"{c}={lo}-{hi}" for c, lo, hi in settings.allocator_ports)
    if name == "CLEANUP_BIND":
        host = f"[{settings.bind_host}]" if ":" in settings.bind_host else settings.bind_host
        return f"{host}:{settings.bind_port}"
    value = getattr(settings, TABLE[name][0])
    return list(value) if isinstance(value, tuple) else value


def entries(resolved: Resolved, config_path: str) -> list[dict[str, Any]]:
    """One entry per variable: name, value, source (and ``from``: the file, ``*_FILE`` or credential).

    A secret's value is None, with ``set`` saying whether it is given.
    """
    out = [{"name": "CLEANUP_CONFIG", "value": config_path, **_source(resolved, "CLEANUP_CONFIG")}]
    for name in VARIABLES:
        entry = {"name": name, "value": shown_value(resolved.settings, name), **_source(resolved, name)}
        if name in SECRET_VARIABLES:
            entry["set"] = bool(getattr(resolved.settings, TABLE[name][0]))
        out.append(entry)
    return out


def _source(resolved: Resolved, name: str) -> dict[str, str]:
    origin = resolved.origins[name]
    return {"source": origin.kind, "from": origin.detail}


def _text(entry: dict[str, Any]) -> str:
    value = entry["value"]
    if "set" in entry:
        value = "(set, redacted)" if entry["set"] else "(unset)"
    elif isinstance(value, bool):
        value = "true" if value else "false"
    elif isinstance(value, list):
        value = ",".join(value)
    source = f"{entry['source']}: {entry['from']}" if entry["from"] else entry["source"]
    return f"{entry['name']}={value}  ({source})"


@click.command(name="config")
@click.option("--json", "as_json", is_flag=True, help="Print the settings as JSON.")
def config_cmd(as_json: bool) -> None:
    """Print every setting, its value and where it came from; secrets redacted.

    Sources: default, file (CLEANUP_CONFIG), environment (a *_FILE variable
    among it), credential (systemd), override.  Exit codes: 0 printed; 2 bad
    configuration (each problem printed).
    """
    setup_logging(logging.WARNING)
    try:
        resolved = resolve()
    except ConfigError as exc:
        for line in ["configuration error:", *(f"  {p}" for p in exc.problems)]:
            click.echo(f"pve-janitor: {line}", err=True)
        for warning in exc.warnings:
            click.echo(f"pve-janitor: warning: {warning}", err=True)
        sys.exit(EXIT_CONFIG)
    listed = entries(resolved, os.environ.get("CLEANUP_CONFIG", ""))
    if as_json:
        click.echo(json.dumps({"settings": listed, "warnings": resolved.warnings}, indent=2))
        return
    for entry in listed:
        click.echo(_text(entry))
    for warning in resolved.warnings:
        click.echo(f"warning: {warning}")
