"""Pending plans (receiver/pending.py): a removal refused by a rule ``--force`` lifts is kept for
review, once, with what it saw; a newer review of the same rows supersedes it; it expires.

Against the simulator over HTTPS and real databases (SQLite always; PostgreSQL and MariaDB
where the database decides: the same plan found again, supersede, expiry, listing).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import Database, janitor_env, running_apps, table_vmids

from receiver import approval, pending, store
from receiver.config import Settings, load_settings
from receiver.inbox import Inbox
from receiver.model import Action, Event, Outcome, Plan, Reason, Refusal, Row, Verb
from receiver.pending import PlanClosed, PlanNotFound, PlanState
from receiver.runtime import Runtime
from receiver.simulator.scene import app_row, create_apps_table
from receiver.timeutil import utcnow
from receiver.watcher import Watcher

RUNNING = tuple(range(100, 104))  # guests exist, day-old rows
GHOSTS = tuple(range(200, 212))  # 12 rows whose guests are gone: 12 of 16 trips the 50 % guard


class Clock:
    """The runtime's one clock, pinned (whole seconds: MariaDB keeps no fraction)."""

    def __init__(self) -> None:
        self.now = utcnow().replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now


def clocked_runtime(sim: Any, db: Database, clock: Clock, **overrides: Any) -> Runtime:
    settings = load_settings(env=janitor_env(sim, db), overrides=overrides)
    return Runtime.build(settings, engine=db.engine, upgrade=True, clock=clock)


def guard_world(sim: Any, db: Database, ghosts: Iterable[int] = GHOSTS) -> sa.Table:
    """Guests 100-103 running with their rows, and day-old rows of 12 guests that are gone."""
    table = running_apps(sim, db, vmids=RUNNING)
    rows = [app_row(v, "running", age=timedelta(days=1)) for v in ghosts]
    if rows:
        with db.engine.begin() as conn:
            conn.execute(table.insert(), rows)
    return table


def empty_world(sim: Any, db: Database) -> sa.Table:
    """Three day-old rows, no guest of theirs; one guest with no row (so the list is not empty)."""
    table = create_apps_table(db.engine)
    with db.engine.begin() as conn:
        conn.execute(table.insert(), [app_row(v, "running", age=timedelta(days=1)) for v in (300, 301, 302)])
    sim.add_guest(999, name="unmanaged")
    return table


def plans(db: Database) -> list[dict[str, Any]]:
    with db.engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(store.pending).order_by(store.pending.c.id)).mappings()]


def plan_rows(db: Database) -> int:
    with db.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(store.pending_rows)).scalar_one())


def get(db: Database, plan_id: int) -> pending.PendingPlan:
    with db.engine.connect() as conn:
        return pending.get(conn, plan_id, "apps")


def reviewed(db: Database, plan_id: int) -> dict[str, pending.ReviewedRow]:
    with db.engine.connect() as conn:
        return {str(r.row.key): r for r in pending.reviewed_rows(conn, plan_id)}


def rows_of(runtime: Runtime, vmids: Iterable[int]) -> dict[str, Row]:
    wanted = set(vmids)
    return {str(r.key): r for r in runtime.table.fetch_rows() if r.vmid in wanted}


# --- a refused removal keeps its plan --------------------------------------------------------


@pytest.mark.parametrize("hours", [24, 3])
def test_a_tripped_guard_keeps_the_plan_with_what_it_saw(sim, any_db, hours):
    guard_world(sim, any_db)
    clock = Clock()
    runtime = clocked_runtime(sim, any_db, clock, CLEANUP_PENDING_HOURS=hours)
    result = runtime.sweeper.run()
    assert result.outcome == Outcome.REFUSED and result.refusal == Refusal.GUARD, result.summary()
    assert result.pending_id is not None and result.exit_code == 3
    assert result.to_dict()["pending_plan"] == result.pending_id
    assert f"kept as pending plan {result.pending_id}" in result.summary()
    assert table_vmids(any_db) == [*RUNNING, *GHOSTS]  # refused: nothing changed

    plan = get(any_db, result.pending_id)
    assert plan.state is PlanState.PENDING
    assert (plan.refusal, plan.reason, plan.source) == ("guard", result.reason, "sweep")
    assert "12 of 16 rows would go" in plan.reason
    assert (plan.row_count, plan.table_rows, plan.table) == (12, 16, "apps")
    assert plan.created_at == clock.now
    assert plan.expires_at == clock.now + timedelta(hours=hours)
    assert (plan.decided_at, plan.decided_by, plan.note, plan.superseded_by) == (None, None, None, None)

    kept = reviewed(any_db, result.pending_id)
    assert {key: r.row for key, r in kept.items()} == rows_of(runtime, GHOSTS)  # every observed value
    assert {(r.action, r.reason) for r in kept.values()} == {(Verb.DELETE, Reason.GHOST)}
    assert all(f"guest {r.row.vmid} does not exist" in r.detail for r in kept.values())
    shown = next(iter(kept.values())).to_dict()
    assert set(shown) == {"row_key", "vmid", "hostname", "status", "action", "reason", "detail"}


