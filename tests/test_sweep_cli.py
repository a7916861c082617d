"""`pve-janitor sweep`, `history`, `restore`, `check` as real subprocesses.

Against the simulator over HTTPS, on SQLite files and (when configured, always
in CI) PostgreSQL and MariaDB.
"""

from __future__ import annotations

import gc
from datetime import timedelta

import pytest
import sqlalchemy as sa
from conftest import after_read, janitor_env, make_runtime, run_cli, table_vmids

from receiver import store
from receiver.simulator.scene import ERROR_VMIDS, RUNNING_VMIDS, app_row, create_apps_table, seed_database


def snapshot(db, table="apps"):
    with db.engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.text(f"SELECT * FROM {table} ORDER BY id")).mappings()]


def audit_count(db):
    with db.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(store.audit)).scalar_one()


def counters(db):
    with db.engine.connect() as conn:
        return store.read_counters(conn)


def test_seed_scene_guard_then_force_leaves_exactly_the_six(seed_sim, seeded):
    env = janitor_env(seed_sim, seeded)
    before = snapshot(seeded)
    refused = run_cli(["sweep"], env)
    assert refused.code == 3, refused.err
    assert "CLEANUP_MAX_DELETE_PERCENT" in refused.out
    assert snapshot(seeded) == before

    forced = run_cli(["sweep", "--force", "--json"], env)
    assert forced.code == 0, forced.err
    result = forced.json()
    assert result["outcome"] == "done" and result["applied"] == 41
    assert table_vmids(seeded) == list(RUNNING_VMIDS)
    assert audit_count(seeded) == 41
    c = counters(seeded)
    assert (c["ghost_apps_removed"], c["total_removed"], c["ports_freed"]) == (41, 41, 82)

    again = run_cli(["sweep", "--json"], env)
    assert again.code == 0 and again.json()["outcome"] == "nothing"
    assert audit_count(seeded) == 41


def test_dry_run_plans_and_changes_nothing(seed_sim, seeded):
    env = janitor_env(seed_sim, seeded)
    before = snapshot(seeded)
    result = run_cli(["sweep", "--dry-run", "--force", "--json"], env)
    assert result.code == 0, result.err
    data = result.json()
    assert data["outcome"] == "dry_run"
    assert sorted(a["vmid"] for a in data["planned"]) == list(ERROR_VMIDS)
    assert {a["reason"] for a in data["planned"]} == {"ghost"}
    assert {r["kind"] for r in data["reports"]} == {"unmanaged_guest"}
    assert snapshot(seeded) == before and audit_count(seeded) == 0
    env["CLEANUP_DRY_RUN"] = "true"
    assert run_cli(["sweep", "--force"], env).code == 0
    assert snapshot(seeded) == before


def test_readable_plan_table(seed_sim, seeded):
    out = run_cli(["sweep", "--dry-run"], janitor_env(seed_sim, seeded)).out
    header = next(line for line in out.splitlines() if "ACTION" in line)
    for column in ("ROW", "VMID", "HOSTNAME", "STATUS", "AGE", "REASON"):
        assert column in header
    assert "app120.apps.local" in out and "unmanaged_guest" in out
    assert out.strip().splitlines()[-1].startswith("sweep")


FAIL_CLOSED = {
    "refused": lambda sim, env: sim.set_fault("refuse"),
    "timeout": lambda sim, env: (sim.set_fault("slow", delay=3.0), env.update(PVE_TIMEOUT="1")),
    "http500": lambda sim, env: sim.set_fault("http500"),
    "http401": lambda sim, env: env.update(PVE_TOKEN_VALUE="wrong-token-value"),
    "no VM.Audit": lambda sim, env: sim.set_vm_audit(False),
    "empty inventory": lambda sim, env: [sim.destroy_guest(v) if sim.guest(v) else None for v in list(sim.vmids())],
}


@pytest.mark.parametrize("fault", list(FAIL_CLOSED))
def test_fail_closed_changes_nothing_and_exits_3_even_with_force(seed_sim, seeded, fault):
    env = janitor_env(seed_sim, seeded)
    for v in list(seed_sim.vmids()):
        if seed_sim.guest(v)["status"] == "running" and fault == "empty inventory":
            seed_sim.stop_guest(v)
    FAIL_CLOSED[fault](seed_sim, env)
    before = snapshot(seeded)
    result = run_cli(["sweep", "--force", "--json"], env)
    assert result.code == 3, (result.out, result.err)
    assert result.json()["outcome"] == "refused"
    assert snapshot(seeded) == before and audit_count(seeded) == 0
    assert "wrong-token-value" not in result.out + result.err
    assert seed_sim.env()["PVE_TOKEN_VALUE"] not in result.out + result.err


