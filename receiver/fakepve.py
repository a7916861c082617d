"""A Proxmox VE API simulator for the tests, ``pve-janitor demo`` and ``pve-janitor simulator``.

Why it exists: pve-janitor's whole job is to believe Proxmox and nothing else, so the
code that matters most (inventory reads, the watcher, the fail-closed guards) can only
be exercised against something that answers like Proxmox does, including the
awkward parts. This module serves the read-only slice of the PVE API that pve-janitor
uses and fakes the guest life cycle around it, so the product runs on a laptop.

What it fakes, each point traced to /work/shared/PROXMOX.md (cited as "PX: <section>"):

* real HTTPS with a certificate made at run time (PX: proxmoxer 2.x, "the scheme is
  always https"); clients verify it with the CA bundle at ``sim.ca_path``;
* token auth and the 401 after a delay for a wrong token (PX: API);
* ``/cluster/resources``, ``/nodes/<n>/lxc|qemu``, per-guest status/config,
  ``/cluster/tasks`` with real UPIDs, ``/cluster/nextid`` as a string,
  ``/access/permissions`` (PX: API);
* a token without ``VM.Audit`` getting HTTP 200 and empty lists, 403 only per guest,
  and partial lists (PX: API);
* ACLs as Proxmox keeps them (pve-access-control ``AccessControl::roles``,
  ``RPCEnvironment::compile_acl_path``, ``API2/ACL.pm``): the token holds PVEAuditor on
  ``/``.  ``set_visible(vmids)`` hides every other guest with a NoAccess entry for the
  token on its ``/vms/N`` (``via="vms"``, computed at each request for the guests that
  exist then) or puts them in a pool ``hidden`` with a NoAccess entry on ``/pool/hidden``
  (``via="pool"``); ``/access/permissions`` shows no privilege on a hidden guest's path.
  ``GET /access/acl`` lists every entry only to a token with ``Sys.Audit`` on ``/access``;
  after ``set_sys_audit(False)`` it answers 200 with an empty list, as Proxmox does for a
  caller who may modify no ACL (the task list is not filtered for it).  ``add_acl`` lists
  more entries without changing what the token sees; ``set_acl_fault(status)`` makes only
  ``/access/acl`` fail;
* quorum (pve-cluster ``status.c``; pve-manager ``API2/Cluster.pm`` ``get_status``):
  ``GET /cluster/status`` with the cluster entry (``quorate``) and one entry per node
  (403 without Sys.Audit on ``/``); ``set_quorate(False)`` cuts the answering node off:
  reads never check quorum, so ``/cluster/resources`` and ``/cluster/nextid`` keep
  answering from the guest list as it was at that moment, while guests are still
  created, changed and destroyed on the quorate side; ``standalone=True`` has no
  cluster entry at all;
* offline nodes: guests still listed with ``status: unknown`` and no ``name``,
  ``/nodes/<node>/...`` failing with HTTP 595 (PX: API);
* hookscripts run as Proxmox runs them: ``<script> <vmid> <phase>``, no shell, a
  minimal environment, synchronously; only a failing ``pre-start`` aborts the start;
  no hook at all for a destroy (PX: Hookscripts);
* the ``lock: destroyed`` window before a destroyed guest disappears (PX: Hookscripts);
* faults (refused connections, HTTP 500/401, slow answers, reset connections), so
  the fail-closed paths can be tested.

It is not an emulator: it answers only the routes listed in ``_ROUTES``, and it is
read-only over HTTP, like the PVEAuditor token pve-janitor uses.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import importlib
import itertools
import json
import logging
import os
import re
import secrets
import shlex
import signal
import socket
import socketserver
import ssl
import subprocess
import tempfile
import threading
import time
import weakref
from collections import Counter, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterable, Optional
from urllib.parse import parse_qs, urlsplit

import trustme

logger = logging.getLogger(__name__)

API_PREFIX = "/api2/json"
GUEST_TYPES = ("lxc", "qemu")
GUEST_STATUSES = ("running", "stopped", "paused")
FAULT_KINDS = (None, "refuse", "http500", "http401", "slow", "reset", "nodata")
VMID_MIN, VMID_MAX = 100, 999_999_999

# PX: Hookscripts -- "runs <script> <vmid> <phase> directly (no shell), as root, with
# LC_ALL=C, PATH /sbin:/bin:/usr/sbin:/usr/bin"; exactly these four phases exist.
HOOK_PHASES = ("pre-start", "post-start", "pre-stop", "post-stop")
HOOK_BASE_ENV = {"LC_ALL": "C", "PATH": "/sbin:/bin:/usr/sbin:/usr/bin"}
# PX: Hookscripts -- "There is no timeout". This one only keeps a broken test from hanging.
HOOK_SAFETY_TIMEOUT_S = 60.0
HOOK_OUTPUT_LOG_LIMIT = 2000

# PX: API, /cluster/tasks -- "running tasks plus about 25 recent finished ones".
FINISHED_TASKS_KEPT = 25
# pvestatd broadcasts guest stats every 10 s; /cluster/resources shows the last broadcast,
# so a guest's uptime there moves in steps of 10 s.
STATS_INTERVAL_S = 10
# PX: API, /cluster/resources?type=... ; anything else is a parameter error in PVE.
RESOURCE_TYPES = ("vm", "storage", "node", "sdn")
PVE_VERSION = {"version": "8.2.4", "release": "8.2", "repoid": "faa83925c9641325"}
# PX: API -- PVEAuditor holds VM.Audit and Sys.Audit.
AUDITOR_PRIVILEGES = {"VM.Audit": 1, "Sys.Audit": 1}
# set_visible: how the hidden guests are hidden (NoAccess on /vms/N, or on their pool).
HIDDEN_VIA = ("vms", "pool")
HIDDEN_POOL = "hidden"

HANDSHAKE_TIMEOUT_S = 10.0
CONNECTION_TIMEOUT_S = 30.0
STOP_JOIN_TIMEOUT_S = 3.0
MAX_DISCARDED_BODY = 1 << 20

_UPID_RE = re.compile(
    r"^UPID:(?P<node>[^:]+):(?P<pid>[0-9A-F]{8}):(?P<pstart>[0-9A-F]{8}):"
    r"(?P<starttime>[0-9A-F]{8}):(?P<type>[^:]*):(?P<id>[^:]*):(?P<user>[^:]+):$"
)


class SimulatorError(RuntimeError):
    """A guest operation that Proxmox itself would refuse (e.g. ``qm destroy`` of a running VM)."""


class _ApiError(Exception):
    """An HTTP error answer: PVE puts the message in the reason phrase; we add a JSON body."""

    def __init__(self, status: int, message: str, errors: Optional[dict] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.errors = errors


class _Encoded(bytes):
    """A route's ``data`` already encoded as JSON (the 100,000-guest list is built from cached parts)."""


