"""``pve-janitor check``'s stages as data, against the simulator over HTTPS and real databases.

tests/test_sweep_cli.py runs the command itself; here each stage's line, its level and the
verdict are asserted without click.
"""

from __future__ import annotations

import pytest
from conftest import janitor_env

from receiver.checks import Checkup, Level, Line, Verdict

ALL_STAGES = ["settings", "database", "mapping", "proxmox", "privileges", "privileges", "quorum", "inventory", "acl"]


def run(sim, db, **env):
    """(verdict, [(level, stage)], lines) of one check with the test's own engine."""
    checkup = Checkup(janitor_env(sim, db, **env), engine=db.engine)
    lines = list(checkup)
    return checkup.verdict, [(line.level, line.what) for line in lines], lines


def test_every_stage_passes_on_a_healthy_cluster(seed_sim, seeded):
    verdict, stages, lines = run(seed_sim, seeded)
    assert verdict is Verdict.PASSED
    assert stages == [(Level.OK, what) for what in ALL_STAGES]
    details = {line.what: line.detail for line in lines}
    assert details["settings"] == "table apps, action delete, interval 60 min, dry run False"
    assert details["database"] == f"{seeded.engine.dialect.name}, table 'apps' with 47 rows and every mapped column"
    assert details["mapping"] == "CLEANUP_VMID_COLUMN='lxc_id' holds VMIDs"
    assert details["inventory"].startswith(f"{len(seed_sim.vmids())} guests in ")
    assert "fall back on" not in details["proxmox"]


def test_lines_print_as_the_command_shows_them():
    assert str(Line(Level.OK, "quorum", "quorate")) == "ok      quorum: quorate"
    assert str(Line(Level.FAILED, "settings", "X is not a setting")) == "FAILED  settings: X is not a setting"
    assert str(Line(Level.WARN, "acl", "slower")) == "WARN    acl: slower"
    assert str(Line(Level.OK, "database")) == "ok      database"


def test_without_sys_audit_on_access_it_warns_twice_and_passes(seed_sim, seeded):
    seed_sim.set_sys_audit(False, only_access=True)
    verdict, stages, lines = run(seed_sim, seeded)
    assert verdict is Verdict.PASSED
    assert [level for level, _ in stages] == [Level.OK] * 6 + [Level.WARN] + [Level.OK] * 2 + [Level.WARN]
    assert stages[6] == (Level.WARN, "privileges") and stages[-1] == (Level.WARN, "acl")
    assert lines[-1].detail.endswith("one /cluster/nextid request per ghost")


SKIPPED_AFTER_PRIVILEGES = [(Level.SKIPPED, w) for w in ("quorum", "inventory", "acl")]


def test_without_sys_audit_on_root_it_stops_at_privileges_with_the_grant_lines(seed_sim, seeded):
    seed_sim.set_sys_audit(False)
    verdict, stages, lines = run(seed_sim, seeded)
    assert verdict is Verdict.FAILED
    # Changed by issue 13: the stages that need the privileges say so instead of being left out.
    assert stages[5] == (Level.FAILED, "privileges") and stages[6:] == SKIPPED_AFTER_PRIVILEGES
    assert [line.detail for line in lines[6:]] == ["needs privileges"] * 3
    assert "lacks Sys.Audit on /:" in lines[5].detail
    assert "pveum acl modify / --tokens 'janitor@pve!sweep' --roles PVEAuditor" in lines[5].detail


def test_without_vm_audit_nothing_can_work(seed_sim, seeded):
    seed_sim.set_vm_audit(False)
    verdict, stages, lines = run(seed_sim, seeded)
    assert verdict is Verdict.FAILED
    assert stages[4] == (Level.FAILED, "privileges") and stages[5:] == SKIPPED_AFTER_PRIVILEGES
    assert "VM.Audit" in lines[4].detail


def test_a_cluster_without_quorum_fails_the_quorum_stage(seed_sim, seeded):
    seed_sim.set_quorate(False)
    verdict, stages, lines = run(seed_sim, seeded)
    assert verdict is Verdict.FAILED
    assert stages[:6] == [(Level.OK, w) for w in ALL_STAGES[:6]] and stages[6] == (Level.FAILED, "quorum")
    assert stages[7:] == [(Level.SKIPPED, "inventory"), (Level.SKIPPED, "acl")]
    assert "not quorate" in lines[6].detail and lines[-1].detail == "needs quorum"


