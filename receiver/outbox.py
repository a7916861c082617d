"""The webhook outbox: CloudEvents written in the transaction of the change they report.

Every removal, mark, restore, pending plan, decision on a plan and refusal is reported to
each URL in ``CLEANUP_WEBHOOK_URLS`` as a CloudEvents 1.0 event (structured mode, JSON).
The events are rows of ``janitor_outbox``, inserted by the transaction that makes the
change: a change that commits has its events, one that rolls back has none, and a crash
after the commit loses nothing (:mod:`receiver.webhooks` delivers them, at least once, in
order per target).  Without URLs nothing is written.

One outbox row holds up to :data:`CHUNK` events for one target, in order; a target is named
by a hash of its URL (a URL may carry a token, and is never stored).  This module is the
only one that writes ``janitor_outbox`` and the one that cleans it (:func:`prune`).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import msgspec
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import store
from .config import Settings, redact_webhook_url
from .model import Word
from .timeutil import utcnow

SPEC_VERSION = "1.0"
CHUNK = 500  # events per outbox row
KEEP_DELIVERED = timedelta(days=1)  # delivered rows stay this long, for `pve-janitor webhooks`
KEEP_ORPHANED = timedelta(days=7)  # rows for a URL no longer configured
PLAN_ROWS_SHOWN = 100  # a plan event names at most this many of its rows


class EventType(Word):
    """The ``type`` of each event pve-janitor sends (the suffix after ``pve-janitor.``)."""

    ROW_REMOVED = "pve-janitor.row.removed"
    ROW_MARKED = "pve-janitor.row.marked"
    ROW_RESTORED = "pve-janitor.row.restored"
    PLAN_PENDING = "pve-janitor.plan.pending"
    PLAN_APPROVED = "pve-janitor.plan.approved"
    PLAN_REJECTED = "pve-janitor.plan.rejected"
    PLAN_EXPIRED = "pve-janitor.plan.expired"
    PLAN_SUPERSEDED = "pve-janitor.plan.superseded"
    REMOVAL_REFUSED = "pve-janitor.removal.refused"


def target_id(url: str) -> str:
    """How the outbox names a URL: 16 hex digits of its SHA-256 (the URL itself may hold a token)."""
    return hashlib.sha256(url.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def source(settings: Settings) -> str:
    """The events' ``source``: this platform table, as one pve-janitor sees it."""
    return f"/pve-janitor/{settings.table}"


def jsonable(value: Any) -> Any:
    """A table value as JSON holds it: numbers, text, booleans and NULL as they are, anything
    else (a date, a decimal, bytes) as its text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def row_data(
    settings: Settings,
    values: Mapping[str, Any],
    *,
    key: Any,
    vmid: int | None,
    action: str,
    reason: str,
    detail: str,
    audit_id: int | None,
    source_word: str,
    plan_id: int | None = None,
) -> dict[str, Any]:
    """An event's ``data`` for one row: the mapped values (VMID, hostname, ports, status), why,
    and its audit entry; the whole row too with ``CLEANUP_WEBHOOK_FULL_ROW=true`` (it may
    hold credentials)."""
    data = {
        "table": settings.table,
        "row_key": jsonable(key),
        "vmid": vmid,
        "hostname": jsonable(values.get(settings.hostname_column)) if settings.hostname_column else None,
        "ports": {c: jsonable(values.get(c)) for c in settings.port_columns},
        "status": jsonable(values.get(settings.status_column)) if settings.status_column else None,
        "action": str(action),
        "reason": str(reason),
        "detail": detail,
        "audit_id": audit_id,
        "source": source_word,
        "plan_id": plan_id,
    }
    if settings.webhook_full_row:
        data["row"] = {name: store.encode_value(value) for name, value in values.items()}
    return data


class Events:
    """The events of one change, collected before they are written (:meth:`write`)."""

    def __init__(self, settings: Settings, now: datetime | None = None):
        self.settings = settings
        self.now = now or utcnow()
        self._items: list[tuple[EventType, str, dict[str, Any]]] = []

    def __len__(self) -> int:
        return len(self._items)

    @property
    def wanted(self) -> bool:
        """Whether anything is sent at all (callers skip building events when not)."""
        return bool(self.settings.webhook_urls)

    def add(self, kind: EventType, subject: str, data: dict[str, Any]) -> None:
        if self.wanted:
            self._items.append((kind, subject, data))

    def write(self, conn: Connection) -> int:
        """Insert the events, for every configured URL, in the caller's transaction; returns how many."""
        if not self._items or not self.wanted:
            return 0
        base = uuid.uuid4().hex
        stamp = self.now.isoformat().replace("+00:00", "Z")
        origin = source(self.settings)
        envelopes = [
            {
                "specversion": SPEC_VERSION,
                "id": f"{base}-{i}",
                "source": origin,
                "type": str(kind),
                "subject": subject,
                "time": stamp,
                "datacontenttype": "application/json",
                "data": data,
            }
            for i, (kind, subject, data) in enumerate(self._items)
        ]
        bodies = [
            (msgspec.json.encode(envelopes[start : start + CHUNK]).decode(), len(envelopes[start : start + CHUNK]))
            for start in range(0, len(envelopes), CHUNK)
        ]
        conn.execute(
            store.outbox.insert(),
            [
                {"target": target_id(url), "created_at": self.now, "events": body, "event_count": count}
                for url in self.settings.webhook_urls
                for body, count in bodies
            ],
        )
        written = len(self._items)
        self._items.clear()
        return written


