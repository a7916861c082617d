"""What Proxmox computes from the access configuration (``userconfig.UserConfig``): the roles
and privileges of a user or API token on a path, the effective permissions, the ACL list
a caller may read.

Each rule follows the pve-access-control (or pve-manager) function named where it is
coded; the names of those functions are the ones to read when a rule is in doubt.  The
simulator asks this model for every answer that depends on privileges, so the product
meets what a real cluster computes: a privilege-separated token holds only what its
user holds too, a deeper ACL entry replaces what ``/`` passed down, NoAccess wins.

Principals are ``user@realm`` or ``user@realm!tokenname``; ``root@pam`` holds everything.
"""

from __future__ import annotations

import re

from .roles import NO_ACCESS, path_key
from .userconfig import ENTRY_TYPES, ROOT_USER, UserConfig, split_principal

# A guest path with no entry of its own and no pool: VMIDs start at 100, so 0 stands for all such.
_ANY_GUEST = "/vms/0"


class AccessControl(UserConfig):
    """The access configuration and the privileges it gives.  The compiled privileges are
    cached until the configuration changes (as ``RPCEnvironment``'s aclcache lives for one
    request)."""

    def __init__(self):
        super().__init__()
        self._cache: dict = {}

    def _changed(self) -> None:
        super()._changed()
        self._cache.clear()

    # ------------------------------------------------------------------ what it gives

    def roles_at(self, principal: str, path: str) -> dict:
        """AccessControl.pm ``roles``: ``{role: propagate}`` of a user or token on ``path``.

        Walking ``/`` down to ``path``, the entries at each step that apply (every one on
        ``path`` itself, elsewhere only those with propagate) replace what was inherited:
        the principal's own entries (the token's, or the user's), else those of the user's
        groups.  NoAccess among the result leaves NoAccess alone.  Pools are not looked at
        here (see ``privileges``).
        """
        if principal == ROOT_USER:
            return {"Administrator": 1}
        userid, name = split_principal(principal)
        if name is not None:
            user = self.users.get(userid)
            if user is None or name not in user.tokens:
                return {}
            if not user.tokens[name][0]:  # not privilege-separated: the user's roles
                return self.roles_at(userid, path)
        kind = "token" if name is not None else "user"
        parts = path_key(path)
        roles: dict = {}
        for depth in range(len(parts) + 1):
            entries = self.acl.get("/" + "/".join(parts[:depth]), {})
            final = depth == len(parts)
            own = {r: p for r, p in entries.get((kind, principal), {}).items() if final or p}
            if own:
                roles = own
                continue
            from_groups: dict = {}
            if kind == "user":
                for (entry_kind, group), grants in entries.items():
                    if entry_kind == "group" and principal in self.groups.get(group, ()):
                        for role, propagate in grants.items():
                            if final or propagate:  # two groups, one role: propagating wins
                                from_groups[role] = max(from_groups.get(role, 0), propagate)
            if from_groups:
                roles = from_groups
        if NO_ACCESS in roles:
            return {NO_ACCESS: roles[NO_ACCESS]}
        return roles

    def privileges(self, principal: str, path: str) -> dict:
        """RPCEnvironment.pm ``permissions`` and ``compile_acl_path``: ``{privilege: propagate}``
        of a user or token on ``path``, as ``/access/permissions`` shows it."""
        return dict(self._compiled(principal, path))

    def has(self, principal: str, path: str, privilege: str) -> bool:
        """RPCEnvironment.pm ``check`` (with noerr): holds ``privilege`` on ``path``."""
        return privilege in self._compiled(principal, path)

    def _compiled(self, principal: str, path: str) -> dict:
        if principal == ROOT_USER:  # permissions(): root can do anything
            return dict.fromkeys(self.roles["Administrator"], 1)
        key = (principal, self._cache_path(path))
        cached = self._cache.get(key)
        if cached is None:
            cached = self._cache[key] = self._compile(principal, path)
        return cached

    def guest_filter(self, principal: str, privilege: str):
        """``vmid -> bool``: holds ``privilege`` on ``/vms/<vmid>``.  Guests without an entry of
        their own and in no pool share one answer, so a list of 100,000 costs one walk."""
        special = {int(path[len("/vms/") :]) for path in self.acl if path.startswith("/vms/")}
        for members in self.pools.values():
            special |= members
        shared = self.has(principal, _ANY_GUEST, privilege)
        return lambda vmid: self.has(principal, "/vms/%d" % vmid, privilege) if vmid in special else shared

    def pool_of(self, vmid: int) -> str | None:
        return next((pool for pool, members in self.pools.items() if vmid in members), None)

    def _cache_path(self, path: str) -> str:
        """Every ``/vms/N`` without an entry of its own and in no pool gets the same
        privileges (what ``/vms`` passes down): one cache entry serves 100,000 guests."""
        match = re.fullmatch(r"/vms/(\d+)", path)
        if match and path not in self.acl and not any(int(match.group(1)) in m for m in self.pools.values()):
            return "/vms/*"
        return path

    def _compile(self, principal: str, path: str) -> dict:
        userid, name = split_principal(principal)
        user_privileges = None
        if name is not None:
            user = self.users.get(userid)
            if user is None or name not in user.tokens:
                return {}
            if not user.tokens[name][0]:  # permissions(): a non-separated token holds its user's
                return self.privileges(userid, path)
            if userid != ROOT_USER:
                user_privileges = self.privileges(userid, path)
        roles = self.roles_at(principal, path)
        pool_roles = self._pool_roles(principal).get(path)
        if pool_roles and NO_ACCESS not in roles:  # a direct NoAccess is never trumped
            if NO_ACCESS in pool_roles:
                roles = {NO_ACCESS: 0}  # but NoAccess on the pool trumps every direct role
            else:
                for role in pool_roles:  # pool roles never override a direct one, never propagate
                    roles.setdefault(role, 0)
        privileges: dict = {}
        for role, propagate in roles.items():
            for privilege in self.roles.get(role, ()):
                # propagated if any role holding it is
                privileges[privilege] = max(privileges.get(privilege, 0), propagate)
        if user_privileges is not None:
            # "intersect user and token permissions", each propagate flag the AND of both
            privileges = {p: min(user_privileges[p], flag) for p, flag in privileges.items() if p in user_privileges}
        return privileges

    def _pool_roles(self, principal: str) -> dict:
        """compile_acl_path's ``poolroles``: for each guest in a pool, the roles its principal
        holds on ``/pool/<pool>`` (inherited ones included)."""
        by_path: dict = {}
        for pool, members in self.pools.items():
            roles = self.roles_at(principal, "/pool/" + pool)
            for vmid in members if roles else ():
                by_path.setdefault("/vms/%d" % vmid, set()).update(roles)
        return by_path

    def effective_permissions(self, principal: str) -> dict:
        """RPCEnvironment.pm ``get_effective_permissions`` (``/access/permissions`` without
        ``path``): the top-level paths, every path of the ACL tree and every pool member's
        ``/vms/N``, each with what the principal holds there; paths where it holds nothing
        are left out."""
        paths = {"/", "/access", "/access/groups", "/nodes", "/pool", "/sdn", "/storage", "/vms"}
        for path in self.acl:
            parts = path_key(path)
            paths.update("/" + "/".join(parts[:depth]) for depth in range(len(parts) + 1))
        for members in self.pools.values():
            paths.update("/vms/%d" % vmid for vmid in members)
        result = {path: self.privileges(principal, path) for path in sorted(paths, key=path_key)}
        return {path: privileges for path, privileges in result.items() if privileges}

    def acl_entries(self, principal: str) -> list:
        """API2/ACL.pm ``read_acl``: every entry to a principal with Sys.Audit on ``/access``;
        to any other only the entries on paths where it may modify permissions
        (RPCEnvironment.pm ``check_perm_modify``).  In ``iterate_acl_tree`` order."""
        audit = self.has(principal, "/access", "Sys.Audit")
        entries: list[dict] = []
        for path in sorted(self.acl, key=path_key):
            if not (audit or self._may_modify(principal, path)):
                continue
            for (kind, ugid), grants in sorted(
                self.acl[path].items(), key=lambda item: (ENTRY_TYPES.index(item[0][0]), item[0][1])
            ):
                entries.extend(
                    {"path": path, "type": kind, "ugid": ugid, "roleid": role, "propagate": propagate}
                    for role, propagate in sorted(grants.items())
                )
        return entries

    def _may_modify(self, principal: str, path: str) -> bool:
        wanted = ["Permissions.Modify"]
        for prefix, privilege in (
            ("/storage/", "Datastore.Allocate"),
            ("/vms/", "VM.Allocate"),
            ("/pool/", "Pool.Allocate"),
        ):
            if path.startswith(prefix):
                wanted.append(privilege)
        return any(self.has(principal, path, privilege) for privilege in wanted)
