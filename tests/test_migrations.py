"""pve-janitor's table migrations (receiver/schema.py, receiver/migrations/) on SQLite, PostgreSQL, MariaDB.

An install of today's schema, with a row in every table, is upgraded and keeps its data;
``db current`` / ``db upgrade`` as real subprocesses; commands other than ``serve`` and
``db upgrade`` run no DDL and say to run ``pve-janitor db upgrade``; two upgrades started
together end with one schema and no error.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import ModuleType

import pytest
import sqlalchemy as sa
from conftest import ROOT, Database, _server_database, _sqlite_database, janitor_env, run_cli, running_apps

from receiver import holds, schema, store
from receiver.config import load_settings, without_settings
from receiver.db import DatabaseError, make_engine
from receiver.runtime import Runtime
from receiver.serve import build
from receiver.simulator.launch import cli_command
from receiver.timeutil import utcnow

HEAD = "0004_reservations_coverage"
DDL = ("CREATE", "ALTER", "DROP")


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("mysql", marks=pytest.mark.mysql),
    ]
)
def bare_db(request, tmp_path) -> Iterator[Database]:
    """A platform database on which pve-janitor has not made its tables."""
    if request.param == "sqlite":
        yield from _sqlite_database(tmp_path, migrated=False)
    else:
        yield from _server_database(request.param, migrated=False)


def baseline_module() -> ModuleType:
    path = ROOT / "receiver" / "migrations" / "versions" / "0001_baseline.py"
    spec = importlib.util.spec_from_file_location("baseline_0001", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def install_of_today(engine: sa.Engine) -> sa.MetaData:
    """The tables as every command made them before migrations (``ensure_schema``: ``create_all``
    and the counters seeded), no revision, and a row in each table."""
    baseline = baseline_module()
    md: sa.MetaData = baseline.metadata
    md.create_all(engine)
    t = md.tables
    now = utcnow().replace(microsecond=0, tzinfo=None)
    with engine.begin() as conn:
        conn.execute(t["janitor_counters"].insert(), [{"name": n, "value": 0} for n in baseline.COUNTERS])
        conn.execute(
            t["janitor_counters"].update().where(t["janitor_counters"].c.name == "total_removed"), {"value": 7}
        )
        conn.execute(
            t["janitor_audit"].insert(),
            {
                "table_name": "apps",
                "row_key": "42",
                "vmid": 142,
                "hostname": "app142",
                "action": "delete",
                "reason": "ghost",
                "source": "sweep",
                "detail": "gone",
                "row_json": '{"id": 42}',
                "removed_at": now,
            },
        )
        conn.execute(
            t["janitor_runs"].insert(),
            {
                "source": "sweep",
                "started_at": now,
                "finished_at": now,
                "outcome": "done",
                "dry_run": False,
                "planned": 1,
                "applied": 1,
                "duration_s": 0.5,
            },
        )
        conn.execute(t["janitor_errors"].insert(), {"at": now, "source": "sweep", "message": "boom"})
        conn.execute(
            t["janitor_inbox"].insert(),
            {
                "event_id": "e-1",
                "vmid": 142,
                "phase": "post-stop",
                "node": "pve1",
                "ts": 1714564800.25,
                "received_at": now,
            },
        )
        conn.execute(
            t["janitor_watch"].insert(),
            {"vmid": 142, "since": now, "until": now + timedelta(minutes=10), "hint": "stop", "missing_reads": 2},
        )
        conn.execute(
            t["janitor_stop_marks"].insert(), {"table_name": "apps", "row_key": "42", "vmid": 142, "marked_at": now}
        )
        conn.execute(t["janitor_lease"].insert(), {"name": "sweeper", "holder": "old:1:2:3", "expires_at": now})
    return md


def contents(engine: sa.Engine) -> dict[str, list[dict]]:
    """Every janitor table's rows (of the tables there are), read through the newest definitions (store.py)."""
    present = set(sa.inspect(engine).get_table_names())
    with engine.connect() as conn:
        return {
            table.name: [dict(r) for r in conn.execute(sa.select(table).order_by(*table.primary_key)).mappings()]
            for table in store.metadata.sorted_tables
            if table.name in present
        }


