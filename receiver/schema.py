"""pve-janitor's own tables in step with the code: Alembic migrations, run only on purpose.

The tables are created and changed by ``pve-janitor db upgrade`` and by ``serve`` at start,
nowhere else: every other command reads :func:`status` (no DDL) and refuses with "run
``pve-janitor db upgrade``" when the tables are missing or behind.  The revision is kept in
``janitor_alembic_version``, not ``alembic_version``, so a platform's own Alembic in the same
database is never read or touched.  The migrations ship in ``receiver/migrations`` and run from
a Config built here: no alembic.ini is needed.

Two receivers starting together must not migrate at once.  An upgrade first makes sure
``janitor_lease`` exists (``CREATE`` if missing; when another receiver's ``CREATE`` won the race,
the error is dropped once the table is seen to be there), then takes the ``schema`` row of that
lease, waits for it while another receiver holds it, and runs the migrations in one transaction
(one for the whole chain on SQLite and PostgreSQL, whose DDL is transactional).  The sweep's row
is a different one, so a running receiver of the older version never blocks an upgrade.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from . import store
from .db import DatabaseError, describe_db_error, write_transaction
from .lease import Lease
from .model import Word

VERSION_TABLE = "janitor_alembic_version"
LEASE_NAME = "schema"
LEASE_SECONDS = 300  # a migrator that died on another host is taken over after this
WAIT_SECONDS = 600.0  # how long an upgrade waits for another receiver's
UPGRADE_HINT = "run `pve-janitor db upgrade`"
MIGRATIONS = Path(__file__).resolve().parent / "migrations"


class State(Word):
    CURRENT = "current"
    MISSING = "missing"  # no pve-janitor table at all: a new install
    UNVERSIONED = "unversioned"  # the tables of a version before migrations, no revision yet
    BEHIND = "behind"
    AHEAD = "ahead"  # a revision this version does not know: a newer pve-janitor migrated


class SchemaNotCurrent(DatabaseError):
    """pve-janitor's tables are missing or at another revision than this version's."""


@dataclass(frozen=True)
class Status:
    current: str | None  # the revision in janitor_alembic_version
    head: str  # the newest revision this version ships
    state: State

    def __str__(self) -> str:
        if self.state is State.CURRENT:
            return f"{self.current} (current)"
        if self.state is State.MISSING:
            return f"pve-janitor's tables are missing: {UPGRADE_HINT}"
        if self.state is State.UNVERSIONED:
            return f"pve-janitor's tables predate migrations (no revision yet, {self.head} needed): {UPGRADE_HINT}"
        if self.state is State.BEHIND:
            return f"pve-janitor's tables are at {self.current}, this version needs {self.head}: {UPGRADE_HINT}"
        return (
            f"pve-janitor's tables are at {self.current}, which this version does not know "
            f"(newest it knows: {self.head}): a newer pve-janitor upgraded them; run that version"
        )


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["version_table"] = VERSION_TABLE
    return config


@cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config())


def head() -> str:
    """The newest revision this version ships."""
    revision = _scripts().get_current_head()
    assert revision is not None  # the package ships its migrations
    return revision


def status(engine: Engine) -> Status:
    """Where the tables are, read without creating anything; raises SQLAlchemyError."""
    newest = head()
    with engine.connect() as conn:
        current = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()
        ours = [name for name in sa.inspect(conn).get_table_names() if name in store.metadata.tables]
    if current == newest:
        state = State.CURRENT
    elif current is None:
        state = State.UNVERSIONED if set(ours) - {store.lease.name} else State.MISSING
    else:
        known = {script.revision for script in _scripts().walk_revisions()}
        state = State.BEHIND if current in known else State.AHEAD
    return Status(current, newest, state)


def require_current(engine: Engine) -> None:
    """Raises SchemaNotCurrent (what to do in its message), or DatabaseError when unreadable."""
    try:
        found = status(engine)
    except SQLAlchemyError as exc:
        raise DatabaseError(f"cannot read pve-janitor's schema revision: {describe_db_error(exc)}") from None
    if found.state is not State.CURRENT:
        raise SchemaNotCurrent(str(found))


def upgrade(engine: Engine, wait_seconds: float = WAIT_SECONDS) -> tuple[Status, Status]:
    """Bring the tables to :func:`head` under the schema lease; raises DatabaseError.

    Returns where they were (read under the lease) and where they are.  Safe to run from
    several receivers at once: one migrates, the others wait for it and then find nothing to do.
    """
    try:
        _create_lease_table(engine)
        lease = Lease(engine, LEASE_SECONDS, name=LEASE_NAME)
        deadline = time.monotonic() + wait_seconds
        while not lease.acquire():
            if time.monotonic() > deadline:
                raise DatabaseError(
                    f"another receiver ({lease.current_holder() or 'gone by now'}) has been upgrading "
                    f"pve-janitor's tables for over {wait_seconds:.0f} s"
                )
            time.sleep(0.2)
        try:
            before = status(engine)
            if before.state is State.AHEAD:
                raise SchemaNotCurrent(str(before))
            with write_transaction(engine) as conn:
                config = _config()
                config.attributes["connection"] = conn
                command.upgrade(config, "head")
        finally:
            lease.release()
        return before, status(engine)
    except SQLAlchemyError as exc:
        raise DatabaseError(f"cannot upgrade pve-janitor's tables: {describe_db_error(exc)}") from None
    except CommandError as exc:
        raise DatabaseError(f"cannot upgrade pve-janitor's tables: {exc}") from None


def _create_lease_table(engine: Engine) -> None:
    """``janitor_lease`` guards the migrations, so it is made before them, by whoever comes first.

    Two receivers may both see it missing and both ``CREATE`` it: the loser's error (PostgreSQL's
    unique violation on ``pg_type``, MariaDB's 1050) means only that the winner made it.  SQLite's
    write transaction takes the lock up front, so there the second one just finds the table.
    """
    try:
        with write_transaction(engine) as conn:
            store.lease.create(conn, checkfirst=True)
    except SQLAlchemyError:
        if not sa.inspect(engine).has_table(store.lease.name):
            raise
