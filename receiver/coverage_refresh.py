"""Hook coverage, the reading: a thread on the lease holder keeps ``janitor_coverage`` current.

Each pass (every :data:`LIST_SECONDS`) reads the guest list with its privilege and quorum checks,
forgets the guests no longer listed, reads the configs :func:`receiver.coverage.due_reads` names
at the :class:`~receiver.coverage.Pacer`'s pace, and checks the nodes from one
``/cluster/tasks`` read and the inbox.  Read-only towards Proxmox.  ``pve-janitor coverage`` and
``check`` use the same pieces once.  What only this process knows (node checks, configs it
could not read) is in :class:`Status`, which ``serve`` hands the HTTP side.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from .coverage import MATCH_SECONDS, RETRY_SECONDS, START_STOP_TASKS, Due, NodeCheck, Pacer, Why, due_reads, node_checks
from .coverage_db import event_counts, event_times, forget, hinted, node_counts, oldest_check, read_cache, write
from .db import describe_db_error
from .guestconfig import GuestConfig, read_config
from .model import InventoryError
from .probe import Result
from .timeutil import isoformat, utcnow

if TYPE_CHECKING:
    from .config import Settings
    from .inventory import ProxmoxInventory
    from .metrics import Metrics

logger = logging.getLogger(__name__)

STATUS_EXTENSION = "pve_janitor_coverage"  # app.extensions key of the refresher's Status (serve sets it)
LIST_SECONDS = 300.0  # a pass (guest list, due configs, task list) starts this often
LEADER_POLL_SECONDS = 5.0  # how often a receiver without the lease looks again
FLUSH_EVERY = 25  # config reads written to the cache per transaction
LIST_REQUESTS = 3  # a guest-list read: /access/permissions, /cluster/resources, /cluster/status


class Status:
    """What the refresher knows that the database does not, for the HTTP side: its last node
    checks (None: not looked yet, or this receiver does not hold the lease), the configs it
    could not read, when its last pass ran and how it failed.  Lock-guarded."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nodes: dict[str, NodeCheck] | None = None
        self._unreadable: dict[int, str] = {}
        self._last_pass: datetime | None = None
        self._last_error: str | None = None

    def update(self, **values: Any) -> None:
        with self._lock:
            for name, value in values.items():
                setattr(self, f"_{name}", value)

    @property
    def nodes(self) -> dict[str, NodeCheck] | None:
        with self._lock:
            return dict(self._nodes) if self._nodes is not None else None

    @property
    def unreadable(self) -> dict[int, str]:
        with self._lock:
            return dict(self._unreadable)

    def note_unreadable(self, vmid: int, why: str | None) -> bool:
        """Record (or clear, with None) why a config could not be read; True when that is news."""
        with self._lock:
            news = self._unreadable.get(vmid) != why
            if why is None:
                self._unreadable.pop(vmid, None)
            else:
                self._unreadable[vmid] = why
            return news and why is not None

    def forget(self, vmids: Iterable[int]) -> None:
        with self._lock:
            for vmid in vmids:
                self._unreadable.pop(vmid, None)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"last_pass": self._last_pass, "last_error": self._last_error}