def test_offline_node_rows_are_kept(seed_sim, seeded):
    seed_sim.set_node_online("pve2", False, stats_age=301)  # its guests listed as status unknown
    result = run_cli(["sweep", "--force", "--json"], janitor_env(seed_sim, seeded))
    assert result.code == 0, result.err
    assert table_vmids(seeded) == list(RUNNING_VMIDS)  # pve2's running apps included


def test_restore_round_trip_and_refusal_when_unique_value_taken(seed_sim, seeded):
    env = janitor_env(seed_sim, seeded)
    before = {r["lxc_id"]: r for r in snapshot(seeded)}
    assert run_cli(["sweep", "--force"], env).code == 0
    entries = run_cli(["history", "--limit", "100", "--json"], env).json()
    assert len(entries) == 41 and all(e["reason"] == "ghost" for e in entries)
    by_vmid = {e["vmid"]: e["id"] for e in entries}

    ok = run_cli(["restore", str(by_vmid[120])], env)
    assert ok.code == 0, ok.err
    restored = {r["lxc_id"]: r for r in snapshot(seeded)}[120]
    assert restored == before[120]
    assert run_cli(["restore", str(by_vmid[120])], env).code == 3  # already restored

    # The platform re-used app121's hostname for a new app: restoring 121 must refuse.
    with seeded.engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO apps (name, lxc_id, hostname, status) VALUES ('new', 500, 'app121.apps.local', 'running')"
            )
        )
    state = snapshot(seeded)
    refused = run_cli(["restore", str(by_vmid[121])], env)
    assert refused.code == 3 and "hostname" in refused.err and "taken" in refused.err
    assert snapshot(seeded) == state
    assert run_cli(["restore", "99999"], env).code == 1


def test_mark_action_marks_and_restore_unmarks(seed_sim, seeded):
    env = janitor_env(seed_sim, seeded, CLEANUP_ACTION="mark")
    assert run_cli(["sweep", "--force"], env).code == 0
    rows = snapshot(seeded)
    assert len(rows) == 47
    assert sorted(r["lxc_id"] for r in rows if r["status"] == "destroyed") == list(ERROR_VMIDS)
    assert run_cli(["sweep", "--json"], env).json()["outcome"] == "nothing"
    entry = run_cli(["history", "--limit", "1", "--json"], env).json()[0]
    assert entry["action"] == "mark"
    assert run_cli(["restore", str(entry["id"])], env).code == 0
    assert {r["lxc_id"]: r["status"] for r in snapshot(seeded)}[entry["vmid"]] == "error"


def test_bad_settings_exit_2_naming_every_variable(seed_sim, sqlite_db):
    seed_database(sqlite_db.engine)
    env = janitor_env(seed_sim, sqlite_db, CLEANUP_DRY_RUN="perhaps", CLEANUP_ACTION="nuke")
    result = run_cli(["sweep"], env)
    assert result.code == 2
    assert "CLEANUP_DRY_RUN" in result.err and "CLEANUP_ACTION" in result.err
    assert "Traceback" not in result.err

    env = janitor_env(seed_sim, sqlite_db, CLEANUP_HOSTNAME_COLUMN="host_name", CLEANUP_TABLE="apps")
    result = run_cli(["sweep"], env)
    assert result.code == 2 and "CLEANUP_HOSTNAME_COLUMN" in result.err and "host_name" in result.err
    result = run_cli(["sweep"], janitor_env(seed_sim, sqlite_db, CLEANUP_TABLE="deployments"))
    assert result.code == 2 and "CLEANUP_TABLE" in result.err


def test_unreachable_database_is_a_clear_error(seed_sim, tmp_path):
    env = janitor_env(seed_sim, type("D", (), {"url": "postgresql+psycopg://nobody:pw@127.0.0.1:1/x"})())
    result = run_cli(["sweep"], env)
    assert result.code == 3 and "database" in result.err and "Traceback" not in result.err
    assert "pw@" not in result.err


