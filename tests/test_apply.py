"""Apply under races: rows changed or re-used between plan and apply, guests that come
back, a concurrent SQLite writer, and SIGKILL in the middle of a large apply."""

from __future__ import annotations

import random
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from datetime import timedelta

import pytest
import sqlalchemy as sa
from conftest import cli_command, janitor_env, make_runtime, sorted_vmids, table_vmids

from receiver import schema, store
from receiver.apply import apply_actions
from receiver.model import Guest, Inventory
from receiver.plan import make_plan
from receiver.simulator.scene import app_row, create_apps_table
from receiver.timeutil import utcnow

SQLITE_LIMIT_VARIABLE_NUMBER = getattr(sqlite3, "SQLITE_LIMIT_VARIABLE_NUMBER", None)  # Python 3.11+


def _seed(db, rows):
    table = create_apps_table(db.engine)
    with db.engine.begin() as conn:
        conn.execute(table.insert(), rows)
    return table


def _audit_vmids(db):
    with db.engine.connect() as conn:
        return sorted(conn.execute(sa.select(store.audit.c.vmid)).scalars())


def test_row_changed_or_reused_between_plan_and_apply_is_skipped(sim, any_db):
    sim.add_guest(100)
    table = _seed(any_db, [app_row(v, "running", age=timedelta(days=1)) for v in (100, 201, 202, 203)])
    runtime = make_runtime(sim, any_db)
    plan = make_plan(runtime.table.fetch_rows(), runtime.inventory.read(), utcnow(), runtime.settings)
    assert sorted_vmids(a.row.vmid for a in plan.actions) == [201, 202, 203]

    with any_db.engine.begin() as conn:
        # The platform re-deployed app 201 into a new guest 301 (VMID re-used row) ...
        conn.execute(table.update().where(table.c.lxc_id == 201).values(lxc_id=301))
        # ... and touched app 202 (status change => updated_at moves).
        conn.execute(
            table.update()
            .where(table.c.lxc_id == 202)
            .values(
                status="deploying", updated_at=(utcnow() - timedelta(seconds=1)).replace(tzinfo=None, microsecond=0)
            )
        )
    result = apply_actions(runtime.table, plan.actions, source="sweep", now=utcnow())
    assert [a.row.vmid for a in result.applied] == [203]
    assert sorted(why for _, why in result.skipped) == [
        "lxc_id changed since planning",
        "updated_at, status changed since planning",
    ]
    assert table_vmids(any_db) == [100, 202, 301]
    assert _audit_vmids(any_db) == [203]


@pytest.mark.parametrize(
    "port_columns, freed", [("public_port,internal_port", 3), ("internal_port", 2), ("public_port", 1), ("", 0)]
)
def test_ports_freed_follow_the_mapped_port_columns(sim, sqlite_db, port_columns, freed):
    rows = [
        app_row(201, "running", age=timedelta(days=1)),
        {**app_row(202, "running", age=timedelta(days=1)), "public_port": None},
    ]  # a NULL port frees nothing
    _seed(sqlite_db, rows)
    runtime = make_runtime(sim, sqlite_db, CLEANUP_PORT_COLUMNS=port_columns)
    plan = make_plan(runtime.table.fetch_rows(), Inventory.of([], utcnow()), utcnow(), runtime.settings)
    result = apply_actions(runtime.table, plan.actions, source="sweep", now=utcnow())
    assert len(result.applied) == 2 and result.counts["ports_freed"] == freed


def test_a_removed_row_takes_its_stop_mark_with_it(sim, any_db):
    # A stop mark says "the watcher set this row to stopped"; a restored row or a key
    # re-used later must not inherit it.  Marks of other rows and tables stay.
    sim.add_guest(100)
    _seed(any_db, [app_row(v, "running", age=timedelta(days=1)) for v in (100, 201, 202)])
    runtime = make_runtime(sim, any_db)
    keys = {r.vmid: str(r.key) for r in runtime.table.fetch_rows()}
    marks = store.stop_marks
    with any_db.engine.begin() as conn:
        conn.execute(
            marks.insert(),
            [
                {"table_name": "apps", "row_key": keys[201], "vmid": 201, "marked_at": utcnow()},
                {"table_name": "apps", "row_key": keys[100], "vmid": 100, "marked_at": utcnow()},
                {"table_name": "other", "row_key": keys[202], "vmid": 202, "marked_at": utcnow()},
            ],
        )
    plan = make_plan(runtime.table.fetch_rows(), runtime.inventory.read(), utcnow(), runtime.settings)
    result = apply_actions(runtime.table, plan.actions, source="sweep", now=utcnow())
    assert sorted_vmids(a.row.vmid for a in result.applied) == [201, 202]
    with any_db.engine.connect() as conn:
        left = sorted(conn.execute(sa.select(marks.c.table_name, marks.c.vmid)).all())
    assert left == [("apps", 100), ("other", 202)]


