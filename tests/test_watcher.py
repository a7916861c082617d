"""The watcher, tick by tick, against the simulator over HTTPS and a real database."""

from __future__ import annotations

import itertools
import time
from datetime import timedelta

import pytest
import sqlalchemy as sa
from conftest import after_read, make_runtime, running_apps, table_vmids

from receiver import store
from receiver.inbox import Inbox
from receiver.lease import Lease
from receiver.model import Event
from receiver.simulator.scene import app_row, create_apps_table
from receiver.timeutil import utcnow
from receiver.watcher import Watcher

_ids = itertools.count(1)


def event(vmid, phase, ts=None):
    n = next(_ids)
    return Event(f"ev-{n}", vmid, phase, "pve1", float(ts if ts is not None else n))


def statuses(db):
    with db.engine.connect() as conn:
        return dict(conn.execute(sa.text("SELECT lxc_id, status FROM apps")).all())


def audit_sources(db):
    with db.engine.connect() as conn:
        return list(conn.execute(sa.select(store.audit.c.vmid, store.audit.c.source)).all())


@pytest.fixture
def world(sim, any_db):
    """Guests 100-104 running, each with a day-old row."""
    running_apps(sim, any_db)
    runtime = make_runtime(sim, any_db, CLEANUP_TASK_POLL_SECONDS=0.5)
    inbox = Inbox(runtime.engine)
    return sim, any_db, runtime, inbox, Watcher(runtime, inbox)


def stopped_and_destroyed(sim, inbox, vmid):
    """The usual flow: the guest is stopped (its hook posts post-stop), then destroyed."""
    sim.stop_guest(vmid)
    sim.destroy_guest(vmid)
    inbox.accept(event(vmid, "post-stop"))


def vm_reads(sim):
    return sim.request_count("/cluster/resources")


def test_stop_then_destroy_removes_the_row_after_a_confirming_read(world):
    sim, db, runtime, inbox, watcher = world
    sim.stop_guest(101)
    inbox.accept(event(101, "pre-stop"))
    inbox.accept(event(101, "post-stop"))
    watcher.tick()
    assert watcher.watched == [101]
    assert statuses(db)[101] == "stopped"
    sim.destroy_guest(101)
    sim.reset_counts()
    watcher.tick()
    # One read found 101 missing; the removal read its rows, then read the list again.
    assert vm_reads(sim) == 2
    assert 101 not in table_vmids(db)
    assert audit_sources(db) == [(101, "event")]
    assert watcher.watched == []
    with db.engine.connect() as conn:
        assert store.read_counters(conn)["ghost_apps_removed"] == 1


def test_stopped_guest_is_marked_and_start_sets_it_back(world):
    sim, db, runtime, inbox, watcher = world
    sim.stop_guest(102)
    inbox.accept(event(102, "post-stop"))
    watcher.tick()
    watcher.tick()
    assert statuses(db)[102] == "stopped" and 102 in table_vmids(db)
    sim.start_guest(102)
    inbox.accept(event(102, "post-start"))
    watcher.tick()
    assert statuses(db)[102] == "running" and watcher.watched == []


def test_seen_running_again_after_stopped_leaves_the_list(world):
    sim, db, runtime, inbox, watcher = world
    sim.stop_guest(103)
    inbox.accept(event(103, "post-stop"))
    watcher.tick()
    sim.start_guest(103)  # no start event delivered
    watcher.tick()
    assert watcher.watched == [] and statuses(db)[103] == "running"


def test_pre_stop_while_still_running_keeps_watching(world):
    sim, db, runtime, inbox, watcher = world
    inbox.accept(event(104, "pre-stop"))
    watcher.tick()
    watcher.tick()
    assert watcher.watched == [104] and statuses(db)[104] == "running"


def test_other_statuses_are_never_touched_on_start(world):
    sim, db, runtime, inbox, watcher = world
    with db.engine.begin() as conn:
        conn.execute(sa.text("UPDATE apps SET status='maintenance' WHERE lxc_id=100"))
    sim.stop_guest(100)
    inbox.accept(event(100, "post-stop"))
    watcher.tick()
    assert statuses(db)[100] == "maintenance"
    inbox.accept(event(100, "post-start"))
    watcher.tick()
    assert statuses(db)[100] == "maintenance"


