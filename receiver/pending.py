"""Pending plans: a removal that a ``--force``-liftable rule refused, kept for review.

When the deletion-percentage guard or the would-empty-table guard trips, the plan is not a
dead end: it is kept here with an id, the rows it would act on and the values observed in
them, its reason and an expiry (``CLEANUP_PENDING_HOURS``).  A person approves or rejects it
(``pve-janitor approve ID`` / ``reject ID``, or over HTTP); approval (:mod:`receiver.approval`)
removes only the rows that still match what was reviewed.

A newer plan that names any row of an older pending one supersedes it (the newer is the
fresher review of those rows); a plan identical to a pending one (same rows, same values,
same actions) is that one, and no new plan is made.  Every change of state writes its
webhook event in its own transaction (:mod:`receiver.outbox`).

This module is the only one that writes ``janitor_pending`` and ``janitor_pending_rows``,
and the one that cleans them (:func:`prune`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from . import outbox, store
from .config import Settings
from .db import chunks, write_transaction
from .model import Action, Plan, Reason, Refusal, Row, Verb, Word
from .timeutil import isoformat

KEEP_DECIDED = timedelta(days=30)  # decided, expired and superseded plans are kept this long


class PlanState(Word):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    EXPIRED = "expired"
    SUPERSEDED = "superseded"


class PlanNotFound(LookupError):
    """No pending plan has this id."""


class PlanClosed(Exception):
    """The plan was decided, superseded or has expired; nothing was changed."""


@dataclass(frozen=True)
class PendingPlan:
    id: int
    table: str
    state: PlanState
    refusal: str
    reason: str
    source: str
    row_count: int
    table_rows: int
    created_at: datetime
    expires_at: datetime
    decided_at: datetime | None
    decided_by: str | None
    note: str | None
    superseded_by: int | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "table": self.table,
            "state": str(self.state),
            "refusal": self.refusal,
            "reason": self.reason,
            "source": self.source,
            "rows": self.row_count,
            "table_rows": self.table_rows,
            "created_at": isoformat(self.created_at),
            "expires_at": isoformat(self.expires_at),
            "decided_at": isoformat(self.decided_at),
            "decided_by": self.decided_by,
            "note": self.note,
            "superseded_by": self.superseded_by,
        }

    def closed_because(self) -> str:
        """Why this plan can no longer be decided."""
        if self.state is PlanState.SUPERSEDED:
            return f"pending plan {self.id} was superseded by plan {self.superseded_by}"
        if self.state is PlanState.EXPIRED:
            return f"pending plan {self.id} expired at {isoformat(self.expires_at)}"
        return f"pending plan {self.id} was already {self.state} at {isoformat(self.decided_at)}"


@dataclass(frozen=True)
class ReviewedRow:
    """One row of a pending plan: what was planned for it and the values it had then."""

    row: Row
    action: Verb
    reason: Reason
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "row_key": outbox.jsonable(self.row.key),
            "vmid": self.row.vmid,
            "hostname": outbox.jsonable(self.row.hostname),
            "status": self.row.status,
            "action": str(self.action),
            "reason": str(self.reason),
            "detail": self.detail,
        }


def _encode_row(row: Row) -> str:
    return json.dumps([store.encode_value(v) for v in row], sort_keys=True)


def _decode_row(text: str) -> Row:
    return Row(*(store.decode_value(v) for v in json.loads(text)))


def _fingerprint(actions: Iterable[Action]) -> str:
    digest = hashlib.sha256()
    for line in sorted(f"{a.row.key}\x1f{a.action}\x1f{a.reason}\x1f{_encode_row(a.row)}" for a in actions):
        digest.update(line.encode("utf-8", "surrogateescape") + b"\x1e")
    return digest.hexdigest()


def _plan(row: Any) -> PendingPlan:
    return PendingPlan(
        row.id,
        row.table_name,
        PlanState(row.state),
        row.refusal,
        row.reason,
        row.source,
        row.row_count,
        row.table_rows,
        row.created_at,
        row.expires_at,
        row.decided_at,
        row.decided_by,
        row.note,
        row.superseded_by,
    )


def event_data(plan: PendingPlan, rows: list[ReviewedRow] | None = None, **extra: Any) -> dict[str, Any]:
    """A plan event's ``data``: the plan, and at most :data:`outbox.PLAN_ROWS_SHOWN` of its rows."""
    data = {"plan_id": plan.id, **plan.to_dict(), **extra}
    data.pop("id")
    if rows is not None:
        data["rows_shown"] = [r.to_dict() for r in rows[: outbox.PLAN_ROWS_SHOWN]]
    return data