@pytest.mark.skipif(SQLITE_LIMIT_VARIABLE_NUMBER is None, reason="needs Python 3.11+ (setlimit)")
def test_batches_follow_sqlite_s_own_parameter_limit(sim, sqlite_db):
    # A SQLite built with a lower limit than its version suggests: the key lists must fit it.
    @sa.event.listens_for(sqlite_db.engine, "connect")
    def low_limit(dbapi_conn, _record):
        dbapi_conn.setlimit(SQLITE_LIMIT_VARIABLE_NUMBER, 999)

    sqlite_db.engine.dispose()
    sim.add_guest(100)
    _seed(sqlite_db, [app_row(v, "running", age=timedelta(days=1)) for v in range(100, 1601)])
    runtime = make_runtime(sim, sqlite_db)
    assert runtime.table.key_batch < 999
    result = runtime.sweeper.run(force=True)
    assert result.outcome == "done", result.reason
    assert result.applied is not None
    assert len(result.applied.applied) == 1500 and table_vmids(sqlite_db) == [100]


def test_guest_back_before_the_confirming_read_is_not_removed(sim, sqlite_db, monkeypatch):
    _seed(sqlite_db, [app_row(v, "running", age=timedelta(days=1)) for v in (100, 201)])
    runtime = make_runtime(sim, sqlite_db)
    reads = iter(
        [
            Inventory.of([Guest(100, "pve1", "lxc", "running")]),
            Inventory.of([Guest(100, "pve1", "lxc", "running"), Guest(201, "pve2", "lxc", "running")]),
        ]
    )
    monkeypatch.setattr(runtime.inventory, "read", lambda: next(reads))
    result = runtime.sweeper.run(source="sweep")
    assert result.outcome == "done" and result.dropped == [201]
    assert table_vmids(sqlite_db) == [100, 201]


def test_apply_and_audit_are_one_transaction(sim, sqlite_db):
    """If the audit insert fails, the delete does not happen."""
    _seed(sqlite_db, [app_row(v, "running", age=timedelta(days=1)) for v in (201, 202)])
    runtime = make_runtime(sim, sqlite_db)
    sim.add_guest(100)
    plan = make_plan(runtime.table.fetch_rows(), runtime.inventory.read(), utcnow(), runtime.settings)
    with sqlite_db.engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TRIGGER no_audit BEFORE INSERT ON janitor_audit BEGIN SELECT RAISE(ABORT, 'audit refused'); END"
        )
    with pytest.raises(sa.exc.IntegrityError):
        apply_actions(runtime.table, plan.actions, source="sweep", now=utcnow())
    assert table_vmids(sqlite_db) == [201, 202]
    with sqlite_db.engine.connect() as conn:
        assert store.read_counters(conn)["total_removed"] == 0


def test_concurrent_sqlite_writer_never_sees_locked_and_loses_nothing(sim, sqlite_db):
    sim.add_guest(100)
    _seed(
        sqlite_db,
        [app_row(100, "running", age=timedelta(days=1))]
        + [app_row(v, "error", age=timedelta(days=2)) for v in range(1000, 1030)],
    )
    runtime = make_runtime(sim, sqlite_db, CLEANUP_MAX_DELETE_PERCENT=100)
    path = sqlite_db.engine.url.database
    errors, written = [], []
    stop = threading.Event()

    def writer():
        conn = sqlite3.connect(path, timeout=5)  # the platform's own driver and default timeout
        n = 0
        try:
            while not stop.is_set():
                n += 1
                vmid = 5000 + n
                now = utcnow().replace(tzinfo=None).isoformat(sep=" ")
                old = (utcnow() - timedelta(days=2)).replace(tzinfo=None).isoformat(sep=" ")
                try:
                    with conn:
                        # a fresh deployment (must survive) and a stale ghost (may be removed)
                        conn.execute(
                            "INSERT INTO apps (name, lxc_id, hostname, status, created_at, updated_at) "
                            "VALUES (?, ?, ?, 'deploying', ?, ?)",
                            (f"n{n}", vmid, f"n{n}", now, now),
                        )
                        conn.execute(
                            "INSERT INTO apps (name, lxc_id, hostname, status, created_at, updated_at) "
                            "VALUES (?, ?, ?, 'error', ?, ?)",
                            (f"g{n}", 900000 + n, f"g{n}", old, old),
                        )
                    written.append(vmid)
                except sqlite3.Error as exc:  # "database is locked" would land here
                    errors.append(repr(exc))
                time.sleep(0.002)
        finally:
            conn.close()

    thread = threading.Thread(target=writer)
    thread.start()
    outcomes = []
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        outcomes.append(runtime.sweeper.run(force=True).outcome)
    stop.set()
    thread.join()
    assert errors == []
    assert len(written) > 50 and "done" in outcomes and "failed" not in outcomes
    present = set(table_vmids(sqlite_db))
    assert set(written) <= present  # every fresh deployment survived
    audited = set(_audit_vmids(sqlite_db))
    ghosts = {v for v in present | audited if v is not None and (v >= 900000 or 1000 <= v < 1030)}
    assert not (present & audited)
    assert ghosts == (present | audited) - set(written) - {100}


