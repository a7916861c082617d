"""The wrong deletions found from outside, each a named case that the released code failed.

1. watcher + VMID reuse: a row the platform wrote for a reused VMID after the
   watcher's confirming read was planned against a made-up empty inventory and deleted;
2. a node without quorum answering from its stale guest list;
3. the VMID mapped to a wrong column (``CLEANUP_VMID_COLUMN=id``);
4. a misspelled setting (``CLEANUP_DRYRUN``): see tests/test_config.py.

Plus the rule that came with case 3: a plan that empties the table is refused whatever its size.
"""

from __future__ import annotations

import itertools
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import after_read, janitor_env, make_runtime, run_cli, running_apps, table_vmids

from receiver import store
from receiver.inbox import Inbox
from receiver.metrics import Metrics
from receiver.model import Event
from receiver.simulator.scene import app_row, create_apps_table
from receiver.watcher import Watcher

_ids = itertools.count(1)


def stop_event(vmid: int) -> Event:
    n = next(_ids)
    return Event(f"wd-{n}", vmid, "post-stop", "pve1", float(n))


def rows(db) -> list[dict]:
    with db.engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.text("SELECT * FROM apps ORDER BY id")).mappings()]


def live_world(sim, db, vmids=range(100, 105), **overrides):
    """Guests ``vmids`` running, each with a day-old row; a watcher on them."""
    table = running_apps(sim, db, vmids)
    runtime = make_runtime(sim, db, **overrides)
    inbox = Inbox(runtime.engine)
    return table, runtime, inbox, Watcher(runtime, inbox, Metrics())


# --- 1. watcher + VMID reuse ------------------------------------------------------

REUSE_SETTINGS: dict[str, tuple[dict[str, Any], str | None]] = {
    "null timestamps": ({}, None),
    "grace 0": ({"CLEANUP_GRACE_MINUTES": 0}, "now"),
    "timestamps unmapped": ({"CLEANUP_CREATED_COLUMN": "", "CLEANUP_UPDATED_COLUMN": ""}, "now"),
}


@pytest.mark.parametrize("case", sorted(REUSE_SETTINGS))
def test_watcher_vmid_reused_right_after_the_confirming_read_keeps_the_new_apps_row(sim, any_db, case):
    overrides, stamps = REUSE_SETTINGS[case]
    table, runtime, inbox, watcher = live_world(sim, any_db, **overrides)

    def reuse_103():
        # The platform drops the ghost, deploys a new app on the freed VMID 103, and the new
        # guest starts: all right after the read that confirmed 103 gone.
        new = app_row(103, "running", age=timedelta(0), name="newapp", port_base=900)
        if stamps is None:
            new.update(created_at=None, updated_at=None)
        with any_db.engine.begin() as conn:
            conn.execute(table.delete().where(table.c.lxc_id == 103))
            conn.execute(table.insert(), [new])
        sim.add_guest(103, name="newapp.apps.local")

    sim.stop_guest(103)
    sim.destroy_guest(103)
    inbox.accept(stop_event(103))
    after_read(sim, 2, reuse_103)
    for _ in range(3):
        watcher.tick()
    assert [r["name"] for r in rows(any_db) if r["lxc_id"] == 103] == ["newapp"]
    with any_db.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(store.audit)).scalar_one() == 0


def test_watcher_vmid_reused_between_the_rows_read_and_the_confirming_read_keeps_the_row(sim, sqlite_db):
    table, runtime, inbox, watcher = live_world(sim, sqlite_db, CLEANUP_GRACE_MINUTES=0)
    sim.stop_guest(103)
    sim.destroy_guest(103)
    inbox.accept(stop_event(103))
    fetch = runtime.table.fetch_rows

    def rows_then_reuse(vmids=None):
        found = fetch(vmids=vmids)
        if vmids is not None and sim.guest(103) is None:
            sim.add_guest(103, name="app103.apps.local")  # a new guest on the same VMID, same row kept
        return found

    runtime.table.fetch_rows = rows_then_reuse
    for _ in range(3):
        watcher.tick()
    assert 103 in table_vmids(sqlite_db) and sim.guest(103) is not None


