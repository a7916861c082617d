"""``/api/v1/allocations`` (receiver.api_allocations) on real databases and the simulator.

Rows 100-104 with running guests, so the first free VMID is 105.  pytest-flask builds
``client`` from the ``app`` fixture below.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import documented_routes, janitor_env, openapi_spec, running_apps, served_routes

from receiver import store
from receiver.app import ERROR_CODES, create_app
from receiver.config import load_settings
from receiver.runtime import Runtime
from receiver.simulator.scene import app_row

ADMIN_TOKEN = "admin-token-5d7f9b1c3e"
ALLOCATOR_TOKEN = "allocator-token-8a2c4e6f0b"
ALLOCATIONS = "/api/v1/allocations"
PORTS = "public_port=20100-20199,internal_port=30100-30199"


def build(sim, db, **overrides: Any) -> Runtime:
    settings = {
        "CLEANUP_ADMIN_TOKEN": ADMIN_TOKEN,
        "CLEANUP_ALLOCATOR_TOKEN": ALLOCATOR_TOKEN,
        "CLEANUP_ALLOCATOR_PORTS": PORTS,
        **overrides,
    }
    return Runtime.build(
        load_settings(env=janitor_env(sim, db), overrides={k: v for k, v in settings.items() if v is not None}),
        engine=db.engine,
        upgrade=True,
    )


@pytest.fixture
def runtime(sim, sqlite_db):
    running_apps(sim, sqlite_db)
    return build(sim, sqlite_db)


@pytest.fixture
def app(runtime):
    return create_app(runtime.settings, runtime=runtime)


def bearer(token: str = ALLOCATOR_TOKEN, **more: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **more}


def assert_json_error(response, status: int, fragment: str = "", reason: str | None = None) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["error"] == ERROR_CODES[status] and isinstance(body["message"], str)
    assert fragment in body["message"], body["message"]
    assert body.get("reason") == reason, body
    assert "Traceback" not in response.get_data(as_text=True)
    return body


def reservation_count(db) -> int:
    with db.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(store.reservations)).scalar_one()


# --- allocate, list, release -------------------------------------------------------------


def test_allocate_list_and_release(client, sqlite_db):
    answer = client.post(
        ALLOCATIONS, json={"hostname": "web1", "ports": {"public_port": 2}, "label": "deploy 1"}, headers=bearer()
    )
    assert answer.status_code == 201, answer.get_json()
    got = answer.get_json()
    assert got["vmid"] == 105 and got["hostname"] == "web1" and got["label"] == "deploy 1"
    assert got["ports"] == {"public_port": [20105, 20106]} and got["source"] == "http" and got["table"] == "apps"
    assert got["expires_at"] > got["created_at"]
    bare = client.post(ALLOCATIONS, headers=bearer())  # no body: a VMID alone
    assert bare.status_code == 201 and bare.get_json()["vmid"] == 106 and bare.get_json()["hostname"] is None
    empty = client.post(ALLOCATIONS, json={}, headers=bearer(ADMIN_TOKEN))  # the admin token serves too
    assert empty.status_code == 201 and empty.get_json()["vmid"] == 107
    listed = client.get(ALLOCATIONS, headers=bearer()).get_json()["allocations"]
    assert [a["vmid"] for a in listed] == [105, 106, 107] and listed[0] == got
    released = client.delete(f"{ALLOCATIONS}/{got['id']}", headers=bearer())
    assert released.status_code == 200 and released.get_json() == {"released": got}
    assert_json_error(client.delete(f"{ALLOCATIONS}/{got['id']}", headers=bearer()), 404, f"no allocation {got['id']}")
    assert [a["vmid"] for a in client.get(ALLOCATIONS, headers=bearer()).get_json()["allocations"]] == [106, 107]
    again = client.post(ALLOCATIONS, json={"hostname": "web1", "ports": {"public_port": 2}}, headers=bearer())
    assert again.get_json()["vmid"] == 105 and again.get_json()["ports"] == got["ports"]


@pytest.mark.parametrize("path_id", ["abc", "0", "-1", "1.5", str(2**63), "9" * 30])
def test_release_of_an_id_that_names_nothing_is_404(client, path_id):
    assert_json_error(client.delete(f"{ALLOCATIONS}/{path_id}", headers=bearer()), 404, "no allocation")


def test_ports_as_a_count_for_every_column_and_a_suffixed_hostname(client):
    first = client.post(
        ALLOCATIONS, json={"hostname": "app100.apps.local", "hostname_suffix": True, "ports": 1}, headers=bearer()
    ).get_json()
    assert first["hostname"] == "app100-2.apps.local"
    assert first["ports"] == {"internal_port": [30105], "public_port": [20105]}


def test_stats_count_the_allocations_in_force(client):
    stats = "/api/v1/system/cleanup/stats"
    assert client.get(stats).get_json()["allocations"] == 0
    for _ in range(2):
        assert client.post(ALLOCATIONS, headers=bearer()).status_code == 201
    assert client.get(stats).get_json()["allocations"] == 2
    assert re.search(r"^pve_janitor_allocations 2\.0$", client.get("/metrics").get_data(as_text=True), re.M)


# --- refusals ----------------------------------------------------------------------------


def test_a_taken_hostname_is_409_and_reserves_nothing(client, sqlite_db):
    body = assert_json_error(
        client.post(ALLOCATIONS, json={"hostname": "app101.apps.local"}, headers=bearer()),
        409,
        "is taken by a row of 'apps'",
        reason="hostname_taken",
    )
    assert "suffix" in body["message"]
    assert reservation_count(sqlite_db) == 0


def test_an_exhausted_range_is_409(sim, sqlite_db):
    running_apps(sim, sqlite_db)
    runtime = build(
        sim, sqlite_db, CLEANUP_ALLOCATOR_VMIDS="104-106", CLEANUP_ALLOCATOR_PORTS="public_port=20105-20106"
    )
    client = create_app(runtime.settings, runtime=runtime).test_client()
    first = client.post(ALLOCATIONS, json={"ports": 1}, headers=bearer())
    assert first.status_code == 201 and first.get_json()["ports"] == {"public_port": [20105]}
    two_ports = client.post(ALLOCATIONS, json={"ports": 2}, headers=bearer())
    assert_json_error(two_ports, 409, "public_port: 1 of the 2 ports", reason="port_range_exhausted")
    assert client.post(ALLOCATIONS, headers=bearer()).get_json()["vmid"] == 106
    last = client.post(ALLOCATIONS, headers=bearer())
    assert_json_error(last, 409, "no free VMID in CLEANUP_ALLOCATOR_VMIDS=104-106", reason="vmid_range_exhausted")
    assert reservation_count(sqlite_db) == 2


@pytest.mark.parametrize("fault, path", [("refuse", None), ("http500", None), ("nodata", "/cluster/nextid")])
def test_proxmox_unreadable_is_503_and_reserves_nothing(client, sim, sqlite_db, fault, path):
    sim.set_fault(fault, path=path)
    assert_json_error(
        client.post(ALLOCATIONS, json={"hostname": "web"}, headers=bearer()),
        503,
        "nothing was reserved",
        reason="proxmox",
    )
    assert reservation_count(sqlite_db) == 0
    sim.set_fault(None)
    assert client.post(ALLOCATIONS, json={"hostname": "web"}, headers=bearer()).status_code == 201


def test_the_database_down_is_503_json(client, runtime):
    runtime.engine.dispose()
    Path(runtime.engine.url.database or "").unlink()
    for response in (client.post(ALLOCATIONS, headers=bearer()), client.get(ALLOCATIONS, headers=bearer())):
        assert_json_error(response, 503, "database")


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b"{", "not valid JSON"),
        (b"[1]", "must be a JSON object"),
        (b'"web"', "must be a JSON object"),
        (b'{"host": "web"}', "unknown field 'host'"),
        (b'{"hostname": 5}', "hostname must be a string"),
        (b'{"hostname": "web_1"}', "not a DNS name"),
        (b'{"hostname": ""}', "not a DNS name"),
        (b'{"hostname_suffix": "yes"}', "hostname_suffix must be true or false"),
        (b'{"label": []}', "label must be a string"),
        (b'{"ports": "2"}', "ports must be a count"),
        (b'{"ports": true}', "ports must be a count"),
        (b'{"ports": 33}', "0-32"),
        (b'{"ports": -1}', "0-32"),
        (b'{"ports": {"status": 1}}', "no port range for 'status'"),
        (b'{"ports": {"public_port": 1.5}}', "0-32"),
        (b"[" * 100_000 + b"]" * 100_000, "JSON"),
    ],
)
def test_bad_bodies_are_400_json_and_reserve_nothing(client, sqlite_db, body, fragment):
    response = client.post(ALLOCATIONS, data=body, headers=bearer(**{"Content-Type": "application/json"}))
    if len(body) > 65536:
        assert response.status_code == 413  # the app's body limit comes first
        return
    assert_json_error(response, 400, fragment, reason="invalid")
    assert reservation_count(sqlite_db) == 0


def test_a_body_not_declared_json_is_415(client, sqlite_db):
    response = client.post(ALLOCATIONS, data=b'{"hostname": "web"}', headers=bearer(**{"Content-Type": "text/plain"}))
    assert_json_error(response, 415, "application/json")
    assert reservation_count(sqlite_db) == 0


# --- who may allocate --------------------------------------------------------------------


@pytest.mark.parametrize("method, path", [("POST", ALLOCATIONS), ("GET", ALLOCATIONS), ("DELETE", ALLOCATIONS + "/1")])
def test_neither_token_set_is_403(sim, sqlite_db, method, path):
    running_apps(sim, sqlite_db)
    runtime = build(sim, sqlite_db, CLEANUP_ADMIN_TOKEN=None, CLEANUP_ALLOCATOR_TOKEN=None)
    client = create_app(runtime.settings, runtime=runtime).test_client()
    assert_json_error(client.open(path, method=method, headers=bearer()), 403, "is set: this endpoint is disabled")
    assert reservation_count(sqlite_db) == 0


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {ALLOCATOR_TOKEN}"},
        {"Authorization": f"Bearer {ALLOCATOR_TOKEN}x"},
        {"Authorization": f"Bearer {ALLOCATOR_TOKEN[:-1]}"},
    ],
)
@pytest.mark.parametrize("method, path", [("POST", ALLOCATIONS), ("GET", ALLOCATIONS), ("DELETE", ALLOCATIONS + "/1")])
def test_a_missing_or_wrong_token_is_401(client, sqlite_db, headers, method, path):
    response = client.open(path, method=method, headers=headers)
    assert_json_error(response, 401, "CLEANUP_ALLOCATOR_TOKEN or CLEANUP_ADMIN_TOKEN")
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="pve-janitor"'
    assert ALLOCATOR_TOKEN not in response.get_data(as_text=True)
    assert reservation_count(sqlite_db) == 0


@pytest.mark.parametrize("only", ["allocator", "admin"])
def test_either_token_alone_opens_the_allocations(sim, sqlite_db, only):
    running_apps(sim, sqlite_db)
    tokens = {"CLEANUP_ALLOCATOR_TOKEN": None} if only == "admin" else {"CLEANUP_ADMIN_TOKEN": None}
    runtime = build(sim, sqlite_db, **tokens)
    client = create_app(runtime.settings, runtime=runtime).test_client()
    mine = ADMIN_TOKEN if only == "admin" else ALLOCATOR_TOKEN
    other = ALLOCATOR_TOKEN if only == "admin" else ADMIN_TOKEN
    assert client.post(ALLOCATIONS, headers=bearer(mine)).status_code == 201
    assert_json_error(client.post(ALLOCATIONS, headers=bearer(other)), 401)
    assert client.get(ALLOCATIONS, headers=bearer(mine)).status_code == 200
    assert client.delete(ALLOCATIONS + "/1", headers=bearer(mine)).status_code == 200


ADMIN_ROUTES = [
    ("POST", "/api/v1/system/cleanup/run?dry_run=true"),
    ("GET", "/api/v1/system/cleanup/pending"),
    ("GET", "/api/v1/system/cleanup/holds"),
    ("POST", "/api/v1/system/cleanup/holds"),
    ("DELETE", "/api/v1/system/cleanup/holds/1"),
]


@pytest.mark.parametrize("method, path", ADMIN_ROUTES)
def test_the_allocator_token_opens_no_admin_route(client, method, path):
    response = client.open(path, method=method, headers=bearer(ALLOCATOR_TOKEN), json={"vmid": 150})
    assert_json_error(response, 401, "CLEANUP_ADMIN_TOKEN")
    assert client.open(path, method=method, headers=bearer(ADMIN_TOKEN), json={"vmid": 150}).status_code not in (
        401,
        403,
    )


def test_history_shows_whole_rows_to_the_admin_token_only(client, sqlite_db):
    """The history's whole removed row is for the admin token: the allocator token is no admin."""
    apps = sa.Table("apps", sa.MetaData(), autoload_with=sqlite_db.engine)
    with sqlite_db.engine.begin() as conn:
        conn.execute(apps.insert(), [app_row(150, "running", age=timedelta(days=1))])  # its guest is gone
    assert client.post("/api/v1/system/cleanup/run?force=true", headers=bearer(ADMIN_TOKEN)).status_code == 200
    history = "/api/v1/system/cleanup/history"
    seen = client.get(history, headers=bearer(ALLOCATOR_TOKEN)).get_json()["entries"]
    assert [e["vmid"] for e in seen] == [150] and "row" not in seen[0]
    assert "row" in client.get(history, headers=bearer(ADMIN_TOKEN)).get_json()["entries"][0]


