"""``pve-janitor pending | approve | reject | hold | release | holds`` as real subprocesses.

Exit codes: 0 done; 1 no such plan, hold or row; 2 bad usage; 3 refused (the plan is closed,
or the confirming reads refused: nothing changed).  ``pending``, ``hold``, ``release`` and
``holds`` need the database alone (no PVE_* settings); every command refuses on a schema that
is behind, saying to run ``pve-janitor db upgrade``; no command prints a traceback.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import CliResult, Database, janitor_env, run_cli, table_vmids
from test_pending import GHOSTS, RUNNING, guard_world

from receiver import schema, store
from receiver.config import without_settings
from receiver.timeutil import parse_timestamp, utcnow

PLAN_KEYS = {
    "id",
    "table",
    "state",
    "refusal",
    "reason",
    "source",
    "rows",
    "table_rows",
    "created_at",
    "expires_at",
    "decided_at",
    "decided_by",
    "note",
    "superseded_by",
}
ROW_KEYS = {"row_key", "vmid", "hostname", "status", "action", "reason", "detail"}
HOLD_KEYS = {"id", "table", "vmid", "row_key", "until", "reason", "source", "created_at"}


def cli(args: list[str], env: dict[str, str]) -> CliResult:
    """One command; whatever it answers, never a traceback."""
    result = run_cli(args, env)
    assert "Traceback" not in result.err, result.err
    return result


def db_only(db: Database) -> dict[str, str]:
    """The database and nothing else: no PVE_* setting at all."""
    env = without_settings(os.environ)
    env["DATABASE_URL"] = db.url
    return env


def key_of(db: Database, vmid: int) -> int:
    with db.engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT id FROM apps WHERE lxc_id = :v"), {"v": vmid}).scalar_one())


def kept_plan(sim: Any, db: Database) -> int:
    """``pve-janitor sweep --json`` in the guard world: exit 3, the plan kept."""
    swept = cli(["sweep", "--json"], janitor_env(sim, db))
    assert swept.code == 3, (swept.out, swept.err)
    body = swept.json()
    assert (body["outcome"], body["refusal"]) == ("refused", "guard")
    assert isinstance(body["pending_plan"], int)
    return body["pending_plan"]


# --- pending ------------------------------------------------------------------------------------


def test_pending_lists_and_shows_a_kept_plan_with_the_database_alone(sim, sqlite_db):
    env = db_only(sqlite_db)
    empty = cli(["pending"], env)
    assert (empty.code, empty.out.strip()) == (0, "No pending plans.")
    assert cli(["pending", "--json"], env).json() == {"plans": []}

    guard_world(sim, sqlite_db)
    plan_id = kept_plan(sim, sqlite_db)
    again = cli(["sweep"], janitor_env(sim, sqlite_db))  # the same situation: the same plan, said again
    assert again.code == 3
    assert f"pending plan {plan_id}" in again.out + again.err

    listed = cli(["pending"], env)
    assert listed.code == 0
    header, _, line = listed.out.splitlines()
    assert header.split()[:5] == ["PLAN", "STATE", "ROWS", "REFUSED", "BY"]
    assert line.split()[:5] == [str(plan_id), "pending", "12/16", "guard", "manual"]
    [plan] = cli(["pending", "--json"], env).json()["plans"]
    assert set(plan) == PLAN_KEYS
    assert (plan["id"], plan["state"], plan["rows"], plan["table_rows"], plan["refusal"]) == (
        plan_id,
        "pending",
        12,
        16,
        "guard",
    )
    created, expires = parse_timestamp(plan["created_at"]), parse_timestamp(plan["expires_at"])
    assert created is not None and expires is not None and expires - created == timedelta(hours=24)

    shown = cli(["pending", str(plan_id)], env)
    assert shown.code == 0
    lines = shown.out.splitlines()
    assert lines[0] == f"Plan {plan_id}: pending, 12 of 16 rows, refused by guard"
    assert lines[1].startswith("  reason:  12 of 16 rows would go, more than CLEANUP_MAX_DELETE_PERCENT=50%")
    assert lines[2].startswith("  planned: ") and lines[2].endswith("by manual")
    assert lines[3].startswith("  expires: ") and "(in 23 h" in lines[3]
    rows = [line.split() for line in lines[6:]]
    assert sorted(int(r[1]) for r in rows) == list(GHOSTS)
    assert {(r[3], r[4], r[5]) for r in rows} == {("running", "delete", "(ghost):")}

    detail = cli(["pending", str(plan_id), "--json"], env).json()
    assert set(detail) == PLAN_KEYS | {"rows_planned"}
    assert len(detail["rows_planned"]) == 12 and all(set(r) == ROW_KEYS for r in detail["rows_planned"])
    assert {r["row_key"] for r in detail["rows_planned"]} == {key_of(sqlite_db, v) for v in GHOSTS}

    missing = cli(["pending", "99"], env)
    assert (missing.code, missing.err.strip()) == (1, "pve-janitor: no pending plan 99")


# --- approve and reject -------------------------------------------------------------------------


def test_approve_removes_then_refuses_a_second_time(sim, sqlite_db):
    table = guard_world(sim, sqlite_db)
    env = janitor_env(sim, sqlite_db)
    plan_id = kept_plan(sim, sqlite_db)
    with sqlite_db.engine.begin() as conn:
        conn.execute(table.update().where(table.c.lxc_id == 200).values(hostname="renamed.apps.local"))

    approved = cli(["approve", str(plan_id)], env)
    assert approved.code == 0, (approved.out, approved.err)
    key = key_of(sqlite_db, 200)
    assert approved.out.splitlines() == [
        f"plan {plan_id} approved: 11 of 12 rows removed, 1 not (they no longer match what was reviewed)",
        f"  not removed: row {key} (VMID 200): changed since review: hostname",
    ]
    assert table_vmids(sqlite_db) == [*RUNNING, 200]

    twice = cli(["approve", str(plan_id)], env)
    assert twice.code == 3
    assert twice.err.startswith(
        f"pve-janitor: refused, nothing changed: pending plan {plan_id} was already approved at"
    )
    unknown = cli(["approve", "99"], env)
    assert (unknown.code, unknown.err.strip()) == (1, "pve-janitor: no pending plan 99")
    shown = cli(["pending", str(plan_id), "--json"], db_only(sqlite_db)).json()
    assert (shown["state"], shown["decided_by"], shown["note"]) == (
        "approved",
        "cli",
        approved.out.splitlines()[0],
    )
    with sqlite_db.engine.connect() as conn:
        assert set(conn.execute(sa.select(store.audit.c.source)).scalars()) == {"approval"}


def test_approve_json_says_what_was_removed_and_what_not(sim, sqlite_db):
    guard_world(sim, sqlite_db)
    plan_id = kept_plan(sim, sqlite_db)
    sim.add_guest(201)
    body = cli(["approve", str(plan_id), "--json"], janitor_env(sim, sqlite_db)).json()
    assert set(body) == {"plan_id", "state", "message", "removed", "not_removed", "result"}
    assert (body["plan_id"], body["state"], body["removed"]) == (plan_id, "approved", 11)
    assert body["not_removed"] == [{"row_key": key_of(sqlite_db, 201), "vmid": 201, "why": "guest 201 exists now"}]
    assert body["result"]["outcome"] == "done" and body["result"]["applied"] == 11


def test_approve_while_proxmox_is_unreadable_exits_3_and_keeps_the_plan(sim, sqlite_db):
    guard_world(sim, sqlite_db)
    env = janitor_env(sim, sqlite_db, PVE_TIMEOUT=2)
    plan_id = kept_plan(sim, sqlite_db)
    sim.set_fault("http500")
    refused = cli(["approve", str(plan_id)], env)
    assert refused.code == 3, (refused.out, refused.err)
    assert refused.out.startswith(f"plan {plan_id} is still pending: refused (inventory unreadable")
    assert "HTTP 500" in refused.out
    assert cli(["pending", str(plan_id), "--json"], db_only(sqlite_db)).json()["state"] == "pending"
    assert len(table_vmids(sqlite_db)) == 16
    sim.set_fault(None)
    later = cli(["approve", str(plan_id), "--json"], env)
    assert later.code == 0 and later.json()["removed"] == 12


def test_reject_records_the_reason_and_closes_the_plan(sim, sqlite_db):
    guard_world(sim, sqlite_db)
    env, only_db = janitor_env(sim, sqlite_db), db_only(sqlite_db)
    plan_id = kept_plan(sim, sqlite_db)
    rejected = cli(["reject", str(plan_id), "--reason", "the VMID column is wrong"], env)
    assert (rejected.code, rejected.out.strip()) == (0, f"plan {plan_id} rejected: nothing removed")
    shown = cli(["pending", str(plan_id), "--json"], only_db).json()
    assert (shown["state"], shown["note"], shown["decided_by"]) == ("rejected", "the VMID column is wrong", "cli")
    for args in (["approve", str(plan_id)], ["reject", str(plan_id)]):
        closed = cli(args, env)
        assert closed.code == 3 and "was already rejected at" in closed.err, (args, closed.err)
    assert cli(["reject", "42"], env).code == 1
    assert cli(["pending"], only_db).out.strip() == "No pending plans."
    [plan] = cli(["pending", "--all", "--json"], only_db).json()["plans"]
    assert (plan["id"], plan["state"]) == (plan_id, "rejected")
    listed_all = cli(["pending", "--all"], only_db).out.splitlines()
    assert listed_all[2].split()[:2] == [str(plan_id), "rejected"]
    assert len(table_vmids(sqlite_db)) == 16


def test_approve_and_reject_need_the_proxmox_settings(sim, sqlite_db):
    for args in (["approve", "1"], ["reject", "1"]):
        result = cli(args, db_only(sqlite_db))
        assert result.code == 2 and "configuration error" in result.err and "PVE_HOST" in result.err, result.err


# --- holds --------------------------------------------------------------------------------------


def test_hold_holds_and_release_with_the_database_alone(sim, sqlite_db):
    guard_world(sim, sqlite_db, ghosts=(200, 201))
    env = db_only(sqlite_db)
    assert cli(["holds"], env).out.strip() == "No holds."
    assert cli(["holds", "--json"], env).json() == {"holds": []}

    by_vmid = cli(["hold", "--vmid", "200", "--until", "2h", "--reason", "customer asked"], env)
    assert by_vmid.code == 0, by_vmid.err
    assert by_vmid.out.startswith("VMID 200 held: hold 1 until ")
    assert by_vmid.out.strip().endswith(": customer asked (release with: pve-janitor release 1)")
    key = key_of(sqlite_db, 201)
    by_row = cli(["hold", "--row", str(key), "--json"], env)
    assert by_row.code == 0
    placed = by_row.json()
    assert set(placed) == HOLD_KEYS
    assert (placed["id"], placed["row_key"], placed["vmid"], placed["until"], placed["source"]) == (
        2,
        str(key),
        None,
        None,
        "cli",
    )

    listed = cli(["holds"], env).out.splitlines()
    assert [line.split()[:3] for line in listed[2:]] == [["1", "VMID", "200"], ["2", "row", str(key)]]
    assert "until released" in listed[3] and "customer asked" in listed[2]
    shown = cli(["holds", "--json"], env).json()["holds"]
    assert [h["id"] for h in shown] == [1, 2] and shown[1] == placed
    until = parse_timestamp(shown[0]["until"])
    assert until is not None and timedelta(minutes=119) < until - utcnow() <= timedelta(hours=2)

    # The sweep keeps both rows while they are held.
    swept = cli(["sweep", "--json"], janitor_env(sim, sqlite_db))
    assert swept.code == 0 and swept.json()["kept"]["held"] == 2
    assert table_vmids(sqlite_db) == [*RUNNING, 200, 201]

    released = cli(["release", "1"], env)
    assert released.code == 0 and released.out.startswith("released hold 1 until ")
    assert cli(["release", "1"], env).code == 1
    assert cli(["release", "--vmid", "200"], env).code == 1
    assert cli(["release", "--row", str(key)], env).out.strip() == "released hold 2"
    assert cli(["holds"], env).out.strip() == "No holds."


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["hold"], 2, "name exactly one of --vmid N or --row KEY"),
        (["hold", "--vmid", "200", "--row", "1"], 2, "name exactly one of --vmid N or --row KEY"),
        (["hold", "--row", "424242"], 1, "no row '424242' in table 'apps' (id)"),
        (["hold", "--row", "not-a-number"], 1, "no row 'not-a-number' in table 'apps' (id)"),
        (["hold", "--vmid", "200", "--until", "yesterday"], 2, "is neither a duration"),
        (["hold", "--vmid", "200", "--until", "2000-01-01T00:00:00Z"], 2, "is not in the future"),
        (["hold", "--vmid", "200", "--until", "0m"], 2, "is not in the future"),
        (["hold", "--vmid", "5"], 2, "outside Proxmox's range"),
        (["release"], 2, "name exactly one of HOLD_ID, --vmid N or --row KEY"),
        (["release", "1", "--vmid", "200"], 2, "name exactly one of HOLD_ID, --vmid N or --row KEY"),
        (["release", "7"], 1, "no such hold"),
        (["release", "--", "-1"], 1, "no such hold"),
        (["release", "99999999999999999999"], 1, "no such hold"),
        (["pending", "--", "-3"], 1, "no pending plan -3"),
        (["pending", "99999999999999999999"], 1, "no pending plan 99999999999999999999"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_usage_errors_and_unknown_names(sim, sqlite_db, args, code, words):
    guard_world(sim, sqlite_db, ghosts=(200,))
    result = cli(args, db_only(sqlite_db))
    assert result.code == code, (result.out, result.err)
    assert words in result.err
    with sqlite_db.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(store.holds)).scalar_one() == 0


@pytest.mark.parametrize(
    "args",
    [
        ["hold", "--vmid", "200", "--until", "999999w"],
        ["hold", "--vmid", "200", "--until", "9999-12-31T23:59:59-01:00"],
        ["hold", "--row", "99999999999999999999"],
        ["release", "--vmid", "99999999999999999999"],
    ],
    ids=lambda a: " ".join(a),
)
def test_values_beyond_range_answer_without_a_traceback(sim, sqlite_db, args):
    guard_world(sim, sqlite_db, ghosts=(200,))
    result = cli(args, db_only(sqlite_db))
    assert result.code in (1, 2), (result.out, result.err)


def test_a_row_hold_typed_with_a_leading_zero_holds_the_row(sim, sqlite_db):
    guard_world(sim, sqlite_db, ghosts=(200,))
    key = key_of(sqlite_db, 200)
    held = cli(["hold", "--row", f"0{key}"], db_only(sqlite_db))
    assert held.code == 0
    cli(["sweep"], janitor_env(sim, sqlite_db))
    assert 200 in table_vmids(sqlite_db)


def test_hold_round_trips_on_every_database(sim, any_db):
    guard_world(sim, any_db, ghosts=(200,))
    env = db_only(any_db)
    placed = cli(["hold", "--vmid", "200", "--until", "90m", "--reason", "ünïcode reason", "--json"], env)
    assert placed.code == 0, placed.err
    [shown] = cli(["holds", "--json"], env).json()["holds"]
    assert shown == placed.json()  # what was answered is what is stored (MariaDB: whole seconds)
    assert shown["reason"] == "ünïcode reason"
    assert cli(["release", "--vmid", "200"], env).code == 0
    assert cli(["holds", "--json"], env).json() == {"holds": []}


# --- a schema that is behind ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["pending"],
        ["pending", "1"],
        ["pending", "--all", "--json"],
        ["approve", "1"],
        ["reject", "1"],
        ["hold", "--vmid", "200"],
        ["release", "1"],
        ["holds"],
    ],
    ids=lambda a: " ".join(a),
)
def test_every_command_refuses_a_schema_that_is_behind(sim, sqlite_db, args):
    guard_world(sim, sqlite_db, ghosts=(200,))
    with sqlite_db.engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE {schema.VERSION_TABLE} SET version_num = '0002_drop_watch_missing_reads'")
    result = cli(args, janitor_env(sim, sqlite_db))
    assert result.code == 3, (result.out, result.err)
    assert "run `pve-janitor db upgrade`" in result.err
    with sqlite_db.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(store.holds)).scalar_one() == 0


def test_sweep_json_names_the_pending_plan_and_a_dry_run_keeps_none(sim, sqlite_db):
    guard_world(sim, sqlite_db)
    dry = cli(["sweep", "--dry-run", "--json"], janitor_env(sim, sqlite_db))
    assert dry.code == 3 and dry.json()["pending_plan"] is None
    assert cli(["pending", "--json"], db_only(sqlite_db)).json() == {"plans": []}
    plan_id = kept_plan(sim, sqlite_db)
    body: dict[str, Any] = json.loads(cli(["pending", "--json"], db_only(sqlite_db)).out)
    assert [p["id"] for p in body["plans"]] == [plan_id]


def test_an_approval_whose_decision_cannot_be_written_says_what_it_removed(sim, sqlite_db):
    guard_world(sim, sqlite_db)
    plan_id = kept_plan(sim, sqlite_db)
    with sqlite_db.engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TRIGGER no_decision BEFORE UPDATE ON janitor_pending WHEN NEW.state = 'approved' "
            "BEGIN SELECT RAISE(ABORT, 'decision refused'); END"
        )
    result = cli(["approve", str(plan_id)], janitor_env(sim, sqlite_db))
    assert "12 of 12 rows removed" in result.out + result.err
