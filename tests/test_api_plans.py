"""Pending plans and holds over HTTP (receiver.api_plans), on real databases and the simulator.

The seed scene: 47 rows, 41 of them error rows whose guests are gone, so a sweep without
``force`` trips the deletion-percentage guard and leaves a pending plan of those 41 rows.
pytest-flask builds ``client`` from the ``app`` fixture below.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import documented_routes, janitor_env, openapi_spec, served_routes, table_vmids

from receiver.app import ERROR_CODES, create_app
from receiver.config import load_settings
from receiver.runtime import Runtime
from receiver.simulator.scene import ERROR_VMIDS, RUNNING_VMIDS, seed_database
from receiver.timeutil import utcnow

ADMIN_TOKEN = "admin-token-3c5e7a9b1d"
RUN = "/api/v1/system/cleanup/run"
PENDING, HOLDS = "/api/v1/system/cleanup/pending", "/api/v1/system/cleanup/holds"
JSON = {"Content-Type": "application/json"}


def build(sim, db, clock=utcnow, **overrides: Any) -> Runtime:
    """A runtime as ``serve`` builds one, with the admin token and the clock handed in."""
    settings = {"CLEANUP_ADMIN_TOKEN": ADMIN_TOKEN, **overrides}
    env = janitor_env(sim, db)
    return Runtime.build(
        load_settings(env=env, overrides={k: v for k, v in settings.items() if v is not None}),
        engine=db.engine,
        clock=clock,
        upgrade=True,
    )


@pytest.fixture
def platform_db(sqlite_db):
    seed_database(sqlite_db.engine)
    return sqlite_db


@pytest.fixture
def runtime(seed_sim, platform_db):
    return build(seed_sim, platform_db)


@pytest.fixture
def app(runtime):
    return create_app(runtime.settings, runtime=runtime)


def bearer(token: str = ADMIN_TOKEN, **more: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **more}


def assert_json_error(response, status: int, fragment: str = "") -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["error"] == ERROR_CODES[status] and isinstance(body["message"], str)
    assert fragment in body["message"], body["message"]
    assert "Traceback" not in response.get_data(as_text=True)
    return body


def refused_plan(client) -> int:
    """Run a sweep without force: the guard refuses it and keeps its plan; the plan's id."""
    body = assert_json_error(client.post(RUN, headers=bearer()), 422, "CLEANUP_MAX_DELETE_PERCENT")
    assert body["refusal"] == "guard" and isinstance(body["pending_plan"], int), body
    return body["pending_plan"]


def row_id(db, vmid: int) -> int:
    with db.engine.connect() as conn:
        return conn.execute(sa.text("SELECT id FROM apps WHERE lxc_id = :v"), {"v": vmid}).scalar_one()


def plan_state(client, plan_id: int) -> str:
    return client.get(f"{PENDING}/{plan_id}", headers=bearer()).get_json()["state"]


# --- auth ------------------------------------------------------------------------------------

