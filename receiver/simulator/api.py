"""The simulator's API routes: what each ``GET /api2/json/...`` answers.

The read-only slice of the PVE API that pve-janitor uses (PROXMOX.md facts, API),
served from the cluster's state (``Cluster``) and filtered by what the caller may see
(``Access``).  ``ApiRoutes`` is a mixin of ``ProxmoxSimulator``; each route is a
method ``_api_<name>(query, **path_fields)`` looked up on the simulator at request
time, so a test may wrap one on an instance.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from typing import Optional

from .cluster import Guest, lowest_free_vmid

API_PREFIX = "/api2/json"
# pvestatd broadcasts guest stats every 10 s; /cluster/resources shows the last broadcast,
# so a guest's uptime there moves in steps of 10 s.
STATS_INTERVAL_S = 10
# /cluster/resources?type=... ; anything else is a parameter error in PVE.
RESOURCE_TYPES = ("vm", "storage", "node", "sdn")
PVE_VERSION = {"version": "8.2.4", "release": "8.2", "repoid": "faa83925c9641325"}


class ApiError(Exception):
    """An HTTP error answer: PVE puts the message in the reason phrase; we add a JSON body."""

    def __init__(self, status: int, message: str, errors: Optional[dict] = None):
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
    reason: Optional[str] = None

    def payload(self) -> bytes:
        data = self.body.get("data")
        if isinstance(data, Encoded):
            return b'{"data": ' + data + b"}"
        return json.dumps(self.body).encode("utf-8")


def error_reply(status: int, message: str, errors: Optional[dict] = None) -> Reply:
    body = {"data": None, "message": message}
    if errors:
        body["errors"] = errors
    one_line = " ".join(message.split())
    return Reply(status, body, one_line.encode("latin-1", "replace").decode("latin-1")[:200])


def _query_value(query: dict, key: str) -> Optional[str]:
    values = query.get(key)
    return values[0] if values else None


def _config_path(node: str, kind: str, vmid: int) -> str:
    directory = "lxc" if kind == "lxc" else "qemu-server"
    return "nodes/%s/%s/%d.conf" % (node, directory, vmid)


class ApiRoutes:
    """Route handlers; mixed into ``ProxmoxSimulator`` (needs ``Cluster`` and ``self.access``)."""

    def _route(self, path: str, query: dict):
        with self._lock:
            self._expire_locked()
            self._check_node_reachable(path)
            for pattern, method_name in ROUTES:
                match = pattern.fullmatch(path)
                if match:
                    return getattr(self, method_name)(query, **match.groupdict())
        raise ApiError(501, "Method 'GET %s%s' not implemented" % (API_PREFIX, path))

    def _check_node_reachable(self, path: str) -> None:
        """/nodes/<node>/... is proxied to that node: 595 when it is offline."""
        match = re.match(r"^/nodes/([^/]+)(/|$)", path)
        if not match:
            return
        node = match.group(1)
        if node not in self._online:
            raise ApiError(500, "hostname lookup '%s' failed - failed to get address info for: "
                                "%s: Name or service not known" % (node, node))
        if not self._online[node]:
            raise ApiError(595, "Errors during connection establishment, proxy handshake")

    def _visible_guests(self) -> list:
        return [g for _, g in sorted(self._known_guests().items()) if self.access.can_see(g.vmid)]

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
            raise ApiError(400, "Parameter verification failed.", {
                "type": "value '%s' does not have a value in the enumeration '%s'"
                        % (kind, ", ".join(RESOURCE_TYPES))})
        parts = []
        if kind in (None, "node"):
            parts.extend(json.dumps(self._node_entry(node)).encode() for node in self.nodes)
        if kind in (None, "vm"):
            now = time.monotonic()
            stats_at = now - (now - self._node_boot_mono) % STATS_INTERVAL_S
            key = (self._version, self.access.version, stats_at)
            if kind == "vm" and self._vm_answer and self._vm_answer[0] == key:
                return self._vm_answer[1]
            parts.extend(self._encoded_entry(g, stats_at) for g in self._visible_guests())
        answer = Encoded(b"[" + b", ".join(parts) + b"]")
        if kind == "vm":
            self._vm_answer = (key, answer)
        return answer

    def _encoded_entry(self, guest: Guest, stats_at: float) -> bytes:
        key = (guest.status, guest.lock, guest.name, guest.node, guest.tags, self._online[guest.node],
               guest.uptime(stats_at))
        cached = guest.encoded
        if cached is None or cached[0] != key:
            cached = guest.encoded = (key, json.dumps(self._resource_entry(guest, stats_at)).encode())
        return cached[1]

    def _resource_entry(self, guest: Guest, now: float) -> dict:
        entry = {
            "id": "%s/%d" % (guest.type, guest.vmid), "vmid": guest.vmid, "node": guest.node,
            "type": guest.type, "template": int(guest.template), "maxmem": guest.maxmem,
            "maxdisk": guest.maxdisk, "maxcpu": guest.cpus,
        }
        if self._online[guest.node]:
            running = guest.status != "stopped"
            entry.update(
                status=guest.status, name=guest.name, uptime=guest.uptime(now),
                cpu=0.01 if running else 0, mem=guest.maxmem // 4 if running else 0,
                disk=guest.maxdisk // 8, netin=0, netout=0, diskread=0, diskwrite=0,
            )
        else:  # an offline node's guest: status "unknown", no name
            entry["status"] = "unknown"
        if guest.lock:
            entry["lock"] = guest.lock
        if guest.tags:
            entry["tags"] = guest.tags
        return entry

    def _node_entry(self, node: str) -> dict:
        entry = {"id": "node/%s" % node, "node": node, "type": "node"}
        if self._online[node]:
            entry.update(status="online", level="", maxcpu=8, cpu=0.02, maxmem=32 * 1024 ** 3,
                         mem=8 * 1024 ** 3, maxdisk=100 * 1024 ** 3, disk=20 * 1024 ** 3,
                         uptime=int(time.monotonic() - self._node_boot_mono) + 3600)
        else:
            entry["status"] = "offline"
        return entry

    def _api_tasks(self, query):
        """/cluster/tasks: running tasks plus the last finished ones, newest first."""
        return self.tasks.cluster_list()

    def _api_nextid(self, query):
        """/cluster/nextid: the lowest free VMID >= 100, as a string."""
        wanted = _query_value(query, "vmid")
        known = self._known_guests()
        if wanted is not None:
            if not wanted.isdigit() or int(wanted) in known:
                raise ApiError(400, "Parameter verification failed.",
                               {"vmid": "VM %s already exists" % wanted})
            return str(int(wanted))
        return str(lowest_free_vmid(known))

    def _api_cluster_status(self, query):
        """/cluster/status (pve-manager ``API2/Cluster.pm`` ``get_status``): needs Sys.Audit on
        ``/``; a cluster entry with ``quorate`` (none on a standalone node) and one entry
        per node, the answering one with ``local: 1``."""
        if not self.access.sys_audit:
            raise ApiError(403, "Permission check failed (/, Sys.Audit)")
        entries = []
        if not self.standalone:
            entries.append({"type": "cluster", "id": "cluster", "name": "sim", "nodes": len(self.nodes),
                            "quorate": 1 if self.quorate else 0, "version": len(self.nodes) + 1})
        for i, node in enumerate(self.nodes[:1] if self.standalone else self.nodes):
            entries.append({"type": "node", "id": "node/%s" % node, "name": node, "nodeid": i + 1,
                            "ip": "192.0.2.%d" % (i + 1), "local": 1 if i == 0 else 0,
                            "online": 1 if self._online[node] else 0, "level": ""})
        return entries

    # ------------------------------------------------------------------ nodes and guests

    def _api_nodes(self, query):
        return [self._node_entry(node) for node in self.nodes]

    def _api_guest_list(self, query, node, kind):
        """/nodes/<node>/lxc|qemu: the guests on that node the caller may see."""
        now = time.monotonic()
        return [self._list_entry(g, now) for g in self._visible_guests()
                if g.node == node and g.type == kind]

    def _list_entry(self, guest: Guest, now: float) -> dict:
        entry = {
            "vmid": guest.vmid, "status": guest.status, "name": guest.name,
            "uptime": guest.uptime(now), "maxmem": guest.maxmem, "maxdisk": guest.maxdisk,
            "cpus": guest.cpus,
        }
        if guest.type == "lxc":
            entry["type"] = "lxc"
        if guest.template:
            entry["template"] = 1
        if guest.lock:
            entry["lock"] = guest.lock
        if guest.tags:
            entry["tags"] = guest.tags
        return entry

    def _guest_at(self, node: str, kind: str, vmid: str) -> Guest:
        """Per-guest endpoints answer 403 without VM.Audit; an unknown guest: config missing."""
        number = int(vmid)
        if not self.access.can_see(number):
            raise ApiError(403, "Permission check failed (/vms/%d, VM.Audit)" % number)
        guest = self._guests.get(number)
        if guest is None or guest.node != node or guest.type != kind:
            raise ApiError(500, "Configuration file '%s' does not exist"
                                % _config_path(node, kind, number))
        return guest

    def _api_status(self, query, node, kind, vmid):
        guest = self._guest_at(node, kind, vmid)
        entry = self._list_entry(guest, time.monotonic())
        entry["ha"] = {"managed": 0}
        if kind == "qemu":
            entry["qmpstatus"] = guest.status
        return entry

    def _api_config(self, query, node, kind, vmid):
        guest = self._guest_at(node, kind, vmid)
        config = _guest_config(guest)
        config["digest"] = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()
        return config

    # ------------------------------------------------------------------ access

    def _api_permissions(self, query):
        """/access/permissions: a token may read its own privileges."""
        path = _query_value(query, "path")
        if path:
            return {path: self.access.privileges_at(path)}
        return {p: self.access.privileges_at(p) for p in ("/", "/access", "/vms")}

    def _api_acl(self, query):
        """/access/acl: every entry only to a caller with Sys.Audit on ``/access``."""
        if self.access.acl_fault is not None:
            raise ApiError(self.access.acl_fault, "simulated failure reading the ACL")
        return self.access.acl_entries(self._guests)


def _guest_config(guest: Guest) -> dict:
    if guest.lock == "destroyed":  # a guest being destroyed: its config is {lock: destroyed}
        return {"lock": "destroyed"}
    memory_mb = guest.maxmem // (1024 * 1024)
    if guest.type == "lxc":
        config = {"hostname": guest.name, "arch": "amd64", "ostype": "debian",
                  "cores": guest.cpus, "memory": memory_mb, "swap": 512,
                  "rootfs": "local-lvm:vm-%d-disk-0,size=8G" % guest.vmid,
                  "net0": "name=eth0,bridge=vmbr0,ip=dhcp,type=veth"}
    else:
        config = {"name": guest.name, "cores": guest.cpus, "memory": memory_mb,
                  "scsi0": "local-lvm:vm-%d-disk-0,size=8G" % guest.vmid,
                  "boot": "order=scsi0", "net0": "virtio,bridge=vmbr0"}
    if guest.hookscript:  # set as local:snippets/<file>
        config["hookscript"] = "local:snippets/%s" % os.path.basename(guest.hookscript)
    if guest.template:
        config["template"] = 1
    if guest.tags:
        config["tags"] = guest.tags
    if guest.lock:
        config["lock"] = guest.lock
    return config


ROUTES: list = [
    (re.compile(p), name) for p, name in (
        (r"/version", "_api_version"),
        (r"/cluster/resources", "_api_resources"),
        (r"/cluster/tasks", "_api_tasks"),
        (r"/cluster/nextid", "_api_nextid"),
        (r"/cluster/status", "_api_cluster_status"),
        (r"/access/permissions", "_api_permissions"),
        (r"/access/acl", "_api_acl"),
        (r"/nodes", "_api_nodes"),
        (r"/nodes/(?P<node>[^/]+)/(?P<kind>lxc|qemu)", "_api_guest_list"),
        (r"/nodes/(?P<node>[^/]+)/(?P<kind>lxc|qemu)/(?P<vmid>\d+)/status/current", "_api_status"),
        (r"/nodes/(?P<node>[^/]+)/(?P<kind>lxc|qemu)/(?P<vmid>\d+)/config", "_api_config"),
    )
]
