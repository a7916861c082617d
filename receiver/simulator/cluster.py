"""The simulated cluster's state: guests, nodes, quorum, guest life cycles, hooks.

Every point follows the PROXMOX.md facts (Hookscripts; API: ``/cluster/resources``,
quorum): no hook for a destroy, the ``lock: destroyed`` window before a destroyed
guest disappears, offline nodes whose guests stay listed, and a node cut off from
the quorate partition that keeps answering from its own stale copy of the guest list
(pve-cluster ``status.c``: reads never check quorum).
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from collections.abc import Iterable

from .guests import GUEST_STATUSES, GUEST_TYPES, VMID_MAX, VMID_MIN, Guest, SimulatorError, is_volume_id
from .hooks import HOOK_BASE_ENV, run_hook
from .tasks import TaskLog

logger = logging.getLogger(__name__)

# pve-manager API2/Cluster.pm resources: an offline node's guests keep their last status and
# name until their stats are older than this, then show status "unknown" without name.
OFFLINE_STATS_SECONDS = 300


class Cluster:
    """Guests on nodes, and what happens to them.  All state sits under ``_lock``."""

    def __init__(self, nodes: Iterable[str], task_user: str, node_name_env: bool):
        self.nodes = tuple(nodes)
        if not self.nodes or len(set(self.nodes)) != len(self.nodes):
            raise ValueError("nodes must be a non-empty list of distinct names")
        self.node_name_env = node_name_env
        self.hook_env: dict = {}
        self.hook_runs: list = []
        self.standalone = False
        self.tasks = TaskLog(self.nodes, task_user)
        self._lock = threading.RLock()
        self._guests: dict = {}
        self._destroying: dict = {}  # vmid -> guest in its ``lock: destroyed`` window
        self._online = {node: True for node in self.nodes}
        self._offline_at: dict = {}  # node -> monotonic time of its last stats broadcast
        self._node_boot_mono = time.monotonic()
        self._stale: dict | None = None  # the answering node's guest list while it has no quorum
        self._snippets: dict = {}  # (node, volume id) -> the file behind it on that node
        # Bumped by every change /cluster/resources?type=vm can show (see _changed).
        self._version = 0

    @property
    def task_user(self) -> str:
        return self.tasks.user

    # ------------------------------------------------------------------ guests

    def add_guest(
        self,
        vmid: int,
        node: str = "pve1",
        type: str = "lxc",  # noqa: A002 - the API field is called type
        status: str = "running",
        name: str | None = None,
        template: bool = False,
        hookscript: str | None = None,
        tags: str | None = None,
    ) -> dict:
        """Create a guest directly (no task, no hooks, like a scene's starting state)."""
        vmid = int(vmid)
        self._check_new_guest(vmid, node, type, status, template)
        guest = Guest(
            vmid=vmid,
            node=node,
            type=type,
            status=status,
            name=name or ("ct%d" % vmid if type == "lxc" else "vm%d" % vmid),
            template=bool(template),
            hookscript=os.fspath(hookscript) if hookscript is not None else None,
            tags=tags,
            started_mono=time.monotonic() if status != "stopped" else None,
        )
        with self._lock:
            self._expire_locked()
            if vmid in self._guests:
                raise ValueError("VMID %d already exists" % vmid)
            self._guests[vmid] = guest
            self._changed()
            return guest.as_dict()

    def _check_new_guest(self, vmid, node, kind, status, template) -> None:
        if not VMID_MIN <= vmid <= VMID_MAX:
            raise ValueError("VMID %d out of range %d-%d" % (vmid, VMID_MIN, VMID_MAX))
        if node not in self._online:
            raise ValueError("unknown node %r" % node)
        if kind not in GUEST_TYPES:
            raise ValueError("type must be lxc or qemu, not %r" % kind)
        if status not in GUEST_STATUSES:
            raise ValueError("status must be one of %s" % ", ".join(GUEST_STATUSES))
        if template and status != "stopped":
            raise ValueError("a template is always stopped")

    def guest(self, vmid: int) -> dict | None:
        with self._lock:
            self._expire_locked()
            guest = self._guests.get(int(vmid))
            return guest.as_dict() if guest else None

    def vmids(self) -> set:
        """VMIDs that exist, including guests still in their ``lock: destroyed`` window."""
        with self._lock:
            self._expire_locked()
            return set(self._guests)

    def start_guest(self, vmid: int) -> bool:
        """Start a guest: hook pre-start, start, hook post-start. False if pre-start failed.

        Only pre-start is fatal: a non-zero exit (or a missing or non-executable script)
        aborts the start. Already running: nothing happens, True.
        """
        guest = self._get_for_operation(vmid)
        if guest.template:
            raise SimulatorError("CT/VM %d is a template and cannot be started" % guest.vmid)
        if guest.status != "stopped":
            return True
        task_type = "vzstart" if guest.type == "lxc" else "qmstart"
        started = int(time.time())
        rc = self._run_hook(guest, "pre-start")
        if rc != 0:
            if self._hook_path(guest) is None:  # GuestHelpers.pm check_hookscript
                why = "script '%s' does not exist" % guest.hookscript
            else:
                why = "command '%s %d pre-start' failed: %s" % (
                    guest.hookscript,
                    guest.vmid,
                    "exit code %d" % rc if rc is not None else "could not run",
                )
            error = "hookscript error for %d on pre-start: %s" % (guest.vmid, why)
            self._record_task(guest.node, task_type, guest.vmid, started, error)
            logger.info("start of %d aborted by its pre-start hook", guest.vmid)
            return False
        with self._lock:
            guest.status, guest.started_mono = "running", time.monotonic()
            self._changed()
        self._run_hook(guest, "post-start")
        self._record_task(guest.node, task_type, guest.vmid, started, "OK")
        return True

    def stop_guest(self, vmid: int) -> bool:
        """Stop a guest via the API: hook pre-stop, stop, hook post-stop, a vzstop/qmstop task.

        API stop fires pre-stop; post-stop follows any stop; failures in these phases are
        warnings only. Already stopped: nothing happens, False.
        """
        guest = self._get_for_operation(vmid)
        if guest.status == "stopped":
            return False
        started = int(time.time())
        self._stop_with_hooks(guest)
        self._record_task(guest.node, "vzstop" if guest.type == "lxc" else "qmstop", guest.vmid, started, "OK")
        return True

    def destroy_guest(self, vmid: int, lock_seconds: float = 0.0) -> None:
        """Destroy a guest as ``pct destroy --force`` / ``qm destroy`` would.

        There is no destroy phase; ``qm destroy`` refuses a running VM; ``pct destroy
        --force`` on a running container fires pre-stop (and lxc's post-stop).  While
        destroying, the config is ``{lock: destroyed}`` and /cluster/resources still lists
        the guest with that lock; after ``lock_seconds`` it is gone (expired lazily on the
        next read, so the caller never waits). The vzdestroy/qmdestroy task runs during
        that window and ends with status "OK" when the guest disappears.
        """
        guest = self._get_for_operation(vmid)
        if guest.type == "qemu" and guest.status != "stopped":
            raise SimulatorError("VM %d is running - destroy failed" % guest.vmid)
        if guest.status != "stopped":
            self._stop_with_hooks(guest)
        task = self.tasks.new(
            guest.node, "vzdestroy" if guest.type == "lxc" else "qmdestroy", guest.vmid, int(time.time())
        )
        with self._lock:
            guest.lock, guest.destroy_task = "destroyed", task
            guest.gone_at_mono = time.monotonic() + max(0.0, float(lock_seconds))
            self._destroying[guest.vmid] = guest
            self.tasks.start(task)
            self._changed()
            self._expire_locked()
        logger.info(
            "guest %d destroyed (listed with lock=destroyed for %.1fs)", guest.vmid, max(0.0, float(lock_seconds))
        )

    def migrate_guest(self, vmid: int, node: str) -> None:
        """Move a stopped guest to another node (offline migration: no hooks, same VMID,
        a vzmigrate/qmigrate task on the source node).  The guest exists throughout: its
        config file is renamed from one node's directory to the other's."""
        guest = self._get_for_operation(vmid)
        if node not in self._online:
            raise ValueError("unknown node %r" % node)
        if guest.status != "stopped":
            raise SimulatorError("CT/VM %d is running - use online migration" % guest.vmid)
        started = int(time.time())
        source = guest.node
        with self._lock:
            guest.node = node
            self._changed()
        self._record_task(source, "vzmigrate" if guest.type == "lxc" else "qmigrate", guest.vmid, started, "OK")

    def set_hookscript(self, vmid: int, hookscript: str | None) -> None:
        """``pct set <vmid> --hookscript <volume>`` (``qm set`` for a VM); None: ``--delete hookscript``.

        A volume id (``local:snippets/pve-janitor-hook``) is what the config then names; the
        hook runs from the file :meth:`install_snippet` put behind it on the guest's node, and
        on a node without it the hook cannot run (a start aborts at pre-start).  A path is
        run on every node, shown as ``local:snippets/<its file name>``.  The config's digest
        changes; nothing ``/cluster/resources`` shows does.
        """
        guest = self._get_for_operation(vmid)
        with self._lock:
            guest.hookscript = os.fspath(hookscript) if hookscript is not None else None

    def install_snippet(self, volume: str, path: str | None, nodes: Iterable[str] | None = None) -> None:
        """Put ``path`` behind ``volume`` on these nodes (all by default), as copying a file to
        ``/var/lib/vz/snippets`` on each node does for ``local:snippets/<file>``; None removes it."""
        if not is_volume_id(volume):
            raise ValueError("not a volume id: %r" % volume)
        with self._lock:
            for node in self.nodes if nodes is None else tuple(nodes):
                if node not in self._online:
                    raise ValueError("unknown node %r" % node)
                if path is None:
                    self._snippets.pop((node, volume), None)
                else:
                    self._snippets[(node, volume)] = os.fspath(path)

    def _get_for_operation(self, vmid: int) -> Guest:
        with self._lock:
            self._expire_locked()
            guest = self._guests.get(int(vmid))
            if guest is None:
                raise KeyError("no guest with VMID %s" % vmid)
            if guest.lock:
                raise SimulatorError("CT/VM %d is locked (%s)" % (guest.vmid, guest.lock))
            return guest

    def _stop_with_hooks(self, guest: Guest) -> None:
        self._run_hook(guest, "pre-stop")
        with self._lock:
            guest.status, guest.started_mono = "stopped", None
            self._changed()
        self._run_hook(guest, "post-stop")

    def _expire_locked(self) -> None:
        """Remove guests whose ``lock: destroyed`` window is over; finish their tasks.

        Runs on every request and guest operation, so it looks only at the guests being
        destroyed: scanning every guest made adding 100,000 of them quadratic.
        """
        if not self._destroying:
            return
        now = time.monotonic()
        gone = [g for g in self._destroying.values() if g.gone_at_mono <= now]
        for guest in sorted(gone, key=lambda g: g.gone_at_mono):
            self._changed()
            del self._guests[guest.vmid]
            del self._destroying[guest.vmid]
            self._guest_gone(guest.vmid)
            if guest.destroy_task is not None:
                end_wall = time.time() - (now - guest.gone_at_mono)
                self.tasks.finish(guest.destroy_task, int(end_wall), "OK")

    def _guest_gone(self, vmid: int) -> None:
        """A destroyed guest has just disappeared (the simulator drops its ACL entries)."""

    def _record_task(self, node: str, task_type: str, vmid: int, starttime: int, status: str) -> None:
        self.tasks.record(node, task_type, vmid, starttime, status, int(time.time()))

    # ------------------------------------------------------------------ hooks

    def _hook_env(self, node: str) -> dict:
        env = dict(HOOK_BASE_ENV)
        env.update(self.hook_env)
        if self.node_name_env:
            env["PVE_JANITOR_NODE"] = node
        return env

    def _hook_path(self, guest: Guest) -> str | None:
        """The file the guest's hookscript names on its node (None: not there)."""
        if not guest.hookscript or not is_volume_id(guest.hookscript):
            return guest.hookscript
        with self._lock:  # resolved on the guest's node, like PVE::Storage::path
            return self._snippets.get((guest.node, guest.hookscript))

    def _run_hook(self, guest: Guest, phase: str) -> int | None:
        """Run the guest's hookscript for one phase; its exit code (0 without a hookscript,
        None when it could not run)."""
        if not guest.hookscript:
            return 0
        script = self._hook_path(guest)
        if script is None:
            logger.warning("hookscript error for %d on %s: %s does not exist", guest.vmid, phase, guest.hookscript)
            with self._lock:
                self.hook_runs.append((guest.vmid, phase, None, 0.0))
            return None
        rc, duration = run_hook(script, guest.vmid, phase, self._hook_env(guest.node))
        with self._lock:
            self.hook_runs.append((guest.vmid, phase, rc, duration))
        return rc

    # ------------------------------------------------------------------ nodes and quorum

    def set_node_online(self, node: str, online: bool, stats_age: float = 0.0) -> None:
        """An offline node's guests stay listed; /nodes/<node>/... answers 595.

        pve-manager ``PVE/API2/Cluster.pm`` ``resources`` shows a guest's last broadcast status
        and name while its stats are younger than 5 minutes (``PVE::Cluster`` rrd data ages
        out after 300 s), then ``status: unknown`` without name.  ``stats_age``: how many
        seconds ago the node went offline (its last stats broadcast), to test either side.
        """
        with self._lock:
            if node not in self._online:
                raise ValueError("unknown node %r" % node)
            self._online[node] = bool(online)
            self.tasks.set_online(node, online)  # its last task list stays in /cluster/tasks
            if online:
                self._offline_at.pop(node, None)
            elif node not in self._offline_at or stats_age:
                self._offline_at[node] = time.monotonic() - float(stats_age)
            self._changed()

    def stats_shown(self, node: str, now: float) -> bool:
        """Whether ``node``'s guests show their status and name (online, or offline < 5 min)."""
        if self._online[node]:
            return True
        return now - self._offline_at.get(node, now) < OFFLINE_STATS_SECONDS

    def set_quorate(self, quorate: bool) -> None:
        """Cut the answering node off from the quorate partition (False), or bring it back.

        While cut off, it answers reads from its own copy of the guest list as it was when it
        lost quorum (pve-cluster ``status.c``: reads never check quorum); the other side goes
        on creating and destroying guests, which this node does not see.
        """
        with self._lock:
            if not quorate and self._stale is None:
                self._stale = {v: copy.copy(g) for v, g in self._guests.items()}
            elif quorate:
                self._stale = None
            self._changed()

    @property
    def quorate(self) -> bool:
        return self._stale is None

    def _known_guests(self) -> dict:
        """The guests the answering node knows of: all, or its stale copy while it has no quorum."""
        return self._guests if self._stale is None else self._stale

    def _changed(self) -> None:
        """Something /cluster/resources?type=vm shows has changed: its cached answer is stale.

        Every change to a guest or a node goes through a method of this class that calls
        this (under ``_lock``); what the token may see has its own version (``Access``).
        """
        self._version += 1