def row_subject(settings: Settings, key: Any) -> str:
    """A row event's ``subject``: table and key (events of one subject arrive in order)."""
    return f"{settings.table}/{key}"


def plan_subject(plan_id: int) -> str:
    return f"pending/{plan_id}"


def backlog(conn: Connection, targets: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Per target: events not yet delivered, the oldest one's time, and the last error."""
    wanted = list(targets)
    o = store.outbox
    out: dict[str, dict[str, Any]] = {
        t: {"undelivered": 0, "oldest": None, "last_error": None, "last_error_at": None, "attempts": 0} for t in wanted
    }
    if not wanted:
        return out
    rows = conn.execute(
        sa.select(
            o.c.target,
            sa.func.sum(o.c.event_count - o.c.delivered),
            sa.func.min(o.c.created_at),
        )
        .where(o.c.done_at.is_(None), o.c.target.in_(wanted))
        .group_by(o.c.target)
    ).all()
    for target, undelivered, oldest in rows:
        out[target]["undelivered"] = int(undelivered or 0)
        out[target]["oldest"] = store.UTCDateTime().process_result_value(oldest, conn.dialect)
    heads = conn.execute(
        sa.select(o.c.target, o.c.last_error, o.c.last_error_at, o.c.attempts)
        .where(o.c.done_at.is_(None), o.c.target.in_(wanted), o.c.last_error.is_not(None))
        .order_by(o.c.id)
    ).all()
    for target, last_error, at, attempts in heads:
        if out[target]["last_error"] is None:
            out[target].update(last_error=last_error, last_error_at=at, attempts=int(attempts))
    return out


def orphaned(conn: Connection, targets: Sequence[str]) -> int:
    """Undelivered events of URLs no longer configured (kept :data:`KEEP_ORPHANED`, then pruned)."""
    o = store.outbox
    stmt = sa.select(sa.func.coalesce(sa.func.sum(o.c.event_count - o.c.delivered), 0)).where(o.c.done_at.is_(None))
    if targets:
        stmt = stmt.where(o.c.target.not_in(list(targets)))
    return int(conn.execute(stmt).scalar_one())


def prune(conn: Connection, targets: Sequence[str], now: datetime) -> int:
    """Drop delivered rows after :data:`KEEP_DELIVERED` and rows of URLs no longer configured
    after :data:`KEEP_ORPHANED`; returns how many rows went."""
    o = store.outbox
    gone = conn.execute(o.delete().where(o.c.done_at.is_not(None), o.c.done_at < now - KEEP_DELIVERED)).rowcount
    stale = o.c.created_at < now - KEEP_ORPHANED
    if targets:
        gone += conn.execute(o.delete().where(o.c.target.not_in(list(targets)), stale)).rowcount
    else:
        gone += conn.execute(o.delete().where(stale)).rowcount
    return gone


# --- read side: what the deliverer, the stats, /metrics and `pve-janitor webhooks` ask ----------


def target_labels(urls: Sequence[str]) -> dict[str, str]:
    """Target id -> the URL as logs, metrics and answers show it (no credentials, no query).

    Two URLs that show the same (the same path with another token in the query) get their
    target id's first 8 hex digits after them, so that each has its own metric series."""
    shown = {target_id(url): redact_webhook_url(url) for url in urls}
    repeated = {label for label in shown.values() if list(shown.values()).count(label) > 1}
    return {t: f"{label} [{t[:8]}]" if label in repeated else label for t, label in shown.items()}


@dataclass(frozen=True)
class Head:
    """The oldest outbox row of a target with events not yet delivered."""

    id: int
    events: list[dict[str, Any]]  # all of the row's events; the next one to send is events[delivered]
    delivered: int
    attempts: int

    @property
    def count(self) -> int:
        return len(self.events)


def head(conn: Connection, target: str) -> Head | None:
    """The target's first row not done, by id (the order the changes were written in)."""
    o = store.outbox
    row = conn.execute(
        sa.select(o.c.id, o.c.events, o.c.event_count, o.c.delivered, o.c.attempts)
        .where(o.c.target == target, o.c.done_at.is_(None))
        .order_by(o.c.id)
        .limit(1)
    ).first()
    if row is None:
        return None
    events = msgspec.json.decode(row.events)
    return Head(int(row.id), list(events[: int(row.event_count)]), int(row.delivered), int(row.attempts))


def summary(conn: Connection, urls: Sequence[str]) -> dict[str, Any]:
    """The backlog per configured URL (as shown), in the order configured, and the events of
    URLs no longer configured: for the stats, ``/metrics`` and ``pve-janitor webhooks``."""
    labels = target_labels(urls)
    found = backlog(conn, labels)
    targets = [{"url": labels[t], "target": t, **found[t]} for t in labels]
    return {
        "urls": len(urls),
        "backlog": sum(t["undelivered"] for t in targets),
        "targets": targets,
        "orphaned": orphaned(conn, list(labels)),
    }
