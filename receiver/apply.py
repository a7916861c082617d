"""Carry out planned actions: audit copy + delete/mark + counters, in ONE transaction.

The rows are re-read (and locked, where the database can) inside the
transaction.  A row whose key, VMID, updated_at or status is no longer what
the planner saw has been changed or re-used by the platform in between: it is
skipped, not destroyed.  The delete/update statement itself carries the same
observed-value guard; only the rows it really touched are audited and counted,
in the same transaction, which also drops the deleted rows' stop marks
(:mod:`receiver.stopmarks`).  A crash at any point leaves either the old state or
the new one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

import sqlalchemy as sa

from . import stopmarks, store
from .db import chunks, write_transaction
from .model import Action, ApplyResult, Reason

if TYPE_CHECKING:  # types only: no import at run time
    from .table import PlatformTable

logger = logging.getLogger(__name__)

REASON_COUNTERS = {Reason.GHOST: "ghost_apps_removed", Reason.OLD_ERROR: "old_errors_removed"}


class ApplyConflict(Exception):
    """A set-based guarded statement touched another number of rows than expected."""


def _same(a: object, b: object) -> bool:
    return a == b or (a is None and b is None)


def apply_actions(table: PlatformTable, actions: Sequence[Action], *, source: str, now: datetime) -> ApplyResult:
    """Apply ``actions`` (all of one kind per row) and return what happened.

    Set-based first.  If a guarded statement touches another number of rows than
    the re-check in Python expected (a value that compares equal in Python but not
    in SQL: a FLOAT column, a DST-ambiguous TIMESTAMP), that transaction is rolled
    back and the work is redone row by row, so one odd row is skipped instead of
    blocking every sweep.
    """
    if not actions:
        return ApplyResult()
    try:
        return _apply(table, actions, source, now, per_row=False)
    except ApplyConflict as exc:
        logger.warning("%s; redoing the apply row by row", exc)
        return _apply(table, actions, source, now, per_row=True)


def _apply(table: PlatformTable, actions: Sequence[Action], source: str, now: datetime, per_row: bool) -> ApplyResult:
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

        to_apply: list[Action] = []
        for key, action in by_key.items():
            now_row = current.get(key)
            if now_row is None:
                result.skipped.append((action, "row no longer exists"))
                continue
            changed = [c.name for c, seen in table.observed(action.row) if not _same(now_row[position[c.name]], seen)]
            if changed:
                result.skipped.append((action, f"{', '.join(changed)} changed since planning"))
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