def test_destroy_of_stopped_guest_without_event_is_caught_by_the_task_tail(world):
    sim, db, runtime, inbox, watcher = world
    watcher.tick()  # first task poll: nothing to see yet
    sim.stop_guest(104)
    sim.destroy_guest(104)
    watcher._next_task_poll = 0  # the next tick polls tasks
    watcher.tick()
    assert 104 not in table_vmids(db) and watcher.watched == []
    assert audit_sources(db) == [(104, "event")]


def test_proxmox_down_removes_nothing_then_recovers(world):
    sim, db, runtime, inbox, watcher = world
    sim.stop_guest(101)
    inbox.accept(event(101, "post-stop"))
    watcher.tick()
    sim.destroy_guest(101)
    sim.set_fault("refuse")
    for _ in range(3):
        watcher.tick()
    assert 101 in table_vmids(db) and watcher.watched == [101]
    assert "inventory unreadable" in (watcher.last_error or "")
    sim.set_fault(None)
    watcher.tick()
    watcher.tick()
    assert 101 not in table_vmids(db)


def test_token_without_vm_audit_removes_nothing(world):
    sim, db, runtime, inbox, watcher = world
    for v in (100, 101):
        inbox.accept(event(v, "post-stop"))
    sim.set_vm_audit(False)
    for _ in range(3):
        watcher.tick()
    assert table_vmids(db) == [100, 101, 102, 103, 104]
    assert "VM.Audit" in watcher.last_error


def test_young_or_protected_row_of_a_gone_guest_is_kept(world):
    sim, db, runtime, inbox, watcher = world
    with db.engine.begin() as conn:
        conn.execute(sa.text("UPDATE apps SET status='deploying' WHERE lxc_id=100"))
    stopped_and_destroyed(sim, inbox, 100)
    for _ in range(3):
        watcher.tick()
    assert 100 in table_vmids(db) and watcher.watched == [100]


def test_one_read_per_tick_however_many_are_watched(sim, sqlite_db):
    table = create_apps_table(sqlite_db.engine)
    with sqlite_db.engine.begin() as conn:
        conn.execute(table.insert(), [app_row(v, "running", age=timedelta(days=1)) for v in range(100, 400)])
    for v in range(100, 400):
        sim.add_guest(v)
    runtime = make_runtime(sim, sqlite_db, CLEANUP_TASK_POLL_SECONDS=3600)
    inbox = Inbox(runtime.engine)
    watcher = Watcher(runtime, inbox)
    watcher.tick()  # first task poll happens here
    sim.reset_counts()
    watcher.tick()
    assert sim.request_count("/cluster/resources") == 0  # nothing watched: no inventory read
    for v in range(100, 400):
        inbox.accept(event(v, "post-stop"))
    sim.reset_counts()
    watcher.tick()
    # Nothing read before: one read of the whole list, which also says where each guest is.
    assert sim.request_count("/cluster/resources") == 1 and sim.request_count("/nodes/") == 0
    sim.reset_counts()
    for _ in range(2):
        watcher.tick()
    # Then the 300 guests' node's lxc list once a tick: not 300 status requests, not the whole list.
    assert len(watcher.watched) == 300
    assert sim.request_count("/cluster/resources") == 0
    assert sim.request_count("/nodes/pve1/lxc") == 2 and sim.request_count("") == 2


def test_replayed_and_reordered_events(world):
    sim, db, runtime, inbox, watcher = world
    stop = event(102, "post-stop", ts=10)
    assert inbox.accept(stop) is True
    assert inbox.accept(stop) is False  # replay: nothing done twice
    inbox.accept(event(102, "pre-stop", ts=9))  # arrives after post-stop, happened before
    inbox.accept(event(103, "post-start", ts=21))  # start after stop, delivered first
    inbox.accept(event(103, "post-stop", ts=20))
    watcher.tick()
    assert watcher.watched == [102]
    with db.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(store.inbox)).scalar_one() == 4
    assert inbox.backlog() == 0


