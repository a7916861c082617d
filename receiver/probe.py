"""Probes: the cheapest read that says whether a watched guest is still there, and the fade.

The whole guest list (``/cluster/resources?type=vm``) costs about 310 bytes a guest, so
reading it at every tick for a few watched VMIDs would make the watcher's load on
Proxmox grow with the cluster.  Instead each tick asks about the VMIDs that are due in
whichever way costs the fewest bytes (:func:`choose`):

* the guest's own status on its last known node,
  ``GET /nodes/{node}/{type}/{vmid}/status/current`` (presence *and* status, which the
  stop marks need);
* its node's guest list, ``GET /nodes/{node}/lxc|qemu``, when many watched guests share a
  node (a node shutdown stops hundreds at once);
* the whole list, when that is cheaper still, or when a VMID's node is not known.

A probe never removes anything.  "Not on that node" (:attr:`Result.GONE`) only makes the
VMID a *candidate*: a migrated guest is missing from its old node too.  The watcher then
reads the whole list, with its privilege and quorum checks, and hands what is missing
from it to the removal pipeline, which confirms with a read of its own.  Every other
answer (595 from an offline node, 403, 401, anything odd) makes no candidate: the VMID
stays watched and the answer is counted and said.

The fade (:class:`receiver.fade.Fade`): a guest is probed at every tick for a minute after
the latest hint about it (a stop event or a destroy task, which restarts it), then 2, 4,
8 ... s apart until its watch ends.  Platforms destroy right after the stop, so a destroy
is still found within a tick; a guest stopped for maintenance costs a few dozen small
answers over the whole watch window, whatever the cluster's size.

Pure functions and plain data, no I/O: the watcher makes the requests.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from .model import Word

# HTTP headers both ways, not in the body counts: a request more must save at least this many bytes.
REQUEST_OVERHEAD_BYTES = 500
STATUS_BYTES_GUESS = 400  # a status answer's size before one was measured (the simulator's are ~330)
FULL_READ_EXTRA_BYTES = 1000  # the privilege and quorum answers that come with every whole-list read
AVERAGE_WEIGHT = 0.2  # how much one measured answer moves a running average

GUEST_TYPES = ("lxc", "qemu")
_MISSING_CONFIG = re.compile(r"Configuration file '[^']*/(\d+)\.conf' does not exist")


class Result(Word):
    """What one probe said of one VMID (the ``result`` label of ``pve_janitor_probe_results``)."""

    PRESENT = "present"
    GONE = "gone"  # not on the node asked: a candidate, never a removal by itself
    OFFLINE = "offline"  # 595: the node cannot be reached through the proxy
    PRIVILEGE = "privilege"  # 403: the token lacks VM.Audit on /vms/N
    AUTH = "auth"  # 401: the token was refused
    HTTP = "http"  # any other HTTP error
    MALFORMED = "malformed"  # 200, but not the answer expected


class Kind(Word):
    """How a VMID was asked about (the ``kind`` label)."""

    GUEST = "guest"  # its status on its node
    NODE = "node"  # its node's guest list
    FULL = "full"  # the whole guest list


@dataclass(frozen=True)
class Seen:
    """One probe's answer about one VMID; ``status``, ``node`` and ``type`` only when present."""

    result: Result
    status: str | None = None
    node: str | None = None
    type: str | None = None
    detail: str = ""


@dataclass(frozen=True)
class Where:
    """Where a watched guest was last seen (``type`` None: only its node is known, from its stop event)."""

    node: str
    type: str | None = None


@dataclass(frozen=True)
class ListShape:
    """What the last whole-list read says about the cost of the next: its size, guests by node and type."""

    guests: int
    body_bytes: int
    per_node: Counter[tuple[str, str]] = field(default_factory=Counter)

    def entry_bytes(self) -> float:
        return self.body_bytes / max(1, self.guests)


def _odd(code: int, reason: str) -> Seen:
    """An HTTP error that says nothing about the guest's existence."""
    result = {595: Result.OFFLINE, 403: Result.PRIVILEGE, 401: Result.AUTH}.get(code, Result.HTTP)
    return Seen(result, detail=f"HTTP {code} {' '.join(reason.split())[:160]}")


def _data(body: bytes) -> object:
    try:
        answer = json.loads(body)
    except ValueError:
        return None
    return answer.get("data") if isinstance(answer, dict) else None


def read_status(vmid: int, node: str, kind: str, code: int, reason: str, body: bytes) -> Seen:
    """What ``GET /nodes/{node}/{kind}/{vmid}/status/current`` answered.

    Gone only for Proxmox's own "Configuration file 'nodes/<node>/.../<vmid>.conf' does not
    exist" (HTTP 500: the guest's config is not on that node).  Proxmox puts that message in
    the status line; it is looked for in the body too.
    """
    if code == 200:
        data = _data(body)
        status = data.get("status") if isinstance(data, dict) else None
        listed = data.get("vmid", vmid) if isinstance(data, dict) else None
        if not isinstance(status, str) or str(listed) != str(vmid):
            return Seen(Result.MALFORMED, detail="status answer without the guest's status")
        return Seen(Result.PRESENT, status, node, kind)
    if code == 500:
        text = reason + " " + body[:500].decode("utf-8", "replace")
        match = _MISSING_CONFIG.search(text)
        if match and int(match.group(1)) == vmid:
            return Seen(Result.GONE, node=node, type=kind, detail=f"not a {kind} guest on {node}")
    return _odd(code, reason)


