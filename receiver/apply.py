"""Carry out planned actions: audit copy + delete/mark + counters, in ONE transaction.

The rows are re-read (and locked, where the database can) inside the
transaction.  A row whose key, VMID or updated_at is no longer what the
planner saw has been changed or re-used by the platform in between: it is
skipped, not destroyed.  The delete/update statement itself carries the same
observed-value guard, and if it touches a different number of rows than were
audited the whole transaction is rolled back.  A crash at any point leaves
either the old state or the new one.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Sequence

import sqlalchemy as sa

from . import store
from .plan import GHOST, OLD_ERROR, Action
from .table import PlatformTable, chunks, write_transaction

logger = logging.getLogger(__name__)

REASON_COUNTERS = {GHOST: "ghost_apps_removed", OLD_ERROR: "old_errors_removed"}


class ApplyConflict(Exception):
    """The guarded statement touched another number of rows than were audited."""


@dataclass
class ApplyResult:
    applied: list[Action] = field(default_factory=list)
    skipped: list[tuple[Action, str]] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)


def _same(a: object, b: object) -> bool:
    return a == b or (a is None and b is None)


def apply_actions(table: PlatformTable, actions: Sequence[Action], *, source: str,
                  now: datetime) -> ApplyResult:
    """Apply ``actions`` (all of one kind per row) and return what happened."""
    result = ApplyResult()
    if not actions:
        return result
    t = table.table
    by_key = {a.row.key: a for a in actions}
    with write_transaction(table.engine) as conn:
        current = {}
        for part in chunks(list(by_key)):
            stmt = sa.select(t).where(table.pk.in_(part))
            if conn.dialect.name != "sqlite":
                stmt = stmt.with_for_update()
            for m in conn.execute(stmt).mappings():
                current[m[table.pk.name]] = dict(m)

        to_apply: list[Action] = []
        for key, action in by_key.items():
            now_row = current.get(key)
            if now_row is None:
                result.skipped.append((action, "row no longer exists"))
            elif not _same(now_row[table.vmid.name], action.row.raw_vmid):
                result.skipped.append((action, "VMID changed since planning"))
            elif table.updated is not None and not _same(now_row[table.updated.name], action.row.raw_updated):
                result.skipped.append((action, "row updated since planning"))
            else:
                to_apply.append(action)
        if not to_apply:
            return result

        conn.execute(store.audit.insert(), [
            {
                "table_name": table.settings.table,
                "row_key": str(a.row.key),
                "vmid": a.row.vmid,
                "hostname": None if a.row.hostname is None else str(a.row.hostname)[:255],
                "action": a.action,
                "reason": a.reason,
                "source": source,
                "detail": a.detail,
                "row_json": store.encode_row(current[a.row.key]),
                "removed_at": now,
            }
            for a in to_apply
        ])

        for action_kind in ("delete", "mark"):
            group = [a for a in to_apply if a.action == action_kind]
            for part in chunks(group):
                guard = table.observed_guard([a.row for a in part])
                if action_kind == "delete":
                    stmt = t.delete().where(guard)
                else:
                    stmt = t.update().where(guard).values({table.status.name: table.settings.mark_status})
                touched = conn.execute(stmt).rowcount
                if touched != len(part):
                    raise ApplyConflict(f"{action_kind} touched {touched} rows, expected {len(part)}; rolled back")

        deleted = [str(a.row.key) for a in to_apply if a.action == "delete"]
        for part in chunks(deleted):  # a restored row or a re-used key must not inherit a stop mark
            conn.execute(store.stop_marks.delete().where(store.stop_marks.c.table_name == table.settings.table,
                                                         store.stop_marks.c.row_key.in_(part)))
        counts = result.counts
        for a in to_apply:
            counts[REASON_COUNTERS[a.reason]] += 1
            counts["total_removed"] += 1
            if a.action == "mark":
                counts["rows_marked"] += 1
            else:
                counts["ports_freed"] += sum(1 for p in a.row.ports if p is not None)
        store.add_counters(conn, dict(counts))
        result.applied = to_apply
    for action, why in result.skipped:
        logger.info("skipped row %s (VMID %s): %s", action.row.key, action.row.vmid, why)
    return result