@dataclass
class _Reply:
    status: int
    body: dict
    reason: Optional[str] = None

    def payload(self) -> bytes:
        data = self.body.get("data")
        if isinstance(data, _Encoded):
            return b'{"data": ' + data + b"}"
        return json.dumps(self.body).encode("utf-8")


@dataclass
class _Task:
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
        # PX: API -- UPID:<node>:<pid %08X>:<pstart %08X>:<starttime %08X>:<type>:<id>:<user>:
        return "UPID:%s:%08X:%08X:%08X:%s:%s:%s:" % (
            self.node, self.pid, self.pstart, self.starttime, self.type, self.id, self.user,
        )

    def as_api(self) -> dict:
        entry = {
            "upid": self.upid, "node": self.node, "pid": self.pid, "pstart": self.pstart,
            "starttime": self.starttime, "type": self.type, "id": self.id, "user": self.user,
        }
        if self.endtime is not None:  # PX: API -- status/endtime absent while running
            entry["endtime"] = self.endtime
            entry["status"] = self.status
        return entry


@dataclass
class _Guest:
    vmid: int
    node: str
    type: str
    status: str
    name: str
    template: bool
    hookscript: Optional[str]
    tags: Optional[str] = None
    lock: Optional[str] = None
    started_mono: Optional[float] = None
    gone_at_mono: Optional[float] = None
    destroy_task: Optional[_Task] = None
    maxmem: int = 512 * 1024 * 1024
    maxdisk: int = 8 * 1024 * 1024 * 1024
    cpus: int = 1
    # (what the /cluster/resources entry depends on, that entry as JSON)
    encoded: Optional[tuple] = field(default=None, repr=False, compare=False)

    def uptime(self, now_mono: float) -> int:
        if self.status == "stopped" or self.started_mono is None:
            return 0
        return max(0, int(now_mono - self.started_mono))

    def as_dict(self) -> dict:
        return {
            "vmid": self.vmid, "node": self.node, "type": self.type, "status": self.status,
            "name": self.name, "template": self.template, "hookscript": self.hookscript,
            "tags": self.tags, "lock": self.lock,
        }


def parse_upid(upid: str) -> Optional[dict]:
    """Split a UPID (PX: API format) into its fields; numbers as ints. None if malformed."""
    match = _UPID_RE.match(upid)
    if not match:
        return None
    fields = match.groupdict()
    for key in ("pid", "pstart", "starttime"):
        fields[key] = int(fields[key], 16)
    return fields


def lowest_free_vmid(used: Iterable[int]) -> int:
    """The lowest VMID >= 100 not in ``used`` (PX: API, /cluster/nextid: VMIDs are reused)."""
    taken = set(used)
    vmid = VMID_MIN
    while vmid in taken:
        vmid += 1
    return vmid


def _config_path(node: str, kind: str, vmid: int) -> str:
    directory = "lxc" if kind == "lxc" else "qemu-server"
    return "nodes/%s/%s/%d.conf" % (node, directory, vmid)


def _reason_phrase(message: str) -> str:
    one_line = " ".join(message.split())
    return one_line.encode("latin-1", "replace").decode("latin-1")[:200]


def _error_reply(status: int, message: str, errors: Optional[dict] = None) -> _Reply:
    body = {"data": None, "message": message}
    if errors:
        body["errors"] = errors
    return _Reply(status, body, _reason_phrase(message))


def _query_value(query: dict, key: str) -> Optional[str]:
    values = query.get(key)
    return values[0] if values else None


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return "[%s]" % host if ":" in host else host


# --------------------------------------------------------------------------- HTTP layer


