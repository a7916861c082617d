"""``pve-janitor check``'s stages as data, against the simulator over HTTPS and real databases.

tests/test_sweep_cli.py runs the command itself; here each stage's line, its level and the
verdict are asserted without click.
"""

from __future__ import annotations

import pytest
from conftest import janitor_env

from receiver.checks import Checkup, Level, Line, Verdict
from receiver.runtime import Runtime

ALL_STAGES = ["settings", "database", "mapping", "proxmox", "privileges", "privileges", "quorum", "inventory", "acl"]


def run(sim, db, **env):
    """(verdict, [(level, stage)], lines) of one check with the test's own engine."""
    checkup = Checkup(janitor_env(sim, db, **env), build=lambda settings: Runtime.build(settings, engine=db.engine))
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


def test_without_sys_audit_on_root_it_stops_at_privileges_with_the_grant_lines(seed_sim, seeded):
    seed_sim.set_sys_audit(False)
    verdict, stages, lines = run(seed_sim, seeded)
    assert verdict is Verdict.FAILED
    assert stages[-1] == (Level.FAILED, "privileges") and len(stages) == 6  # no quorum, inventory or acl line
    assert "lacks Sys.Audit on /:" in lines[-1].detail
    assert "pveum acl modify / --tokens 'janitor@pve!sweep' --roles PVEAuditor" in lines[-1].detail


def test_without_vm_audit_nothing_can_work(seed_sim, seeded):
    seed_sim.set_vm_audit(False)
    verdict, stages, lines = run(seed_sim, seeded)
    assert verdict is Verdict.FAILED
    assert stages[-1] == (Level.FAILED, "privileges") and len(stages) == 5
    assert "VM.Audit" in lines[-1].detail


def test_a_cluster_without_quorum_fails_the_quorum_stage(seed_sim, seeded):
    seed_sim.set_quorate(False)
    verdict, stages, lines = run(seed_sim, seeded)
    assert verdict is Verdict.FAILED
    assert stages[-1] == (Level.FAILED, "quorum") and stages[:-1] == [(Level.OK, w) for w in ALL_STAGES[:6]]
    assert "not quorate" in lines[-1].detail


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


def test_an_unreadable_acl_list_fails_as_proxmox(seed_sim, seeded):
    seed_sim.set_acl_fault(500)
    verdict, stages, lines = run(seed_sim, seeded)
    assert verdict is Verdict.FAILED
    assert stages[-1] == (Level.FAILED, "proxmox") and stages[:-1] == [(Level.OK, w) for w in ALL_STAGES[:8]]
    assert lines[-1].detail == "/access/acl: HTTP 500 Internal Server Error"


def test_a_wrong_vmid_column_fails_the_mapping_and_the_checks_go_on(seed_sim, seeded):
    verdict, stages, lines = run(seed_sim, seeded, CLEANUP_VMID_COLUMN="hostname")
    assert verdict is Verdict.FAILED
    assert stages[2] == (Level.FAILED, "mapping") and "47 of 47 values are not VMIDs" in lines[2].detail
    assert stages[3:] == [(Level.OK, w) for w in ALL_STAGES[3:]]


@pytest.mark.parametrize(
    "env, stage, detail",
    [
        (
            {"CLEANUP_DRYRUN": "1", "CLEANUP_ACTION": "x"},
            "settings",
            "CLEANUP_DRYRUN is not a setting (did you mean CLEANUP_DRY_RUN?)",
        ),
        ({"CLEANUP_TABLE": "nope"}, "database", "CLEANUP_TABLE='nope': no such table in the database"),
    ],
)
def test_wrong_settings_stop_the_checks_as_misconfigured(seed_sim, sqlite_db, env, stage, detail):
    from receiver.simulator.scene import seed_database

    seed_database(sqlite_db.engine)
    verdict, stages, lines = run(seed_sim, sqlite_db, **env)
    assert verdict is Verdict.MISCONFIGURED
    assert stages[-1] == (Level.FAILED, stage)
    assert detail in [line.detail for line in lines]
    if stage == "settings":  # every problem, each on its line
        assert stages == [(Level.FAILED, "settings")] * 2
    else:
        assert stages == [(Level.OK, "settings"), (Level.FAILED, "database")]


def test_an_unreachable_database_fails_without_being_misconfigured(seed_sim, sqlite_db):
    env = janitor_env(seed_sim, sqlite_db, DATABASE_URL="postgresql+psycopg://janitor:s3cret-pw@127.0.0.1:1/platform")
    checkup = Checkup(env)
    lines = list(checkup)
    assert checkup.verdict is Verdict.FAILED and checkup.runtime is None
    assert [(line.level, line.what) for line in lines] == [(Level.OK, "settings"), (Level.FAILED, "database")]
    assert "s3cret-pw" not in lines[-1].detail
