"""The Sweeper: the clock it is handed decides the grace period; its ``on_result`` hook sees
every result.  Against the simulator over HTTPS and a real SQLite file."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa
from conftest import make_runtime, running_apps, table_vmids

from receiver import store
from receiver.model import Outcome, Reason
from receiver.simulator.scene import app_row
from receiver.sweep import Sweeper
from receiver.timeutil import parse_timestamp, utcnow

GHOST = 105


def with_fresh_ghost(sim, db):
    """Guests 100–104 running with day-old rows, and the row of guest 105, gone, touched 5 minutes ago."""
    table = running_apps(sim, db)
    with db.engine.begin() as conn:
        conn.execute(table.insert(), [app_row(GHOST, "running", age=timedelta(minutes=5))])
    return table


@pytest.mark.parametrize(
    ("later", "outcome", "left"),
    [
        (timedelta(0), Outcome.NOTHING, [100, 101, 102, 103, 104, GHOST]),  # 5 minutes old: within the 15-minute grace
        (timedelta(hours=1), Outcome.DONE, [100, 101, 102, 103, 104]),  # 65 minutes old by the pinned clock
    ],
)
def test_the_clock_handed_in_decides_the_grace_period(sim, sqlite_db, later, outcome, left):
    with_fresh_ghost(sim, sqlite_db)
    runtime = make_runtime(sim, sqlite_db, CLEANUP_GRACE_MINUTES=15)
    pinned = utcnow() + later
    sweeper = Sweeper(runtime.settings, runtime.table, runtime.inventory, clock=lambda: pinned)
    result = sweeper.run()
    assert result.outcome == outcome, result.summary()
    assert table_vmids(sqlite_db) == left
    assert result.started_at == pinned
    with sqlite_db.engine.connect() as conn:
        run = conn.execute(sa.select(store.runs)).mappings().one()
    assert parse_timestamp(run["started_at"]) == pinned
    assert parse_timestamp(run["finished_at"]) == pinned


def test_the_on_result_hook_sees_each_result_with_its_source(sim, sqlite_db):
    with_fresh_ghost(sim, sqlite_db)
    runtime = make_runtime(sim, sqlite_db, CLEANUP_GRACE_MINUTES=0)
    seen = []
    sweeper = Sweeper(
        runtime.settings,
        runtime.table,
        runtime.inventory,
        on_result=lambda result, source: seen.append((result.outcome, source, table_vmids(sqlite_db))),
    )
    first = sweeper.run(dry_run=True, source="manual")
    second = sweeper.run()
    third = sweeper.try_run(source="sweep")
    assert third is not None  # no other sweep was running
    assert [(o, s) for o, s, _ in seen] == [
        (Outcome.DRY_RUN, "manual"),
        (Outcome.DONE, "sweep"),
        (Outcome.NOTHING, "sweep"),
    ]
    assert [first.outcome, second.outcome, third.outcome] == [o for o, _, _ in seen]
    # The hook runs after the sweep applied: it sees the table as the sweep left it.
    assert seen[1][2] == [100, 101, 102, 103, 104]
    assert second.applied is not None and [a.reason for a in second.applied.applied] == [Reason.GHOST]


def test_a_disabled_sweep_reaches_the_hook_too(sim, sqlite_db):
    with_fresh_ghost(sim, sqlite_db)
    runtime = make_runtime(sim, sqlite_db, CLEANUP_ENABLED="false")
    seen = []
    sweeper = Sweeper(
        runtime.settings, runtime.table, runtime.inventory, on_result=lambda result, source: seen.append(result.outcome)
    )
    sweeper.run(force=True)
    assert seen == [Outcome.DISABLED]
    assert table_vmids(sqlite_db) == [100, 101, 102, 103, 104, GHOST]