class _Handler(BaseHTTPRequestHandler):
    """Turns one HTTP/1.0 request into a call of ``ProxmoxSimulator._handle``.

    HTTP/1.0 (one request per connection) keeps faults honest: a "refused" simulator
    cannot keep answering over a kept-alive connection, and no socket outlives a test.
    """

    protocol_version = "HTTP/1.0"
    server_version = "pve-api-daemon/3.0"
    sys_version = ""
    timeout = CONNECTION_TIMEOUT_S

    def do_GET(self):  # noqa: N802 (http.server naming)
        self._serve()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def _serve(self) -> None:
        self._discard_body()
        sim: ProxmoxSimulator = self.server.sim
        reply = sim._handle(self.command, self.path, self.headers.get("Authorization"))
        if reply is None:  # fault "reset": close without answering
            self.close_connection = True
            return
        self._write(reply)

    def _discard_body(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        if 0 < length <= MAX_DISCARDED_BODY:
            self.rfile.read(length)

    def _write(self, reply: _Reply) -> None:
        payload = reply.payload()
        self.send_response(reply.status, reply.reason)
        self.send_header("Content-Type", "application/json;charset=UTF-8")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "max-age=0")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def log_message(self, format, *args):  # noqa: A002 (http.server signature)
        # The request line never holds the token; headers are not logged.
        logger.debug("%s - " + format, self.client_address[0], *args)