def test_check_reports_each_line(seed_sim, seeded):
    env = janitor_env(seed_sim, seeded)
    ok = run_cli(["check"], env)
    assert ok.code == 0, ok.out
    assert [line.split()[0] for line in ok.out.splitlines()] == ["ok"] * 9
    assert "Sys.Audit on /access" in ok.out.splitlines()[-1]
    assert "quorate" in ok.out and "mapping" in ok.out and "Sys.Audit on /" in ok.out
    seed_sim.set_sys_audit(False, only_access=True)  # slower sweeps, not a failure
    slow = run_cli(["check"], env)
    assert slow.code == 0, slow.out
    assert [line.split()[0] for line in slow.out.splitlines()] == ["ok"] * 6 + ["WARN"] + ["ok"] * 2 + ["WARN"]
    seed_sim.set_sys_audit(False)  # on / too: quorum cannot be checked, nothing would ever go
    blind = run_cli(["check"], env)
    assert blind.code == 3 and "lacks Sys.Audit on /:" in blind.out and "pveum acl modify / --users" in blind.out
    seed_sim.set_sys_audit(True)
    assert "one /cluster/nextid request per ghost" in slow.out
    seed_sim.set_vm_audit(False)
    bad = run_cli(["check"], env)
    assert bad.code == 3 and "FAILED" in bad.out and "VM.Audit" in bad.out


def test_young_and_protected_rows_survive_a_real_sweep(sim, sqlite_db):
    table = create_apps_table(sqlite_db.engine)
    sim.add_guest(100)
    with sqlite_db.engine.begin() as conn:
        conn.execute(
            table.insert(),
            [
                app_row(100, "running", age=timedelta(days=1)),
                app_row(201, "deploying", age=timedelta(days=1)),
                app_row(202, "running", age=timedelta(minutes=2)),
                app_row(203, "running", age=timedelta(days=1)),
            ],
        )
    result = run_cli(["sweep", "--json"], janitor_env(sim, sqlite_db))
    assert result.code == 0, result.err
    assert table_vmids(sqlite_db) == [100, 201, 202]


# --- the ACL list instead of one /cluster/nextid request per ghost ------------------------------
# Guests 200-204 exist; rows 150-152 are ghosts and sort before them, so when every ghost is
# checked, a guest hidden by an ACL (204) is asked about last.
GUESTS, GHOSTS = tuple(range(200, 205)), (150, 151, 152)


@pytest.fixture
def acl_world(sim, sqlite_db):
    table = create_apps_table(sqlite_db.engine)
    with sqlite_db.engine.begin() as conn:
        conn.execute(table.insert(), [app_row(v, "running", age=timedelta(days=1)) for v in GHOSTS + GUESTS])
    for v in GUESTS:
        sim.add_guest(v)
    return sim, sqlite_db, janitor_env(sim, sqlite_db)


def sweep_json(env):
    result = run_cli(["sweep", "--json"], env)
    return result.code, result.json()


def test_no_fine_grained_acl_means_no_nextid_request(acl_world):
    sim, db, env = acl_world
    code, result = sweep_json(env)
    assert code == 0 and result["applied"] == 3, result
    assert table_vmids(db) == list(GUESTS)
    assert sim.request_count("/cluster/nextid") == 0
    assert sim.request_count("/access/acl") == 2  # on both sides of the confirming read
    sim.reset_counts()
    code, result = sweep_json(env)  # nothing left to remove: nothing asked
    assert (code, result["outcome"]) == (0, "nothing")
    assert sim.request_count("/access/acl") == sim.request_count("/cluster/nextid") == 0


def test_a_stale_acl_entry_on_a_ghost_costs_one_check(acl_world):
    sim, db, env = acl_world
    sim.add_acl("/vms/151", "PVEVMUser", ugid="alice@pve", type="user")
    code, result = sweep_json(env)
    assert code == 0 and result["applied"] == 3, result
    assert sim.request_count("/cluster/nextid") == 1


def hidden_204_kept_and_ghosts_gone(db, code, result):
    assert code == 0 and result["outcome"] == "done" and result["applied"] == 3, result
    assert result["hidden_guests"] == [204]
    assert [r["vmid"] for r in result["reports"] if r["kind"] == "hidden_guest"] == [204]
    assert table_vmids(db) == list(GUESTS) and audit_count(db) == 3


