"""The plain data every layer shares: rows, guests, inventories, tasks, events, and the
words (enums) that name reasons, actions, outcomes and refusals.

No I/O and no logic beyond reading a value: any module may import this one, and it
imports nothing of the package but :mod:`receiver.timeutil`.  The enums are ``str``
enums whose value is the word users see (JSON, metrics labels, the audit table, exit-3
reasons), so they compare equal to those words and serialise as them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any, NamedTuple

import msgspec

from .timeutil import parse_timestamp_strict, utcnow

VMID_MIN, VMID_MAX = 100, 999_999_999  # pve-vmid
DESTROY_TASK_TYPES = frozenset({"vzdestroy", "qmdestroy"})

STOP_PHASES = frozenset({"pre-stop", "post-stop"})
START_PHASES = frozenset({"pre-start", "post-start"})
PHASES = STOP_PHASES | START_PHASES


class Word(str, Enum):
    """A ``str`` enum that prints as its value, on every Python version."""

    def __str__(self) -> str:
        return str(self.value)


class Reason(Word):
    """Why a row is acted on (see :mod:`receiver.plan`)."""

    GHOST = "ghost"
    OLD_ERROR = "old_error"


class Verb(Word):
    """What is done to a row (``CLEANUP_ACTION``)."""

    DELETE = "delete"
    MARK = "mark"


class Finding(Word):
    """What a plan only reports."""

    UNMANAGED_GUEST = "unmanaged_guest"
    NAME_MISMATCH = "name_mismatch"
    UNREADABLE_ROW = "unreadable_row"
    HIDDEN_GUEST = "hidden_guest"  # a ghost's VMID in use by a guest the token is not shown
    HELD = "held"  # a row that would be acted on, kept by a hold (pve-janitor hold)


class Outcome(Word):
    """How one run of the removal pipeline ended."""

    DONE = "done"
    NOTHING = "nothing"
    DRY_RUN = "dry_run"
    REFUSED = "refused"
    DISABLED = "disabled"
    FAILED = "failed"


class Refusal(Word):
    """Why a removal changed nothing (the rules are in :mod:`receiver.safety`)."""

    INVENTORY = "inventory"
    PRIVILEGE = "privilege"
    NO_QUORUM = "no_quorum"
    EMPTY_INVENTORY = "empty_inventory"
    GUARD = "guard"
    WOULD_EMPTY = "would_empty"
    DATABASE = "database"
    LEASE = "lease"


class Rejection(Word):
    """Why ``POST /api/v1/events`` refused an event (the ``reason`` of its metric)."""

    NOT_CONFIGURED = "not_configured"  # 503: no hook secret
    TOO_LARGE = "too_large"  # 413
    HEADERS = "headers"  # 401: a signature or timestamp header missing or malformed
    SIGNATURE = "signature"  # 401: signed with another secret, or altered
    TIMESTAMP = "timestamp"  # 401: outside the time window (a replay, or a clock adrift)
    CONTENT_TYPE = "content_type"  # 415
    MALFORMED = "malformed"  # 400: signed, but the body is not a valid event


class InventoryError(Exception):
    """The inventory could not be read completely and surely.

    ``kind`` is a short machine word (unreachable, timeout, http, auth, tls, privilege,
    malformed, no_quorum) used in stats and metrics; the message says what happened
    without any secret.
    """

    def __init__(self, kind: str, message: str):
        self.kind = kind
        super().__init__(message)


class Guest(msgspec.Struct, frozen=True, gc=False):
    """One guest as ``/cluster/resources?type=vm`` lists it, only the keys we read.

    Decoded straight from the answer's bytes: the other keys of each entry are skipped,
    never built, and every key we read is type-checked.  Its fields cannot form a
    reference cycle, so the cyclic garbage collector does not track it (``gc=False``).
    """

    vmid: int
    node: str
    type: str
    status: str = "unknown"
    name: str | None = None
    template: int | bool = 0  # the API sends 0/1
    lock: str | None = None


@dataclass(frozen=True)
class Inventory:
    """One complete, sure guest list of the cluster, by VMID."""

    guests: dict[int, Guest]
    read_at: datetime = field(default_factory=utcnow)
    read_seconds: float = 0.0

    def __contains__(self, vmid: object) -> bool:
        return vmid in self.guests

    def get(self, vmid: int) -> Guest | None:
        return self.guests.get(vmid)

    @classmethod
    def of(cls, guests: Iterable[Guest], read_at: datetime | None = None) -> Inventory:
        return cls({g.vmid: g for g in guests}, read_at or utcnow())


@dataclass(frozen=True)
class Task:
    """One Proxmox task as the task lists give it (``vmid`` from the task's ``id``)."""

    upid: str
    node: str
    type: str
    vmid: int | None
    status: str | None
    endtime: int | None
    starttime: int | None = None


@dataclass(frozen=True)
class AclProof:
    """How far the ACL list proves a guest list complete.

    ``hideable``: the VMIDs an ACL could hide from the token; every other guest is surely
    listed.  None: nothing is proved, every ghost must be checked.  ``reason`` says which,
    for the log and ``pve-janitor check``.
    """

    hideable: frozenset[int] | None
    reason: str


@dataclass(frozen=True)
class Event:
    """One signed hookscript event, as accepted into the inbox."""

    event_id: str
    vmid: int
    phase: str
    node: str
    ts: float


class Row(NamedTuple):
    """The mapped columns of one platform row, exactly as read when planning.

    The raw values are what the apply step requires to be unchanged (the observed-value
    guard).  Timestamps are parsed only when asked for (``last_touched``): for a row whose
    guest exists no timestamp can change the outcome, so most are never parsed.  A
    timestamp that cannot be read raises ValueError there; the planner then keeps the row
    and reports it.  A named tuple, not a dataclass: a sweep makes one per row, and named
    tuples are cheaper to make (docs/performance.md).
    """

    key: Any
    vmid: int | None
    hostname: Any = None  # as read: text in practice, but any column type (shown through str())
    status: str | None = None
    raw_created: Any = None
    raw_updated: Any = None
    raw_vmid: Any = None
    raw_status: Any = None
    unreadable: str | None = None  # why the VMID could not be read: such a row is never acted on

    def last_touched(
        self, created_column: str | None = "created_at", updated_column: str | None = "updated_at"
    ) -> datetime | None:
        """The later of the created and updated timestamps (None when both are NULL).

        ValueError, naming the column, when one cannot be read.
        """
        stamps = []
        for column, raw in ((created_column, self.raw_created), (updated_column, self.raw_updated)):
            try:
                stamp = parse_timestamp_strict(raw)
            except ValueError as exc:
                raise ValueError(f"{column}: {exc}") from None
            if stamp is not None:
                stamps.append(stamp)
        return max(stamps) if stamps else None


@dataclass(frozen=True)
class Holds:
    """The holds in force for one table: row keys (as text) and VMIDs that are never acted on,
    each with the words that say which hold it is."""

    keys: dict[str, str] = field(default_factory=dict)
    vmids: dict[int, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.keys or self.vmids)

    def of(self, row: Row) -> str | None:
        """Which hold keeps this row (None: none)."""
        if self.keys:
            found = self.keys.get(str(row.key))
            if found is not None:
                return found
        return self.vmids.get(row.vmid) if row.vmid is not None and self.vmids else None


@dataclass(frozen=True)
class Action:
    row: Row
    action: Verb
    reason: Reason
    detail: str


@dataclass(frozen=True)
class Report:
    kind: Finding
    vmid: int | None
    detail: str


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    reports: tuple[Report, ...]
    rows_seen: int
    kept: dict[str, int] = field(default_factory=dict)

    def count(self, reason: Reason) -> int:
        return sum(1 for a in self.actions if a.reason == reason)


@dataclass
class ApplyResult:
    """What one apply step changed: the actions applied, those skipped (and why), counters."""

    applied: list[Action] = field(default_factory=list)
    skipped: list[tuple[Action, str]] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
