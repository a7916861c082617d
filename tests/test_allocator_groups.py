"""Allocations that arrive together are served as a group: one read, VMIDs confirmed side by
side, one transaction; what the group cannot settle is served one at a time after it.

Each test holds the first allocation in its guest-list read, lets the others queue behind
it in a known order, then lets go: the queue is served as one group.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import pytest
from test_allocator import reserved, runtime_for, scene

from receiver import reservations
from receiver.allocation import Refused, Request
from receiver.allocator import Allocator
from receiver.model import Inventory, InventoryError
from receiver.reservations import Reservation


class HeldProxmox:
    """The allocator's Proxmox, holding its first guest-list read until ``go`` is set; each
    /cluster/nextid check goes through ``on_probe`` first."""

    def __init__(self, inventory: Any):
        self.inventory = inventory
        self.go = threading.Event()
        self.reads = 0
        self.probed: list[int] = []
        self.on_probe: Any = None

    def read(self) -> Inventory:
        found = self.inventory.read()
        self.reads += 1
        if self.reads == 1:
            self.go.wait(30)
        return found

    def vmid_in_use(self, vmid: int) -> bool:
        self.probed.append(vmid)
        if self.on_probe is not None:
            self.on_probe(vmid)
        return self.inventory.vmid_in_use(vmid)


def wait_for(check: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


class Grouped:
    """An allocator whose first allocation is held while ``requests`` queue behind it in order."""

    def __init__(self, sim, db, **overrides: Any):
        runtime = runtime_for(sim, db, **overrides)
        self.proxmox = HeldProxmox(runtime.inventory)
        self.allocator = Allocator(runtime.settings, runtime.table, self.proxmox, runtime.clock)  # type: ignore[arg-type]
        self.transactions: list[int] = []  # how many reservations each reserving transaction made

    def run(self, requests: list[Request], monkeypatch: pytest.MonkeyPatch) -> list[Reservation | Refused]:
        """The answers to ``requests``, served as one group after a first, held allocation."""
        real = reservations.reserve_many

        def counted(*args: Any, **kwargs: Any) -> list[Reservation]:
            made = real(*args, **kwargs)
            self.transactions.append(len(made))
            return made

        monkeypatch.setattr(reservations, "reserve_many", counted)
        answers: dict[int, Reservation | Refused | BaseException] = {}

        def one(key: int, request: Request) -> None:
            try:
                answers[key] = self.allocator.allocate(request)
            except Exception as exc:  # noqa: BLE001 - the test looks at what each got
                answers[key] = exc

        threads = [threading.Thread(target=one, args=(-1, Request(label="first")))]
        threads[0].start()
        wait_for(lambda: self.proxmox.reads == 1, "the first allocation's guest-list read")
        for i, request in enumerate(requests):
            threads.append(threading.Thread(target=one, args=(i, request)))
            threads[-1].start()
            wait_for(lambda i=i: len(self.allocator._queue) == i + 1, f"allocation {i} to queue")
        self.proxmox.go.set()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        assert isinstance(answers.pop(-1), Reservation)
        got = [answers[i] for i in range(len(requests))]
        assert not [a for a in got if not isinstance(a, (Reservation, Refused))], got
        return got  # type: ignore[return-value]


def another_receiver_reserves(grouped: Grouped, db: Any, vmid: int) -> Any:
    """An ``on_probe`` that, at the first check of ``vmid``, reserves it as another receiver would."""
    now = grouped.allocator.clock().replace(microsecond=0)
    done: list[Reservation] = []

    def reserve(probed: int) -> None:
        if probed == vmid and not done:
            expires = now.replace(year=now.year + 1)
            values = [("vmid", str(vmid))]
            done.append(
                reservations.reserve(
                    db.engine, "apps", now=now, expires_at=expires, source="cli", label="other", values=values
                )
            )

    return reserve


def test_allocations_that_arrive_together_are_served_in_one_transaction_in_their_order(sim, any_db, monkeypatch):
    scene(sim, any_db)  # rows and guests 100-104
    grouped = Grouped(sim, any_db)
    got = grouped.run([Request(hostname=f"web{i}", ports=1, label=f"n{i}") for i in range(6)], monkeypatch)
    assert all(isinstance(r, Reservation) for r in got)
    reservations_ = [r for r in got if isinstance(r, Reservation)]
    # The first (held) took 105; the group, in order of arrival, the next six, each confirmed.
    assert [r.vmid for r in reservations_] == list(range(106, 112))
    assert [r.hostname for r in reservations_] == [f"web{i}" for i in range(6)]
    assert [r.label for r in reservations_] == [f"n{i}" for i in range(6)]
    assert len({p for r in reservations_ for p in r.ports["public_port"] + r.ports["internal_port"]}) == 12
    assert grouped.transactions == [1, 6]  # the first alone, then the six in one transaction
    assert sorted(grouped.proxmox.probed) == list(range(105, 112))  # every VMID confirmed with Proxmox
    assert len(reserved(any_db)) == 1 + 6 * 4  # the first's VMID; a VMID, a hostname and two ports each
    # As stored: each id with its own label and values (the ids came back in the right order).
    with any_db.engine.connect() as conn:
        stored = reservations.listing(conn, "apps", grouped.allocator.clock())
    assert {r.id: r.to_dict() for r in stored if r.label != "first"} == {r.id: r.to_dict() for r in reservations_}


def test_two_of_a_group_asking_for_one_hostname(sim, any_db, monkeypatch):
    scene(sim, any_db)
    grouped = Grouped(sim, any_db)
    got = grouped.run(
        [Request(hostname="api"), Request(hostname="api"), Request(hostname="api", suffix=True)], monkeypatch
    )
    first, second, third = got
    assert isinstance(first, Reservation) and first.hostname == "api"
    # The second is served alone after the group and told who holds the name.
    assert isinstance(second, Refused) and second.kind == "hostname_taken"
    assert f"reservation {first.id}" in str(second)
    # The third asked for a suffix: the group gives it the next free name.
    assert isinstance(third, Reservation) and third.hostname == "api-2"
    assert ("hostname", "api") in reserved(any_db) and ("hostname", "api-2") in reserved(any_db)


def test_a_group_passes_over_a_vmid_taken_in_proxmox_since_its_list_was_read(sim, any_db, monkeypatch):
    scene(sim, any_db)
    grouped = Grouped(sim, any_db)

    created: list[int] = []

    def create_107(vmid: int) -> None:
        if vmid == 107 and not created:  # another tool creates 107 after the list was read
            created.append(vmid)
            sim.add_guest(107)

    grouped.proxmox.on_probe = create_107
    got = grouped.run([Request() for _ in range(4)], monkeypatch)
    vmids = sorted(r.vmid or 0 for r in got if isinstance(r, Reservation))
    assert vmids == [106, 108, 109, 110]  # 107 is a guest's now: never handed out
    assert 107 in grouped.proxmox.probed
    assert ("vmid", "107") not in reserved(any_db)


def test_a_group_that_meets_another_receivers_values_is_served_one_by_one(sim, any_db, monkeypatch):
    scene(sim, any_db)
    grouped = Grouped(sim, any_db)
    # Another receiver reserves 108 after the group read what is free, before it reserves.
    grouped.proxmox.on_probe = another_receiver_reserves(grouped, any_db, 108)
    got = grouped.run([Request(ports=1) for _ in range(4)], monkeypatch)
    assert all(isinstance(r, Reservation) for r in got), got
    vmids = [r.vmid for r in got if isinstance(r, Reservation)]
    assert 108 not in vmids and len(set(vmids)) == 4
    assert grouped.allocator.conflicts >= 1  # the group's transaction met 108 and reserved nothing
    # The first; the other receiver's; then the four one at a time (the group's made none).
    assert grouped.transactions == [1, 1, 1, 1, 1, 1]
    assert sorted(v for k, v in reserved(any_db) if k == "vmid") == sorted(str(v) for v in [105, 108, *vmids])


def test_a_group_whose_confirmation_fails_reserves_nothing(sim, any_db, monkeypatch):
    scene(sim, any_db)
    grouped = Grouped(sim, any_db)

    def down(vmid: int) -> None:
        if vmid > 105:
            raise InventoryError("unreachable", "Proxmox went away")

    grouped.proxmox.on_probe = down
    got = grouped.run([Request(hostname=f"h{i}", ports=1) for i in range(3)], monkeypatch)
    assert all(isinstance(r, Refused) and r.kind == "proxmox" for r in got), got
    assert all("nothing was reserved" in str(r) for r in got)
    assert sorted(v for k, v in reserved(any_db) if k == "vmid") == ["105"]  # the first one's only


def test_a_group_wanting_more_ports_than_are_left(sim, any_db, monkeypatch):
    scene(sim, any_db)
    grouped = Grouped(sim, any_db, CLEANUP_ALLOCATOR_PORTS="public_port=20105-20106")
    got = grouped.run([Request(ports=1) for _ in range(3)], monkeypatch)
    # Two ports for three: the first two of the group get them; the last, served alone, is told.
    assert [type(r).__name__ for r in got] == ["Reservation", "Reservation", "Refused"]
    last = got[2]
    assert isinstance(last, Refused) and last.kind == "port_range_exhausted"
    ports = sorted(p for r in got if isinstance(r, Reservation) for p in r.ports["public_port"])
    assert ports == [20105, 20106]
    assert "20105-20106" in str(last)


def test_asks_a_group_leaves_are_served_in_their_order_of_arrival(sim, any_db, monkeypatch):
    scene(sim, any_db)
    grouped = Grouped(sim, any_db)
    # Another receiver reserves 106: the group's transaction meets it, so one by one.
    grouped.proxmox.on_probe = another_receiver_reserves(grouped, any_db, 106)
    first, second = grouped.run([Request(hostname="api"), Request(hostname="api")], monkeypatch)
    # The first to come keeps the name; the second is told who has it.
    assert isinstance(first, Reservation) and first.hostname == "api"
    assert isinstance(second, Refused) and second.kind == "hostname_taken" and f"reservation {first.id}" in str(second)


class Interrupted(BaseException):
    """What a signal handler raises in a thread that waits for its turn."""


def test_an_ask_whose_thread_is_interrupted_while_waiting_leaves_no_one_stuck(sim, sqlite_db):
    scene(sim, sqlite_db)
    grouped = Grouped(sim, sqlite_db)
    allocator = grouped.allocator
    first: list[Any] = []
    leader = threading.Thread(target=lambda: first.append(allocator.allocate(Request())))
    leader.start()
    wait_for(lambda: grouped.proxmox.reads == 1, "the first allocation's guest-list read")

    def interrupt(signum: int, frame: Any) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)  # this (main) thread is then waiting in the queue
        with pytest.raises(Interrupted):
            allocator.allocate(Request(hostname="gone"))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert allocator._queue == []  # it left the queue
    grouped.proxmox.go.set()
    leader.join(30)
    assert first and first[0].vmid == 105
    after: list[Any] = []
    late = threading.Thread(target=lambda: after.append(allocator.allocate(Request(hostname="late"))))
    late.start()
    late.join(30)
    assert not late.is_alive(), "an allocation after the interrupted one hung"
    assert after[0].vmid == 106 and after[0].hostname == "late"
    assert ("hostname", "gone") not in reserved(sqlite_db)
