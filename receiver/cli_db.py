"""``pve-janitor db``: pve-janitor's own tables in the platform database, their revision and upgrading them.

Only ``DATABASE_URL`` is needed: an operator upgrades the tables before (or without)
configuring Proxmox.  Exit codes as for every command: 0 done; 2 bad configuration;
3 refused or failed, nothing changed (``db current``: not at this version's revision).
"""

from __future__ import annotations

import logging
import sys
from typing import NoReturn

import click
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from . import schema
from .config import ConfigError, load_settings, require
from .db import DatabaseError, describe_db_error, make_engine
from .logs import setup_logging

EXIT_OK, EXIT_CONFIG, EXIT_REFUSED = 0, 2, 3  # as in receiver/cli.py


def _fail(code: int, lines: list[str]) -> NoReturn:
    for line in lines:
        click.echo(f"pve-janitor: {line}", err=True)
    sys.exit(code)


def _engine() -> Engine:
    setup_logging(logging.WARNING)
    try:
        settings = load_settings()
        require(settings, "DATABASE_URL")
        return make_engine(settings.database_url)
    except ConfigError as exc:
        _fail(EXIT_CONFIG, ["configuration error:"] + [f"  {p}" for p in exc.problems])


@click.group()
def db() -> None:
    """pve-janitor's own tables (janitor_*): their revision, and upgrading them."""


@db.command()
def upgrade() -> None:
    """Create or migrate the janitor_* tables to this version's revision.

    Safe beside running receivers and other upgrades: one migrates at a time, under a lease.
    """
    engine = _engine()
    try:
        before, after = schema.upgrade(engine)
    except DatabaseError as exc:
        _fail(EXIT_REFUSED, [f"database error: {exc}"])
    finally:
        engine.dispose()
    if before.current == after.current:
        click.echo(f"pve-janitor's tables: already at {after}")
    else:
        click.echo(f"pve-janitor's tables: upgraded from {before.current or 'nothing'} to {after}")


@db.command()
def current() -> None:
    """Print the tables' revision; exit 3 when it is not this version's (then run `db upgrade`)."""
    engine = _engine()
    try:
        found = schema.status(engine)
    except SQLAlchemyError as exc:
        _fail(EXIT_REFUSED, [f"database error: {describe_db_error(exc)}"])
    finally:
        engine.dispose()
    click.echo(str(found))
    sys.exit(EXIT_OK if found.state is schema.State.CURRENT else EXIT_REFUSED)