def test_a_plan_that_would_empty_the_table_is_kept(sim, any_db):
    empty_world(sim, any_db)
    clock = Clock()
    runtime = clocked_runtime(sim, any_db, clock)
    result = runtime.sweeper.run()
    assert result.outcome == Outcome.REFUSED and result.refusal == Refusal.WOULD_EMPTY, result.summary()
    assert result.pending_id is not None
    plan = get(any_db, result.pending_id)
    assert (plan.refusal, plan.row_count, plan.table_rows, plan.state) == ("would_empty", 3, 3, PlanState.PENDING)
    assert plan.expires_at == clock.now + timedelta(hours=24)
    assert sorted(r.row.key for r in reviewed(any_db, result.pending_id).values()) == [1, 2, 3]
    assert {r.row.vmid for r in reviewed(any_db, result.pending_id).values()} == {300, 301, 302}
    assert table_vmids(any_db) == [300, 301, 302]


@pytest.mark.parametrize("how", ["--dry-run", "CLEANUP_DRY_RUN"])
def test_a_dry_run_keeps_no_plan(sim, sqlite_db, how):
    guard_world(sim, sqlite_db)
    if how == "CLEANUP_DRY_RUN":
        runtime = clocked_runtime(sim, sqlite_db, Clock(), CLEANUP_DRY_RUN="true")
        result = runtime.sweeper.run()
    else:
        runtime = clocked_runtime(sim, sqlite_db, Clock())
        result = runtime.sweeper.run(dry_run=True)
    assert result.refusal == Refusal.GUARD and result.pending_id is None, result.summary()
    assert plans(sqlite_db) == [] and plan_rows(sqlite_db) == 0


@pytest.mark.parametrize(
    ("refusal_world", "refusal"), [(guard_world, Refusal.GUARD), (empty_world, Refusal.WOULD_EMPTY)]
)
def test_a_forced_sweep_keeps_no_plan_and_removes(sim, sqlite_db, refusal_world, refusal):
    refusal_world(sim, sqlite_db)
    runtime = clocked_runtime(sim, sqlite_db, Clock())
    result = runtime.sweeper.run(force=True)
    assert result.outcome == Outcome.DONE and result.pending_id is None, result.summary()
    assert plans(sqlite_db) == []


def test_a_refusal_force_does_not_lift_keeps_no_plan(sim, sqlite_db):
    guard_world(sim, sqlite_db)
    runtime = clocked_runtime(sim, sqlite_db, Clock())
    sim.set_quorate(False)
    result = runtime.sweeper.run()
    assert result.refusal == Refusal.NO_QUORUM and result.pending_id is None, result.summary()
    assert plans(sqlite_db) == []


def test_the_same_situation_again_is_the_same_plan(sim, any_db):
    guard_world(sim, any_db)
    clock = Clock()
    runtime = clocked_runtime(sim, any_db, clock)
    first = runtime.sweeper.run()
    clock.now += timedelta(hours=1)  # later, the same rows with the same values: the same review
    second = runtime.sweeper.run(source="manual")
    assert first.pending_id is not None and second.pending_id == first.pending_id
    assert len(plans(any_db)) == 1 and plan_rows(any_db) == 12
    plan = get(any_db, first.pending_id)
    assert (plan.state, plan.source, plan.created_at) == (PlanState.PENDING, "sweep", clock.now - timedelta(hours=1))


@pytest.mark.parametrize("change", ["row_touched", "row_added"])
def test_a_newer_plan_sharing_rows_supersedes_the_older(sim, any_db, change):
    table = guard_world(sim, any_db)
    clock = Clock()
    runtime = clocked_runtime(sim, any_db, clock)
    older = runtime.sweeper.run().pending_id
    with any_db.engine.begin() as conn:
        if change == "row_touched":  # still a day-old ghost, but not the row that was reviewed
            stamp = (utcnow() - timedelta(hours=20)).replace(tzinfo=None, microsecond=0)
            conn.execute(table.update().where(table.c.lxc_id == 200).values(updated_at=stamp))
        else:
            conn.execute(table.insert(), [app_row(212, "running", age=timedelta(days=1))])
    clock.now += timedelta(minutes=5)
    newer = runtime.sweeper.run().pending_id
    assert older is not None and newer is not None and newer != older
    old_plan, new_plan = get(any_db, older), get(any_db, newer)
    assert old_plan.state is PlanState.SUPERSEDED and old_plan.superseded_by == newer
    assert old_plan.decided_at == clock.now
    assert old_plan.closed_because() == f"pending plan {older} was superseded by plan {newer}"
    assert new_plan.state is PlanState.PENDING and new_plan.row_count == (12 if change == "row_touched" else 13)
    with any_db.engine.connect() as conn:
        assert [p.id for p in pending.listing(conn, "apps", clock.now)] == [newer]
        assert [p.id for p in pending.listing(conn, "apps", clock.now, everything=True)] == [newer, older]
        assert pending.count_open(conn, "apps", clock.now) == 1
    with pytest.raises(PlanClosed, match="superseded by plan"):
        approval.approve(runtime.sweeper, older, by="cli")
    assert len(table_vmids(any_db)) == 16 + (change == "row_added")


