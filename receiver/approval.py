"""Deciding a pending plan: approve it (remove what still matches the review) or reject it.

Approval runs the whole removal pipeline again, as a sweep with ``--force`` would, with the
plan cut down to what was reviewed (:func:`narrow`): the rows are read and planned again,
the guest list is read and confirmed, and every rule that ``--force`` does not lift applies
(inventory unreadable, privilege, quorum, empty list, hidden guests, holds).  A row is
removed only when it is still planned for the same action and reason, and its mapped
values (VMID, hostname, status, timestamps) are still those that were reviewed; the apply
step guards them once more in its transaction.  Every reviewed row that is not removed is
named with the reason.

When the pipeline refuses (Proxmox unreadable, say), the plan stays pending and can be
approved again later.  Otherwise the plan becomes ``approved``, with the result in its note
and in the ``plan.approved`` event.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import SQLAlchemyError

from . import pending
from .db import describe_db_error
from .model import Finding, Inventory, Outcome, Plan, Row
from .pending import PlanState, ReviewedRow

if TYPE_CHECKING:  # types only: no import at run time
    from .result import SweepResult
    from .sweep import Sweeper

logger = logging.getLogger(__name__)

SHOWN_IN_EVENT = 100  # rows not removed named in the plan.approved event


@dataclass
class Decision:
    """What a decision did: the plan's state after it, rows removed, rows not removed and why."""

    plan_id: int
    state: PlanState
    message: str
    removed: int = 0
    not_removed: list[dict[str, Any]] = field(default_factory=list)
    result: SweepResult | None = None

    @property
    def refused(self) -> bool:
        """The pipeline refused or failed: nothing changed, the plan is still pending."""
        return self.result is not None and self.result.outcome in (Outcome.REFUSED, Outcome.FAILED)

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan_id": self.plan_id,
            "state": str(self.state),
            "message": self.message,
            "removed": self.removed,
            "not_removed": self.not_removed,
            "result": self.result.to_dict() if self.result is not None else None,
        }


def _changes(before: Row, now: Row) -> list[str]:
    names = {"raw_vmid": "vmid", "raw_status": "status", "raw_created": "created", "raw_updated": "updated"}
    return [
        names.get(name, name)
        for name in ("raw_vmid", "hostname", "raw_status", "raw_created", "raw_updated", "unreadable")
        if getattr(before, name) != getattr(now, name)
    ]


def narrow(reviewed: dict[str, ReviewedRow], why: dict[str, str]) -> Any:
    """The ``narrow`` step of an approval: keep the actions on reviewed rows that still match
    the review, and write in ``why`` the reason for every reviewed row left out."""

    def cut(plan: Plan, inventory: Inventory) -> Plan:
        planned = {str(a.row.key): a for a in plan.actions}
        held = [r.detail for r in plan.reports if r.kind == Finding.HELD]
        keep = []
        for key, seen in reviewed.items():
            action = planned.get(key)
            if action is None:
                vmid = seen.row.vmid
                if any(detail.startswith(f"row {key} kept by ") for detail in held):
                    why[key] = "held"
                elif vmid is not None and vmid in inventory:
                    why[key] = f"guest {vmid} exists now"
                else:
                    why[key] = "no longer planned (gone from the table, or kept: protected, young, unreadable)"
            elif action.row != seen.row:
                why[key] = f"changed since review: {', '.join(_changes(seen.row, action.row)) or 'values'}"
            elif (action.action, action.reason) != (seen.action, seen.reason):
                why[key] = f"now planned as {action.action} ({action.reason}), not {seen.action} ({seen.reason})"
            else:
                keep.append(action)
        return replace(plan, actions=tuple(keep))

    return cut


def approve(sweeper: Sweeper, plan_id: int, by: str) -> Decision:
    """Approve pending plan ``plan_id``.  Raises PlanNotFound or PlanClosed (nothing changed)."""
    settings, engine = sweeper.settings, sweeper.table.engine
    _plan, rows = pending.check_open(engine, settings, plan_id, sweeper.clock())
    reviewed = {str(r.row.key): r for r in rows}
    why: dict[str, str] = {}
    result = sweeper.run(force=True, source="approval", narrow=narrow(reviewed, why), plan_id=plan_id)
    if result.outcome not in (Outcome.DONE, Outcome.NOTHING):
        message = f"plan {plan_id} is still pending: {result.outcome}"
        if result.reason:
            message += f" ({result.reason})"
        return Decision(plan_id, PlanState.PENDING, message, result=result)

    removed = {str(a.row.key) for a in result.applied.applied} if result.applied else set()
    for action, skipped in result.applied.skipped if result.applied else ():
        why.setdefault(str(action.row.key), skipped)
    back, hidden = set(result.dropped), set(result.hidden)
    for key, seen in reviewed.items():
        if key in removed or key in why:
            continue
        if seen.row.vmid in back:
            why[key] = f"guest {seen.row.vmid} came back before the removal"
        elif seen.row.vmid in hidden:
            why[key] = f"VMID {seen.row.vmid} is in use by a guest the token cannot see (hidden_guest)"
        else:
            why[key] = "not removed"
    not_removed = [
        {"row_key": reviewed[key].to_dict()["row_key"], "vmid": reviewed[key].row.vmid, "why": text}
        for key, text in sorted(why.items())
        if key in reviewed and key not in removed
    ]
    message = f"plan {plan_id} approved: {len(removed)} of {len(reviewed)} rows removed"
    if not_removed:
        message += f", {len(not_removed)} not (they no longer match what was reviewed)"
    try:
        pending.decide(
            engine,
            settings,
            plan_id,
            PlanState.APPROVED,
            by=by,
            note=message,
            now=sweeper.clock(),
            extra={"removed": len(removed), "not_removed": not_removed[:SHOWN_IN_EVENT]},
        )
    except pending.PlanClosed as exc:  # decided meanwhile by someone else: the removal above stands
        message += f" ({exc})"
    except SQLAlchemyError as exc:  # the rows went (audited); only the decision's record is missing
        logger.warning("plan %s: the decision could not be recorded: %s", plan_id, describe_db_error(exc))
        message += "; the decision could not be recorded (database error): approve it again to close it"
    logger.warning("%s (by %s)", message, by)
    return Decision(plan_id, PlanState.APPROVED, message, len(removed), not_removed, result)


def reject(sweeper: Sweeper, plan_id: int, by: str, reason: str = "") -> Decision:
    """Reject pending plan ``plan_id``: nothing is removed.  Raises PlanNotFound or PlanClosed."""
    note = reason.strip()[:2000] or "rejected"
    pending.decide(
        sweeper.table.engine, sweeper.settings, plan_id, PlanState.REJECTED, by=by, note=note, now=sweeper.clock()
    )
    message = f"plan {plan_id} rejected: nothing removed"
    logger.warning("%s (by %s: %s)", message, by, note)
    return Decision(plan_id, PlanState.REJECTED, message)
