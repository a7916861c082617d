"""Holds (receiver/holds.py): a held row is never removed, by a sweep, the watcher or an
approval, until the hold is released or its time has passed; a hold placed while a removal
was already planning still keeps its row (apply checks the holds in its own transaction);
``restore`` holds the row it puts back unless told not to.

Against the simulator over HTTPS and real databases (SQLite always; PostgreSQL and MariaDB
for the holds read by the planner and by the apply transaction, and for restore).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import Database, janitor_env, run_cli, running_apps, table_vmids
from test_pending import GHOSTS as MANY
from test_pending import Clock, clocked_runtime, guard_world

import receiver.removal as removal_module
from receiver import approval, holds, store
from receiver.holds import HoldError
from receiver.inbox import Inbox
from receiver.model import Event, Finding, Outcome
from receiver.restore import restore
from receiver.runtime import Runtime
from receiver.simulator.scene import app_row
from receiver.timeutil import isoformat, utcnow
from receiver.watcher import Watcher

RUNNING = (100, 101, 102, 103)
GHOSTS = (200, 201, 202, 203)
ERROR = 104  # an old error row of a guest that exists: removed whether or not the guest exists
NOW = datetime(2026, 12, 4, 10, 0, 0, tzinfo=timezone.utc)


def world(sim: Any, db: Database) -> sa.Table:
    """Guests 100-104, rows 100-103 running, 104 an old error, and four day-old ghosts."""
    table = running_apps(sim, db, vmids=RUNNING)
    sim.add_guest(ERROR, name=f"app{ERROR}.apps.local")
    with db.engine.begin() as conn:
        conn.execute(
            table.insert(),
            [app_row(ERROR, "error", age=timedelta(days=2))]
            + [app_row(v, "running", age=timedelta(days=1)) for v in GHOSTS],
        )
    return table


def key_of(db: Database, vmid: int) -> str:
    with db.engine.connect() as conn:
        return str(conn.execute(sa.text("SELECT id FROM apps WHERE lxc_id = :v"), {"v": vmid}).scalar_one())


def audit(db: Database) -> list[tuple[Any, ...]]:
    with db.engine.connect() as conn:
        return [
            tuple(r)
            for r in conn.execute(
                sa.select(store.audit.c.vmid, store.audit.c.source, store.audit.c.restored_at).order_by(
                    store.audit.c.id
                )
            )
        ]


def held_reports(result: Any) -> dict[int | None, str]:
    assert result.plan is not None
    return {r.vmid: r.detail for r in result.plan.reports if r.kind == Finding.HELD}


# --- --until ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "until"),
    [
        ("30m", NOW + timedelta(minutes=30)),
        ("12h", NOW + timedelta(hours=12)),
        ("7d", NOW + timedelta(days=7)),
        ("2w", NOW + timedelta(weeks=2)),
        (" 3 H ", NOW + timedelta(hours=3)),
        ("2026-12-05T08:00:00Z", datetime(2026, 12, 5, 8, tzinfo=timezone.utc)),
        ("2026-12-05T10:00:00+02:00", datetime(2026, 12, 5, 8, tzinfo=timezone.utc)),
        ("2026-12-05 08:00:00", datetime(2026, 12, 5, 8, tzinfo=timezone.utc)),  # no zone: UTC
        ("9999-12-31T23:59:59Z", datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc)),
    ],
)
def test_until_takes_a_duration_or_an_iso_time(text, until):
    assert holds.parse_until(text, NOW) == until


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("0m", "is not in the future"),
        ("2026-12-04T09:59:59Z", "is not in the future"),
        ("2026-12-04T10:00:00Z", "is not in the future"),
        ("2000-01-01", "is not in the future"),
        ("yesterday", "is neither a duration"),
        ("-5m", "is neither a duration"),
        ("1y", "is neither a duration"),
        ("", "is neither a duration"),
        ("1234567d", "is neither a duration"),
    ],
)
def test_until_in_the_past_or_unreadable_is_refused(text, words):
    with pytest.raises(HoldError, match=words):
        holds.parse_until(text, NOW)


@pytest.mark.parametrize("text", ["999999w", "9999-12-31T23:59:59-01:00"])
def test_until_beyond_the_calendar_is_refused_as_a_hold_error(sqlite_db, text):
    with pytest.raises(HoldError):
        until = holds.parse_until(text, NOW)
        holds.place(sqlite_db.engine, "apps", now=NOW, source="cli", vmid=200, until=until)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({}, "either a VMID or a row key"),
        ({"vmid": 200, "row_key": "1"}, "either a VMID or a row key"),
        ({"vmid": 99}, "outside Proxmox's range"),
        ({"vmid": 1_000_000_000}, "outside Proxmox's range"),
        ({"row_key": ""}, "1 to 255 characters"),
        ({"row_key": "k" * 256}, "1 to 255 characters"),
        ({"vmid": 200, "until": NOW}, "not in the future"),
    ],
)
def test_a_hold_that_cannot_be_placed_changes_nothing(sqlite_db, kwargs, words):
    with pytest.raises(HoldError, match=words):
        holds.place(sqlite_db.engine, "apps", now=NOW, source="cli", **kwargs)
    with sqlite_db.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(store.holds)).scalar_one() == 0


def test_a_placed_hold_reads_back_as_placed(any_db):
    placed = holds.place(
        any_db.engine, "apps", now=NOW, source="cli", vmid=200, until=NOW + timedelta(hours=1), reason="  why  "
    )
    bare = holds.place(any_db.engine, "apps", now=NOW, source="http", row_key="17", reason="   ")
    long = holds.place(any_db.engine, "apps", now=NOW, source="cli", vmid=201, reason="x" * 5000)
    assert (placed.vmid, placed.row_key, placed.until, placed.reason) == (200, None, NOW + timedelta(hours=1), "why")
    assert placed.describe() == f"hold {placed.id} until {isoformat(NOW + timedelta(hours=1))}: why"
    assert (bare.reason, bare.describe()) == (None, f"hold {bare.id}")
    assert long.reason == "x" * holds.MAX_REASON
    with any_db.engine.connect() as conn:
        assert [h.to_dict() for h in holds.listing(conn, "apps", NOW)] == [
            placed.to_dict(),
            bare.to_dict(),
            long.to_dict(),
        ]
        assert holds.count(conn, "apps", NOW) == 3
        assert holds.count(conn, "other", NOW) == 0
        active = holds.active(conn, "apps", NOW)
    assert active.vmids == {200: placed.describe(), 201: long.describe()} and active.keys == {"17": bare.describe()}


# --- what a hold keeps ----------------------------------------------------------------------


def test_held_rows_are_kept_by_the_sweep_and_reported(sim, any_db):
    world(sim, any_db)
    clock = Clock()
    runtime = clocked_runtime(sim, any_db, clock)
    by_vmid = holds.place(any_db.engine, "apps", now=clock.now, source="cli", vmid=200, reason="customer asked")
    by_row = holds.place(any_db.engine, "apps", now=clock.now, source="cli", row_key=key_of(any_db, 201))
    on_error = holds.place(any_db.engine, "apps", now=clock.now, source="cli", row_key=key_of(any_db, ERROR))
    result = runtime.sweeper.run()
    assert result.outcome == Outcome.DONE, result.summary()
    assert result.plan is not None and result.plan.kept["held"] == 3
    assert held_reports(result) == {
        200: f"row {key_of(any_db, 200)} kept by {by_vmid.describe()} (it would go as ghost)",
        201: f"row {key_of(any_db, 201)} kept by {by_row.describe()} (it would go as ghost)",
        ERROR: f"row {key_of(any_db, ERROR)} kept by {on_error.describe()} (it would go as old_error)",
    }
    assert {"kind": "held", "vmid": 200, "detail": held_reports(result)[200]} in result.to_dict()["reports"]
    assert table_vmids(any_db) == [*RUNNING, ERROR, 200, 201]
    assert sorted(v for v, _, _ in audit(any_db)) == [202, 203]


def test_a_hold_on_another_table_keeps_nothing_here(sim, sqlite_db):
    world(sim, sqlite_db)
    holds.place(sqlite_db.engine, "other_table", now=NOW, source="cli", vmid=201)
    holds.place(sqlite_db.engine, "other_table", now=NOW, source="cli", row_key=key_of(sqlite_db, 202))
    holds.place(sqlite_db.engine, "apps", now=utcnow(), source="cli", vmid=200)
    result = clocked_runtime(sim, sqlite_db, Clock()).sweeper.run()
    assert result.plan is not None and result.plan.kept["held"] == 1
    assert table_vmids(sqlite_db) == [*RUNNING, 200]


def test_a_held_row_is_kept_by_the_watcher_until_released(sim, any_db):
    world(sim, any_db)
    runtime = clocked_runtime(sim, any_db, Clock(), CLEANUP_TASK_POLL_SECONDS=0.5)
    inbox = Inbox(runtime.engine)
    watcher = Watcher(runtime, inbox)
    hold = holds.place(any_db.engine, "apps", now=utcnow(), source="cli", vmid=101)
    sim.stop_guest(101)
    sim.destroy_guest(101)
    inbox.accept(Event("stop-101", 101, "post-stop", "pve1", 1.0))
    watcher.tick()
    assert 101 in table_vmids(any_db) and audit(any_db) == []
    assert watcher.watched == [101]  # kept: still watched, the hold may be released
    assert [h.id for h in holds.release(any_db.engine, "apps", vmid=101)] == [hold.id]
    watcher.tick()
    assert 101 not in table_vmids(any_db)
    assert audit(any_db) == [(101, "event", None)]


def test_an_expired_hold_stops_holding(sim, any_db):
    world(sim, any_db)
    clock = Clock()
    runtime = clocked_runtime(sim, any_db, clock)
    placed = holds.place(
        any_db.engine, "apps", now=clock.now, source="cli", vmid=200, until=clock.now + timedelta(hours=1)
    )
    with any_db.engine.connect() as conn:
        assert holds.count(conn, "apps", clock.now + timedelta(minutes=59)) == 1
        assert holds.count(conn, "apps", clock.now + timedelta(hours=1)) == 0  # until is exclusive
    clock.now += timedelta(minutes=30)
    first = runtime.sweeper.run()
    assert first.plan is not None and first.plan.kept["held"] == 1 and 200 in table_vmids(any_db)
    clock.now += timedelta(hours=1)
    second = runtime.sweeper.run()
    assert second.plan is not None and second.plan.kept["held"] == 0, second.summary()
    assert 200 not in table_vmids(any_db)
    with any_db.engine.begin() as conn:
        assert holds.listing(conn, "apps", clock.now) == []
        assert holds.prune(conn, clock.now) == 1
        assert conn.execute(sa.select(store.holds.c.id)).scalars().all() == []
    assert placed.until == clock.now - timedelta(minutes=30)


def test_release_by_id_vmid_or_row(sqlite_db):
    place = holds.place
    a = place(sqlite_db.engine, "apps", now=NOW, source="cli", vmid=200)
    b = place(sqlite_db.engine, "apps", now=NOW, source="cli", vmid=200, reason="twice")
    c = place(sqlite_db.engine, "apps", now=NOW, source="cli", row_key="7")
    d = place(sqlite_db.engine, "apps", now=NOW, source="cli", vmid=201)
    other = place(sqlite_db.engine, "other", now=NOW, source="cli", vmid=200)
    assert [h.id for h in holds.release(sqlite_db.engine, "apps", vmid=200)] == [a.id, b.id]
    assert holds.release(sqlite_db.engine, "apps", vmid=200) == []
    assert [h.id for h in holds.release(sqlite_db.engine, "apps", row_key="7")] == [c.id]
    assert holds.release(sqlite_db.engine, "apps", hold_id=other.id) == []  # another table's
    assert [h.id for h in holds.release(sqlite_db.engine, "apps", hold_id=d.id)] == [d.id]
    for impossible in (0, -1, 2**63, 10**20):
        assert holds.release(sqlite_db.engine, "apps", hold_id=impossible) == []
    with pytest.raises(HoldError, match="names a hold id, a VMID or a row key"):
        holds.release(sqlite_db.engine, "apps")
    with sqlite_db.engine.connect() as conn:
        assert [h.id for h in holds.listing(conn, "other", NOW)] == [other.id]
        assert holds.listing(conn, "apps", NOW) == []


def test_release_of_a_vmid_no_database_can_hold_releases_nothing(sqlite_db):
    holds.place(sqlite_db.engine, "apps", now=NOW, source="cli", vmid=200)
    assert holds.release(sqlite_db.engine, "apps", vmid=10**20) == []


# --- a hold placed while a removal is already under way -----------------------------------------


def _at_the_last_proxmox_call(runtime: Runtime, do: Callable[[], object]) -> list[str]:
    """Run ``do`` after the ACL list read that follows the confirming read: the last thing a
    removal of ghosts asks Proxmox before it applies."""
    real = runtime.inventory.hideable_vmids
    calls: list[str] = []

    def hideable() -> Any:
        try:
            return real()
        finally:
            calls.append("acl")
            if len(calls) == 2:
                do()
                calls.append("hold placed")

    runtime.inventory.hideable_vmids = hideable  # type: ignore[method-assign]
    return calls


def _right_before_apply(monkeypatch: Any, do: Callable[[], object]) -> list[str]:
    real = removal_module.apply_actions
    calls: list[str] = []

    def apply(*args: Any, **kwargs: Any) -> Any:
        do()
        calls.append("hold placed")
        return real(*args, **kwargs)

    monkeypatch.setattr(removal_module, "apply_actions", apply)
    return calls


def test_a_hold_placed_after_planning_still_keeps_its_ghost_row(sim, any_db):
    world(sim, any_db)
    runtime = clocked_runtime(sim, any_db, Clock())
    key200, key_error = key_of(any_db, 200), key_of(any_db, ERROR)
    placed: list[holds.Hold] = []

    def place() -> None:
        placed.append(holds.place(any_db.engine, "apps", now=utcnow(), source="cli", row_key=key200))
        placed.append(holds.place(any_db.engine, "apps", now=utcnow(), source="http", vmid=201))
        placed.append(holds.place(any_db.engine, "apps", now=utcnow(), source="cli", row_key=key_error))

    calls = _at_the_last_proxmox_call(runtime, place)
    result = runtime.sweeper.run()
    assert calls == ["acl", "acl", "hold placed"]
    assert result.outcome == Outcome.DONE and result.applied is not None, result.summary()
    assert result.plan is not None and result.plan.kept["held"] == 0  # the planner saw no hold
    assert {a.row.vmid for a in result.applied.applied} == {202, 203}
    skipped = {a.row.vmid: why for a, why in result.applied.skipped}
    assert skipped == {
        200: f"held since planning ({placed[0].describe()})",
        201: f"held since planning ({placed[1].describe()})",
        ERROR: f"held since planning ({placed[2].describe()})",
    }
    assert table_vmids(any_db) == [*RUNNING, ERROR, 200, 201]
    assert sorted(v for v, _, _ in audit(any_db)) == [202, 203]
    with any_db.engine.connect() as conn:
        assert store.read_counters(conn)["total_removed"] == 2


def test_a_hold_placed_right_before_the_apply_keeps_an_old_error_row(sim, any_db, monkeypatch):
    """Old error rows alone: no confirming read, the apply follows the plan at once."""
    table = running_apps(sim, any_db, vmids=RUNNING)
    two_days = (utcnow() - timedelta(days=2)).replace(tzinfo=None, microsecond=0)
    with any_db.engine.begin() as conn:
        conn.execute(
            table.update()
            .where(table.c.lxc_id.in_([100, 101]))
            .values(status="error", created_at=two_days, updated_at=two_days)
        )
    runtime = clocked_runtime(sim, any_db, Clock())
    hold_ids: list[int] = []
    calls = _right_before_apply(
        monkeypatch,
        lambda: hold_ids.append(holds.place(any_db.engine, "apps", now=utcnow(), source="cli", vmid=100).id),
    )
    result = runtime.sweeper.run()
    assert calls == ["hold placed"] and result.applied is not None, result.summary()
    assert [a.row.vmid for a in result.applied.applied] == [101]
    assert [
        (a.row.vmid, why.startswith(f"held since planning (hold {hold_ids[0]}")) for a, why in result.applied.skipped
    ] == [(100, True)]
    assert table_vmids(any_db) == [100, 102, 103]


def test_a_hold_placed_during_an_approval_keeps_its_row(sim, any_db):
    guard_world(sim, any_db)
    runtime = clocked_runtime(sim, any_db, Clock())
    plan_id = runtime.sweeper.run().pending_id
    assert plan_id is not None
    _at_the_last_proxmox_call(
        runtime, lambda: holds.place(any_db.engine, "apps", now=utcnow(), source="cli", vmid=MANY[0])
    )
    decision = approval.approve(runtime.sweeper, plan_id, by="cli")
    assert decision.removed == len(MANY) - 1
    assert [(e["vmid"], e["why"].startswith("held since planning (hold ")) for e in decision.not_removed] == [
        (MANY[0], True)
    ]
    assert MANY[0] in table_vmids(any_db)


# --- restore ----------------------------------------------------------------------------------


def _removed_ghost(sim: Any, db: Database) -> tuple[Runtime, int, str]:
    """Guest 100 runs; the row of gone guest 200 is swept away: its runtime, audit id and key."""
    running_apps(sim, db, vmids=(100,))
    table = sa.Table("apps", sa.MetaData(), autoload_with=db.engine)
    with db.engine.begin() as conn:
        conn.execute(table.insert(), [app_row(200, "running", age=timedelta(days=1))])
    key = key_of(db, 200)
    runtime = clocked_runtime(sim, db, Clock())
    assert runtime.sweeper.run().outcome == Outcome.DONE
    with db.engine.connect() as conn:
        audit_id = conn.execute(sa.select(store.audit.c.id)).scalar_one()
    return runtime, audit_id, key


def test_a_restored_row_is_held_and_the_next_sweep_keeps_it(sim, any_db):
    runtime, audit_id, key = _removed_ghost(sim, any_db)
    done = restore(runtime.table, audit_id)
    assert done.hold_id is not None
    assert done.message == (
        f"row {key} (VMID 200) is back in apps; held (hold {done.hold_id}) until released: "
        f"pve-janitor release --row {key}"
    )
    with any_db.engine.connect() as conn:
        [hold] = holds.listing(conn, "apps", utcnow())
    assert (hold.id, hold.row_key, hold.vmid, hold.until, hold.source, hold.reason) == (
        done.hold_id,
        key,
        None,
        None,
        "restore",
        f"restored from audit entry {audit_id}",
    )
    again = runtime.sweeper.run()
    assert again.plan is not None and again.plan.kept["held"] == 1, again.summary()
    assert table_vmids(any_db) == [100, 200]
    holds.release(any_db.engine, "apps", row_key=key)
    assert runtime.sweeper.run().outcome == Outcome.DONE
    assert table_vmids(any_db) == [100]
    assert [(v, s, r is not None) for v, s, r in audit(any_db)] == [(200, "sweep", True), (200, "sweep", False)]


def test_a_restore_without_hold_is_removed_again_by_the_next_sweep(sim, any_db):
    runtime, audit_id, key = _removed_ghost(sim, any_db)
    done = restore(runtime.table, audit_id, hold=False)
    assert done.hold_id is None
    assert done.message.endswith("; not held: the next sweep removes it again if its guest is still gone")
    with any_db.engine.connect() as conn:
        assert holds.count(conn, "apps", utcnow()) == 0
    assert runtime.sweeper.run().outcome == Outcome.DONE
    assert table_vmids(any_db) == [100]


@pytest.mark.parametrize("no_hold", [False, True], ids=["held", "no-hold"])
def test_restore_command_holds_unless_told_not_to(sim, sqlite_db, no_hold):
    runtime, audit_id, key = _removed_ghost(sim, sqlite_db)
    result = run_cli(["restore", str(audit_id), *(["--no-hold"] if no_hold else [])], janitor_env(sim, sqlite_db))
    assert result.code == 0, (result.out, result.err)
    assert "Traceback" not in result.err
    if no_hold:
        assert "not held: the next sweep removes it again" in result.out
    else:
        assert f"held (hold 1) until released: pve-janitor release --row {key}" in result.out
    runtime.sweeper.run()
    assert table_vmids(sqlite_db) == ([100] if no_hold else [100, 200])
