"""The access configuration of a cluster, as Proxmox keeps it in ``user.cfg``: users and their
API tokens, groups, roles, pools and ACL entries, changed the way pveum and the API change them.

``access.AccessControl`` computes privileges from it.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field

from .roles import BUILTIN_ROLES, NO_ACCESS, VALID_PRIVILEGES, AccessError, normalize_path

ROOT_USER = "root@pam"
ENTRY_TYPES = ("user", "group", "token")

_USERID_RE = re.compile(r"^[^\s:/@!]+@[A-Za-z][A-Za-z0-9.\-_]+$")
_NAME_RE = re.compile(r"^[A-Za-z0-9.\-_]+$")


@dataclass
class User:
    tokens: dict = field(default_factory=dict)  # token name -> (privsep, secret); groups hold members


def split_principal(principal: str) -> tuple:
    """``user@realm!name`` -> (user@realm, name); a user -> (user@realm, None)."""
    userid, sep, token = principal.partition("!")
    return userid, (token if sep else None)


class UserConfig:
    """user.cfg.  Not thread-safe by itself: the simulator holds its lock around every call.
    ``version`` moves with every change (``_changed``)."""

    def __init__(self):
        self.users: dict = {ROOT_USER: User()}
        self.groups: dict = {}  # group -> member userids
        self.roles: dict = dict(BUILTIN_ROLES)
        self.pools: dict = {}  # pool -> member VMIDs
        self.acl: dict = {}  # path -> {(type, ugid): {role: propagate}}
        self.version = 0

    def _changed(self) -> None:
        self.version += 1

    @contextmanager
    def transaction(self):
        """All or nothing, as one write of user.cfg: on an error every change made inside is undone."""
        saved = copy.deepcopy((self.users, self.groups, self.roles, self.pools, self.acl))
        try:
            yield self
        except BaseException:
            self.users, self.groups, self.roles, self.pools, self.acl = saved
            self._changed()
            raise

    def add_user(self, userid: str) -> None:
        """API2/User.pm ``create_user``."""
        if not _USERID_RE.match(userid):
            raise AccessError("value '%s' does not look like a valid user name" % userid)
        if userid in self.users:
            raise AccessError("user '%s' already exists" % userid)
        self.users[userid] = User()
        self._changed()

    def add_group(self, groupid: str) -> None:
        """API2/Group.pm ``create_group``."""
        if not _NAME_RE.match(groupid):
            raise AccessError("group name '%s' contains invalid characters" % groupid)
        if groupid in self.groups:
            raise AccessError("group '%s' already exists" % groupid)
        self.groups[groupid] = set()
        self._changed()

    def set_user_groups(self, userid: str, groups: Iterable[str], append: bool = False) -> None:
        """API2/User.pm ``update_user`` with ``groups``: the user's groups become these (or
        are added to with ``append``)."""
        self._user(userid)
        groups = list(groups)
        for group in groups:
            if group not in self.groups:
                raise AccessError("no such group '%s'" % group)
        if not append:
            for members in self.groups.values():
                members.discard(userid)
        for group in groups:
            self.groups[group].add(userid)
        self._changed()

    def add_token(self, userid: str, name: str, privsep: bool, secret: str) -> None:
        """API2/User.pm ``generate_token``: privilege separation is on unless asked off."""
        user = self._user(userid)
        if not _NAME_RE.match(name):
            raise AccessError("invalid token name '%s'" % name)
        if name in user.tokens:
            raise AccessError("Token already exists.")
        user.tokens[name] = (bool(privsep), secret)
        self._changed()

    def add_role(self, roleid: str, privileges: Iterable[str]) -> None:
        """API2/Role.pm ``create_role``."""
        privileges = frozenset(privileges)
        if roleid in self.roles:
            raise AccessError("role '%s' already exists" % roleid)
        unknown = sorted(privileges - VALID_PRIVILEGES)
        if unknown:
            raise AccessError("invalid privilege '%s'" % unknown[0])
        self.roles[roleid] = privileges
        self._changed()

    def add_pool(self, poolid: str) -> None:
        """pve-manager API2/Pool.pm ``create_pool``."""
        if not _NAME_RE.match(poolid):
            raise AccessError("invalid pool ID '%s'" % poolid)
        if poolid in self.pools:
            raise AccessError("pool '%s' already exists" % poolid)
        self.pools[poolid] = set()
        self._changed()

    def pool_add_vms(self, poolid: str, vmids: Iterable[int], existing: Iterable[int]) -> None:
        """pve-manager API2/Pool.pm ``update_pool`` with ``vms``: each guest must exist and be
        in no other pool."""
        if poolid not in self.pools:
            raise AccessError("pool '%s' does not exist" % poolid)
        existing = set(existing)
        vmids = [int(v) for v in vmids]
        for vmid in vmids:
            if vmid not in existing:
                raise AccessError("VM %d does not exist" % vmid)
            if any(vmid in members for pool, members in self.pools.items() if pool != poolid):
                raise AccessError("VM %d is already a pool member" % vmid)
        self.pools[poolid].update(vmids)
        self._changed()

    def modify_acl(
        self, path: str, kind: str, ugid: str, roleid: str, propagate: bool = True, delete: bool = False
    ) -> None:
        """API2/ACL.pm ``update_acl``: add (or remove) one role of one user, group or token on a
        path; an existing grant of that role gets the new propagate flag."""
        path = normalize_path(path)
        if roleid not in self.roles:
            raise AccessError("role '%s' does not exist" % roleid)
        if kind == "user":
            self._user(ugid)
        elif kind == "group" and ugid not in self.groups:
            raise AccessError("group '%s' does not exist" % ugid)
        elif kind == "token":
            userid, name = split_principal(ugid)
            if name is None or name not in self._user(userid).tokens:
                raise AccessError("no such token '%s' for user '%s'" % (name, userid))
        elif kind not in ENTRY_TYPES:
            raise AccessError("type must be one of %s" % ", ".join(ENTRY_TYPES))
        grants = self.acl.setdefault(path, {}).setdefault((kind, ugid), {})
        if delete:
            grants.pop(roleid, None)
        else:
            grants[roleid] = 1 if propagate else 0
        self._prune(path, (kind, ugid))
        self._changed()

    def drop_entry(self, path: str, kind: str, ugid: str, roleid: str) -> None:
        """Remove one grant if it is there (no checks: for the simulator's own switches)."""
        grants = self.acl.get(path, {}).get((kind, ugid))
        if grants and roleid in grants:
            del grants[roleid]
            self._prune(path, (kind, ugid))
            self._changed()

    def set_pool_members(self, poolid: str, vmids: Iterable[int]) -> None:
        """The pool holds exactly ``vmids`` (for the simulator's own switches)."""
        self.pools[poolid] = {int(v) for v in vmids}
        self._changed()

    def role_holding(self, privileges: Iterable[str]) -> str:
        """A role holding exactly ``privileges``: a built-in one if there is one, else one made
        for it (named ``Only.<privileges>``, or ``NoPrivileges``)."""
        privileges = frozenset(privileges)
        for name in ("PVEAuditor", *sorted(self.roles)):
            if name != NO_ACCESS and self.roles.get(name) == privileges:
                return name
        name = "Only." + "_".join(sorted(privileges)) if privileges else "NoPrivileges"
        self.add_role(name, privileges)
        return name

    def remove_vm_access(self, vmid: int) -> None:
        """AccessControl.pm ``remove_vm_access`` (a guest destroyed): its ``/vms/N`` entries
        and its pool membership go."""
        self.acl.pop("/vms/%d" % vmid, None)
        for members in self.pools.values():
            members.discard(vmid)
        self._changed()

    def _user(self, userid: str) -> User:
        user = self.users.get(userid)
        if user is None:
            raise AccessError("user '%s' does not exist" % userid)
        return user

    def _prune(self, path: str, who: tuple) -> None:
        if not self.acl[path].get(who):
            self.acl[path].pop(who, None)
        if not self.acl[path]:
            del self.acl[path]

    def token_secret(self, principal: str) -> str | None:
        """The secret of an API token that exists, else None."""
        userid, name = split_principal(principal)
        user = self.users.get(userid)
        if name is None or user is None or name not in user.tokens:
            return None
        return user.tokens[name][1]