ROUTES = [
    ("get", PENDING),
    ("get", f"{PENDING}/1"),
    ("post", f"{PENDING}/1/approve"),
    ("post", f"{PENDING}/1/reject"),
    ("get", HOLDS),
    ("post", HOLDS),
    ("delete", f"{HOLDS}/1"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_route_is_403_when_no_admin_token_is_configured(seed_sim, platform_db, method, path):
    runtime = build(seed_sim, platform_db, CLEANUP_ADMIN_TOKEN=None)
    client = create_app(runtime.settings, runtime=runtime).test_client()
    for headers in ({}, bearer(""), bearer("anything")):
        response = getattr(client, method)(path, headers=headers, json={"vmid": 120})
        assert_json_error(response, 403, "CLEANUP_ADMIN_TOKEN is not set")
    with platform_db.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM janitor_holds")).scalar_one() == 0


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize(
    "headers", [{}, bearer("wrong-token"), bearer(ADMIN_TOKEN + "x"), {"Authorization": ADMIN_TOKEN}]
)
def test_every_route_is_401_without_the_right_token(client, platform_db, method, path, headers):
    response = getattr(client, method)(path, headers=headers, json={"vmid": 120})
    assert_json_error(response, 401, "Authorization: Bearer")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    with platform_db.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM janitor_holds")).scalar_one() == 0


def test_auth_is_checked_before_the_path_id_the_query_and_the_body(client):
    assert_json_error(client.get(f"{PENDING}/abc"), 401)
    assert_json_error(client.get(f"{PENDING}?all=maybe"), 401)
    assert_json_error(client.post(HOLDS, data="not json", headers={"Content-Type": "text/plain"}), 401)


def test_a_refused_approval_changes_nothing_without_the_token(client, platform_db):
    plan_id = refused_plan(client)
    assert_json_error(client.post(f"{PENDING}/{plan_id}/approve", headers=bearer("nope")), 401)
    assert_json_error(client.post(f"{PENDING}/{plan_id}/reject", headers=bearer("nope")), 401)
    assert len(table_vmids(platform_db)) == 47
    assert plan_state(client, plan_id) == "pending"


def test_options_answers_the_methods_without_a_token(client):
    response = client.options(f"{PENDING}/1/approve")
    assert response.status_code == 200 and "POST" in response.get_json()["methods"]


# --- listing and showing plans ------------------------------------------------------------------


def test_no_pending_plans_at_first(client):
    response = client.get(PENDING, headers=bearer())
    assert response.status_code == 200 and response.get_json() == {"plans": []}


def test_a_refused_sweep_is_listed_and_shown_with_its_rows(client):
    plan_id = refused_plan(client)
    plans = client.get(PENDING, headers=bearer()).get_json()["plans"]
    assert [p["id"] for p in plans] == [plan_id]
    plan = plans[0]
    assert (plan["state"], plan["refusal"], plan["rows"], plan["table_rows"]) == ("pending", "guard", 41, 47)
    assert plan["table"] == "apps" and plan["source"] == "manual" and plan["decided_at"] is None

    shown = client.get(f"{PENDING}/{plan_id}", headers=bearer())
    assert shown.status_code == 200
    body = shown.get_json()
    assert {k: body[k] for k in plan} == plan
    assert sorted(r["vmid"] for r in body["rows_planned"]) == list(ERROR_VMIDS)
    first = body["rows_planned"][0]
    assert set(first) == {"row_key", "vmid", "hostname", "status", "action", "reason", "detail"}
    assert first["status"] == "error" and first["action"] == "delete"


def test_listing_hides_decided_plans_unless_all_is_true(client):
    plan_id = refused_plan(client)
    assert client.post(f"{PENDING}/{plan_id}/reject", headers=bearer()).status_code == 200
    assert client.get(PENDING, headers=bearer()).get_json()["plans"] == []
    assert client.get(f"{PENDING}?all=false", headers=bearer()).get_json()["plans"] == []
    everything = client.get(f"{PENDING}?all=true", headers=bearer()).get_json()["plans"]
    assert [(p["id"], p["state"], p["decided_by"]) for p in everything] == [(plan_id, "rejected", "http")]


@pytest.mark.parametrize("query", ["all=yes", "all=1", "all=", "all=maybe"])
def test_listing_with_a_bad_all_is_400(client, query):
    assert_json_error(client.get(f"{PENDING}?{query}", headers=bearer()), 400, "all must be true or false")


@pytest.mark.parametrize(
    "plan_id", ["999", "abc", "0", "-1", "1.5", "9223372036854775808", "99999999999999999999", "%D9%A1", "1%20"]
)
def test_an_unknown_or_malformed_plan_id_is_404(client, plan_id):
    refused_plan(client)  # plan 1 exists: none of these names it
    for response in (
        client.get(f"{PENDING}/{plan_id}", headers=bearer()),
        client.post(f"{PENDING}/{plan_id}/approve", headers=bearer()),
        client.post(f"{PENDING}/{plan_id}/reject", headers=bearer()),
    ):
        assert_json_error(response, 404, "no pending plan")


def test_the_largest_id_is_a_plain_404(client):
    assert_json_error(client.get(f"{PENDING}/{2**63 - 1}", headers=bearer()), 404, f"no pending plan {2**63 - 1}")
    assert_json_error(client.delete(f"{HOLDS}/{2**63 - 1}", headers=bearer()), 404, "no hold")


# --- approve ---------------------------------------------------------------------------------


def test_approval_removes_the_reviewed_rows_and_closes_the_plan(client, platform_db):
    plan_id = refused_plan(client)
    assert len(table_vmids(platform_db)) == 47
    response = client.post(f"{PENDING}/{plan_id}/approve", headers=bearer())
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert (body["plan_id"], body["state"], body["removed"], body["not_removed"]) == (plan_id, "approved", 41, [])
    assert body["message"] == f"plan {plan_id} approved: 41 of 41 rows removed"
    assert body["result"]["outcome"] == "done" and body["result"]["applied"] == 41
    assert table_vmids(platform_db) == list(RUNNING_VMIDS)
    plan = client.get(f"{PENDING}/{plan_id}", headers=bearer()).get_json()
    assert (plan["state"], plan["decided_by"]) == ("approved", "http")
    with platform_db.engine.connect() as conn:
        sources = set(conn.execute(sa.text("SELECT source FROM janitor_audit")).scalars())
    assert sources == {"approval"}

    again = assert_json_error(client.post(f"{PENDING}/{plan_id}/approve", headers=bearer()), 409, "already approved")
    assert again["message"].startswith("refused, nothing changed")


def test_a_row_changed_since_the_review_is_not_removed_and_named(client, platform_db):
    plan_id = refused_plan(client)
    changed = row_id(platform_db, 125)
    with platform_db.engine.begin() as conn:
        conn.execute(sa.text("UPDATE apps SET hostname = 'reused.apps.local' WHERE id = :id"), {"id": changed})
    body = client.post(f"{PENDING}/{plan_id}/approve", headers=bearer()).get_json()
    assert body["state"] == "approved" and body["removed"] == 40
    assert body["not_removed"] == [{"row_key": changed, "vmid": 125, "why": "changed since review: hostname"}]
    assert "1 not" in body["message"]
    assert table_vmids(platform_db) == [*RUNNING_VMIDS, 125]


def test_an_approval_the_confirming_reads_refuse_is_422_and_the_plan_stays_pending(client, seed_sim, platform_db):
    plan_id = refused_plan(client)
    seed_sim.set_fault("http500")
    body = assert_json_error(client.post(f"{PENDING}/{plan_id}/approve", headers=bearer()), 422, "still pending")
    assert body["state"] == "pending" and body["removed"] == 0
    assert body["result"]["outcome"] == "refused" and body["result"]["refusal"] == "inventory"
    assert len(table_vmids(platform_db)) == 47
    assert plan_state(client, plan_id) == "pending"

    seed_sim.set_fault(None)  # Proxmox answers again: the same plan can be approved now
    healed = client.post(f"{PENDING}/{plan_id}/approve", headers=bearer())
    assert healed.status_code == 200 and healed.get_json()["removed"] == 41
    assert table_vmids(platform_db) == list(RUNNING_VMIDS)


def test_an_approval_that_fails_on_the_database_is_503(client, platform_db):
    plan_id = refused_plan(client)
    with platform_db.engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE apps RENAME TO apps_gone"))
    body = assert_json_error(client.post(f"{PENDING}/{plan_id}/approve", headers=bearer()), 503, "still pending")
    assert body["state"] == "pending"
    assert body["result"]["outcome"] == "failed" and body["result"]["refusal"] == "database"
    assert plan_state(client, plan_id) == "pending"


@pytest.mark.parametrize(
    ("setting", "outcome"), [({"CLEANUP_ENABLED": "false"}, "disabled"), ({"CLEANUP_DRY_RUN": "true"}, "dry_run")]
)
def test_an_approval_while_cleanup_is_off_or_dry_is_422(seed_sim, platform_db, setting, outcome):
    plan_id = refused_plan(create_app((r := build(seed_sim, platform_db)).settings, runtime=r).test_client())
    runtime = build(seed_sim, platform_db, **setting)
    client = create_app(runtime.settings, runtime=runtime).test_client()
    body = assert_json_error(client.post(f"{PENDING}/{plan_id}/approve", headers=bearer()), 422, outcome)
    assert body["state"] == "pending" and body["result"]["outcome"] == outcome
    assert len(table_vmids(platform_db)) == 47
    assert plan_state(client, plan_id) == "pending"


def test_a_row_held_after_the_review_is_not_removed_by_the_approval(client, platform_db):
    plan_id = refused_plan(client)
    assert client.post(HOLDS, headers=bearer(), json={"vmid": 130, "reason": "customer data"}).status_code == 201
    body = client.post(f"{PENDING}/{plan_id}/approve", headers=bearer()).get_json()
    assert body["removed"] == 40
    assert body["not_removed"] == [{"row_key": row_id(platform_db, 130), "vmid": 130, "why": "held"}]
    assert table_vmids(platform_db) == [*RUNNING_VMIDS, 130]


def test_an_expired_plan_is_409(seed_sim, any_db):
    seed_database(any_db.engine)
    now = [utcnow()]
    runtime = build(seed_sim, any_db, clock=lambda: now[0], CLEANUP_PENDING_HOURS=1)
    client = create_app(runtime.settings, runtime=runtime).test_client()
    plan_id = refused_plan(client)
    plan = client.get(f"{PENDING}/{plan_id}", headers=bearer()).get_json()
    expires = datetime.fromisoformat(plan["expires_at"])
    assert timedelta(0) <= now[0] + timedelta(hours=1) - expires < timedelta(seconds=1)  # MariaDB: whole seconds

    now[0] += timedelta(hours=1, seconds=1)
    assert client.get(PENDING, headers=bearer()).get_json()["plans"] == []
    listed = client.get(f"{PENDING}?all=true", headers=bearer()).get_json()["plans"]
    assert [p["state"] for p in listed] == ["expired"]
    assert_json_error(client.post(f"{PENDING}/{plan_id}/approve", headers=bearer()), 409, "expired")
    assert_json_error(client.post(f"{PENDING}/{plan_id}/reject", headers=bearer()), 409, "expired")
    assert plan_state(client, plan_id) == "expired"
    assert len(table_vmids(any_db)) == 47


def test_a_superseded_plan_is_409_naming_the_newer_one(client, platform_db):
    first = refused_plan(client)
    with platform_db.engine.begin() as conn:  # the next plan differs, so it is a new one
        conn.execute(sa.text("UPDATE apps SET hostname = 'other.apps.local' WHERE lxc_id = 140"))
    second = refused_plan(client)
    assert second != first
    assert_json_error(client.post(f"{PENDING}/{first}/approve", headers=bearer()), 409, f"superseded by plan {second}")
    assert len(table_vmids(platform_db)) == 47


# --- reject ----------------------------------------------------------------------------------


def test_reject_keeps_the_reason_and_a_later_approval_is_409(client, platform_db):
    plan_id = refused_plan(client)
    response = client.post(f"{PENDING}/{plan_id}/reject", headers=bearer(), json={"reason": "  not today  "})
    assert response.status_code == 200
    body = response.get_json()
    assert (body["state"], body["removed"], body["result"]) == ("rejected", 0, None)
    assert body["message"] == f"plan {plan_id} rejected: nothing removed"
    plan = client.get(f"{PENDING}/{plan_id}", headers=bearer()).get_json()
    assert (plan["state"], plan["note"], plan["decided_by"]) == ("rejected", "not today", "http")

    assert_json_error(client.post(f"{PENDING}/{plan_id}/approve", headers=bearer()), 409, "already rejected")
    assert_json_error(client.post(f"{PENDING}/{plan_id}/reject", headers=bearer()), 409, "already rejected")
    assert len(table_vmids(platform_db)) == 47


def test_reject_without_a_body_notes_rejected(client):
    plan_id = refused_plan(client)
    assert client.post(f"{PENDING}/{plan_id}/reject", headers=bearer()).status_code == 200
    assert client.get(f"{PENDING}/{plan_id}", headers=bearer()).get_json()["note"] == "rejected"


@pytest.mark.parametrize(
    ("data", "status", "fragment"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"\xff\xfe", 400, "not valid JSON"),
        (b'["no"]', 400, "JSON object"),
        (b'{"reason": 5}', 400, "reason must be a string"),
        (b'{"reason": "x", "why": "y"}', 400, "unknown field 'why'"),
    ],
)
def test_reject_with_a_bad_body_is_400_and_decides_nothing(client, data, status, fragment):
    plan_id = refused_plan(client)
    response = client.post(f"{PENDING}/{plan_id}/reject", headers=bearer(**JSON), data=data)
    assert_json_error(response, status, fragment)
    assert plan_state(client, plan_id) == "pending"


def test_reject_with_a_body_that_is_not_json_is_415(client):
    plan_id = refused_plan(client)
    response = client.post(f"{PENDING}/{plan_id}/reject", headers=bearer(), data="reason=no")
    assert_json_error(response, 415, "application/json")
    assert plan_state(client, plan_id) == "pending"


# --- holds -----------------------------------------------------------------------------------


def test_holds_place_list_release(client, platform_db):
    assert client.get(HOLDS, headers=bearer()).get_json() == {"holds": []}
    by_vmid = client.post(HOLDS, headers=bearer(), json={"vmid": 120, "until": "2h", "reason": "backup"})
    assert by_vmid.status_code == 201, by_vmid.get_data(as_text=True)
    first = by_vmid.get_json()
    assert (first["vmid"], first["row_key"], first["reason"], first["source"]) == (120, None, "backup", "http")
    until = datetime.fromisoformat(first["until"]) - datetime.fromisoformat(first["created_at"])
    assert until == timedelta(hours=2)

    key = row_id(platform_db, 121)
    by_key = client.post(HOLDS, headers=bearer(), json={"row_key": str(key), "until": "2099-01-01T00:00:00Z"})
    assert by_key.status_code == 201
    second = by_key.get_json()
    assert (second["row_key"], second["vmid"], second["until"]) == (str(key), None, "2099-01-01T00:00:00+00:00")
    by_number = client.post(HOLDS, headers=bearer(), json={"row_key": row_id(platform_db, 122)})
    assert by_number.status_code == 201 and by_number.get_json()["row_key"] == str(row_id(platform_db, 122))
    assert by_number.get_json()["until"] is None

    listed = client.get(HOLDS, headers=bearer()).get_json()["holds"]
    assert [h["id"] for h in listed] == [first["id"], second["id"], by_number.get_json()["id"]]

    released = client.delete(f"{HOLDS}/{first['id']}", headers=bearer())
    assert released.status_code == 200 and released.get_json() == {"released": [first]}
    assert [h["id"] for h in client.get(HOLDS, headers=bearer()).get_json()["holds"]] == [
        second["id"],
        by_number.get_json()["id"],
    ]
    assert_json_error(client.delete(f"{HOLDS}/{first['id']}", headers=bearer()), 404, f"no hold {first['id']}")


@pytest.mark.parametrize("hold_id", ["abc", "0", "-1", "1.0", "9223372036854775808"])
def test_releasing_a_malformed_hold_id_is_404(client, hold_id):
    assert client.post(HOLDS, headers=bearer(), json={"vmid": 120}).status_code == 201
    assert_json_error(client.delete(f"{HOLDS}/{hold_id}", headers=bearer()), 404, "no hold")
    assert len(client.get(HOLDS, headers=bearer()).get_json()["holds"]) == 1


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({}, "exactly one of vmid or row_key"),
        ({"vmid": 120, "row_key": "1"}, "exactly one of vmid or row_key"),
        ({"vmid": "120"}, "vmid must be a whole number"),
        ({"vmid": True}, "vmid must be a whole number"),
        ({"vmid": 120.5}, "vmid must be a whole number"),
        ({"vmid": 99}, "VMID 99 is outside"),
        ({"vmid": 10**12}, "outside Proxmox's range"),
        ({"row_key": ""}, "row_key must be a non-empty string"),
        ({"row_key": ["1"]}, "row_key must be"),
        ({"vmid": 120, "until": "soon"}, "until 'soon' is neither a duration"),
        ({"vmid": 120, "until": "2001-01-01T00:00:00Z"}, "until '2001-01-01T00:00:00Z' is not in the future"),
        ({"vmid": 120, "until": 3600}, "until must be a string"),
        ({"vmid": 120, "reason": ["x"]}, "reason must be a string"),
        ({"vmid": 120, "untill": "1h"}, "unknown field 'untill'"),
    ],
)
def test_placing_a_bad_hold_is_400_naming_the_field(client, body, fragment):
    assert_json_error(client.post(HOLDS, headers=bearer(), json=body), 400, fragment)
    assert client.get(HOLDS, headers=bearer()).get_json() == {"holds": []}


