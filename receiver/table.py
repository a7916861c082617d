"""The platform's table, reflected, and the engine that reaches it.

pve-janitor never defines the platform's schema: it reflects the table named
by ``CLEANUP_TABLE`` and checks, at start, that every mapped column exists.
Columns outside the mapping are never written, but they are read whole into
the audit copy so that a restore puts back exactly what was removed.

SQLite gets a busy timeout and write transactions that take the write lock
up front (``BEGIN IMMEDIATE``), so a concurrent platform writer waits briefly
instead of failing with "database is locked" half-way through our change.
On SQLite, date/time columns are read as the text that is stored: SQLite has
no date type and platforms store several formats, which we parse ourselves
(:mod:`receiver.timeutil`) and write back unchanged.
"""
from __future__ import annotations

import logging
import threading
import weakref
from contextlib import contextmanager
from decimal import Decimal
from typing import Any, Callable, Iterator, Sequence

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import NoSuchTableError, SQLAlchemyError

from .config import ConfigError, Settings, redact_url
from .inventory import VMID_MAX, VMID_MIN
from .plan import Row

logger = logging.getLogger(__name__)

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
        raise ConfigError([f"DATABASE_URL={redact_url(url)!r} cannot be used: {type(exc).__name__}: "
                           f"{_first_line(exc)}"]) from None
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


_sqlite_write_locks: "weakref.WeakKeyDictionary[Any, threading.RLock]" = weakref.WeakKeyDictionary()
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


def _sqlite_raw_times(inspector, table, column_info) -> None:
    if isinstance(column_info["type"], (sa.DateTime, sa.Date, sa.Time)):
        column_info["type"] = sa.String()