def test_inbox_backlog_left_by_a_crash_is_processed_by_a_new_watcher(world):
    sim, db, runtime, inbox, watcher = world
    stopped_and_destroyed(sim, inbox, 101)
    assert inbox.backlog() == 1
    fresh = Watcher(runtime, Inbox(runtime.engine))
    fresh.tick()
    fresh.tick()
    assert 101 not in table_vmids(db) and inbox.backlog() == 0


def test_only_the_lease_holder_watches(world):
    sim, db, runtime, inbox, _ = world
    lease_a = Lease(runtime.engine, 30, holder="a")
    a = Watcher(runtime, inbox, lease=lease_a)
    b = Watcher(runtime, inbox, lease=Lease(runtime.engine, 30, holder="b"))
    inbox.accept(event(101, "post-stop"))
    a.tick()
    b.tick()
    assert (a.leader, b.leader) == (True, False)
    assert a.watched == [101] and b.watched == []
    lease_a.release()
    b.tick()
    assert b.leader


def test_expired_lease_is_taken_over(world):
    sim, db, runtime, inbox, _ = world
    a = Lease(runtime.engine, 3, holder="a")
    b = Lease(runtime.engine, 3, holder="b")
    assert a.acquire() and not b.acquire()
    with db.engine.begin() as conn:  # a stalled for longer than the TTL
        conn.execute(store.lease.update().values(expires_at=utcnow() - timedelta(seconds=10)))
    assert b.acquire()
    time.sleep(1.1)  # a re-reads the lease once a third of the TTL has passed since its renewal
    assert not a.acquire() and not a.still_held()


def test_dry_run_watcher_changes_nothing(sim, sqlite_db, caplog):
    table = create_apps_table(sqlite_db.engine)
    with sqlite_db.engine.begin() as conn:
        conn.execute(table.insert(), [app_row(v, "running", age=timedelta(days=1)) for v in (100, 101)])
    sim.add_guest(100)
    sim.add_guest(101)
    runtime = make_runtime(sim, sqlite_db, CLEANUP_DRY_RUN=True)
    inbox = Inbox(runtime.engine)
    watcher = Watcher(runtime, inbox)
    sim.stop_guest(100)
    sim.stop_guest(101)
    sim.destroy_guest(101)
    inbox.accept(event(100, "post-stop"))
    inbox.accept(event(101, "post-stop"))
    with caplog.at_level("INFO"):
        for _ in range(3):
            watcher.tick()
    assert table_vmids(sqlite_db) == [100, 101]
    assert statuses(sqlite_db) == {100: "running", 101: "running"}
    assert "DRY-RUN: watcher would delete row" in caplog.text
    assert audit_sources(sqlite_db) == []


def roll_pve1_over(sim, watcher):
    """Three finished stops seen at a poll, then 30 tasks on pve1 alone: more than its list keeps."""
    for v in range(100, 103):
        sim.stop_guest(v)  # three finished vzstop tasks (101 on pve1, 100 and 102 on pve2)
    watcher.tick()
    sim.start_guest(100)
    watcher._next_task_poll = 0
    watcher.tick()
    for _ in range(15):
        sim.stop_guest(103)
        sim.start_guest(103)
    watcher._next_task_poll = 0


def test_task_list_roll_over_between_polls_reads_the_node_archive(world):
    sim, db, runtime, inbox, _ = world
    asked = []
    watcher = Watcher(runtime, inbox, on_task_gap=lambda: asked.append(1))
    roll_pve1_over(sim, watcher)
    assert asked == [] and watcher.tasks.gaps == 0  # the lists still overlapped the last poll's
    sim.reset_counts()
    watcher.tick()
    # pve1's archive (GET /nodes/pve1/tasks) is read instead of asking for a sweep.
    assert asked == [] and watcher.tasks.gaps == 1 and watcher.tasks.archive_reads == 1
    assert sim.request_count("/nodes/pve1/tasks") == 2 and sim.request_count("/nodes/pve2/tasks") == 0


