"""The watcher: turns stop events and destroy tasks into removals within seconds.

Proxmox has no destroy hook (PROXMOX.md).  A stop event only says "this guest may be about
to disappear", so its VMID goes on the watch list (:mod:`receiver.watchlist`); so does the
VMID of a destroy found by the task tail (:mod:`receiver.tasktail`), which catches guests
destroyed while stopped, with no hook.  Each tick asks about the watched VMIDs that are due,
the cheapest way (:mod:`receiver.probe`, :mod:`receiver.probing`; docs/architecture.md, "The
watcher's probes and fade"):

* gone from its node: a *candidate*.  The whole guest list is read (privilege and quorum
  checked); VMIDs missing from it go through the removal pipeline (:mod:`receiver.removal`)
  with source ``event``, which removes nothing before its confirming read;
* stopped: rows in the running status are set to ``CLEANUP_STOP_STATUS`` and marked
  (:mod:`receiver.stopmarks`); running again, or a start event: off the list, marks undone.

A failed read removes nothing and keeps every VMID watched; an odd probe answer (an
offline node's 595, a 403, ...) makes no candidate, and is counted and said.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import SQLAlchemyError

from . import outbox, stopmarks, store, watchlist
from .apply import ApplyConflict
from .db import DatabaseError, describe_db_error, write_transaction
from .metrics import Metrics
from .model import STOP_PHASES, Inventory, InventoryError, Outcome, Reason, Refusal
from .probing import Probes
from .removal import Removal
from .safety import Refused, check_listing, refusal_for
from .sweep import refusal_data
from .tasktail import TaskTail
from .timeutil import isoformat, utcnow
from .watchloop import WatchLoop

if TYPE_CHECKING:  # types only: no import at run time
    from .inbox import Inbox
    from .lease import Lease
    from .runtime import Runtime

logger = logging.getLogger(__name__)


class Watcher:
    """The watch loop of one receiver; with a lease, only its holder drains events and acts."""

    def __init__(
        self,
        runtime: Runtime,
        inbox: Inbox,
        metrics: Metrics | None = None,
        lease: Lease | None = None,
        clock: Callable[[], datetime] = utcnow,
        on_task_gap: Callable[[], None] | None = None,
    ):
        self.runtime = runtime
        self.settings = runtime.settings
        self.inbox = inbox
        self.metrics = metrics or Metrics()
        self.lease = lease
        self.clock = clock
        self.tasks = TaskTail(
            runtime.inventory, on_gap=on_task_gap, on_blind=lambda blind: self.metrics.task_tail_blind.set(int(blind))
        )
        self._next_task_poll = 0.0
        self._last_status: dict[int, str] = {}
        self.watched: list[int] = []
        self.leader = lease is None
        self.last_tick: datetime | None = None
        self.last_error: str | None = None
        self.ticks = 0
        self.hidden: list[int] = []  # watched VMIDs held by a guest the token cannot see
        self._refusal_sent: Refusal | None = None  # the refusal whose webhook event went out last
        self.removal = Removal(self.settings, runtime.table, runtime.inventory, clock=clock)
        self.probes = Probes(
            runtime.inventory, self.metrics, self.settings.watch_seconds, self.settings.watch_interval_seconds
        )
        self._loop = WatchLoop(
            self.settings.watch_interval_seconds,
            self.tick,
            self._drain_between_ticks,
            lambda: self._next_task_poll,
            lambda exc: self._error("internal", f"{type(exc).__name__}: {exc}"),
        )

    # --- thread ----------------------------------------------------------------

    def start(self) -> Watcher:
        self._loop.start()
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Finish the tick in flight, then stop; give up the lease."""
        self._loop.stop(timeout)
        if self.lease:
            self.lease.release()

    def wake(self) -> None:
        """An event arrived: drain the inbox now instead of at the next tick."""
        self._loop.wake()

    def alive(self) -> bool:
        return self._loop.alive()

    def status(self) -> dict[str, Any]:
        """What stats and health show of the watcher (the list as this process last saw it)."""
        return {
            "watched": list(self.watched),
            "leader": self.leader,
            "alive": self.alive(),
            "last_tick": isoformat(self.last_tick),
            "last_error": self.last_error,
            "hidden_guests": list(self.hidden),
        }

    def _error(self, kind: str, message: str, refusal: Refusal | None = None) -> None:
        """Say, count and keep an error; a refusal also gets its webhook event, once while it
        lasts (ticks repeat it every second), in the transaction that keeps the error."""
        self.last_error = message
        self.metrics.watcher_errors.labels(kind=kind).inc()
        logger.warning("watcher: %s", message)
        events = outbox.Events(self.settings, self.clock())
        if refusal is not None and refusal != self._refusal_sent:
            events.add(
                outbox.EventType.REMOVAL_REFUSED,
                "removal",
                refusal_data(self.settings, "watcher", Outcome.REFUSED, refusal, message),
            )
        with contextlib.suppress(SQLAlchemyError):  # the error is logged and counted already
            store.record_error(self.runtime.engine, "watcher", message, also=events.write)
            if refusal is not None:
                self._refusal_sent = refusal

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
        """Turn pending events into watch list changes, in one transaction with marking them
        processed; returns how many events were drained."""
        if (self.lease is not None and not self.leader) or not self.settings.enabled:
            return 0
        now = now or self.clock()
        events = self.inbox.pending()
        if not events:
            return 0
        until = now + timedelta(seconds=self.settings.watch_seconds)
        vmids = {e.vmid for e in events}
        with write_transaction(self.runtime.engine) as conn:
            watched, started = watchlist.note_events(conn, events, now, until)
            self.inbox.mark_processed(conn, [e.event_id for e in events], now)
            for vmid in started:
                stopmarks.unmark_started(conn, self.runtime.table, vmid)
                self._last_status.pop(vmid, None)
            self.watched = sorted((set(self.watched) - vmids) | set(watched))
        for e in events:
            if e.phase in STOP_PHASES:
                self.probes.hinted(e.vmid, e.node)
        self.metrics.watched.set(len(self.watched))
        return len(events)

    def _poll_tasks(self, now: datetime) -> None:
        # A poll due within half a tick is done in this tick: ticks start a few ms before a
        # deadline taken mid-tick, and a strict comparison would put every poll off by a tick.
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
        for task in hints:
            logger.info("watcher: %s of %s on %s finished: checking", task.type, task.vmid, task.node)
            if task.vmid is not None:
                self.probes.hinted(task.vmid, task.node, task.type)
        until = now + timedelta(seconds=self.settings.watch_seconds)
        with write_transaction(self.runtime.engine) as conn:
            watchlist.watch_all(conn, [t.vmid for t in hints if t.vmid is not None], now, until, watchlist.TASK_HINT)

    def _check_watched(self, now: datetime) -> None:
        """Ask about the watched VMIDs that are due, in the cheapest way; read the whole list only
        when that is cheaper, a VMID's node is not known, or a probe found a candidate; act."""
        watches = watchlist.current(self.runtime.engine, now)
        self.watched = sorted(watches)
        self.metrics.watched.set(len(watches))
        self.probes.keep_only(set(watches))
        try:
            look = self.probes.look(watches, now, lambda: self._read_whole(len(watches)))
        except InventoryError as exc:
            self._error(
                exc.kind,
                f"inventory unreadable (probing watched guests), nothing removed, {len(watches)} "
                f"VMIDs still watched: {exc}",
            )
            return
        if look is None:  # nothing due, or the whole list could not be read (said)
            return
        self.last_error = look.odd
        self._act(now, watches, look.statuses, look.inventory)

    def _read_whole(self, watched: int) -> Inventory | None:
        """The whole guest list, or None when it cannot be read surely (said and counted)."""
        try:
            inventory = self.runtime.inventory.read()
        except InventoryError as exc:
            self._error(
                exc.kind,
                f"inventory unreadable, nothing removed, {watched} VMIDs still watched: {exc}",
                refusal_for(exc),
            )
            return None
        if not inventory.guests:  # the table is counted only then
            try:
                check_listing(inventory, self.runtime.table.count())
            except Refused as exc:
                self._error(str(exc.refusal), f"nothing removed: {exc}", exc.refusal)
                return None
        return inventory

    def _act(
        self, now: datetime, watched: Iterable[int], statuses: dict[int, str | None], inventory: Inventory | None
    ) -> None:
        """Act on what this tick learnt: ``statuses`` holds the VMIDs it has an answer for, None
        for one missing from the whole list ``inventory`` (only a whole list says "missing")."""
        missing, stopped, running_again = [], [], []
        for vmid, status in statuses.items():
            if status is None:
                missing.append(vmid)
                continue
            if status == "stopped":
                stopped.append(vmid)
            elif status == "running" and self._last_status.get(vmid) == "stopped":
                running_again.append(vmid)
            self._last_status[vmid] = status

        settled = self._remove_missing(missing, inventory) if missing and inventory is not None else set()
        done = sorted(settled | set(running_again))
        with write_transaction(self.runtime.engine) as conn:
            watchlist.forget(conn, done)
            for vmid in running_again:
                stopmarks.unmark_started(conn, self.runtime.table, vmid)
                self._last_status.pop(vmid, None)
            if stopped and self.settings.stop_status and self.settings.status_column and not self.settings.dry_run:
                stopmarks.mark_stopped(conn, self.runtime.table, stopped, now)
        self.watched = sorted(set(watched) - set(done))
        self.metrics.watched.set(len(self.watched))

    def _remove_missing(self, vmids: list[int], inventory: Inventory) -> set[int]:
        """Send the rows of VMIDs this tick's read did not list through the removal pipeline,
        which plans them against this read and removes nothing before its confirming read.

        Returns the VMIDs that are settled: no row of theirs is left that the pipeline kept
        (young, protected, changed since planning, guest back or hidden).  Kept ones stay
        watched: the grace period may end before the watch does; the sweep is the safety net.
        """
        result = self.removal.run(
            vmids=vmids,
            first=inventory,
            reasons=(Reason.GHOST,),
            dry_run=self.settings.dry_run,
            source="event",
            may_apply=self._may_apply,
        )
        self.hidden = list(result.hidden)
        self.metrics.hidden_guests.labels(source="watcher").set(len(result.hidden))
        if result.outcome in (Outcome.REFUSED, Outcome.FAILED):
            self._error(str(result.refusal or "internal"), f"nothing removed: {result.reason}", result.refusal)
            if result.refusal is not None:
                self.metrics.refusal(str(result.refusal), "watcher")
            return set()
        self._refusal_sent = None
        for vmid in vmids:
            self._last_status.pop(vmid, None)
        for vmid in result.dropped:  # back by the confirming read (migrated, or its VMID reused): look again
            self.probes.lost(vmid)
        if result.outcome == Outcome.DRY_RUN and result.plan is not None:
            for a in result.plan.actions:
                logger.info("DRY-RUN: watcher would %s row %s (VMID %s): %s", a.action, a.row.key, a.row.vmid, a.detail)
        elif result.applied is not None:
            self.metrics.removal(Reason.GHOST, "event", len(result.applied.applied))
            for a in result.applied.applied:
                logger.info("watcher: %s row %s (VMID %s): %s", a.action, a.row.key, a.row.vmid, a.detail)
        return set(vmids) - result.untouched_vmids

    def _may_apply(self) -> bool:
        """Right before a removal applies: is the lease still surely ours?"""
        return self.lease is None or self.lease.still_held()