@pytest.mark.parametrize(
    ("data", "fragment"), [(b"{", "not valid JSON"), (b"[120]", "JSON object"), (b"", "not valid JSON")]
)
def test_placing_a_hold_with_a_bad_body_is_400(client, data, fragment):
    assert_json_error(client.post(HOLDS, headers=bearer(**JSON), data=data), 400, fragment)


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_placing_a_hold_without_json_content_type_is_415(client, content_type):
    headers = bearer(**({"Content-Type": content_type} if content_type else {}))
    response = client.post(HOLDS, headers=headers, data=b'{"vmid": 120}')
    assert_json_error(response, 415, "Content-Type must be application/json")
    assert client.get(HOLDS, headers=bearer()).get_json() == {"holds": []}


def test_holding_a_row_that_does_not_exist_is_404(client):
    for key in ("99999", "not-a-number"):
        assert_json_error(client.post(HOLDS, headers=bearer(), json={"row_key": key}), 404, f"no row '{key}'")
    assert client.get(HOLDS, headers=bearer()).get_json() == {"holds": []}


def test_a_held_row_is_not_removed_by_a_sweep(client, platform_db):
    key = row_id(platform_db, 121)
    assert client.post(HOLDS, headers=bearer(), json={"vmid": 120}).status_code == 201
    assert client.post(HOLDS, headers=bearer(), json={"row_key": str(key)}).status_code == 201
    result = client.post(f"{RUN}?force=true", headers=bearer()).get_json()
    assert result["outcome"] == "done" and result["applied"] == 39
    assert result["kept"]["held"] == 2
    held = sorted(r["vmid"] for r in result["reports"] if r["kind"] == "held")
    assert held == [120, 121]
    assert table_vmids(platform_db) == [*RUNNING_VMIDS, 120, 121]

    # Released, the rows go with the next sweep.
    for hold in client.get(HOLDS, headers=bearer()).get_json()["holds"]:
        assert client.delete(f"{HOLDS}/{hold['id']}", headers=bearer()).status_code == 200
    again = client.post(f"{RUN}?force=true", headers=bearer()).get_json()
    assert again["applied"] == 2 and again["kept"]["held"] == 0
    assert table_vmids(platform_db) == list(RUNNING_VMIDS)


