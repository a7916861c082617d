"""Runtime and ``serve.build``: one clock for the sweeper and the watcher, hooks given at
construction.  Against the simulator over HTTPS and a real SQLite file."""

from __future__ import annotations

from datetime import timedelta

from conftest import janitor_env, make_runtime, running_apps, table_vmids

from receiver.config import load_settings
from receiver.model import Outcome
from receiver.runtime import Runtime
from receiver.serve import build
from receiver.simulator.scene import app_row
from receiver.timeutil import utcnow


def test_the_runtime_hands_its_clock_and_sweep_hook_to_the_sweeper(sim, sqlite_db):
    table = running_apps(sim, sqlite_db)
    with sqlite_db.engine.begin() as conn:
        conn.execute(table.insert(), [app_row(105, "running", age=timedelta(minutes=5))])
    pinned = utcnow() + timedelta(hours=1)
    seen = []
    settings = load_settings(env=janitor_env(sim, sqlite_db), overrides={"CLEANUP_GRACE_MINUTES": 15})
    runtime = Runtime.build(
        settings,
        engine=sqlite_db.engine,
        clock=lambda: pinned,
        on_sweep=lambda result, source: seen.append((result.outcome, source)),
    )
    assert runtime.clock() == pinned
    result = runtime.sweeper.run()
    # Row 105 is 5 minutes old by the wall clock, 65 by the runtime's: the runtime's clock decides.
    assert result.outcome == Outcome.DONE and result.started_at == pinned
    assert table_vmids(sqlite_db) == [100, 101, 102, 103, 104]
    assert seen == [(Outcome.DONE, "sweep")]


def test_serve_gives_the_watcher_the_runtime_clock(sim, sqlite_db):
    running_apps(sim, sqlite_db)
    pinned = utcnow() - timedelta(days=3)
    settings = load_settings(env=janitor_env(sim, sqlite_db))
    parts = build(settings, Runtime.build(settings, engine=sqlite_db.engine, clock=lambda: pinned))
    assert parts["runtime"].clock() == pinned
    parts["watcher"].tick()
    assert parts["watcher"].last_tick == pinned


def test_serve_counts_every_sweep_in_the_metrics_through_the_construction_time_hook(sim, sqlite_db):
    running_apps(sim, sqlite_db)
    parts = build(make_runtime(sim, sqlite_db).settings, make_runtime(sim, sqlite_db))
    parts["runtime"].sweeper.run(source="manual")
    parts["runtime"].sweeper.run(dry_run=True)
    metrics = parts["app"].test_client().get("/metrics").get_data(as_text=True)
    assert 'pve_janitor_sweeps_total{outcome="nothing"} 1.0' in metrics
    assert 'pve_janitor_sweeps_total{outcome="dry_run"} 1.0' in metrics
