"""Hook coverage (receiver/coverage.py, coverage_db.py, coverage_refresh.py, guestconfig.py):
the decisions as pure functions, then whole passes against the simulator over HTTPS and real
databases, and what stats, metrics and check show of it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from conftest import after_read, janitor_env

from receiver import store
from receiver.checks import Checkup, Level, Verdict
from receiver.config import Settings, load_settings
from receiver.coverage import MATCH_SECONDS, SETTLE_SECONDS, Cached, NodeCheck, Pacer, Why, due_reads, node_checks
from receiver.coverage_db import read_cache
from receiver.coverage_refresh import STATUS_EXTENSION, Refresher
from receiver.guestconfig import HOOK_VOLUME, attach_command, is_janitor_hook, parse_config
from receiver.inbox import Inbox
from receiver.inventory import ProxmoxInventory
from receiver.metrics import Metrics
from receiver.model import Event, InventoryError, Task
from receiver.probe import Result
from receiver.runtime import Runtime
from receiver.serve import build
from receiver.shipped import HOOKSCRIPT
from receiver.simulator import ProxmoxSimulator
from receiver.simulator.scene import create_apps_table

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
DAY = timedelta(hours=24)
OTHER_HOOK = "local:snippets/platform-hook"


# --- which configs are read, and when (pure) ------------------------------------------------


def cached(vmid: int, node: str = "pve1", kind: str = "lxc", has_hook: bool = True, age: timedelta = DAY / 2):
    hook = HOOK_VOLUME if has_hook else None
    return Cached(vmid, node, kind, f"digest-{vmid}", hook, has_hook, T0 - age)


def test_new_and_moved_guests_come_first_then_event_hints_then_stale_ones_oldest_first():
    listed = {
        101: ("pve1", "lxc"),
        102: ("pve2", "lxc"),
        103: ("pve1", "lxc"),
        104: ("pve1", "lxc"),
        105: ("pve1", "lxc"),
    }
    cache = {
        102: cached(102, node="pve1"),  # migrated to pve2
        103: cached(103, age=DAY + timedelta(hours=1)),
        104: cached(104, age=DAY * 3),
        105: cached(105, has_hook=False),
    }
    due, credit = due_reads(listed, cache, T0, DAY, 0.0, hinted={105})
    assert [(d.vmid, d.why) for d in due] == [
        (101, Why.NEW),
        (102, Why.MOVED),
        (105, Why.EVENT),
        (104, Why.STALE),  # checked 3 days ago, before 103 (25 h ago)
        (103, Why.STALE),
    ]
    assert credit == 0.0


def test_a_guest_checked_within_the_period_is_not_read_again_without_credit():
    listed = {101: ("pve1", "lxc")}
    due, _ = due_reads(listed, {101: cached(101, age=timedelta(hours=23))}, T0, DAY, 0.0)
    assert due == []


def test_an_event_hint_for_a_guest_that_has_the_hook_already_is_no_reason_to_read():
    due, _ = due_reads({101: ("pve1", "lxc")}, {101: cached(101)}, T0, DAY, 0.0, hinted={101})
    assert due == []


def test_the_even_pace_reads_the_oldest_others_one_whole_read_at_a_time_and_carries_the_rest():
    listed = {v: ("pve1", "lxc") for v in range(100, 110)}
    cache = {v: cached(v, age=timedelta(hours=v - 99)) for v in listed}  # 109 is the oldest (10 h)
    due, credit = due_reads(listed, cache, T0, DAY, 2.5)
    assert [(d.vmid, d.why) for d in due] == [(109, Why.SPREAD), (108, Why.SPREAD)]
    assert credit == pytest.approx(0.5)


def test_stale_reads_spend_the_credit_first():
    listed = {100: ("pve1", "lxc"), 101: ("pve1", "lxc")}
    cache = {100: cached(100, age=DAY * 2), 101: cached(101, age=timedelta(hours=1))}
    due, credit = due_reads(listed, cache, T0, DAY, 1.2)
    assert [d.vmid for d in due] == [100]
    assert credit == pytest.approx(0.2)


def test_the_credit_never_exceeds_one_round():
    listed = {100: ("pve1", "lxc"), 101: ("pve1", "lxc")}
    cache = {v: cached(v, age=timedelta(hours=1)) for v in listed}
    due, credit = due_reads(listed, cache, T0, DAY, 50.0)
    assert len(due) == 2 and credit == 2.0


def test_an_unreadable_config_waits_for_the_retry_time():
    listed = {101: ("pve1", "lxc")}
    failed = {101: T0 - timedelta(minutes=10)}
    assert due_reads(listed, {}, T0, DAY, 0.0, failed=failed, retry=timedelta(hours=1))[0] == []
    due, _ = due_reads(listed, {}, T0, DAY, 0.0, failed=failed, retry=timedelta(minutes=5))
    assert [d.vmid for d in due] == [101]


def test_over_a_period_every_guest_is_read_about_once_at_a_flat_pace():
    """Passes every 5 minutes for two days: after the first burst (every guest new), about one
    read per guest per period, never more than a handful per pass."""
    guests = 200
    listed = {v: ("pve1", "lxc") for v in range(1000, 1000 + guests)}
    cache: dict[int, Cached] = {}
    credit, now, step = 0.0, T0, timedelta(minutes=5)
    reads_after_first: list[int] = []
    for n in range(int(2 * DAY / step)):
        credit += guests * (step / DAY) if n else 0.0
        due, credit = due_reads(listed, cache, now, DAY, credit)
        for d in due:
            cache[d.vmid] = Cached(d.vmid, d.node, d.type, "x", None, False, now)
        if n:
            reads_after_first.append(len(due))
        now += step
    assert sum(reads_after_first[-288:]) == pytest.approx(guests, abs=2)  # the last 24 h
    assert max(reads_after_first) <= 2
    assert all(now - step - c.checked_at <= DAY for c in cache.values())


# --- which nodes sent no event (pure) -----------------------------------------------------------


NOW = 1_800_000_000


def task(node: str, vmid: int, kind: str = "vzstart", start: int = NOW - 600, status: str = "OK") -> Task:
    return Task(f"UPID:{node}:{vmid}:{start}:{kind}", node, kind, vmid, status, start + 2, start)


def test_a_node_whose_hooked_guests_started_and_stopped_without_an_event_is_flagged():
    tasks = [task("pve1", 101), task("pve1", 101, "vzstop", NOW - 300), task("pve2", 205, "qmstart")]
    events = {101: [float(NOW - 599)]}  # the pre-start of the first task only
    checks = node_checks(tasks, {101, 205}, events, NOW)
    assert checks == {"pve1": NodeCheck("pve1", 2, 1, 0), "pve2": NodeCheck("pve2", 1, 1, 0)}
    assert not checks["pve1"].flagged  # it sent one: the hook runs there
    assert checks["pve2"].flagged


def test_a_start_that_failed_on_the_hookscript_counts_as_a_hook_error():
    failed = task("pve2", 205, "qmstart", status="hookscript error for 205 on pre-start: script 'x' does not exist")
    check = node_checks([failed], {205}, {}, NOW)["pve2"]
    assert (check.tasks, check.missed, check.hook_errors, check.flagged) == (1, 1, 1, True)


@pytest.mark.parametrize(
    "the_task, hooked, events",
    [
        (task("pve2", 205, "vzdestroy"), {205}, {}),  # not a start or stop
        (task("pve2", 205), set(), {}),  # the guest's config names no pve-janitor hook
        (task("pve2", 205, start=NOW - SETTLE_SECONDS), {205}, {}),  # ended too recently
        (task("pve2", 205), {205}, {205: [float(NOW - 600 - MATCH_SECONDS)]}),  # an event at the edge
    ],
)
def test_what_does_not_flag_a_node(the_task, hooked, events):
    assert not node_checks([the_task], hooked, events, NOW)["pve2"].flagged


def test_an_event_far_from_the_task_does_not_count_for_it():
    events = {205: [float(NOW - 600 - MATCH_SECONDS - 5), float(NOW)]}
    assert node_checks([task("pve2", 205)], {205}, events, NOW)["pve2"].flagged


# --- the pace ----------------------------------------------------------------------------------


def test_the_pacer_spaces_starts_and_books_a_list_read_as_three():
    clock = [100.0]
    waits: list[float] = []

    def wait(seconds: float) -> bool:
        waits.append(round(seconds, 6))
        clock[0] += seconds
        return False

    pacer = Pacer(5.0, clock=lambda: clock[0], wait=wait)
    assert pacer.take(3) and pacer.take() and pacer.take()
    assert waits == [0.6, 0.2]  # three slots for the list read, then one each


def test_the_pacer_gives_up_when_told_to_stop():
    stop = threading.Event()
    stop.set()
    pacer = Pacer(0.1, wait=stop.wait)
    assert pacer.take() is True  # the first start needs no wait
    assert pacer.take() is False


# --- reading a config (pure) ---------------------------------------------------------------


@pytest.mark.parametrize(
    "volume, ours",
    [
        ("local:snippets/pve-janitor-hook", True),
        ("cephfs:snippets/pve-janitor-hook", True),  # a shared storage serves as well
        ("local:snippets/platform-hook", False),
        ("local:snippets/pve-janitor-hook.bak", False),
        ("local:iso/pve-janitor-hook", False),
        ("snippets/pve-janitor-hook", False),
        ("", False),
        (None, False),
    ],
)
def test_which_hookscript_is_pve_janitors(volume, ours):
    assert is_janitor_hook(volume) is ours


def test_the_attach_line_is_pct_for_a_container_and_qm_for_a_vm():
    assert attach_command("lxc", 101) == "pct set 101 --hookscript local:snippets/pve-janitor-hook"
    assert attach_command("qemu", 205) == "qm set 205 --hookscript local:snippets/pve-janitor-hook"


@pytest.mark.parametrize(
    "code, reason, body, result",
    [
        (200, "OK", b'{"data": {"digest": "abc", "hookscript": "local:snippets/pve-janitor-hook"}}', Result.PRESENT),
        (200, "OK", b'{"data": {"digest": "abc"}}', Result.PRESENT),
        (200, "OK", b'{"data": {"hostname": "x"}}', Result.MALFORMED),
        (200, "OK", b'{"data": {"digest": "abc", "hookscript": 7}}', Result.MALFORMED),
        (200, "OK", b"<html>", Result.MALFORMED),
        (500, "Configuration file 'nodes/pve1/lxc/101.conf' does not exist", b"{}", Result.GONE),
        (500, "Configuration file 'nodes/pve1/lxc/102.conf' does not exist", b"{}", Result.HTTP),  # another guest
        (595, "Errors during connection establishment", b"", Result.OFFLINE),
        (403, "Permission check failed (/vms/101, VM.Audit)", b"", Result.PRIVILEGE),
        (401, "authentication failure", b"", Result.AUTH),
    ],
)
def test_a_config_answer_is_read_as_what_it_says(code, reason, body, result):
    found = parse_config(101, "pve1", "lxc", code, reason, body)
    assert found.result is result
    if result is Result.PRESENT:
        assert found.digest == "abc" and found.has_hook is (b"hookscript" in body)
    else:
        assert found.digest is None and not found.has_hook


# --- whole passes against the simulator ------------------------------------------------------


@pytest.fixture
def cluster() -> Iterator[ProxmoxSimulator]:
    """pve1: 101 with pve-janitor's hook, 102 without; pve2: VM 205 with another hookscript,
    206 without, 207 with the hook on a shared storage; a template that is never counted."""
    with ProxmoxSimulator(nodes=("pve1", "pve2")).start() as sim:
        sim.add_guest(101, node="pve1", hookscript=str(HOOKSCRIPT))
        sim.add_guest(102, node="pve1")
        sim.add_guest(205, node="pve2", type="qemu", status="stopped", hookscript=OTHER_HOOK)
        sim.add_guest(206, node="pve2", type="qemu", status="stopped")
        sim.add_guest(207, node="pve2", status="stopped", hookscript="cephfs:snippets/pve-janitor-hook")
        sim.add_guest(900, node="pve2", status="stopped", template=True)
        yield sim


def settings_for(sim: ProxmoxSimulator, db, **env) -> Settings:
    return load_settings(env=janitor_env(sim, db, **{"CLEANUP_COVERAGE_RPS": "100", **env}))


def refresher(sim, db, clock=None, **kwargs) -> Refresher:
    settings = settings_for(sim, db, **kwargs.pop("env", {}))
    return Refresher(db.engine, ProxmoxInventory(settings), settings, clock=clock or (lambda: T0), **kwargs)


def cache(db) -> dict[int, Cached]:
    with db.engine.connect() as conn:
        return read_cache(conn)


def test_a_pass_finds_each_guest_with_without_or_with_another_hookscript(cluster, any_db):
    counts = refresher(cluster, any_db).run_pass()
    found = cache(any_db)
    assert {v: (c.node, c.type, c.hookscript, c.has_hook) for v, c in found.items()} == {
        101: ("pve1", "lxc", "local:snippets/pve-janitor-hook", True),
        102: ("pve1", "lxc", None, False),
        205: ("pve2", "qemu", OTHER_HOOK, False),
        206: ("pve2", "qemu", None, False),
        207: ("pve2", "lxc", "cephfs:snippets/pve-janitor-hook", True),
    }  # the template is left out: it never starts
    assert all(c.checked_at == T0 and c.digest for c in found.values())
    assert (counts["read"], counts["changed"], counts["unchanged"]) == (5, 5, 0)


def test_an_unchanged_digest_keeps_the_verdict_and_a_changed_one_is_read_again(cluster, any_db):
    now = [T0]
    coverage = refresher(cluster, any_db, clock=lambda: now[0])
    coverage.run_pass()
    cluster.reset_counts()
    assert coverage.run_pass()["read"] == 0  # nothing due: no config asked for
    assert cluster.request_count("/nodes") == 0
    # What the cache holds for 102 is its verdict: with the same digest it stands, read or not.
    with any_db.engine.begin() as conn:
        conn.execute(store.coverage.update().where(store.coverage.c.vmid == 102).values(hookscript="kept"))
    cluster.set_hookscript(206, "local:snippets/pve-janitor-hook")  # attached by root: a new digest
    digest_206 = cache(any_db)[206].digest
    now[0] = T0 + DAY  # a day later every config is due again
    counts = coverage.run_pass()
    assert (counts["read"], counts["changed"], counts["unchanged"]) == (5, 1, 4)
    found = cache(any_db)
    assert found[102].hookscript == "kept" and found[102].checked_at == T0 + DAY
    assert found[206].has_hook and found[206].digest != digest_206 and found[206].checked_at == T0 + DAY


def test_a_guest_that_sends_events_after_it_was_found_without_the_hook_is_read_first(cluster, sqlite_db):
    now = [T0]
    coverage = refresher(cluster, sqlite_db, clock=lambda: now[0])
    coverage.run_pass()
    cluster.set_hookscript(102, str(HOOKSCRIPT))
    now[0] = T0 + timedelta(minutes=5)
    Inbox(sqlite_db.engine).accept(Event("e" * 32, 102, "post-start", "pve1", time.time()), now[0])
    counts = coverage.run_pass()
    assert counts["read"] == 1 and cache(sqlite_db)[102].has_hook


def test_a_migrated_guest_is_read_again_and_a_destroyed_one_forgotten(cluster, sqlite_db):
    coverage = refresher(cluster, sqlite_db)
    coverage.run_pass()
    cluster.migrate_guest(206, "pve1")
    cluster.destroy_guest(205)
    counts = coverage.run_pass()
    found = cache(sqlite_db)
    assert counts["read"] == 1 and counts["forgotten"] == 1
    assert 205 not in found and (found[206].node, found[206].type) == ("pve1", "qemu")


def test_a_token_without_vm_audit_stops_the_pass_and_the_cache_is_kept(cluster, sqlite_db):
    coverage = refresher(cluster, sqlite_db)
    coverage.run_pass()
    cluster.set_vm_audit(False)  # Proxmox would list no guest at all, with HTTP 200
    with pytest.raises(InventoryError) as caught:
        coverage.run_pass()
    assert caught.value.kind == "privilege"
    assert len(cache(sqlite_db)) == 5


def test_a_config_the_token_may_not_read_is_reported_and_the_others_are_read(cluster, sqlite_db, caplog):
    coverage = refresher(cluster, sqlite_db)
    after_read(cluster, 1, lambda: cluster.set_visible({101, 102, 205, 207}))  # 206 hidden after the list
    counts = coverage.run_pass()
    assert counts["read"] == 5 and counts["unreadable"] == 1
    assert set(cache(sqlite_db)) == {101, 102, 205, 207}
    why = coverage.status.unreadable[206]
    assert why.startswith("privilege: HTTP 403") and "/vms/206" in why
    assert "the config of qemu 206 on pve2 could not be read (privilege" in caplog.text
    assert cluster.token_value not in caplog.text and cluster.token_value not in why


def test_reads_stay_at_the_configured_rate(sqlite_db):
    """50 guests at 5 requests a second, timed where the simulator receives them.

    The pacer spaces the *starts* 0.2 s apart; on a loaded machine an arrival can lag its start
    by tens of milliseconds, so a one-second window may catch one request early (6), never
    more; over the whole pass the rate is 5 a second, the list and task reads counted in."""
    with ProxmoxSimulator(nodes=("pve1", "pve2")).start() as sim:
        for vmid in range(1000, 1050):
            sim.add_guest(vmid, node="pve1" if vmid % 2 else "pve2")
        arrivals: list[tuple[float, str]] = []
        route = sim._route

        def timed(path, query):
            arrivals.append((time.monotonic(), path))
            return route(path, query)

        sim._route = timed
        counts = refresher(sim, sqlite_db, env={"CLEANUP_COVERAGE_RPS": "5"}).run_pass()
    assert counts["read"] == 50 and len(cache(sqlite_db)) == 50
    configs = [t for t, path in arrivals if path.endswith("/config")]
    times = [t for t, _ in arrivals]
    assert len(configs) == 50 and len(times) == 54  # the list read's three requests, the task list
    per_second = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
    assert per_second <= 6, per_second
    assert times[-1] - times[0] >= 53 / 5 - 0.1  # 54 starts, the list read booked as three
    gaps = sorted(b - a for a, b in zip(configs, configs[1:], strict=False))
    assert gaps[len(gaps) // 2] >= 0.19  # the median spacing is the pacer's 0.2 s


# --- the node checks against the simulator -------------------------------------------------------


def test_a_node_whose_hooked_guests_ran_without_events_is_flagged_and_one_with_events_is_not(sqlite_db, tmp_path):
    silent = tmp_path / "silent-hook"  # runs, exits 0, sends nothing: a hook.conf that reaches nobody
    silent.write_text("#!/bin/sh\nexit 0\n")
    silent.chmod(0o755)
    with ProxmoxSimulator(nodes=("pve1", "pve2", "pve3")).start() as sim:
        sim.install_snippet(HOOK_VOLUME, str(silent), nodes=("pve1", "pve2"))  # missing on pve3
        for vmid, node in ((101, "pve1"), (102, "pve1"), (205, "pve2"), (301, "pve3")):
            sim.add_guest(vmid, node=node, status="stopped", hookscript=HOOK_VOLUME)
        sim.add_guest(110, node="pve2", status="stopped")  # no hook: its starts prove nothing
        metrics = Metrics()
        coverage = refresher(sim, sqlite_db, metrics=metrics, wall=lambda: time.time() + SETTLE_SECONDS + 5)
        coverage.run_pass()
        for vmid in (101, 205, 110):
            assert sim.start_guest(vmid) and sim.stop_guest(vmid)
        assert sim.start_guest(301) is False  # Proxmox aborts: the volume is not on pve3
        inbox = Inbox(sqlite_db.engine)
        for n, phase in enumerate(("pre-start", "post-start", "pre-stop", "post-stop")):
            inbox.accept(Event(f"{n:032d}", 101, phase, "pve1", time.time()))
        checks = coverage.check_nodes()
    assert checks is not None
    assert checks["pve1"] == NodeCheck("pve1", 2, 0, 0) and not checks["pve1"].flagged
    assert checks["pve2"] == NodeCheck("pve2", 2, 2, 0) and checks["pve2"].flagged
    assert checks["pve3"] == NodeCheck("pve3", 1, 1, 1) and checks["pve3"].flagged
    rendered = metrics.render().decode()
    assert 'pve_janitor_node_events_missing{node="pve1"} 0.0' in rendered
    assert 'pve_janitor_node_events_missing{node="pve2"} 1.0' in rendered
    assert coverage.status.nodes == checks


def test_a_flagged_node_is_logged_when_it_becomes_flagged_not_at_every_pass(cluster, sqlite_db, caplog):
    coverage = refresher(cluster, sqlite_db)
    coverage.run_pass()
    started = int(time.time()) - 600
    cluster.tasks.record("pve2", "vzstart", 207, started, "OK", started + 2)  # hooked, no event
    for _ in range(3):
        assert coverage.check_nodes()["pve2"].flagged  # type: ignore[index]
    said = [r for r in caplog.records if "node pve2 sent no event" in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == "WARNING"


# --- the thread, serve, stats, metrics, check ----------------------------------------------------


def test_a_receiver_without_the_lease_reads_nothing(cluster, sqlite_db):
    asked = threading.Event()

    def leader() -> bool:
        asked.set()
        return False

    coverage = refresher(cluster, sqlite_db, leader=leader).start()
    try:
        assert asked.wait(5)
    finally:
        coverage.stop()
    assert not coverage.alive()
    assert cluster.request_count() == 0 and cache(sqlite_db) == {}


def test_the_lease_holder_s_thread_fills_the_cache(cluster, sqlite_db):
    coverage = refresher(cluster, sqlite_db).start()
    try:
        deadline = time.monotonic() + 20
        while len(cache(sqlite_db)) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert coverage.alive()
    finally:
        coverage.stop()
    assert len(cache(sqlite_db)) == 5 and coverage.status.nodes is not None


def _serve(sim, db) -> dict:
    create_apps_table(db.engine)
    settings = settings_for(sim, db)
    return build(settings, Runtime.build(settings, engine=db.engine))


def test_stats_and_metrics_show_the_coverage(cluster, sqlite_db):
    parts = _serve(cluster, sqlite_db)
    client = parts["app"].test_client()
    before = client.get("/api/v1/system/cleanup/stats").get_json()["coverage"]
    assert before == {"guests": 0, "without_hook": 0, "checked_at": None, "unreadable": [], "nodes": {}}
    assert parts["app"].extensions[STATUS_EXTENSION] is parts["refresher"].status
    Inbox(sqlite_db.engine).accept(Event("a" * 32, 101, "pre-start", "pve1", time.time()))
    Inbox(sqlite_db.engine).accept(Event("b" * 32, 101, "post-start", "pve1", time.time()))
    assert parts["refresher"].run_pass()["read"] == 0  # the watcher has not taken the lease yet
    parts["watcher"].tick()
    assert parts["watcher"].leader
    parts["refresher"].run_pass()
    shown = client.get("/api/v1/system/cleanup/stats").get_json()["coverage"]
    assert (shown["guests"], shown["without_hook"], shown["unreadable"]) == (5, 3, [])
    assert shown["checked_at"] is not None
    pve1, pve2 = shown["nodes"]["pve1"], shown["nodes"]["pve2"]
    assert pve1["events"] == {"pre-start": 1, "post-start": 1} and pve1["last_event"] is not None
    assert (pve1["guests"], pve1["without_hook"], pve1["flagged"]) == (2, 1, False)
    assert (pve2["guests"], pve2["without_hook"], pve2["events"], pve2["last_event"]) == (3, 2, {}, None)
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'pve_janitor_guests_without_hook{node="pve1"} 1.0' in metrics
    assert 'pve_janitor_guests_without_hook{node="pve2"} 2.0' in metrics


def test_check_warns_of_guests_without_the_hook_and_of_a_silent_node_and_still_passes(cluster, sqlite_db):
    create_apps_table(sqlite_db.engine)
    refresher(cluster, sqlite_db, clock=lambda: datetime.now(timezone.utc)).run_pass()
    started = int(time.time()) - 600  # a start of 207 (hooked) ten minutes ago, and no event
    cluster.tasks.record("pve2", "vzstart", 207, started, "OK", started + 2)
    checkup = Checkup(janitor_env(cluster, sqlite_db), engine=sqlite_db.engine)
    lines = [line for line in checkup if line.what == "coverage"]
    assert checkup.verdict is Verdict.PASSED
    assert [line.level for line in lines] == [Level.WARN, Level.WARN]
    assert lines[0].detail.startswith("3 of 5 guests' configs name no pve-janitor hookscript")
    assert f"102 (pve1), 205 (pve2, has {OTHER_HOOK}), 206 (pve2)" in lines[0].detail
    assert lines[1].detail.startswith("node pve2 sent no event for 1 starts/stops")


def test_check_says_nothing_of_coverage_when_every_guest_has_the_hook(sqlite_db):
    with ProxmoxSimulator(nodes=("pve1",)).start() as sim:
        sim.add_guest(101, node="pve1", hookscript=str(HOOKSCRIPT))
        create_apps_table(sqlite_db.engine)
        refresher(sim, sqlite_db).run_pass()
        lines = list(Checkup(janitor_env(sim, sqlite_db), engine=sqlite_db.engine))
    assert [line.what for line in lines if line.level is not Level.OK] == []
    assert "coverage" not in {line.what for line in lines}


def test_the_simulator_config_names_the_hookscript_as_set_and_a_missing_snippet_stops_a_start(tmp_path: Path):
    with ProxmoxSimulator(nodes=("pve1", "pve2")).start() as sim:
        sim.add_guest(101, node="pve2", status="stopped")
        before = sim._api_config({}, "pve2", "lxc", "101")
        sim.set_hookscript(101, HOOK_VOLUME)
        after = sim._api_config({}, "pve2", "lxc", "101")
        assert "hookscript" not in before and after["hookscript"] == HOOK_VOLUME
        assert after["digest"] != before["digest"]
        assert sim.start_guest(101) is False
        failed = [t for t in sim.tasks.cluster_list() if t["type"] == "vzstart"][-1]
        assert failed["status"] == f"hookscript error for 101 on pre-start: script '{HOOK_VOLUME}' does not exist"
        sim.install_snippet(HOOK_VOLUME, "/bin/true", nodes=("pve2",))
        assert sim.start_guest(101) is True
        sim.set_hookscript(101, None)
        assert "hookscript" not in sim._api_config({}, "pve2", "lxc", "101")
    with pytest.raises(ValueError):
        sim.install_snippet("/var/lib/vz/snippets/x", "/bin/true")


def test_the_config_answer_with_a_hookscript_has_the_shape_proxmox_declares(cluster):
    import requests
    from test_contract import SCHEMA, shape_errors  # the schema comes with fakepve (test-only)

    for path, template in (
        ("/nodes/pve1/lxc/101/config", "/nodes/{node}/lxc/{vmid}/config"),
        ("/nodes/pve2/qemu/205/config", "/nodes/{node}/qemu/{vmid}/config"),
    ):
        reply = requests.get(
            cluster.url + path,
            headers={"Authorization": f"PVEAPIToken={cluster.token_id}={cluster.token_value}"},
            verify=cluster.ca_path,
            timeout=5,
        )
        data = reply.json()["data"]
        assert data["hookscript"] and data["digest"]
        assert shape_errors(data, SCHEMA[template]["GET"]["returns"]) == []


def test_coverage_counts_match_what_the_pass_wrote(cluster, any_db):
    """The aggregate the metrics read (a CASE over a boolean column) on every database."""
    from receiver.coverage_db import node_counts, oldest_check

    refresher(cluster, any_db).run_pass()
    with any_db.engine.connect() as conn:
        assert node_counts(conn) == {"pve1": (2, 1), "pve2": (3, 2)}
        assert oldest_check(conn) == T0


def test_events_per_node_and_phase_come_from_the_inbox(any_db):
    from receiver.coverage_db import event_counts

    inbox = Inbox(any_db.engine)
    for n, (node, phase) in enumerate(
        [("pve1", "pre-stop"), ("pve1", "post-stop"), ("pve1", "post-stop"), ("pve2", "pre-start")]
    ):
        inbox.accept(Event(f"{n:032d}", 100 + n, phase, node, time.time()), T0 + timedelta(minutes=n))
    with any_db.engine.connect() as conn:
        found = event_counts(conn)
    assert found == {
        "pve1": {"last_event": T0 + timedelta(minutes=2), "events": {"pre-stop": 1, "post-stop": 2}},
        "pve2": {"last_event": T0 + timedelta(minutes=3), "events": {"pre-start": 1}},
    }