# --- 2. a node without quorum ----------------------------------------------------


def split_and_deploy_150(sim, db, table) -> None:
    """The answering node loses quorum; app 150 is deployed on the quorate side after the
    split (its row is a day old by now): this node's list does not have it."""
    sim.set_quorate(False)
    sim.add_guest(150, name="app150.apps.local")
    with db.engine.begin() as conn:
        conn.execute(table.insert(), [app_row(150, "running", age=timedelta(days=1))])


def test_sweep_on_a_node_without_quorum_removes_nothing_and_says_no_quorum(sim, sqlite_db):
    table, runtime, inbox, watcher = live_world(sim, sqlite_db)
    split_and_deploy_150(sim, sqlite_db, table)
    before = rows(sqlite_db)
    env = janitor_env(sim, sqlite_db)
    result = run_cli(["sweep", "--json"], env)
    assert result.code == 3, result.out
    assert result.json()["refusal"] == "no_quorum"
    assert rows(sqlite_db) == before
    forced = run_cli(["sweep", "--force", "--json"], env)  # --force lifts nothing of this
    assert forced.code == 3 and forced.json()["refusal"] == "no_quorum"
    check = run_cli(["check"], env)
    assert check.code == 3 and "FAILED  quorum" in check.out and "not quorate" in check.out
    sim.set_quorate(True)
    healed = run_cli(["sweep", "--json"], env)
    assert healed.code == 0 and healed.json()["outcome"] == "nothing", healed.out
    assert rows(sqlite_db) == before


def test_watcher_on_a_node_without_quorum_keeps_watching_and_removes_once_quorum_is_back(sim, any_db):
    table, runtime, inbox, watcher = live_world(sim, any_db)
    split_and_deploy_150(sim, any_db, table)
    sim.stop_guest(150)
    inbox.accept(stop_event(150))
    for _ in range(3):
        watcher.tick()
    assert 150 in table_vmids(any_db) and watcher.watched == [150]
    assert "not quorate" in watcher.last_error
    metrics = watcher.metrics.render().decode()
    assert 'pve_janitor_watcher_errors_total{kind="no_quorum"} 3.0' in metrics
    sim.set_quorate(True)
    watcher.tick()
    assert 150 in table_vmids(any_db)  # it exists: kept, marked stopped
    sim.destroy_guest(150)
    watcher.tick()
    assert 150 not in table_vmids(any_db)


def test_a_standalone_node_has_no_cluster_entry_and_is_quorate(sim, sqlite_db):
    sim.standalone = True
    table, runtime, inbox, watcher = live_world(sim, sqlite_db)
    sim.stop_guest(101)
    sim.destroy_guest(101)
    result = runtime.sweeper.run()
    assert result.outcome == "done" and table_vmids(sqlite_db) == [100, 102, 103, 104]


# --- 3. the VMID mapped to a wrong column ------------------------------------------


def test_vmid_mapped_to_the_id_column_removes_nothing_and_check_fails_the_mapping(sim, any_db):
    # 8 rows: 7 live apps (VMIDs 100-106) and one ghost (150); ids 1-8 are no VMIDs.
    table = create_apps_table(any_db.engine)
    with any_db.engine.begin() as conn:
        conn.execute(table.insert(), [app_row(v, "running", age=timedelta(days=1)) for v in (*range(100, 107), 150)])
    for v in range(100, 107):
        sim.add_guest(v, name=f"app{v}.apps.local")
    before = rows(any_db)
    env = janitor_env(sim, any_db, CLEANUP_VMID_COLUMN="id")
    result = run_cli(["sweep", "--json"], env)
    assert result.code == 0, result.out + result.err
    body = result.json()
    assert body["applied"] == 0 and body["planned"] == []
    assert sum(1 for r in body["reports"] if r["kind"] == "unreadable_row") == 8
    assert "outside Proxmox's range" in body["reports"][0]["detail"]
    assert rows(any_db) == before
    check = run_cli(["check"], env)
    assert check.code == 3 and "FAILED  mapping" in check.out, check.out
    right = run_cli(["check"], janitor_env(sim, any_db))
    assert right.code == 0 and "ok      mapping" in right.out, right.out


