"""Hook coverage: which guests would never send an event, and which nodes sent none.

Only ``root@pam`` can attach the hookscript, so a guest without it is a silent gap: its stop
sends nothing, and its ghost waits for the sweep.  This module finds those guests from each
guest's config (:mod:`receiver.guestconfig`), and the nodes whose guests started and stopped
without a single event from them, and keeps what it found in ``janitor_coverage`` (its only
writer and cleaner).  Read-only towards Proxmox, like everything else.

What is read, and how often (docs/coverage.md says why):

* the guest list, with its privilege and quorum checks (``inventory.read()``), once a pass
  (every :data:`LIST_SECONDS`);
* guests' configs, one request each (no list carries the hookscript or the config digest):
  new and moved guests first, then guests cached without the hook that sent an event since
  (someone attached it), then those checked longer ago than ``CLEANUP_COVERAGE_HOURS``, then
  the oldest others at the even pace *guests / CLEANUP_COVERAGE_HOURS*, so every guest is read
  about once per period and the load is flat, not a burst a day;
* ``/cluster/tasks`` once a pass, for the node checks.

Every request waits its turn at a :class:`Pacer`: at most ``CLEANUP_COVERAGE_RPS`` a second.
A config whose digest is the one cached keeps its cached verdict (only ``checked_at`` moves).
The decisions (:func:`due_reads`, :func:`node_checks`) are pure; :class:`Refresher` does the
I/O, on the lease holder only when ``serve`` runs it, or once for ``pve-janitor coverage``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from . import store
from .db import chunks, describe_db_error, write_transaction
from .guestconfig import GuestConfig, read_config
from .model import InventoryError, Task, Word
from .probe import Result
from .timeutil import isoformat, utcnow

if TYPE_CHECKING:
    from .config import Settings
    from .inventory import ProxmoxInventory
    from .metrics import Metrics

logger = logging.getLogger(__name__)

STATUS_EXTENSION = "pve_janitor_coverage"  # app.extensions key of the refresher's Status (serve sets it)
LIST_SECONDS = 300.0  # a pass (guest list, due configs, task list) starts this often
RETRY_SECONDS = 3600.0  # a config that could not be read is asked again after this long
LEADER_POLL_SECONDS = 5.0  # how often a receiver without the lease looks again
SETTLE_SECONDS = 60  # a task counts for the node checks once it ended this long ago
MATCH_SECONDS = 60  # an event counts for a task when the hook ran within this of the task
FLUSH_EVERY = 25  # config reads written to the cache per transaction
LIST_REQUESTS = 3  # a guest-list read: /access/permissions, /cluster/resources, /cluster/status
# The tasks that run a guest's hook phases (PROXMOX.md, Hookscripts): its starts and stops.
START_STOP_TASKS = frozenset({"vzstart", "vzstop", "vzshutdown", "qmstart", "qmstop", "qmshutdown"})


class Why(Word):
    """Why a config is read in this pass."""

    NEW = "new"  # listed, not cached
    MOVED = "moved"  # cached on another node or as another type
    EVENT = "event"  # cached without the hook, but it sent an event since
    STALE = "stale"  # checked longer ago than CLEANUP_COVERAGE_HOURS
    SPREAD = "spread"  # the oldest others, at the even pace
    ASKED = "asked"  # pve-janitor coverage --refresh


@dataclass(frozen=True)
class Cached:
    """One row of ``janitor_coverage``."""

    vmid: int
    node: str
    type: str
    digest: str | None
    hookscript: str | None
    has_hook: bool
    checked_at: datetime


@dataclass(frozen=True)
class Due:
    vmid: int
    node: str
    type: str
    why: Why


@dataclass(frozen=True)
class NodeCheck:
    """A node's recent starts and stops of guests whose config names the hook, and its events.

    ``tasks``: finished start/stop tasks of such guests in the node's recent task list;
    ``missed``: those during which no event came from the guest; ``hook_errors``: those that
    failed on the hookscript itself (Proxmox's "hookscript error ...": e.g. the file is not
    in that node's snippets directory, which aborts a start).
    """

    node: str
    tasks: int = 0
    missed: int = 0
    hook_errors: int = 0

    @property
    def flagged(self) -> bool:
        """The node sent no event at all while its hooked guests started and stopped."""
        return self.tasks > 0 and self.missed == self.tasks


# --- decisions (pure) ----------------------------------------------------------------


def due_reads(
    listed: Mapping[int, tuple[str, str]],
    cached: Mapping[int, Cached],
    now: datetime,
    period: timedelta,
    credit: float,
    *,
    hinted: Collection[int] = (),
    failed: Mapping[int, datetime] | None = None,
    retry: timedelta = timedelta(seconds=RETRY_SECONDS),
) -> tuple[list[Due], float]:
    """The config reads of one pass, in order, and the spread credit left for the next.

    ``listed``: VMID -> (node, type) from the guest list.  ``credit``: re-reads earned at the
    even pace (guests / period) since the last pass, fractions carried over; stale reads spend
    it first, the oldest others take what is left, whole reads only.  A VMID in ``failed``
    (its config could not be read at that time) waits ``retry`` before it is asked again.
    """
    failed = failed or {}
    first: list[Due] = []
    stale: list[tuple[datetime, Due]] = []
    others: list[tuple[datetime, Due]] = []
    for vmid, (node, kind) in sorted(listed.items()):
        if vmid in failed and now - failed[vmid] < retry:
            continue
        entry = cached.get(vmid)
        if entry is None:
            first.append(Due(vmid, node, kind, Why.NEW))
        elif (entry.node, entry.type) != (node, kind):
            first.append(Due(vmid, node, kind, Why.MOVED))
        elif vmid in hinted and not entry.has_hook:
            first.append(Due(vmid, node, kind, Why.EVENT))
        elif now - entry.checked_at >= period:
            stale.append((entry.checked_at, Due(vmid, node, kind, Why.STALE)))
        else:
            others.append((entry.checked_at, Due(vmid, node, kind, Why.SPREAD)))
    stale.sort(key=lambda pair: pair[0])
    others.sort(key=lambda pair: pair[0])
    credit = max(0.0, credit - len(stale))
    spread = [due for _, due in others[: int(credit)]]
    credit = min(credit - len(spread), float(max(1, len(listed))))
    return first + [due for _, due in stale] + spread, credit


def node_checks(
    tasks: Iterable[Task], hooked: Collection[int], event_times: Mapping[int, Sequence[float]], now: float
) -> dict[str, NodeCheck]:
    """Per node in the task list: its finished starts and stops of hooked guests, and those
    without an event from the guest between the task's start and end (``MATCH_SECONDS``
    either side: the hook's clock is the node's, as the task's).  A task ended less than
    ``SETTLE_SECONDS`` before ``now`` (unix seconds) is left for the next look."""
    counts: dict[str, Counter[str]] = {}
    for task in tasks:
        seen = counts.setdefault(task.node, Counter())
        if (
            task.type not in START_STOP_TASKS
            or task.vmid is None
            or task.vmid not in hooked
            or not task.endtime
            or task.endtime > now - SETTLE_SECONDS
        ):
            continue
        seen["tasks"] += 1
        start = (task.starttime or task.endtime) - MATCH_SECONDS
        if not any(start <= ts <= task.endtime + MATCH_SECONDS for ts in event_times.get(task.vmid, ())):
            seen["missed"] += 1
        if (task.status or "").startswith("hookscript error"):
            seen["hook_errors"] += 1
    return {
        node: NodeCheck(node, seen["tasks"], seen["missed"], seen["hook_errors"])
        for node, seen in sorted(counts.items())
        if node
    }


class Pacer:
    """Starts at most ``rps`` requests a second: each start at least ``1/rps`` after the last.

    ``take(n)`` waits for the next start and books ``n`` slots (a guest-list read is three
    requests).  ``wait(seconds)`` returns True when the waiting should stop (a stop event's
    ``wait``); ``take`` then returns False.
    """

    def __init__(
        self,
        rps: float,
        clock: Callable[[], float] = time.monotonic,
        wait: Callable[[float], bool] | None = None,
    ):
        self.interval = 1.0 / rps
        self._clock = clock
        self._wait = wait or _sleep
        self._next = float("-inf")
        self._lock = threading.Lock()

    def take(self, requests: int = 1) -> bool:
        with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + requests * self.interval
        return start <= now or not self._wait(start - now)


def _sleep(seconds: float) -> bool:
    time.sleep(seconds)
    return False


# --- janitor_coverage and what the inbox says ----------------------------------------


def read_cache(conn: sa.Connection) -> dict[int, Cached]:
    t = store.coverage
    return {
        int(r.vmid): Cached(int(r.vmid), r.node, r.type, r.digest, r.hookscript, bool(r.has_hook), r.checked_at)
        for r in conn.execute(sa.select(t))
    }


def node_counts(conn: sa.Connection) -> dict[str, tuple[int, int]]:
    """node -> (guests cached, of them without pve-janitor's hookscript)."""
    t = store.coverage
    without = sa.func.sum(sa.case((t.c.has_hook == sa.false(), 1), else_=0))
    rows = conn.execute(sa.select(t.c.node, sa.func.count(), without).group_by(t.c.node))
    return {node: (int(n), int(w or 0)) for node, n, w in rows}


def oldest_check(conn: sa.Connection) -> datetime | None:
    """When the least recently read of the cached configs was read."""
    at = conn.execute(sa.select(sa.func.min(store.coverage.c.checked_at))).scalar()
    return store.UTCDateTime().process_result_value(at, None)


def event_counts(conn: sa.Connection) -> dict[str, dict[str, Any]]:
    """node -> {"last_event": received_at of its newest, "events": {phase: n}}, from the inbox
    (processed events are kept 7 days)."""
    t = store.inbox
    rows = conn.execute(
        sa.select(t.c.node, t.c.phase, sa.func.count(), sa.func.max(t.c.received_at)).group_by(t.c.node, t.c.phase)
    )
    found: dict[str, dict[str, Any]] = {}
    for node, phase, n, at in rows:
        entry = found.setdefault(node, {"last_event": None, "events": {}})
        entry["events"][phase] = int(n)
        received = store.UTCDateTime().process_result_value(at, None)
        if received is not None and (entry["last_event"] is None or received > entry["last_event"]):
            entry["last_event"] = received
    return found


def _event_times(conn: sa.Connection, vmids: Collection[int], since: float) -> dict[int, list[float]]:
    t = store.inbox
    found: dict[int, list[float]] = {}
    for part in chunks(sorted(vmids)):
        for vmid, ts in conn.execute(sa.select(t.c.vmid, t.c.ts).where(t.c.vmid.in_(part), t.c.ts >= since)):
            found.setdefault(int(vmid), []).append(float(ts))
    return found


def _hinted(conn: sa.Connection, cached: Mapping[int, Cached]) -> set[int]:
    """Guests cached without the hook that sent an event after their config was read."""
    t = store.inbox
    silent = sorted(v for v, c in cached.items() if not c.has_hook)
    found: set[int] = set()
    for part in chunks(silent):
        query = sa.select(t.c.vmid, sa.func.max(t.c.received_at)).where(t.c.vmid.in_(part)).group_by(t.c.vmid)
        for vmid, at in conn.execute(query):
            received = store.UTCDateTime().process_result_value(at, None)
            if received is not None and received > cached[int(vmid)].checked_at:
                found.add(int(vmid))
    return found


def _write(engine: Engine, found: Sequence[GuestConfig], now: datetime) -> Counter[str]:
    """Configs read into the cache: the digest cached already, only ``checked_at``; another, the
    whole row; a guest gone meanwhile, its row dropped.  Once more on a key conflict (another
    process wrote the same guest between our read and our insert)."""
    for attempt in (1, 2):
        try:
            return _write_once(engine, found, now)
        except IntegrityError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _write_once(engine: Engine, found: Sequence[GuestConfig], now: datetime) -> Counter[str]:
    t = store.coverage
    counts: Counter[str] = Counter()
    present = [f for f in found if f.result is Result.PRESENT]
    gone = [f.vmid for f in found if f.result is Result.GONE]
    with write_transaction(engine) as conn:
        before = {
            int(r.vmid): (r.digest, r.node, r.type)
            for part in chunks(sorted({f.vmid for f in present}))
            for r in conn.execute(sa.select(t.c.vmid, t.c.digest, t.c.node, t.c.type).where(t.c.vmid.in_(part)))
        }
        same = [f for f in present if before.get(f.vmid) == (f.digest, f.node, f.type)]
        changed = [f for f in present if before.get(f.vmid) != (f.digest, f.node, f.type)]
        if same:
            touch = t.update().where(t.c.vmid == sa.bindparam("b_vmid")).values(checked_at=sa.bindparam("b_at"))
            conn.execute(touch, [{"b_vmid": f.vmid, "b_at": now} for f in same])
        for part in chunks(sorted({f.vmid for f in changed} | set(gone))):
            conn.execute(t.delete().where(t.c.vmid.in_(part)))
        if changed:
            rows = [
                {
                    "vmid": f.vmid,
                    "node": f.node,
                    "type": f.type,
                    "digest": f.digest,
                    "hookscript": f.hookscript,
                    "has_hook": f.has_hook,
                    "checked_at": now,
                }
                for f in changed
            ]
            conn.execute(t.insert(), rows)
    counts.update(unchanged=len(same), changed=len(changed), gone=len(gone))
    return counts


def forget(engine: Engine, vmids: Collection[int]) -> int:
    """Drop the cached configs of guests no longer listed."""
    t = store.coverage
    removed = 0
    with write_transaction(engine) as conn:
        for part in chunks(sorted(vmids)):
            removed += conn.execute(t.delete().where(t.c.vmid.in_(part))).rowcount
    return removed


# --- the refresher ---------------------------------------------------------------------


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
            hinted = _hinted(conn, cached)
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
                listed, cached, now, self._period, earned, hinted=hinted, failed=self._failed, retry=self._retry
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
                    counts.update(_write(self._engine, batch, self._clock()))
                    batch = []
        finally:
            if batch:
                counts.update(_write(self._engine, batch, self._clock()))
        return counts

    def _note(self, found: GuestConfig, counts: Counter[str]) -> None:
        if found.result in (Result.PRESENT, Result.GONE):
            self._failed.pop(found.vmid, None)
            self.status.note_unreadable(found.vmid, None)
            return
        counts["unreadable"] += 1
        self._failed[found.vmid] = self._clock()
        if self.status.note_unreadable(found.vmid, f"{found.result.value}: {found.detail}"):
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
            events = _event_times(conn, {t.vmid for t in relevant if t.vmid is not None}, since)
        checks = node_checks(tasks, hooked, events, self._wall())
        self.status.update(nodes=checks)
        if self._metrics is not None:
            self._metrics.coverage_nodes({node: check.flagged for node, check in checks.items()})
        for check in checks.values():
            if check.flagged:
                logger.warning(
                    "coverage: node %s sent no event for %d starts/stops of guests whose config names "
                    "pve-janitor's hookscript%s",
                    check.node,
                    check.tasks,
                    f" ({check.hook_errors} failed on the hookscript)" if check.hook_errors else "",
                )
        return checks


def stats(conn: sa.Connection, status: Status | None) -> dict[str, Any]:
    """The stats' ``coverage`` key: cached guests and those without the hook, the oldest check,
    and per node its guests, events (from the inbox) and flag (None where this receiver has
    not looked: it does not hold the lease, or has not finished a pass)."""
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
            "flagged": checks[node].flagged if checks is not None and node in checks else None,
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