def read_node_list(
    vmids: list[int], node: str, kind: str, code: int, reason: str, body: bytes
) -> tuple[dict[int, Seen], int]:
    """What ``GET /nodes/{node}/{kind}`` answered about each of ``vmids``.

    A VMID not listed is gone from that node (the token may also lack VM.Audit on it: the
    list skips such guests without an error, and the whole-list read that follows checks
    the privilege).  Any entry that cannot be read makes the whole answer malformed.  Also
    returns how many guests the list held (what its size is measured against).
    """
    if code != 200:
        odd = _odd(code, reason)
        return {v: odd for v in vmids}, 0
    entries = _data(body)
    statuses: dict[int, str] = {}
    if isinstance(entries, list):
        for entry in entries:
            vmid = entry.get("vmid") if isinstance(entry, dict) else None
            status = entry.get("status") if isinstance(entry, dict) else None
            # The lxc list has sent the VMID as a string in some Proxmox versions.
            if (
                isinstance(vmid, bool)
                or not isinstance(vmid, (int, str))
                or not str(vmid).isdigit()
                or not isinstance(status, str)
            ):
                entries = None
                break
            statuses[int(vmid)] = status
    if not isinstance(entries, list):
        bad = Seen(Result.MALFORMED, detail=f"/nodes/{node}/{kind}: unexpected answer")
        return {v: bad for v in vmids}, 0
    return {
        v: Seen(Result.PRESENT, statuses[v], node, kind)
        if v in statuses
        else Seen(Result.GONE, node=node, type=kind, detail=f"not in {node}'s {kind} list")
        for v in vmids
    }, len(statuses)


def merge(before: Seen | None, answer: Seen) -> Seen:
    """What two answers about one VMID say together (its node's lxc and qemu lists): present
    in either is present; gone only when gone from both; else the odd answer, which makes
    no candidate."""
    if before is None or answer.result == Result.PRESENT or before.result == Result.GONE:
        return answer
    return before


NODE_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,62})")


def node_name_ok(node: str) -> bool:
    """Whether ``node`` (from a hook event) can be a Proxmox node name, and so a path part."""
    return bool(NODE_NAME.fullmatch(node))


# --- what to read --------------------------------------------------------------------------


@dataclass(frozen=True)
class Ask:
    """One request of a tick: a guest's status (``vmids`` one VMID, ``types`` tried in order
    while the answer is "not here"), or a node's list of one type (``types`` one type)."""

    kind: Kind
    node: str
    types: tuple[str, ...]
    vmids: tuple[int, ...]


@dataclass(frozen=True)
class Choice:
    """A tick's reads: the whole list (``full``), or ``asks``; with the bytes each would cost."""

    full: bool
    asks: tuple[Ask, ...] = ()
    probe_bytes: float = 0.0
    full_bytes: float | None = None
    why: str = ""


class Costs:
    """Running averages of what each kind of probe answer weighs, as measured."""

    def __init__(self) -> None:
        self.status_bytes: float | None = None
        self.list_entry_bytes: float | None = None

    @staticmethod
    def _average(old: float | None, new: float) -> float:
        return new if old is None else old + AVERAGE_WEIGHT * (new - old)

    def measured_status(self, size: int) -> None:
        self.status_bytes = self._average(self.status_bytes, size)

    def measured_list(self, size: int, entries: int) -> None:
        if entries:
            self.list_entry_bytes = self._average(self.list_entry_bytes, size / entries)

    def choose(self, due: Mapping[int, Where | None], shape: ListShape | None) -> Choice:
        """The cheapest reads that answer for every VMID in ``due``.

        The whole list when a VMID's node is unknown or no whole list was read yet (nothing
        to estimate from, and it tells where every guest is); else, node by node, the
        cheaper of one status request per guest (two for a guest whose type is unknown and
        not the node's more common one) and the node's lists; and the whole list after all
        when that sum would cost more.
        """
        if not due:
            return Choice(False)
        if shape is None:
            return Choice(True, why="no whole list read yet")
        full = shape.body_bytes + FULL_READ_EXTRA_BYTES + 3 * REQUEST_OVERHEAD_BYTES
        unknown = sorted(v for v, where in due.items() if where is None)
        if unknown:
            return Choice(True, full_bytes=full, why=f"node of VMID {unknown[0]} not known")
        status = (self.status_bytes or STATUS_BYTES_GUESS) + REQUEST_OVERHEAD_BYTES
        entry = self.list_entry_bytes or shape.entry_bytes()
        by_node: dict[str, dict[int, str | None]] = {}
        for vmid, where in due.items():
            assert where is not None
            by_node.setdefault(where.node, {})[vmid] = where.type
        asks: list[Ask] = []
        total = 0.0
        for node, types in sorted(by_node.items()):
            counts = {t: shape.per_node.get((node, t), 0) for t in GUEST_TYPES}
            order = tuple(sorted(GUEST_TYPES, key=lambda t: -counts[t]))
            second_share = counts[order[1]] / max(1, sum(counts.values()))
            by_status = sum(status if t else status * (1 + second_share) for t in types.values())
            wanted = sorted({t for t in types.values() if t} | (set(GUEST_TYPES) if None in types.values() else set()))
            by_list = sum(counts[t] * entry + REQUEST_OVERHEAD_BYTES for t in wanted)
            if by_list < by_status:
                total += by_list
                asks.extend(Ask(Kind.NODE, node, (t,), tuple(sorted(types))) for t in wanted)
            else:
                total += by_status
                asks.extend(Ask(Kind.GUEST, node, (t,) if t else order, (v,)) for v, t in sorted(types.items()))
        if full <= total:
            return Choice(True, probe_bytes=total, full_bytes=full, why="the whole list costs less")
        return Choice(False, tuple(asks), total, full)