def test_check_fails_a_vmid_column_whose_values_mostly_repeat(sim, sqlite_db):
    metadata = sa.MetaData()
    table = sa.Table(
        "apps",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("lxc_id", sa.Integer),
        sa.Column("node_vmid", sa.Integer),
        sa.Column("hostname", sa.String(50)),
        sa.Column("status", sa.String(20)),
        sa.Column("created_at", sa.DateTime),
        sa.Column("updated_at", sa.DateTime),
    )
    metadata.create_all(sqlite_db.engine)
    with sqlite_db.engine.begin() as conn:
        conn.execute(
            table.insert(),
            [
                {"id": i, "lxc_id": 100 + i, "node_vmid": 100 + i % 2, "hostname": f"h{i}", "status": "running"}
                for i in range(10)
            ],
        )
    env = janitor_env(sim, sqlite_db, CLEANUP_PORT_COLUMNS="", CLEANUP_VMID_COLUMN="node_vmid")
    check = run_cli(["check"], env)
    assert check.code == 3 and "FAILED  mapping" in check.out and "share their VMID" in check.out, check.out


@pytest.mark.parametrize("value", [5, 0, -101, 1_000_000_000, "99"])
def test_a_value_that_cannot_be_a_vmid_makes_the_row_unreadable_never_a_ghost(sim, sqlite_db, value):
    metadata = sa.MetaData()
    table = sa.Table(
        "apps",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("lxc_id", sa.String(20)),
        sa.Column("status", sa.String(20)),
    )
    metadata.create_all(sqlite_db.engine)
    with sqlite_db.engine.begin() as conn:
        conn.execute(
            table.insert(),
            [
                {"id": 1, "lxc_id": str(value), "status": "running"},
                {"id": 2, "lxc_id": "150", "status": "running"},
                {"id": 3, "lxc_id": "100", "status": "running"},
            ],
        )
    sim.add_guest(100)
    runtime = make_runtime(
        sim,
        sqlite_db,
        CLEANUP_PORT_COLUMNS="",
        CLEANUP_HOSTNAME_COLUMN="",
        CLEANUP_CREATED_COLUMN="",
        CLEANUP_UPDATED_COLUMN="",
    )
    result = runtime.sweeper.run()
    assert result.outcome == "done" and result.applied is not None and result.plan is not None
    assert [a.row.key for a in result.applied.applied] == [2]
    assert [r.kind for r in result.plan.reports if r.vmid is None] == ["unreadable_row"]
    with sqlite_db.engine.connect() as conn:
        assert sorted(conn.execute(sa.select(table.c.id)).scalars()) == [1, 3]


# --- the plan that would empty the table ---------------------------------------------


def test_a_plan_that_empties_the_table_is_refused_whatever_its_size_and_force_lifts_it(sim, any_db):
    table = create_apps_table(any_db.engine)
    with any_db.engine.begin() as conn:
        conn.execute(table.insert(), [app_row(v, "running", age=timedelta(days=1)) for v in (150, 151)])
    sim.add_guest(100)  # the cluster has guests, none of them the table's
    env = janitor_env(sim, any_db)
    before = rows(any_db)
    refused = run_cli(["sweep", "--json"], env)
    assert refused.code == 3 and refused.json()["refusal"] == "would_empty", refused.out
    assert rows(any_db) == before
    forced = run_cli(["sweep", "--force", "--json"], env)
    assert forced.code == 0 and forced.json()["applied"] == 2, forced.out
    assert table_vmids(any_db) == []


