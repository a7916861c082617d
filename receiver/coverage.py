"""Hook coverage, the decisions: which guest configs to read and when, how fast, and which
nodes sent no event while their hooked guests started and stopped.  Pure, no I/O.

Only ``root@pam`` can attach the hookscript, so a guest without it is a silent gap: its stop
sends nothing, and its ghost waits for the sweep.  Finding those guests takes each guest's
config (:mod:`receiver.guestconfig`), one request each: no list carries the hookscript or the
config's digest.  So the reads are spread (docs/coverage.md says why this way):

* new and moved guests first, then guests cached without the hook that sent an event since
  (someone attached it), then those checked longer ago than ``CLEANUP_COVERAGE_HOURS``, then
  the oldest others at the even pace *guests / CLEANUP_COVERAGE_HOURS* (:func:`due_reads`):
  every guest is read about once per period and the load is flat, not a burst a day;
* every request waits its turn at a :class:`Pacer`: at most ``CLEANUP_COVERAGE_RPS`` a second.

A node is flagged (:func:`node_checks`) when the guests whose config names the hook started
or stopped there (its recent task list) and not one event came for it.
:mod:`receiver.coverage_db` keeps the cache, :mod:`receiver.coverage_refresh` reads.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from .model import Task, Word

RETRY_SECONDS = 3600.0  # a config that could not be read is asked again after this long
SETTLE_SECONDS = 60  # a task counts for the node checks once it ended this long ago
MATCH_SECONDS = 60  # an event counts for a task when the hook ran within this of the task
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
