"""What exists in the cluster, read through the Proxmox API (read-only).

One read is three calls: ``GET /access/permissions?path=/vms`` (a token without
``VM.Audit`` gets an *empty list*, not an error, from the list endpoints, so the
privilege is checked first), ``GET /cluster/resources?type=vm``, which lists
every guest of the cluster in one answer, offline nodes' guests included (with
status ``unknown``), and ``GET /cluster/status``: a node cut off from the quorate
part of the cluster still answers reads, from its own stale copy of the guest list
(PROXMOX.md, "Quorum"), so a read counts only when that node is quorate.  Anything
less than a complete, sure answer raises :class:`InventoryError`; callers then
delete nothing.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterable, TypeVar

import msgspec
import requests
from proxmoxer import ProxmoxAPI
from proxmoxer.core import ResourceException

from .config import Settings
from .model import VMID_MAX, VMID_MIN, AclProof, Guest, Inventory, InventoryError, Task
from .timeutil import utcnow

logger = logging.getLogger(__name__)


class _Answer(msgspec.Struct):
    data: list[Guest]


_ANSWER = msgspec.json.Decoder(_Answer)


def parse_guests(answer: bytes) -> dict[int, Guest]:
    """The guests in a ``/cluster/resources?type=vm`` answer (the raw JSON); raise on anything odd.

    A half-understood answer must not become "these guests are gone": a missing
    ``data`` list, an entry that is not an object, a key of the wrong type (a vmid
    that is not an integer), or an entry without vmid or node is an
    :class:`InventoryError`.  ``type=vm`` lists nothing but guests.
    """
    try:
        entries = _ANSWER.decode(answer).data
    except msgspec.ValidationError as exc:
        raise InventoryError("malformed", f"/cluster/resources: unexpected answer ({exc})") from None
    except msgspec.DecodeError:
        raise InventoryError("malformed", "/cluster/resources: the answer is not JSON") from None
    return {g.vmid: g for g in entries}


def parse_tasks(entries: object) -> list[Task]:
    if not isinstance(entries, list):
        raise InventoryError("malformed", "/cluster/tasks did not return a list")
    tasks = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("upid"), str):
            continue
        raw_id = str(entry.get("id") or "")
        tasks.append(Task(
            upid=entry["upid"],
            node=str(entry.get("node") or ""),
            type=str(entry.get("type") or ""),
            vmid=int(raw_id) if raw_id.isdigit() else None,
            status=entry.get("status"),
            endtime=entry.get("endtime") if isinstance(entry.get("endtime"), int) else None,
            starttime=entry.get("starttime") if isinstance(entry.get("starttime"), int) else None,
        ))
    return tasks


NO_ACCESS = "NoAccess"  # the built-in role whose ACL entry takes every privilege away


def parse_acl(entries: object) -> AclProof:
    """What the whole ``GET /access/acl`` list proves, given VM.Audit propagated from ``/vms``.

    A guest is listed when the token holds VM.Audit on ``/vms/N`` (pve-manager,
    /cluster/resources).  Inherited from ``/vms``, that privilege is taken away only by
    (pve-access-control, ``AccessControl::roles``, ``RPCEnvironment::compile_acl_path``):

    * an entry on ``/vms/N`` itself, which replaces what ``/vms`` passed down;
    * NoAccess on the pool holding N, which trumps every other role.  It reaches the pool's
      path from ``/pool/P``, a parent pool, ``/pool`` or ``/``.

    Which entries apply to this token (its own, its user's, the user's groups') is not
    worked out: every ``/vms/N`` with an entry for anyone is hideable, and a NoAccess on
    ``/``, ``/pool`` or ``/pool/...`` proves nothing (pool membership is not read).
    Anything unexpected proves nothing either.
    """
    if not isinstance(entries, list):
        return AclProof(None, "/access/acl did not answer with a list")
    hideable: set[int] = set()
    for entry in entries:
        path = entry.get("path") if isinstance(entry, dict) else None
        role = entry.get("roleid") if isinstance(entry, dict) else None
        if not isinstance(path, str) or not isinstance(role, str):
            return AclProof(None, "/access/acl listed an entry without path or role")
        if not path.startswith("/"):
            return AclProof(None, f"/access/acl listed an entry on {path!r}, not an absolute path")
        if path.startswith("/vms/"):
            tail = path[len("/vms/"):]
            if not (tail.isascii() and tail.isdigit()):
                return AclProof(None, f"/access/acl listed an entry on {path!r}, not a guest's path")
            hideable.add(int(tail))
        elif role == NO_ACCESS and (path in ("/", "/pool") or path.startswith("/pool/")):
            return AclProof(None, f"a NoAccess ACL on {path} can hide the guests of a pool")
    return AclProof(frozenset(hideable), f"the ACL list proves the guest list complete ({len(hideable)} "
                                         "VMIDs with an ACL entry of their own are checked one by one)")


# Errors another node may not have: the next PVE_HOST is tried.  A refused token or a missing
# privilege is the same on every node of a cluster, and so is a malformed answer.
FAILOVER_KINDS = frozenset({"unreachable", "timeout", "http", "no_quorum"})

T = TypeVar("T")


def token_id(settings: Settings) -> str:
    return f"{settings.pve_user}!{settings.pve_token_name}"


def grant_lines(settings: Settings) -> list[str]:
    """The ``pveum`` lines that give the configured user and token what pve-janitor reads.

    Both: a privilege-separated token holds only the privileges its user holds too
    (pve-access-control ``RPCEnvironment::compile_acl_path``: user and token permissions are
    intersected), so a role granted to the token alone gives it nothing.
    """
    return [f"pveum acl modify / --users {settings.pve_user} --roles PVEAuditor",
            f"pveum acl modify / --tokens '{token_id(settings)}' --roles PVEAuditor"]


class ProxmoxInventory:
    """Reads the inventory with an API token; one instance per process.

    ``PVE_HOST`` may name several nodes of the cluster.  Every call goes to the active one;
    when it fails in a way another node may not (unreachable, timeout, HTTP error, no
    quorum), the next one is tried, and stays active until it fails in turn.  A whole guest
    list is always read from one node, so its quorum check speaks for the list it read.
    """

    def __init__(self, settings: Settings, on_read: Callable[[float, str], None] | None = None):
        self._settings = settings
        self._endpoints = settings.pve_endpoints or ((settings.pve_host, settings.pve_port),)
        self._apis = [ProxmoxAPI(
            host,
            port=port,
            user=settings.pve_user,
            token_name=settings.pve_token_name,
            token_value=settings.pve_token_value,
            verify_ssl=settings.pve_verify_ssl,
            timeout=settings.pve_timeout,
            service="PVE",
        ) for host, port in self._endpoints]
        self._active = 0
        self._switch_lock = threading.Lock()
        self._on_read = on_read
        self._acl_mode: str | None = None  # what hideable_vmids last logged

    def close(self) -> None:
        """Close the HTTP connections kept open to every PVE_HOST (at shutdown)."""
        for api in self._apis:
            api._store["session"].close()

    @property
    def _api(self) -> ProxmoxAPI:
        return self._apis[self._active]

    @property
    def endpoint(self) -> str:
        """The ``host:port`` calls go to now."""
        host, port = self._endpoints[self._active]
        return f"{host}:{port}"

    def _failover(self, attempt: Callable[[], T]) -> T:
        """``attempt()`` on the active endpoint, then on the next ones while it fails in a way
        another node may not; the last error when every endpoint failed."""
        for tried in range(1, len(self._apis) + 1):
            active = self._active
            try:
                return attempt()
            except InventoryError as exc:
                if exc.kind not in FAILOVER_KINDS or tried == len(self._apis):
                    raise
                with self._switch_lock:
                    if self._active == active:  # another thread may have moved on already
                        self._active = (active + 1) % len(self._apis)
                logger.warning("PVE_HOST %s:%s failed (%s): trying %s", *self._endpoints[active], exc, self.endpoint)
        raise AssertionError("unreachable")

    def _get(self, what: str, call: Callable[[], object]) -> object:
        try:
            return call()
        except ResourceException as exc:
            if exc.status_code == 401:
                raise InventoryError("auth", f"{what}: HTTP 401, the API token was refused") from None
            if exc.status_code == 403:
                raise InventoryError("privilege", f"{what}: HTTP 403, the token lacks a privilege") from None
            raise InventoryError("http", f"{what}: HTTP {exc.status_code} {exc.status_message}") from None
        except requests.exceptions.Timeout:
            raise InventoryError("timeout", f"{what}: no answer within {self._settings.pve_timeout:g} s") from None
        except requests.exceptions.SSLError:
            raise InventoryError("tls", f"{what}: TLS verification failed (see PVE_VERIFY_SSL)") from None
        except requests.exceptions.ConnectionError:
            raise InventoryError("unreachable", f"{what}: cannot connect to {self.endpoint}") from None
        except requests.exceptions.RequestException as exc:
            raise InventoryError("http", f"{what}: {type(exc).__name__}") from None
        except OSError as exc:  # e.g. the PVE_VERIFY_SSL bundle was removed after start
            raise InventoryError("tls", f"{what}: {type(exc).__name__}: {exc.strerror or exc}") from None
        except ValueError:
            raise InventoryError("malformed", f"{what}: the answer is not JSON") from None
        except KeyError:  # proxmoxer: a JSON answer without "data"
            raise InventoryError("malformed", f"{what}: the answer has no 'data'") from None

    def _privilege(self, path: str, privilege: str, api: ProxmoxAPI | None = None) -> object:
        """The token's ``privilege`` on ``path`` as ``/access/permissions`` gives it: its propagate
        flag (1 or 0), or None when the token does not hold it."""
        api = api or self._api
        perms = self._get("/access/permissions", lambda: api.access.permissions.get(path=path))
        privileges = perms.get(path) if isinstance(perms, dict) else None
        return privileges.get(privilege) if isinstance(privileges, dict) else None

    def privilege(self, path: str, privilege: str) -> object:
        """The token's ``privilege`` on ``path``: its propagate flag (1 or 0), None when not held."""
        return self._failover(lambda: self._privilege(path, privilege))

    def permissions(self) -> dict:
        """Every privilege the token holds, by path (``GET /access/permissions``): already the
        intersection with its user's for a privilege-separated token."""
        perms = self._failover(lambda: self._get("/access/permissions", lambda: self._api.access.permissions.get()))
        return perms if isinstance(perms, dict) else {}

    def check_privileges(self) -> None:
        self._failover(self._check_privileges)

    def _check_privileges(self, api: ProxmoxAPI | None = None) -> None:
        flag = self._privilege("/vms", "VM.Audit", api)
        if flag is None:
            raise InventoryError(
                "privilege",
                "the API token lacks VM.Audit on /vms: Proxmox would answer with an empty or partial "
                "guest list (grant the PVEAuditor role, see docs/install.md)",
            )
        # The value is the propagate flag.  Only a propagated VM.Audit reaches every /vms/N
        # that has no ACL entry of its own: what the ACL proof (parse_acl) builds on.
        if flag != 1:
            raise InventoryError(
                "privilege",
                "the API token holds VM.Audit on /vms without propagation (an ACL with propagate=0), so not "
                "on the guests: Proxmox would answer with an empty or partial guest list (grant PVEAuditor "
                "on / with propagation, see docs/install.md)",
            )

    def check_quorum(self) -> None:
        self._failover(self._check_quorum)

    def _check_quorum(self, api: ProxmoxAPI | None = None) -> None:
        """Raise InventoryError (``no_quorum``) unless the answering node is in a quorate cluster.

        ``/cluster/status`` has one ``{"type": "cluster", "quorate": 0|1}`` entry in a
        cluster and none on a standalone node, which is quorate by itself.  It needs
        Sys.Audit on ``/`` (pve-manager ``API2/Cluster.pm``): without it quorum cannot be
        known, and a read that may be stale is not acted on.
        """
        try:
            api = api or self._api
            status = self._get("/cluster/status", lambda: api.cluster.status.get())
        except InventoryError as exc:
            if exc.kind == "privilege":
                raise InventoryError("privilege", "/cluster/status: HTTP 403, quorum cannot be checked without "
                                     "Sys.Audit on / (grant PVEAuditor on /, see docs/install.md)") from None
            raise
        if not isinstance(status, list) or not all(isinstance(e, dict) for e in status):
            raise InventoryError("malformed", "/cluster/status: unexpected answer")
        clusters = [e for e in status if e.get("type") == "cluster"]
        if not clusters:
            return  # a standalone node
        quorate = clusters[0].get("quorate")
        if quorate is True or (type(quorate) is int and quorate == 1):
            return
        local = next((e.get("name") for e in status if e.get("type") == "node" and e.get("local")), None)
        raise InventoryError("no_quorum", f"the answering node{' ' + str(local) if local else ''} is not "
                             "quorate: its guest list may be stale, so nothing is removed until quorum is back")

    def read(self) -> Inventory:
        return self._failover(self._read_once)

    def _read_once(self) -> Inventory:
        started = time.monotonic()
        outcome = "error"
        api = self._api  # one node answers the whole read, whatever another thread switches to
        try:
            self._check_privileges(api)
            guests = parse_guests(self._get("/cluster/resources", lambda: self._guest_answer(api)))
            # After the list, from the same node: a node that lost quorum before or while
            # answering is caught unless quorum came back within these milliseconds.
            self._check_quorum(api)
            outcome = "ok"
        finally:
            elapsed = time.monotonic() - started
            if self._on_read:
                self._on_read(elapsed, outcome)
        return Inventory(guests, utcnow(), elapsed)

    def _guest_answer(self, api: ProxmoxAPI) -> bytes:
        """``GET /cluster/resources?type=vm`` as the raw bytes of the answer.

        Through proxmoxer's own session, base URL, token, TLS settings and timeout (proxmoxer
        2.x keeps them in ``_store``), but not its parser: that held the answer as bytes, a
        decoded copy and full dicts of about 20 keys each at once (and formatted the whole
        answer into a debug message).  At 100,000 guests (30 MB of JSON) parsing that way took
        about 0.45 s and 120 MB; :func:`parse_guests` takes 0.06 s.  HTTP errors surface as
        proxmoxer's ResourceException, as before.
        """
        store = api._store
        with store["session"].request("GET", f"{store['base_url']}/cluster/resources", params={"type": "vm"},
                                      stream=True) as response:
            if response.status_code >= 400:
                raise ResourceException(response.status_code, response.reason or "", response.text[:200])
            # In 1 MB reads, not requests' 10 kB ones (0.03 s less at 100,000 guests); requests
            # still turns a broken or timed-out body into its own exceptions.
            return b"".join(response.iter_content(1 << 20))

    def vmid_in_use(self, vmid: int) -> bool:
        return self._failover(lambda: self._vmid_in_use(vmid))

    def _vmid_in_use(self, vmid: int) -> bool:
        """Whether the cluster has a guest with this VMID, whether the token may see it or not.

        ``/cluster/nextid?vmid=N`` answers from the cluster-wide VM list to any
        authenticated user: N when the VMID is free, HTTP 400 ("VM N already exists")
        when it is taken.  So it catches a guest left out of a partial
        ``/cluster/resources`` answer, which the privilege check cannot: a more specific
        ACL can hide a guest while ``/vms`` still grants VM.Audit.  Any other answer
        counts as "in use" (fail closed).
        """
        if not VMID_MIN <= vmid <= VMID_MAX:
            return False  # no guest can hold it (and Proxmox would answer 400 for the parameter)

        def call() -> object:
            try:
                return self._api.cluster.nextid.get(vmid=vmid)
            except ResourceException as exc:
                if exc.status_code == 400:
                    return None
                raise
        answer = self._get(f"/cluster/nextid?vmid={vmid}", call)
        return answer is None or str(answer).strip() != str(vmid)

    def acl_proof(self) -> AclProof:
        return self._failover(self._acl_proof)

    def _acl_proof(self) -> AclProof:
        """Which ghosts :meth:`vmid_in_use` must check, from the ACL list (see :func:`parse_acl`).

        Two calls, however many guests and ghosts.  ``/access/acl`` lists every entry only
        to a token with Sys.Audit on ``/access``; to any other it answers 200 with the
        entries it may modify (usually none), so that privilege is checked first.  Sound only
        after :meth:`check_privileges` (VM.Audit propagated from ``/vms``), which every
        :meth:`read` does.  HTTP and connection errors raise InventoryError.
        """
        if self._privilege("/access", "Sys.Audit") is None:
            return AclProof(None, "the token lacks Sys.Audit on /access, so it would see only part of "
                                  "the ACL list (grant PVEAuditor on /, see docs/install.md)")
        return parse_acl(self._get("/access/acl", lambda: self._api.access.acl.get()))

    def hideable_vmids(self) -> frozenset[int] | None:
        """:meth:`acl_proof`'s VMIDs (None: check every ghost); says at INFO which mode is used,
        at the first call and whenever it changes."""
        proof = self.acl_proof()
        mode = "complete" if proof.hideable is not None else proof.reason
        if mode != self._acl_mode:
            self._acl_mode = mode
            if proof.hideable is not None:
                logger.info("ACL list proves the guest list complete: before removing ghosts, only VMIDs "
                            "with an ACL entry of their own are checked with /cluster/nextid")
            else:
                logger.info("per-VMID checks (one /cluster/nextid request per ghost) because %s", proof.reason)
        return proof.hideable

    def tasks(self) -> list[Task]:
        return self._failover(lambda: parse_tasks(self._get("/cluster/tasks", lambda: self._api.cluster.tasks.get())))

    def node_tasks(self, node: str, types: Iterable[str], since: int) -> list[Task]:
        """Finished tasks of these types that started on ``node`` at ``since`` or later, from its
        full archive (``GET /nodes/{node}/tasks``: proxied to that node, so an offline node
        answers 595).  Proxmox matches ``typefilter`` exactly and ``since`` against the start."""
        found: list[Task] = []
        for kind in sorted(types):
            entries = self._failover(lambda: self._get(
                f"/nodes/{node}/tasks", lambda: self._api.nodes(node).tasks.get(
                    typefilter=kind, since=since, source="archive", limit=1000)))
            found.extend(t for t in parse_tasks(entries) if t.node in (node, ""))
        return found

    def version(self) -> dict:
        data = self._failover(lambda: self._get("/version", lambda: self._api.version.get()))
        return data if isinstance(data, dict) else {}
