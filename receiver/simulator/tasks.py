"""Task records, each node's task archive, and the task lists the API answers from them.

Every guest operation leaves a task (PROXMOX.md facts, API: ``/cluster/tasks``); the
watcher's task tail reads them to notice the destroy of a guest that was already
stopped, which fires no hook.  A task is running until it has an ``endtime`` and a
``status``.  Each node keeps:

- its **archive** of finished tasks, as pve-common ``RESTEnvironment.pm``
  ``active_workers`` appends them to ``/var/log/pve/tasks/index`` (rotated to
  ``index.1`` past 50,000 bytes; ``/nodes/{node}/tasks`` reads both files);
- its **broadcast list**, what pve-cluster ``PVE/Cluster.pm`` ``broadcast_tasklist``
  puts into pmxcfs: the running tasks plus (25 - running) newest finished ones, older
  entries dropped until the JSON is under 32 KiB.  ``/cluster/tasks`` concatenates
  these lists, and an offline node's last one stays there (see ``TaskLog.set_online``).
"""

from __future__ import annotations

import heapq
import itertools
import json
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

# pve-common RESTEnvironment.pm active_workers: "my $MAX_FINISHED = 25", running ones included.
FINISHED_TASKS_KEPT = 25
# pve-cluster PVE/Cluster.pm broadcast_tasklist: "may not get bigger than 32kb (CFS_MAX_STATUS_SIZE)".
BROADCAST_MAX_BYTES = 32 * 1024
# pve-common RESTEnvironment.pm active_workers: "my $maxsize = 50000; # about 1000 entries".
ARCHIVE_ROTATE_BYTES = 50000
# pve-common PVE/Tools.pm upid_normalize_status_type: the four kinds statusfilter names.
STATUS_TYPES = ("ok", "warning", "error", "unknown")

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
    endtime: int | None = None
    status: str | None = None

    @property
    def upid(self) -> str:
        # pve-common UPID.pm: UPID:<node>:<pid %08X>:<pstart %08X>:<starttime %08X>:<type>:<id>:<user>:
        return "UPID:%s:%08X:%08X:%08X:%s:%s:%s:" % (
            self.node,
            self.pid,
            self.pstart,
            self.starttime,
            self.type,
            self.id,
            self.user,
        )

    def as_api(self) -> dict:
        entry = {
            "upid": self.upid,
            "node": self.node,
            "pid": self.pid,
            "pstart": self.pstart,
            "starttime": self.starttime,
            "type": self.type,
            "id": self.id,
            "user": self.user,
        }
        if self.endtime is not None:  # status and endtime are absent while a task runs
            entry["endtime"] = self.endtime
            entry["status"] = self.status
        return entry

    def index_line(self) -> str:
        # pve-common RESTEnvironment.pm active_workers: "%s %08X %s\n" (upid, endtime, status).
        return "%s %08X %s\n" % (self.upid, self.endtime or 0, self.status)


def parse_upid(upid: str) -> dict | None:
    """Split a UPID into its fields (pve-common ``UPID.pm`` format); numbers as ints. None if malformed."""
    match = _UPID_RE.match(upid)
    if not match:
        return None
    fields = match.groupdict()
    for key in ("pid", "pstart", "starttime"):
        fields[key] = int(fields[key], 16)
    return fields


def split_token_user(entry: dict) -> dict:
    """pve-manager ``API2/Cluster.pm`` ``tasks`` and ``API2/Tasks.pm`` ``$convert_token_task``: a
    task of ``user@realm!name`` is shown with ``user: user@realm`` and ``tokenid: name``."""
    user, sep, name = entry["user"].partition("!")
    if sep:
        entry = dict(entry, user=user, tokenid=name)
    return entry


def may_see_own(entry: dict, caller: str) -> bool:
    """pve-manager ``API2/Tasks.pm`` ``$check_task_user`` (on a converted entry): "token only
    sees token tasks, user sees user + token tasks"."""
    if entry.get("tokenid"):
        return caller in ("%s!%s" % (entry["user"], entry["tokenid"]), entry["user"])
    return caller == entry["user"]


def status_type(status: str | None) -> str:
    """pve-common ``PVE/Tools.pm`` ``upid_normalize_status_type``."""
    if not status:
        return "unknown"
    if status == "OK":
        return "ok"
    if re.fullmatch(r"WARNINGS: \d+", status):
        return "warning"
    if status == "unexpected status":
        return "unknown"
    return "error"


