"""What exists in the cluster, read through the Proxmox API (read-only).

One read is three calls: ``GET /access/permissions?path=/vms`` (a token without
``VM.Audit`` gets an *empty list*, not an error, from the list endpoints, so the
privilege is checked first), ``GET /cluster/resources?type=vm``, which lists
every guest of the cluster in one answer, offline nodes' guests included (with
status ``unknown``), and ``GET /cluster/status``: a node cut off from the quorate
part of the cluster still answers reads, from its own stale copy of the guest list
(PROXMOX.md, "Quorum"), so a read counts only when that node is quorate.  Anything
less than a complete, sure answer raises :class:`InventoryError`; callers then
delete nothing.  The HTTP session to each node is :mod:`receiver.pveapi`'s; what the
answers say, :mod:`receiver.answers`'.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, TypeVar

from proxmoxer.core import ResourceException

from .answers import parse_acl, parse_guests, parse_tasks
from .model import VMID_MAX, VMID_MIN, AclProof, Inventory, InventoryError, Task
from .probe import ListShape
from .pveapi import ByteCount, PveEndpoint, Reply
from .timeutil import utcnow

if TYPE_CHECKING:
    from proxmoxer.core import ProxmoxResource

    from .config import Settings

logger = logging.getLogger(__name__)


# Errors another node may not have: the next PVE_HOST is tried.  A refused token or a missing
# privilege is the same on every node of a cluster, and so is a malformed answer.
FAILOVER_KINDS = frozenset({"unreachable", "timeout", "http", "no_quorum"})

T = TypeVar("T")


def token_id(settings: Settings) -> str:
    """The API token as Proxmox names it in ACLs and logs: ``user@realm!name``."""
    return f"{settings.pve_user}!{settings.pve_token_name}"


def grant_lines(settings: Settings) -> list[str]:
    """The ``pveum`` lines that give the configured user and token what pve-janitor reads.

    Both: a privilege-separated token holds only the privileges its user holds too
    (pve-access-control ``RPCEnvironment::compile_acl_path``: user and token permissions are
    intersected), so a role granted to the token alone gives it nothing.
    """
    return [
        f"pveum acl modify / --users {settings.pve_user} --roles PVEAuditor",
        f"pveum acl modify / --tokens '{token_id(settings)}' --roles PVEAuditor",
    ]


class ProxmoxInventory:
    """Reads the inventory with an API token; one instance per process.

    ``PVE_HOST`` may name several nodes of the cluster, each with one HTTP session
    (:class:`~receiver.pveapi.PveEndpoint`).  Every call goes to the active one; when it
    fails in a way another node may not (unreachable, timeout, HTTP error, no quorum), the
    next one is tried, and stays active until it fails in turn.  A whole guest list is
    always read from one node, so its quorum check speaks for the list it read.
    ``bytes_read`` counts what every call read from Proxmox; ``shape`` is the size of the last
    whole guest list read (by anyone: the sweep's too), from which the watcher estimates
    what its probes and the next whole read would cost (:mod:`receiver.probe`).
    """

    def __init__(self, settings: Settings, on_read: Callable[[float, str], None] | None = None):
        self.bytes_read = ByteCount()
        self._endpoints = [
            PveEndpoint(settings, host, port, self.bytes_read)
            for host, port in settings.pve_endpoints or ((settings.pve_host, settings.pve_port),)
        ]
        self._active = 0
        self._switch_lock = threading.Lock()
        self._on_read = on_read
        self._acl_mode: str | None = None  # what hideable_vmids last logged
        self.shape: ListShape | None = None

    def close(self) -> None:
        """Close the HTTP connections kept open to every PVE_HOST (at shutdown)."""
        for endpoint in self._endpoints:
            endpoint.close()

    @property
    def _node(self) -> PveEndpoint:
        return self._endpoints[self._active]

    @property
    def _api(self) -> ProxmoxResource:
        """The active node's proxmoxer API, for a call the inventory does not make itself."""
        return self._node.api

    @property
    def endpoint(self) -> str:
        """The ``host:port`` calls go to now."""
        return self._node.name

    def _failover(self, attempt: Callable[[], T]) -> T:
        """``attempt()`` on the active endpoint, then on the next ones while it fails in a way
        another node may not; the last error when every endpoint failed."""
        for tried in range(1, len(self._endpoints) + 1):
            active = self._active
            try:
                return attempt()
            except InventoryError as exc:
                if exc.kind not in FAILOVER_KINDS or tried == len(self._endpoints):
                    raise
                with self._switch_lock:
                    if self._active == active:  # another thread may have moved on already
                        self._active = (active + 1) % len(self._endpoints)
                logger.warning("PVE_HOST %s failed (%s): trying %s", self._endpoints[active].name, exc, self.endpoint)
        raise AssertionError("unreachable")

    def _privilege(self, path: str, privilege: str, node: PveEndpoint | None = None) -> object:
        """The token's ``privilege`` on ``path`` as ``/access/permissions`` gives it: its propagate
        flag (1 or 0), or None when the token does not hold it."""
        perms = (node or self._node).get("/access/permissions", path=path)
        privileges = perms.get(path) if isinstance(perms, dict) else None
        return privileges.get(privilege) if isinstance(privileges, dict) else None

    def privilege(self, path: str, privilege: str) -> object:
        """The token's ``privilege`` on ``path``: its propagate flag (1 or 0), None when not held."""
        return self._failover(lambda: self._privilege(path, privilege))

    def permissions(self) -> dict:
        """Every privilege the token holds, by path (``GET /access/permissions``): already the
        intersection with its user's for a privilege-separated token."""
        perms = self._failover(lambda: self._node.get("/access/permissions"))
        return perms if isinstance(perms, dict) else {}

    def check_privileges(self) -> None:
        self._failover(self._check_privileges)

    def _check_privileges(self, node: PveEndpoint | None = None) -> None:
        flag = self._privilege("/vms", "VM.Audit", node)
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

    def _check_quorum(self, node: PveEndpoint | None = None) -> None:
        """Raise InventoryError (``no_quorum``) unless the answering node is in a quorate cluster.

        ``/cluster/status`` has one ``{"type": "cluster", "quorate": 0|1}`` entry in a
        cluster and none on a standalone node, which is quorate by itself.  It needs
        Sys.Audit on ``/`` (pve-manager ``API2/Cluster.pm``): without it quorum cannot be
        known, and a read that may be stale is not acted on.
        """
        try:
            status = (node or self._node).get("/cluster/status")
        except InventoryError as exc:
            if exc.kind == "privilege":
                raise InventoryError(
                    "privilege",
                    "/cluster/status: HTTP 403, quorum cannot be checked without "
                    "Sys.Audit on / (grant PVEAuditor on /, see docs/install.md)",
                ) from None
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
        raise InventoryError(
            "no_quorum",
            f"the answering node{' ' + str(local) if local else ''} is not "
            "quorate: its guest list may be stale, so nothing is removed until quorum is back",
        )

    def read(self) -> Inventory:
        return self._failover(self._read_once)

    def _read_once(self) -> Inventory:
        started = time.monotonic()
        outcome = "error"
        node = self._node  # one node answers the whole read, whatever another thread switches to
        try:
            self._check_privileges(node)
            body = node.guest_list()
            guests = parse_guests(body)
            # After the list, from the same node: a node that lost quorum before or while
            # answering is caught unless quorum came back within these milliseconds.
            self._check_quorum(node)
            outcome = "ok"
        finally:
            elapsed = time.monotonic() - started
            if self._on_read:
                self._on_read(elapsed, outcome)
        self.shape = ListShape(len(guests), len(body), Counter((g.node, g.type) for g in guests.values()))
        return Inventory(guests, utcnow(), elapsed)

    def guest_status(self, node: str, kind: str, vmid: int) -> Reply:
        """``GET /nodes/{node}/{kind}/{vmid}/status/current`` as it came (proxied to that node:
        595 when it is offline, 500 "does not exist" when the guest is not there, 403 without
        VM.Audit on the guest); InventoryError only when no endpoint answered at all."""
        return self._failover(lambda: self._node.fetch(f"/nodes/{node}/{kind}/{vmid}/status/current"))

    def guest_config(self, node: str, kind: str, vmid: int) -> Reply:
        """``GET /nodes/{node}/{kind}/{vmid}/config`` as it came, like :meth:`guest_status` (the
        one place a guest's hookscript and config digest show: :mod:`receiver.guestconfig`)."""
        return self._failover(lambda: self._node.fetch(f"/nodes/{node}/{kind}/{vmid}/config"))

    def node_guests(self, node: str, kind: str) -> Reply:
        """``GET /nodes/{node}/{kind}`` (``lxc`` or ``qemu``) as it came: the guests of that type
        on that node the token may see (the others are left out, with no error)."""
        return self._failover(lambda: self._node.fetch(f"/nodes/{node}/{kind}"))

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
        node = self._node

        def call() -> object:
            try:
                return node.api.cluster.nextid.get(vmid=vmid)
            except ResourceException as exc:
                if exc.status_code == 400:
                    return None
                raise

        answer = node.call(f"/cluster/nextid?vmid={vmid}", call)
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
        node = self._node
        if self._privilege("/access", "Sys.Audit", node) is None:
            return AclProof(
                None,
                "the token lacks Sys.Audit on /access, so it would see only part of "
                "the ACL list (grant PVEAuditor on /, see docs/install.md)",
            )
        return parse_acl(node.get("/access/acl"))

    def hideable_vmids(self) -> frozenset[int] | None:
        """:meth:`acl_proof`'s VMIDs (None: check every ghost); says at INFO which mode is used,
        at the first call and whenever it changes."""
        proof = self.acl_proof()
        mode = "complete" if proof.hideable is not None else proof.reason
        if mode != self._acl_mode:
            self._acl_mode = mode
            if proof.hideable is not None:
                logger.info(
                    "ACL list proves the guest list complete: before removing ghosts, only VMIDs "
                    "with an ACL entry of their own are checked with /cluster/nextid"
                )
            else:
                logger.info("per-VMID checks (one /cluster/nextid request per ghost) because %s", proof.reason)
        return proof.hideable

    def tasks(self) -> list[Task]:
        return self._failover(lambda: parse_tasks(self._node.get("/cluster/tasks")))

    def node_tasks(self, node: str, types: Iterable[str], since: int) -> list[Task]:
        """Finished tasks of these types that started on ``node`` at ``since`` or later, from its
        full archive (``GET /nodes/{node}/tasks``: proxied to that node, so an offline node
        answers 595).  Proxmox matches ``typefilter`` exactly and ``since`` against the start."""
        found: list[Task] = []
        for kind in sorted(types):

            def archive(kind: str = kind) -> object:
                return self._node.get(
                    f"/nodes/{node}/tasks", typefilter=kind, since=since, source="archive", limit=1000
                )

            entries = self._failover(archive)
            found.extend(t for t in parse_tasks(entries) if t.node in (node, ""))
        return found

    def version(self) -> dict:
        data = self._failover(lambda: self._node.get("/version"))
        return data if isinstance(data, dict) else {}