def columns(engine: sa.Engine, table: str) -> set[str]:
    return {c["name"] for c in sa.inspect(engine).get_columns(table)}


def db_env(db: Database) -> dict[str, str]:
    env = without_settings(os.environ)
    env["DATABASE_URL"] = db.url
    return env


def test_an_install_of_today_is_upgraded_with_every_row_kept(bare_db):
    engine = bare_db.engine
    install_of_today(engine)
    with engine.begin() as conn:  # a platform's own Alembic, in the same database
        conn.exec_driver_sql("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        conn.exec_driver_sql("INSERT INTO alembic_version (version_num) VALUES ('platform_0042')")
    before = contents(engine)
    assert schema.status(engine).state is schema.State.UNVERSIONED
    assert "missing_reads" in columns(engine, "janitor_watch")

    before_status, after = schema.upgrade(engine)

    assert before_status.state is schema.State.UNVERSIONED
    assert (after.current, after.state) == (HEAD, schema.State.CURRENT)
    assert "missing_reads" not in columns(engine, "janitor_watch")
    after_contents = contents(engine)
    kept = {name: after_contents[name] for name in before}
    assert kept == before  # every table, every row, every value (the dropped column aside)
    assert all(kept[name] for name in kept), "a row in every table"
    # The tables later migrations added are there, empty.
    assert set(after_contents) == {t.name for t in store.metadata.sorted_tables}
    assert not any(after_contents[name] for name in set(after_contents) - set(before))
    assert kept["janitor_watch"][0]["hint"] == "stop" and kept["janitor_counters"]
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalars().all() == ["platform_0042"]
        assert conn.exec_driver_sql("SELECT version_num FROM janitor_alembic_version").scalars().all() == [HEAD]
        assert store.read_counters(conn)["total_removed"] == 7
    # And the code works on it: a counter moves, a watch is written without the dropped column.
    with engine.begin() as conn:
        store.add_counters(conn, {"total_removed": 1})
        conn.execute(store.watch.insert().values(vmid=143, since=utcnow(), until=utcnow(), hint="task"))
    with engine.connect() as conn:
        assert store.read_counters(conn)["total_removed"] == 8


def test_a_new_database_gets_every_table_and_the_counters_once(bare_db):
    engine = bare_db.engine
    assert schema.status(engine).state is schema.State.MISSING
    schema.upgrade(engine)
    assert {t.name for t in store.metadata.sorted_tables} | {schema.VERSION_TABLE} <= set(
        sa.inspect(engine).get_table_names()
    )
    assert columns(engine, "janitor_watch") == set(store.watch.c.keys())
    with engine.begin() as conn:
        store.add_counters(conn, {"total_removed": 5})
    assert [s.state for s in schema.upgrade(engine)] == [
        schema.State.CURRENT
    ] * 2  # again: nothing made twice, nothing reset
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(store.counters)).scalar_one() == len(store.COUNTERS)
        assert store.read_counters(conn)["total_removed"] == 5


def test_an_install_of_today_missing_a_counter_gets_it_seeded(sqlite_path):
    engine = make_engine(f"sqlite:///{sqlite_path}")
    try:
        install_of_today(engine)
        with engine.begin() as conn:
            conn.execute(store.counters.delete().where(store.counters.c.name == "rows_restored"))
        schema.upgrade(engine)
        with engine.connect() as conn:
            rows = dict(conn.execute(sa.select(store.counters.c.name, store.counters.c.value)).all())
        assert rows == {**{n: 0 for n in store.COUNTERS}, "total_removed": 7}
    finally:
        engine.dispose()


@pytest.fixture
def sqlite_path(tmp_path) -> Path:
    return tmp_path / "platform.db"


def test_a_foreign_table_under_our_name_is_not_adopted(sqlite_path):
    engine = make_engine(f"sqlite:///{sqlite_path}")
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE janitor_watch (vmid INTEGER PRIMARY KEY)")
        with pytest.raises(DatabaseError, match="janitor_watch exists but lacks hint, missing_reads, since, until"):
            schema.upgrade(engine)
        assert schema.status(engine).current is None
    finally:
        engine.dispose()


