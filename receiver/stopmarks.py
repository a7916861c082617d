"""Stop marks: the platform rows pve-janitor set to ``CLEANUP_STOP_STATUS`` because their guest stopped.

A mark (pve-janitor's ``janitor_stop_marks`` table) remembers that the watcher, not the
platform, changed a row's status, so a start sets back only those rows, and only while
they still say stopped: a status the platform wrote since is the platform's own.

This module is the only one that writes the table and the only one that cleans it.
Every function works in the caller's transaction: a mark is written with the status it
stands for, and dropped in the transaction that deletes its row (so a restored row or a
re-used key never inherits it, and a rolled-back delete keeps it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

import sqlalchemy as sa

from . import store
from .db import chunks

if TYPE_CHECKING:
    from .table import PlatformTable

logger = logging.getLogger(__name__)


def mark_stopped(conn: sa.Connection, table: PlatformTable, vmids: Sequence[int], now: datetime) -> int:
    """Set the rows of ``vmids`` that are in the running status to the stop status, and mark
    them.  Returns how many rows were set; rows in any other status are left alone, and
    nothing is set without a status column."""
    s, status = table.settings, table.status
    if status is None:
        return 0
    keys = conn.execute(sa.select(table.pk, table.vmid).where(table.vmid.in_(vmids), status == s.running_status)).all()
    if not keys:
        return 0
    conn.execute(
        table.table.update()
        .where(table.pk.in_([k for k, _ in keys]), status == s.running_status)
        .values({status.name: s.stop_status})
    )
    marks = store.stop_marks
    already = set(
        conn.execute(
            sa.select(marks.c.row_key).where(
                marks.c.table_name == s.table, marks.c.row_key.in_([str(k) for k, _ in keys])
            )
        ).scalars()
    )
    new = [
        {"table_name": s.table, "row_key": str(k), "vmid": int(v), "marked_at": now}
        for k, v in keys
        if str(k) not in already
    ]
    if new:
        conn.execute(marks.insert(), new)
    logger.info("watcher: %d rows of stopped guests %s set to %r", len(keys), list(vmids), s.stop_status)
    return len(keys)


def unmark_started(conn: sa.Connection, table: PlatformTable, vmid: int) -> None:
    """The guest ``vmid`` runs again: its marked rows that still say stopped go back to the
    running status, and its marks are dropped."""
    s, status = table.settings, table.status
    if status is None:
        return
    marks = store.stop_marks
    keys = list(
        conn.execute(sa.select(marks.c.row_key).where(marks.c.table_name == s.table, marks.c.vmid == vmid)).scalars()
    )
    if not keys:
        return
    conn.execute(
        table.table.update()
        .where(table.pk.in_([table.key_from_text(k) for k in keys]), status == s.stop_status)
        .values({status.name: s.running_status})
    )
    conn.execute(marks.delete().where(marks.c.table_name == s.table, marks.c.vmid == vmid))


def drop_deleted(conn: sa.Connection, table: PlatformTable, keys: Sequence[str]) -> None:
    """Drop the marks of rows deleted in this transaction (``keys`` as text).

    The marks held for the table are read first (as many as stopped apps, usually few),
    so a large removal does not send its whole key list for nothing.
    """
    if not keys:
        return
    marks = store.stop_marks
    marked = set(conn.execute(sa.select(marks.c.row_key).where(marks.c.table_name == table.settings.table)).scalars())
    for part in chunks(sorted(marked.intersection(keys)), table.key_batch):
        conn.execute(marks.delete().where(marks.c.table_name == table.settings.table, marks.c.row_key.in_(part)))
