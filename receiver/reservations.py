"""The allocator's reservations: VMIDs, hostnames and ports handed out and not yet used.

A reservation holds its values (``janitor_reserved_values``, whose primary key — table,
kind, value — is the UNIQUE constraint that keeps two allocations apart, from one receiver
or several) until its row appears in the platform table, it expires
(``CLEANUP_RESERVATION_MINUTES``) or it is released.  The planner treats a row whose VMID is
reserved like a row in its grace period: the platform is creating its guest.

A value's kind is ``vmid``, ``hostname`` or the name of a port column; the value is its text
(a hostname in lower case).  An expired reservation keeps its values' keys until it is
deleted, so :func:`reserve` deletes the stale reservations it was handed in the same
transaction as it inserts, and :func:`prune` (the receiver's housekeeping) deletes them
otherwise.  Stale: expired, or ended because a row of the platform table now carries its
VMID or its hostname.

This module is the only one that writes the two tables, and the one that cleans them.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError

from . import store
from .db import CHUNK, chunks, write_transaction
from .timeutil import isoformat

if TYPE_CHECKING:  # types only: no import at run time
    from .table import PlatformTable

VMID = "vmid"
HOSTNAME = "hostname"
MAX_LABEL = 200
# Lock conflicts another allocation's transaction can cause, retried like a taken value:
# PostgreSQL's deadlock and serialization failure, MySQL/MariaDB's deadlock and lock wait timeout.
_PG_CONFLICTS = frozenset({"40P01", "40001"})
_MYSQL_CONFLICTS = frozenset({1213, 1205})


class Taken(Exception):
    """Another reservation took one of the values first (the insert met the primary key, or a
    lock conflict with a concurrent allocation): nothing was reserved; choose again."""


@dataclass(frozen=True)
class Reservation:
    id: int
    table: str
    created_at: datetime
    expires_at: datetime
    source: str
    label: str | None
    vmid: int | None = None
    hostname: str | None = None
    ports: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "vmid": self.vmid,
            "hostname": self.hostname,
            "ports": {column: list(values) for column, values in sorted(self.ports.items())},
            "expires_at": isoformat(self.expires_at),
            "created_at": isoformat(self.created_at),
            "table": self.table,
            "source": self.source,
            "label": self.label,
        }

    def describe(self) -> str:
        """How logs and the CLI name it: ``reservation 7: VMID 123, hostname web, public_port 20001``."""
        parts = [f"VMID {self.vmid}"]
        if self.hostname:
            parts.append(f"hostname {self.hostname}")
        for column, values in sorted(self.ports.items()):
            parts.append(f"{column} {', '.join(map(str, values))}")
        return f"reservation {self.id}: {', '.join(parts)}"


def clean_label(label: str | None) -> str | None:
    """The label as kept: trimmed, at most :data:`MAX_LABEL` characters, without NUL (PostgreSQL
    text cannot hold one) or a lone surrogate (no database encodes one); None when nothing is left."""
    text = (label or "").encode("utf-8", "replace").decode("utf-8").replace("\x00", "")
    return text.strip()[:MAX_LABEL] or None


def _in_force(now: datetime) -> sa.ColumnElement[bool]:
    return store.reservations.c.expires_at > now


def reserved_vmids(conn: Connection, table_name: str, now: datetime) -> frozenset[int]:
    """The VMIDs of reservations in force on ``table_name``."""
    r, v = store.reservations, store.reserved_values
    rows = conn.execute(
        sa.select(v.c.value)
        .join(r, r.c.id == v.c.reservation_id)
        .where(v.c.table_name == table_name, v.c.kind == VMID, r.c.expires_at > now)
    ).scalars()
    return frozenset(int(value) for value in rows if value.isdigit())


def held_values(conn: Connection, table_name: str, now: datetime) -> dict[str, dict[str, int]]:
    """Kind -> {value: reservation id} of every reservation in force on ``table_name``: what a
    new allocation must not choose."""
    return read(conn, table_name, now)[0]


def read(conn: Connection, table_name: str, now: datetime) -> tuple[dict[str, dict[str, int]], list[int]]:
    """In one query: :func:`held_values`, and the ids of the reservations on ``table_name`` that
    have expired (their values still hold their keys until they are deleted)."""
    r, v = store.reservations, store.reserved_values
    held: dict[str, dict[str, int]] = {}
    expired: set[int] = set()
    rows = conn.execute(
        sa.select(v.c.kind, v.c.value, v.c.reservation_id, r.c.expires_at)
        .join(r, r.c.id == v.c.reservation_id)
        .where(v.c.table_name == table_name)
    )
    for kind, value, reservation_id, expires_at in rows:
        if expires_at > now:
            held.setdefault(kind, {})[value] = reservation_id
        else:
            expired.add(reservation_id)
    return held, sorted(expired)


def expired_ids(conn: Connection, table_name: str | None, now: datetime) -> list[int]:
    """Reservations past their time (on ``table_name``; None: on any table)."""
    r = store.reservations
    stmt = sa.select(r.c.id).where(r.c.expires_at <= now)
    if table_name is not None:
        stmt = stmt.where(r.c.table_name == table_name)
    return list(conn.execute(stmt.order_by(r.c.id)).scalars())


def ended_ids(conn: Connection, table: PlatformTable, held: dict[str, dict[str, int]]) -> list[int]:
    """Reservations in ``held`` (as :func:`held_values` gives) whose VMID or hostname a row of the
    platform table now carries: the platform created what was reserved, so they end.

    One query on the table's indexes with the reserved values alone (a few, however large the
    table is): ``vmid IN (...) OR hostname IN (...)``.
    """
    numeric = isinstance(table.vmid.type, (sa.Integer, sa.Numeric))
    vmids = {(int(v) if numeric else v): rid for v, rid in held.get(VMID, {}).items() if v.isdigit()}
    column_name = table.settings.hostname_column
    names = held.get(HOSTNAME, {}) if column_name else {}
    if not vmids and not names:
        return []
    host = table.table.c[column_name] if column_name else None
    ended: set[int] = set()
    if len(vmids) + len(names) <= CHUNK:
        clauses = [table.vmid.in_(list(vmids))] if vmids else []
        if names and host is not None:
            clauses.append(host.in_(list(names)))
        columns = [table.vmid] if host is None else [table.vmid, host]
        found = conn.execute(sa.select(*columns).where(sa.or_(*clauses))).all()
        pairs = [(row[0], row[1] if host is not None else None) for row in found]
    else:
        pairs = [(v, None) for v in _present(conn, table.vmid, list(vmids))]
        if host is not None:
            pairs += [(None, n) for n in _present(conn, host, list(names))]
    for vmid, name in pairs:
        key = None if vmid is None else (_whole_or_none(vmid) if numeric else str(vmid).strip())
        if key in vmids:
            ended.add(vmids[key])
        if name is not None and str(name).lower() in names:
            ended.add(names[str(name).lower()])
    return sorted(ended)


def _whole_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _present(conn: Connection, column: sa.Column, values: Sequence[Any]) -> Iterable[Any]:
    for part in chunks(values, CHUNK):
        yield from conn.execute(sa.select(column).where(column.in_(part)).distinct()).scalars()


def _delete(conn: Connection, ids: Collection[int]) -> int:
    r, v = store.reservations, store.reserved_values
    deleted = 0
    for part in chunks(sorted(set(ids)), CHUNK):
        conn.execute(v.delete().where(v.c.reservation_id.in_(part)))
        deleted += conn.execute(r.delete().where(r.c.id.in_(part))).rowcount
    return deleted


@dataclass(frozen=True)
class Wanted:
    """One reservation to make: who asks (``cli``, ``http``), its label, its values (kind, text)."""

    source: str
    label: str | None
    values: Sequence[tuple[str, str]]


def reserve(
    engine: Engine,
    table_name: str,
    *,
    now: datetime,
    expires_at: datetime,
    source: str,
    label: str | None,
    values: Sequence[tuple[str, str]],
    stale: Collection[int] = (),
) -> Reservation:
    """One transaction: delete the ``stale`` reservations (so their values free up), insert the
    reservation and its ``values`` (kind, text), commit.  :class:`Taken` when another
    reservation holds one of the values by then: nothing was reserved."""
    wanted = Wanted(source, label, values)
    return reserve_many(engine, table_name, now=now, expires_at=expires_at, wanted=[wanted], stale=stale)[0]


def reserve_many(
    engine: Engine,
    table_name: str,
    *,
    now: datetime,
    expires_at: datetime,
    wanted: Sequence[Wanted],
    stale: Collection[int] = (),
) -> list[Reservation]:
    """:func:`reserve` for several reservations in one transaction (a group of allocations):
    all of them or, with :class:`Taken`, none.

    The values go in one order everywhere (sorted), so two allocations that want some of the
    same values wait for each other instead of locking each other out.
    """
    v = store.reserved_values
    made: list[tuple[int, Wanted, str | None]] = []
    try:
        with write_transaction(engine) as conn:
            if stale:
                _delete(conn, stale)
            labels = [clean_label(one.label) for one in wanted]
            heads = [
                {
                    "table_name": table_name,
                    "created_at": now,
                    "expires_at": expires_at,
                    "source": one.source,
                    "label": label,
                }
                for one, label in zip(wanted, labels, strict=True)
            ]
            ids = _insert_returning_ids(conn, heads)
            made = list(zip(ids, wanted, labels, strict=True))
            rows = [
                {"table_name": table_name, "kind": kind, "value": value, "reservation_id": reservation_id}
                for reservation_id, one, _ in made
                for kind, value in set(one.values)
            ]
            rows.sort(key=lambda row: (row["kind"], row["value"]))
            for part in chunks(rows, CHUNK):
                conn.execute(v.insert(), part)
    except DBAPIError as exc:
        if isinstance(exc, IntegrityError) or _lock_conflict(exc):
            raise Taken(type(exc.orig).__name__) from None
        raise
    return [_reservation(rid, table_name, now, expires_at, one.source, label, one.values) for rid, one, label in made]


def _insert_returning_ids(conn: Connection, heads: list[dict[str, Any]]) -> list[int]:
    """Insert the reservations' rows; their ids, in the order given.  One ``INSERT ... RETURNING``
    for many where SQLAlchemy can return the ids in parameter order (PostgreSQL, MariaDB 10.5+;
    on SQLite it sends one statement per row itself), else one statement each."""
    r = store.reservations
    if len(heads) > 1 and conn.dialect.insert_executemany_returning_sort_by_parameter_order:
        stmt = r.insert().returning(r.c.id, sort_by_parameter_order=True)
        return [int(rid) for rid in conn.execute(stmt, heads).scalars()]
    return [int(conn.execute(r.insert().values(**head)).inserted_primary_key[0]) for head in heads]  # type: ignore[index]


def _lock_conflict(exc: DBAPIError) -> bool:
    orig = exc.orig
    if getattr(orig, "sqlstate", None) in _PG_CONFLICTS:
        return True
    args: tuple[Any, ...] = tuple(getattr(orig, "args", ()))
    return bool(args) and args[0] in _MYSQL_CONFLICTS


def _reservation(
    rid: int,
    table_name: str,
    created_at: datetime,
    expires_at: datetime,
    source: str,
    label: str | None,
    values: Iterable[tuple[str, str]],
) -> Reservation:
    vmid: int | None = None
    hostname: str | None = None
    ports: dict[str, list[int]] = {}
    for kind, value in values:
        if kind == VMID:
            vmid = int(value)
        elif kind == HOSTNAME:
            hostname = value
        else:
            ports.setdefault(kind, []).append(int(value))
    return Reservation(
        rid, table_name, created_at, expires_at, source, label, vmid, hostname, {k: sorted(p) for k, p in ports.items()}
    )


def _read(conn: Connection, where: Sequence[sa.ColumnElement[bool]]) -> list[Reservation]:
    r, v = store.reservations, store.reserved_values
    found = list(conn.execute(sa.select(r).where(*where).order_by(r.c.id)))
    values: dict[int, list[tuple[str, str]]] = {}
    for part in chunks([row.id for row in found], CHUNK):
        for rid, kind, value in conn.execute(
            sa.select(v.c.reservation_id, v.c.kind, v.c.value).where(v.c.reservation_id.in_(part))
        ):
            values.setdefault(rid, []).append((kind, value))
    return [
        _reservation(
            row.id, row.table_name, row.created_at, row.expires_at, row.source, row.label, values.get(row.id, ())
        )
        for row in found
    ]


def listing(conn: Connection, table_name: str, now: datetime) -> list[Reservation]:
    """The reservations in force on ``table_name``, oldest first."""
    r = store.reservations
    return _read(conn, [r.c.table_name == table_name, _in_force(now)])


def count(conn: Connection, table_name: str, now: datetime) -> int:
    """How many reservations are in force on ``table_name``."""
    r = store.reservations
    return int(
        conn.execute(
            sa.select(sa.func.count()).select_from(r).where(r.c.table_name == table_name, _in_force(now))
        ).scalar_one()
    )


def release(engine: Engine, table_name: str, reservation_id: int) -> Reservation | None:
    """Release a reservation (in force or expired and not yet pruned): its values free up at
    once.  None when there is no such reservation on ``table_name``."""
    if not 0 < reservation_id < 2**63:
        return None
    r = store.reservations
    with write_transaction(engine) as conn:
        found = _read(conn, [r.c.table_name == table_name, r.c.id == sa.literal(reservation_id, sa.BigInteger)])
        if not found:
            return None
        _delete(conn, [reservation_id])
    return found[0]


def prune(conn: Connection, table: PlatformTable, now: datetime) -> int:
    """Delete expired reservations (on any table) and those on ``table`` whose row has appeared;
    returns how many (the receiver's housekeeping, after each sweep)."""
    stale = set(expired_ids(conn, None, now))
    stale.update(ended_ids(conn, table, held_values(conn, table.settings.table, now)))
    return _delete(conn, stale) if stale else 0