def test_a_guest_hidden_by_its_own_acl_keeps_its_row_and_only_it_is_asked_about(acl_world):
    sim, db, env = acl_world
    sim.set_visible(set(GUESTS) - {204})
    code, result = sweep_json(env)
    hidden_204_kept_and_ghosts_gone(db, code, result)
    assert sim.request_count("/cluster/nextid") == 1  # four ghosts planned, one could be hidden
    sim.reset_counts()
    code, again = sweep_json(env)  # the hidden guest does not stop later sweeps either
    assert code == 0 and again["outcome"] == "done" and again["hidden_guests"] == [204], again


def test_a_pool_noaccess_proves_nothing_so_every_ghost_is_asked_about(acl_world):
    sim, db, env = acl_world
    sim.set_visible(set(GUESTS) - {204}, via="pool")
    code, result = sweep_json(env)
    hidden_204_kept_and_ghosts_gone(db, code, result)
    assert sim.request_count("/cluster/nextid") == 4


def test_without_sys_audit_on_access_every_ghost_is_asked_about(acl_world):
    sim, db, env = acl_world
    sim.set_sys_audit(False, only_access=True)
    sim.set_visible(set(GUESTS) - {204})
    code, result = sweep_json(env)
    hidden_204_kept_and_ghosts_gone(db, code, result)
    assert sim.request_count("/cluster/nextid") == 4
    assert sim.request_count("/access/acl") == 0


def test_without_sys_audit_on_root_quorum_is_unknown_and_nothing_goes(acl_world):
    sim, db, env = acl_world
    sim.set_sys_audit(False)
    before = snapshot(db)
    code, result = sweep_json(env)
    assert code == 3 and result["refusal"] == "privilege", result
    assert "Sys.Audit on /" in result["reason"]
    assert snapshot(db) == before and audit_count(db) == 0


def test_an_unreadable_acl_list_falls_back_to_asking_about_each_ghost(acl_world):
    sim, db, env = acl_world
    sim.set_acl_fault(500)
    sim.set_visible(set(GUESTS) - {204})
    code, result = sweep_json(env)
    hidden_204_kept_and_ghosts_gone(db, code, result)
    assert sim.request_count("/cluster/nextid") == 4


def test_a_sweep_keeps_the_cyclic_gc_off_its_objects_and_always_restores_it(acl_world, monkeypatch):
    sim, db, _ = acl_world
    runtime = make_runtime(sim, db)
    read, during = runtime.inventory.read, []

    def read_and_look():
        during.append((gc.isenabled(), gc.get_freeze_count() > 0))
        return read()

    monkeypatch.setattr(runtime.inventory, "read", read_and_look)
    assert gc.isenabled() and gc.get_freeze_count() == 0
    assert runtime.sweeper.run().outcome == "done"
    # Off while reading and planning; on for the confirming read and the apply (which may
    # wait for a lock), with what existed before frozen.
    assert during == [(False, False), (True, True)]
    assert gc.isenabled() and gc.get_freeze_count() == 0

    def broken_read():
        during.append((gc.isenabled(), gc.get_freeze_count() > 0))
        raise RuntimeError("a bug in a read")

    monkeypatch.setattr(runtime.inventory, "read", broken_read)
    with pytest.raises(RuntimeError):
        runtime.sweeper.run()
    assert during[-1] == (False, False) and gc.isenabled() and gc.get_freeze_count() == 0
    sim.stop_guest(200)
    sim.destroy_guest(200)  # a ghost again, for a confirming read that fails
    monkeypatch.setattr(runtime.inventory, "read", lambda: broken_read() if len(during) > 3 else read_and_look())
    with pytest.raises(RuntimeError):
        runtime.sweeper.run()
    assert during[-1] == (True, True) and gc.isenabled() and gc.get_freeze_count() == 0


def test_an_acl_lifted_between_the_two_reads_cannot_let_a_hidden_guest_go(acl_world):
    # 204 runs, hidden by a NoAccess on /vms/204 in both reads; the ACL is lifted right after
    # the confirming read.  The list was read between the two reads and named 204, so it is
    # asked about: in use, its row is kept (the ghosts go).
    sim, db, _ = acl_world
    sim.set_visible(set(GUESTS) - {204})
    after_read(sim, 2, lambda: sim.set_visible(None))
    result = make_runtime(sim, db).sweeper.run()
    assert (result.outcome, result.hidden) == ("done", [204]), result.reason
    assert table_vmids(db) == list(GUESTS)
    assert sim.request_count("/cluster/nextid") == 1
