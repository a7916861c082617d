"""Put a removed row back from its audit copy.

A restore refuses, changing nothing, when the row's key or any UNIQUE value
(VMID, hostname, ports...) is taken by now: the platform has moved on and a
person must decide.  A marked row gets its old status back, if it still has
the mark.

Its guest is usually still gone, so the next sweep would remove the row again:
a restore places a hold on it (:mod:`receiver.holds`), in the same transaction,
until it is released (``pve-janitor release --row KEY``), unless asked not to.
The ``row.restored`` webhook event is written in that transaction too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, IntegrityError

from . import holds, outbox, store
from .db import describe_db_error, write_transaction
from .timeutil import utcnow

if TYPE_CHECKING:  # types only: no import at run time
    from .table import PlatformTable

logger = logging.getLogger(__name__)


class RestoreRefused(Exception):
    """The restore cannot be done safely; nothing was changed."""


class AuditNotFound(Exception):
    """No audit entry has this id; nothing was changed."""


# Audit ids are positive and fit a signed 64-bit integer on every database.  Anything else
# cannot name an entry, and sending it would fail in the driver (SQLite: OverflowError)
# instead of saying "not found".
_AUDIT_IDS = range(1, 2**63)


@dataclass
class Restored:
    audit_id: int
    row_key: str
    action: str
    message: str
    hold_id: int | None = None


def unique_column_sets(table: PlatformTable) -> list[tuple[str, ...]]:
    inspector = sa.inspect(table.engine)
    sets: list[tuple[str, ...]] = [(table.pk.name,)]
    for uc in inspector.get_unique_constraints(table.settings.table):
        sets.append(tuple(uc["column_names"]))
    for ix in inspector.get_indexes(table.settings.table):
        if ix.get("unique") and all(ix.get("column_names") or [None]):
            sets.append(tuple(name for name in ix["column_names"] if name))  # all named: checked above
    return list(dict.fromkeys(sets))


def restore(table: PlatformTable, audit_id: int, *, hold: bool = True, source: str = "cli") -> Restored:
    """Put back the row of one audit entry, held (``hold``) until released.

    Raises AuditNotFound (no such entry) or RestoreRefused (nothing was changed).
    """
    if audit_id not in _AUDIT_IDS:
        raise AuditNotFound(f"no audit entry {audit_id}")
    t = table.table
    # Bound as BIGINT: PostgreSQL casts a parameter to the column's type, and a 32-bit
    # id column would turn 2**31 into "integer out of range" instead of "not found".
    is_entry = store.audit.c.id == sa.literal(audit_id, sa.BigInteger)
    unique_sets = unique_column_sets(table)
    with write_transaction(table.engine) as conn:
        entry = conn.execute(sa.select(store.audit).where(is_entry)).mappings().first()
        if entry is None:
            raise AuditNotFound(f"no audit entry {audit_id}")
        if entry["restored_at"] is not None:
            raise RestoreRefused(
                f"audit entry {audit_id} was already restored at {entry['restored_at']:%Y-%m-%d %H:%M:%S} UTC"
            )
        if entry["table_name"] != table.settings.table:
            raise RestoreRefused(
                f"audit entry {audit_id} is for table {entry['table_name']!r}, not {table.settings.table!r}"
            )
        row = store.decode_row(entry["row_json"])
        key = row.get(table.pk.name)
        if entry["action"] == "mark":
            message = _unmark(conn, table, row, key)
        else:
            values = {k: v for k, v in row.items() if k in t.c}
            taken = []
            for columns in unique_sets:
                if any(values.get(c) is None for c in columns):
                    continue  # NULLs never collide in a UNIQUE constraint
                if conn.execute(
                    sa.select(sa.func.count()).select_from(t).where(sa.and_(*(t.c[c] == values[c] for c in columns)))
                ).scalar_one():
                    taken.append(", ".join(f"{c}={values[c]!r}" for c in columns))
            if taken:
                raise RestoreRefused(
                    f"cannot restore audit entry {audit_id}: taken by another row now: " + "; ".join(taken)
                )
            try:
                with conn.begin_nested():
                    conn.execute(t.insert().values(values))
            except IntegrityError as exc:
                raise RestoreRefused(
                    f"cannot restore audit entry {audit_id}: the database refused it "
                    f"({type(exc.orig).__name__}: a UNIQUE value or a reference is taken)"
                ) from None
            except DBAPIError as exc:  # a value the table no longer accepts (schema changed since)
                raise RestoreRefused(
                    f"cannot restore audit entry {audit_id}: the database refused the row ({describe_db_error(exc)})"
                ) from None
            message = f"row {key} (VMID {entry['vmid']}) is back in {table.settings.table}"
        now = utcnow()
        conn.execute(store.audit.update().where(is_entry).values(restored_at=now))
        store.add_counters(conn, {"rows_restored": 1})
        placed = None
        if hold:
            placed = holds.place_in(
                conn,
                table.settings.table,
                now=now,
                source="restore",
                row_key=str(key),
                reason=f"restored from audit entry {audit_id}",
            )
            message += f"; held (hold {placed.id}) until released: pve-janitor release --row {key}"
        else:
            message += "; not held: the next sweep removes it again if its guest is still gone"
        events = outbox.Events(table.settings, now)
        events.add(
            outbox.EventType.ROW_RESTORED,
            outbox.row_subject(table.settings, key),
            outbox.row_data(
                table.settings,
                row,
                key=key,
                vmid=entry["vmid"],
                action=entry["action"],
                reason=entry["reason"],
                detail=message,
                audit_id=audit_id,
                source_word=source,
            )
            | {"hold_id": placed.id if placed else None},
        )
        events.write(conn)
    logger.info("restored audit entry %s: %s", audit_id, message)
    return Restored(audit_id, str(key), entry["action"], message, placed.id if placed else None)


def _unmark(conn, table: PlatformTable, row: dict, key) -> str:
    if table.status is None:
        raise RestoreRefused("CLEANUP_STATUS_COLUMN is not set: cannot undo a mark")
    old_status = row.get(table.status.name)
    changed = conn.execute(
        table.table.update()
        .where(table.pk == key, table.status == table.settings.mark_status)
        .values({table.status.name: old_status})
    ).rowcount
    if changed != 1:
        raise RestoreRefused(
            f"row {key} no longer exists or no longer has status {table.settings.mark_status!r}: nothing to undo"
        )
    return f"row {key} has status {old_status!r} again"
