"""The watch list: the VMIDs whose guests the watcher checks at every tick.

A stop event or a finished destroy task is only a hint that a guest may be about to
disappear, so its VMID is watched until a deadline (``CLEANUP_WATCH_SECONDS`` after the
latest hint) instead of acted upon.  The list lives in pve-janitor's ``janitor_watch``
table, not in memory: a watch survives a restart and a fail-over to another receiver.

This module is the only one that reads or writes that table.  Every function works in
the caller's transaction, so the watcher can change the list in the same transaction as
what goes with it (marking events processed, setting stopped rows back).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from . import store
from .db import chunks, write_transaction
from .model import START_PHASES, STOP_PHASES, Event

STOP_HINT, TASK_HINT = "stop", "task"  # what put a VMID on the list: a stop event or a destroy task

Watches = dict[int, dict[str, Any]]  # VMID -> its row of the watch list


def watched_vmids(conn: sa.Connection, now: datetime) -> list[int]:
    """The VMIDs watched now, in order (for stats): a watch past its deadline is not counted."""
    w = store.watch
    return [int(v) for v in conn.execute(sa.select(w.c.vmid).where(w.c.until > now).order_by(w.c.vmid)).scalars()]


def read(conn: sa.Connection, vmids: Iterable[int] | None = None) -> Watches:
    """The whole watch list, or only its rows for ``vmids``.

    A drain reads only its events' VMIDs: reading the whole list at every drain would make
    a burst of N stop events cost O(N^2), under the write lock that accepting events needs.
    """
    w = store.watch
    if vmids is None:
        return {int(r["vmid"]): dict(r) for r in conn.execute(sa.select(w)).mappings()}
    rows: Watches = {}
    for part in chunks(sorted(set(vmids))):
        for r in conn.execute(sa.select(w).where(w.c.vmid.in_(part))).mappings():
            rows[int(r["vmid"])] = dict(r)
    return rows


def upsert(conn: sa.Connection, watches: Watches, vmid: int, now: datetime, until: datetime, hint: str) -> None:
    """Watch ``vmid`` until ``until``: a new watch, or an existing one extended (its ``since`` kept).

    ``watches`` is what the caller read of the list in this transaction; it is kept up to
    date.  A VMID it does not hold may still have been watched meanwhile by another receiver
    (a leader stepping down, during a fail-over): that watch is extended, not an error.
    """
    w = store.watch
    if vmid not in watches:
        fresh = {"vmid": vmid, "since": now, "until": until, "hint": hint}
        try:
            with conn.begin_nested():
                conn.execute(w.insert().values(**fresh))
            watches[vmid] = fresh
            return
        except IntegrityError:
            watches[vmid] = fresh
    conn.execute(w.update().where(w.c.vmid == vmid).values(until=until, hint=hint))
    watches[vmid].update(until=until, hint=hint)


def watch_all(conn: sa.Connection, vmids: Iterable[int], now: datetime, until: datetime, hint: str) -> None:
    """Watch each of ``vmids`` until ``until`` (new or extended)."""
    vmids = list(vmids)
    watches = read(conn, vmids)
    for vmid in vmids:
        upsert(conn, watches, vmid, now, until, hint)


def note_events(
    conn: sa.Connection, events: Iterable[Event], now: datetime, until: datetime
) -> tuple[Watches, set[int]]:
    """Change the list as ``events`` say, in their order: a stop phase watches its VMID
    (or extends the watch), a start phase takes it off the list.

    Returns the list's rows for these events' VMIDs afterwards, and the VMIDs whose latest
    event was a start (their rows marked stopped are to be set back).
    """
    events = list(events)
    watches = read(conn, {e.vmid for e in events})
    started: set[int] = set()
    for event in events:
        if event.phase in STOP_PHASES:
            upsert(conn, watches, event.vmid, now, until, STOP_HINT)
            started.discard(event.vmid)
        elif event.phase in START_PHASES:
            if event.vmid in watches:
                forget(conn, [event.vmid])
                del watches[event.vmid]
            started.add(event.vmid)
    return watches, started


def forget(conn: sa.Connection, vmids: Iterable[int]) -> None:
    """Take ``vmids`` off the list (settled: removed, or running again)."""
    w = store.watch
    for part in chunks(sorted(set(vmids))):
        conn.execute(w.delete().where(w.c.vmid.in_(part)))


def expire(conn: sa.Connection, now: datetime) -> None:
    """Take off the list every watch whose deadline has passed; the sweep is the safety net for them."""
    conn.execute(store.watch.delete().where(store.watch.c.until < now))


def current(engine: Engine, now: datetime) -> Watches:
    """The watch list as of ``now``: watches past their deadline are taken off first.

    Read without the write lock; a write transaction is taken only when a watch has expired.
    """
    with engine.connect() as conn:
        watches = read(conn)
    expired = [v for v, row in watches.items() if row["until"] < now]
    if not expired:
        return watches
    with write_transaction(engine) as conn:
        expire(conn, now)
    return {v: row for v, row in watches.items() if v not in expired}
