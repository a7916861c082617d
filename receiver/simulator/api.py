"""The simulator's API routes: what each ``GET /api2/json/...`` answers.

The read-only slice of the PVE API that pve-janitor uses (PROXMOX.md facts, API),
served from the cluster's state (``Cluster``) and filtered by what the calling token
holds in the privilege model (``access.AccessControl``), as pve-manager filters it.
``ApiRoutes`` is a mixin of ``ProxmoxSimulator``; each route is a method
``_api_<name>(query, **path_fields)`` looked up on the simulator at request time, so a
test may wrap one on an instance.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import params
from .entries import config_path, guest_config, list_entry, node_entry, resource_entry
from .guests import Guest, lowest_free_vmid
from .tasks import TaskQuery, TaskQueryError

if TYPE_CHECKING:
    import threading

    from .access import AccessControl
    from .tasks import TaskLog

API_PREFIX = "/api2/json"
# pvestatd broadcasts guest stats every 10 s; /cluster/resources shows the last broadcast,
# so a guest's uptime there moves in steps of 10 s.
STATS_INTERVAL_S = 10
# /cluster/resources?type=... ; anything else is a parameter error in PVE.
RESOURCE_TYPES = ("vm", "storage", "node", "sdn")
PVE_VERSION = {"version": "8.2.4", "release": "8.2", "repoid": "faa83925c9641325"}


class ApiError(Exception):
    """An HTTP error answer: PVE puts the message in the reason phrase; we add a JSON body."""

    def __init__(self, status: int, message: str, errors: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.errors = errors


class Encoded(bytes):
    """A route's ``data`` already encoded as JSON (the 100,000-guest list is built from cached parts)."""


@dataclass
class Reply:
    status: int
    body: dict
    reason: str | None = None

    def payload(self) -> bytes:
        data = self.body.get("data")
        if isinstance(data, Encoded):
            return b'{"data": ' + data + b"}"
        return json.dumps(self.body).encode("utf-8")


def error_reply(status: int, message: str, errors: dict | None = None) -> Reply:
    body: dict = {"data": None, "message": message}
    if errors:
        body["errors"] = errors
    one_line = " ".join(message.split())
    return Reply(status, body, one_line.encode("latin-1", "replace").decode("latin-1")[:200])


def _query_value(query: dict, key: str) -> str | None:
    values = query.get(key)
    return values[0] if values else None