def _hand_plan(keys_and_vmids: Iterable[tuple[int, int]]) -> Plan:
    rows = [Row(key, vmid, f"h{key}", "running", None, None, vmid, "running") for key, vmid in keys_and_vmids]
    return Plan(tuple(Action(r, Verb.DELETE, Reason.GHOST, "gone") for r in rows), (), len(rows))


def _keep(db: Database, settings: Settings, pairs: Iterable[tuple[int, int]], now: datetime) -> int:
    kept, _ = pending.keep(
        db.engine,
        settings,
        _hand_plan(pairs),
        refusal=Refusal.GUARD,
        reason="r",
        table_rows=40,
        source="sweep",
        now=now,
    )
    return kept


def test_plans_that_share_no_row_stay_pending_side_by_side(any_db):
    settings = load_settings(env={"DATABASE_URL": any_db.url})
    now = utcnow().replace(microsecond=0)

    def keep(pairs):
        return pending.keep(
            any_db.engine,
            settings,
            _hand_plan(pairs),
            refusal=Refusal.GUARD,
            reason="r",
            table_rows=40,
            source="sweep",
            now=now,
        )

    a, new_a = keep([(1, 201), (2, 202)])
    b, new_b = keep([(3, 203)])
    again, new_again = keep([(2, 202), (1, 201)])
    assert new_a and new_b and not new_again and again == a and b != a
    with any_db.engine.connect() as conn:
        assert [p.id for p in pending.listing(conn, "apps", now)] == [b, a]
        assert pending.count_open(conn, "apps", now) == 2
        assert pending.count_open(conn, "other_table", now) == 0
    c, _ = keep([(3, 203), (4, 204)])
    assert [(p["id"], p["state"], p["superseded_by"]) for p in plans(any_db)] == [
        (a, "pending", None),
        (b, "superseded", c),
        (c, "pending", None),
    ]


# --- expiry ------------------------------------------------------------------------------------


def test_an_expired_plan_cannot_be_approved_or_rejected(sim, any_db):
    guard_world(sim, any_db)
    clock = Clock()
    runtime = clocked_runtime(sim, any_db, clock, CLEANUP_PENDING_HOURS=2)
    plan_id = runtime.sweeper.run().pending_id
    assert plan_id is not None
    expires = clock.now + timedelta(hours=2)
    clock.now = expires + timedelta(seconds=1)
    with any_db.engine.connect() as conn:  # shown expired before any housekeeping marks it so
        assert pending.listing(conn, "apps", clock.now) == []
        assert [p.state for p in pending.listing(conn, "apps", clock.now, everything=True)] == [PlanState.EXPIRED]
        assert pending.count_open(conn, "apps", clock.now) == 0
        assert pending.get(conn, plan_id, "apps").state is PlanState.PENDING
    with pytest.raises(PlanClosed, match=f"pending plan {plan_id} expired at"):
        approval.approve(runtime.sweeper, plan_id, by="cli")
    with pytest.raises(PlanClosed, match="expired"):
        approval.reject(runtime.sweeper, plan_id, by="cli")
    plan = get(any_db, plan_id)
    assert plan.state is PlanState.EXPIRED and plan.decided_at == clock.now and plan.decided_by is None
    assert table_vmids(any_db) == [*RUNNING, *GHOSTS]
    with any_db.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(store.audit)).scalar_one() == 0


def test_the_plan_is_open_until_its_expiry_and_then_a_new_one_is_kept(sim, any_db):
    guard_world(sim, any_db)
    clock = Clock()
    runtime = clocked_runtime(sim, any_db, clock, CLEANUP_PENDING_HOURS=1)
    first = runtime.sweeper.run().pending_id
    clock.now += timedelta(minutes=59)
    assert runtime.sweeper.run().pending_id == first  # still open: the same plan
    clock.now += timedelta(minutes=2)
    second = runtime.sweeper.run().pending_id  # the old one expired first: a new review
    assert first is not None and second is not None and second != first
    assert get(any_db, first).state is PlanState.EXPIRED
    assert get(any_db, second).state is PlanState.PENDING


