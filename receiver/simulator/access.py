"""What the simulator's API token may see (to be replaced by a privilege model)."""

from __future__ import annotations

import re
from typing import Iterable, Optional

# PROXMOX.md facts, API: PVEAuditor holds VM.Audit and Sys.Audit.
AUDITOR_PRIVILEGES = {"VM.Audit": 1, "Sys.Audit": 1}
# set_visible: how the hidden guests are hidden (NoAccess on /vms/N, or on their pool).
HIDDEN_VIA = ("vms", "pool")
HIDDEN_POOL = "hidden"


class Access:
    """The token's privileges as a handful of switches; ``version`` moves with every change."""

    def __init__(self, token_id: str):
        self.token_id = token_id
        self.version = 0
        self.vm_audit = True
        self.vm_audit_propagates = True
        self.sys_audit = True
        self.sys_audit_access = True  # Sys.Audit on /access (the ACL list), see set_sys_audit
        self.visible: Optional[frozenset] = None
        self.hidden_via = "vms"
        self.extra_acl: list = []
        self.acl_fault: Optional[int] = None

    def set_vm_audit(self, allowed: bool, propagate: bool = True) -> None:
        self.vm_audit = bool(allowed)
        self.vm_audit_propagates = bool(propagate)
        self.version += 1

    def set_visible(self, vmids: Optional[Iterable[int]], via: str = "vms") -> None:
        if via not in HIDDEN_VIA:
            raise ValueError("via must be one of %s" % (HIDDEN_VIA,))
        self.visible = None if vmids is None else frozenset(int(v) for v in vmids)
        self.hidden_via = via
        self.version += 1

    def set_sys_audit(self, allowed: bool, only_access: bool = False) -> None:
        self.sys_audit_access = bool(allowed)
        if not only_access:
            self.sys_audit = bool(allowed)
        self.version += 1

    def add_acl(self, path: str, roleid: str, ugid: Optional[str], type: str, propagate: bool) -> None:  # noqa: A002
        if type not in ("user", "group", "token"):
            raise ValueError("type must be user, group or token")
        self.extra_acl.append({"path": path, "type": type, "ugid": ugid or self.token_id,
                               "roleid": roleid, "propagate": int(bool(propagate))})

    def hidden(self, vmid: int) -> bool:
        return self.visible is not None and vmid not in self.visible

    def can_see(self, vmid: int) -> bool:
        return self.vm_audit and self.vm_audit_propagates and not self.hidden(vmid)

    def privileges_at(self, path: str) -> dict:
        """``{privilege: propagate}`` on ``path``; nothing where a NoAccess entry applies."""
        match = re.fullmatch(r"/vms/(\d+)", path)
        if match and self.hidden(int(match.group(1))):
            return {}
        if path == "/pool/" + HIDDEN_POOL and self.visible is not None and self.hidden_via == "pool":
            return {}
        privileges = dict(AUDITOR_PRIVILEGES)
        if not self.vm_audit or (match and not self.vm_audit_propagates):
            privileges.pop("VM.Audit")
        elif not self.vm_audit_propagates and path == "/vms":
            privileges["VM.Audit"] = 0
        if not (self.sys_audit_access if path == "/access" or path.startswith("/access/")
                else self.sys_audit):
            privileges.pop("Sys.Audit")
        return privileges

    def acl_entries(self, vmids: Iterable[int]) -> list:
        """``GET /access/acl`` (pve-access-control ``API2/ACL.pm``): every entry to a caller with
        Sys.Audit on ``/access``; to others only entries where they may modify permissions
        (none here).  ``vmids``: the guests that exist."""
        if not self.sys_audit_access:
            return []
        token = self.token_id

        def entry(path, roleid):
            return {"path": path, "type": "token", "ugid": token, "roleid": roleid, "propagate": 1}

        entries = [entry("/", "PVEAuditor" if self.vm_audit else "SysAuditOnly")]
        if self.visible is not None and self.hidden_via == "pool":
            entries.append(entry("/pool/" + HIDDEN_POOL, "NoAccess"))
        elif self.visible is not None:
            entries.extend(entry("/vms/%d" % v, "NoAccess") for v in sorted(vmids) if self.hidden(v))
        return entries + [dict(e) for e in self.extra_acl]
