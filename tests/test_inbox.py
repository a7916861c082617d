"""The durable event inbox (receiver/inbox.py): stored before the answer, replays are no-ops."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from receiver import schema, store
from receiver.db import make_engine
from receiver.inbox import KEEP_PROCESSED, Inbox
from receiver.model import Event

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def db(any_db):
    return any_db


def event(
    event_id: str, vmid: int = 101, phase: str = "post-stop", node: str = "pve1", ts: float = 1_714_564_800.25
) -> Event:
    return Event(event_id, vmid, phase, node, ts)


def stored(engine) -> dict[str, dict]:
    with engine.connect() as conn:
        return {r["event_id"]: dict(r) for r in conn.execute(sa.select(store.inbox)).mappings()}


def race(calls) -> list:
    """Run the calls from threads of their own, let go at the same moment; their results in order."""
    start = threading.Barrier(len(calls))
    results: list = [None] * len(calls)

    def run(i, call):
        start.wait()
        results[i] = call()

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_an_accepted_event_is_committed_before_accept_returns(db):
    e = event("e-1", vmid=123456789, ts=1_714_564_800.123456)
    assert Inbox(db.engine).accept(e, received_at=T0) is True
    other = make_engine(db.url)  # another connection pool: sees only what is committed
    try:
        [row] = stored(other).values()
    finally:
        other.dispose()
    assert (row["event_id"], row["vmid"], row["phase"], row["node"]) == ("e-1", 123456789, "post-stop", "pve1")
    assert row["ts"] == 1_714_564_800.123456  # a double, not a rounded float
    assert row["received_at"] == T0
    assert row["processed_at"] is None


def test_a_replayed_event_id_is_a_no_op(db):
    inbox = Inbox(db.engine)
    assert inbox.accept(event("e-1", vmid=101), received_at=T0)
    assert inbox.accept(event("e-1", vmid=999), received_at=T0 + timedelta(minutes=1)) is False
    [row] = stored(db.engine).values()
    assert (row["vmid"], row["received_at"]) == (101, T0)
    assert inbox.backlog() == 1


def test_a_replay_of_a_processed_event_is_not_processed_again(db):
    inbox = Inbox(db.engine)
    inbox.accept(event("e-1"))
    with db.engine.begin() as conn:
        inbox.mark_processed(conn, ["e-1"], T0)
    assert inbox.accept(event("e-1")) is False
    assert inbox.pending() == []


def test_pending_is_oldest_first_and_limited(db):
    inbox = Inbox(db.engine)
    inbox.accept(event("late", ts=300.0), received_at=T0)
    inbox.accept(event("tie-received-second", ts=100.0), received_at=T0 + timedelta(seconds=2))
    inbox.accept(event("tie-received-first", ts=100.0), received_at=T0 + timedelta(seconds=1))
    inbox.accept(event("early", ts=50.5), received_at=T0 + timedelta(seconds=3))
    assert [e.event_id for e in inbox.pending()] == ["early", "tie-received-first", "tie-received-second", "late"]
    assert [e.event_id for e in inbox.pending(limit=2)] == ["early", "tie-received-first"]
    first = inbox.pending()[0]
    assert first == Event("early", 101, "post-stop", "pve1", 50.5)
    assert isinstance(first.vmid, int) and isinstance(first.ts, float)


def test_mark_processed_takes_events_out_of_pending_and_the_backlog(db):
    inbox = Inbox(db.engine)
    ids = [f"e-{i:04d}" for i in range(1203)]  # more than one UPDATE's worth of keys
    with db.engine.begin() as conn:  # accepted earlier, as accept() stores them
        conn.execute(
            store.inbox.insert(),
            [
                {
                    "event_id": event_id,
                    "vmid": 101,
                    "phase": "post-stop",
                    "node": "pve1",
                    "ts": float(i),
                    "received_at": T0,
                }
                for i, event_id in enumerate(ids)
            ],
        )
    keep = {"e-0000", "e-0600", "e-1202"}
    with db.engine.begin() as conn:
        inbox.mark_processed(conn, [i for i in ids if i not in keep], T0)
    assert [e.event_id for e in inbox.pending()] == sorted(keep)
    assert inbox.backlog() == 3
    rows = stored(db.engine)
    assert rows["e-0001"]["processed_at"] == T0
    assert rows["e-0600"]["processed_at"] is None


def test_mark_processed_is_part_of_the_caller_s_transaction(db):
    inbox = Inbox(db.engine)
    inbox.accept(event("e-1"))
    with pytest.raises(RuntimeError), db.engine.begin() as conn:
        inbox.mark_processed(conn, ["e-1"], T0)
        raise RuntimeError("the removal failed")
    assert [e.event_id for e in inbox.pending()] == ["e-1"]


def test_forget_old_deletes_only_events_processed_long_ago(db):
    inbox = Inbox(db.engine)
    now = T0 + timedelta(days=30)
    for event_id in ("old-processed", "recent-processed", "old-pending"):
        inbox.accept(event(event_id), received_at=T0)
    with db.engine.begin() as conn:
        inbox.mark_processed(conn, ["old-processed"], now - KEEP_PROCESSED - timedelta(minutes=1))
        inbox.mark_processed(conn, ["recent-processed"], now - KEEP_PROCESSED + timedelta(minutes=1))
    assert inbox.forget_old(now) == 1
    assert sorted(stored(db.engine)) == ["old-pending", "recent-processed"]
    assert inbox.forget_old(now) == 0


def test_backlog_counts_unprocessed_events(db):
    inbox = Inbox(db.engine)
    assert inbox.backlog() == 0
    for i in range(3):
        inbox.accept(event(f"e-{i}"))
    assert inbox.backlog() == 3
    with db.engine.begin() as conn:
        inbox.mark_processed(conn, ["e-1"], T0)
    assert inbox.backlog() == 2


def test_last_event_per_node_is_the_latest_receipt_in_utc(db):
    inbox = Inbox(db.engine)
    assert inbox.last_event_per_node() == {}
    inbox.accept(event("a", node="pve1"), received_at=T0)
    inbox.accept(event("b", node="pve1"), received_at=T0 + timedelta(minutes=5))
    inbox.accept(event("c", node="pve1"), received_at=T0 + timedelta(minutes=2))
    inbox.accept(event("d", node="pve2"), received_at=T0.astimezone(timezone(timedelta(hours=2))))
    assert inbox.last_event_per_node() == {
        "pve1": "2024-05-01T12:05:00+00:00",
        "pve2": "2024-05-01T12:00:00+00:00",
    }


def test_concurrent_accepts_of_one_event_id_store_it_once(db):
    inbox = Inbox(db.engine)
    results = race([lambda: inbox.accept(event("same"))] * 12)
    assert sorted(results) == [False] * 11 + [True]
    assert list(stored(db.engine)) == ["same"]


def test_two_receivers_accepting_one_event_id_store_it_once(db):
    other = make_engine(db.url)
    try:
        mine, theirs = Inbox(db.engine), Inbox(other)
        for i in range(5):
            results = race([lambda inbox=inbox, i=i: inbox.accept(event(f"e-{i}")) for inbox in (mine, theirs)])
            assert sorted(results) == [False, True]
    finally:
        other.dispose()
    assert sorted(stored(db.engine)) == [f"e-{i}" for i in range(5)]


def test_a_burst_of_new_and_replayed_events_answers_each_caller_for_its_own(db):
    inbox = Inbox(db.engine)
    ids = [f"e-{i % 10}" for i in range(40)]  # each id four times
    results = race([lambda event_id=event_id: inbox.accept(event(event_id)) for event_id in ids])
    new = [event_id for event_id, is_new in zip(ids, results, strict=True) if is_new]
    assert sorted(new) == sorted(set(ids))
    assert sorted(stored(db.engine)) == sorted(set(ids))


def test_a_database_error_reaches_the_caller_and_the_inbox_recovers(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'janitor.db'}")
    try:
        inbox = Inbox(engine)
        with pytest.raises(SQLAlchemyError):
            inbox.accept(event("e-1"))  # no janitor_inbox table yet
        schema.upgrade(engine)
        assert inbox.accept(event("e-1")) is True
        assert inbox.backlog() == 1
    finally:
        engine.dispose()