def test_a_hold_whose_time_has_passed_no_longer_holds(seed_sim, platform_db):
    now = [utcnow()]
    runtime = build(seed_sim, platform_db, clock=lambda: now[0])
    client = create_app(runtime.settings, runtime=runtime).test_client()
    assert client.post(HOLDS, headers=bearer(), json={"vmid": 120, "until": "30m"}).status_code == 201
    now[0] += timedelta(minutes=31)
    assert client.get(HOLDS, headers=bearer()).get_json() == {"holds": []}
    result = client.post(f"{RUN}?force=true", headers=bearer()).get_json()
    assert result["applied"] == 41 and result["kept"]["held"] == 0


# --- every database ----------------------------------------------------------------------------


def test_plans_and_holds_on_every_database(seed_sim, any_db):
    """SQLite here; PostgreSQL and MariaDB too when they answer (always in CI)."""
    seed_database(any_db.engine)
    runtime = build(seed_sim, any_db)
    client = create_app(runtime.settings, runtime=runtime).test_client()
    plan_id = refused_plan(client)
    assert client.get(f"{PENDING}/{plan_id}", headers=bearer()).get_json()["rows"] == 41
    changed = row_id(any_db, 125)
    with any_db.engine.begin() as conn:
        conn.execute(sa.text("UPDATE apps SET status = 'failed' WHERE id = :id"), {"id": changed})
    hold = client.post(HOLDS, headers=bearer(), json={"vmid": 130}).get_json()

    body = client.post(f"{PENDING}/{plan_id}/approve", headers=bearer()).get_json()
    assert (body["state"], body["removed"]) == ("approved", 39), body
    assert {(e["vmid"], e["why"]) for e in body["not_removed"]} == {
        (125, "changed since review: status"),
        (130, "held"),
    }
    assert table_vmids(any_db) == [*RUNNING_VMIDS, 125, 130]
    assert_json_error(client.post(f"{PENDING}/{plan_id}/approve", headers=bearer()), 409, "already approved")
    released = client.delete(f"{HOLDS}/{hold['id']}", headers=bearer()).get_json()["released"]
    assert [(h["id"], h["vmid"]) for h in released] == [(hold["id"], 130)]  # MariaDB keeps whole seconds
    assert client.get(HOLDS, headers=bearer()).get_json() == {"holds": []}
    assert client.get(PENDING, headers=bearer()).get_json()["plans"] == []


