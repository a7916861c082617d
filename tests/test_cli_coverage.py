"""``pve-janitor coverage`` as a real subprocess against the simulator over HTTPS and a real
SQLite file: the exact lines that attach the hookscript, the per-node table and flags, JSON,
exit codes, and nothing secret in what it prints."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from conftest import after_read, janitor_env, run_cli

from receiver.inbox import Inbox
from receiver.model import Event
from receiver.shipped import HOOKSCRIPT
from receiver.simulator import ProxmoxSimulator

FAST = {"CLEANUP_COVERAGE_RPS": "50"}
HOOK = "local:snippets/pve-janitor-hook"


@pytest.fixture
def cluster() -> Iterator[ProxmoxSimulator]:
    """101 and VM 205 without a hookscript, 107 with another, 110 with pve-janitor's."""
    with ProxmoxSimulator(nodes=("pve1", "pve2")).start() as sim:
        sim.add_guest(101, node="pve1")
        sim.add_guest(107, node="pve1", hookscript="local:snippets/platform-hook")
        sim.add_guest(110, node="pve1", hookscript=str(HOOKSCRIPT))
        sim.add_guest(205, node="pve2", type="qemu", status="stopped")
        yield sim


def coverage(sim, db, *args: str, **env: str):
    return run_cli(["coverage", *args], janitor_env(sim, db, **{**FAST, **env}))


def test_refresh_prints_the_exact_lines_that_attach_the_hookscript_and_exits_0(cluster, sqlite_db):
    result = coverage(cluster, sqlite_db, "--refresh")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0].startswith("4 guests: 1 with pve-janitor's hookscript, 3 without, 0 not checked yet, configs read ")
    assert "pct set 101 --hookscript local:snippets/pve-janitor-hook" in lines
    assert "qm set 205 --hookscript local:snippets/pve-janitor-hook" in lines
    assert "pct set 107 --hookscript local:snippets/pve-janitor-hook  # now local:snippets/platform-hook" in lines
    assert not any(line.startswith(("pct set 110", "qm set 110")) for line in lines)
    assert "reading 4 guest configs at 50 a second" in result.err
    assert cluster.token_value not in result.out + result.err
    assert "Traceback" not in result.err


def test_json_reads_the_cache_and_names_guests_not_checked_yet(cluster, sqlite_db):
    assert coverage(cluster, sqlite_db, "--refresh").code == 0
    cluster.add_guest(300, node="pve2")  # created since: serve reads it first, this shows it
    result = coverage(cluster, sqlite_db, "--json")
    assert result.code == 0, result.err
    report = result.json()
    assert (report["guests"], report["checked"], report["with_hook"], report["without_hook"]) == (5, 4, 1, 3)
    assert report["not_checked"] == [300] and report["proxmox_error"] is None
    assert report["hook_volume"] == HOOK
    assert [(g["vmid"], g["type"], g["hookscript"], g["command"]) for g in report["without"]] == [
        (101, "lxc", None, f"pct set 101 --hookscript {HOOK}"),
        (107, "lxc", "local:snippets/platform-hook", f"pct set 107 --hookscript {HOOK}"),
        (205, "qemu", None, f"qm set 205 --hookscript {HOOK}"),
    ]
    assert report["nodes"]["pve1"]["guests"] == 3 and report["nodes"]["pve2"]["guests"] == 2
    assert report["nodes"]["pve2"]["without_hook"] == 1 and report["nodes"]["pve1"]["flagged"] is False