def keep(
    engine: Engine,
    settings: Settings,
    plan: Plan,
    *,
    refusal: Refusal,
    reason: str,
    table_rows: int,
    source: str,
    now: datetime,
) -> tuple[int, bool]:
    """Keep a refused plan for review; returns its id and whether it is new.

    A pending plan with the same fingerprint is returned as it is.  Otherwise the new plan is
    stored, and the pending plans that share a row with it are superseded.
    """
    actions = plan.actions
    fingerprint = _fingerprint(actions)
    p, pr = store.pending, store.pending_rows
    with write_transaction(engine) as conn:
        events = outbox.Events(settings, now)
        _expire(conn, settings, now, events)
        same = conn.execute(
            sa.select(p.c.id).where(
                p.c.table_name == settings.table, p.c.state == PlanState.PENDING, p.c.fingerprint == fingerprint
            )
        ).scalar()
        if same is not None:
            events.write(conn)
            return int(same), False
        new_id = int(
            conn.execute(
                p.insert().values(
                    table_name=settings.table,
                    state=PlanState.PENDING,
                    refusal=str(refusal),
                    reason=reason[:4000],
                    source=source,
                    row_count=len(actions),
                    table_rows=table_rows,
                    fingerprint=fingerprint,
                    created_at=now,
                    expires_at=now + timedelta(hours=settings.pending_hours),
                )
            ).inserted_primary_key[0]  # type: ignore[index]
        )
        entries = [
            {
                "plan_id": new_id,
                "row_key": str(a.row.key),
                "vmid": a.row.vmid,
                "action": str(a.action),
                "reason": str(a.reason),
                "detail": a.detail,
                "observed": _encode_row(a.row),
            }
            for a in actions
        ]
        for part in chunks(entries, 1000):
            conn.execute(pr.insert(), list(part))
        keys = {e["row_key"] for e in entries}
        for older in _pending(conn, settings.table, exclude=new_id):
            theirs = set(conn.execute(sa.select(pr.c.row_key).where(pr.c.plan_id == older.id)).scalars())
            if theirs & keys:
                conn.execute(
                    p.update()
                    .where(p.c.id == older.id, p.c.state == PlanState.PENDING)
                    .values(state=PlanState.SUPERSEDED, superseded_by=new_id, decided_at=now)
                )
                events.add(
                    outbox.EventType.PLAN_SUPERSEDED,
                    outbox.plan_subject(older.id),
                    event_data(older, state=str(PlanState.SUPERSEDED), superseded_by=new_id),
                )
        created = _plan(conn.execute(sa.select(p).where(p.c.id == new_id)).one())
        events.add(
            outbox.EventType.PLAN_PENDING,
            outbox.plan_subject(new_id),
            event_data(created, [ReviewedRow(a.row, a.action, a.reason, a.detail) for a in actions]),
        )
        events.write(conn)
    return new_id, True


def _pending(conn: Connection, table_name: str, exclude: int | None = None) -> list[PendingPlan]:
    p = store.pending
    stmt = sa.select(p).where(p.c.table_name == table_name, p.c.state == PlanState.PENDING).order_by(p.c.id)
    if exclude is not None:
        stmt = stmt.where(p.c.id != exclude)
    return [_plan(r) for r in conn.execute(stmt)]


def _expire(conn: Connection, settings: Settings, now: datetime, events: outbox.Events) -> int:
    """Pending plans past their expiry become ``expired`` (with their event)."""
    p = store.pending
    gone = [
        _plan(r)
        for r in conn.execute(
            sa.select(p).where(p.c.table_name == settings.table, p.c.state == PlanState.PENDING, p.c.expires_at <= now)
        )
    ]
    for plan in gone:
        conn.execute(
            p.update()
            .where(p.c.id == plan.id, p.c.state == PlanState.PENDING)
            .values(state=PlanState.EXPIRED, decided_at=now)
        )
        events.add(outbox.EventType.PLAN_EXPIRED, outbox.plan_subject(plan.id), event_data(plan, state="expired"))
    return len(gone)


def expire(engine: Engine, settings: Settings, now: datetime) -> int:
    """Mark the plans past their expiry ``expired``; returns how many (the sweep's housekeeping)."""
    with write_transaction(engine) as conn:
        events = outbox.Events(settings, now)
        count = _expire(conn, settings, now, events)
        events.write(conn)
    return count


def _valid_id(plan_id: int) -> bool:
    return 0 < plan_id < 2**63