class TaskQueryError(ValueError):
    """Bad ``/nodes/{node}/tasks`` parameters: ``errors`` maps each to its message."""

    def __init__(self, errors: dict):
        super().__init__("Parameter verification failed.")
        self.errors = errors


@dataclass(frozen=True)
class TaskQuery:
    """The filters of ``GET /nodes/{node}/tasks`` (pve-manager ``API2/Tasks.pm`` ``node_tasks``),
    with its defaults: ``source`` archive, ``start`` 0, ``limit`` 50."""

    start: int = 0
    limit: int = 50
    userfilter: str | None = None
    typefilter: str | None = None
    vmid: int | None = None
    errors: bool = False
    source: str = "archive"
    since: int | None = None
    until: int | None = None
    statusfilter: str | None = None

    @classmethod
    def parse(cls, query: dict) -> TaskQuery:
        """From a parsed query string (``{name: [value]}``); raises ``TaskQueryError`` naming every
        bad parameter, as Proxmox's parameter verification does."""
        values: dict[str, Any] = {}
        errors: dict[str, str] = {}
        for name in ("start", "limit", "vmid", "since", "until"):
            raw = (query.get(name) or [None])[0]
            if raw is None:
                continue
            if not re.fullmatch(r"-?\d+", raw):
                errors[name] = "type check ('integer') failed - got '%s'" % raw
            elif name in ("start", "limit") and int(raw) < 0:
                errors[name] = "value must have a minimum value of 0"
            else:
                values[name] = int(raw)
        for name in ("userfilter", "typefilter", "statusfilter", "source"):
            raw = (query.get(name) or [None])[0]
            if raw is not None:
                values[name] = raw
        if values.get("source", "archive") not in ("archive", "active", "all"):
            errors["source"] = (
                "value '%s' does not have a value in the enumeration 'archive, active, all'" % (values["source"])
            )
        errors_raw = (query.get("errors") or [None])[0]
        if errors_raw is not None:
            if errors_raw.lower() not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
                errors["errors"] = "type check ('boolean') failed - got '%s'" % errors_raw
            values["errors"] = errors_raw.lower() in ("1", "true", "yes", "on")
        unknown = set(query) - {f for f in cls.__dataclass_fields__} - {"node"}
        errors.update(
            {
                name: "property is not defined in schema and the schema does not allow additional properties"
                for name in unknown
            }
        )
        if errors:
            raise TaskQueryError(errors)
        return cls(**values)

    def status_types(self) -> set:
        # node_tasks: statusfilter counts only without errors; errors drops "ok" from all four.
        if self.statusfilter is not None and not self.errors:
            return {s.lower() for s in re.split(r"[\s,;]+", self.statusfilter) if s}
        return set(STATUS_TYPES) - ({"ok"} if self.errors else set())


class _Node:
    """One node's tasks: running ones, the archive (``index`` and ``index.1``), the last broadcast."""

    def __init__(self, pstart: int):
        self.pstart = pstart
        self.running: list = []
        self.index: list = []  # finished tasks, in the order they were archived
        self.index_bytes = 0
        self.index_old: list = []  # index.1
        self.broadcast: list = []
        self.online = True

    def archive(self, task: Task) -> None:
        self.index.append(task)
        self.index_bytes += len(task.index_line())
        if self.index_bytes > ARCHIVE_ROTATE_BYTES:  # rename index -> index.1 (the old .1 is gone)
            self.index_old, self.index, self.index_bytes = self.index, [], 0

    def archived_newest_first(self) -> list:
        """The index files read backwards, as ``node_tasks`` does with File::ReadBackwards."""
        return self.index[::-1] + self.index_old[::-1]

    def tasklist(self) -> list:
        """pve-common ``RESTEnvironment.pm`` ``active_workers``: running tasks, then finished ones by
        starttime, newest first, 25 in all; pve-cluster ``broadcast_tasklist`` then pops the
        oldest until the JSON is under 32 KiB."""
        running = sorted(self.running, key=lambda t: (t.starttime, t.pid), reverse=True)
        finished = heapq.nlargest(
            max(0, FINISHED_TASKS_KEPT - len(running)), self.index + self.index_old, key=lambda t: (t.starttime, t.pid)
        )
        entries = [t.as_api() for t in running + finished]
        while entries and len(json.dumps(entries, separators=(",", ":"))) >= BROADCAST_MAX_BYTES:
            entries.pop()
        return entries


