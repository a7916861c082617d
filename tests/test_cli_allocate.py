"""``pve-janitor allocate | allocations | unallocate`` as real subprocesses.

Exit codes: 0 done; 1 no such allocation; 2 bad usage or configuration; 3 refused, nothing
reserved.  ``allocate`` needs the Proxmox settings (it confirms the VMID with
``/cluster/nextid``); ``allocations`` and ``unallocate`` the database alone.  No command prints
a traceback.  Rows 100-104 with running guests: the first free VMID is 105.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import sqlalchemy as sa
from conftest import ROOT, CliResult, Database, janitor_env, run_cli, running_apps

from receiver import schema, store
from receiver.config import without_settings
from receiver.schema import upgrade
from receiver.simulator.launch import cli_command
from receiver.timeutil import parse_timestamp, utcnow

PORTS = "public_port=20100-20199,internal_port=30100-30199"
KEYS = {"id", "vmid", "hostname", "ports", "expires_at", "created_at", "table", "source", "label"}


def cli(args: list[str], env: dict[str, str]) -> CliResult:
    """One command; whatever it answers, never a traceback."""
    result = run_cli(args, env)
    assert "Traceback" not in result.err, result.err
    return result


def env_for(sim, db: Database, **extra: str) -> dict[str, str]:
    return janitor_env(sim, db, CLEANUP_ALLOCATOR_PORTS=PORTS, **extra)


def db_only(db: Database) -> dict[str, str]:
    """The database and nothing else: no PVE_* setting at all."""
    env = without_settings(os.environ)
    env["DATABASE_URL"] = db.url
    return env


def count(db: Database) -> int:
    with db.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(store.reservations)).scalar_one()


@pytest.fixture
def world(sim, sqlite_db) -> Database:
    running_apps(sim, sqlite_db)
    return sqlite_db


def test_allocate_json_list_and_unallocate(sim, world):
    env = env_for(sim, world)
    got = cli(["allocate", "--hostname", "Web1", "--ports", "public_port=2", "--label", "deploy 7", "--json"], env)
    assert got.code == 0, got.err
    body = got.json()
    assert set(body) == KEYS
    assert (body["vmid"], body["hostname"], body["ports"]) == (105, "web1", {"public_port": [20105, 20106]})
    assert (body["source"], body["label"], body["table"]) == ("cli", "deploy 7", "apps")
    expires = parse_timestamp(body["expires_at"])
    assert expires is not None and 14 * 60 <= (expires - utcnow()).total_seconds() <= 15 * 60
    listed = cli(["allocations", "--json"], db_only(world))
    assert listed.code == 0 and listed.json() == {"allocations": [body]}
    released = cli(["unallocate", str(body["id"])], db_only(world))
    assert released.code == 0 and f"released reservation {body['id']}: VMID 105" in released.out
    assert count(world) == 0
    again = cli(["unallocate", str(body["id"])], db_only(world))
    assert again.code == 1 and f"no allocation {body['id']}" in again.err


def test_allocate_and_allocations_as_text(sim, world):
    env = env_for(sim, world)
    assert cli(["allocations"], db_only(world)).out.strip() == "No allocations in force."
    got = cli(["allocate", "--hostname", "web", "--ports", "1"], env)
    assert got.code == 0, got.err
    lines = got.out.splitlines()
    assert lines[:4] == ["VMID 105", "hostname web", "internal_port 30105", "public_port 20105"]
    assert "as allocation 1 (release with: pve-janitor unallocate 1)" in lines[4]
    assert cli(["allocate"], env).out.splitlines()[0] == "VMID 106"
    table = cli(["allocations"], db_only(world)).out.splitlines()
    assert table[0].split() == ["ID", "VMID", "HOSTNAME", "PORTS", "EXPIRES", "(UTC)", "BY", "LABEL"]
    assert table[2].split()[:4] == ["1", "105", "web", "internal_port=30105"]
    assert table[3].split()[:3] == ["2", "106", "-"]


def test_a_taken_hostname_exits_3_and_suffix_finds_a_free_one(sim, world):
    env = env_for(sim, world)
    taken = cli(["allocate", "--hostname", "app100.apps.local"], env)
    assert taken.code == 3 and "nothing reserved: hostname 'app100.apps.local' is taken by a row" in taken.err
    assert count(world) == 0
    suffixed = cli(["allocate", "--hostname", "app100.apps.local", "--suffix", "--json"], env)
    assert suffixed.code == 0 and suffixed.json()["hostname"] == "app100-2.apps.local"


def test_an_exhausted_range_exits_3(sim, world):
    env = env_for(sim, world, CLEANUP_ALLOCATOR_VMIDS="104-105")
    assert cli(["allocate"], env).code == 0
    full = cli(["allocate"], env)
    assert full.code == 3 and "no free VMID in CLEANUP_ALLOCATOR_VMIDS=104-105" in full.err
    assert count(world) == 1


def test_proxmox_unreachable_exits_3_and_reserves_nothing(sim, world):
    env = env_for(sim, world)
    sim.set_fault("refuse")
    result = cli(["allocate", "--hostname", "web"], env)
    assert result.code == 3 and "the guest list could not be read" in result.err and "nothing" in result.err
    assert count(world) == 0


@pytest.mark.parametrize(
    "args, words",
    [
        (["allocate", "--suffix"], "--suffix needs --hostname"),
        (["allocate", "--ports", "x"], "give one count"),
        (["allocate", "--ports", "1", "--ports", "2"], "give one count"),
        (["allocate", "--ports", "public_port=1", "--ports", "public_port=2"], "once per column"),
        (["allocate", "--ports", "status=1"], "no port range for 'status'"),
        (["allocate", "--ports", "99"], "0-32"),
        (["allocate", "--hostname", "web_1"], "not a DNS name"),
        (["unallocate", "x"], "not a valid integer"),
    ],
)
def test_usage_errors_exit_2_and_reserve_nothing(sim, world, args, words):
    result = cli(args, env_for(sim, world))
    assert result.code == 2 and words in result.err, result.err
    assert count(world) == 0


def test_allocate_needs_the_proxmox_settings_and_the_others_do_not(world):
    result = cli(["allocate"], db_only(world))
    assert result.code == 2 and "configuration error" in result.err and "PVE_HOST" in result.err
    assert cli(["allocations", "--json"], db_only(world)).json() == {"allocations": []}
    assert cli(["unallocate", "9"], db_only(world)).code == 1


@pytest.mark.parametrize("args", [["allocate"], ["allocations"], ["unallocate", "1"]], ids=" ".join)
def test_every_command_refuses_a_schema_that_is_behind(sim, world, args):
    with world.engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE {schema.VERSION_TABLE} SET version_num = '0003_pending_holds_outbox'")
    result = cli(args, env_for(sim, world))
    assert result.code == 3 and "run `pve-janitor db upgrade`" in result.err, result.err


def test_the_commands_on_every_database(sim, any_db):
    running_apps(sim, any_db)
    upgrade(any_db.engine)
    env = env_for(sim, any_db)
    got = [cli(["allocate", "--hostname", "web", "--suffix", "--ports", "1", "--json"], env).json() for _ in range(2)]
    assert [(g["vmid"], g["hostname"]) for g in got] == [(105, "web"), (106, "web-2")]
    assert cli(["allocations", "--json"], db_only(any_db)).json()["allocations"] == got
    assert cli(["unallocate", str(got[0]["id"])], db_only(any_db)).code == 0
    assert [a["vmid"] for a in cli(["allocations", "--json"], db_only(any_db)).json()["allocations"]] == [106]


def test_concurrent_allocate_processes_never_share_a_value(sim, world):
    """Six `pve-janitor allocate` processes at once: six different VMIDs, hostnames and ports."""
    env = env_for(sim, world)
    args = ["allocate", "--hostname", "web", "--suffix", "--ports", "public_port=1", "--json"]
    procs = [
        subprocess.Popen(cli_command() + args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(6)
    ]
    answers = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and b"Traceback" not in err, err.decode()
        answers.append(json.loads(out))
    for key in ("id", "vmid", "hostname"):
        assert len({a[key] for a in answers}) == 6, answers
    assert len({a["ports"]["public_port"][0] for a in answers}) == 6
    assert count(world) == 6
