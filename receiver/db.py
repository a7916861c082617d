"""The engine and the transactions every table of pve-janitor goes through.

SQLite gets a busy timeout and write transactions that take the write lock
up front (``BEGIN IMMEDIATE``), so a concurrent platform writer waits briefly
instead of failing with "database is locked" half-way through our change.
Statements are cut into batches that stay under every backend's bound-parameter limit.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from .config import ConfigError, redact_url

SQLITE_BUSY_TIMEOUT_MS = 30_000
CHUNK = 500  # keys per IN list where no PlatformTable says more: under every backend's limit (SQLite < 3.32: 999)
# Bound parameters per statement: the platform table's batches.  PostgreSQL's and MySQL's
# protocols allow 65,535, SQLite 32,766 since 3.32 (999 before).  Fewer, larger
# statements for key lists (re-reading 10,000 ghosts: one SELECT instead of 20).
BIND_LIMIT, OLD_SQLITE_BIND_LIMIT = 10_000, 900
GUARD_PARAMS = 900


class DatabaseError(Exception):
    """The database could not be reached or answered with an error."""


def make_engine(url: str) -> Engine:
    """One engine per process; SQLite with a busy timeout and IMMEDIATE writes."""
    connect_args = {}
    if url.startswith(("mysql", "mariadb")):
        # TIMESTAMP columns come back in the session's time zone; naive values are read as UTC.
        connect_args["init_command"] = "SET time_zone = '+00:00'"
    try:
        engine = sa.create_engine(url, pool_pre_ping=True, connect_args=connect_args)
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        raise ConfigError(
            [f"DATABASE_URL={redact_url(url)!r} cannot be used: {type(exc).__name__}: {_first_line(exc)}"]
        ) from None
    if engine.dialect.name == "sqlite":
        _tune_sqlite(engine)
    return engine


def describe_db_error(exc: BaseException) -> str:
    """The exception's kind and first line, without SQLAlchemy's SQL dump and parameters."""
    orig = getattr(exc, "orig", None) or exc
    return f"{type(orig).__name__}: {_first_line(orig)}"


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else ""


def _tune_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # pragma: no cover - exercised through every SQLite test
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves, below
        cursor = dbapi_conn.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # pragma: no cover - exercised through every SQLite test
        immediate = conn.get_execution_options().get("sqlite_immediate")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


_sqlite_write_locks: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_sqlite_write_locks_guard = threading.Lock()


def _sqlite_write_lock(engine: Engine) -> threading.RLock:
    with _sqlite_write_locks_guard:
        return _sqlite_write_locks.setdefault(engine.pool, threading.RLock())


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A short transaction that will write; on SQLite it holds the write lock from the start.

    On SQLite, this process's writers also queue on one in-process lock first.  SQLite lets
    one writer in at a time; the others wait in its busy handler, which sleeps in steps of up
    to 100 ms and serves nobody in order, so under a burst of events a writer could wait
    seconds while the lock sat free.  The in-process lock hands over at once.  Writers in
    other processes (the platform) still meet the busy timeout, as before.
    """
    if engine.dialect.name != "sqlite":
        with engine.connect() as conn, conn.begin():
            yield conn
        return
    with _sqlite_write_lock(engine), engine.connect() as conn:
        conn = conn.execution_options(sqlite_immediate=True)
        with conn.begin():
            yield conn


def bind_limit(engine: Engine) -> int:
    """How many bound parameters one statement may carry on this engine (with room to spare).

    SQLite's limit is a build option: read from the library where Python can (3.11+),
    else inferred from its version.
    """
    if engine.dialect.name != "sqlite":
        return BIND_LIMIT
    dbapi = engine.dialect.dbapi
    which = getattr(dbapi, "SQLITE_LIMIT_VARIABLE_NUMBER", None)
    if which is not None:
        try:
            with engine.connect() as conn:
                raw = conn.connection.dbapi_connection
                if raw is not None:
                    return max(1, min(BIND_LIMIT, raw.getlimit(which) - 10))
        except (AttributeError, SQLAlchemyError):
            pass
    version = getattr(dbapi, "sqlite_version_info", (0,))
    return BIND_LIMIT if version >= (3, 32) else OLD_SQLITE_BIND_LIMIT


def chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
