"""The watcher: turns stop events and destroy tasks into removals within seconds.

Proxmox has no destroy hook (PROXMOX.md).  A stop event only says "this guest
may be about to disappear", so its VMID goes on a watch list (in the
database: it survives restarts and fail-over).  Every tick reads the inventory
ONCE for all watched VMIDs, however many there are:

* missing from the read: its rows go through the removal pipeline
  (:mod:`receiver.removal`), as the sweep's do, with source ``event``: the rows are
  read, planned against this read (grace period, protected statuses), and removed
  only after a confirming read that started after the rows were read (and the
  checks for guests an ACL hides), guarded by the values observed;
* stopped: rows in the running status are set to ``CLEANUP_STOP_STATUS`` (and
  remembered, so a start can set them back);
* running again after having been seen stopped, or a start event: off the
  list, and the rows we had marked stopped go back to ``CLEANUP_RUNNING_STATUS``.

Every ``CLEANUP_TASK_POLL_SECONDS`` it also polls the task tail
(:mod:`receiver.tasktail`): a finished ``vzdestroy``/``qmdestroy`` not seen
before puts its VMID on the list; that catches the destroy of a guest that was
already stopped, which fires no hook.  An inventory failure removes nothing and keeps every VMID watched.
"""
from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta
from typing import Any, Callable

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from . import store
from .apply import ApplyConflict
from .db import DatabaseError, chunks, describe_db_error, write_transaction
from .inbox import Inbox
from .lease import Lease
from .metrics import Metrics
from .model import START_PHASES, STOP_PHASES, Inventory, InventoryError, Outcome, Reason
from .removal import Removal
from .runtime import Runtime
from .safety import Refused, check_listing
from .tasktail import TaskTail
from .timeutil import isoformat, utcnow

logger = logging.getLogger(__name__)

DRAIN_GATHER_SECONDS = 0.05