def test_a_guest_hidden_by_an_acl_is_a_warning_naming_its_vmid(seed_sim, seeded):
    hidden = min(seed_sim.vmids())
    seed_sim.set_visible(set(seed_sim.vmids()) - {hidden})
    verdict, stages, lines = run(seed_sim, seeded)
    assert verdict is Verdict.PASSED
    assert stages[-1] == (Level.WARN, "hidden_guest")
    assert lines[-1].detail.startswith(f"VMIDs {hidden} have rows and are in use in Proxmox")


def test_a_fallback_endpoint_is_counted(seed_sim, sqlite_db):
    from receiver.simulator.scene import seed_database

    seed_database(sqlite_db.engine)
    two = seed_sim.env()["PVE_HOST"] + ",127.0.0.1:1"
    verdict, _, lines = run(seed_sim, sqlite_db, PVE_HOST=two)
    assert verdict is Verdict.PASSED
    proxmox = next(line for line in lines if line.what == "proxmox")
    assert proxmox.detail.endswith("version 8.2.4 (1 more PVE_HOST endpoint to fall back on)")


def test_an_unreadable_acl_list_fails_as_acl(seed_sim, seeded):
    seed_sim.set_acl_fault(500)
    verdict, stages, lines = run(seed_sim, seeded)
    assert verdict is Verdict.FAILED
    # Changed by issue 13: labelled with the stage that failed (it was "proxmox").
    assert stages[-1] == (Level.FAILED, "acl") and stages[:-1] == [(Level.OK, w) for w in ALL_STAGES[:8]]
    assert lines[-1].detail == "/access/acl: HTTP 500 Internal Server Error"


def test_a_wrong_vmid_column_fails_the_mapping_and_the_checks_go_on(seed_sim, seeded):
    verdict, stages, lines = run(seed_sim, seeded, CLEANUP_VMID_COLUMN="hostname")
    assert verdict is Verdict.FAILED
    assert stages[2] == (Level.FAILED, "mapping") and "47 of 47 values are not VMIDs" in lines[2].detail
    assert stages[3:] == [(Level.OK, w) for w in ALL_STAGES[3:]]


def test_wrong_settings_fail_the_settings_and_every_stage_says_it_needs_them(seed_sim, sqlite_db):
    env = {"CLEANUP_DRYRUN": "1", "CLEANUP_ACTION": "x", "CLEANUP_INTERVAL_MINUTES": "1"}
    verdict, stages, lines = run(seed_sim, sqlite_db, **env)
    assert verdict is Verdict.MISCONFIGURED
    assert stages[:2] == [(Level.FAILED, "settings")] * 2  # every problem, each on its line
    assert lines[0].detail == "CLEANUP_DRYRUN is not a setting (did you mean CLEANUP_DRY_RUN?)"
    assert stages[2] == (Level.WARN, "settings")
    assert lines[2].detail == "CLEANUP_INTERVAL_MINUTES=1 is below the minimum 5; using 5"
    # Changed by issue 13: the other stages say they need the settings (they were left out).
    later = ["database", "mapping", "proxmox", "privileges", "quorum", "inventory", "acl"]
    assert stages[3:] == [(Level.SKIPPED, w) for w in later]
    assert {line.detail for line in lines[3:]} == {"needs settings"}
    assert str(lines[3]) == "skipped database: needs settings"


def test_a_raised_setting_is_a_warning_and_the_checks_pass(seed_sim, seeded):
    verdict, stages, lines = run(seed_sim, seeded, CLEANUP_INTERVAL_MINUTES="1")
    assert verdict is Verdict.PASSED
    assert stages[:2] == [(Level.OK, "settings"), (Level.WARN, "settings")]
    assert str(lines[1]) == "WARN    settings: CLEANUP_INTERVAL_MINUTES=1 is below the minimum 5; using 5"
    assert lines[0].detail == "table apps, action delete, interval 5 min, dry run False"
    assert stages[2:] == [(Level.OK, w) for w in ALL_STAGES[1:]]


