"""``janitor_coverage`` (its only writer and cleaner), and what the inbox says of each node's events.

The cache holds, per guest, its config's digest and the hookscript it named when last read.  A
read whose digest is the one cached changes nothing but ``checked_at`` (the verdict stands); a
new digest, node or type replaces the row; a guest gone from the list loses it.  The inbox
(written by :mod:`receiver.inbox`, processed events kept 7 days) is only read here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from . import store
from .coverage import Cached
from .db import chunks, write_transaction
from .probe import Result

if TYPE_CHECKING:
    from .guestconfig import GuestConfig


def read_cache(conn: sa.Connection) -> dict[int, Cached]:
    t = store.coverage
    return {
        int(r.vmid): Cached(int(r.vmid), r.node, r.type, r.digest, r.hookscript, bool(r.has_hook), r.checked_at)
        for r in conn.execute(sa.select(t))
    }


def node_counts(conn: sa.Connection) -> dict[str, tuple[int, int]]:
    """node -> (guests cached, of them without pve-janitor's hookscript)."""
    t = store.coverage
    without = sa.func.sum(sa.case((t.c.has_hook == sa.false(), 1), else_=0))
    rows = conn.execute(sa.select(t.c.node, sa.func.count(), without).group_by(t.c.node))
    return {node: (int(n), int(w or 0)) for node, n, w in rows}


def oldest_check(conn: sa.Connection) -> datetime | None:
    """When the least recently read of the cached configs was read."""
    at = conn.execute(sa.select(sa.func.min(store.coverage.c.checked_at))).scalar()
    return store.UTCDateTime().process_result_value(at, None)


def event_counts(conn: sa.Connection) -> dict[str, dict[str, Any]]:
    """node -> {"last_event": received_at of its newest, "events": {phase: n}}, from the inbox
    (processed events are kept 7 days)."""
    t = store.inbox
    rows = conn.execute(
        sa.select(t.c.node, t.c.phase, sa.func.count(), sa.func.max(t.c.received_at)).group_by(t.c.node, t.c.phase)
    )
    found: dict[str, dict[str, Any]] = {}
    for node, phase, n, at in rows:
        entry = found.setdefault(node, {"last_event": None, "events": {}})
        entry["events"][phase] = int(n)
        received = store.UTCDateTime().process_result_value(at, None)
        if received is not None and (entry["last_event"] is None or received > entry["last_event"]):
            entry["last_event"] = received
    return found


def event_times(conn: sa.Connection, vmids: Collection[int], since: float) -> dict[int, list[float]]:
    t = store.inbox
    found: dict[int, list[float]] = {}
    for part in chunks(sorted(vmids)):
        for vmid, ts in conn.execute(sa.select(t.c.vmid, t.c.ts).where(t.c.vmid.in_(part), t.c.ts >= since)):
            found.setdefault(int(vmid), []).append(float(ts))
    return found


def hinted(conn: sa.Connection, cached: Mapping[int, Cached]) -> set[int]:
    """Guests cached without the hook that sent an event after their config was read."""
    t = store.inbox
    silent = sorted(v for v, c in cached.items() if not c.has_hook)
    found: set[int] = set()
    for part in chunks(silent):
        query = sa.select(t.c.vmid, sa.func.max(t.c.received_at)).where(t.c.vmid.in_(part)).group_by(t.c.vmid)
        for vmid, at in conn.execute(query):
            received = store.UTCDateTime().process_result_value(at, None)
            if received is not None and received > cached[int(vmid)].checked_at:
                found.add(int(vmid))
    return found


def write(engine: Engine, found: Sequence[GuestConfig], now: datetime) -> Counter[str]:
    """Configs read into the cache: the digest cached already, only ``checked_at``; another, the
    whole row; a guest gone meanwhile, its row dropped.  Once more on a key conflict (another
    process wrote the same guest between our read and our insert)."""
    for attempt in (1, 2):
        try:
            return _write_once(engine, found, now)
        except IntegrityError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _write_once(engine: Engine, found: Sequence[GuestConfig], now: datetime) -> Counter[str]:
    t = store.coverage
    counts: Counter[str] = Counter()
    present = [f for f in found if f.result is Result.PRESENT]
    gone = [f.vmid for f in found if f.result is Result.GONE]
    with write_transaction(engine) as conn:
        before = {
            int(r.vmid): (r.digest, r.node, r.type)
            for part in chunks(sorted({f.vmid for f in present}))
            for r in conn.execute(sa.select(t.c.vmid, t.c.digest, t.c.node, t.c.type).where(t.c.vmid.in_(part)))
        }
        same = [f for f in present if before.get(f.vmid) == (f.digest, f.node, f.type)]
        changed = [f for f in present if before.get(f.vmid) != (f.digest, f.node, f.type)]
        if same:
            touch = t.update().where(t.c.vmid == sa.bindparam("b_vmid")).values(checked_at=sa.bindparam("b_at"))
            conn.execute(touch, [{"b_vmid": f.vmid, "b_at": now} for f in same])
        for part in chunks(sorted({f.vmid for f in changed} | set(gone))):
            conn.execute(t.delete().where(t.c.vmid.in_(part)))
        if changed:
            rows = [
                {
                    "vmid": f.vmid,
                    "node": f.node,
                    "type": f.type,
                    "digest": f.digest,
                    "hookscript": f.hookscript,
                    "has_hook": f.has_hook,
                    "checked_at": now,
                }
                for f in changed
            ]
            conn.execute(t.insert(), rows)
    counts.update(unchanged=len(same), changed=len(changed), gone=len(gone))
    return counts


def forget(engine: Engine, vmids: Collection[int]) -> int:
    """Drop the cached configs of guests no longer listed."""
    t = store.coverage
    removed = 0
    with write_transaction(engine) as conn:
        for part in chunks(sorted(vmids)):
            removed += conn.execute(t.delete().where(t.c.vmid.in_(part))).rowcount
    return removed