class Watcher:
    def __init__(self, runtime: Runtime, inbox: Inbox, metrics: Metrics | None = None,
                 lease: Lease | None = None, clock: Callable[[], datetime] = utcnow,
                 on_task_gap: Callable[[], None] | None = None):
        self.runtime = runtime
        self.settings = runtime.settings
        self.inbox = inbox
        self.metrics = metrics or Metrics()
        self.lease = lease
        self.clock = clock
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.tasks = TaskTail(runtime.inventory, on_gap=on_task_gap,
                              on_blind=lambda blind: self.metrics.task_tail_blind.set(int(blind)))
        self._next_task_poll = 0.0
        self._last_status: dict[int, str] = {}
        self.watched: list[int] = []
        self.leader = lease is None
        self.last_tick: datetime | None = None
        self.last_error: str | None = None
        self.ticks = 0
        self.hidden: list[int] = []  # watched VMIDs held by a guest the token cannot see
        self.removal = Removal(self.settings, runtime.table, runtime.inventory, clock=clock)

    # --- thread ----------------------------------------------------------------

    def start(self) -> "Watcher":
        self._thread = threading.Thread(target=self._loop, name="pve-janitor-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Finish the tick in flight, then stop."""
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout)
        if self.lease:
            self.lease.release()

    def wake(self) -> None:
        """An event arrived: drain the inbox now instead of at the next tick."""
        self._wake.set()

    def alive(self) -> bool:
        return bool(self._thread and self._thread.is_alive())

    def _loop(self) -> None:
        interval = self.settings.watch_interval_seconds
        next_tick = time.monotonic()
        while not self._stop.is_set():
            woken = self._wake.wait(max(0.0, next_tick - time.monotonic()))
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                if woken and time.monotonic() < next_tick:
                    # No inventory read between ticks, and one drain for a burst: draining at
                    # every event took the write lock hundreds of times a second, and accepting
                    # events queues on that same lock.
                    self._stop.wait(min(DRAIN_GATHER_SECONDS, max(0.0, next_tick - time.monotonic())))
                    self._wake.clear()
                    if not self._stop.is_set():
                        self._drain_between_ticks()
                    continue
                started = time.monotonic()
                next_tick = started + interval
                self.tick()
                if self._next_task_poll > started:
                    # The task poll keeps its own period: a tick comes when it is due.  Waiting for
                    # the next regular tick made it up to a tick late once ticks were brought
                    # forward (a 5 s poll every 5.5 s).
                    next_tick = min(next_tick, self._next_task_poll)
            except Exception as exc:  # noqa: BLE001 - the loop must survive anything; it says what
                logger.exception("watcher tick failed")
                self._error("internal", f"{type(exc).__name__}: {exc}")

    def status(self) -> dict[str, Any]:
        return {
            "watched": list(self.watched),
            "leader": self.leader,
            "alive": self.alive(),
            "last_tick": isoformat(self.last_tick),
            "last_error": self.last_error,
            "hidden_guests": list(self.hidden),
        }

    def _error(self, kind: str, message: str) -> None:
        self.last_error = message
        self.metrics.watcher_errors.labels(kind=kind).inc()
        logger.warning("watcher: %s", message)
        try:
            store.record_error(self.runtime.engine, "watcher", message)
        except SQLAlchemyError:
            pass

    # --- one tick --------------------------------------------------------------

    def tick(self) -> None:
        """Drain events, poll tasks when due, read the inventory once, act."""
        now = self.clock()
        self.last_tick = now
        self.ticks += 1
        if self.lease is not None:
            self.leader = self.lease.acquire()
            self.metrics.leader.set(1 if self.leader else 0)
            if not self.leader:
                self.watched = []
                return
        if not self.settings.enabled:
            return
        try:
            self.drain_inbox(now)
            self._poll_tasks(now)
            self._check_watched(now)
        except (SQLAlchemyError, DatabaseError, ApplyConflict) as exc:
            self._error("database", f"database error {type(exc).__name__}: {describe_db_error(exc)}; will retry")

    def _drain_between_ticks(self) -> None:
        """A woken drain: only while the lease is surely ours (the last tick's flag may be stale
        by now), and a database error is reported like a tick's, not as a crash."""
        if self.lease is not None and not self.lease.still_held():
            return
        try:
            self.drain_inbox()
        except (SQLAlchemyError, DatabaseError) as exc:
            self._error("database", f"database error {type(exc).__name__}: {describe_db_error(exc)}; will retry")

    def drain_inbox(self, now: datetime | None = None) -> int:
        if (self.lease is not None and not self.leader) or not self.settings.enabled:
            return 0
        now = now or self.clock()
        events = self.inbox.pending()
        if not events:
            return 0
        until = now + timedelta(seconds=self.settings.watch_seconds)
        started: set[int] = set()
        vmids = {e.vmid for e in events}
        with write_transaction(self.runtime.engine) as conn:
            watched = _watch_rows(conn, vmids)
            for event in events:
                if event.phase in STOP_PHASES:
                    _upsert_watch(conn, watched, event.vmid, now, until, "stop")
                    started.discard(event.vmid)
                elif event.phase in START_PHASES:
                    if event.vmid in watched:
                        conn.execute(store.watch.delete().where(store.watch.c.vmid == event.vmid))
                        del watched[event.vmid]
                    started.add(event.vmid)
            self.inbox.mark_processed(conn, [e.event_id for e in events], now)
            for vmid in started:
                self._unmark_stopped(conn, vmid)
                self._last_status.pop(vmid, None)
            self.watched = sorted((set(self.watched) - vmids) | set(watched))
        self.metrics.watched.set(len(self.watched))
        return len(events)

    def _poll_tasks(self, now: datetime) -> None:
        # A poll due within half a tick is done in this tick.  Ticks start a few ms before a
        # deadline taken mid-tick, so a strict comparison rounded every period up to the next
        # whole tick: a 5 s poll ran every 6 s.
        mono = time.monotonic()
        if mono < self._next_task_poll - self.settings.watch_interval_seconds / 2:
            return
        self._next_task_poll = mono + self.settings.task_poll_seconds
        try:
            hints = self.tasks.poll()
        except InventoryError as exc:
            self._error(exc.kind, f"task poll failed: {exc}")
            return
        if not hints:
            return
        until = now + timedelta(seconds=self.settings.watch_seconds)
        with write_transaction(self.runtime.engine) as conn:
            watched = _watch_rows(conn, {t.vmid for t in hints if t.vmid is not None})
            for task in hints:
                logger.info("watcher: %s of %s on %s finished: checking", task.type, task.vmid, task.node)
                _upsert_watch(conn, watched, task.vmid, now, until, "task")

    def _check_watched(self, now: datetime) -> None:
        with self.runtime.engine.connect() as conn:
            watched = _watch_rows(conn)
        expired = [v for v, row in watched.items() if row["until"] < now]
        if expired:
            with write_transaction(self.runtime.engine) as conn:
                conn.execute(store.watch.delete().where(store.watch.c.until < now))
            watched = {v: row for v, row in watched.items() if v not in expired}
        self.watched = sorted(watched)
        self.metrics.watched.set(len(watched))
        if not watched:
            return
        try:
            inventory = self.runtime.inventory.read()
        except InventoryError as exc:
            self._error(exc.kind, f"inventory unreadable, nothing removed, {len(watched)} VMIDs still "
                                  f"watched: {exc}")
            return
        if not inventory.guests:  # the table is counted only then
            try:
                check_listing(inventory, self.runtime.table.count())
            except Refused as exc:
                self._error(str(exc.refusal), f"nothing removed: {exc}")
                return
        self.last_error = None

        missing, stopped, running_again = [], [], []
        for vmid in watched:
            guest = inventory.get(vmid)
            if guest is None:
                missing.append(vmid)
                continue
            if guest.status == "stopped":
                stopped.append(vmid)
            elif guest.status == "running" and self._last_status.get(vmid) == "stopped":
                running_again.append(vmid)
            self._last_status[vmid] = guest.status

        settled = self._remove_missing(missing, inventory) if missing else set()
        with write_transaction(self.runtime.engine) as conn:
            w = store.watch
            done = sorted(settled | set(running_again))
            for part in chunks(done):
                conn.execute(w.delete().where(w.c.vmid.in_(part)))
            for vmid in running_again:
                self._unmark_stopped(conn, vmid)
                self._last_status.pop(vmid, None)
            if stopped and self.settings.stop_status and self.settings.status_column and not self.settings.dry_run:
                self._mark_stopped(conn, stopped, now)
        self.watched = sorted(set(watched) - set(done))
        self.metrics.watched.set(len(self.watched))

    def _remove_missing(self, vmids: list[int], inventory: Inventory) -> set[int]:
        """Send the rows of VMIDs this tick's read did not list through the removal pipeline.

        The pipeline reads their rows, plans them against this read and, before removing
        anything, reads the guest list again (the confirming read starts after the rows
        were read) and asks about guests an ACL could hide.  Returns the VMIDs that are
        settled: no row of theirs is left that the pipeline kept (young, protected, changed
        since planning, guest back or hidden).  Kept ones stay watched: the grace period may
        end before the watch does; the sweep is the safety net.
        """
        result = self.removal.run(vmids=vmids, first=inventory, reasons=(Reason.GHOST,), dry_run=self.settings.dry_run,
                                  source="event", may_apply=self._may_apply)
        self.hidden = list(result.hidden)
        self.metrics.hidden_guests.labels(source="watcher").set(len(result.hidden))
        if result.outcome in (Outcome.REFUSED, Outcome.FAILED):
            self._error(str(result.refusal or "internal"), f"nothing removed: {result.reason}")
            if result.refusal is not None:
                self.metrics.refusal(str(result.refusal), "watcher")
            return set()
        for vmid in vmids:
            self._last_status.pop(vmid, None)
        plan = result.plan
        if result.outcome == Outcome.DRY_RUN and plan is not None:
            for action in plan.actions:
                logger.info("DRY-RUN: watcher would %s row %s (VMID %s): %s", action.action, action.row.key,
                            action.row.vmid, action.detail)
        elif result.applied is not None:
            self.metrics.removal(Reason.GHOST, "event", len(result.applied.applied))
            for action in result.applied.applied:
                logger.info("watcher: %s row %s (VMID %s): %s", action.action, action.row.key,
                            action.row.vmid, action.detail)
        return set(vmids) - result.untouched_vmids

    def _may_apply(self) -> bool:
        """Right before a removal applies: is the lease still surely ours?"""
        return self.lease is None or self.lease.still_held()

    def _mark_stopped(self, conn: sa.Connection, vmids: list[int], now: datetime) -> None:
        table = self.runtime.table
        s = self.settings
        keys = conn.execute(sa.select(table.pk, table.vmid).where(
            table.vmid.in_(vmids), table.status == s.running_status)).all()
        if not keys:
            return
        conn.execute(table.table.update().where(table.pk.in_([k for k, _ in keys]),
                                                table.status == s.running_status)
                     .values({table.status.name: s.stop_status}))
        marks = store.stop_marks
        already = set(conn.execute(sa.select(marks.c.row_key).where(
            marks.c.table_name == s.table, marks.c.row_key.in_([str(k) for k, _ in keys]))).scalars())
        new = [{"table_name": s.table, "row_key": str(k), "vmid": int(v), "marked_at": now}
               for k, v in keys if str(k) not in already]
        if new:
            conn.execute(marks.insert(), new)
        logger.info("watcher: %d rows of stopped guests %s set to %r", len(keys), vmids, s.stop_status)

    def _unmark_stopped(self, conn: sa.Connection, vmid: int) -> None:
        s = self.settings
        marks = store.stop_marks
        keys = list(conn.execute(sa.select(marks.c.row_key).where(
            marks.c.table_name == s.table, marks.c.vmid == vmid)).scalars())
        if not keys or self.runtime.table.status is None:
            return
        table = self.runtime.table
        conn.execute(table.table.update().where(table.pk.in_([table.key_from_text(k) for k in keys]),
                                                table.status == s.stop_status)
                     .values({table.status.name: s.running_status}))
        conn.execute(marks.delete().where(marks.c.table_name == s.table, marks.c.vmid == vmid))