def test_a_revision_from_a_newer_version_is_refused_not_migrated(sqlite_db):
    with sqlite_db.engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE {schema.VERSION_TABLE} SET version_num = '0099_from_the_future'")
    with pytest.raises(schema.SchemaNotCurrent, match="a newer pve-janitor upgraded them"):
        schema.require_current(sqlite_db.engine)
    with pytest.raises(schema.SchemaNotCurrent, match="a newer pve-janitor upgraded them"):
        schema.upgrade(sqlite_db.engine)


def test_db_current_and_db_upgrade_as_commands(bare_db):
    env = db_env(bare_db)
    missing = run_cli(["db", "current"], env)
    assert missing.code == 3 and missing.out.strip() == "pve-janitor's tables are missing: run `pve-janitor db upgrade`"

    install_of_today(bare_db.engine)
    old = run_cli(["db", "current"], env)
    assert old.code == 3 and "predate migrations" in old.out and "run `pve-janitor db upgrade`" in old.out

    upgraded = run_cli(["db", "upgrade"], env)
    assert upgraded.code == 0, upgraded.err
    assert upgraded.out.strip() == f"pve-janitor's tables: upgraded from nothing to {HEAD} (current)"
    current = run_cli(["db", "current"], env)
    assert (current.code, current.out.strip()) == (0, f"{HEAD} (current)")
    again = run_cli(["db", "upgrade"], env)
    assert (again.code, again.out.strip()) == (0, f"pve-janitor's tables: already at {HEAD} (current)")


def test_db_commands_need_only_the_database_url(tmp_path):
    env = without_settings(os.environ)
    result = run_cli(["db", "current"], env)
    assert result.code == 2 and "DATABASE_URL is not set" in result.err


def test_db_current_is_behind_after_only_the_baseline(sqlite_db):
    with sqlite_db.engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE {schema.VERSION_TABLE} SET version_num = '0001_baseline'")
    behind = run_cli(["db", "current"], db_env(sqlite_db))
    assert behind.code == 3
    assert behind.out.strip() == (
        f"pve-janitor's tables are at 0001_baseline, this version needs {HEAD}: run `pve-janitor db upgrade`"
    )


def _ddl_counter(engine: sa.Engine) -> list[str]:
    seen: list[str] = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def _count(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith(DDL):
            seen.append(statement)

    return seen


@pytest.mark.parametrize("old", [False, True], ids=["new", "of-today"])
def test_building_a_runtime_runs_no_ddl_and_says_to_upgrade(sim, bare_db, old):
    if old:
        install_of_today(bare_db.engine)
    tables = sorted(sa.inspect(bare_db.engine).get_table_names())
    running_apps(sim, bare_db)
    tables = sorted({*tables, "apps"})
    ddl = _ddl_counter(bare_db.engine)
    settings = load_settings(env=janitor_env(sim, bare_db))
    with pytest.raises(schema.SchemaNotCurrent, match="run `pve-janitor db upgrade`"):
        Runtime.build(settings, engine=bare_db.engine)
    assert ddl == []
    assert sorted(sa.inspect(bare_db.engine).get_table_names()) == tables


@pytest.mark.parametrize(
    "args",
    [["check"], ["sweep", "--dry-run"], ["sweep"], ["history"], ["restore", "1"]],
    ids=lambda a: " ".join(a),
)
def test_commands_refuse_and_create_nothing_until_upgraded(sim, bare_db, args):
    install_of_today(bare_db.engine)
    running_apps(sim, bare_db)
    tables = sorted(sa.inspect(bare_db.engine).get_table_names())
    watch_columns = columns(bare_db.engine, "janitor_watch")
    result = run_cli(args, janitor_env(sim, bare_db))
    assert result.code == 3, (result.out, result.err)
    assert "run `pve-janitor db upgrade`" in result.out + result.err
    assert sorted(sa.inspect(bare_db.engine).get_table_names()) == tables
    assert columns(bare_db.engine, "janitor_watch") == watch_columns
    assert schema.status(bare_db.engine).state is schema.State.UNVERSIONED


def test_serve_upgrades_at_start(sim, bare_db):
    install_of_today(bare_db.engine)
    settings = load_settings(env=janitor_env(sim, bare_db))
    running_apps(sim, bare_db)
    parts = build(settings)
    try:
        assert schema.status(parts["runtime"].engine).state is schema.State.CURRENT
        assert "missing_reads" not in columns(bare_db.engine, "janitor_watch")
    finally:
        parts["runtime"].engine.dispose()


def test_two_upgrades_at_once_in_threads_end_with_one_schema(bare_db):
    engines = [make_engine(bare_db.url) for _ in range(2)]  # two receivers: two pools
    barrier, results, errors = threading.Barrier(2), [], []

    def migrate(engine):
        barrier.wait()
        try:
            results.append(schema.upgrade(engine))
        except Exception as exc:  # noqa: BLE001 - any error fails the test below, with its kind
            errors.append(exc)

    try:
        threads = [threading.Thread(target=migrate, args=(e,)) for e in engines]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        for e in engines:
            e.dispose()
    assert errors == []
    assert sorted(str(before.state) for before, _ in results) == ["current", "missing"]  # one migrated
    assert [after.state for _, after in results] == [schema.State.CURRENT] * 2
    assert schema.status(bare_db.engine).current == HEAD
    with bare_db.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(store.counters)).scalar_one() == len(store.COUNTERS)
        assert conn.exec_driver_sql(f"SELECT count(*) FROM {schema.VERSION_TABLE}").scalar_one() == 1
        assert conn.execute(sa.select(sa.func.count()).select_from(store.lease)).scalar_one() == 0  # released