class Refresher:
    """Keeps ``janitor_coverage`` current and checks the nodes; one thread under ``serve``.

    ``leader()`` says whether this receiver holds the lease (serve: ``lambda: watcher.leader``);
    only the lease holder reads, so several receivers do not multiply the load.  ``clock``
    gives the time written to the cache, ``wall`` the unix time tasks are compared with.
    """

    def __init__(
        self,
        engine: Engine,
        inventory: ProxmoxInventory,
        settings: Settings,
        metrics: Metrics | None = None,
        *,
        leader: Callable[[], bool] = lambda: True,
        clock: Callable[[], datetime] = utcnow,
        wall: Callable[[], float] = time.time,
        list_seconds: float = LIST_SECONDS,
        retry_seconds: float = RETRY_SECONDS,
        log_findings: bool = True,
    ):
        self._engine = engine
        self._inventory = inventory
        self._period = timedelta(hours=settings.coverage_hours)
        self._metrics = metrics
        self._leader = leader
        self._clock = clock
        self._wall = wall
        self._list_seconds = list_seconds
        self._retry = timedelta(seconds=retry_seconds)
        self._stop = threading.Event()
        self.pacer = Pacer(settings.coverage_rps, wait=self._stop.wait)
        self.status = Status()
        self._failed: dict[int, datetime] = {}
        self._credit = 0.0
        self._last_pass: float | None = None  # monotonic start of the last pass while leading
        self._thread: threading.Thread | None = None
        self._log_findings = log_findings
        self._flagged: set[str] = set()  # nodes flagged at the last look, said once

    # --- thread ------------------------------------------------------------------------

    def start(self) -> Refresher:
        self._thread = threading.Thread(target=self._run, name="pve-janitor-coverage", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the thread: a config read in flight finishes and is written."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._leader():
                self._step_down()
                self._stop.wait(LEADER_POLL_SECONDS)
                continue
            started = time.monotonic()
            try:
                self.run_pass()
                self.status.update(last_error=None)
            except InventoryError as exc:
                logger.warning("coverage: pass stopped, Proxmox could not be read (%s); next pass as planned", exc)
                self.status.update(last_error=str(exc))
            except SQLAlchemyError as exc:
                logger.warning("coverage: pass stopped on a database error %s", describe_db_error(exc))
                self.status.update(last_error=f"database: {describe_db_error(exc)}")
            except Exception:  # the thread must survive anything; the log says what
                logger.exception("coverage: pass failed unexpectedly")
                self.status.update(last_error="unexpected error (see the log)")
            self._stop.wait(max(0.0, self._list_seconds - (time.monotonic() - started)))

    def _step_down(self) -> None:
        """Another receiver holds the lease: what this one found last is no longer current."""
        if self._last_pass is None:
            return
        self._last_pass, self._credit = None, 0.0
        self.status.update(nodes=None)
        if self._metrics is not None:
            self._metrics.coverage_nodes({})

    # --- one pass ----------------------------------------------------------------------

    def run_pass(self) -> Counter[str]:
        """One pass: the guest list, the configs due, the task list; the counts.

        Raises InventoryError when the guest or task list cannot be read (what was read of
        configs is written first) and SQLAlchemyError when the cache cannot be."""
        started = time.monotonic()
        elapsed = started - self._last_pass if self._last_pass is not None else 0.0
        self._last_pass = started
        listed = self.list_guests()
        if listed is None:
            return Counter()
        counts = self.refresh(listed, elapsed=elapsed)
        counts["nodes_flagged"] = sum(c.flagged for c in (self.check_nodes() or {}).values())
        logger.info(
            "coverage: %d guests listed, %d configs read (%d changed, %d unchanged, %d unreadable), "
            "%d forgotten, %d nodes flagged",
            len(listed),
            counts["read"],
            counts["changed"],
            counts["unchanged"],
            counts["unreadable"],
            counts["forgotten"],
            counts["nodes_flagged"],
        )
        return counts

    def refresh(
        self, listed: Mapping[int, tuple[str, str]], *, elapsed: float = 0.0, everything: bool = False
    ) -> Counter[str]:
        """Forget the guests no longer listed, then read the configs due (``everything``: every
        listed guest's, for ``pve-janitor coverage --refresh``); ``elapsed`` seconds since the
        last pass earn the even pace's credit."""
        now = self._clock()
        with self._engine.connect() as conn:
            cached = read_cache(conn)
            hints = hinted(conn, cached)
        counts: Counter[str] = Counter()
        gone = set(cached) - set(listed)
        if gone and listed:  # an empty list while guests are cached proves nothing: kept
            counts["forgotten"] = forget(self._engine, gone)
            self.status.forget(gone)
            for vmid in gone:
                cached.pop(vmid)
                self._failed.pop(vmid, None)
        if everything:
            due = [Due(v, node, kind, Why.ASKED) for v, (node, kind) in sorted(listed.items())]
        else:
            earned = self._credit + len(listed) * elapsed / self._period.total_seconds()
            due, self._credit = due_reads(
                listed, cached, now, self._period, earned, hinted=hints, failed=self._failed, retry=self._retry
            )
        counts.update(self.read_configs(due))
        self.status.update(last_pass=now)
        return counts

    def list_guests(self) -> dict[int, tuple[str, str]] | None:
        """VMID -> (node, type) of every guest that can start (templates and guests being
        destroyed left out); None when told to stop first."""
        if not self.pacer.take(LIST_REQUESTS):
            return None
        guests = self._inventory.read().guests
        return {v: (g.node, g.type) for v, g in guests.items() if not g.template and g.lock != "destroyed"}

    def read_configs(self, due: Sequence[Due]) -> Counter[str]:
        """Read these configs at the pace, into the cache in batches; stops early when told to
        stop, when the lease is lost, or when the token is refused."""
        counts: Counter[str] = Counter()
        batch: list[GuestConfig] = []
        try:
            for item in due:
                if self._stop.is_set() or not self._leader() or not self.pacer.take():
                    break
                found = read_config(self._inventory, item.node, item.type, item.vmid)
                counts["read"] += 1
                batch.append(found)
                self._note(found, counts)
                if found.result is Result.AUTH:
                    break
                if len(batch) >= FLUSH_EVERY:
                    counts.update(write(self._engine, batch, self._clock()))
                    batch = []
        finally:
            if batch:
                counts.update(write(self._engine, batch, self._clock()))
        return counts

    def _note(self, found: GuestConfig, counts: Counter[str]) -> None:
        if found.result in (Result.PRESENT, Result.GONE):
            self._failed.pop(found.vmid, None)
            self.status.note_unreadable(found.vmid, None)
            return
        counts["unreadable"] += 1
        self._failed[found.vmid] = self._clock()
        news = self.status.note_unreadable(found.vmid, f"{found.result.value}: {found.detail}")
        if news and self._log_findings:
            logger.warning(
                "coverage: the config of %s %d on %s could not be read (%s: %s); asked again in %s",
                found.type,
                found.vmid,
                found.node,
                found.result.value,
                found.detail,
                self._retry,
            )

    def check_nodes(self) -> dict[str, NodeCheck] | None:
        """The node checks from one ``/cluster/tasks`` read and the inbox; None when told to stop."""
        if not self.pacer.take():
            return None
        tasks = [t for t in self._inventory.tasks() if t.type in START_STOP_TASKS and t.vmid is not None]
        with self._engine.connect() as conn:
            hooked = {v for v, c in read_cache(conn).items() if c.has_hook}
            relevant = [t for t in tasks if t.vmid in hooked]
            since = min(((t.starttime or t.endtime or 0) for t in relevant), default=0) - MATCH_SECONDS
            events = event_times(conn, {t.vmid for t in relevant if t.vmid is not None}, since)
        checks = node_checks(tasks, hooked, events, self._wall())
        self.status.update(nodes=checks)
        if self._metrics is not None:
            self._metrics.coverage_nodes({node: check.flagged for node, check in checks.items()})
        flagged = {node for node, check in checks.items() if check.flagged}
        for node in sorted(flagged - self._flagged) if self._log_findings else ():
            logger.warning(
                "coverage: node %s sent no event for %d starts/stops of guests whose config names "
                "pve-janitor's hookscript%s",
                node,
                checks[node].tasks,
                f" ({checks[node].hook_errors} failed on the hookscript)" if checks[node].hook_errors else "",
            )
        for node in sorted(self._flagged - flagged) if self._log_findings else ():
            logger.info("coverage: node %s sends events again (or its flagged tasks left its task list)", node)
        self._flagged = flagged
        return checks


def stats(conn: sa.Connection, status: Status | None) -> dict[str, Any]:
    """The stats' ``coverage`` key: cached guests and those without the hook, the oldest check,
    and per node its guests, events (from the inbox) and flag (None while this receiver has not
    looked: it does not hold the lease, or has not finished a pass)."""
    counts = node_counts(conn)
    events = event_counts(conn)
    checks = status.nodes if status is not None else None
    nodes: dict[str, Any] = {}
    for node in sorted(set(counts) | set(events) | set(checks or ())):
        guests, without = counts.get(node, (0, 0))
        seen = events.get(node, {"last_event": None, "events": {}})
        nodes[node] = {
            "last_event": isoformat(seen["last_event"]),
            "events": seen["events"],
            "flagged": None if checks is None else node in checks and checks[node].flagged,
            "guests": guests,
            "without_hook": without,
        }
    at = oldest_check(conn)
    return {
        "guests": sum(n for n, _ in counts.values()),
        "without_hook": sum(w for _, w in counts.values()),
        "checked_at": isoformat(at),
        "unreadable": sorted(status.unreadable) if status is not None else None,
        "nodes": nodes,
    }