def watched_vmids(conn: sa.Connection, now: datetime) -> list[int]:
    """The VMIDs watched now, in order (for stats)."""
    w = store.watch
    return [int(v) for v in conn.execute(sa.select(w.c.vmid).where(w.c.until > now).order_by(w.c.vmid)).scalars()]


def _watch_rows(conn: sa.Connection, vmids: set[int] | None = None) -> dict[int, dict[str, Any]]:
    """The watch list, or only its rows for ``vmids``.

    Draining events reads only their VMIDs' rows: reading the whole list for every drain
    made a burst of N stop events cost O(N^2), under the write lock that accepting events needs.
    """
    w = store.watch
    if vmids is None:
        return {int(r["vmid"]): dict(r) for r in conn.execute(sa.select(w)).mappings()}
    rows: dict[int, dict[str, Any]] = {}
    for part in chunks(sorted(vmids)):
        for r in conn.execute(sa.select(w).where(w.c.vmid.in_(part))).mappings():
            rows[int(r["vmid"])] = dict(r)
    return rows


def _upsert_watch(conn: sa.Connection, watched: dict[int, dict], vmid: int, now: datetime,
                  until: datetime, hint: str) -> None:
    w = store.watch
    if vmid not in watched:
        try:
            with conn.begin_nested():
                conn.execute(w.insert().values(vmid=vmid, since=now, until=until, hint=hint, missing_reads=0))
            watched[vmid] = {"vmid": vmid, "since": now, "until": until, "hint": hint, "missing_reads": 0}
            return
        except IntegrityError:
            # Another receiver (a leader stepping down, during a fail-over) watched it meanwhile.
            watched[vmid] = {"vmid": vmid, "since": now, "until": until, "hint": hint, "missing_reads": 0}
    conn.execute(w.update().where(w.c.vmid == vmid).values(until=until, hint=hint))
    watched[vmid].update(until=until, hint=hint)
