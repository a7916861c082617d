"""``ProxmoxSimulator``: the cluster, its privilege model, the API routes and HTTPS in one object.

The privileges start as the set-up that works on a real cluster (PROXMOX.md facts, API):
user ``janitor@pve`` with PVEAuditor on ``/``, and its privilege-separated token
``janitor@pve!sweep`` with PVEAuditor on ``/``.  ``pveum`` changes them as the command
would; the older switches (``set_vm_audit``, ``set_visible``, ``set_sys_audit``,
``add_acl``) are ACL entries of the token in the same model, so everything the API
answers is computed by ``access.AccessControl``.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterable
from typing import Any

from . import pveum
from .access import AccessControl
from .api import ApiRoutes
from .cluster import Cluster
from .endpoint import HttpsEndpoint
from .roles import BUILTIN_ROLES

# set_visible: how the hidden guests are hidden (NoAccess on /vms/N, or on their pool).
HIDDEN_VIA = ("vms", "pool")
HIDDEN_POOL = "hidden"
_AUDITOR = BUILTIN_ROLES["PVEAuditor"]


class ProxmoxSimulator(HttpsEndpoint, ApiRoutes, Cluster):
    """An in-process Proxmox VE cluster: guests, nodes, tasks, hooks, ACLs, and the HTTPS API."""

    def __init__(
        self,
        nodes: Iterable[str] = ("pve1", "pve2"),
        user: str = "janitor@pve",
        token_name: str = "sweep",
        token_value: str | None = None,
        auth_fail_delay: float = 0.0,
        node_name_env: bool = True,
        task_user: str = "root@pam",
        keep_alive: bool = False,
    ):
        Cluster.__init__(self, nodes, task_user, node_name_env)
        if "@" not in user:
            raise ValueError("user must look like name@realm")
        self.user = user
        self.token_name = token_name
        self.token_value = token_value if token_value is not None else secrets.token_hex(16)
        self.auth_fail_delay = float(auth_fail_delay)
        self.access = AccessControl()
        self._acl_fault: int | None = None
        self._request = threading.local()  # who is calling, for the route being answered
        self._vm_answer: tuple | None = None  # (what it depends on, encoded answer)
        self._reset_switches()
        if self.user not in self.access.users:  # root@pam always is
            self.access.add_user(self.user)
        self.access.add_token(self.user, self.token_name, True, self.token_value)
        self.access.modify_acl("/", "user", self.user, "PVEAuditor")
        self._apply_switches()
        self._init_serving()
        self.keep_alive = keep_alive

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

    # ------------------------------------------------------------------ the privilege model

    def pveum(self, command_line: str) -> str:
        """Apply one ``pveum`` line (see ``pveum``) and return what it prints.  A token added
        as this simulator's ``token_id`` gets ``token_value`` as its secret."""

        def secret(tokenid: str) -> str:
            return self.token_value if tokenid == self.token_id else secrets.token_hex(16)

        with self._lock:
            self._expire_locked()
            return pveum.apply(self.access, command_line, self._guests, secret)

    def clear_access(self) -> None:
        """A cluster where only ``root@pam`` exists: no other user, token, group, pool or ACL
        entry (the API then refuses this simulator's token: 401), for ``pveum`` to set up."""
        with self._lock:
            fresh = AccessControl()
            fresh.version = self.access.version + 1  # answers cached for the old one are stale
            self.access = fresh
            self._reset_switches()

    def add_guest(self, vmid: int, *args, **kwargs) -> dict:
        guest = Cluster.add_guest(self, vmid, *args, **kwargs)
        with self._lock:
            if self._switches["visible"] is not None and guest["vmid"] not in self._switches["visible"]:
                self._hide(guest["vmid"])
        return guest

    add_guest.__doc__ = Cluster.add_guest.__doc__

    def _guest_gone(self, vmid: int) -> None:
        """AccessControl.pm ``remove_vm_access``: a destroyed guest's ``/vms/N`` entries and pool
        membership go with it."""
        self.access.remove_vm_access(vmid)

    # ------------------------------------------------------------------ switches on the model

    def set_vm_audit(self, allowed: bool, propagate: bool = True) -> None:
        """Take VM.Audit away from the token (its role on ``/`` becomes PVEAuditor without it):
        200 and empty lists, 403 only per guest.  ``propagate=False``: VM.Audit granted on
        ``/vms`` alone, without propagation (``/access/permissions`` shows it with flag 0), so
        on no guest: empty lists too."""
        with self._lock:
            self._switches.update(vm_audit=bool(allowed), vm_propagate=bool(propagate))
            self._apply_switches()

    def set_visible(self, vmids: Iterable[int] | None, via: str = "vms") -> None:
        """Hide every guest outside ``vmids`` from the token, now and when it is created: lists
        are partial while ``/vms`` still shows VM.Audit.  ``via="vms"``: a NoAccess entry on
        each hidden guest's ``/vms/N``; ``via="pool"``: the hidden guests in pool ``hidden``,
        NoAccess on ``/pool/hidden`` (a pool's NoAccess trumps).  None: all visible."""
        if via not in HIDDEN_VIA:
            raise ValueError("via must be one of %s" % (HIDDEN_VIA,))
        with self._lock:
            self._switches.update(visible=None if vmids is None else frozenset(int(v) for v in vmids), via=via)
            self._apply_switches()

    def set_sys_audit(self, allowed: bool, only_access: bool = False) -> None:
        """Without Sys.Audit the token's role on ``/`` holds VM.Audit alone:
        ``/access/permissions`` lacks it, ``/access/acl`` answers 200 with an empty list and
        ``/cluster/status`` 403.  ``only_access``: take it away on ``/access`` alone (a role
        without Sys.Audit for the token on ``/access`` replaces the one from ``/``)."""
        with self._lock:
            self._switches["sys_audit_access"] = bool(allowed)
            if not only_access:
                self._switches["sys_audit"] = bool(allowed)
            self._apply_switches()

    def add_acl(
        self,
        path: str,
        roleid: str,
        ugid: str | None = None,
        type: str = "token",  # noqa: A002 - the ACL field is called type
        propagate: bool = True,
    ) -> None:
        """One more ACL entry (default: for the token); a user or group it names is created
        when missing."""
        if type not in ("user", "group", "token"):
            raise ValueError("type must be user, group or token")
        ugid = ugid or self.token_id
        with self._lock:
            if type == "user" and ugid not in self.access.users:
                self.access.add_user(ugid)
            elif type == "group" and ugid not in self.access.groups:
                self.access.add_group(ugid)
            self.access.modify_acl(path, type, ugid, roleid, propagate=propagate)

    def set_acl_fault(self, status: int | None) -> None:
        """Make ``GET /access/acl`` alone answer this HTTP status; None heals."""
        with self._lock:
            self._acl_fault = None if status is None else int(status)

    def _reset_switches(self) -> None:
        self._switches: dict[str, Any] = {
            "vm_audit": True,
            "vm_propagate": True,
            "sys_audit": True,
            "sys_audit_access": True,
            "visible": None,
            "via": "vms",
        }
        self._switch_entries: set = set()  # (path, type, ugid, role) the switches granted

    def _apply_switches(self) -> None:
        """Rewrite the token's entries that the switches own: its role on ``/`` (and on ``/vms``
        and ``/access`` when a switch asks), the NoAccess entries of hidden guests, pool
        ``hidden``."""
        access, on = self.access, self._switches
        for path, kind, ugid, role in self._switch_entries:
            access.drop_entry(path, kind, ugid, role)
        self._switch_entries.clear()
        privileges = set(_AUDITOR) if on["sys_audit"] else {"VM.Audit"}
        if not (on["vm_audit"] and on["vm_propagate"]):
            privileges.discard("VM.Audit")
        self._grant("/", privileges)
        if on["vm_audit"] and not on["vm_propagate"]:
            self._grant("/vms", privileges)
            self._grant("/vms", {"VM.Audit"}, propagate=False)
        if not on["sys_audit_access"]:
            self._grant("/access", privileges - {"Sys.Audit"})
        if HIDDEN_POOL in access.pools:
            access.set_pool_members(HIDDEN_POOL, ())
        for vmid in sorted(self._guests) if on["visible"] is not None else ():
            if vmid not in on["visible"]:
                self._hide(vmid)

    def _hide(self, vmid: int) -> None:
        if self._switches["via"] == "pool":
            if HIDDEN_POOL not in self.access.pools:
                self.access.add_pool(HIDDEN_POOL)
            self.access.set_pool_members(HIDDEN_POOL, self.access.pools[HIDDEN_POOL] | {vmid})
            self._grant("/pool/" + HIDDEN_POOL, None)
        else:
            self._grant("/vms/%d" % vmid, None)

    def _grant(self, path: str, privileges: set | None, propagate: bool = True) -> None:
        """The token gets a role holding exactly ``privileges`` (None: NoAccess) on ``path``."""
        role = "NoAccess" if privileges is None else self.access.role_holding(privileges)
        self.access.modify_acl(path, "token", self.token_id, role, propagate=propagate)
        self._switch_entries.add((path, "token", self.token_id, role))