def test_two_receivers_upgrading_at_once_as_processes(bare_db):
    install_of_today(bare_db.engine)
    env = db_env(bare_db)
    procs = [
        subprocess.Popen(
            [*cli_command(), "db", "upgrade"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    assert sorted(o.split(":", 1)[1].strip() for o, _ in outs) == [
        f"already at {HEAD} (current)",
        f"already at {HEAD} (current)",
        f"upgraded from nothing to {HEAD} (current)",
    ]
    assert schema.status(bare_db.engine).current == HEAD
    assert "missing_reads" not in columns(bare_db.engine, "janitor_watch")


def test_the_migrated_tables_are_the_tables_the_code_describes(bare_db):
    """store.py describes the newest schema; the migrations must make exactly that: every table,
    every column, nullability and primary key (the types are the migrations' own words)."""
    schema.upgrade(bare_db.engine)
    inspector = sa.inspect(bare_db.engine)
    for table in store.metadata.sorted_tables:
        found = {c["name"]: c for c in inspector.get_columns(table.name)}
        assert set(found) == set(table.c.keys()), table.name
        for column in table.c:
            assert found[column.name]["nullable"] == (column.nullable and not column.primary_key), (
                f"{table.name}.{column.name}"
            )
        assert set(inspector.get_pk_constraint(table.name)["constrained_columns"]) == {
            c.name for c in table.primary_key
        }, table.name
        indexes = {ix["name"] for ix in inspector.get_indexes(table.name)}
        assert {ix.name for ix in table.indexes} <= indexes, table.name


def test_ids_handed_to_users_are_never_reused_on_sqlite(sqlite_path):
    """A hold, a pending plan or a reservation is named by its id (`release 7`, `approve 7`,
    `DELETE /api/v1/allocations/7`): SQLite would give a deleted newest row's id to the next one,
    and a stale id would then name someone else's.  AUTOINCREMENT keeps ids rising."""
    engine = make_engine(f"sqlite:///{sqlite_path}")
    try:
        schema.upgrade(engine)
        with engine.connect() as conn:
            made: dict[str, str] = dict(
                conn.exec_driver_sql("SELECT name, sql FROM sqlite_master WHERE type = 'table'").all()
            )
        for name in ("janitor_holds", "janitor_pending", "janitor_reservations"):
            assert "AUTOINCREMENT" in made[name], name
        first = holds.place(engine, "apps", now=utcnow(), source="cli", vmid=200)
        holds.release(engine, "apps", hold_id=first.id)
        second = holds.place(engine, "apps", now=utcnow(), source="cli", vmid=200)
        assert second.id > first.id
    finally:
        engine.dispose()
