"""Task records and task lists, as the simulated cluster keeps them.

Every guest operation leaves a task (PROXMOX.md facts, API: ``/cluster/tasks``); the
watcher's task tail reads them to notice the destroy of a guest that was already
stopped, which fires no hook.  A task is running until it has an ``endtime`` and a
``status``; the list keeps the running ones plus the last ``FINISHED_TASKS_KEPT``
finished ones.
"""

from __future__ import annotations

import itertools
import re
import threading
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Optional

# PROXMOX.md facts, API /cluster/tasks: running tasks plus about 25 recent finished ones.
FINISHED_TASKS_KEPT = 25

_UPID_RE = re.compile(
    r"^UPID:(?P<node>[^:]+):(?P<pid>[0-9A-F]{8}):(?P<pstart>[0-9A-F]{8}):"
    r"(?P<starttime>[0-9A-F]{8}):(?P<type>[^:]*):(?P<id>[^:]*):(?P<user>[^:]+):$"
)


@dataclass
class Task:
    node: str
    type: str
    id: str
    user: str
    pid: int
    pstart: int
    starttime: int
    endtime: Optional[int] = None
    status: Optional[str] = None

    @property
    def upid(self) -> str:
        # pve-common UPID.pm: UPID:<node>:<pid %08X>:<pstart %08X>:<starttime %08X>:<type>:<id>:<user>:
        return "UPID:%s:%08X:%08X:%08X:%s:%s:%s:" % (
            self.node, self.pid, self.pstart, self.starttime, self.type, self.id, self.user,
        )

    def as_api(self) -> dict:
        entry = {
            "upid": self.upid, "node": self.node, "pid": self.pid, "pstart": self.pstart,
            "starttime": self.starttime, "type": self.type, "id": self.id, "user": self.user,
        }
        if self.endtime is not None:  # status and endtime are absent while a task runs
            entry["endtime"] = self.endtime
            entry["status"] = self.status
        return entry


def parse_upid(upid: str) -> Optional[dict]:
    """Split a UPID into its fields (pve-common ``UPID.pm`` format); numbers as ints. None if malformed."""
    match = _UPID_RE.match(upid)
    if not match:
        return None
    fields = match.groupdict()
    for key in ("pid", "pstart", "starttime"):
        fields[key] = int(fields[key], 16)
    return fields


class TaskLog:
    """The cluster's tasks: running ones, and the last finished ones (oldest dropped first)."""

    def __init__(self, nodes: Iterable[str], user: str):
        self.user = user
        self._pstart = {node: 1000 + 977 * i for i, node in enumerate(nodes)}
        self._pids = itertools.count(0x2000)
        self._lock = threading.Lock()
        self._running: list = []
        self._finished: deque = deque(maxlen=FINISHED_TASKS_KEPT)

    def new(self, node: str, task_type: str, vmid: int, starttime: int) -> Task:
        """A task record of ``self.user`` (not yet listed: see ``start`` and ``record``)."""
        with self._lock:
            return Task(node=node, type=task_type, id=str(vmid), user=self.user,
                        pid=next(self._pids), pstart=self._pstart[node], starttime=starttime)

    def start(self, task: Task) -> None:
        """List ``task`` as running until ``finish``."""
        with self._lock:
            self._running.append(task)

    def finish(self, task: Task, endtime: int, status: str) -> None:
        with self._lock:
            if task not in self._running:
                return
            self._running.remove(task)
            task.endtime, task.status = max(task.starttime, endtime), status
            self._finished.append(task)

    def record(self, node: str, task_type: str, vmid: int, starttime: int, status: str,
               endtime: int) -> None:
        """A task that has already finished (a stop, start or migration: done at once here)."""
        task = self.new(node, task_type, vmid, starttime)
        task.endtime, task.status = max(starttime, endtime), status
        with self._lock:
            self._finished.append(task)

    def cluster_list(self) -> list:
        """``/cluster/tasks``: running tasks plus the last finished ones, newest first."""
        with self._lock:
            running = sorted(self._running, key=lambda t: t.starttime, reverse=True)
            finished = list(reversed(self._finished))
        return [task.as_api() for task in running + finished]
