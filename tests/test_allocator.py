"""The allocator (receiver.allocator, receiver.reservations) on real databases and the simulator.

The scene (:func:`scene`): rows 100-104 with running guests (public ports 20100-20104,
hostnames appNNN.apps.local), so the first free VMID is 105 unless a test adds more.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import ROOT, janitor_env, running_apps, table_vmids

from receiver import reservations, store
from receiver.allocation import Refused, Request, normal_hostname, port_counts, with_suffix
from receiver.allocator import MAX_PROBES, WINDOW_START, Allocator, FreshInventory
from receiver.config import load_settings
from receiver.freevalues import free_numbers
from receiver.inbox import Inbox
from receiver.model import Inventory, InventoryError
from receiver.runtime import Runtime
from receiver.serve import housekeeping
from receiver.simulator.scene import app_row
from receiver.timeutil import utcnow

T0 = datetime(2026, 12, 4, 10, 0, 0, tzinfo=timezone.utc)
PORTS = "public_port=20100-20199,internal_port=30100-30199"


class Clock:
    """A pinned clock a test moves by hand."""

    def __init__(self, now: datetime = T0):
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def scene(sim, db, vmids=range(100, 105)) -> sa.Table:
    return running_apps(sim, db, vmids)


def runtime_for(sim, db, clock: Callable[[], datetime] | None = None, **overrides: Any) -> Runtime:
    settings = load_settings(env=janitor_env(sim, db), overrides={"CLEANUP_ALLOCATOR_PORTS": PORTS, **overrides})
    if clock is None:
        return Runtime.build(settings, engine=db.engine, upgrade=True)
    return Runtime.build(settings, engine=db.engine, clock=clock, upgrade=True)


def allocator_for(runtime: Runtime) -> Allocator:
    return Allocator(runtime.settings, runtime.table, runtime.inventory, runtime.clock)


def reserved(db) -> list[tuple[str, str]]:
    """Every (kind, value) in janitor_reserved_values, sorted."""
    v = store.reserved_values
    with db.engine.connect() as conn:
        return sorted((kind, value) for kind, value in conn.execute(sa.select(v.c.kind, v.c.value)))


def reservation_ids(db) -> list[int]:
    with db.engine.connect() as conn:
        return sorted(conn.execute(sa.select(store.reservations.c.id)).scalars())


def add_row(db, table: sa.Table, vmid: int | None, **values: Any) -> None:
    row = {**app_row(vmid, "running", age=timedelta(days=1)), **values}
    with db.engine.begin() as conn:
        conn.execute(table.insert(), [row])


# --- free values on both sides ----------------------------------------------------------


def test_the_lowest_vmid_free_in_the_table_in_the_guest_list_and_in_proxmox(sim, any_db):
    table = scene(sim, any_db)
    sim.add_guest(105, name="unmanaged")  # a guest with no row
    add_row(any_db, table, 106, name="ghost106")  # a row whose guest is gone
    sim.add_guest(107, name="hidden")
    sim.set_visible({100, 101, 102, 103, 104, 105})  # 107 exists, the token cannot see it
    allocator = allocator_for(runtime_for(sim, any_db))
    sim.reset_counts()
    first = allocator.allocate(Request())
    # 107 is not in the guest list; /cluster/nextid?vmid=107 says it exists: skipped.
    assert first.vmid == 108
    assert sim.request_count("/cluster/nextid") == 2
    assert sim.request_count("/cluster/resources") == 1
    second = allocator.allocate(Request())
    assert second.vmid == 109  # 108 is reserved now: not even asked about
    assert reserved(any_db) == [("vmid", "108"), ("vmid", "109")]
    assert 107 not in {first.vmid, second.vmid}


def test_a_vmid_taken_in_proxmox_since_the_guest_list_was_read_is_skipped(sim, sqlite_db):
    scene(sim, sqlite_db)
    allocator = allocator_for(runtime_for(sim, sqlite_db))
    real = allocator.inventory.vmid_in_use
    created: list[int] = []

    def create_first(vmid: int) -> bool:
        if not created:  # another tool creates 105 right after our guest-list read
            created.append(vmid)
            sim.add_guest(vmid)
        return real(vmid)

    allocator.inventory.vmid_in_use = create_first  # type: ignore[method-assign]
    assert allocator.allocate(Request()).vmid == 106
    assert created == [105]


def test_the_range_is_respected_and_an_exhausted_range_is_a_clear_refusal(sim, any_db):
    scene(sim, any_db)
    allocator = allocator_for(runtime_for(sim, any_db, CLEANUP_ALLOCATOR_VMIDS="103-107"))
    assert [allocator.allocate(Request()).vmid for _ in range(3)] == [105, 106, 107]
    with pytest.raises(Refused) as refused:
        allocator.allocate(Request())
    assert refused.value.kind == "vmid_range_exhausted" and refused.value.status == 409
    assert "CLEANUP_ALLOCATOR_VMIDS=103-107" in str(refused.value)
    assert len(reservation_ids(any_db)) == 3


def test_hidden_guests_beyond_the_probe_budget_are_contention_not_a_wrong_vmid(sim, sqlite_db):
    scene(sim, sqlite_db)
    hidden = range(105, 105 + MAX_PROBES + 5)
    for vmid in hidden:
        sim.add_guest(vmid)
    sim.set_visible(set(range(100, 105)))
    allocator = allocator_for(runtime_for(sim, sqlite_db))
    with pytest.raises(Refused) as refused:
        allocator.allocate(Request())
    assert refused.value.kind == "contention" and refused.value.status == 503
    assert reservation_ids(sqlite_db) == []


# --- hostnames -------------------------------------------------------------------------


def test_a_hostname_is_free_only_when_no_row_guest_or_reservation_has_it(sim, any_db):
    scene(sim, any_db)
    sim.add_guest(120, name="guestname")
    allocator = allocator_for(runtime_for(sim, any_db))
    got = allocator.allocate(Request(hostname="Web1.Apps.Local", label="deploy 1"))
    assert got.hostname == "web1.apps.local" and got.label == "deploy 1"
    cases = {
        "app100.apps.local": "a row of 'apps'",
        "GuestName": "a guest in Proxmox",
        "web1.apps.local": f"reservation {got.id}",
    }
    for name, who in cases.items():
        with pytest.raises(Refused) as refused:
            allocator.allocate(Request(hostname=name))
        assert refused.value.kind == "hostname_taken" and refused.value.status == 409
        assert who in str(refused.value)
    assert reservation_ids(any_db) == [got.id]


def test_a_taken_hostname_with_suffix_gets_the_first_free_suffix(sim, sqlite_db):
    table = scene(sim, sqlite_db)
    add_row(sqlite_db, table, 130, hostname="web-2.apps.local", public_port=20130, internal_port=30130)
    sim.add_guest(131, name="web")
    allocator = allocator_for(runtime_for(sim, sqlite_db))
    got = allocator.allocate(Request(hostname="web", suffix=True))
    assert got.hostname == "web-2"  # the row holds web-2.apps.local, not web-2
    got = allocator.allocate(Request(hostname="web.apps.local", suffix=True))
    assert got.hostname == "web.apps.local"
    got = allocator.allocate(Request(hostname="web.apps.local", suffix=True))
    assert got.hostname == "web-3.apps.local"


@pytest.mark.parametrize("bad", ["", "-web", "web-", "a..b", "x" * 64, "web_1", "wéb", "a b", ("a." * 127) + "ab"])
def test_a_hostname_that_is_not_a_dns_name_is_invalid(bad):
    with pytest.raises(Refused) as refused:
        normal_hostname(bad)
    assert refused.value.kind == "invalid" and refused.value.status == 400


def test_suffixes_go_on_the_first_label():
    assert with_suffix("web", 2) == "web-2"
    assert with_suffix("web.apps.local", 13) == "web-13.apps.local"


# --- ports -----------------------------------------------------------------------------


def test_ports_in_range_that_no_row_holds_and_no_reservation_holds(sim, any_db):
    scene(sim, any_db)  # rows hold public 20100-20104, internal 30100-30104
    allocator = allocator_for(
        runtime_for(sim, any_db, CLEANUP_ALLOCATOR_PORTS="public_port=20102-20108,internal_port=30100-30199")
    )
    first = allocator.allocate(Request(ports={"public_port": 2, "internal_port": 1}))
    assert first.ports == {"public_port": [20105, 20106], "internal_port": [30105]}
    second = allocator.allocate(Request(ports={"public_port": 2}))
    assert second.ports == {"public_port": [20107, 20108]}
    with pytest.raises(Refused) as refused:
        allocator.allocate(Request(ports={"public_port": 1}))
    assert refused.value.kind == "port_range_exhausted" and refused.value.status == 409
    assert "public_port" in str(refused.value) and "20102-20108" in str(refused.value)
    assert len(reservation_ids(any_db)) == 2


def test_port_counts_a_count_for_every_column_or_a_mapping(sim, sqlite_db):
    settings = load_settings(env=janitor_env(sim, sqlite_db), overrides={"CLEANUP_ALLOCATOR_PORTS": PORTS})
    assert port_counts(settings, 2) == {"public_port": 2, "internal_port": 2}
    assert port_counts(settings, {"internal_port": 1, "public_port": 0}) == {"internal_port": 1}
    assert port_counts(settings, None) == {} and port_counts(settings, 0) == {}
    for bad, words in [
        ({"status": 1}, "no port range for 'status'"),
        ({"public_port": -1}, "0-32"),
        ({"public_port": 33}, "0-32"),
        ({"public_port": True}, "0-32"),
        (33, "0-32"),
    ]:
        with pytest.raises(Refused) as refused:
            port_counts(settings, bad)  # type: ignore[arg-type]
        assert refused.value.kind == "invalid" and words in str(refused.value)
    bare = load_settings(env=janitor_env(sim, sqlite_db))
    with pytest.raises(Refused, match="CLEANUP_ALLOCATOR_PORTS names no port range"):
        port_counts(bare, 1)


# --- how reservations end ----------------------------------------------------------------


def test_expiry_frees_the_values_and_the_next_allocation_deletes_the_expired(sim, any_db):
    scene(sim, any_db)
    clock = Clock()
    allocator = allocator_for(runtime_for(sim, any_db, clock=clock, CLEANUP_RESERVATION_MINUTES="15"))
    first = allocator.allocate(Request(hostname="web", ports={"public_port": 1}))
    assert first.expires_at == T0 + timedelta(minutes=15) and first.created_at == T0
    clock.advance(minutes=14, seconds=59)
    assert allocator.allocate(Request()).vmid == 106  # 105 still held
    clock.advance(seconds=1)  # first has expired: its values are free
    again = allocator.allocate(Request(hostname="web", ports={"public_port": 1}))
    assert (again.vmid, again.hostname, again.ports) == (105, "web", {"public_port": [20105]})
    assert first.id not in reservation_ids(any_db)
    with any_db.engine.connect() as conn:
        assert [r.id for r in reservations.listing(conn, "apps", clock())] == sorted(reservation_ids(any_db))
        assert reservations.count(conn, "apps", clock()) == 2


def test_a_reservation_ends_when_its_row_appears(sim, any_db):
    table = scene(sim, any_db)
    allocator = allocator_for(runtime_for(sim, any_db))
    by_vmid = allocator.allocate(Request(hostname="one", ports={"public_port": 1}))
    by_name = allocator.allocate(Request(hostname="two", ports={"public_port": 1}))
    assert (by_vmid.vmid, by_name.vmid) == (105, 106)
    # The platform creates both: one row with the reserved VMID, one with the reserved hostname
    # (and a VMID of its own choosing).
    add_row(any_db, table, 105, hostname="other", public_port=20150, internal_port=30150)
    add_row(any_db, table, 140, hostname="two", public_port=20151, internal_port=30151)
    third = allocator.allocate(Request(ports={"public_port": 1}))
    assert reservation_ids(any_db) == [third.id]
    # Both ended: their public ports are free again (their VMIDs and names are rows' now).
    assert third.vmid == 106 and third.ports == {"public_port": [20105]}


def test_housekeeping_prunes_expired_and_used_reservations(sim, any_db):
    table = scene(sim, any_db)
    clock = Clock()
    runtime = runtime_for(sim, any_db, clock=clock)
    allocator = allocator_for(runtime)
    used = allocator.allocate(Request())
    clock.advance(minutes=10)
    later = allocator.allocate(Request())
    add_row(any_db, table, used.vmid)
    # Nothing allocates now: housekeeping alone cleans up.
    housekeeping(runtime, Inbox(any_db.engine))
    assert reserved(any_db) == [("vmid", str(later.vmid))]  # the used one ended
    clock.advance(minutes=15)  # later has expired
    housekeeping(runtime, Inbox(any_db.engine))
    assert reservation_ids(any_db) == [] and reserved(any_db) == []


def test_release_frees_the_values_at_once(sim, any_db):
    scene(sim, any_db)
    runtime = runtime_for(sim, any_db)
    allocator = allocator_for(runtime)
    got = allocator.allocate(Request(hostname="web", ports=2))
    released = reservations.release(any_db.engine, "apps", got.id)
    assert released is not None and released.to_dict() == got.to_dict()
    assert reserved(any_db) == []
    assert reservations.release(any_db.engine, "apps", got.id) is None
    assert reservations.release(any_db.engine, "other_table", 1) is None
    assert reservations.release(any_db.engine, "apps", 2**63) is None
    again = allocator.allocate(Request(hostname="web", ports=2))
    assert (again.vmid, again.hostname, again.ports) == (got.vmid, got.hostname, got.ports)


# --- fail closed -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "fault, path, words",
    [
        ("refuse", None, "guest list could not be read"),
        ("http500", None, "guest list could not be read"),
        ("nodata", "/cluster/nextid", "could not confirm that VMID 105 is free"),
    ],
)
def test_proxmox_unreadable_reserves_nothing(sim, any_db, fault, path, words):
    scene(sim, any_db)
    allocator = allocator_for(runtime_for(sim, any_db))
    sim.set_fault(fault, path=path)
    with pytest.raises(Refused) as refused:
        allocator.allocate(Request(hostname="web", ports=1))
    assert refused.value.kind == "proxmox" and refused.value.status == 503
    assert words in str(refused.value) and "nothing was reserved" in str(refused.value)
    assert reservation_ids(any_db) == [] and reserved(any_db) == []
    sim.set_fault(None)
    assert allocator.allocate(Request(hostname="web", ports=1)).vmid == 105


def test_a_token_without_vm_audit_reserves_nothing(sim, sqlite_db):
    scene(sim, sqlite_db)
    allocator = allocator_for(runtime_for(sim, sqlite_db))
    sim.set_vm_audit(False)  # Proxmox would answer an empty guest list
    with pytest.raises(Refused, match="VM.Audit") as refused:
        allocator.allocate(Request())
    assert refused.value.kind == "proxmox"
    assert reservation_ids(sqlite_db) == []


# --- the UNIQUE constraint and concurrency ----------------------------------------------


def test_the_primary_key_refuses_a_duplicate_value(any_db):
    v = store.reserved_values
    row = {"table_name": "apps", "kind": "vmid", "value": "105", "reservation_id": 1}
    with any_db.engine.begin() as conn:
        conn.execute(v.insert(), [row])
    with pytest.raises(sa.exc.IntegrityError), any_db.engine.begin() as conn:
        conn.execute(v.insert(), [{**row, "reservation_id": 2}])
    # The same value of another kind or table is another key.
    with any_db.engine.begin() as conn:
        conn.execute(v.insert(), [{**row, "kind": "public_port"}, {**row, "table_name": "other"}])


def test_reserve_says_taken_and_reserves_nothing_when_a_value_is_held(any_db):
    common: dict[str, Any] = dict(now=T0, expires_at=T0 + timedelta(minutes=15), source="cli", label=None)
    first = reservations.reserve(any_db.engine, "apps", values=[("vmid", "105"), ("public_port", "20105")], **common)
    with pytest.raises(reservations.Taken):
        reservations.reserve(any_db.engine, "apps", values=[("vmid", "106"), ("public_port", "20105")], **common)
    assert reservation_ids(any_db) == [first.id]
    assert reserved(any_db) == [("public_port", "20105"), ("vmid", "105")]


class SlowProxmox:
    """An allocator's Proxmox that holds two allocations after they heard VMID 105 is free, so
    that both go on to reserve it."""

    def __init__(self, inventory: Any, barrier: threading.Barrier):
        self.inventory, self.barrier = inventory, barrier

    def read(self) -> Inventory:
        return self.inventory.read()

    def vmid_in_use(self, vmid: int) -> bool:
        answer = self.inventory.vmid_in_use(vmid)
        if vmid == 105:
            self.barrier.wait(10)
        return answer


def test_two_receivers_that_chose_alike_meet_the_primary_key_and_one_chooses_again(sim, any_db):
    scene(sim, any_db)
    runtime = runtime_for(sim, any_db)
    both = [allocator_for(runtime), allocator_for(runtime)]  # two receivers: no claims shared
    probed = threading.Barrier(2)
    for allocator in both:
        allocator.inventory = SlowProxmox(allocator.inventory, probed)  # type: ignore[assignment]
    got: list[reservations.Reservation] = []
    threads = [threading.Thread(target=lambda a=a: got.append(a.allocate(Request(ports=1)))) for a in both]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    first, second = sorted(r.vmid or 0 for r in got)
    # The loser chose again, among the first free values (spread out after a conflict).
    assert first == 105 and 106 <= second < 106 + WINDOW_START
    assert len({p for r in got for p in r.ports["public_port"]}) == 2
    assert sum(a.conflicts for a in both) == 1  # the database refused the second 105
    assert len(reserved(any_db)) == 6


def test_fifty_concurrent_allocations_never_hand_out_a_value_twice(sim, any_db):
    scene(sim, any_db)
    runtime = runtime_for(sim, any_db)
    receivers = [allocator_for(runtime), allocator_for(runtime)]  # two allocators, as two receivers
    got: list[reservations.Reservation] = []
    errors: list[BaseException] = []
    start = threading.Barrier(50)

    def one(i: int) -> None:
        try:
            start.wait()
            request = Request(hostname="web", suffix=True, ports={"public_port": 1})
            got.append(receivers[i % 2].allocate(request))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    assert len(got) == 50
    vmids = [r.vmid for r in got]
    names = [r.hostname for r in got]
    ports = [p for r in got for p in r.ports["public_port"]]
    assert len(set(vmids)) == len(set(names)) == len(set(ports)) == 50
    assert not set(vmids) & set(range(100, 105)) and not set(ports) & set(range(20100, 20105))
    assert all(v is not None and 105 <= v <= 105 + 200 for v in vmids)
    in_db = reserved(any_db)
    assert len(in_db) == 150 and len(reservation_ids(any_db)) == 50
    conflicts, reads = sum(a.conflicts for a in receivers), sum(a.guests.reads for a in receivers)
    print(f"\n{any_db.kind}: 50 allocations at once on two allocators: {conflicts} conflicts, {reads} list reads")
    assert reads < 50  # the crowd shared reads


WORKER = """
import json, sys, threading
from receiver.allocation import Request
from receiver.allocator import Allocator
from receiver.config import load_settings
from receiver.runtime import Runtime

