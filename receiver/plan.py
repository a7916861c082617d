"""The planner: rows + inventory + clock + settings in, actions with reasons out.

A pure function, so the rules that decide what gets deleted are tested
without a database or a cluster.  Two reasons to act on a row:

``ghost``
    Its VMID is not in the inventory (or is NULL), it was neither created nor
    updated within the grace period, and its status is not protected (a
    deployment in flight may not have its guest yet).
``old_error``
    Its status is an error status and it was neither created nor updated
    within the retention window; acted on whether or not the guest exists
    (the plan says when it does).

A row whose VMID or timestamps cannot be read (``Row.unreadable``) is kept
and reported: an unreadable value must never read as "old" or "no guest".

Findings that are only reported: guests with no row (templates excluded),
rows whose guest's name differs from the row's hostname (a reused VMID?), and
unreadable rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Iterable

from .config import Settings
from .inventory import Inventory

GHOST = "ghost"
OLD_ERROR = "old_error"


@dataclass(frozen=True)
class Row:
    """The mapped columns of one platform row, as observed when planning.

    ``raw_vmid`` and ``raw_updated`` are the values exactly as read, so the
    apply step can require them to be unchanged (the observed-value guard).
    """

    key: Any
    vmid: int | None
    hostname: str | None = None
    status: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    ports: tuple[Any, ...] = ()
    raw_vmid: Any = None
    raw_updated: Any = None
    raw_status: Any = None
    unreadable: str | None = None  # why a mapped value could not be read: such a row is never acted on

    def last_touched(self) -> datetime | None:
        stamps = [t for t in (self.created_at, self.updated_at) if t is not None]
        return max(stamps) if stamps else None


@dataclass(frozen=True)
class Action:
    row: Row
    action: str  # "delete" or "mark"
    reason: str  # GHOST or OLD_ERROR
    detail: str


@dataclass(frozen=True)
class Report:
    kind: str  # "unmanaged_guest", "name_mismatch" or "unreadable_row"
    vmid: int | None
    detail: str


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    reports: tuple[Report, ...]
    rows_seen: int
    kept: dict[str, int] = field(default_factory=dict)

    def count(self, reason: str) -> int:
        return sum(1 for a in self.actions if a.reason == reason)


def _age(now: datetime, then: datetime | None) -> str:
    if then is None:
        return "no timestamp"
    seconds = max(0, int((now - then).total_seconds()))
    if seconds >= 2 * 86400:
        return f"{seconds // 86400} d"
    if seconds >= 2 * 3600:
        return f"{seconds // 3600} h"
    if seconds >= 120:
        return f"{seconds // 60} min"
    return f"{seconds} s"


def _norm(status: str | None) -> str:
    return (status or "").strip().lower()


def make_plan(rows: Iterable[Row], inventory: Inventory, now: datetime, settings: Settings) -> Plan:
    protected = {_norm(s) for s in settings.protected_statuses}
    errors = {_norm(s) for s in settings.error_statuses}
    mark_status = _norm(settings.mark_status) if settings.action == "mark" else None
    grace_start = now - timedelta(minutes=settings.grace_minutes)
    retention_start = now - timedelta(hours=settings.error_retention_hours)

    actions: list[Action] = []
    reports: list[Report] = []
    kept = {"protected": 0, "young": 0, "present": 0, "already_marked": 0, "unreadable": 0}
    vmids_with_rows: set[int] = set()
    seen = 0
    for row in rows:
        seen += 1
        status = _norm(row.status)
        guest = inventory.get(row.vmid) if row.vmid is not None else None
        if row.vmid is not None:
            vmids_with_rows.add(row.vmid)
        if guest and guest.name and row.hostname and guest.name != row.hostname:
            reports.append(Report("name_mismatch", row.vmid, f"row {row.key} says hostname {row.hostname!r}, "
                                  f"guest {row.vmid} on {guest.node} is named {guest.name!r} (reused VMID?)"))
        if row.unreadable:
            kept["unreadable"] += 1
            reports.append(Report("unreadable_row", row.vmid, f"row {row.key} kept: {row.unreadable}"))
            continue
        if status in protected:
            kept["protected"] += 1
            continue
        if mark_status is not None and status == mark_status:
            kept["already_marked"] += 1
            continue

        touched = row.last_touched()
        if settings.ghost_cleanup_enabled and guest is None:
            if touched is not None and touched > grace_start:
                kept["young"] += 1
            else:
                what = "has no VMID" if row.vmid is None else f"guest {row.vmid} does not exist"
                actions.append(Action(row, settings.action, GHOST,
                                      f"{what}; last touched {_age(now, touched)} ago"))
                continue

        # The later of created/updated: an error row inserted a minute ago with a NULL
        # updated_at is not past retention.
        updated = touched
        if status in errors and (updated is None or updated < retention_start):
            where = (f"; guest {row.vmid} still exists ({guest.status} on {guest.node})" if guest
                     else "")
            actions.append(Action(row, settings.action, OLD_ERROR,
                                  f"status {row.status!r} since {_age(now, updated)} "
                                  f"(retention {settings.error_retention_hours} h){where}"))
            continue
        if guest is not None:
            kept["present"] += 1

    for vmid, guest in sorted(inventory.guests.items()):
        if vmid not in vmids_with_rows and not guest.template:
            reports.append(Report("unmanaged_guest", vmid,
                                  f"{guest.type} {vmid} ({guest.name or 'no name'}, {guest.status}) on "
                                  f"{guest.node} has no row"))
    return Plan(tuple(actions), tuple(reports), seen, kept)
