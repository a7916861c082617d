"""Carry out planned actions: audit copy + delete/mark + counters, in ONE transaction.

The rows are re-read (and locked, where the database can) inside the
transaction.  A row whose key, VMID, updated_at or status is no longer what
the planner saw has been changed or re-used by the platform in between: it is
skipped, not destroyed.  The delete/update statement itself carries the same
observed-value guard; only the rows it really touched are audited and counted,
in the same transaction, which also drops the deleted rows' stop marks
(:mod:`receiver.stopmarks`) and writes the webhook events of the change
(:mod:`receiver.outbox`).  A row held since planning (:mod:`receiver.holds`) is
skipped too.  A crash at any point leaves either the old state or the new one.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import holds, outbox, stopmarks, store
from .db import chunks, write_transaction
from .model import Action, ApplyResult, Reason, Verb

if TYPE_CHECKING:  # types only: no import at run time
    from .table import PlatformTable

logger = logging.getLogger(__name__)

REASON_COUNTERS = {Reason.GHOST: "ghost_apps_removed", Reason.OLD_ERROR: "old_errors_removed"}


class ApplyConflict(Exception):
    """A set-based guarded statement touched another number of rows than expected."""


def _same(a: object, b: object) -> bool:
    return a == b or (a is None and b is None)


def apply_actions(
    table: PlatformTable, actions: Sequence[Action], *, source: str, now: datetime, plan_id: int | None = None
) -> ApplyResult:
    """Apply ``actions`` (all of one kind per row) and return what happened.

    Set-based first.  If a guarded statement touches another number of rows than
    the re-check in Python expected (a value that compares equal in Python but not
    in SQL: a FLOAT column, a DST-ambiguous TIMESTAMP), that transaction is rolled
    back and the work is redone row by row, so one odd row is skipped instead of
    blocking every sweep.  ``plan_id``: the approved pending plan these actions carry out.
    """
    if not actions:
        return ApplyResult()
    try:
        return _apply(table, actions, source, now, plan_id, per_row=False)
    except ApplyConflict as exc:
        logger.warning("%s; redoing the apply row by row", exc)
        return _apply(table, actions, source, now, plan_id, per_row=True)


def _apply(
    table: PlatformTable,
    actions: Sequence[Action],
    source: str,
    now: datetime,
    plan_id: int | None,
    per_row: bool,
) -> ApplyResult:
    result = ApplyResult()
    t = table.table
    by_key = {a.row.key: a for a in actions}
    names = [c.name for c in t.columns]
    position = {name: i for i, name in enumerate(names)}
    i_key = position[table.pk.name]
    port_positions = [position[c] for c in table.settings.port_columns]
    with write_transaction(table.engine) as conn:
        current = {}  # key -> the whole row as it is now, every column (the audit copy)
        for part in chunks(list(by_key), table.key_batch):
            stmt = sa.select(*t.columns).where(table.pk.in_(part))
            if conn.dialect.name != "sqlite":
                stmt = stmt.with_for_update()
            for found in conn.execute(stmt).all():
                current[found[i_key]] = found

        held_now = holds.active(conn, table.settings.table, now)
        to_apply: list[Action] = []
        for key, action in by_key.items():
            now_row = current.get(key)
            if now_row is None:
                result.skipped.append((action, "row no longer exists"))
                continue
            guarded = table.observed(action.row)
            if plan_id is not None:  # an approval: the rows are locked now, so this check holds until the commit
                guarded += table.reviewed(action.row)
            changed = [c.name for c, seen in guarded if not _same(now_row[position[c.name]], seen)]
            hold = held_now.of(action.row) if held_now else None
            if changed:
                result.skipped.append((action, f"{', '.join(changed)} changed since planning"))
            elif hold is not None:
                result.skipped.append((action, f"held since planning ({hold})"))
            else:
                to_apply.append(action)

        applied: list[Action] = []
        for action_kind in ("delete", "mark"):
            group = [a.row for a in to_apply if a.action == action_kind]
            for rows, guard, params in table.guarded_batches(group, per_row):
                change: sa.Delete | sa.Update
                if action_kind == "delete":
                    change = t.delete().where(guard)
                else:
                    assert table.status is not None  # CLEANUP_ACTION=mark requires CLEANUP_STATUS_COLUMN (config)
                    change = t.update().where(guard).values({table.status.name: table.settings.mark_status})
                touched = conn.execute(change, params).rowcount
                part = [by_key[row.key] for row in rows]
                if touched == len(part):
                    applied.extend(part)
                elif per_row:
                    result.skipped.append((part[0], "its observed values no longer match in the database"))
                else:
                    raise ApplyConflict(f"{action_kind} touched {touched} rows, expected {len(part)}")
        if not applied:
            return result

        store.insert_audit(
            conn,
            [
                {
                    "table_name": table.settings.table,
                    "row_key": str(a.row.key),
                    "vmid": a.row.vmid,
                    "hostname": None if a.row.hostname is None else str(a.row.hostname)[:255],
                    "action": a.action,
                    "reason": a.reason,
                    "source": source,
                    "detail": a.detail,
                    "row_json": store.encode_row(dict(zip(names, current[a.row.key], strict=True))),
                    "removed_at": now,
                }
                for a in applied
            ],
        )
        stopmarks.drop_deleted(conn, table, [str(a.row.key) for a in applied if a.action == "delete"])
        events = outbox.Events(table.settings, now)
        if events.wanted:
            audit_ids = _audit_ids(conn, table.settings.table, {str(a.row.key) for a in applied}, now)
            for a in applied:
                values = dict(zip(names, current[a.row.key], strict=True))
                events.add(
                    outbox.EventType.ROW_REMOVED if a.action == Verb.DELETE else outbox.EventType.ROW_MARKED,
                    outbox.row_subject(table.settings, a.row.key),
                    outbox.row_data(
                        table.settings,
                        values,
                        key=a.row.key,
                        vmid=a.row.vmid,
                        action=a.action,
                        reason=a.reason,
                        detail=a.detail,
                        audit_id=audit_ids.get(str(a.row.key)),
                        source_word=source,
                        plan_id=plan_id,
                    ),
                )
            events.write(conn)
        counts = result.counts
        for a in applied:
            counts[REASON_COUNTERS[a.reason]] += 1
            counts["total_removed"] += 1
            if a.action == "mark":
                counts["rows_marked"] += 1
            else:
                counts["ports_freed"] += sum(1 for i in port_positions if current[a.row.key][i] is not None)
        store.add_counters(conn, dict(counts))
        result.applied = applied
    for action, why in result.skipped:
        logger.info("skipped row %s (VMID %s): %s", action.row.key, action.row.vmid, why)
    return result


def _audit_ids(conn: Connection, table_name: str, keys: Collection[str], now: datetime) -> dict[str, int]:
    """The ids of the audit entries this transaction just wrote, by row key (for the webhooks).

    The entries are written in bulk (COPY on PostgreSQL), which returns no ids, so they are
    read back: this table's entries stamped ``now`` (MariaDB keeps whole seconds, hence the
    window) and not restored; where a key has two (removed, restored and removed again within
    the window), the newer is ours.
    """
    a = store.audit
    found: dict[str, int] = {}
    window = timedelta(seconds=2)
    rows = conn.execute(
        sa.select(a.c.id, a.c.row_key).where(
            a.c.table_name == table_name,
            a.c.removed_at >= now - window,
            a.c.removed_at <= now + window,
            a.c.restored_at.is_(None),
        )
    )
    for audit_id, key in rows:
        if key in keys and audit_id > found.get(key, 0):
            found[key] = audit_id
    return found