settings = load_settings()
runtime = Runtime.build(settings)
allocator = Allocator(settings, runtime.table, runtime.inventory, runtime.clock)
got, errors = [], []
go = threading.Barrier(5)

def work():
    go.wait()
    for _ in range(5):
        try:
            got.append(allocator.allocate(Request("web", True, {"public_port": 1}, source="cli")).to_dict())
        except Exception as exc:
            errors.append(repr(exc))

threads = [threading.Thread(target=work) for _ in range(5)]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps({"got": got, "errors": errors}))
"""


def test_two_processes_allocating_at_once_never_hand_out_a_value_twice(sim, any_db):
    scene(sim, any_db)
    runtime_for(sim, any_db)  # tables migrated
    env = janitor_env(sim, any_db, CLEANUP_ALLOCATOR_PORTS=PORTS)
    env["PYTHONPATH"] = str(ROOT)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT
        )
        for _ in range(2)
    ]
    answers = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err.decode()[-2000:]
        answers.append(json.loads(out))
    assert [a["errors"] for a in answers] == [[], []]
    got = answers[0]["got"] + answers[1]["got"]
    assert len(got) == 50
    for key in ("vmid", "hostname", "id"):
        assert len({g[key] for g in got}) == 50, key
    assert len({g["ports"]["public_port"][0] for g in got}) == 50
    assert len(reservation_ids(any_db)) == 50


# --- the planner keeps a reserved VMID's row --------------------------------------------


def test_a_ghost_row_whose_vmid_is_reserved_is_kept_until_released(sim, any_db):
    table = scene(sim, any_db)
    runtime = runtime_for(sim, any_db)
    got = allocator_for(runtime).allocate(Request())
    # The platform wrote its row a day ago (its clock, a retry...) and the guest is not
    # there yet: without the reservation it would be a ghost past its grace period.
    add_row(any_db, table, got.vmid)
    result = runtime.sweeper.run(force=True)
    assert result.plan is not None and result.plan.actions == ()
    assert result.plan.kept.get("young") == 1
    assert got.vmid in table_vmids(any_db)
    assert reservations.release(any_db.engine, "apps", got.id) is not None
    result = runtime.sweeper.run(force=True)
    assert got.vmid not in table_vmids(any_db)
    assert result.plan is not None
    assert [a.row.vmid for a in result.plan.actions] == [got.vmid]


# --- pieces ------------------------------------------------------------------------------


def test_free_numbers_reads_gaps_not_the_table(any_db):
    """10,000 dense rows, then gaps: the lowest free numbers come from a few statements."""
    metadata = sa.MetaData()
    numbers = sa.Table("numbers", metadata, sa.Column("n", sa.Integer, primary_key=True))
    metadata.create_all(any_db.engine)
    used = list(range(100, 10_100)) + [10_101, 10_102, 10_104] + list(range(10_200, 10_300))
    with any_db.engine.begin() as conn:
        conn.execute(numbers.insert(), [{"n": n} for n in used])
    statements: list[str] = []
    sa.event.listen(any_db.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    with any_db.engine.connect() as conn:
        assert free_numbers(conn, numbers.c.n, 100, 20_000, {10_103}, 5) == [10_100, 10_105, 10_106, 10_107, 10_108]
        assert free_numbers(conn, numbers.c.n, 50, 20_000, set(), 3) == [50, 51, 52]
        assert free_numbers(conn, numbers.c.n, 10_250, 10_299, set(), 3) == []
        assert free_numbers(conn, numbers.c.n, 10_290, 10_305, set(), 9) == [
            10_300,
            10_301,
            10_302,
            10_303,
            10_304,
            10_305,
        ]
        assert free_numbers(conn, numbers.c.n, 30_000, 30_002, {30_001}, 9) == [30_000, 30_002]
    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert len(selects) <= 9, selects


def test_free_numbers_on_a_text_column(sqlite_db):
    metadata = sa.MetaData()
    texts = sa.Table("texts", metadata, sa.Column("k", sa.Integer, primary_key=True), sa.Column("v", sa.String(20)))
    metadata.create_all(sqlite_db.engine)
    with sqlite_db.engine.begin() as conn:
        conn.execute(texts.insert(), [{"v": v} for v in ["100", "101", "ct102", " 103", None, "1000"]])
    with sqlite_db.engine.connect() as conn:
        # "ct102" holds nothing that can be a number; " 103" is 103.
        assert free_numbers(conn, texts.c.v, 100, 105, {104}, 5) == [102, 105]
        assert free_numbers(conn, texts.c.v, 999, 1001, set(), 5) == [999, 1001]


def test_the_allocator_works_on_a_text_vmid_column(sim, sqlite_db):
    metadata = sa.MetaData()
    apps = sa.Table(
        "apps",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("lxc_id", sa.String(20), unique=True),
        sa.Column("hostname", sa.String(100)),
        sa.Column("public_port", sa.Integer),
        sa.Column("internal_port", sa.Integer),
        sa.Column("status", sa.String(20)),
        sa.Column("created_at", sa.DateTime),
        sa.Column("updated_at", sa.DateTime),
    )
    metadata.create_all(sqlite_db.engine)
    with sqlite_db.engine.begin() as conn:
        conn.execute(apps.insert(), [{"lxc_id": str(v), "status": "running"} for v in (100, 101)])
    for v in (100, 101):
        sim.add_guest(v)
    allocator = allocator_for(runtime_for(sim, sqlite_db))
    got = allocator.allocate(Request())
    assert got.vmid == 102
    with sqlite_db.engine.begin() as conn:
        conn.execute(apps.insert(), [{"lxc_id": "102", "status": "creating"}])
    assert allocator.allocate(Request()).vmid == 103
    assert reserved(sqlite_db) == [("vmid", "103")]  # 102's row appeared (as text): ended


def test_fresh_inventory_shares_one_read_among_callers_that_arrived_before_it():
    reads: list[float] = []
    gate = threading.Event()

    def read() -> Inventory:
        reads.append(time.monotonic())
        gate.wait(5)
        return Inventory({})

    fresh = FreshInventory(read)
    first = threading.Thread(target=fresh.get)
    first.start()
    while not reads:
        time.sleep(0.001)
    # These arrive while the first read runs: they may not use it, and share the next one.
    waiting = [threading.Thread(target=fresh.get) for _ in range(20)]
    for t in waiting:
        t.start()
    time.sleep(0.05)
    gate.set()
    for t in [first, *waiting]:
        t.join(10)
    assert len(reads) == 2 and fresh.reads == 2
    fresh.get()  # a caller arriving after every read: a read of its own
    assert len(reads) == 3


def test_fresh_inventory_serves_a_list_read_within_its_maximum_age():
    reads: list[int] = []

    def read() -> Inventory:
        reads.append(1)
        return Inventory({})

    fresh = FreshInventory(read, max_age=3600)
    first = fresh.get()
    assert fresh.get() is first and len(reads) == 1
    fresh.max_age = 0.0  # no list is recent enough now
    assert fresh.get() is not first and len(reads) == 2


def test_fresh_inventory_passes_a_failure_to_the_callers_and_keeps_nothing():
    answers: list[Any] = [InventoryError("unreachable", "pve1: cannot connect"), Inventory({})]

    def read() -> Inventory:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    fresh = FreshInventory(read, max_age=3600)
    with pytest.raises(InventoryError, match="cannot connect"):
        fresh.get()
    assert isinstance(fresh.get(), Inventory)


def test_the_reservation_answer_shape(sim, sqlite_db):
    scene(sim, sqlite_db)
    clock = Clock()
    got = allocator_for(runtime_for(sim, sqlite_db, clock=clock)).allocate(
        Request(hostname="web", ports=1, label="  deploy #7  ", source="cli")
    )
    assert got.to_dict() == {
        "id": got.id,
        "vmid": 105,
        "hostname": "web",
        "ports": {"internal_port": [30105], "public_port": [20105]},
        "expires_at": "2026-12-04T10:15:00+00:00",
        "created_at": "2026-12-04T10:00:00+00:00",
        "table": "apps",
        "source": "cli",
        "label": "deploy #7",
    }
    assert got.describe() == f"reservation {got.id}: VMID 105, hostname web, internal_port 30105, public_port 20105"
    with sqlite_db.engine.connect() as conn:
        assert [r.to_dict() for r in reservations.listing(conn, "apps", clock())] == [got.to_dict()]


def test_claims_keep_one_process_allocations_apart():
    from receiver.allocator import _Claims

    claims = _Claims()
    seen = claims.seen()
    assert claims.take("vmid", [105, 106, 107], 1, seen) == [105]
    assert claims.take("vmid", [105, 106, 107], 2, seen) == [106, 107]  # 105 is being tried
    assert claims.take("vmid", [105], 1, seen) == []
    claims.committed([("vmid", "105")])
    claims.drop("vmid", [105])
    # Reserved after `seen`: a read taken before cannot show it, so the claim stands for it.
    assert claims.take("vmid", [105], 1, seen) == []
    assert claims.take("vmid", [105], 1, claims.seen()) == [105]  # a later read shows the truth
    claims.drop("vmid", [105, 106, 107])
    assert claims.take("public_port", [105], 1, seen) == [105]  # another kind is another value


def test_a_burst_scans_from_the_last_floor_and_a_freed_row_comes_back_after_floor_s(sim, sqlite_db, monkeypatch):
    table = scene(sim, sqlite_db)
    allocator = allocator_for(runtime_for(sim, sqlite_db))
    assert allocator.allocate(Request()).vmid == 105
    with sqlite_db.engine.begin() as conn:  # a ghost removed: 101 is free in the table
        conn.execute(table.delete().where(table.c.lxc_id == 101))
    sim.destroy_guest(101)
    allocator.guests.max_age = 0.0  # a guest list read now: 101 is no guest's
    # Within FLOOR_S of the scan from the range's start, the scan starts at 105.
    assert allocator.allocate(Request()).vmid == 106
    monkeypatch.setattr("receiver.allocator.FLOOR_S", 0.0)
    assert allocator.allocate(Request()).vmid == 101


def test_any_label_is_kept_as_text_every_database_stores(sim, any_db):
    scene(sim, any_db)
    allocator = allocator_for(runtime_for(sim, any_db))
    got = allocator.allocate(Request(label="deploy\x00 #1 \ud800 " + "x" * 300))
    assert got.label is not None and "\x00" not in got.label and len(got.label) == 200
    assert got.label.startswith("deploy #1 ? x")
    with any_db.engine.connect() as conn:
        assert [r.label for r in reservations.listing(conn, "apps", utcnow())] == [got.label]
    assert allocator.allocate(Request(label="   ")).label is None