class ApiRoutes:
    """Route handlers; mixed into ``ProxmoxSimulator`` (needs ``Cluster`` and ``self.access``)."""

    if TYPE_CHECKING:  # what the routes use of ``Cluster`` and ``ProxmoxSimulator``
        nodes: tuple[str, ...]
        standalone: bool
        tasks: TaskLog
        access: AccessControl
        _lock: threading.RLock
        _request: threading.local
        _guests: dict
        _online: dict[str, bool]
        _node_boot_mono: float
        _version: int
        _acl_fault: int | None
        _vm_answer: tuple | None

        @property
        def token_id(self) -> str: ...
        @property
        def quorate(self) -> bool: ...
        def stats_shown(self, node: str, now: float) -> bool: ...
        def _expire_locked(self) -> None: ...
        def _known_guests(self) -> dict: ...

    def _route(self, path: str, query: dict):
        with self._lock:
            self._expire_locked()
            self._check_node_reachable(path)
            for pattern, method_name in ROUTES:
                match = pattern.fullmatch(path)
                if match:
                    params.verify(method_name, query, match.groupdict())
                    return getattr(self, method_name)(query, **match.groupdict())
        raise ApiError(501, "Method 'GET %s%s' not implemented" % (API_PREFIX, path))

    def _check_node_reachable(self, path: str) -> None:
        """/nodes/<node>/... is proxied to that node: 595 when it is offline."""
        match = re.match(r"^/nodes/([^/]+)(/|$)", path)
        if not match:
            return
        node = match.group(1)
        if node not in self._online:
            raise ApiError(
                500,
                "hostname lookup '%s' failed - failed to get address info for: "
                "%s: Name or service not known" % (node, node),
            )
        if not self._online[node]:
            raise ApiError(595, "Errors during connection establishment, proxy handshake")

    def _caller(self) -> str:
        """The API token of the request being answered (this simulator's own outside one)."""
        return getattr(self._request, "caller", None) or self.token_id

    def _holds(self, path: str, privilege: str) -> bool:
        return self.access.has(self._caller(), path, privilege)

    def _visible_guests(self) -> list:
        """pve-manager ``API2/Cluster.pm`` ``resources`` and the guest lists: only guests with
        VM.Audit on ``/vms/N``; the others are skipped, not refused."""
        caller = self._caller()
        sees = self.access.guest_filter(caller, "VM.Audit")
        return [g for _, g in sorted(self._known_guests().items()) if sees(g.vmid)]

    # ------------------------------------------------------------------ cluster

    def _api_version(self, query):
        return dict(PVE_VERSION)

    def _api_resources(self, query):
        """/cluster/resources: every guest of the cluster in one call.

        Each guest's entry is kept encoded until something it shows changes (uptime moves
        every STATS_INTERVAL_S, like pvestatd's broadcasts), and the whole ``type=vm``
        answer until anything changes: serving 100,000 guests from Python cost about 0.7 s
        per read, a time a real cluster spends in pveproxy's C JSON encoder, and it stood
        in the way of measuring the sweep itself.
        """
        kind = _query_value(query, "type")
        if kind is not None and kind not in RESOURCE_TYPES:
            raise ApiError(
                400,
                "Parameter verification failed.",
                {
                    "type": "value '%s' does not have a value in the enumeration '%s'"
                    % (kind, ", ".join(RESOURCE_TYPES))
                },
            )
        parts: list[bytes] = []
        if kind in (None, "node"):
            uptime = self._node_uptime()
            parts.extend(json.dumps(node_entry(node, self._online[node], uptime)).encode() for node in self.nodes)
        if kind in (None, "vm"):
            now = time.monotonic()
            stats_at = now - (now - self._node_boot_mono) % STATS_INTERVAL_S
            key = (self._version, self.access.version, self._caller(), stats_at)
            if kind == "vm" and self._vm_answer and self._vm_answer[0] == key:
                return self._vm_answer[1]
            parts.extend(self._encoded_entry(g, stats_at) for g in self._visible_guests())
        answer = Encoded(b"[" + b", ".join(parts) + b"]")
        if kind == "vm":
            self._vm_answer = (key, answer)
        return answer

    def _encoded_entry(self, guest: Guest, stats_at: float) -> bytes:
        pool = self._shown_pool(guest.vmid)
        shown = self.stats_shown(guest.node, stats_at)
        key = (guest.status, guest.lock, guest.name, guest.node, guest.tags, shown, guest.uptime(stats_at), pool)
        cached = guest.encoded
        if cached is None or cached[0] != key:
            entry = resource_entry(guest, stats_at, shown, pool)
            cached = guest.encoded = (key, json.dumps(entry).encode())
        return cached[1]

    def _shown_pool(self, vmid: int) -> str | None:
        """A guest's pool, shown only with Pool.Audit on it (API2/Cluster.pm ``resources``)."""
        pool = self.access.pool_of(vmid) if self.access.pools else None
        return pool if pool is not None and self._holds("/pool/" + pool, "Pool.Audit") else None

    def _node_uptime(self) -> int:
        return int(time.monotonic() - self._node_boot_mono) + 3600

    def _api_tasks(self, query):
        """/cluster/tasks (pve-manager ``API2/Cluster.pm`` ``tasks``): every node's broadcast list.
        Without Sys.Audit on ``/`` only entries whose user (token part split off) equals the
        caller; a token request's caller is the full token id (pve-manager ``HTTPServer.pm``), so a
        token then sees none of its tasks either."""
        if self._holds("/", "Sys.Audit"):
            return self.tasks.cluster_list()
        caller = self._caller()
        return self.tasks.cluster_list(lambda entry: entry["user"] == caller)

    def _api_node_tasks(self, query, node):
        """/nodes/{node}/tasks (pve-manager ``API2/Tasks.pm`` ``node_tasks``, proxied to the node):
        the node's own archive; every task with Sys.Audit on ``/nodes/{node}``, else the caller's."""
        try:
            wanted = TaskQuery.parse(query)
        except TaskQueryError as exc:
            raise ApiError(400, "Parameter verification failed.", exc.errors) from None
        return self.tasks.node_list(node, wanted, self._holds("/nodes/%s" % node, "Sys.Audit"), self._caller())

    def _api_nextid(self, query):
        """/cluster/nextid (pve-manager ``API2/Cluster.pm`` ``nextid``): the lowest free VMID
        >= 100, as a string, to any authenticated caller (``user => 'all'``)."""
        wanted = _query_value(query, "vmid")
        known = self._known_guests()
        if wanted is not None:
            if not wanted.isdigit() or int(wanted) in known:
                raise ApiError(400, "Parameter verification failed.", {"vmid": "VM %s already exists" % wanted})
            return str(int(wanted))
        return str(lowest_free_vmid(known))

    def _api_cluster_status(self, query):
        """/cluster/status (pve-manager ``API2/Cluster.pm`` ``get_status``): needs Sys.Audit on
        ``/``; a cluster entry with ``quorate`` (none on a standalone node) and one entry
        per node, the answering one with ``local: 1``."""
        if not self._holds("/", "Sys.Audit"):
            raise ApiError(403, "Permission check failed (/, Sys.Audit)")
        entries = []
        if not self.standalone:
            entries.append(
                {
                    "type": "cluster",
                    "id": "cluster",
                    "name": "sim",
                    "nodes": len(self.nodes),
                    "quorate": 1 if self.quorate else 0,
                    "version": len(self.nodes) + 1,
                }
            )
        for i, node in enumerate(self.nodes[:1] if self.standalone else self.nodes):
            entries.append(
                {
                    "type": "node",
                    "id": "node/%s" % node,
                    "name": node,
                    "nodeid": i + 1,
                    "ip": "192.0.2.%d" % (i + 1),
                    "local": 1 if i == 0 else 0,
                    "online": 1 if self._online[node] else 0,
                    "level": "",
                }
            )
        return entries

    # ------------------------------------------------------------------ nodes and guests

    def _api_nodes(self, query):
        return [node_entry(node, self._online[node], self._node_uptime()) for node in self.nodes]

    def _api_guest_list(self, query, node, kind):
        """/nodes/<node>/lxc|qemu: the guests on that node the caller may see."""
        now = time.monotonic()
        return [list_entry(g, now) for g in self._visible_guests() if g.node == node and g.type == kind]

    def _guest_at(self, node: str, kind: str, vmid: str) -> Guest:
        """Per-guest endpoints answer 403 without VM.Audit on ``/vms/N``; an unknown guest: its
        config is missing."""
        number = int(vmid)
        if not self._holds("/vms/%d" % number, "VM.Audit"):
            raise ApiError(403, "Permission check failed (/vms/%d, VM.Audit)" % number)
        guest = self._guests.get(number)
        if guest is None or guest.node != node or guest.type != kind:
            raise ApiError(500, "Configuration file '%s' does not exist" % config_path(node, kind, number))
        return guest

    def _api_status(self, query, node, kind, vmid):
        guest = self._guest_at(node, kind, vmid)
        entry = list_entry(guest, time.monotonic())
        entry["ha"] = {"managed": 0}
        if kind == "qemu":
            entry["qmpstatus"] = guest.status
        return entry

    def _api_config(self, query, node, kind, vmid):
        guest = self._guest_at(node, kind, vmid)
        config = guest_config(guest)
        config["digest"] = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()
        return config

    # ------------------------------------------------------------------ access

    def _api_permissions(self, query):
        """/access/permissions (pve-access-control ``API2/AccessControl.pm`` ``permissions``):
        ``{path: {privilege: propagate}}`` for ``path``, or for every path the caller holds
        something on (``get_effective_permissions``).  Another principal's (``userid``) only
        with Sys.Audit on ``/access``."""
        caller = self._caller()
        userid = _query_value(query, "userid") or caller
        if userid != caller and not self._holds("/access", "Sys.Audit"):
            raise ApiError(403, "Permission check failed (/access, Sys.Audit)")
        path = _query_value(query, "path")
        if path:
            return {path: self.access.privileges(userid, path)}
        return self.access.effective_permissions(userid)

    def _api_acl(self, query):
        """/access/acl (pve-access-control ``API2/ACL.pm`` ``read_acl``): every entry only to a
        caller with Sys.Audit on ``/access``, else those it may modify; 200 either way."""
        if self._acl_fault is not None:
            raise ApiError(self._acl_fault, "simulated failure reading the ACL")
        return self.access.acl_entries(self._caller())


ROUTES: list = [
    (re.compile(p), name)
    for p, name in (
        (r"/version", "_api_version"),
        (r"/cluster/resources", "_api_resources"),
        (r"/cluster/tasks", "_api_tasks"),
        (r"/cluster/nextid", "_api_nextid"),
        (r"/cluster/status", "_api_cluster_status"),
        (r"/access/permissions", "_api_permissions"),
        (r"/access/acl", "_api_acl"),
        (r"/nodes", "_api_nodes"),
        (r"/nodes/(?P<node>[^/]+)/tasks", "_api_node_tasks"),
        (r"/nodes/(?P<node>[^/]+)/(?P<kind>lxc|qemu)", "_api_guest_list"),
        (r"/nodes/(?P<node>[^/]+)/(?P<kind>lxc|qemu)/(?P<vmid>\d+)/status/current", "_api_status"),
        (r"/nodes/(?P<node>[^/]+)/(?P<kind>lxc|qemu)/(?P<vmid>\d+)/config", "_api_config"),
    )
]