# --- the OpenAPI document ----------------------------------------------------------------------


def test_openapi_documents_these_routes_as_served(app):
    served = served_routes(app, lambda endpoint: endpoint.startswith("plans."))
    assert len(served) == 7 and documented_routes((PENDING, HOLDS)) == served


def test_openapi_documents_each_status_the_tests_see():
    paths = openapi_spec()["paths"]
    admin = {"401", "403"}
    assert set(paths[PENDING]["get"]["responses"]) >= {"200", "400", "503"} | admin
    assert set(paths[PENDING + "/{plan_id}"]["get"]["responses"]) >= {"200", "404"} | admin
    approve = paths[PENDING + "/{plan_id}/approve"]["post"]["responses"]
    assert set(approve) >= {"200", "404", "409", "422", "503"} | admin
    assert set(paths[PENDING + "/{plan_id}/reject"]["post"]["responses"]) >= {"200", "400", "404", "409", "415"} | admin
    assert set(paths[HOLDS]["get"]["responses"]) >= {"200"} | admin
    assert set(paths[HOLDS]["post"]["responses"]) >= {"201", "400", "404", "415"} | admin
    assert set(paths[HOLDS + "/{hold_id}"]["delete"]["responses"]) >= {"200", "404"} | admin


def test_metrics_count_open_plans_and_holds(client):
    def gauge(name: str) -> float:
        found = re.search(rf"^{name} (\S+)$", client.get("/metrics").get_data(as_text=True), re.M)
        assert found, name
        return float(found.group(1))

    assert (gauge("pve_janitor_pending_plans"), gauge("pve_janitor_holds")) == (0, 0)
    plan = refused_plan(client)
    assert client.post(HOLDS, headers=bearer(), json={"vmid": 5000}).status_code == 201
    assert (gauge("pve_janitor_pending_plans"), gauge("pve_janitor_holds")) == (1, 1)
    assert client.post(f"{PENDING}/{plan}/reject", headers=bearer()).status_code == 200
    assert gauge("pve_janitor_pending_plans") == 0
