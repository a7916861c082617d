"""The watcher's probes and fade, tick by tick, against the simulator over HTTPS and a real database.

The watcher's clock is injected, so a whole watch window passes without sleeping."""

from __future__ import annotations

import itertools
import logging
from datetime import timedelta

import pytest
from conftest import make_runtime, running_apps, table_vmids

from receiver.inbox import Inbox
from receiver.model import Event
from receiver.timeutil import utcnow
from receiver.watcher import Watcher

_ids = itertools.count(1)


class Clock:
    def __init__(self):
        self.now = utcnow()

    def __call__(self):
        return self.now

    def advance(self, seconds: float = 1.0):
        self.now += timedelta(seconds=seconds)


def stop_event(vmid, node):
    n = next(_ids)
    return Event(f"probe-ev-{n}", vmid, "post-stop", node, float(n))


@pytest.fixture
def world(sim, sqlite_db):
    """Guests 100-104 running (odd VMIDs on pve1, even ones on pve2), each with a day-old row;
    a watcher on an injected clock whose first tick has polled the task list."""
    running_apps(sim, sqlite_db)
    runtime = make_runtime(sim, sqlite_db, CLEANUP_TASK_POLL_SECONDS=3600)
    inbox = Inbox(runtime.engine)
    clock = Clock()
    watcher = Watcher(runtime, inbox, clock=clock)
    watcher.tick()
    return sim, sqlite_db, runtime, inbox, watcher, clock


def watch_stopped(world, vmid, node):
    """``vmid`` stops; its event is drained and the first tick reads the whole list (nothing
    read before), which says where the guest is."""
    sim, db, runtime, inbox, watcher, clock = world
    sim.stop_guest(vmid)
    inbox.accept(stop_event(vmid, node))
    clock.advance()
    sim.reset_counts()
    watcher.tick()
    assert sim.request_count("/cluster/resources") == 1 and watcher.watched == [vmid]


def status_path(vmid, node="pve1", kind="lxc"):
    return f"/nodes/{node}/{kind}/{vmid}/status/current"


def results(watcher, kind, result):
    return (
        watcher.metrics.registry.get_sample_value("pve_janitor_probe_results_total", {"kind": kind, "result": result})
        or 0
    )


def test_a_stopped_guest_is_probed_on_its_node_not_read_whole(world):
    sim, db, runtime, inbox, watcher, clock = world
    watch_stopped(world, 101, "pve1")
    sim.reset_counts()
    for _ in range(5):
        clock.advance()
        watcher.tick()
    assert sim.request_count(status_path(101)) == 5
    assert sim.request_count("/cluster/resources") == 0 and sim.request_count("") == 5
    assert results(watcher, "guest", "present") == 5 and 101 in table_vmids(db)


def test_a_destroy_found_by_a_probe_is_confirmed_by_two_whole_reads(world):
    sim, db, runtime, inbox, watcher, clock = world
    watch_stopped(world, 101, "pve1")
    clock.advance()
    watcher.tick()
    sim.destroy_guest(101)
    sim.reset_counts()
    clock.advance()
    watcher.tick()
    # The probe only nominated 101: one whole read found it missing, the removal confirmed.
    assert sim.request_count(status_path(101)) == 1 and sim.request_count("/cluster/resources") == 2
    assert 101 not in table_vmids(db) and watcher.watched == []


def test_migration_during_a_watch_is_no_removal(world):
    sim, db, runtime, inbox, watcher, clock = world
    watch_stopped(world, 101, "pve1")
    sim.migrate_guest(101, "pve2")
    sim.reset_counts()
    clock.advance()
    watcher.tick()
    # Missing from pve1: a candidate; the whole list has it on pve2, so nothing goes further.
    assert results(watcher, "guest", "gone") == 1
    assert sim.request_count("/cluster/resources") == 1 and sim.request_count("/access/acl") == 0
    assert 101 in table_vmids(db) and watcher.watched == [101]
    sim.reset_counts()
    clock.advance()
    watcher.tick()
    assert sim.request_count(status_path(101, "pve2")) == 1 and sim.request_count(status_path(101)) == 0
    assert sim.request_count("/cluster/resources") == 0


def test_an_event_naming_the_wrong_node_costs_one_whole_read(world):
    sim, db, runtime, inbox, watcher, clock = world
    watch_stopped(world, 101, "pve1")
    sim.stop_guest(102)  # on pve2, its event says pve1
    inbox.accept(stop_event(102, "pve1"))
    sim.reset_counts()
    clock.advance()
    watcher.tick()
    assert sim.request_count("/cluster/resources") == 1 and sorted(watcher.watched) == [101, 102]
    sim.reset_counts()
    clock.advance()
    watcher.tick()
    assert sim.request_count(status_path(102, "pve2")) == 1 and sim.request_count("/cluster/resources") == 0
    assert table_vmids(db) == [100, 101, 102, 103, 104]