def get(conn: Connection, plan_id: int, table_name: str) -> PendingPlan:
    """The plan ``plan_id`` of ``table_name``, in whatever state; PlanNotFound when there is none.

    A plan of another table (a receiver for ``apps_staging`` beside one for ``apps``, on one
    database) is not found: its rows were reviewed against that table, not this one.
    """
    p = store.pending
    row = (
        conn.execute(
            sa.select(p).where(p.c.id == sa.literal(plan_id, sa.BigInteger), p.c.table_name == table_name)
        ).first()
        if _valid_id(plan_id)
        else None
    )
    if row is None:
        raise PlanNotFound(f"no pending plan {plan_id}")
    return _plan(row)


def reviewed_rows(conn: Connection, plan_id: int) -> list[ReviewedRow]:
    pr = store.pending_rows
    rows = conn.execute(sa.select(pr).where(pr.c.plan_id == plan_id).order_by(pr.c.row_key))
    return [ReviewedRow(_decode_row(r.observed), Verb(r.action), Reason(r.reason), r.detail or "") for r in rows]


def listing(conn: Connection, table_name: str, now: datetime, *, everything: bool = False) -> list[PendingPlan]:
    """Pending plans, newest first (``everything``: decided, expired and superseded ones too).

    A pending plan past its expiry is shown ``expired`` even before the housekeeping marks it.
    """
    p = store.pending
    stmt = sa.select(p).where(p.c.table_name == table_name).order_by(p.c.id.desc())
    if not everything:
        stmt = stmt.where(p.c.state == PlanState.PENDING, p.c.expires_at > now)
    plans = [_plan(r) for r in conn.execute(stmt.limit(500))]
    return [
        replace(plan, state=PlanState.EXPIRED) if plan.state is PlanState.PENDING and plan.expires_at <= now else plan
        for plan in plans
    ]


def count_open(conn: Connection, table_name: str, now: datetime) -> int:
    p = store.pending
    return int(
        conn.execute(
            sa.select(sa.func.count())
            .select_from(p)
            .where(p.c.table_name == table_name, p.c.state == PlanState.PENDING, p.c.expires_at > now)
        ).scalar_one()
    )


def decide(
    engine: Engine,
    settings: Settings,
    plan_id: int,
    state: PlanState,
    *,
    by: str,
    note: str,
    now: datetime,
    extra: dict[str, Any] | None = None,
) -> PendingPlan:
    """Record a decision on a pending plan, with its event; PlanClosed when it is no longer
    pending (another decision came first, or it expired or was superseded)."""
    p = store.pending
    kind = outbox.EventType.PLAN_APPROVED if state is PlanState.APPROVED else outbox.EventType.PLAN_REJECTED
    with write_transaction(engine) as conn:
        events = outbox.Events(settings, now)
        plan = get(conn, plan_id, settings.table)
        if plan.state is PlanState.PENDING and plan.expires_at <= now:
            _expire(conn, settings, now, events)
            events.write(conn)
            plan = get(conn, plan_id, settings.table)
        if plan.state is not PlanState.PENDING:
            closed = PlanClosed(plan.closed_because())
        else:
            conn.execute(
                p.update()
                .where(p.c.id == plan_id, p.c.state == PlanState.PENDING)
                .values(state=state, decided_at=now, decided_by=by, note=note[:4000])
            )
            decided = get(conn, plan_id, settings.table)
            events.add(kind, outbox.plan_subject(plan_id), event_data(decided, **(extra or {})))
            events.write(conn)
            return decided
    raise closed


def check_open(
    engine: Engine, settings: Settings, plan_id: int, now: datetime
) -> tuple[PendingPlan, list[ReviewedRow]]:
    """The plan and its reviewed rows, when it may still be decided; else PlanNotFound or PlanClosed."""
    with engine.connect() as conn:
        plan = get(conn, plan_id, settings.table)
        rows = reviewed_rows(conn, plan_id) if plan.state is PlanState.PENDING and plan.expires_at > now else []
    if plan.state is PlanState.PENDING and plan.expires_at <= now:
        expire(engine, settings, now)
        with engine.connect() as conn:
            plan = get(conn, plan_id, settings.table)
    if plan.state is not PlanState.PENDING:
        raise PlanClosed(plan.closed_because())
    return plan, rows


def prune(conn: Connection, now: datetime) -> int:
    """Drop plans decided, expired or superseded more than :data:`KEEP_DECIDED` ago, with their rows."""
    p, pr = store.pending, store.pending_rows
    old = list(
        conn.execute(
            sa.select(p.c.id).where(p.c.state != PlanState.PENDING, p.c.decided_at < now - KEEP_DECIDED)
        ).scalars()
    )
    for part in chunks(old, 500):
        conn.execute(pr.delete().where(pr.c.plan_id.in_(list(part))))
        conn.execute(p.delete().where(p.c.id.in_(list(part))))
    return len(old)
