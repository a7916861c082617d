"""The simulator's task lists as Proxmox builds them, over real HTTPS through proxmoxer.

Per node (pve-cluster ``broadcast_tasklist``): running + (25 - running) finished, under
32 KiB; ``/nodes/{node}/tasks`` from the node's archive (pve-manager ``API2/Tasks.pm``);
both filtered by privilege.  Then the watcher's task tail against them.
"""

from __future__ import annotations

import json
import time

import pytest
from conftest import make_runtime, running_apps, table_vmids
from conftest import proxmox_client as client
from proxmoxer.core import ResourceException

from receiver.inbox import Inbox
from receiver.simulator.tasks import BROADCAST_MAX_BYTES
from receiver.watcher import Watcher

ENTRY_KEYS = {"upid", "node", "pid", "pstart", "starttime", "type", "id", "user"}


@pytest.fixture
def pve(sim):
    sim.add_guest(101, node="pve1", status="stopped")
    sim.add_guest(103, node="pve1", status="stopped")
    sim.add_guest(102, node="pve2", status="stopped")
    return client(sim)


def churn(sim, vmid: int, tasks: int) -> None:
    """``tasks`` finished tasks on the guest's node (start, stop, start, ...)."""
    for i in range(tasks):
        (sim.start_guest if i % 2 == 0 else sim.stop_guest)(vmid)


def of_node(entries: list, node: str) -> list:
    return [e for e in entries if e["node"] == node]


# --------------------------------------------------------------------------- broadcast lists


def test_each_node_lists_its_own_newest_25(pve, sim):
    churn(sim, 101, 30)
    churn(sim, 102, 3)
    listed = pve.cluster.tasks.get()
    pve1, pve2 = of_node(listed, "pve1"), of_node(listed, "pve2")
    assert len(pve1) == 25 and len(pve2) == 3 and listed == pve1 + pve2  # one node's list after the other
    for entries in (pve1, pve2):
        assert [e["starttime"] for e in entries] == sorted((e["starttime"] for e in entries), reverse=True)
        assert [e["pid"] for e in entries] == sorted((e["pid"] for e in entries), reverse=True)
    assert pve1[0]["type"] == "vzstop"  # the 30th task, newest first


def test_running_tasks_take_places_of_the_25(pve, sim):
    churn(sim, 101, 30)
    sim.destroy_guest(103, lock_seconds=60)  # runs for a minute
    pve1 = of_node(pve.cluster.tasks.get(), "pve1")
    assert len(pve1) == 25
    assert pve1[0]["type"] == "vzdestroy" and "status" not in pve1[0] and "endtime" not in pve1[0]
    assert all(e["status"] == "OK" for e in pve1[1:])


def test_a_list_over_32_kib_drops_its_oldest_entries(pve, sim):
    now = int(time.time())
    for i in range(25):  # long error texts: 25 of them do not fit into 32 KiB
        sim.tasks.record("pve1", "vzstart", 101, now + i, "hookscript error: " + "x" * 1800, now + i + 1)
    churn(sim, 102, 2)
    listed = pve.cluster.tasks.get()
    pve1 = of_node(listed, "pve1")
    assert 10 < len(pve1) < 25
    assert len(json.dumps(pve1, separators=(",", ":"))) < BROADCAST_MAX_BYTES
    assert [e["starttime"] for e in pve1] == [now + 24 - i for i in range(len(pve1))]  # the newest kept
    assert len(of_node(listed, "pve2")) == 2  # the other node's list is its own


def test_a_busy_node_pushes_out_its_destroy_while_the_other_list_stays(pve, sim):
    churn(sim, 102, 4)
    sim.destroy_guest(103)  # stopped: no hook at all
    before = pve.cluster.tasks.get()
    destroy = next(e for e in before if e["type"] == "vzdestroy")
    churn(sim, 101, 30)
    after = pve.cluster.tasks.get()
    assert destroy["upid"] not in {e["upid"] for e in after}
    assert of_node(after, "pve2") == of_node(before, "pve2")
    found = pve.nodes("pve1").tasks.get(typefilter="vzdestroy", since=destroy["starttime"])
    assert [e["upid"] for e in found] == [destroy["upid"]]


