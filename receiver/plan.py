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

A row whose VMID cannot be read (``Row.unreadable``), or whose timestamps
cannot be read when they would decide (its guest is missing, or its status is
an error status), is kept and reported: an unreadable value must never read as
"old" or "no guest".  A row whose guest exists and whose status is not an error
status is settled without parsing its timestamps.

A ghost whose VMID the allocator reserved (``POST /api/v1/allocations``) is kept
like a row in its grace period (``young``): its guest is being created.

A row that would be acted on but is held (``pve-janitor hold``, or a row that
``restore`` put back) is kept and reported (``held``).

Findings that are only reported: guests with no row (templates excluded),
rows whose guest's name differs from the row's hostname (a reused VMID?),
unreadable rows and held rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from .config import Settings
from .model import Action, Finding, Holds, Inventory, Plan, Reason, Report, Row, Verb
from .timeutil import age_text


def _norm(status: str | None) -> str:
    return (status or "").strip().lower()


def make_plan(
    rows: Iterable[Row],
    inventory: Inventory,
    now: datetime,
    settings: Settings,
    holds: Holds | None = None,
    reserved: frozenset[int] = frozenset(),
) -> Plan:
    protected = {_norm(s) for s in settings.protected_statuses}
    errors = {_norm(s) for s in settings.error_statuses}
    verb = Verb(settings.action)
    mark_status = _norm(settings.mark_status) if verb is Verb.MARK else None
    ghosts_wanted = settings.ghost_cleanup_enabled
    grace_start = now - timedelta(minutes=settings.grace_minutes)
    retention_start = now - timedelta(hours=settings.error_retention_hours)
    guests = inventory.guests

    actions: list[Action] = []
    reports: list[Report] = []
    kept = {"protected": 0, "young": 0, "present": 0, "already_marked": 0, "unreadable": 0, "held": 0}
    holds = holds or Holds()

    def held(row: Row, reason: Reason) -> bool:
        hold = holds.of(row) if holds else None
        if hold is None:
            return False
        kept["held"] += 1
        reports.append(Report(Finding.HELD, row.vmid, f"row {row.key} kept by {hold} (it would go as {reason})"))
        return True

    vmids_with_rows: set[int] = set()
    normalized: dict[Any, str] = {}  # status as stored -> as compared; a table holds a handful of them
    seen = 0
    for row in rows:
        seen += 1
        vmid = row.vmid
        guest = None
        if vmid is not None:
            vmids_with_rows.add(vmid)
            guest = guests.get(vmid)
            if guest is not None and guest.name and row.hostname and guest.name != row.hostname:
                reports.append(
                    Report(
                        Finding.NAME_MISMATCH,
                        vmid,
                        f"row {row.key} says hostname {row.hostname!r}, "
                        f"guest {vmid} on {guest.node} is named {guest.name!r} (reused VMID?)",
                    )
                )
        if row.unreadable:
            kept["unreadable"] += 1
            reports.append(Report(Finding.UNREADABLE_ROW, vmid, f"row {row.key} kept: {row.unreadable}"))
            continue
        status = normalized.get(row.status)
        if status is None:
            status = normalized[row.status] = _norm(row.status)
        if status in protected:
            kept["protected"] += 1
            continue
        if mark_status is not None and status == mark_status:
            kept["already_marked"] += 1
            continue
        is_error = status in errors
        if not is_error and (guest is not None or not ghosts_wanted):
            # Settled whatever its timestamps say: they are not even parsed.
            if guest is not None:
                kept["present"] += 1
            continue

        try:
            touched = row.last_touched(settings.created_column, settings.updated_column)
        except ValueError as exc:
            kept["unreadable"] += 1
            reports.append(Report(Finding.UNREADABLE_ROW, vmid, f"row {row.key} kept: {exc}"))
            continue
        if ghosts_wanted and guest is None:
            if (touched is not None and touched > grace_start) or vmid in reserved:
                kept["young"] += 1
            elif not held(row, Reason.GHOST):
                what = "has no VMID" if vmid is None else f"guest {vmid} does not exist"
                actions.append(Action(row, verb, Reason.GHOST, f"{what}; last touched {age_text(now, touched)} ago"))
                continue
            else:
                continue

        # The later of created/updated: an error row inserted a minute ago with a NULL
        # updated_at is not past retention.
        if is_error and (touched is None or touched < retention_start):
            if held(row, Reason.OLD_ERROR):
                continue
            where = f"; guest {vmid} still exists ({guest.status} on {guest.node})" if guest else ""
            actions.append(
                Action(
                    row,
                    verb,
                    Reason.OLD_ERROR,
                    f"status {row.status!r} since {age_text(now, touched)} "
                    f"(retention {settings.error_retention_hours} h){where}",
                )
            )
            continue
        if guest is not None:
            kept["present"] += 1

    for vmid in sorted(guests.keys() - vmids_with_rows):
        guest = guests[vmid]
        if not guest.template:
            reports.append(
                Report(
                    Finding.UNMANAGED_GUEST,
                    vmid,
                    f"{guest.type} {vmid} ({guest.name or 'no name'}, {guest.status}) on {guest.node} has no row",
                )
            )
    return Plan(tuple(actions), tuple(reports), seen, kept)
