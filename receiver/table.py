"""The platform's table, reflected.

pve-janitor never defines the platform's schema: it reflects the table named
by ``CLEANUP_TABLE`` and checks, at start, that every mapped column exists.
Columns outside the mapping are never written, but they are read whole into
the audit copy so that a restore puts back exactly what was removed.

On SQLite, date/time columns are read as the text that is stored: SQLite has
no date type and platforms store several formats, which we parse ourselves
(:mod:`receiver.timeutil`) and write back unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import NoSuchTableError, SQLAlchemyError

from .config import ConfigError, Settings
from .db import GUARD_PARAMS, DatabaseError, bind_limit, chunks, describe_db_error
from .model import VMID_MAX, VMID_MIN, Row

logger = logging.getLogger(__name__)


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
        problems = [
            f"{name}={column!r}: no such column in table {settings.table!r}"
            for name, column in settings.mapped_columns().items()
            if column not in self.table.c
        ]
        pk = list(self.table.primary_key.columns)
        if len(pk) != 1:
            problems.append(f"CLEANUP_TABLE={settings.table!r} needs a single-column primary key (found {len(pk)})")
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

    def stored_key(self, text: str) -> str | None:
        """The key of the row a user names (``--row 042`` names row 42), as pve-janitor writes keys
        elsewhere (``str`` of the value read: audit, holds, plans); None when no row has it."""
        try:
            key = self.key_from_text(text)
        except ValueError:
            return None
        if isinstance(key, int) and not -(2**63) <= key < 2**63:
            return None  # no integer column holds it (and the driver would raise, not answer)
        with self.engine.connect() as conn:
            found = conn.execute(sa.select(self.pk).where(self.pk == key).limit(1)).first()
        return None if found is None else str(found[0])

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
        i_host, i_status, i_created, i_updated = (
            position[n] if n else None for n in (s.hostname_column, s.status_column, s.created_column, s.updated_column)
        )

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
                t[i_key],
                vmid,
                None if i_host is None else t[i_host],
                raw_status if raw_status is None or type(raw_status) is str else str(raw_status),
                None if i_created is None else t[i_created],
                None if i_updated is None else t[i_updated],
                raw_vmid,
                raw_status,
                problem,
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
        row-value IN list term by term for each row it finds by key, so longer lists cost
        more than the statements they save (docs/performance.md)."""
        return max(1, GUARD_PARAMS // (3 + (self.updated is not None) + (self.status is not None)))

    def observed(self, row: Row) -> list[tuple[sa.Column, Any]]:
        """The guarded columns and the values the planner saw in them."""
        pairs = [(self.vmid, row.raw_vmid)]
        if self.updated is not None:
            pairs.append((self.updated, row.raw_updated))
        if self.status is not None:
            pairs.append((self.status, row.raw_status))
        return pairs

    def reviewed(self, row: Row) -> list[tuple[sa.Column, Any]]:
        """The mapped columns an approval also requires unchanged (it removes only what was
        reviewed), with the values seen: hostname and created_at, beside :meth:`observed`'s."""
        pairs = []
        if self.settings.hostname_column:
            pairs.append((self.table.c[self.settings.hostname_column], row.hostname))
        if self.settings.created_column:
            pairs.append((self.table.c[self.settings.created_column], row.raw_created))
        return pairs

    def guarded_batches(
        self, rows: Sequence[Row], per_row: bool = False
    ) -> Iterator[tuple[list[Row], sa.ColumnElement[bool], list[dict[str, Any]] | None]]:
        """The guarded statements that act on ``rows``: (the rows one statement must touch,
        its WHERE clause, the parameters of an executemany or None when the clause holds them).

        Where the driver sends an executemany in one go (sqlite3, psycopg's pipeline), each
        group of rows with the same NULL observed values is one executemany of a WHERE that
        matches a single row by key and observed values: cheaper than IN lists, whose cost is
        mostly SQLAlchemy expanding them.  PyMySQL sends an executemany one row at a time, so
        MySQL/MariaDB get tuple IN lists (:meth:`observed_guard`).  ``per_row``: one row each.
        The figures are in docs/performance.md.
        """
        if self.engine.dialect.name not in ("sqlite", "postgresql"):
            for part in [[r] for r in rows] if per_row else chunks(rows, self.guard_batch):
                yield list(part), self.observed_guard(part), None
            return
        for nulls, members in self._by_null_pattern(rows).items():
            where = sa.and_(
                self.pk == sa.bindparam("pve_janitor_key"),
                *(
                    column.is_(None) if null else column == sa.bindparam(f"pve_janitor_seen{i}")
                    for i, ((column, _), null) in enumerate(zip(members[0][1], nulls, strict=True))
                ),
            )
            # Parameter names no platform column has: an UPDATE treats a parameter named like a
            # column as a value to set.
            params = [
                {
                    "pve_janitor_key": row.key,
                    **{f"pve_janitor_seen{i}": v for i, (_, v) in enumerate(observed) if v is not None},
                }
                for row, observed in members
            ]
            if per_row:
                for (row, _), one in zip(members, params, strict=True):
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
            columns = [c for (c, _), null in zip(first, nulls, strict=True) if not null]
            conds = [c.is_(None) for (c, _), null in zip(first, nulls, strict=True) if null]
            values = [(row.key, *(v for _, v in observed if v is not None)) for row, observed in members]
            if columns:
                match = sa.tuple_(self.pk, *columns).in_(values)
            else:
                match = self.pk.in_([v[0] for v in values])
            clauses.append(sa.and_(match, *conds))
        # The plain key list lets the database find the rows by primary key: SQLite uses no
        # index for a tuple IN list, so without it each guarded statement scans the whole
        # table.  It matches no other row: every tuple above starts with the key.
        return sa.and_(self.pk.in_([row.key for row in rows]), sa.or_(*clauses))


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
