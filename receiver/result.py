"""What one run of the removal pipeline did, in the words the CLI, the HTTP API and the log use."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .model import Action, ApplyResult, Outcome, Plan, Refusal
from .timeutil import isoformat


@dataclass
class SweepResult:
    """What one run of the pipeline did (a sweep's, or a watcher removal's)."""

    outcome: Outcome
    reason: str = ""
    refusal: Refusal | None = None
    plan: Plan | None = None
    applied: ApplyResult | None = None
    dropped: list[int] = field(default_factory=list)  # ghosts whose guest came back before applying
    hidden: list[int] = field(default_factory=list)  # ghosts' VMIDs held by a guest the token cannot see
    duration_s: float = 0.0
    dry_run: bool = False
    started_at: Any = None
    untouched_vmids: frozenset[int] = frozenset()  # VMIDs with a row read but not removed (VMID-scoped runs)
    pending_id: int | None = None  # the pending plan a refusal that --force lifts was kept as
    table_rows: int | None = None  # the table's size when planned

    @property
    def exit_code(self) -> int:
        return 3 if self.outcome in (Outcome.REFUSED, Outcome.FAILED) else 0

    def summary(self) -> str:
        applied = len(self.applied.applied) if self.applied else 0
        planned = len(self.plan.actions) if self.plan else 0
        text = f"sweep {self.outcome}: {planned} planned, {applied} applied"
        if self.applied and self.applied.skipped:
            text += f", {len(self.applied.skipped)} skipped (changed since planning)"
        if self.dropped:
            text += f", {len(self.dropped)} dropped (guest is back)"
        if self.hidden:
            text += f", {len(self.hidden)} kept (hidden_guest: VMIDs {short_vmids(self.hidden)})"
        if self.refusal:
            text += f" — refused ({self.refusal})"
        if self.reason:
            text += f" — {self.reason}"
        if self.pending_id is not None:
            text += f" — kept as pending plan {self.pending_id} (pve-janitor approve {self.pending_id})"
        return text + f" ({self.duration_s:.2f} s)"

    def to_dict(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "outcome": self.outcome,
            "reason": self.reason,
            "refusal": str(self.refusal) if self.refusal else None,
            "dry_run": self.dry_run,
            "started_at": isoformat(self.started_at),
            "duration_s": round(self.duration_s, 3),
            "rows_seen": plan.rows_seen if plan else None,
            "planned": [action_dict(a) for a in plan.actions] if plan else [],
            "reports": [{"kind": r.kind, "vmid": r.vmid, "detail": r.detail} for r in plan.reports] if plan else [],
            "kept": plan.kept if plan else {},
            "applied": len(self.applied.applied) if self.applied else 0,
            "skipped": [{"row_id": _jsonable(a.row.key), "why": why} for a, why in self.applied.skipped]
            if self.applied
            else [],
            "dropped_vmids": self.dropped,
            "hidden_guests": self.hidden,
            "pending_plan": self.pending_id,
            "counts": dict(self.applied.counts) if self.applied else {},
        }


def short_vmids(vmids: list[int], most: int = 10) -> str:
    shown = ", ".join(map(str, vmids[:most]))
    return shown + (f" and {len(vmids) - most} more" if len(vmids) > most else "")


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, type(None))) else str(value)


def action_dict(a: Action) -> dict[str, Any]:
    return {
        "action": a.action,
        "reason": a.reason,
        "row_id": _jsonable(a.row.key),
        "vmid": a.row.vmid,
        "hostname": _jsonable(a.row.hostname),
        "status": a.row.status,
        "detail": a.detail,
    }
