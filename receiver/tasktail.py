"""The task tail: finished destroys in Proxmox's task lists, as hints for the watcher.

Destroying a guest that is already stopped runs no hook (PROXMOX.md), so the watcher also
reads ``GET /cluster/tasks`` every ``CLEANUP_TASK_POLL_SECONDS`` and watches the VMID of
every finished ``vzdestroy``/``qmdestroy`` it has not seen before.

That list is built **per node** (pve-cluster ``broadcast_tasklist``): each node's running
tasks plus its newest finished ones, 25 in all, trimmed under 32 KiB.  A busy node can push
a destroy out of its own list between two polls while the other nodes' lists look the same,
so gaps are found per node: when none of the finished tasks a node listed at the last poll
is listed any more, more finished there than its list keeps, and that node's full archive
(``GET /nodes/{node}/tasks?typefilter=…&since=…``) is read for the destroys in between.
Only when that read fails is a sweep asked for.

Without Sys.Audit on ``/`` the list holds only the token's own tasks (usually none): the
tail is blind.  That is said (a warning when it starts or ends, ``check``, a metric), never
papered over.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from .model import DESTROY_TASK_TYPES, InventoryError, Task

if TYPE_CHECKING:  # types only: no import at run time
    from .inventory import ProxmoxInventory

logger = logging.getLogger(__name__)

GAP_SWEEP_SECONDS = 30.0  # at most one sweep asked for per this many seconds
BLIND_CHECK_SECONDS = 600.0  # how often the token's Sys.Audit on / is looked at again
ARCHIVE_MARGIN_SECONDS = 60  # archive reads start this long before the last poll
ARCHIVE_SEEN_KEPT = 4096  # UPIDs found in archives, not to be hinted twice


class TaskTail:
    """Polls the task lists; :meth:`poll` returns the destroys not seen before."""

    def __init__(
        self,
        inventory: ProxmoxInventory,
        on_gap: Callable[[], None] | None = None,
        on_blind: Callable[[bool], None] | None = None,
        wall: Callable[[], float] = time.time,
    ):
        self.inventory = inventory
        self.on_gap = on_gap
        self.on_blind = on_blind
        self.wall = wall
        self.gaps = 0  # node list roll-overs found
        self.archive_reads = 0
        self.blind: bool | None = None  # None: not known yet
        self._seen: set[str] = set()  # destroys hinted that are still listed
        self._archive_seen: deque[str] = deque(maxlen=ARCHIVE_SEEN_KEPT)
        self._last_finished: dict[str, set[str]] = {}  # node -> finished UPIDs listed at the last poll
        self._since: dict[str, int] = {}  # node -> where its archive read would start
        self._last_gap_sweep = float("-inf")
        self._blind_checked = float("-inf")

    def poll(self) -> list[Task]:
        """One poll: the finished destroys not hinted before.  Raises InventoryError when the
        list itself cannot be read."""
        self._check_blind()
        tasks = self.inventory.tasks()
        now = int(self.wall())
        by_node: dict[str, list[Task]] = {}
        for task in tasks:
            by_node.setdefault(task.node, []).append(task)
        hints = [t for t in tasks if _is_destroy(t) and t.upid not in self._seen]
        for node, listed in by_node.items():
            finished = {t.upid for t in listed if t.endtime}
            before = self._last_finished.get(node)
            if before and finished and not (before & finished):
                hints.extend(self._read_archive(node))
            self._last_finished[node] = finished
            running_since = [t.starttime for t in listed if not t.endtime and t.starttime is not None]
            self._since[node] = min([now - ARCHIVE_MARGIN_SECONDS, *running_since])
        self._seen = ({t.upid for t in tasks} & self._seen) | {t.upid for t in hints}
        unique = {t.upid: t for t in hints}
        return list(unique.values())

    def _read_archive(self, node: str) -> list[Task]:
        """The destroys in ``node``'s archive since the last poll; a sweep is asked for when it
        cannot be read (an offline node answers 595)."""
        self.gaps += 1
        since = self._since.get(node, int(self.wall()) - ARCHIVE_MARGIN_SECONDS)
        try:
            found = self.inventory.node_tasks(node, DESTROY_TASK_TYPES, since)
        except InventoryError as exc:
            logger.warning(
                "task tail: %s's task list rolled over between two polls and its archive cannot be "
                "read (%s): asking for a sweep",
                node,
                exc,
            )
            self._ask_for_sweep()
            return []
        self.archive_reads += 1
        fresh = [t for t in found if _is_destroy(t) and t.upid not in self._archive_seen]
        self._archive_seen.extend(t.upid for t in fresh)
        logger.info(
            "task tail: %s's task list rolled over between two polls; its archive since %d has %d "
            "destroys not seen before",
            node,
            since,
            len(fresh),
        )
        return fresh

    def _ask_for_sweep(self) -> None:
        if time.monotonic() - self._last_gap_sweep < GAP_SWEEP_SECONDS:
            return
        self._last_gap_sweep = time.monotonic()
        if self.on_gap:
            self.on_gap()

    def _check_blind(self) -> None:
        """Whether the token may see other users' tasks (Sys.Audit on /); said when it changes."""
        if time.monotonic() - self._blind_checked < BLIND_CHECK_SECONDS:
            return
        try:
            blind = self.inventory.privilege("/", "Sys.Audit") is None
        except InventoryError:
            return  # asked again at the next poll
        self._blind_checked = time.monotonic()
        if blind != self.blind:
            if blind:
                logger.warning(
                    "task tail: the token lacks Sys.Audit on /, so /cluster/tasks lists only its own "
                    "tasks: a destroy of a stopped guest is found by the sweep alone (grant PVEAuditor "
                    "on / to the user and the token, see docs/install.md)"
                )
            elif self.blind:
                logger.info("task tail: the token holds Sys.Audit on / again: every user's tasks are seen")
            self.blind = blind
            if self.on_blind:
                self.on_blind(blind)


def _is_destroy(task: Task) -> bool:
    return task.type in DESTROY_TASK_TYPES and bool(task.endtime) and task.vmid is not None