def test_a_missing_table_is_misconfigured_and_proxmox_is_still_checked(seed_sim, sqlite_db):
    from receiver.simulator.scene import seed_database

    seed_database(sqlite_db.engine)
    verdict, stages, lines = run(seed_sim, sqlite_db, CLEANUP_TABLE="nope")
    assert verdict is Verdict.MISCONFIGURED
    assert stages[:3] == [(Level.OK, "settings"), (Level.FAILED, "database"), (Level.SKIPPED, "mapping")]
    assert lines[1].detail == "CLEANUP_TABLE='nope': no such table in the database"
    assert lines[2].detail == "needs database"
    # Changed by issue 13: Proxmox does not need the table, so its stages run.
    assert stages[3:] == [(Level.OK, w) for w in ALL_STAGES[3:]] + [(Level.SKIPPED, "hidden_guest")]


@pytest.mark.parametrize(
    "unset, named",
    [
        (("PVE_HOST",), ["PVE_HOST"]),
        (("PVE_USER", "PVE_TOKEN_VALUE"), ["PVE_USER", "PVE_TOKEN_VALUE"]),
        (("PVE_TOKEN_NAME", "PVE_TOKEN_VALUE"), ["PVE_TOKEN_NAME", "PVE_TOKEN_VALUE"]),
    ],
)
def test_a_missing_pve_setting_is_labelled_proxmox_and_the_database_is_checked(seed_sim, seeded, unset, named):
    verdict, stages, lines = run(seed_sim, seeded, **dict.fromkeys(unset, ""))
    assert verdict is Verdict.MISCONFIGURED
    # Changed by issue 13: this was a FAILED "database" line, and the database was not checked.
    assert stages[:3] == [(Level.OK, "settings"), (Level.OK, "database"), (Level.OK, "mapping")]
    assert [(line.level, line.what, line.detail) for line in lines[3:-4]] == [
        (Level.FAILED, "proxmox", f"{name} is not set") for name in named
    ]
    assert stages[-4:] == [(Level.SKIPPED, w) for w in ("privileges", "quorum", "inventory", "acl")]


def test_an_unreachable_database_fails_without_being_misconfigured(seed_sim, sqlite_db):
    env = janitor_env(seed_sim, sqlite_db, DATABASE_URL="postgresql+psycopg://janitor:s3cret-pw@127.0.0.1:1/platform")
    checkup = Checkup(env)
    lines = list(checkup)
    assert checkup.verdict is Verdict.FAILED
    stages = [(line.level, line.what) for line in lines]
    assert stages[:3] == [(Level.OK, "settings"), (Level.FAILED, "database"), (Level.SKIPPED, "mapping")]
    assert "s3cret-pw" not in lines[1].detail
    assert stages[3:] == [(Level.OK, w) for w in ALL_STAGES[3:]] + [(Level.SKIPPED, "hidden_guest")]


def test_the_command_prints_warnings_and_skipped_stages_and_exits_2(seed_sim, sqlite_db):
    from conftest import run_cli

    result = run_cli(["check"], janitor_env(seed_sim, sqlite_db, CLEANUP_INTERVAL_MINUTES="1", PVE_HOST=""))
    assert result.code == 2, result.out
    lines = result.out.splitlines()
    assert lines[1] == "WARN    settings: CLEANUP_INTERVAL_MINUTES=1 is below the minimum 5; using 5"
    assert "FAILED  proxmox: PVE_HOST is not set" in lines
    assert lines[-1] == "skipped acl: needs proxmox"


@pytest.mark.parametrize("args", [["--help"], ["check", "--help"]])
def test_the_help_lists_the_exit_codes(args):
    from conftest import run_cli

    result = run_cli(args, {"PATH": "/usr/bin:/bin"})
    assert result.code == 0
    text = result.out
    assert "Exit codes:" in text
    for code in ("0", "2", "3"):
        assert any(line.strip().startswith(f"{code}  ") for line in text.splitlines()), (code, text)