def test_the_node_table_shows_events_per_phase_and_flags_a_silent_node(cluster, sqlite_db):
    cluster.set_hookscript(205, HOOK)  # attached, but no event ever comes from pve2
    assert coverage(cluster, sqlite_db, "--refresh").code == 0
    started = int(time.time()) - 600
    cluster.tasks.record("pve2", "qmstart", 205, started, "OK", started + 3)
    cluster.tasks.record("pve1", "vzstop", 110, started, "OK", started + 3)
    inbox = Inbox(sqlite_db.engine)
    inbox.accept(Event("a" * 32, 110, "pre-stop", "pve1", started + 1.0))
    inbox.accept(Event("b" * 32, 110, "post-stop", "pve1", started + 2.5))
    result = coverage(cluster, sqlite_db)
    assert result.code == 0, result.err
    table = [line.split() for line in result.out.splitlines() if line.startswith(("NODE", "pve1", "pve2"))]
    assert table[0] == ["NODE", "LAST", "EVENT", "(UTC)", "PRE-START", "POST-START", "PRE-STOP", "POST-STOP"] + [
        "GUESTS",
        "WITHOUT",
        "HOOK",
        "FLAG",
    ]
    pve1, pve2 = table[1], table[2]
    assert pve1[-7:] == ["0", "0", "1", "1", "3", "2", "ok"]
    assert pve2[1] == "-" and pve2[-7:] == ["0", "0", "0", "0", "1", "0", "FLAGGED"]
    assert (
        "pve2: no event for 1 starts/stops of guests whose config names the hookscript. Is "
        "/var/lib/vz/snippets/pve-janitor-hook on pve2, executable, and does its /etc/pve-janitor/hook.conf "
        "reach the receiver?"
    ) in result.out
    assert "sent no event" not in result.err  # said once, in the report
    report = coverage(cluster, sqlite_db, "--json").json()
    assert report["nodes"]["pve2"] | {"last_event": None} == {
        "last_event": None,
        "events": {"pre-start": 0, "post-start": 0, "pre-stop": 0, "post-stop": 0},
        "guests": 1,
        "without_hook": 0,
        "flagged": True,
        "tasks": 1,
        "missed": 1,
        "hook_errors": 0,
    }
    assert report["nodes"]["pve1"]["events"]["post-stop"] == 1 and report["nodes"]["pve1"]["flagged"] is False


def test_a_config_the_token_may_not_read_is_reported_not_fatal(cluster, sqlite_db):
    after_read(cluster, 1, lambda: cluster.set_visible({101, 110, 205}))  # 107 hidden after the list
    result = coverage(cluster, sqlite_db, "--refresh")
    assert result.code == 0, result.err
    assert "Config of 107 not read: privilege: HTTP 403 Permission check failed (/vms/107, VM.Audit)" in result.out
    assert "pct set 101 --hookscript local:snippets/pve-janitor-hook" in result.out


def test_proxmox_unreachable_shows_the_cache_and_exits_3(cluster, sqlite_db):
    assert coverage(cluster, sqlite_db, "--refresh").code == 0
    cluster.set_fault("refuse")
    result = coverage(cluster, sqlite_db)
    assert result.code == 3
    assert "pct set 101 --hookscript local:snippets/pve-janitor-hook" in result.out  # from the cache
    assert "Proxmox could not be read" in result.err and "cannot connect to" in result.err
    assert "Traceback" not in result.err and cluster.token_value not in result.out + result.err
    report = coverage(cluster, sqlite_db, "--json")
    assert report.code == 3 and report.json()["not_checked"] is None and report.json()["proxmox_error"]


@pytest.mark.parametrize(
    "unset, named",
    [("DATABASE_URL", "DATABASE_URL is not set"), ("PVE_TOKEN_VALUE", "PVE_TOKEN_VALUE is not set")],
)
def test_missing_settings_exit_2_naming_them(cluster, sqlite_db, unset, named):
    result = coverage(cluster, sqlite_db, **{unset: ""})
    assert result.code == 2 and named in result.err


def test_a_schema_behind_is_refused_with_exit_3(cluster, tmp_path):
    from conftest import Database

    from receiver.db import make_engine

    url = f"sqlite:///{tmp_path / 'empty.db'}"
    engine = make_engine(url)
    result = coverage(cluster, Database("sqlite", url, engine))
    engine.dispose()
    assert result.code == 3 and "pve-janitor db upgrade" in result.err


def test_the_help_names_the_exit_codes():
    result = run_cli(["coverage", "--help"], {"PATH": "/usr/bin:/bin"})
    assert result.code == 0
    assert "0  the report was made" in result.out and "3  the database or Proxmox could not be read" in result.out