def test_task_list_roll_over_of_an_offline_node_asks_for_a_sweep(world):
    sim, db, runtime, inbox, _ = world
    asked = []
    watcher = Watcher(runtime, inbox, on_task_gap=lambda: asked.append(1))
    roll_pve1_over(sim, watcher)
    sim.set_node_online("pve1", False)  # pmxcfs keeps its last list; its archive answers 595
    watcher.tick()
    assert asked == [1] and watcher.tasks.gaps == 1 and watcher.tasks.archive_reads == 0


def test_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(world, tmp_path):
    import socket
    import subprocess

    sim, db, runtime, inbox, _ = world
    gone = subprocess.Popen(["true"])
    gone.wait()
    from receiver.lease import _pid_namespace

    dead = Lease(runtime.engine, 300, holder=f"{socket.gethostname()}:{gone.pid}:{_pid_namespace()}:x")
    assert dead.acquire()
    elsewhere = Lease(runtime.engine, 300, holder=f"other-host:{gone.pid}:{_pid_namespace()}:y")
    me = Lease(runtime.engine, 300)
    assert me.acquire() and not elsewhere.acquire()
    # Another PID namespace with the same host name (a container with --network host): never judged dead.
    me.release()
    other_ns = Lease(runtime.engine, 300, holder=f"{socket.gethostname()}:{gone.pid}:1:z")
    assert other_ns.acquire()
    assert not Lease(runtime.engine, 300).acquire()


def test_watcher_applies_the_percentage_guard(sim, sqlite_db):
    """A burst of stops followed by a half-empty guest list must not empty the table."""
    table = create_apps_table(sqlite_db.engine)
    with sqlite_db.engine.begin() as conn:
        conn.execute(table.insert(), [app_row(v, "running", age=timedelta(days=1)) for v in range(100, 120)])
    for v in range(100, 120):
        sim.add_guest(v)
    runtime = make_runtime(sim, sqlite_db)
    inbox = Inbox(runtime.engine)
    watcher = Watcher(runtime, inbox)
    for v in range(100, 114):  # 14 of 20 guests really gone: 70 % > 50 %, more than 10 rows
        sim.stop_guest(v)
        sim.destroy_guest(v)
        inbox.accept(event(v, "post-stop"))
    for _ in range(3):
        watcher.tick()
    assert len(table_vmids(sqlite_db)) == 20
    assert "CLEANUP_MAX_DELETE_PERCENT" in (watcher.last_error or "")
    assert len(watcher.watched) == 14


def test_a_hidden_guest_is_held_back_and_the_others_go_on(world):
    sim, db, runtime, inbox, watcher = world
    sim.set_visible({100, 101, 102, 103})  # guest 104 hidden by an ACL, still exists
    sim.stop_guest(103)
    sim.destroy_guest(103)
    for v in (103, 104):
        inbox.accept(event(v, "post-stop"))
    for _ in range(3):
        watcher.tick()
    assert 104 in table_vmids(db) and 103 not in table_vmids(db)
    assert 104 in watcher.watched
    assert watcher.status()["hidden_guests"] == [104]


def test_a_destroyed_guest_goes_without_a_nextid_request(world):
    sim, db, runtime, inbox, watcher = world
    stopped_and_destroyed(sim, inbox, 101)
    watcher.tick()
    # The ACL list is read on both sides of the confirming read.
    assert 101 not in table_vmids(db) and sim.request_count("/access/acl") == 2
    assert sim.request_count("/cluster/nextid") == 0
    watcher.tick()
    assert sim.request_count("/access/acl") == 2  # nothing missing any more: not read again


def hide_104_and_destroy_103(world, via):
    sim, db, runtime, inbox, watcher = world
    sim.set_visible({100, 101, 102, 103}, via=via)
    sim.stop_guest(103)
    sim.destroy_guest(103)
    for v in (103, 104):
        inbox.accept(event(v, "post-stop"))
    watcher.tick()  # both missing: 103 is gone, 104 only hidden


