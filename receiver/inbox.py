"""The durable event inbox: an accepted event is a committed row before the 202 goes out.

The unique ``event_id`` makes replays no-ops (the hookscript re-sends spooled
events; a load balancer may retry).  The watcher drains it; events left by a
crash are simply still unprocessed at the next start.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from . import store
from .table import write_transaction
from .timeutil import isoformat, utcnow

STOP_PHASES = frozenset({"pre-stop", "post-stop"})
START_PHASES = frozenset({"pre-start", "post-start"})
PHASES = STOP_PHASES | START_PHASES
KEEP_PROCESSED = timedelta(days=7)


@dataclass(frozen=True)
class Event:
    event_id: str
    vmid: int
    phase: str
    node: str
    ts: float


class Inbox:
    def __init__(self, engine: Engine):
        self.engine = engine

    def accept(self, event: Event, received_at: datetime | None = None) -> bool:
        """Store the event; False when this event_id was seen before (nothing done).

        A write transaction from the start: on SQLite a plain BEGIN would read first and
        then need the write lock, and SQLite answers "database is locked" at once, without
        waiting, when another writer (the watcher) holds it meanwhile.
        """
        t = store.inbox
        with write_transaction(self.engine) as conn:
            if conn.execute(sa.select(t.c.event_id).where(t.c.event_id == event.event_id)).first():
                return False
            try:
                with conn.begin_nested():
                    conn.execute(t.insert().values(
                        event_id=event.event_id, vmid=event.vmid, phase=event.phase, node=event.node,
                        ts=event.ts, received_at=received_at or utcnow()))
            except IntegrityError:
                return False  # the same event raced in through another request or receiver
        return True

    def pending(self, limit: int = 5000) -> list[Event]:
        t = store.inbox
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(t).where(t.c.processed_at.is_(None))
                                .order_by(t.c.ts, t.c.received_at).limit(limit)).mappings().all()
        return [Event(r["event_id"], int(r["vmid"]), r["phase"], r["node"], float(r["ts"])) for r in rows]

    def mark_processed(self, conn: sa.Connection, event_ids: list[str], now: datetime) -> None:
        t = store.inbox
        for start in range(0, len(event_ids), 500):
            conn.execute(t.update().where(t.c.event_id.in_(event_ids[start:start + 500]))
                         .values(processed_at=now))

    def forget_old(self, now: datetime | None = None) -> int:
        t = store.inbox
        cutoff = (now or utcnow()) - KEEP_PROCESSED
        with self.engine.begin() as conn:
            return conn.execute(t.delete().where(t.c.processed_at < cutoff)).rowcount

    def backlog(self) -> int:
        t = store.inbox
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(t)
                                .where(t.c.processed_at.is_(None))).scalar_one()

    def last_event_per_node(self) -> dict[str, Any]:
        t = store.inbox
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(t.c.node, sa.func.max(t.c.received_at)).group_by(t.c.node)).all()
        return {node: isoformat(store.UTCDateTime().process_result_value(at, None)) for node, at in rows}