@pytest.mark.parametrize("how, result", [("offline", "offline"), ("hidden", "privilege"), ("nodata", "malformed")])
def test_odd_answers_make_no_candidate_and_are_said_once(world, caplog, how, result):
    sim, db, runtime, inbox, watcher, clock = world
    watch_stopped(world, 101, "pve1")
    if how != "hidden":
        sim.destroy_guest(101)  # even gone: only a whole read may say so, and none is made
    if how == "offline":
        sim.set_node_online("pve1", False)
    elif how == "hidden":
        sim.set_visible({100, 102, 103, 104})
    else:
        sim.set_fault("nodata", path=status_path(101))
    sim.reset_counts()
    with caplog.at_level(logging.WARNING, logger="receiver.probing"):
        for _ in range(4):
            clock.advance()
            watcher.tick()
    assert sim.request_count("/cluster/resources") == 0 and sim.request_count(status_path(101)) == 4
    assert 101 in table_vmids(db) and watcher.watched == [101]
    assert results(watcher, "guest", result) == 4
    assert caplog.text.count("probe of VMID 101 answered") == 1 and result in caplog.text
    assert result in watcher.status()["last_error"]


def test_proxmox_unreachable_while_probing_removes_nothing(world):
    sim, db, runtime, inbox, watcher, clock = world
    watch_stopped(world, 101, "pve1")
    sim.destroy_guest(101)
    sim.set_fault("refuse")
    for _ in range(2):
        clock.advance()
        watcher.tick()
    assert 101 in table_vmids(db) and "inventory unreadable" in watcher.last_error
    sim.set_fault(None)
    clock.advance()
    watcher.tick()
    assert 101 not in table_vmids(db)


def test_the_watch_fades_and_a_new_stop_brings_one_second_probes_back(world):
    sim, db, runtime, inbox, watcher, clock = world
    watch_stopped(world, 101, "pve1")  # the stop event came at t = 1
    probed = []
    for t in range(2, 602):
        clock.advance()
        before = sim.request_count(status_path(101))
        watcher.tick()
        if sim.request_count(status_path(101)) > before:
            probed.append(t - 1)  # seconds since the stop
    assert probed[:59] == list(range(1, 60))
    assert probed[59:] == [60, 62, 66, 74, 90, 122, 186, 314, 570]
    assert watcher.watched == [101]
    inbox.accept(stop_event(101, "pve1"))  # stopped again (a restart that failed, say)
    sim.reset_counts()
    for _ in range(3):
        clock.advance()
        watcher.tick()
    assert sim.request_count(status_path(101)) == 3


def test_a_destroy_task_during_the_fade_is_acted_on_at_once(world):
    sim, db, runtime, inbox, watcher, clock = world
    watch_stopped(world, 101, "pve1")
    for _ in range(100):  # well into the fade: next probe at 122 s
        clock.advance()
        watcher.tick()
    sim.destroy_guest(101)
    watcher._next_task_poll = 0
    clock.advance()
    watcher.tick()
    assert 101 not in table_vmids(db) and watcher.watched == []


def test_the_watch_ends_with_its_window(world):
    sim, db, runtime, inbox, watcher, clock = world
    watch_stopped(world, 101, "pve1")
    clock.advance(runtime.settings.watch_seconds + 1)
    sim.reset_counts()
    watcher.tick()
    assert watcher.watched == [] and sim.request_count("") == 0


def test_many_stopped_guests_of_one_node_are_read_from_its_list(sim, sqlite_db):
    vmids = range(100, 160)
    running_apps(sim, sqlite_db, vmids)
    for v in range(300, 310):  # pve2 also holds a few that are not watched
        sim.add_guest(v, node="pve2")
    runtime = make_runtime(sim, sqlite_db, CLEANUP_TASK_POLL_SECONDS=3600)
    inbox = Inbox(runtime.engine)
    clock = Clock()
    watcher = Watcher(runtime, inbox, clock=clock)
    runtime.inventory.read()  # the start-up sweep's read: where every guest is not known, only how many
    even = [v for v in vmids if v % 2 == 0]
    for v in even:  # pve2 shuts down: every guest on it stops
        sim.stop_guest(v)
        inbox.accept(stop_event(v, "pve2"))
    sim.reset_counts()
    clock.advance()
    watcher.tick()
    # Type unknown: both of pve2's lists, one request each, no whole read.
    assert sim.request_count("/nodes/pve2/lxc") == 1 and sim.request_count("/nodes/pve2/qemu") == 1
    assert sim.request_count("/nodes/") == 2 and sim.request_count("/cluster/resources") == 0
    assert len(watcher.watched) == 30
    sim.reset_counts()
    clock.advance()
    watcher.tick()
    # Their type is known now: the lxc list alone.
    assert sim.request_count("/nodes/pve2/lxc") == 1 and sim.request_count("/nodes/") == 1
    sim.destroy_guest(even[0])
    sim.reset_counts()
    clock.advance()
    watcher.tick()
    assert sim.request_count("/nodes/pve2/lxc") == 1 and sim.request_count("/cluster/resources") == 2
    assert even[0] not in table_vmids(sqlite_db) and len(watcher.watched) == 29