def test_the_watcher_never_empties_the_table(sim, sqlite_db):
    table, runtime, inbox, watcher = live_world(sim, sqlite_db, vmids=(100,))
    sim.add_guest(200)
    sim.stop_guest(100)
    sim.destroy_guest(100)
    inbox.accept(stop_event(100))
    for _ in range(2):
        watcher.tick()
    assert table_vmids(sqlite_db) == [100] and watcher.watched == [100]
    assert "all 1 rows" in watcher.last_error


def test_no_quorum_is_named_in_the_run_answer_stats_metrics_and_log(sim, sqlite_db, caplog):
    from receiver.serve import build

    table, runtime, inbox, watcher = live_world(sim, sqlite_db, CLEANUP_ADMIN_TOKEN="admin-token-0123456789")
    parts = build(runtime.settings, runtime)
    client = parts["app"].test_client()
    sim.set_quorate(False)
    answer = client.post(
        "/api/v1/system/cleanup/run?force=true", headers={"Authorization": "Bearer admin-token-0123456789"}
    )
    assert answer.status_code == 422 and answer.get_json()["refusal"] == "no_quorum", answer.get_json()
    stats = client.get("/api/v1/system/cleanup/stats").get_json()
    assert stats["last_sweep"]["outcome"] == "refused" and stats["last_sweep"]["refusal"] == "no_quorum"
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'pve_janitor_refusals_total{reason="no_quorum",source="sweep"} 1.0' in metrics
    assert any("no_quorum" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_hidden_guests_are_named_in_stats_and_metrics(sim, sqlite_db):
    from receiver.serve import build

    table, runtime, inbox, watcher = live_world(sim, sqlite_db, CLEANUP_ADMIN_TOKEN="admin-token-0123456789")
    parts = build(runtime.settings, runtime)
    client = parts["app"].test_client()
    sim.set_visible({100, 101, 102})  # 103 and 104 run, hidden from the token by an ACL
    sim.stop_guest(102)
    sim.destroy_guest(102)
    answer = client.post("/api/v1/system/cleanup/run", headers={"Authorization": "Bearer admin-token-0123456789"})
    body = answer.get_json()
    assert answer.status_code == 200 and body["applied"] == 1 and body["hidden_guests"] == [103, 104], body
    assert client.get("/api/v1/system/cleanup/stats").get_json()["hidden_guests"] == [103, 104]
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'pve_janitor_hidden_guests{source="sweep"} 2.0' in metrics
    assert table_vmids(sqlite_db) == [100, 101, 103, 104]


# --- found by the model-based test ------------------------------------------------


@pytest.mark.parametrize("entry", ["watcher", "sweep"])
def test_a_hidden_guest_created_between_the_acl_list_and_the_confirming_read_keeps_its_row(sim, sqlite_db, entry):
    # Guest 100 is gone; an ACL will hide whatever holds VMID 100.  Right after the ACL list
    # is read (no entry on /vms/100 yet: no such guest), a new guest 100 is created, hidden by
    # its own NoAccess entry: the confirming read does not list it.  The ACL list read after
    # the confirming read names /vms/100, so 100 is asked about, and its row stays.
    table, runtime, inbox, watcher = live_world(sim, sqlite_db, vmids=range(100, 105))
    sim.stop_guest(100)
    sim.destroy_guest(100)
    sim.set_visible({101, 102, 103, 104})
    acl_list = runtime.inventory.hideable_vmids
    reads = []

    def acl_then_new_hidden_guest():
        proof = acl_list()
        reads.append(proof)
        if len(reads) == 1:
            sim.add_guest(100, name="new100")
        return proof

    runtime.inventory.hideable_vmids = acl_then_new_hidden_guest
    if entry == "watcher":
        inbox.accept(stop_event(100))
        watcher.tick()
    else:
        assert runtime.sweeper.run().hidden == [100]
    assert 100 in table_vmids(sqlite_db) and sim.guest(100) is not None
    assert reads[0] == frozenset() and reads[1] == frozenset({100})
