"""`pve-janitor restore`: ids that cannot exist, and what ``restore()`` refuses.

The round trip through the CLI (every column back, the second restore refused, a
UNIQUE value taken by now) is in test_sweep_cli.py; these are the edges around it.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa
from conftest import janitor_env, make_runtime, run_cli

from receiver import store
from receiver.restore import AuditNotFound, RestoreRefused, restore
from receiver.simulator.scene import app_row, create_apps_table

# Outside 1 .. 2**63-1: no database can hold them, and no entry has them.
IMPOSSIBLE_IDS = ["99999999999999999999", str(2**63), "0", "-1", "-99999999999999999999"]
# Possible ids that no entry has: beyond a 32-bit column (PostgreSQL's and MariaDB's INTEGER), and the last one.
ABSENT_IDS = [str(2**31), str(2**63 - 1)]


def _audit_count(db) -> int:
    with db.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(store.audit)).scalar_one()


def _row(db, vmid: int) -> dict:
    """The row as stored, every column, read without any type of ours in between."""
    with db.engine.connect() as conn:
        return dict(conn.execute(sa.text("SELECT * FROM apps WHERE lxc_id = :v"), {"v": vmid}).mappings().one())


def _one_ghost_removed(sim, db):
    """A table with one running app and one ghost, swept: the ghost's audit id and row."""
    table = create_apps_table(db.engine)
    sim.add_guest(100)
    with db.engine.begin() as conn:
        conn.execute(
            table.insert(),
            [app_row(100, "running", age=timedelta(days=1)), app_row(200, "error", age=timedelta(days=2))],
        )
    ghost = _row(db, 200)
    runtime = make_runtime(sim, db, CLEANUP_GRACE_MINUTES=0)
    result = runtime.sweeper.run(source="manual")
    assert result.outcome == "done" and result.applied is not None and len(result.applied.applied) == 1
    with db.engine.connect() as conn:
        audit_id = conn.execute(sa.select(store.audit.c.id)).scalar_one()
    return runtime, audit_id, ghost


@pytest.mark.parametrize("audit_id", IMPOSSIBLE_IDS + ABSENT_IDS)
def test_restore_of_an_id_out_of_range_or_absent_is_not_found(sim, any_db, audit_id):
    _, real_id, _ = _one_ghost_removed(sim, any_db)
    # "--": without it the command line reads "-1" as an option (a usage error, exit 2)
    result = run_cli(["restore", "--", audit_id], janitor_env(sim, any_db))
    assert result.code == 1, (result.out, result.err)
    assert f"no audit entry {audit_id}" in result.err
    assert "Traceback" not in result.err
    assert _audit_count(any_db) == 1
    with any_db.engine.connect() as conn:
        assert conn.execute(sa.select(store.audit.c.restored_at).where(store.audit.c.id == real_id)).scalar() is None
        assert store.read_counters(conn)["rows_restored"] == 0


@pytest.mark.parametrize("audit_id", [0, -1, 2**63, 10**20, -(10**20)])
def test_restore_refuses_an_impossible_id_before_touching_the_database(sim, sqlite_db, audit_id):
    runtime, _, _ = _one_ghost_removed(sim, sqlite_db)
    statements = []
    sa.event.listen(sqlite_db.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    with pytest.raises(AuditNotFound, match=f"no audit entry {audit_id}"):
        restore(runtime.table, audit_id)
    assert statements == []


def test_restore_puts_back_every_column_once_then_refuses(sim, any_db):
    runtime, audit_id, ghost = _one_ghost_removed(sim, any_db)
    done = restore(runtime.table, audit_id)
    assert done.action == "delete" and done.row_key == str(ghost["id"])
    assert _row(any_db, 200) == ghost
    with pytest.raises(RestoreRefused, match="already restored"):
        restore(runtime.table, audit_id)
    with any_db.engine.connect() as conn:
        assert store.read_counters(conn)["rows_restored"] == 1
        assert conn.execute(sa.text("SELECT count(*) FROM apps")).scalar_one() == 2