def test_an_offline_node_keeps_its_last_list(pve, sim):
    churn(sim, 101, 3)
    listed = of_node(pve.cluster.tasks.get(), "pve1")
    sim.set_node_online("pve1", False)
    sim.tasks.record("pve1", "vzstart", 101, int(time.time()), "OK", int(time.time()))  # not broadcast
    assert of_node(pve.cluster.tasks.get(), "pve1") == listed
    with pytest.raises(ResourceException) as exc:
        pve.nodes("pve1").tasks.get()
    assert exc.value.status_code == 595
    assert len(pve.nodes("pve2").tasks.get()) == 0  # the other node answers
    sim.set_node_online("pve1", True)
    assert len(of_node(pve.cluster.tasks.get(), "pve1")) == 4


# --------------------------------------------------------------------------- the node's archive


@pytest.fixture
def archive(pve, sim):
    """pve1's archive: 60 tasks of guest 101 at t0+0..59 (odd: vzstop, even: vzstart), a failed
    vzdestroy of 103 at t0+60 and one of 101 that runs; pve2: one vzstop."""
    t0 = int(time.time()) - 1000
    for i in range(60):
        sim.tasks.record("pve1", "vzstop" if i % 2 else "vzstart", 101, t0 + i, "OK", t0 + i + 1)
    sim.tasks.record("pve1", "vzdestroy", 103, t0 + 60, "command 'lxc-destroy' failed", t0 + 61)
    sim.tasks.record("pve1", "vzstop", 101, t0 + 61, "WARNINGS: 2", t0 + 62, user=sim.token_id)
    running = sim.tasks.new("pve1", "vzdestroy", 101, t0 + 62)
    sim.tasks.start(running)
    sim.tasks.record("pve2", "vzstop", 102, t0, "OK", t0 + 1)
    return pve.nodes("pve1").tasks, t0


def test_the_archive_entries_look_like_proxmox_s(archive, sim):
    tasks, t0 = archive
    entries = tasks.get()
    assert len(entries) == 50  # limit's default
    assert all(set(e) == ENTRY_KEYS | {"endtime", "status"} for e in entries[1:])
    token_task = entries[0]  # newest first, the token's own task: user and tokenid apart
    assert token_task["user"] == sim.user and token_task["tokenid"] == sim.token_name
    assert set(token_task) == ENTRY_KEYS | {"endtime", "status", "tokenid"}
    assert [e["starttime"] for e in entries] == [t0 + 61 - i for i in range(50)]
    assert all(e["node"] == "pve1" and isinstance(e["id"], str) for e in entries)


@pytest.mark.parametrize(
    "params, starttimes",
    [
        ({"since": 55}, [61, 60, 59, 58, 57, 56, 55]),
        ({"until": 2}, [2, 1, 0]),
        ({"since": 50, "until": 52}, [52, 51, 50]),
        ({"typefilter": "vzdestroy"}, [60]),
        ({"typefilter": "vzdestroy", "source": "all"}, [62, 60]),
        ({"typefilter": "vzdestroy", "source": "active"}, [62]),
        ({"typefilter": "vzdestroy", "since": 61}, []),
        ({"vmid": 103}, [60]),
        ({"vmid": 102}, []),  # pve2's task is not in pve1's archive
        ({"since": 40, "typefilter": "vzstop", "start": 2, "limit": 3}, [57, 55, 53]),
        ({"errors": 1, "since": 10}, [61, 60]),  # errors leaves out "ok" alone: warnings stay
        ({"statusfilter": "warning,error"}, [61, 60]),
        ({"userfilter": "JANITOR"}, [61]),
        ({"limit": 0}, []),
    ],
)
def test_the_archive_read_with_filters(archive, params, starttimes):
    tasks, t0 = archive
    for key in ("since", "until"):
        if key in params:
            params[key] += t0
    assert [e["starttime"] - t0 for e in tasks.get(**params)] == starttimes