def _build_big_sqlite(path, n):
    from receiver.db import make_engine

    engine = make_engine(f"sqlite:///{path}")
    schema.upgrade(engine)  # pve-janitor's tables, as an installed receiver's database has them
    table = create_apps_table(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [app_row(10_000 + i, "error", age=timedelta(days=2)) for i in range(n)])
    engine.dispose()


def test_sigkill_during_apply_leaves_all_or_nothing(sim, tmp_path):
    """Old error rows of guests that exist: no confirming read, so the apply starts at once."""
    n = 20_000
    template = tmp_path / "template.db"
    _build_big_sqlite(template, n)
    for i in range(n):
        sim.add_guest(10_000 + i)
    # How long a whole forced sweep takes here, so the kills spread over its second half.
    shutil.copy(template, tmp_path / "timing.db")
    started = time.monotonic()
    timing = subprocess.run(
        cli_command() + ["sweep", "--force"],
        capture_output=True,
        text=True,
        env=janitor_env(sim, type("D", (), {"url": f"sqlite:///{tmp_path / 'timing.db'}"})()),
    )
    full = time.monotonic() - started
    assert timing.returncode == 0, timing.stderr
    rng = random.Random(20261125)
    seen = set()
    for attempt in range(6):
        path = tmp_path / f"kill{attempt}.db"
        shutil.copy(template, path)
        db = type("D", (), {"url": f"sqlite:///{path}"})()
        proc = subprocess.Popen(
            cli_command() + ["sweep", "--force"],
            env=janitor_env(sim, db),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0.4, 1.0) * full)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        conn = sqlite3.connect(path)
        rows = conn.execute("SELECT count(*) FROM apps").fetchone()[0]
        try:
            audited = conn.execute("SELECT count(*) FROM janitor_audit").fetchone()[0]
            removed = conn.execute("SELECT value FROM janitor_counters WHERE name='total_removed'").fetchone()[0]
            both = conn.execute(
                "SELECT count(*) FROM apps a JOIN janitor_audit j ON a.id = CAST(j.row_key AS INTEGER)"
            ).fetchone()[0]
        except (sqlite3.OperationalError, TypeError):  # killed before our tables existed
            audited = removed = both = 0
        conn.close()
        assert (rows, audited) in ((n, 0), (0, n)), (attempt, rows, audited)
        assert removed == audited and both == 0
        seen.add(rows)
    # The kill points are spread so that both outcomes usually occur; report which did.
    print(f"whole sweep {full:.2f} s; states after kill: {sorted(seen)}")


def _entry(i, **changes):
    entry = {
        "table_name": "apps",
        "row_key": str(i),
        "vmid": 200 + i,
        "hostname": f"app{i}.apps.local",
        "action": "delete",
        "reason": "ghost",
        "source": "sweep",
        "detail": "guest does not exist",
        "row_json": store.encode_row({"id": i, "note": "ünïcode, tab\tand\nnewline"}),
        "removed_at": utcnow() - timedelta(hours=i),
    }
    return {**entry, **changes}


def test_audit_entries_read_back_the_same_on_every_database(any_db):
    # PostgreSQL writes them with COPY, the others with an INSERT: the same values either way.
    entries = [_entry(i) for i in range(3)] + [_entry(3, hostname=None, vmid=None, detail=None)]
    with any_db.engine.begin() as conn:
        store.insert_audit(conn, entries)
    with any_db.engine.connect() as conn:
        back = [dict(r) for r in conn.execute(sa.select(store.audit).order_by(store.audit.c.row_key)).mappings()]
    if any_db.kind == "mysql":  # DATETIME keeps whole seconds there
        entries = [{**e, "removed_at": e["removed_at"].replace(microsecond=0)} for e in entries]
    assert [{k: r[k] for k in entries[0]} for r in back] == entries
    assert store.decode_row(back[0]["row_json"]) == {"id": 0, "note": "ünïcode, tab\tand\nnewline"}


def test_a_failing_audit_write_is_a_database_error_and_writes_nothing(postgres_db):
    with pytest.raises(sa.exc.DBAPIError) as failed:
        with postgres_db.engine.begin() as conn:
            store.insert_audit(conn, [_entry(0), _entry(1, row_json=None)])  # row_json is NOT NULL
    assert "row_json" in str(failed.value.orig)
    with postgres_db.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(store.audit)).scalar() == 0
