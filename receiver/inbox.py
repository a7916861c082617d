"""The durable event inbox: an accepted event is a committed row before the 202 goes out.

The unique ``event_id`` makes replays no-ops (the hookscript re-sends spooled
events; a load balancer may retry).  The watcher drains it; events left by a
crash are simply still unprocessed at the next start.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from . import store
from .db import chunks, write_transaction
from .model import Event
from .timeutil import isoformat, utcnow

KEEP_PROCESSED = timedelta(days=7)


@dataclass
class _Waiting:
    """One accept() call waiting for the transaction that stores its event."""

    event: Event
    received_at: datetime
    new: bool | None = None  # set once committed: True stored now, False stored before
    error: Exception | None = None
    done: bool = False


class Inbox:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._cond = threading.Condition()
        self._queue: list[_Waiting] = []
        self._committing = False

    def accept(self, event: Event, received_at: datetime | None = None) -> bool:
        """Store the event; False when this event_id was seen before (nothing done).

        Returns only once the event is committed.  Group commit: events that arrive while a
        transaction is committing wait, and whichever of their callers gets there first
        stores them together in the next one.  One transaction (one fsync) per event capped
        a burst at about 300 events a second, every request queued on the write lock.
        A write transaction from the start: on SQLite a plain BEGIN would read first and
        then need the write lock, and SQLite answers "database is locked" at once, without
        waiting, when another writer (the watcher) holds it meanwhile.
        """
        me = _Waiting(event, received_at or utcnow())
        with self._cond:
            self._queue.append(me)
            while self._committing and not me.done:
                self._cond.wait()
            batch: list[_Waiting] = []
            if not me.done:
                self._committing = True
                batch, self._queue = self._queue, []
        if batch:
            try:
                self._store(batch)
            finally:
                with self._cond:
                    for waiting in batch:
                        if waiting.new is None and waiting.error is None:
                            waiting.error = RuntimeError("the event was not stored")
                        waiting.done = True
                    self._committing = False
                    self._cond.notify_all()
        if me.error is not None:
            raise me.error
        return bool(me.new)

    def _store(self, batch: list[_Waiting]) -> None:
        try:
            self._insert_new(batch)
        except IntegrityError:
            # Another receiver stored one of these meanwhile and the batch was rolled back:
            # one at a time, so that only that one counts as seen before.
            for waiting in batch:
                try:
                    self._insert_new([waiting])
                except IntegrityError:
                    waiting.new = False
                except Exception as exc:  # noqa: BLE001 - handed to its caller, who answers 503
                    waiting.error = exc
        except Exception as exc:  # noqa: BLE001 - handed to every caller, who answers 503
            for waiting in batch:
                waiting.error = exc

    def _insert_new(self, batch: list[_Waiting]) -> None:
        t = store.inbox
        new: dict[int, bool] = {}
        with write_transaction(self.engine) as conn:
            seen: set[str] = set()
            for part in chunks(sorted({w.event.event_id for w in batch})):
                seen.update(conn.execute(sa.select(t.c.event_id).where(t.c.event_id.in_(part))).scalars())
            rows = []
            for i, waiting in enumerate(batch):
                e = waiting.event
                new[i] = e.event_id not in seen
                if new[i]:
                    seen.add(e.event_id)
                    rows.append(
                        {
                            "event_id": e.event_id,
                            "vmid": e.vmid,
                            "phase": e.phase,
                            "node": e.node,
                            "ts": e.ts,
                            "received_at": waiting.received_at,
                        }
                    )
            if rows:
                conn.execute(t.insert(), rows)
        for i, waiting in enumerate(batch):  # committed
            waiting.new = new[i]

    def pending(self, limit: int = 5000) -> list[Event]:
        t = store.inbox
        with self.engine.connect() as conn:
            rows = (
                conn.execute(
                    sa.select(t).where(t.c.processed_at.is_(None)).order_by(t.c.ts, t.c.received_at).limit(limit)
                )
                .mappings()
                .all()
            )
        return [Event(r["event_id"], int(r["vmid"]), r["phase"], r["node"], float(r["ts"])) for r in rows]

    def mark_processed(self, conn: sa.Connection, event_ids: list[str], now: datetime) -> None:
        t = store.inbox
        for start in range(0, len(event_ids), 500):
            conn.execute(t.update().where(t.c.event_id.in_(event_ids[start : start + 500])).values(processed_at=now))

    def forget_old(self, now: datetime | None = None) -> int:
        t = store.inbox
        cutoff = (now or utcnow()) - KEEP_PROCESSED
        with self.engine.begin() as conn:
            return conn.execute(t.delete().where(t.c.processed_at < cutoff)).rowcount

    def backlog(self) -> int:
        t = store.inbox
        with self.engine.connect() as conn:
            return conn.execute(
                sa.select(sa.func.count()).select_from(t).where(t.c.processed_at.is_(None))
            ).scalar_one()

    def last_event_per_node(self) -> dict[str, Any]:
        t = store.inbox
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(t.c.node, sa.func.max(t.c.received_at)).group_by(t.c.node)).all()
        return {node: isoformat(store.UTCDateTime().process_result_value(at, None)) for node, at in rows}