# --- on every database -------------------------------------------------------------------


def test_allocations_over_http_on_every_database(sim, any_db):
    running_apps(sim, any_db)
    runtime = build(sim, any_db)
    client = create_app(runtime.settings, runtime=runtime).test_client()
    got = [
        client.post(
            ALLOCATIONS, json={"hostname": "web", "hostname_suffix": True, "ports": 1}, headers=bearer()
        ).get_json()
        for _ in range(3)
    ]
    assert [g["vmid"] for g in got] == [105, 106, 107]
    assert [g["hostname"] for g in got] == ["web", "web-2", "web-3"]
    assert [g["ports"]["public_port"] for g in got] == [[20105], [20106], [20107]]
    assert client.get(ALLOCATIONS, headers=bearer()).get_json()["allocations"] == got
    assert client.delete(f"{ALLOCATIONS}/{got[1]['id']}", headers=bearer()).status_code == 200
    assert [a["vmid"] for a in client.get(ALLOCATIONS, headers=bearer()).get_json()["allocations"]] == [105, 107]


# --- the OpenAPI document ----------------------------------------------------------------


def test_openapi_documents_these_routes_as_served(app):
    served = served_routes(app, lambda endpoint: endpoint.startswith("allocations."))
    assert len(served) == 3 and documented_routes(ALLOCATIONS) == served


def test_openapi_documents_each_status_and_reason_the_tests_see():
    spec = openapi_spec()
    paths = spec["paths"]
    auth = {"401", "403"}
    assert set(paths[ALLOCATIONS]["post"]["responses"]) >= {"201", "400", "409", "415", "503"} | auth
    assert set(paths[ALLOCATIONS]["get"]["responses"]) >= {"200", "503"} | auth
    assert set(paths[ALLOCATIONS + "/{reservation_id}"]["delete"]["responses"]) >= {"200", "404"} | auth
    from receiver.allocation import STATUS

    refused = spec["components"]["schemas"]["AllocationRefused"]["allOf"][1]["properties"]["reason"]["enum"]
    assert set(refused) == set(STATUS)
    request = spec["components"]["schemas"]["AllocationRequest"]["properties"]
    from receiver.api_allocations import FIELDS

    assert set(request) == set(FIELDS)
