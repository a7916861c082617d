"""The security review's claims (docs/security.md), each shown against a running receiver
or the real code path.  Secrets in output have their own test: test_secrets.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections import Counter
from datetime import timedelta

import pytest
import sqlalchemy as sa
from conftest import ROOT, cli_command, janitor_env, make_runtime, table_vmids
from test_install import UNIT_FILE, Env, assert_ok, env  # noqa: F401 - env: install.sh's fixture

from receiver import store
from receiver.config import ConfigError
from receiver.inbox import Inbox
from receiver.model import Event
from receiver.restore import restore
from receiver.simulator.scene import app_row, create_apps_table

from .support_io import Serve, event_body, seed_guests_and_rows, signed_headers, table_rows, wait_until

RUNNING, STOPPED = range(100, 106), range(106, 110)


def _audit_count(db) -> int:
    with db.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(store.audit)).scalar()


@pytest.fixture
def cluster(sim, sqlite_db):
    """Rows for ten guests that all exist: six running, four stopped."""
    seed_guests_and_rows(sqlite_db, sim, [*RUNNING, *STOPPED])
    for vmid in STOPPED:
        sim.stop_guest(vmid)
    return sim, sqlite_db


# --- an attacker on the network, and one holding the hook secret -------------------


@pytest.mark.slow
def test_events_without_the_secret_are_refused_and_with_it_only_cause_checks(cluster, tmp_path):
    sim, db = cluster
    before = table_rows(db)
    receiver = Serve(sim, db, tmp_path, extra={"CLEANUP_GRACE_MINUTES": 0}).start()
    try:
        # Without the secret: unsigned, forged, stale, and a captured request replayed.
        statuses: Counter[int] = Counter()
        for vmid in [*RUNNING, *STOPPED]:
            body = event_body(vmid, "post-stop")
            for headers in (
                {"Content-Type": "application/json"},
                signed_headers("guessed-secret", body),
                signed_headers(receiver.secret, body, ts=int(time.time()) - 301),
            ):
                statuses[receiver.request("POST", "/api/v1/events", data=body, headers=headers).status] += 1
        assert statuses == {401: 30}
        assert receiver.stats()["inbox_backlog"] == 0 and receiver.stats()["watched_vmids"] == []
        body = event_body(101, "post-stop", "captured-1")
        headers = signed_headers(receiver.secret, body)
        replies = [receiver.request("POST", "/api/v1/events", data=body, headers=headers).status for _ in range(5)]
        assert replies == [202, 200, 200, 200, 200]  # a replay inside the window is a no-op

        # With the secret: a stop for every guest, again and again, and a guest hidden from the
        # token (an ACL) that the attacker claims is gone: nothing may be removed.
        sim.set_visible([v for v in [*RUNNING, *STOPPED] if v != 103])
        for _ in range(3):
            for vmid in [*RUNNING, *STOPPED]:
                for phase in ("pre-stop", "post-stop"):
                    assert receiver.post_event(vmid, phase).status == 202
        wait_until(lambda: receiver.stats()["inbox_backlog"] == 0, 10)
        time.sleep(3.5)  # more than two confirming ticks for every watched VMID
        after = table_rows(db)
        assert _audit_count(db) == 0 and set(after) == set(before)
        for key, row in after.items():
            expected = "stopped" if row["lxc_id"] in STOPPED else "running"  # what Proxmox says, not the event
            assert row == {**before[key], "status": expected}
        stats = receiver.stats()
        assert stats["total_removed"] == 0
        assert stats["hidden_guests"] == [103]  # kept and reported, as it is: in use, not shown
    finally:
        receiver.close()


# --- a stolen admin token ----------------------------------------------------------


@pytest.mark.slow
def test_a_stolen_admin_token_cannot_force_past_the_safety_rules(cluster, tmp_path):
    sim, db = cluster
    with db.engine.begin() as conn:  # ghosts: more than half the table, so only force gets them
        conn.execute(
            sa.Table("apps", sa.MetaData(), autoload_with=conn).insert(),
            [app_row(v, "error", age=timedelta(days=2)) for v in range(300, 312)],
        )
    before = table_rows(db)
    receiver = Serve(sim, db, tmp_path).start()
    try:
        receiver.wait_first_sweep()
        cases = [
            ("token without VM.Audit", lambda: sim.set_vm_audit(False), "privilege"),
            ("empty list with VM.Audit", lambda: sim.set_visible([]), "empty_inventory"),
            ("node without quorum", lambda: sim.set_quorate(False), "no_quorum"),
            ("Proxmox unreachable", lambda: sim.set_fault("refuse"), "inventory"),
            ("Proxmox answering 500", lambda: sim.set_fault("http500"), "inventory"),
        ]
        for label, breakage, refusal in cases:
            breakage()
            answer = receiver.run("force=true")
            sim.set_vm_audit(True)
            sim.set_visible(None)
            sim.set_fault(None)
            sim.set_quorate(True)
            assert answer.status == 422, (label, answer.json())
            assert answer.json()["refusal"] == refusal, (label, answer.json())
            assert table_rows(db) == before and _audit_count(db) == 0, label
        # Force lifts the percentage guard, and that is all it does: only true ghosts go, and a
        # guest hidden by an ACL keeps its row (kept and reported, no longer a refusal).
        assert receiver.run().json()["refusal"] == "guard"
        sim.set_visible([v for v in [*RUNNING, *STOPPED] if v != RUNNING[0]])
        forced = receiver.run("force=true")
        sim.set_visible(None)
        assert forced.status == 200 and forced.json()["applied"] == 12, forced.json()
        assert forced.json()["hidden_guests"] == [RUNNING[0]]
        assert table_vmids(db) == [*RUNNING, *STOPPED]
    finally:
        receiver.close()


# --- the Proxmox token: read-only use -----------------------------------------------


@pytest.mark.slow
def test_only_gets_reach_proxmox_across_a_full_run(cluster, tmp_path):
    sim, db = cluster
    seen: Counter = Counter()
    handle = sim._handle

    def recording(method, target, authorization):
        seen[(method, target.split("?")[0])] += 1
        return handle(method, target, authorization)

    sim._handle = recording  # the simulator answers 501 to anything but GET; count what is asked
    receiver = Serve(sim, db, tmp_path, extra={"CLEANUP_TASK_POLL_SECONDS": 1, "CLEANUP_GRACE_MINUTES": 0}).start()
    try:
        receiver.wait_first_sweep()
        sim.destroy_guest(106)  # a stopped guest destroyed: no hook, found by the task tail
        sim.destroy_guest(100)  # a running one: its stop event
        assert receiver.post_event(100, "post-stop").status == 202
        wait_until(lambda: {100, 106}.isdisjoint(table_vmids(db)), 15, what="both rows removed")
        assert receiver.run("dry_run=true").status == 200
        assert receiver.run("force=true").status == 200
        cli_env = janitor_env(sim, db)
        for args in (["check"], ["sweep", "--dry-run"], ["sweep"], ["history"], ["restore", "1"]):
            proc = subprocess.run(
                cli_command() + args, env=cli_env, capture_output=True, text=True, timeout=60, cwd=ROOT
            )
            assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    finally:
        receiver.close()
        sim._handle = handle
    methods = Counter(method for method, _ in seen.elements())
    print(
        f"\nrequests to Proxmox by method: {dict(methods)}; by path: "
        f"{dict(Counter(path for _, path in seen.elements()))}"
    )
    assert set(methods) == {"GET"}
    paths = {path_shape(path.removeprefix("/api2/json")) for _, path in seen}
    assert paths <= {
        "/access/permissions",
        "/access/acl",
        "/cluster/resources",
        "/cluster/tasks",
        "/version",
        "/cluster/nextid",
        "/cluster/status",
        "/nodes/{node}/tasks",  # the task tail's archive read
        "/nodes/{node}/{type}",  # the watcher's probes: a node's guest list
        "/nodes/{node}/{type}/{vmid}/status/current",  # ... or one guest's status
        "/nodes/{node}/{type}/{vmid}/config",  # hook coverage: does the config name the hookscript
    }
    assert {"/access/permissions", "/access/acl", "/cluster/resources", "/cluster/tasks", "/cluster/status"} <= paths
    assert "/nodes/{node}/{type}/{vmid}/status/current" in paths  # the stopped guest was probed on its node


def path_shape(path: str) -> str:
    """A request path with its node, guest type and VMID replaced by placeholders."""
    path = re.sub(r"^/nodes/[^/]+", "/nodes/{node}", path)
    path = re.sub(r"^/nodes/\{node\}/(lxc|qemu)", "/nodes/{node}/{type}", path)
    return re.sub(r"^(/nodes/\{node\}/\{type\})/[0-9]+/", r"\1/{vmid}/", path)


# --- SQL through the table mapping ------------------------------------------------------

HOSTILE_NAMES = [
    "apps; DROP TABLE apps; --",
    'apps"; DROP TABLE apps; --',
    "apps`; DROP TABLE apps; --",
    "apps' OR '1'='1",
    "apps]; DROP TABLE apps; --",
]


@pytest.mark.parametrize(
    "variable",
    ["CLEANUP_TABLE", "CLEANUP_VMID_COLUMN", "CLEANUP_STATUS_COLUMN", "CLEANUP_PORT_COLUMNS", "CLEANUP_UPDATED_COLUMN"],
)
def test_sql_in_a_mapped_name_is_only_a_name_that_does_not_exist(sim, any_db, variable):
    seed_guests_and_rows(any_db, sim, RUNNING)
    before = table_rows(any_db)
    for name in HOSTILE_NAMES:
        value = name if variable == "CLEANUP_TABLE" else name.replace("apps", "lxc_id")
        with pytest.raises(ConfigError) as info:
            make_runtime(sim, any_db, **{variable: value})
        text = str(info.value)
        assert variable in text and ("no such table" in text or "no such column" in text), text
    assert table_rows(any_db) == before


def test_sql_in_a_mapped_name_stops_the_cli_at_start(sim, sqlite_db):
    seed_guests_and_rows(sqlite_db, sim, RUNNING)
    cli_env = janitor_env(sim, sqlite_db, CLEANUP_TABLE=HOSTILE_NAMES[0])
    proc = subprocess.run(cli_command() + ["sweep"], env=cli_env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and "no such table" in proc.stderr and "Traceback" not in proc.stderr
    assert table_vmids(sqlite_db) == list(RUNNING)


HOSTILE_VALUES = [
    "x'; DROP TABLE apps; --",
    'y"); DROP TABLE janitor_audit; --',
    "z`; DELETE FROM apps; #",
    "w\\'; --",
    "v\u2019; DROP TABLE apps; --\u0000".replace("\u0000", ""),
]


def test_sql_in_values_round_trips_through_sweep_audit_history_and_restore(sim, any_db):
    table = create_apps_table(any_db.engine)
    for vmid in RUNNING:
        sim.add_guest(vmid)
    ghosts = range(200, 200 + len(HOSTILE_VALUES))
    with any_db.engine.begin() as conn:
        conn.execute(table.insert(), [app_row(v, "running", age=timedelta(days=1)) for v in RUNNING])
        conn.execute(
            table.insert(),
            [
                {**app_row(v, "error", age=timedelta(days=2)), "hostname": text, "name": text[:100], "image": text}
                for v, text in zip(ghosts, HOSTILE_VALUES, strict=True)
            ],
        )
    before = table_rows(any_db)
    runtime = make_runtime(sim, any_db, CLEANUP_GRACE_MINUTES=0)
    result = runtime.sweeper.run(source="manual")
    assert result.outcome == "done" and result.applied is not None
    assert len(result.applied.applied) == len(HOSTILE_VALUES)
    assert table_vmids(any_db) == list(RUNNING)
    with any_db.engine.connect() as conn:
        audit = conn.execute(sa.select(store.audit.c.id, store.audit.c.hostname, store.audit.c.row_json)).all()
    assert sorted(a.hostname for a in audit) == sorted(HOSTILE_VALUES)
    for entry in audit:
        assert json.loads(entry.row_json)["hostname"] == entry.hostname
        restore(runtime.table, entry.id)
    assert table_rows(any_db) == before  # every value back byte for byte, every table still there

    inbox = Inbox(any_db.engine)
    event = Event("'; DROP TABLE janitor_inbox; --", 101, "post-stop", 'pve1"--', time.time())
    assert inbox.accept(event) and not inbox.accept(event)
    assert [e.event_id for e in inbox.pending()] == [event.event_id]


# --- the installed files ------------------------------------------------------------------


def test_the_installed_unit_runs_with_a_umask_that_keeps_new_files_private(env: Env):  # noqa: F811 - the fixture
    """install.sh's own tests check janitor.env and hook.conf are 0600 and the sandbox lines
    (tests/test_install.py); this adds the unit's UMask, which makes a SQLite database or
    anything else the service creates private too."""
    assert_ok(env.run("receiver"))
    unit = (env.root / UNIT_FILE).read_text().splitlines()
    assert "UMask=0077" in unit and "User=pve-janitor" in unit and "StateDirectoryMode=0750" in unit
