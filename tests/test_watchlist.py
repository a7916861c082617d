"""The watch list against a real database: watches made, extended, expired and forgotten."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from receiver import store, watchlist
from receiver.db import CHUNK, write_transaction
from receiver.model import Event
from receiver.timeutil import utcnow


@pytest.fixture
def engine(any_db):
    return any_db.engine


def rows(engine):
    with engine.connect() as conn:
        return watchlist.read(conn)


def test_a_new_watch_then_a_later_hint_extends_it(engine):
    now = utcnow().replace(microsecond=0)
    with write_transaction(engine) as conn:
        watches = watchlist.read(conn, [150])
        watchlist.upsert(conn, watches, 150, now, now + timedelta(minutes=10), watchlist.STOP_HINT)
    later = now + timedelta(minutes=3)
    with write_transaction(engine) as conn:
        watches = watchlist.read(conn, [150])
        watchlist.upsert(conn, watches, 150, later, later + timedelta(minutes=10), watchlist.TASK_HINT)
        assert watches[150]["until"] == later + timedelta(minutes=10)  # the caller's view kept up to date
    row = rows(engine)[150]
    assert (row["since"], row["until"], row["hint"]) == (now, later + timedelta(minutes=10), "task")


def test_watching_a_vmid_another_receiver_just_watched_is_not_an_error(engine):
    """Two leaders for a moment (fail-over) both drain the same stop event."""
    now = utcnow()
    earlier = now.replace(microsecond=0) - timedelta(minutes=1)
    with write_transaction(engine) as conn:
        conn.execute(store.watch.insert().values(vmid=179, since=earlier, until=now, hint="stop"))
    with write_transaction(engine) as conn:
        watchlist.upsert(conn, {}, 179, now, now + timedelta(minutes=10), "stop")  # stale view: not watched
    with engine.connect() as conn:
        row = conn.execute(sa.select(store.watch)).mappings().one()
    assert row["vmid"] == 179 and row["until"] > now and row["since"] == earlier  # extended, not made anew


def test_read_of_some_vmids_returns_only_theirs(engine):
    now = utcnow()
    with write_transaction(engine) as conn:
        watchlist.watch_all(conn, [101, 102, 103], now, now + timedelta(minutes=10), watchlist.TASK_HINT)
    with engine.connect() as conn:
        assert sorted(watchlist.read(conn, {102, 103, 999})) == [102, 103]
        assert sorted(watchlist.read(conn)) == [101, 102, 103]


def test_expired_watches_leave_the_list_and_the_stats(engine):
    now = utcnow()
    with write_transaction(engine) as conn:
        watchlist.watch_all(conn, [120, 121], now - timedelta(minutes=20), now - timedelta(minutes=10), "stop")
        watchlist.watch_all(conn, [122], now, now + timedelta(minutes=10), "stop")
    with engine.connect() as conn:
        assert watchlist.watched_vmids(conn, now) == [122]  # stats never count an expired watch
    assert sorted(rows(engine)) == [120, 121, 122]  # still stored until expired
    assert sorted(watchlist.current(engine, now)) == [122]
    assert sorted(rows(engine)) == [122]


def test_expire_keeps_a_watch_whose_deadline_is_now(engine):
    now = utcnow().replace(microsecond=0)  # MariaDB's DATETIME keeps whole seconds
    with write_transaction(engine) as conn:
        watchlist.watch_all(conn, [130], now - timedelta(minutes=1), now, "stop")
        watchlist.expire(conn, now)
    assert sorted(rows(engine)) == [130]


def test_forget_takes_off_only_the_given_vmids_even_more_than_one_batch(engine):
    now = utcnow()
    many = list(range(1000, 1000 + CHUNK + 20))
    with write_transaction(engine) as conn:
        watchlist.watch_all(conn, [*many, 140], now, now + timedelta(minutes=10), "task")
    with write_transaction(engine) as conn:
        watchlist.forget(conn, many)
    assert sorted(rows(engine)) == [140]


def event(n, vmid, phase):
    return Event(f"ev-{n}", vmid, phase, "pve1", float(n))


@pytest.mark.parametrize(
    "phases, watched, started",
    [
        (["pre-stop", "post-stop"], True, False),
        (["post-stop", "post-start"], False, True),  # a start after the stop: off the list, set back
        (["post-start", "post-stop"], True, False),  # a stop after the start: watched, nothing set back
        (["pre-start"], False, True),
    ],
)
def test_events_change_the_list_in_their_order(engine, phases, watched, started):
    now = utcnow()
    with write_transaction(engine) as conn:
        view, starts = watchlist.note_events(
            conn, [event(i, 160, p) for i, p in enumerate(phases)], now, now + timedelta(minutes=10)
        )
    assert (160 in view, 160 in starts) == (watched, started)
    assert (160 in rows(engine)) == watched


def test_a_start_event_forgets_a_watch_made_earlier(engine):
    now = utcnow()
    with write_transaction(engine) as conn:
        watchlist.watch_all(conn, [170, 171], now, now + timedelta(minutes=10), "task")
    with write_transaction(engine) as conn:
        view, starts = watchlist.note_events(conn, [event(1, 170, "post-start")], now, now + timedelta(minutes=10))
    assert view == {} and starts == {170}
    assert sorted(rows(engine)) == [171]
