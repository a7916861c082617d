"""Built-in roles and ACL paths, as pve-access-control defines them (``AccessControl.pm``)."""

from __future__ import annotations

import re


class AccessError(ValueError):
    """What pveum or the API would refuse (the message is Proxmox's own, where it has one)."""


NO_ACCESS = "NoAccess"

# pve-access-control src/PVE/AccessControl.pm, ``$privgroups`` as of PVE 8 (PVE 9 adds the
# VM.GuestAgent.* privileges): per category, what its root, admin, user and audit roles hold.
_PRIVILEGE_GROUPS = {
    "VM": {
        "root": (),
        "admin": (
            "VM.Config.Disk",
            "VM.Config.CPU",
            "VM.Config.Memory",
            "VM.Config.Network",
            "VM.Config.HWType",
            "VM.Config.Options",
            "VM.Allocate",
            "VM.Clone",
            "VM.Migrate",
            "VM.Monitor",
            "VM.Snapshot",
            "VM.Snapshot.Rollback",
        ),
        "user": ("VM.Config.CDROM", "VM.Config.Cloudinit", "VM.Console", "VM.Backup", "VM.PowerMgmt"),
        "audit": ("VM.Audit",),
    },
    "Sys": {
        "root": ("Sys.PowerMgmt", "Sys.Modify", "Sys.Incoming", "Sys.AccessNetwork"),
        "admin": ("Sys.Console", "Sys.Syslog"),
        "user": (),
        "audit": ("Sys.Audit",),
    },
    "Datastore": {
        "root": (),
        "admin": ("Datastore.Allocate", "Datastore.AllocateTemplate"),
        "user": ("Datastore.AllocateSpace",),
        "audit": ("Datastore.Audit",),
    },
    "SDN": {"root": (), "admin": ("SDN.Allocate", "SDN.Audit"), "user": ("SDN.Use",), "audit": ("SDN.Audit",)},
    "User": {
        "root": ("Realm.Allocate",),
        "admin": ("User.Modify", "Group.Allocate", "Realm.AllocateUser"),
        "user": (),
        "audit": (),
    },
    "Pool": {"root": (), "admin": ("Pool.Allocate",), "user": ("Pool.Audit",), "audit": ("Pool.Audit",)},
    "Mapping": {"root": (), "admin": ("Mapping.Modify",), "user": ("Mapping.Use",), "audit": ("Mapping.Audit",)},
}


def _builtin_roles() -> dict:
    """AccessControl.pm ``create_roles``: Administrator holds every privilege, NoAccess none;
    per category PVE<cat>Admin (admin + user + audit) and PVE<cat>User (user + audit, where
    the category has user privileges); PVEAdmin (every admin + user + audit but
    Mapping.Modify); PVEAuditor (every audit privilege); PVETemplateUser."""
    every = {"Permissions.Modify"}
    roles: dict = {"PVEAdmin": set(), "PVEAuditor": set()}
    for category, group in _PRIVILEGE_GROUPS.items():
        every.update(group["root"], group["admin"], group["user"], group["audit"])
        admin = set(group["admin"]) | set(group["user"]) | set(group["audit"])
        roles["PVE%sAdmin" % category] = admin
        roles["PVEAdmin"] |= admin
        if group["user"]:
            roles["PVE%sUser" % category] = set(group["user"]) | set(group["audit"])
        roles["PVEAuditor"] |= set(group["audit"])
    roles["PVEAdmin"].discard("Mapping.Modify")
    roles["PVETemplateUser"] = {"VM.Clone", "VM.Audit"}
    roles["Administrator"] = every
    roles[NO_ACCESS] = set()
    return {name: frozenset(privs) for name, privs in roles.items()}


BUILTIN_ROLES = _builtin_roles()
VALID_PRIVILEGES = BUILTIN_ROLES["Administrator"]

# AccessControl.pm ``check_path``: the ACL paths the product and its users meet.
_ACL_PATH_RE = re.compile(
    r"^(/|/access|/access/groups(/[\w.-]+)?|/access/realm(/[\w.-]+)?|/nodes(/[\w.-]+)?"
    r"|/pool(/[\w.-]+){0,3}|/sdn(/[\w.-]+){0,4}|/storage(/[\w.-]+)?|/vms|/vms/[1-9][0-9]{2,}"
    r"|/mapping(/[\w.-]+){0,2})$",
    re.ASCII,
)


def normalize_path(path: str) -> str:
    """AccessControl.pm ``normalize_path`` and ``check_path``: one slash between parts, none at
    the end, a leading one; the path must be one Proxmox knows."""
    normal = "/" + "/".join(p for p in (path or "").split("/") if p)
    if not _ACL_PATH_RE.match(normal):
        raise AccessError("invalid ACL path '%s'" % path)
    return normal


def path_key(path: str) -> list:
    """AccessControl.pm ``iterate_acl_tree`` order: a path before its children, children by name."""
    return [p for p in path.split("/") if p]