class TaskLog:
    """Every node's tasks.  ``user`` is who the simulator's own operations run as."""

    def __init__(self, nodes: Iterable[str], user: str):
        self.user = user
        self._nodes = {node: _Node(1000 + 977 * i) for i, node in enumerate(nodes)}
        self._pids = itertools.count(0x2000)
        self._lock = threading.Lock()

    def new(self, node: str, task_type: str, vmid: int, starttime: int, user: str | None = None) -> Task:
        """A task record of ``user`` (default ``self.user``; not yet listed: see ``start`` and ``record``)."""
        with self._lock:
            return Task(
                node=node,
                type=task_type,
                id=str(vmid),
                user=user or self.user,
                pid=next(self._pids),
                pstart=self._nodes[node].pstart,
                starttime=starttime,
            )

    def start(self, task: Task) -> None:
        """List ``task`` as running until ``finish``."""
        with self._lock:
            self._nodes[task.node].running.append(task)
            self._broadcast(task.node)

    def finish(self, task: Task, endtime: int, status: str) -> None:
        with self._lock:
            node = self._nodes[task.node]
            if task not in node.running:
                return
            node.running.remove(task)
            task.endtime, task.status = max(task.starttime, endtime), status
            node.archive(task)
            self._broadcast(task.node)

    def record(
        self, node: str, task_type: str, vmid: int, starttime: int, status: str, endtime: int, user: str | None = None
    ) -> Task:
        """A task that has already finished (a stop, start or migration: done at once here)."""
        task = self.new(node, task_type, vmid, starttime, user)
        task.endtime, task.status = max(starttime, endtime), status
        with self._lock:
            self._nodes[node].archive(task)
            self._broadcast(node)
        return task

    def set_online(self, node: str, online: bool) -> None:
        """pve-cluster ``status.c`` ``dfsm_confchg`` marks a node that left offline but keeps its
        kvstore, so ``get_tasklist`` (``PVE/Cluster.pm``) goes on listing the tasklist it last
        broadcast; pvestatd broadcasts a fresh one when the node is back (``update_status``)."""
        with self._lock:
            self._nodes[node].online = bool(online)
            self._broadcast(node)

    def _broadcast(self, node: str) -> None:
        # Every change is broadcast at once: fork_worker does so when a task starts, pvestatd's
        # update_status every 10 s after one ends (the simulator does not wait those seconds).
        if self._nodes[node].online:
            self._nodes[node].broadcast = self._nodes[node].tasklist()

    def cluster_list(self, show: Callable[[dict], bool] = lambda entry: True) -> list:
        """``/cluster/tasks``: pve-cluster ``PVE/Cluster.pm`` ``get_tasklist``, every node's broadcast
        list one after the other; pve-manager ``API2/Cluster.pm`` ``tasks`` converts token users
        and keeps the entries ``show`` accepts."""
        with self._lock:
            entries = [split_token_user(e) for n in self._nodes.values() for e in n.broadcast]
        return [e for e in entries if show(e)]

    def node_list(self, node: str, query: TaskQuery, sees_all: bool, caller: str) -> list:
        """``/nodes/{node}/tasks``: pve-manager ``API2/Tasks.pm`` ``node_tasks`` on ``node``'s own
        files: the running tasks (``source`` active or all, status ``RUNNING``), then the
        archive newest first (archive or all), filtered, ``start`` skipped, ``limit`` kept."""
        with self._lock:
            tasks = self._nodes[node]
            running = sorted(tasks.running, key=lambda t: (t.starttime, t.pid), reverse=True)
            archived = tasks.archived_newest_first()
        wanted_status = query.status_types()
        count, limit, found = 0, query.limit, []

        def passes(entry: dict) -> bool:
            nonlocal count
            if query.userfilter and query.userfilter.lower() not in entry["user"].lower():
                return False
            if not (sees_all or may_see_own(entry, caller)):
                return False
            if query.typefilter and entry["type"] != query.typefilter:
                return False
            if query.vmid and entry["id"] != str(query.vmid):
                return False
            if query.since is not None and entry["starttime"] < query.since:
                return False
            if query.until is not None and entry["starttime"] > query.until:
                return False
            if status_type(entry.get("status")) not in wanted_status:
                return False
            count += 1
            return count > query.start and limit > 0

        if query.source in ("active", "all"):
            for task in running:  # the active file's entries are not converted (node_tasks)
                entry = task.as_api()
                if passes(entry):
                    entry["status"] = "RUNNING"
                    found.append(entry)
                    limit -= 1
        if query.source != "active":
            for task in archived:
                entry = split_token_user(task.as_api())
                if passes(entry):
                    found.append(entry)
                    limit -= 1
        return found