def test_a_running_task_is_listed_as_running_by_source_active(archive):
    tasks, t0 = archive
    (entry,) = tasks.get(source="active")
    assert entry["status"] == "RUNNING" and "endtime" not in entry and entry["type"] == "vzdestroy"


def test_a_bad_source_is_a_parameter_error(archive):
    tasks, _ = archive
    with pytest.raises(ResourceException) as exc:
        tasks.get(source="everything")
    assert exc.value.status_code == 400


# --------------------------------------------------------------------------- privileges


def test_without_sys_audit_on_root_the_cluster_list_is_empty_not_refused(pve, sim):
    churn(sim, 101, 3)
    sim.tasks.record("pve1", "vzstop", 101, int(time.time()), "OK", int(time.time()), user=sim.token_id)
    shown = pve.cluster.tasks.get()
    assert len(shown) == 4
    own = next(e for e in shown if e.get("tokenid"))
    assert (own["user"], own["tokenid"]) == (sim.user, sim.token_name)  # API2/Cluster.pm splits the token
    sim.set_sys_audit(False)
    # Only entries whose user equals the caller; a token's caller is its full id, its task's user
    # its user part: even the token's own task is left out.
    assert pve.cluster.tasks.get() == []


def test_without_sys_audit_on_the_node_its_list_holds_the_caller_s_own(archive, pve, sim):
    tasks, t0 = archive
    sim.add_acl("/nodes/pve1", sim.access.role_holding({"VM.Audit"}))  # replaces what / gave there
    mine = tasks.get(source="all")
    assert [(e["starttime"] - t0, e["user"], e.get("tokenid")) for e in mine] == [(61, sim.user, sim.token_name)]
    assert len(pve.nodes("pve2").tasks.get()) == 1  # Sys.Audit on /nodes/pve2 still held
    assert len(pve.cluster.tasks.get()) == 26  # and on /: the cluster list is whole


# --------------------------------------------------------------------------- the task tail


@pytest.fixture
def world(sim, any_db):
    """Guests 100-104 (odd on pve1, even on pve2), each with a day-old row; a watcher that
    counts the sweeps it asks for."""
    running_apps(sim, any_db)
    runtime = make_runtime(sim, any_db, CLEANUP_TASK_POLL_SECONDS=0.5)
    asked: list = []
    watcher = Watcher(runtime, Inbox(runtime.engine), on_task_gap=lambda: asked.append(1))
    return sim, any_db, watcher, asked


def poll(watcher: Watcher) -> None:
    watcher._next_task_poll = 0  # this tick polls the tasks
    watcher.tick()


def test_a_destroy_on_a_busy_node_is_found_in_its_archive_within_two_polls(world):
    sim, db, watcher, asked = world
    sim.reset_counts()
    sim.stop_guest(103)  # no event reaches the receiver
    poll(watcher)  # 1: pve1 lists the vzstop
    sim.destroy_guest(103)  # stopped: no hook at all
    churn(sim, 101, 31)  # pve1 is busy: the vzdestroy leaves its list
    listed = sim.tasks.cluster_list()  # what /cluster/tasks answers, read without a request
    assert "vzdestroy" not in {e["type"] for e in listed} and of_node(listed, "pve2") == []
    poll(watcher)  # 2: pve1's list rolled over, its archive has the destroy
    assert 103 not in table_vmids(db)
    assert sim.request_count("/cluster/tasks") == 2
    assert asked == [] and watcher.tasks.gaps == 1 and watcher.tasks.archive_reads == 1


def test_without_sys_audit_on_root_the_tail_says_it_is_blind(world):
    sim, db, watcher, asked = world
    sim.set_sys_audit(False)
    sim.stop_guest(103)
    poll(watcher)
    sim.destroy_guest(103)
    poll(watcher)
    assert watcher.tasks.blind is True
    assert watcher.metrics.task_tail_blind._value.get() == 1
    assert 103 in table_vmids(db)  # left to the sweep, and said so
    sim.set_sys_audit(True)
    watcher.tasks._blind_checked = float("-inf")  # look at the privilege again now
    poll(watcher)
    assert watcher.tasks.blind is False