class PlatformTable:
    """The reflected platform table and the mapped columns in it."""

    def __init__(self, engine: Engine, settings: Settings):
        self.engine = engine
        self.settings = settings
        metadata = sa.MetaData()
        listeners = []
        if engine.dialect.name == "sqlite":
            listeners = [("column_reflect", _sqlite_raw_times)]
        try:
            self.table = sa.Table(settings.table, metadata, autoload_with=engine, listeners=listeners)
        except NoSuchTableError:
            raise ConfigError([f"CLEANUP_TABLE={settings.table!r}: no such table in the database"]) from None
        except SQLAlchemyError as exc:
            raise DatabaseError(f"cannot read the table {settings.table!r}: {describe_db_error(exc)}") from None
        problems = [f"{name}={column!r}: no such column in table {settings.table!r}"
                    for name, column in settings.mapped_columns().items()
                    if column not in self.table.c]
        pk = list(self.table.primary_key.columns)
        if len(pk) != 1:
            problems.append(f"CLEANUP_TABLE={settings.table!r} needs a single-column primary key "
                            f"(found {len(pk)})")
        if problems:
            raise ConfigError(problems)
        self.pk = pk[0]
        self.key_batch = bind_limit(engine)  # keys per IN list
        self.vmid = self.table.c[settings.vmid_column]
        self.updated = self.table.c[settings.updated_column] if settings.updated_column else None
        self.status = self.table.c[settings.status_column] if settings.status_column else None

    def key_from_text(self, text: str) -> Any:
        """A primary key value stored as text (audit, stop marks) back in the column's type."""
        try:
            python_type = self.pk.type.python_type
        except NotImplementedError:
            return text
        return int(text) if python_type is int else text

    def _select_mapped(self) -> tuple[sa.Select, dict[str, int]]:
        """SELECT of the mapped columns (a column mapped twice is selected once), and each one's position."""
        s = self.settings
        columns = [self.pk, self.vmid]
        for name in (s.hostname_column, s.status_column, s.created_column, s.updated_column):
            if name:
                columns.append(self.table.c[name])
        columns = list(dict.fromkeys(columns))
        return sa.select(*columns), {c.name: i for i, c in enumerate(columns)}

    def _row_maker(self, position: dict[str, int]) -> Callable[[Sequence[Any]], Row]:
        """Turns a result tuple into a Row; built once per read (100,000 rows: no per-row lookups)."""
        s = self.settings
        i_key, i_vmid = position[self.pk.name], position[self.vmid.name]
        i_host, i_status, i_created, i_updated = (position[n] if n else None for n in (
            s.hostname_column, s.status_column, s.created_column, s.updated_column))

        def make(t: Sequence[Any]) -> Row:
            raw_vmid = t[i_vmid]
            vmid, problem = raw_vmid, None
            if type(raw_vmid) is not int or not VMID_MIN <= raw_vmid <= VMID_MAX:
                try:
                    vmid = as_vmid(raw_vmid)
                except ValueError as exc:
                    vmid, problem = None, str(exc)
            raw_status = None if i_status is None else t[i_status]
            return Row(
                t[i_key], vmid,
                None if i_host is None else t[i_host],
                raw_status if raw_status is None or type(raw_status) is str else str(raw_status),
                None if i_created is None else t[i_created],
                None if i_updated is None else t[i_updated],
                raw_vmid, raw_status, problem,
            )
        return make

    def fetch_rows(self, vmids: Sequence[int] | None = None) -> list[Row]:
        """The mapped columns of every row (or of rows with these VMIDs), in one read."""
        stmt, position = self._select_mapped()
        try:
            with self.engine.connect() as conn:
                if vmids is None:
                    result = conn.execute(stmt).all()
                else:
                    result = []
                    for part in chunks(sorted(set(vmids)), self.key_batch):
                        result.extend(conn.execute(stmt.where(self.vmid.in_(part))).all())
        except SQLAlchemyError as exc:
            raise DatabaseError(f"cannot read table {self.settings.table!r}: {describe_db_error(exc)}") from None
        make = self._row_maker(position)
        return [make(t) for t in result]

    def count(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(self.table)).scalar_one()

    @property
    def guard_batch(self) -> int:
        """Rows per guarded IN-list statement (MySQL/MariaDB, see guarded_batches): key twice +
        observed values each, about 900 bound parameters.  Not more: a database checks a
        row-value IN list term by term for each row it finds by key (on PostgreSQL, 10,000
        ghosts took 1.1 s in batches of 2,000 rows against 0.7 s in batches of 180)."""
        return max(1, GUARD_PARAMS // (3 + (self.updated is not None) + (self.status is not None)))

    def observed(self, row: Row) -> list[tuple[sa.Column, Any]]:
        """The guarded columns and the values the planner saw in them."""
        pairs = [(self.vmid, row.raw_vmid)]
        if self.updated is not None:
            pairs.append((self.updated, row.raw_updated))
        if self.status is not None:
            pairs.append((self.status, row.raw_status))
        return pairs

    def guarded_batches(self, rows: Sequence[Row], per_row: bool = False
                        ) -> Iterator[tuple[list[Row], sa.ColumnElement[bool], list[dict[str, Any]] | None]]:
        """The guarded statements that act on ``rows``: (the rows one statement must touch,
        its WHERE clause, the parameters of an executemany or None when the clause holds them).

        Where the driver sends an executemany in one go (sqlite3, psycopg's pipeline), each
        group of rows with the same NULL observed values is one executemany of a WHERE that
        matches a single row by key and observed values: 10,000 ghosts in 0.12 s on SQLite
        and 0.15 s on PostgreSQL, against about 0.35 and 0.45 s as IN lists, mostly spent by
        SQLAlchemy expanding them.  PyMySQL sends an executemany one row at a time (1.1 s), so
        MySQL/MariaDB get tuple IN lists (:meth:`observed_guard`).  ``per_row``: one row each.
        """
        if self.engine.dialect.name not in ("sqlite", "postgresql"):
            for part in ([[r] for r in rows] if per_row else chunks(rows, self.guard_batch)):
                yield list(part), self.observed_guard(part), None
            return
        for nulls, members in self._by_null_pattern(rows).items():
            where = sa.and_(self.pk == sa.bindparam("pve_janitor_key"), *(
                column.is_(None) if null else column == sa.bindparam(f"pve_janitor_seen{i}")
                for i, ((column, _), null) in enumerate(zip(members[0][1], nulls))))
            # Parameter names no platform column has: an UPDATE treats a parameter named like a
            # column as a value to set.
            params = [{"pve_janitor_key": row.key,
                       **{f"pve_janitor_seen{i}": v for i, (_, v) in enumerate(observed) if v is not None}}
                      for row, observed in members]
            if per_row:
                for (row, _), one in zip(members, params):
                    yield [row], where, [one]
            else:
                yield [row for row, _ in members], where, params

    def _by_null_pattern(self, rows: Sequence[Row]) -> dict[tuple[bool, ...], list[tuple[Row, list]]]:
        """The rows with their observed values, grouped by which of those values are NULL
        (a NULL is matched with IS NULL, not in a list of values)."""
        groups: dict[tuple[bool, ...], list[tuple[Row, list]]] = {}
        for row in rows:
            observed = self.observed(row)
            groups.setdefault(tuple(v is None for _, v in observed), []).append((row, observed))
        return groups

    def observed_guard(self, rows: Sequence[Row]) -> sa.ColumnElement[bool]:
        """WHERE clause matching these rows only while key, VMID, updated_at and status are as observed.

        Set-based: rows are grouped by which observed values are NULL, and
        each group becomes one tuple IN list.
        """
        clauses = []
        for nulls, members in self._by_null_pattern(rows).items():
            first = members[0][1]
            columns = [c for (c, _), null in zip(first, nulls) if not null]
            conds = [c.is_(None) for (c, _), null in zip(first, nulls) if null]
            values = [(row.key, *(v for _, v in observed if v is not None)) for row, observed in members]
            if columns:
                match = sa.tuple_(self.pk, *columns).in_(values)
            else:
                match = self.pk.in_([v[0] for v in values])
            clauses.append(sa.and_(match, *conds))
        # The plain key list lets the database find the rows by primary key: SQLite uses no
        # index for a tuple IN list, so each guarded statement scanned the whole table
        # (100,000 rows, 10,000 ghosts: 45 scans, 0.8 s).  It matches no other row: every
        # tuple above starts with the key.
        return sa.and_(self.pk.in_([row.key for row in rows]), sa.or_(*clauses))


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
                return max(1, min(BIND_LIMIT, conn.connection.dbapi_connection.getlimit(which) - 10))
        except (AttributeError, SQLAlchemyError):
            pass
    version = getattr(dbapi, "sqlite_version_info", (0,))
    return BIND_LIMIT if version >= (3, 32) else OLD_SQLITE_BIND_LIMIT


def as_vmid(value: Any) -> int | None:
    """The VMID in a table value; None for NULL; ValueError for anything that cannot be a VMID.

    A VMID column may be an integer, a float or decimal column, or text; a value like
    ``'ct101'`` or ``101.5`` must never read as "this row has no guest", and neither may a
    number Proxmox never gives a guest (below 100, above 999999999): a VMID mapped to the
    wrong column (``id``: 1, 2, 3 ...) would otherwise make every row a ghost.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"VMID {value!r} is not a number")
    if isinstance(value, int):
        number = value
    elif isinstance(value, (float, Decimal)):
        if not (value == value and value not in (float("inf"), float("-inf")) and value == int(value)):
            raise ValueError(f"VMID {value!r} is not a whole number")
        number = int(value)
    else:
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        text = text.strip()
        if not (text.isascii() and text.isdigit()):
            raise ValueError(f"VMID {value!r} is not a whole number")
        number = int(text)
    if not VMID_MIN <= number <= VMID_MAX:
        raise ValueError(f"VMID {value!r} is outside Proxmox's range {VMID_MIN}-{VMID_MAX}")
    return number


def chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