def test_a_guest_hidden_by_its_own_acl_is_the_only_one_asked_about(world):
    sim, db, runtime, inbox, watcher = world
    hide_104_and_destroy_103(world, "vms")
    assert 103 not in table_vmids(db) and 104 in table_vmids(db)
    assert sim.request_count("/cluster/nextid") == 1
    assert watcher.watched == [104] and watcher.status()["hidden_guests"] == [104]


def test_a_pool_noaccess_makes_the_watcher_ask_about_every_gone_guest(world):
    sim, db, runtime, inbox, watcher = world
    hide_104_and_destroy_103(world, "pool")
    assert 103 not in table_vmids(db) and 104 in table_vmids(db)
    assert sim.request_count("/cluster/nextid") == 2
    assert watcher.status()["hidden_guests"] == [104]


def test_an_unreadable_acl_list_falls_back_to_asking_about_each_vmid(world):
    sim, db, runtime, inbox, watcher = world
    sim.set_acl_fault(500)
    sim.set_visible({100, 101, 102, 103})  # 104 is hidden and runs
    stopped_and_destroyed(sim, inbox, 101)
    inbox.accept(event(104, "post-stop"))
    watcher.tick()
    assert 101 not in table_vmids(db) and 104 in table_vmids(db)
    assert sim.request_count("/cluster/nextid") == 2  # no ACL proof: both asked about
    assert watcher.watched == [104] and watcher.status()["hidden_guests"] == [104]


def test_a_row_set_back_to_running_by_the_platform_does_not_freeze_the_watcher(world):
    sim, db, runtime, inbox, watcher = world
    sim.stop_guest(100)
    inbox.accept(event(100, "post-stop"))
    watcher.tick()
    assert statuses(db)[100] == "stopped"
    with db.engine.begin() as conn:  # the platform says running; the guest is still stopped
        conn.execute(sa.text("UPDATE apps SET status='running' WHERE lxc_id=100"))
    stopped_and_destroyed(sim, inbox, 101)
    for _ in range(3):
        watcher.tick()
    assert 101 not in table_vmids(db)
    assert statuses(db)[100] == "stopped"


def test_an_acl_lifted_between_the_two_reads_cannot_let_a_hidden_guest_go(world):
    # 104 runs, hidden from the token by a NoAccess on /vms/104, in both reads; the ACL is
    # lifted right after the second.  The list read between the two reads named 104, so it
    # is asked about: in use, kept.  (Read after the second read, the list would have
    # proved nothing about 104 any more, and its row would have gone.)
    sim, db, runtime, inbox, watcher = world
    sim.set_visible({100, 101, 102, 103})
    inbox.accept(event(104, "post-stop"))
    after_read(sim, 2, lambda: sim.set_visible(None))
    watcher.tick()
    assert 104 in table_vmids(db)
    assert sim.request_count("/cluster/nextid") == 1 and watcher.status()["hidden_guests"] == [104]


def test_a_vmid_whose_row_was_kept_still_needs_a_confirming_read_for_each_removal(world):
    # 101 is gone and watched, its row too young to go.  When the row is old enough, the
    # next removal still rests on two reads, the second one after the rows were read: a
    # guest 101 created between those (a reused VMID) keeps the row.
    sim, db, runtime, inbox, watcher = world
    with db.engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE apps SET created_at = NULL, updated_at = :now WHERE lxc_id = 101"),
            {"now": utcnow().replace(tzinfo=None)},
        )
    stopped_and_destroyed(sim, inbox, 101)
    watcher.tick()
    watcher.tick()
    assert 101 in table_vmids(db) and watcher.watched == [101]  # young: kept, still watched
    with db.engine.begin() as conn:
        conn.execute(sa.text("UPDATE apps SET updated_at = NULL WHERE lxc_id = 101"))
    rows_read = runtime.table.fetch_rows

    def then_reuse(vmids=None):
        rows = rows_read(vmids=vmids)
        if vmids is not None:
            sim.add_guest(101, name="app101.apps.local")  # reused right after the rows were read
        return rows

    runtime.table.fetch_rows = then_reuse
    sim.reset_counts()
    watcher.tick()
    assert 101 in table_vmids(db)
    assert vm_reads(sim) == 2