class _TLSServer(ThreadingHTTPServer):
    """ThreadingHTTPServer whose TLS handshake happens in the connection's own thread.

    The listening socket stays plain TCP, so "refuse" can close it and listen again, and
    a slow or broken client cannot stall ``accept()`` for everyone else.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, sim: "ProxmoxSimulator", context: ssl.SSLContext):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.sim = sim
        self.ssl_context = context
        self._active: dict = {}
        self._active_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self):
        # Skip HTTPServer.server_bind's getfqdn(): a reverse DNS lookup we do not need.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def finish_request(self, request, client_address):
        request.settimeout(HANDSHAKE_TIMEOUT_S)
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except (OSError, ValueError) as exc:
            logger.debug("TLS handshake with %s failed: %s", client_address[0], exc)
            return
        me = threading.current_thread()
        with self._active_lock:
            self._active[me] = tls
        try:
            self.RequestHandlerClass(tls, client_address, self)
        finally:
            with self._active_lock:
                self._active.pop(me, None)
            tls.close()

    def handle_error(self, request, client_address):
        logger.debug("connection from %s ended with an error", client_address[0], exc_info=True)

    def abort_connections(self) -> None:
        """Cut every open connection (at TCP level, under TLS) so its thread ends now."""
        with self._active_lock:
            sockets = list(self._active.values())
        for sock in sockets:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass

    def wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._active_lock:
            threads = list(self._active)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


# --------------------------------------------------------------------------- simulator


class ProxmoxSimulator:
    """An in-process Proxmox VE cluster: guests, nodes, tasks, hooks, and the HTTPS API."""

    def __init__(
        self,
        nodes: Iterable[str] = ("pve1", "pve2"),
        user: str = "janitor@pve",
        token_name: str = "sweep",
        token_value: Optional[str] = None,
        auth_fail_delay: float = 0.0,
        node_name_env: bool = True,
        task_user: str = "root@pam",
    ):
        self.nodes = tuple(nodes)
        if not self.nodes or len(set(self.nodes)) != len(self.nodes):
            raise ValueError("nodes must be a non-empty list of distinct names")
        if "@" not in user:
            raise ValueError("user must look like name@realm")
        self.user = user
        self.token_name = token_name
        self.token_value = token_value if token_value is not None else secrets.token_hex(16)
        self.auth_fail_delay = float(auth_fail_delay)
        self.node_name_env = node_name_env
        self.task_user = task_user
        self.hook_env: dict = {}
        self.hook_runs: list = []

        self._lock = threading.RLock()
        self._guests: dict = {}
        self._destroying: dict = {}  # vmid -> guest in its ``lock: destroyed`` window
        self._online = {node: True for node in self.nodes}
        self._node_boot_mono = time.monotonic()
        self._pstart = {node: 1000 + 977 * i for i, node in enumerate(self.nodes)}
        self._pids = itertools.count(0x2000)
        self._running_tasks: list = []
        self._finished_tasks: deque = deque(maxlen=FINISHED_TASKS_KEPT)
        self._vm_audit = True
        self._vm_audit_propagates = True
        self._sys_audit = True
        self._sys_audit_access = True  # Sys.Audit on /access (the ACL list), see set_sys_audit
        self.standalone = False
        self._stale: Optional[dict] = None  # the answering node's guest list while it has no quorum
        # Bumped by every change /cluster/resources?type=vm can show (see _changed).
        self._version = 0
        self._vm_answer: Optional[tuple] = None  # ((version, stats time), encoded answer)
        self._visible: Optional[frozenset] = None
        self._hidden_via = "vms"
        self._extra_acl: list = []
        self._acl_fault: Optional[int] = None
        self._fault: tuple = (None, 0.0)
        self._fault_path: Optional[str] = None
        self._counts: Counter = Counter()
        self._count_lock = threading.Lock()

        self._closing = threading.Event()
        self._life_lock = threading.Lock()  # start/stop/listen transitions
        self._host: Optional[str] = None
        self._port: Optional[int] = None
        self._context: Optional[ssl.SSLContext] = None
        self._ca_path: Optional[str] = None
        self._ca_cleanup: Optional[weakref.finalize] = None
        self._server: Optional[_TLSServer] = None
        self._thread: Optional[threading.Thread] = None
        self._servers: list = []

    # ------------------------------------------------------------------ life cycle

    def start(self, host: str = "127.0.0.1", port: int = 0) -> "ProxmoxSimulator":
        """Serve HTTPS on host:port (0 = any free port) in a daemon thread; returns self."""
        with self._life_lock:
            if self._host is not None:
                raise RuntimeError("simulator already started")
            self._closing.clear()
            self._context = self._make_tls(host)
            self._host = host
            self._listen(port)
            if self._fault[0] == "refuse":
                self._unlisten()
        logger.info("Proxmox simulator listening on %s (nodes: %s)", self.url,
                    ", ".join(self.nodes))
        return self

    def stop(self) -> None:
        """Stop serving, end open connections, remove the CA file. Safe to call twice."""
        with self._life_lock:
            if self._host is None:
                return
            self._closing.set()
            if self._server is not None:
                self._unlisten()
            for server in self._servers:
                server.abort_connections()
                server.wait_idle(STOP_JOIN_TIMEOUT_S)
            self._servers.clear()
            self._remove_ca_file()
            self._host = None
        logger.info("Proxmox simulator stopped")

    def __enter__(self) -> "ProxmoxSimulator":
        if self._host is None:
            self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _make_tls(self, host: str) -> ssl.SSLContext:
        """A throwaway CA and server cert (PX: proxmoxer 2.x -- clients always use https)."""
        ca = trustme.CA(organization_name="pve-janitor simulator")
        identities = ["127.0.0.1", "localhost", "::1"]
        if host not in identities and host not in ("", "0.0.0.0", "::"):
            identities.append(host)
        cert = ca.issue_cert(*identities)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(context)
        fd, path = tempfile.mkstemp(prefix="pve-janitor-sim-ca-", suffix=".pem")
        os.close(fd)
        ca.cert_pem.write_to_path(path)
        self._ca_path = path
        # Also removed at interpreter exit if nobody calls stop().
        self._ca_cleanup = weakref.finalize(self, _unlink_quietly, path)
        return context

    def _remove_ca_file(self) -> None:
        if self._ca_cleanup is not None:
            self._ca_cleanup()

    def _listen(self, port: int) -> None:
        server = _TLSServer((self._host, port), self, self._context)
        self._port = server.server_address[1]
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05},
            name="fakepve-%d" % self._port, daemon=True,
        )
        self._server, self._thread = server, thread
        self._servers.append(server)
        thread.start()

    def _unlisten(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        server.shutdown()
        server.server_close()
        thread.join()

    # ------------------------------------------------------------------ connection facts

    @property
    def url(self) -> str:
        return "https://%s%s" % (self.pve_host, API_PREFIX)

    @property
    def pve_host(self) -> str:
        if self._host is None or self._port is None:
            raise RuntimeError("simulator not started")
        return "%s:%d" % (_url_host(self._host), self._port)

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("simulator not started")
        return self._port

    @property
    def ca_path(self) -> str:
        if self._ca_path is None:
            raise RuntimeError("simulator not started")
        return self._ca_path

    @property
    def token_id(self) -> str:
        return "%s!%s" % (self.user, self.token_name)

    def env(self) -> dict:
        """The PVE_* settings that point pve-janitor at this simulator."""
        return {
            "PVE_HOST": self.pve_host,
            "PVE_USER": self.user,
            "PVE_TOKEN_NAME": self.token_name,
            "PVE_TOKEN_VALUE": self.token_value,
            "PVE_VERIFY_SSL": self.ca_path,
        }

    # ------------------------------------------------------------------ guests

    def add_guest(
        self,
        vmid: int,
        node: str = "pve1",
        type: str = "lxc",  # noqa: A002 (the API field is called type)
        status: str = "running",
        name: Optional[str] = None,
        template: bool = False,
        hookscript: Optional[str] = None,
        tags: Optional[str] = None,
    ) -> dict:
        """Create a guest directly (no task, no hooks, like a scene's starting state)."""
        vmid = int(vmid)
        self._check_new_guest(vmid, node, type, status, template)
        guest = _Guest(
            vmid=vmid, node=node, type=type, status=status,
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

    def guest(self, vmid: int) -> Optional[dict]:
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

        PX: Hookscripts -- only pre-start is fatal: a non-zero exit (or a missing or
        non-executable script) aborts the start. Already running: nothing happens, True.
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
            error = "hookscript error for %d on pre-start: command '%s %d pre-start' failed: %s" % (
                guest.vmid, guest.hookscript, guest.vmid,
                "exit code %d" % rc if rc is not None else "could not run",
            )
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

        PX: Hookscripts -- API stop fires pre-stop; post-stop follows any stop; failures
        in these phases are warnings only. Already stopped: nothing happens, False.
        """
        guest = self._get_for_operation(vmid)
        if guest.status == "stopped":
            return False
        started = int(time.time())
        self._stop_with_hooks(guest)
        self._record_task(guest.node, "vzstop" if guest.type == "lxc" else "qmstop", guest.vmid,
                          started, "OK")
        return True

    def destroy_guest(self, vmid: int, lock_seconds: float = 0.0) -> None:
        """Destroy a guest as ``pct destroy --force`` / ``qm destroy`` would.

        PX: Hookscripts -- there is no destroy phase; ``qm destroy`` refuses a running VM;
        ``pct destroy --force`` on a running container fires pre-stop (and lxc's post-stop).
        While destroying, the config is ``{lock: destroyed}`` and /cluster/resources still
        lists the guest with that lock; after ``lock_seconds`` it is gone (expired lazily
        on the next read, so the caller never waits). The vzdestroy/qmdestroy task runs
        during that window and ends with status "OK" when the guest disappears.
        """
        guest = self._get_for_operation(vmid)
        if guest.type == "qemu" and guest.status != "stopped":
            raise SimulatorError("VM %d is running - destroy failed" % guest.vmid)
        if guest.status != "stopped":
            self._stop_with_hooks(guest)
        task = self._new_task(guest.node, "vzdestroy" if guest.type == "lxc" else "qmdestroy",
                              guest.vmid, int(time.time()))
        with self._lock:
            guest.lock, guest.destroy_task = "destroyed", task
            guest.gone_at_mono = time.monotonic() + max(0.0, float(lock_seconds))
            self._destroying[guest.vmid] = guest
            self._running_tasks.append(task)
            self._changed()
            self._expire_locked()
        logger.info("guest %d destroyed (listed with lock=destroyed for %.1fs)", guest.vmid,
                    max(0.0, float(lock_seconds)))

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

    def _get_for_operation(self, vmid: int) -> _Guest:
        with self._lock:
            self._expire_locked()
            guest = self._guests.get(int(vmid))
            if guest is None:
                raise KeyError("no guest with VMID %s" % vmid)
            if guest.lock:
                raise SimulatorError("CT/VM %d is locked (%s)" % (guest.vmid, guest.lock))
            return guest

    def _stop_with_hooks(self, guest: _Guest) -> None:
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
            task = guest.destroy_task
            if task is not None and task in self._running_tasks:
                self._running_tasks.remove(task)
                end_wall = time.time() - (now - guest.gone_at_mono)
                task.endtime, task.status = max(task.starttime, int(end_wall)), "OK"
                self._finished_tasks.append(task)

    # ------------------------------------------------------------------ tasks

    def _new_task(self, node: str, task_type: str, vmid: int, starttime: int) -> _Task:
        with self._lock:
            return _Task(node=node, type=task_type, id=str(vmid), user=self.task_user,
                         pid=next(self._pids), pstart=self._pstart[node], starttime=starttime)

    def _record_task(self, node: str, task_type: str, vmid: int, starttime: int,
                     status: str) -> None:
        task = self._new_task(node, task_type, vmid, starttime)
        task.endtime, task.status = max(starttime, int(time.time())), status
        with self._lock:
            self._finished_tasks.append(task)

    # ------------------------------------------------------------------ hooks

    def _hook_env(self, node: str) -> dict:
        env = dict(HOOK_BASE_ENV)
        env.update(self.hook_env)
        if self.node_name_env:
            env["PVE_JANITOR_NODE"] = node
        return env

    def _run_hook(self, guest: _Guest, phase: str) -> Optional[int]:
        """Run the guest's hookscript for one phase, as PVE does; returns its exit code.

        PX: Hookscripts -- ``[script, vmid, phase]``, no shell, LC_ALL=C and a fixed PATH,
        synchronously. 0 when the guest has no hookscript; None when it could not run.
        """
        if not guest.hookscript:
            return 0
        argv = [guest.hookscript, str(guest.vmid), phase]
        began = time.monotonic()
        try:
            proc = subprocess.run(
                argv, env=self._hook_env(guest.node), cwd="/", stdin=subprocess.DEVNULL,
                capture_output=True, timeout=HOOK_SAFETY_TIMEOUT_S, check=False,
            )
            rc: Optional[int] = proc.returncode
            self._log_hook_output(guest.vmid, phase, proc)
        except subprocess.TimeoutExpired:
            rc = None
            logger.warning("hookscript for %d on %s killed after %ss", guest.vmid, phase,
                           HOOK_SAFETY_TIMEOUT_S)
        except OSError as exc:
            rc = None
            logger.warning("hookscript for %d on %s could not run: %s", guest.vmid, phase, exc)
        duration = time.monotonic() - began
        with self._lock:
            self.hook_runs.append((guest.vmid, phase, rc, duration))
        if rc != 0:
            logger.warning("hookscript error for %d on %s: exit %s", guest.vmid, phase, rc)
        return rc

    @staticmethod
    def _log_hook_output(vmid: int, phase: str, proc: subprocess.CompletedProcess) -> None:
        for stream, data in (("stdout", proc.stdout), ("stderr", proc.stderr)):
            if data:
                text = data.decode("utf-8", "replace")[:HOOK_OUTPUT_LOG_LIMIT]
                logger.debug("hook %d %s %s: %s", vmid, phase, stream, text)

    # ------------------------------------------------------------------ cluster knobs

    def set_node_online(self, node: str, online: bool) -> None:
        """PX: API -- an offline node's guests stay listed (status unknown, no name);
        /nodes/<node>/... answers 595."""
        with self._lock:
            if node not in self._online:
                raise ValueError("unknown node %r" % node)
            self._online[node] = bool(online)
            self._changed()

    def set_vm_audit(self, allowed: bool, propagate: bool = True) -> None:
        """PX: API -- without VM.Audit: 200 and empty lists; 403 only per guest.
        ``propagate=False``: VM.Audit granted on ``/vms`` alone (``/access/permissions`` shows
        it with flag 0), so on no guest: empty lists too."""
        with self._lock:
            self._vm_audit = bool(allowed)
            self._vm_audit_propagates = bool(propagate)
            self._changed()

    def set_visible(self, vmids: Optional[Iterable[int]], via: str = "vms") -> None:
        """Hide every guest outside ``vmids`` by an ACL: lists are partial (PX: API, "an empty
        (or partial) list") while ``/vms`` still shows VM.Audit.  ``via="vms"``: a NoAccess
        entry on each hidden guest's ``/vms/N``; ``via="pool"``: NoAccess on ``/pool/hidden``,
        the pool they are in (a pool's NoAccess trumps, compile_acl_path).  None: all visible."""
        if via not in HIDDEN_VIA:
            raise ValueError("via must be one of %s" % (HIDDEN_VIA,))
        with self._lock:
            self._visible = None if vmids is None else frozenset(int(v) for v in vmids)
            self._hidden_via = via
            self._changed()

    def _changed(self) -> None:
        """Something /cluster/resources?type=vm shows has changed: its cached answer is stale.

        Every change to a guest, a node or what the token may see goes through a method of
        this class that calls this (under ``_lock``).
        """
        self._version += 1

    def set_sys_audit(self, allowed: bool, only_access: bool = False) -> None:
        """Without Sys.Audit (as with a role holding VM.Audit alone): ``/access/permissions``
        lacks it, ``/access/acl`` answers 200 with an empty list (API2/ACL.pm) and
        ``/cluster/status`` 403.  ``only_access``: take it away on ``/access`` alone (an ACL
        entry on ``/access`` with a role without Sys.Audit replaces the one from ``/``)."""
        with self._lock:
            self._sys_audit_access = bool(allowed)
            if not only_access:
                self._sys_audit = bool(allowed)

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

    def add_acl(self, path: str, roleid: str, ugid: Optional[str] = None, type: str = "token",  # noqa: A002
                propagate: bool = True) -> None:
        """One more ``/access/acl`` entry (default: for the token).  Listed only: what the
        token sees is ``set_visible``'s and ``set_vm_audit``'s business."""
        if type not in ("user", "group", "token"):
            raise ValueError("type must be user, group or token")
        with self._lock:
            self._extra_acl.append({"path": path, "type": type, "ugid": ugid or self.token_id,
                                    "roleid": roleid, "propagate": int(bool(propagate))})

    def set_acl_fault(self, status: Optional[int]) -> None:
        """Make ``GET /access/acl`` alone answer this HTTP status; None heals."""
        with self._lock:
            self._acl_fault = None if status is None else int(status)

    def set_fault(self, kind: Optional[str], delay: float = 0.0, path: Optional[str] = None) -> None:
        """Make the API misbehave; ``None`` heals (and listens again on the same port).
        ``nodata``: answer 200 with a JSON body without ``data`` (on ``path`` alone, if given)."""
        if kind not in FAULT_KINDS:
            raise ValueError("fault must be one of %s" % (FAULT_KINDS,))
        with self._life_lock:
            self._fault = (kind, max(0.0, float(delay)))
            self._fault_path = path
            if self._host is not None and kind == "refuse" and self._server is not None:
                self._unlisten()
            elif self._host is not None and kind != "refuse" and self._server is None:
                self._listen(self._port)
        logger.info("simulator fault set to %s", kind)

    def request_count(self, path_prefix: str = "") -> int:
        """API requests received (answered or faulted) whose path after /api2/json starts
        with ``path_prefix``."""
        with self._count_lock:
            return sum(n for path, n in self._counts.items() if path.startswith(path_prefix))

    def reset_counts(self) -> None:
        with self._count_lock:
            self._counts.clear()

    # ------------------------------------------------------------------ HTTP entry point

    def _handle(self, method: str, target: str, authorization: Optional[str]) -> Optional[_Reply]:
        """Answer one request; None means "close without answering" (fault reset)."""
        parts = urlsplit(target)
        path = parts.path
        api_path = None
        if path == API_PREFIX or path.startswith(API_PREFIX + "/"):
            api_path = path[len(API_PREFIX):].rstrip("/") or "/"
            with self._count_lock:
                self._counts[api_path] += 1
        kind, delay = self._fault
        if kind == "reset":
            return None
        if kind == "slow":
            self._closing.wait(delay)
        if api_path is None:
            return _error_reply(404, "Not found: %s" % path)
        if kind == "http500":
            return _error_reply(500, "simulated internal server error")
        if kind == "nodata" and (self._fault_path is None or api_path == self._fault_path):
            return _Reply(200, {"errors": None})  # 200, JSON, but no "data"
        if kind == "http401" or not self._token_ok(authorization):
            # PX: API -- a wrong token gets 401 after a deliberate delay.
            self._closing.wait(self.auth_fail_delay)
            return _error_reply(401, "authentication failure")
        if method != "GET":
            return _error_reply(501, "Method '%s %s%s' not implemented"
                                % (method, API_PREFIX, api_path))
        try:
            return _Reply(200, {"data": self._route(api_path, parse_qs(parts.query))})
        except _ApiError as exc:
            return _error_reply(exc.status, exc.message, exc.errors)

    def _token_ok(self, authorization: Optional[str]) -> bool:
        # PX: API -- Authorization: PVEAPIToken=<user>@<realm>!<tokenid>=<secret>
        prefix = "PVEAPIToken="
        if not authorization or not authorization.startswith(prefix):
            return False
        token_id, sep, secret = authorization[len(prefix):].partition("=")
        if not sep:
            return False
        id_ok = hmac.compare_digest(token_id.encode(), self.token_id.encode())
        secret_ok = hmac.compare_digest(secret.encode(), self.token_value.encode())
        return id_ok and secret_ok

    def _route(self, path: str, query: dict):
        with self._lock:
            self._expire_locked()
            self._check_node_reachable(path)
            for pattern, method_name in _ROUTES:
                match = pattern.fullmatch(path)
                if match:
                    return getattr(self, method_name)(query, **match.groupdict())
        raise _ApiError(501, "Method 'GET %s%s' not implemented" % (API_PREFIX, path))

    def _check_node_reachable(self, path: str) -> None:
        """PX: API -- /nodes/<node>/... is proxied to that node: 595 when it is offline."""
        match = re.match(r"^/nodes/([^/]+)(/|$)", path)
        if not match:
            return
        node = match.group(1)
        if node not in self._online:
            raise _ApiError(500, "hostname lookup '%s' failed - failed to get address info for: "
                                 "%s: Name or service not known" % (node, node))
        if not self._online[node]:
            raise _ApiError(595, "Errors during connection establishment, proxy handshake")

    def _can_see(self, vmid: int) -> bool:
        return self._vm_audit and self._vm_audit_propagates and (self._visible is None or vmid in self._visible)

    def _known_guests(self) -> dict:
        """The guests the answering node knows of: all, or its stale copy while it has no quorum."""
        return self._guests if self._stale is None else self._stale

    def _visible_guests(self) -> list:
        return [g for _, g in sorted(self._known_guests().items()) if self._can_see(g.vmid)]

    # ------------------------------------------------------------------ routes

    def _api_version(self, query):
        return dict(PVE_VERSION)

    def _api_resources(self, query):
        """PX: API, /cluster/resources -- every guest of the cluster in one call.

        Each guest's entry is kept encoded until something it shows changes (uptime moves
        every STATS_INTERVAL_S, like pvestatd's broadcasts), and the whole ``type=vm``
        answer until anything changes: serving 100,000 guests from Python cost about 0.7 s
        per read, a time a real cluster spends in pveproxy's C JSON encoder, and it stood
        in the way of measuring the sweep itself.
        """
        kind = _query_value(query, "type")
        if kind is not None and kind not in RESOURCE_TYPES:
            raise _ApiError(400, "Parameter verification failed.", {
                "type": "value '%s' does not have a value in the enumeration '%s'"
                        % (kind, ", ".join(RESOURCE_TYPES))})
        parts = []
        if kind in (None, "node"):
            parts.extend(json.dumps(self._node_entry(node)).encode() for node in self.nodes)
        if kind in (None, "vm"):
            now = time.monotonic()
            stats_at = now - (now - self._node_boot_mono) % STATS_INTERVAL_S
            if kind == "vm" and self._vm_answer and self._vm_answer[0] == (self._version, stats_at):
                return self._vm_answer[1]
            parts.extend(self._encoded_entry(g, stats_at) for g in self._visible_guests())
        answer = _Encoded(b"[" + b", ".join(parts) + b"]")
        if kind == "vm":
            self._vm_answer = ((self._version, stats_at), answer)
        return answer

    def _encoded_entry(self, guest: _Guest, stats_at: float) -> bytes:
        key = (guest.status, guest.lock, guest.name, guest.node, guest.tags, self._online[guest.node],
               guest.uptime(stats_at))
        cached = guest.encoded
        if cached is None or cached[0] != key:
            cached = guest.encoded = (key, json.dumps(self._resource_entry(guest, stats_at)).encode())
        return cached[1]

    def _resource_entry(self, guest: _Guest, now: float) -> dict:
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
        else:  # PX: API -- offline node: status "unknown", no name
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

    def _api_nodes(self, query):
        return [self._node_entry(node) for node in self.nodes]

    def _api_guest_list(self, query, node, kind):
        """PX: API -- /nodes/<node>/lxc|qemu: guests on that node; empty without VM.Audit."""
        now = time.monotonic()
        return [self._list_entry(g, now) for g in self._visible_guests()
                if g.node == node and g.type == kind]

    def _list_entry(self, guest: _Guest, now: float) -> dict:
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

    def _guest_at(self, node: str, kind: str, vmid: str) -> _Guest:
        """PX: API -- per-guest endpoints answer 403 without VM.Audit; unknown: config missing."""
        number = int(vmid)
        if not self._can_see(number):
            raise _ApiError(403, "Permission check failed (/vms/%d, VM.Audit)" % number)
        guest = self._guests.get(number)
        if guest is None or guest.node != node or guest.type != kind:
            raise _ApiError(500, "Configuration file '%s' does not exist"
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
        config = self._guest_config(guest)
        config["digest"] = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()
        return config

    @staticmethod
    def _guest_config(guest: _Guest) -> dict:
        if guest.lock == "destroyed":  # PX: Hookscripts -- config replaced by {lock: destroyed}
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
        if guest.hookscript:  # PX: Hookscripts -- set as local:snippets/<file>
            config["hookscript"] = "local:snippets/%s" % os.path.basename(guest.hookscript)
        if guest.template:
            config["template"] = 1
        if guest.tags:
            config["tags"] = guest.tags
        if guest.lock:
            config["lock"] = guest.lock
        return config

    def _api_tasks(self, query):
        """PX: API, /cluster/tasks -- running tasks plus the last 25 finished, newest first."""
        running = sorted(self._running_tasks, key=lambda t: t.starttime, reverse=True)
        finished = list(reversed(self._finished_tasks))
        return [task.as_api() for task in running + finished]

    def _api_nextid(self, query):
        """PX: API, /cluster/nextid -- the lowest free VMID >= 100, as a string."""
        wanted = _query_value(query, "vmid")
        if wanted is not None:
            if not wanted.isdigit() or int(wanted) in self._known_guests():
                raise _ApiError(400, "Parameter verification failed.",
                                {"vmid": "VM %s already exists" % wanted})
            return str(int(wanted))
        return str(lowest_free_vmid(self._known_guests()))

    def _api_cluster_status(self, query):
        """PX: API, /cluster/status (pve-manager ``API2/Cluster.pm`` ``get_status``): needs
        Sys.Audit on ``/``; a cluster entry with ``quorate`` (none on a standalone node) and
        one entry per node, the answering one with ``local: 1``."""
        if not self._sys_audit:
            raise _ApiError(403, "Permission check failed (/, Sys.Audit)")
        entries = []
        if not self.standalone:
            entries.append({"type": "cluster", "id": "cluster", "name": "sim", "nodes": len(self.nodes),
                            "quorate": 1 if self._stale is None else 0, "version": len(self.nodes) + 1})
        for i, node in enumerate(self.nodes[:1] if self.standalone else self.nodes):
            entries.append({"type": "node", "id": "node/%s" % node, "name": node, "nodeid": i + 1,
                            "ip": "192.0.2.%d" % (i + 1), "local": 1 if i == 0 else 0,
                            "online": 1 if self._online[node] else 0, "level": ""})
        return entries

    def _api_permissions(self, query):
        """PX: API -- a token may read its own privileges; PVEAuditor has VM.Audit + Sys.Audit."""
        path = _query_value(query, "path")
        if path:
            return {path: self._privileges_at(path)}
        return {p: self._privileges_at(p) for p in ("/", "/access", "/vms")}

    def _privileges_at(self, path: str) -> dict:
        """``{privilege: propagate}`` on ``path``; nothing where a NoAccess entry applies."""
        match = re.fullmatch(r"/vms/(\d+)", path)
        if match and self._hidden(int(match.group(1))):
            return {}
        if path == "/pool/" + HIDDEN_POOL and self._visible is not None and self._hidden_via == "pool":
            return {}
        privileges = dict(AUDITOR_PRIVILEGES)
        if not self._vm_audit or (match and not self._vm_audit_propagates):
            privileges.pop("VM.Audit")
        elif not self._vm_audit_propagates and path == "/vms":
            privileges["VM.Audit"] = 0
        if not (self._sys_audit_access if path == "/access" or path.startswith("/access/")
                else self._sys_audit):
            privileges.pop("Sys.Audit")
        return privileges

    def _hidden(self, vmid: int) -> bool:
        return self._visible is not None and vmid not in self._visible

    def _api_acl(self, query):
        """``GET /access/acl`` (API2/ACL.pm): every entry to a caller with Sys.Audit on
        ``/access``; to others only entries where they may modify permissions (none here)."""
        if self._acl_fault is not None:
            raise _ApiError(self._acl_fault, "simulated failure reading the ACL")
        if not self._sys_audit_access:
            return []
        token = self.token_id

        def entry(path, roleid):
            return {"path": path, "type": "token", "ugid": token, "roleid": roleid, "propagate": 1}

        entries = [entry("/", "PVEAuditor" if self._vm_audit else "SysAuditOnly")]
        if self._visible is not None and self._hidden_via == "pool":
            entries.append(entry("/pool/" + HIDDEN_POOL, "NoAccess"))
        elif self._visible is not None:
            entries.extend(entry("/vms/%d" % v, "NoAccess") for v in sorted(self._guests) if self._hidden(v))
        return entries + [dict(e) for e in self._extra_acl]


_ROUTES: list = [
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


# --------------------------------------------------------------------------- standalone


def export_lines(sim: ProxmoxSimulator) -> list:
    """Shell lines that point pve-janitor at ``sim`` (the token is a throwaway one)."""
    lines = [
        "# Proxmox VE simulator at %s" % sim.url,
        "# PVE_TOKEN_VALUE below is a throwaway token of this simulator run, not a real secret.",
    ]
    lines.extend("export %s=%s" % (key, shlex.quote(value)) for key, value in sim.env().items())
    return lines


def run_standalone(
    host: str = "127.0.0.1",
    port: int = 8006,
    scene: str = "seed",
    print_fn: Callable[[str], None] = print,
    stop_event: Optional[threading.Event] = None,
) -> int:
    """Run a simulator until Ctrl-C / SIGTERM (or ``stop_event``); prints the env to export.

    Wrong tokens wait 3 s like real PVE (PX: API). Returns the exit status (0).
    """
    scene_module = importlib.import_module("receiver.scene")  # lazily: another module's job
    stop = stop_event or threading.Event()
    previous = _install_sigterm(stop)
    sim = ProxmoxSimulator(auth_fail_delay=3.0)
    try:
        with sim.start(host=host, port=port):
            scene_module.load_into(sim, scene)
            for line in export_lines(sim):
                print_fn(line)
            print_fn("# Ctrl-C to stop")
            _wait_for(stop)
    finally:
        _restore_sigterm(previous)
    return 0


def _wait_for(stop: threading.Event) -> None:
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        logger.info("interrupted, stopping the simulator")


def _install_sigterm(stop: threading.Event):
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())


def _restore_sigterm(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
