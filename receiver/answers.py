"""What the Proxmox API's answers say, read strictly: pure functions, no I/O.

A half-understood answer must never become "these guests are gone", so anything odd in
the guest list is an :class:`InventoryError`; the task and ACL lists are read as
leniently as their callers can afford (see each function).
"""

from __future__ import annotations

import msgspec

from .model import AclProof, Guest, InventoryError, Task


class _Answer(msgspec.Struct):
    data: list[Guest]


_ANSWER = msgspec.json.Decoder(_Answer)


def parse_guests(answer: bytes) -> dict[int, Guest]:
    """The guests in a ``/cluster/resources?type=vm`` answer (the raw JSON); raise on anything odd.

    The raw bytes, decoded straight into :class:`Guest` with msgspec, because the guest list
    is the one answer that grows with the cluster: a generic JSON parse would hold every entry
    as a full dict.  A missing ``data`` list, an entry that is not an object, a key of the
    wrong type (a vmid that is not an integer), or an entry without vmid or node is an
    :class:`InventoryError` (``malformed``).  ``type=vm`` lists nothing but guests.
    """
    try:
        entries = _ANSWER.decode(answer).data
    except msgspec.ValidationError as exc:
        raise InventoryError("malformed", f"/cluster/resources: unexpected answer ({exc})") from None
    except msgspec.DecodeError:
        raise InventoryError("malformed", "/cluster/resources: the answer is not JSON") from None
    return {g.vmid: g for g in entries}


def parse_tasks(entries: object) -> list[Task]:
    """The tasks in a ``/cluster/tasks`` or ``/nodes/{node}/tasks`` answer.

    Not a list is ``malformed``; an entry without a UPID is skipped (a task list only
    hints at what happened, the guest list decides)."""
    if not isinstance(entries, list):
        raise InventoryError("malformed", "/cluster/tasks did not return a list")
    tasks = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("upid"), str):
            continue
        raw_id = str(entry.get("id") or "")
        tasks.append(
            Task(
                upid=entry["upid"],
                node=str(entry.get("node") or ""),
                type=str(entry.get("type") or ""),
                vmid=int(raw_id) if raw_id.isdigit() else None,
                status=entry.get("status"),
                endtime=entry.get("endtime") if isinstance(entry.get("endtime"), int) else None,
                starttime=entry.get("starttime") if isinstance(entry.get("starttime"), int) else None,
            )
        )
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
            tail = path[len("/vms/") :]
            if not (tail.isascii() and tail.isdigit()):
                return AclProof(None, f"/access/acl listed an entry on {path!r}, not a guest's path")
            hideable.add(int(tail))
        elif role == NO_ACCESS and (path in ("/", "/pool") or path.startswith("/pool/")):
            return AclProof(None, f"a NoAccess ACL on {path} can hide the guests of a pool")
    return AclProof(
        frozenset(hideable),
        f"the ACL list proves the guest list complete ({len(hideable)} "
        "VMIDs with an ACL entry of their own are checked one by one)",
    )