def test_expire_marks_only_plans_past_their_time(sqlite_db):
    settings = load_settings(env={"DATABASE_URL": sqlite_db.url}, overrides={"CLEANUP_PENDING_HOURS": 1})
    now = utcnow().replace(microsecond=0)
    early = _keep(sqlite_db, settings, [(1, 201)], now)
    late = _keep(sqlite_db, settings, [(2, 202)], now + timedelta(minutes=30))
    assert pending.expire(sqlite_db.engine, settings, now + timedelta(minutes=59)) == 0
    assert pending.expire(sqlite_db.engine, settings, now + timedelta(hours=1)) == 1
    assert [p["state"] for p in plans(sqlite_db)] == ["expired", "pending"]
    assert pending.expire(sqlite_db.engine, settings, now + timedelta(hours=1)) == 0
    assert (early, late) == (1, 2)


def test_prune_drops_plans_decided_long_ago_with_their_rows(sqlite_db):
    settings = load_settings(env={"DATABASE_URL": sqlite_db.url})
    now = utcnow().replace(microsecond=0)
    old = _keep(sqlite_db, settings, [(1, 201), (2, 202)], now)
    pending.decide(sqlite_db.engine, settings, old, PlanState.REJECTED, by="cli", note="no", now=now)
    fresh = _keep(sqlite_db, settings, [(3, 203)], now)
    with sqlite_db.engine.begin() as conn:
        assert pending.prune(conn, now + timedelta(days=29)) == 0
        assert pending.prune(conn, now + timedelta(days=31)) == 1
    assert [p["id"] for p in plans(sqlite_db)] == [fresh]  # the open one stays, however old
    assert plan_rows(sqlite_db) == 1


# --- reading plans -----------------------------------------------------------------------------


@pytest.mark.parametrize("plan_id", [0, -1, 999, 2**31, 2**63 - 1, 2**63, 10**20])
def test_get_of_an_unknown_or_impossible_id_is_not_found(any_db, plan_id):
    with any_db.engine.connect() as conn, pytest.raises(PlanNotFound, match=f"no pending plan {plan_id}"):
        pending.get(conn, plan_id, "apps")


def test_plans_are_listed_newest_first_and_counted_per_table(sqlite_db):
    settings = load_settings(env={"DATABASE_URL": sqlite_db.url})
    other = load_settings(env={"DATABASE_URL": sqlite_db.url}, overrides={"CLEANUP_TABLE": "other"})
    now = utcnow().replace(microsecond=0)
    a = _keep(sqlite_db, settings, [(1, 201)], now)
    b = _keep(sqlite_db, settings, [(2, 202)], now)
    x = _keep(sqlite_db, other, [(1, 201)], now)  # another table: it supersedes nothing here
    pending.decide(sqlite_db.engine, settings, a, PlanState.REJECTED, by="cli", note="no", now=now)
    with sqlite_db.engine.connect() as conn:
        assert [p.id for p in pending.listing(conn, "apps", now)] == [b]
        assert [(p.id, p.state) for p in pending.listing(conn, "apps", now, everything=True)] == [
            (b, PlanState.PENDING),
            (a, PlanState.REJECTED),
        ]
        assert [p.id for p in pending.listing(conn, "other", now)] == [x]
        assert pending.count_open(conn, "apps", now) == 1
        shown = pending.get(conn, a, "apps").to_dict()
    assert shown["state"] == "rejected" and shown["note"] == "no" and shown["decided_by"] == "cli"
    assert set(shown) == {
        "id",
        "table",
        "state",
        "refusal",
        "reason",
        "source",
        "rows",
        "table_rows",
        "created_at",
        "expires_at",
        "decided_at",
        "decided_by",
        "note",
        "superseded_by",
    }


def test_a_watcher_removal_refused_by_the_guard_keeps_a_plan_too(sim, sqlite_db):
    guard_world(sim, sqlite_db)
    runtime = clocked_runtime(sim, sqlite_db, Clock(), CLEANUP_TASK_POLL_SECONDS=0.5)
    inbox = Inbox(runtime.engine)
    for n, vmid in enumerate(GHOSTS):  # the stop events the gone guests sent
        inbox.accept(Event(f"stop-{vmid}", vmid, "post-stop", "pve1", float(n + 1)))
    Watcher(runtime, inbox).tick()
    [plan] = plans(sqlite_db)
    assert (plan["refusal"], plan["source"], plan["row_count"], plan["state"]) == ("guard", "event", 12, "pending")
    assert table_vmids(sqlite_db) == [*RUNNING, *GHOSTS]
