"""What the ``pve-janitor`` commands share: exit codes, failing with a message, loading the
settings, the database or the whole runtime, and printing a table.

Exit codes (a contract scripts rely on): 0 done or nothing to do; 1 not found or
interrupted; 2 bad configuration; 3 refused for safety or failed with nothing changed.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, NoReturn

import click
from sqlalchemy.engine import Engine

from .config import ConfigError, Settings, load_settings, require
from .db import DatabaseError, make_engine
from .logs import setup_logging
from .runtime import Runtime
from .schema import require_current

EXIT_OK, EXIT_NOT_FOUND, EXIT_CONFIG, EXIT_REFUSED = 0, 1, 2, 3


def fail(code: int, lines: list[str] | str) -> NoReturn:
    for line in [lines] if isinstance(lines, str) else lines:
        click.echo(f"pve-janitor: {line}", err=True)
    sys.exit(code)


def config_failure(exc: ConfigError) -> NoReturn:
    fail(EXIT_CONFIG, ["configuration error:"] + [f"  {p}" for p in exc.problems])


def settings(overrides: dict[str, Any] | None = None) -> Settings:
    setup_logging(logging.WARNING)  # so that what loading says (an unknown PVE_* name) is formatted
    try:
        return load_settings(overrides=overrides)
    except ConfigError as exc:
        config_failure(exc)


def init_logging(ctx: click.Context, settings: Settings, level: int | None = None) -> None:
    setup_logging(level or ctx.obj["log_level"], settings.secrets(), settings.log_format)


def runtime(settings: Settings) -> Runtime:
    """Settings, database (at this version's schema), table and Proxmox, or exit 2/3."""
    try:
        return Runtime.build(settings)
    except ConfigError as exc:
        config_failure(exc)
    except DatabaseError as exc:
        fail(EXIT_REFUSED, f"database error: {exc}")


def engine(settings: Settings) -> Engine:
    """The database alone, at this version's schema (commands that need no Proxmox), or exit 2/3."""
    try:
        require(settings, "DATABASE_URL")
        found = make_engine(settings.database_url)
        require_current(found)
    except ConfigError as exc:
        config_failure(exc)
    except DatabaseError as exc:
        fail(EXIT_REFUSED, f"database error: {exc}")
    return found


def text_table(rows: list[list[str]], headers: list[str]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*headers), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows]
