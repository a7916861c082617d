"""``ProxmoxSimulator``: the cluster, what the token may see, the API routes and HTTPS in one object."""

from __future__ import annotations

import secrets
from typing import Iterable, Optional

from .access import Access
from .api import ApiRoutes
from .cluster import Cluster
from .endpoint import HttpsEndpoint


class ProxmoxSimulator(HttpsEndpoint, ApiRoutes, Cluster):
    """An in-process Proxmox VE cluster: guests, nodes, tasks, hooks, ACLs, and the HTTPS API."""

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
        Cluster.__init__(self, nodes, task_user, node_name_env)
        if "@" not in user:
            raise ValueError("user must look like name@realm")
        self.user = user
        self.token_name = token_name
        self.token_value = token_value if token_value is not None else secrets.token_hex(16)
        self.auth_fail_delay = float(auth_fail_delay)
        self.access = Access(self.token_id)
        self._vm_answer: Optional[tuple] = None  # (what it depends on, encoded answer)
        self._init_serving()

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

    # ------------------------------------------------------------------ what the token may see

    def set_vm_audit(self, allowed: bool, propagate: bool = True) -> None:
        """Without VM.Audit: 200 and empty lists; 403 only per guest.  ``propagate=False``:
        VM.Audit granted on ``/vms`` alone (``/access/permissions`` shows it with flag 0), so
        on no guest: empty lists too."""
        with self._lock:
            self.access.set_vm_audit(allowed, propagate)

    def set_visible(self, vmids: Optional[Iterable[int]], via: str = "vms") -> None:
        """Hide every guest outside ``vmids`` by an ACL: lists are partial while ``/vms`` still
        shows VM.Audit.  ``via="vms"``: a NoAccess entry on each hidden guest's ``/vms/N``;
        ``via="pool"``: NoAccess on ``/pool/hidden``, the pool they are in (a pool's NoAccess
        trumps).  None: all visible."""
        with self._lock:
            self.access.set_visible(vmids, via)

    def set_sys_audit(self, allowed: bool, only_access: bool = False) -> None:
        """Without Sys.Audit (as with a role holding VM.Audit alone): ``/access/permissions``
        lacks it, ``/access/acl`` answers 200 with an empty list and ``/cluster/status`` 403.
        ``only_access``: take it away on ``/access`` alone (an ACL entry on ``/access`` with a
        role without Sys.Audit replaces the one from ``/``)."""
        with self._lock:
            self.access.set_sys_audit(allowed, only_access)

    def add_acl(self, path: str, roleid: str, ugid: Optional[str] = None, type: str = "token",  # noqa: A002
                propagate: bool = True) -> None:
        """One more ``/access/acl`` entry (default: for the token).  Listed only: what the
        token sees is ``set_visible``'s and ``set_vm_audit``'s business."""
        with self._lock:
            self.access.add_acl(path, roleid, ugid, type, propagate)

    def set_acl_fault(self, status: Optional[int]) -> None:
        """Make ``GET /access/acl`` alone answer this HTTP status; None heals."""
        with self._lock:
            self.access.acl_fault = None if status is None else int(status)
