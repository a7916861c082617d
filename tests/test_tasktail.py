"""The task tail's rules, against a stand-in that answers like Proxmox's task endpoints.

The list is per node (pve-cluster ``broadcast_tasklist``): a node's roll-over is found from
that node's entries alone, and its archive is read for the destroys in between.
"""

from __future__ import annotations

import itertools

import pytest

from receiver.model import InventoryError, Task
from receiver.tasktail import TaskTail

_pids = itertools.count(0x1000)


def task(node: str, kind: str, vmid: int, start: int, end: int | None = None) -> Task:
    upid = f"UPID:{node}:{next(_pids):08X}:00000001:{start:08X}:{kind}:{vmid}:root@pam:"
    return Task(upid, node, kind, vmid, "OK" if end else None, end, start)


class Cluster:
    """Per-node task archives; ``/cluster/tasks`` shows each node's newest ``keep``."""

    def __init__(self, keep: int = 25):
        self.keep = keep
        self.archive: dict[str, list[Task]] = {"pve1": [], "pve2": []}
        self.clock = 1_000_000
        self.sys_audit = True
        self.archive_fault: InventoryError | None = None
        self.archive_reads: list[tuple[str, int]] = []

    def run(self, node: str, kind: str, vmid: int) -> Task:
        self.clock += 1
        done = task(node, kind, vmid, self.clock, self.clock + 1)
        self.archive[node].append(done)
        return done

    def tasks(self) -> list[Task]:
        return [t for tasks in self.archive.values() for t in tasks[-self.keep :]]

    def node_tasks(self, node, types, since):
        if self.archive_fault:
            raise self.archive_fault
        self.archive_reads.append((node, since))
        return [t for t in self.archive[node] if t.type in types and t.starttime >= since]

    def privilege(self, path, privilege):
        return 1 if self.sys_audit else None


@pytest.fixture
def cluster():
    return Cluster()


def tail_for(cluster, asked=None, blind=None):
    return TaskTail(
        cluster,
        on_gap=lambda: asked.append(1) if asked is not None else None,
        on_blind=lambda b: blind.append(b) if blind is not None else None,
        wall=lambda: cluster.clock,
    )


def test_a_destroy_is_hinted_once(cluster):
    tail = tail_for(cluster)
    assert tail.poll() == []
    gone = cluster.run("pve1", "vzdestroy", 101)
    cluster.run("pve1", "vzstop", 102)
    assert [t.vmid for t in tail.poll()] == [101] and gone.upid in {t.upid for t in cluster.tasks()}
    assert tail.poll() == []


def test_a_busy_node_pushing_a_destroy_out_is_caught_from_its_archive(cluster):
    asked: list[int] = []
    tail = tail_for(cluster, asked)
    for vmid in range(200, 205):
        cluster.run("pve1", "vzstart", vmid)
        cluster.run("pve2", "vzstart", vmid)
    tail.poll()
    cluster.run("pve1", "vzdestroy", 150)  # then pve1 runs 30 more tasks: out of its list
    for _ in range(30):
        cluster.run("pve1", "vzstart", 201)
    hints = tail.poll()
    assert [t.vmid for t in hints] == [150]
    assert tail.gaps == 1 and [node for node, _ in cluster.archive_reads] == ["pve1"] and asked == []
    assert tail.poll() == []  # not hinted twice


def test_another_nodes_quiet_list_does_not_hide_a_roll_over(cluster):
    # The old check compared the whole cluster's list: pve2's unchanged entries overlapped the
    # last poll, so pve1's roll-over went unnoticed.
    tail = tail_for(cluster)
    for vmid in range(200, 210):
        cluster.run("pve2", "vzstart", vmid)
    cluster.run("pve1", "vzstart", 300)
    tail.poll()
    cluster.run("pve1", "qmdestroy", 151)
    for _ in range(25):
        cluster.run("pve1", "qmstart", 301)
    assert [t.vmid for t in tail.poll()] == [151]


def test_an_unreadable_archive_asks_for_a_sweep_once_per_period(cluster):
    asked: list[int] = []
    tail = tail_for(cluster, asked)
    cluster.run("pve1", "vzstart", 300)
    tail.poll()
    cluster.archive_fault = InventoryError("http", "/nodes/pve1/tasks: HTTP 595 no route")
    for _ in range(2):
        for _ in range(26):
            cluster.run("pve1", "vzstart", 301)
        assert tail.poll() == []
    assert asked == [1] and tail.gaps == 2


def test_the_archive_read_starts_before_the_last_poll_and_before_what_was_running(cluster):
    tail = tail_for(cluster)
    cluster.run("pve1", "vzstart", 300)
    running = task("pve1", "vzdestroy", 152, cluster.clock - 500)  # a long destroy, still running
    cluster.archive["pve1"].append(running)
    tail.poll()
    for _ in range(30):
        cluster.run("pve1", "vzstart", 301)
    tail.poll()
    assert cluster.archive_reads[0][1] <= running.starttime


def test_a_token_without_sys_audit_is_said_to_be_blind(cluster, caplog):
    blind: list[bool] = []
    cluster.sys_audit = False
    tail = tail_for(cluster, blind=blind)
    tail.poll()
    assert tail.blind is True and blind == [True]
    assert "lacks Sys.Audit on /" in caplog.text
