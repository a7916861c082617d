"""The HTTP API (receiver.app), on a real SQLite file and the Proxmox simulator over HTTPS.

pytest-flask builds ``client`` from the ``app`` fixture below.  The seed scene:
47 rows, 41 of them error rows whose guests are gone, so a plain sweep trips
the deletion-percentage guard and ``force=true`` removes exactly the 41.
"""

from __future__ import annotations

import io
import json
import logging
import time
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import documented_routes, make_runtime, openapi_spec, served_routes, table_vmids

from receiver import store
from receiver.app import ERROR_CODES, create_app
from receiver.events import MAX_BODY_BYTES, signature
from receiver.metrics import CONTENT_TYPE
from receiver.simulator.scene import ERROR_VMIDS, RUNNING_VMIDS, seed_database
from receiver.timeutil import utcnow

HOOK_SECRET = "hook-secret-7f3a9c2e5b"
ADMIN_TOKEN = "admin-token-91b2d4f6a8"
EVENTS, RUN = "/api/v1/events", "/api/v1/system/cleanup/run"
STATS, HISTORY = "/api/v1/system/cleanup/stats", "/api/v1/system/cleanup/history"


class WatcherStub:
    def __init__(self, alive: bool = True, watched: tuple[int, ...] = (), leader: bool = True):
        self.alive, self.watched, self.leader = alive, list(watched), leader
        self.wakes = 0

    def status(self) -> dict[str, Any]:
        return {
            "watched": self.watched,
            "leader": self.leader,
            "alive": self.alive,
            "last_tick": "2024-06-10T06:13:20+00:00" if self.alive else None,
            "last_error": None,
        }

    def wake(self) -> None:
        self.wakes += 1


class SchedulerStub:
    def __init__(self, running: bool = True):
        self.running = running


@pytest.fixture
def platform_db(sqlite_db):
    seed_database(sqlite_db.engine)
    return sqlite_db


def build(sim, db, **overrides):
    settings = {"CLEANUP_HOOK_SECRET": HOOK_SECRET, "CLEANUP_ADMIN_TOKEN": ADMIN_TOKEN, **overrides}
    return make_runtime(sim, db, **{k: v for k, v in settings.items() if v is not None})


@pytest.fixture
def runtime(seed_sim, platform_db):
    return build(seed_sim, platform_db)


@pytest.fixture
def watcher():
    return WatcherStub(watched=(120, 121, 122))


@pytest.fixture
def app(runtime, watcher):
    return create_app(runtime.settings, runtime=runtime, watcher=watcher, scheduler=SchedulerStub())


def janitor(app):
    return app.extensions["janitor"]


# --- helpers ---------------------------------------------------------------------------


def event_body(
    event_id: str = "ev-1", vmid: int | str = 120, phase: str | None = "post-stop", node: str = "pve1", **extra: Any
) -> bytes:
    data = {"event_id": event_id, "vmid": vmid, "phase": phase, "node": node, "ts": time.time(), **extra}
    return json.dumps(data).encode()


def signed_headers(body: bytes, secret: str = HOOK_SECRET, ts: int | None = None) -> dict[str, str]:
    ts = int(time.time()) if ts is None else ts
    return {
        "X-Janitor-Timestamp": str(ts),
        "X-Janitor-Signature": signature(secret, ts, body),
        "Content-Type": "application/json",
    }


def send(client, body: bytes, **sign: Any):
    return client.post(EVENTS, data=body, headers=signed_headers(body, **sign))


def inbox_ids(db) -> list[str]:
    with db.engine.connect() as conn:
        return sorted(conn.execute(sa.select(store.inbox.c.event_id)).scalars())


def assert_json_error(response, status: int, fragment: str = "") -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["error"] == ERROR_CODES[status] and isinstance(body["message"], str)
    assert fragment in body["message"]
    assert "Traceback" not in response.get_data(as_text=True)
    return body


def bearer(token: str = ADMIN_TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def metric_value(app, name: str, **labels: str) -> float | None:
    return janitor(app).metrics.registry.get_sample_value(name, labels or None)


# --- POST /api/v1/events ---------------------------------------------------------------


def test_event_is_stored_202_and_wakes_the_watcher(client, app, platform_db, watcher):
    response = send(client, event_body("ev-1", vmid=120))
    assert response.status_code == 202
    assert response.get_json() == {
        "status": "accepted",
        "event_id": "ev-1",
        "vmid": 120,
        "phase": "post-stop",
        "cleanup_enabled": True,
    }
    assert inbox_ids(platform_db) == ["ev-1"]
    assert watcher.wakes == 1
    assert metric_value(app, "pve_janitor_events_total", phase="post-stop", outcome="accepted") == 1


def test_replayed_event_is_200_and_stored_once(client, app, platform_db, watcher):
    body = event_body("ev-replay")
    assert send(client, body).status_code == 202
    again = send(client, body)  # the same request, re-sent (a spool replay, a load-balancer retry)
    assert again.status_code == 200
    assert again.get_json()["status"] == "duplicate"
    resent = send(client, event_body("ev-replay", vmid=121))  # same id, other content: still a no-op
    assert resent.status_code == 200
    assert inbox_ids(platform_db) == ["ev-replay"]
    assert watcher.wakes == 1
    assert metric_value(app, "pve_janitor_events_total", phase="post-stop", outcome="duplicate") == 2


def test_event_without_watcher_and_without_ts(seed_sim, platform_db):
    runtime = build(seed_sim, platform_db)
    client = create_app(runtime.settings, runtime=runtime).test_client()
    body = json.dumps({"event_id": "no-ts", "vmid": 130, "phase": "pre-stop", "node": "pve2"}).encode()
    assert send(client, body).status_code == 202
    with platform_db.engine.connect() as conn:
        ts = conn.execute(sa.select(store.inbox.c.ts)).scalar_one()
    assert abs(ts - time.time()) < 60


def test_event_is_stored_but_not_acted_on_when_cleanup_is_disabled(seed_sim, platform_db):
    runtime = build(seed_sim, platform_db, CLEANUP_ENABLED="false")
    client = create_app(runtime.settings, runtime=runtime).test_client()
    response = send(client, event_body("ev-off"))
    assert response.status_code == 202
    body = response.get_json()
    assert body["cleanup_enabled"] is False and "CLEANUP_ENABLED is false" in body["note"]
    assert inbox_ids(platform_db) == ["ev-off"]


def test_events_are_503_without_a_hook_secret(seed_sim, platform_db):
    runtime = build(seed_sim, platform_db, CLEANUP_HOOK_SECRET=None)
    app = create_app(runtime.settings, runtime=runtime)
    body = event_body()
    assert_json_error(
        app.test_client().post(EVENTS, data=body, headers=signed_headers(body, secret="")),
        503,
        "hook secret not configured",
    )
    assert inbox_ids(platform_db) == []


@pytest.mark.parametrize("age, status", [(-301, 401), (301, 401), (-299, 202), (299, 202)])
def test_timestamp_window_is_300_seconds(client, platform_db, age, status):
    """A negative age is a timestamp in the future."""
    response = send(client, event_body(), ts=int(time.time()) - age)
    assert response.status_code == status
    if status == 401:
        assert_json_error(response, 401, "stale or future timestamp")
        assert inbox_ids(platform_db) == []


def test_bad_signature_is_401_and_stores_nothing(client, app, platform_db):
    body = event_body()
    headers = signed_headers(body, secret="not-the-secret")
    error = assert_json_error(client.post(EVENTS, data=body, headers=headers), 401, "bad signature")
    tampered = body.replace(b'"vmid": 120', b'"vmid": 121')
    assert_json_error(client.post(EVENTS, data=tampered, headers=signed_headers(body)), 401, "bad signature")
    assert inbox_ids(platform_db) == []
    assert HOOK_SECRET not in json.dumps(error)
    assert metric_value(app, "pve_janitor_events_total", phase="unknown", outcome="rejected") == 2


@pytest.mark.parametrize(
    "drop, garble, fragment",
    [
        ("X-Janitor-Timestamp", None, "missing X-Janitor-Timestamp"),
        ("X-Janitor-Signature", None, "missing X-Janitor-Signature"),
        (None, ("X-Janitor-Timestamp", "yesterday"), "X-Janitor-Timestamp must be unix seconds"),
        (None, ("X-Janitor-Signature", "md5=abc"), "X-Janitor-Signature must be sha256="),
    ],
)
def test_missing_or_garbled_headers_are_401(client, platform_db, drop, garble, fragment):
    body = event_body()
    headers = signed_headers(body)
    if drop:
        del headers[drop]
    if garble:
        headers[garble[0]] = garble[1]
    assert_json_error(client.post(EVENTS, data=body, headers=headers), 401, fragment)
    assert inbox_ids(platform_db) == []


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b"{not json", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"\xc3\x28", "UTF-8"),
        (b"[1, 2, 3]", "JSON object"),
        (b'"post-stop"', "JSON object"),
        (b"null", "JSON object"),
        (json.dumps({"vmid": 120, "phase": "post-stop", "node": "pve1"}).encode(), "event_id"),
        (event_body(event_id=""), "event_id"),
        (event_body(event_id="x" * 129), "event_id"),
        (event_body(event_id="tab\there"), "event_id"),
        (event_body(vmid="120"), "vmid"),
        (event_body(vmid=True), "vmid"),
        (event_body(vmid=99), "vmid"),
        (event_body(vmid=1_000_000_000), "vmid"),
        (event_body(phase="destroy"), "phase"),
        (event_body(phase=None), "phase"),
        (event_body(node=""), "node"),
        (event_body(node="n" * 65), "node"),
        (event_body(ts="2024-06-10"), "ts"),
        (event_body(ts=-5), "ts"),
    ],
)
def test_malformed_or_invalid_bodies_are_400(client, platform_db, body, fragment):
    assert_json_error(send(client, body), 400, fragment)
    assert inbox_ids(platform_db) == []


def test_signature_is_checked_before_the_body(client):
    headers = signed_headers(b"{}", secret="wrong")
    assert_json_error(client.post(EVENTS, data=b"{not json", headers=headers), 401)


def test_wrong_content_type_is_415(client, platform_db):
    body = event_body()
    headers = signed_headers(body) | {"Content-Type": "application/x-www-form-urlencoded"}
    assert_json_error(client.post(EVENTS, data=body, headers=headers), 415, "application/json")
    assert inbox_ids(platform_db) == []


def padded_event(size: int) -> bytes:
    ts = int(time.time())
    body = event_body("ev-big", ts=ts, pad="")
    return event_body("ev-big", ts=ts, pad="x" * (size - len(body)))


def test_body_of_64_kib_is_accepted(client, platform_db):
    body = padded_event(MAX_BODY_BYTES)
    assert len(body) == MAX_BODY_BYTES
    assert send(client, body).status_code == 202


def test_oversized_body_is_413_before_the_signature(client, platform_db):
    body = padded_event(MAX_BODY_BYTES + 1)
    assert_json_error(send(client, body), 413)
    unsigned = client.post(EVENTS, data=body, headers={"Content-Type": "application/json"})
    assert_json_error(unsigned, 413, "larger than 65536 bytes")
    assert inbox_ids(platform_db) == []


def test_oversized_chunked_body_without_content_length_is_413(client, platform_db):
    body = padded_event(MAX_BODY_BYTES + 1000)
    response = client.post(
        EVENTS,
        input_stream=io.BytesIO(body),
        headers=signed_headers(body) | {"Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert_json_error(response, 413)
    assert inbox_ids(platform_db) == []


def test_event_is_503_when_the_database_is_down(client, app, platform_db, watcher):
    janitor(app).inbox.engine = sa.create_engine("sqlite:////nonexistent-dir/x.db")
    try:
        assert_json_error(send(client, event_body()), 503, "send the event again later")
    finally:
        janitor(app).inbox.engine.dispose()
    assert watcher.wakes == 0


# --- POST /api/v1/system/cleanup/run ---------------------------------------------------


def test_run_is_403_when_no_admin_token_is_configured(seed_sim, platform_db):
    runtime = build(seed_sim, platform_db, CLEANUP_ADMIN_TOKEN=None)
    client = create_app(runtime.settings, runtime=runtime).test_client()
    assert_json_error(client.post(RUN, headers=bearer("")), 403, "CLEANUP_ADMIN_TOKEN")
    assert_json_error(client.post(RUN, headers=bearer("anything")), 403)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        bearer("wrong-token"),
        bearer(ADMIN_TOKEN + "x"),
        bearer(""),
        {"Authorization": ADMIN_TOKEN},
        {"Authorization": f"Basic {ADMIN_TOKEN}"},
        {"Authorization": "Bearer tökén"},
    ],
)
def test_run_without_the_right_token_is_401(client, platform_db, headers):
    response = client.post(RUN, headers=headers)
    assert_json_error(response, 401)
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert len(table_vmids(platform_db)) == 47


def test_non_ascii_admin_token_matches_its_utf8_bytes(seed_sim, platform_db):
    runtime = build(seed_sim, platform_db, CLEANUP_ADMIN_TOKEN="jeton-é-ü")
    client = create_app(runtime.settings, runtime=runtime).test_client()
    as_sent = "jeton-é-ü".encode().decode("latin-1")  # what a server hands over for UTF-8 bytes
    assert client.post(RUN + "?dry_run=true&force=true", headers=bearer(as_sent)).status_code == 200
    assert_json_error(client.post(RUN, headers=bearer("jeton-e-u")), 401)


def test_run_dry_run_plans_and_changes_nothing(client, platform_db):
    response = client.post(RUN + "?dry_run=true&force=true", headers=bearer())
    assert response.status_code == 200
    result = response.get_json()
    assert result["outcome"] == "dry_run" and result["dry_run"] is True
    assert sorted(a["vmid"] for a in result["planned"]) == list(ERROR_VMIDS)
    assert len(table_vmids(platform_db)) == 47


def test_run_refused_by_the_guard_is_422_then_force_removes_the_ghosts(client, platform_db):
    refused = client.post(RUN, headers=bearer())
    body = assert_json_error(refused, 422, "CLEANUP_MAX_DELETE_PERCENT")
    assert (body["outcome"], body["refusal"]) == ("refused", "guard")
    assert len(table_vmids(platform_db)) == 47

    forced = client.post(RUN + "?force=true&dry_run=false", headers=bearer())
    assert forced.status_code == 200
    assert forced.get_json()["outcome"] == "done" and forced.get_json()["applied"] == 41
    assert table_vmids(platform_db) == list(RUNNING_VMIDS)

    again = client.post(RUN, headers=bearer())
    assert again.status_code == 200 and again.get_json()["outcome"] == "nothing"


def test_run_refused_when_proxmox_is_unreadable_is_422(client, seed_sim, platform_db):
    seed_sim.set_fault("http500")
    body = assert_json_error(client.post(RUN + "?force=true", headers=bearer()), 422, "inventory")
    assert body["refusal"] == "inventory"
    assert len(table_vmids(platform_db)) == 47


def test_run_that_fails_on_the_database_is_503(client, platform_db):
    with platform_db.engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE apps RENAME TO apps_gone"))
    body = assert_json_error(client.post(RUN + "?force=true", headers=bearer()), 503)
    assert body["outcome"] == "failed" and body["refusal"] == "database"


def test_run_when_cleanup_is_disabled_is_200_disabled(seed_sim, platform_db):
    runtime = build(seed_sim, platform_db, CLEANUP_ENABLED="false")
    client = create_app(runtime.settings, runtime=runtime).test_client()
    response = client.post(RUN + "?force=true", headers=bearer())
    assert response.status_code == 200 and response.get_json()["outcome"] == "disabled"
    assert len(table_vmids(platform_db)) == 47


def test_run_while_a_sweep_is_running_is_409(client, runtime, platform_db):
    runtime.sweeper._lock.acquire()
    try:
        assert_json_error(client.post(RUN + "?force=true", headers=bearer()), 409, "already running")
    finally:
        runtime.sweeper._lock.release()
    assert len(table_vmids(platform_db)) == 47


@pytest.mark.parametrize(
    "query", ["dry_run=yes", "dry_run=1", "dry_run=", "force=maybe", "force=0", "dry_run=true&force=on"]
)
def test_run_with_a_bad_query_is_400(client, platform_db, query):
    name = query.split("&")[-1].split("=")[0]
    assert_json_error(client.post(f"{RUN}?{query}", headers=bearer()), 400, f"{name} must be true or false")
    assert len(table_vmids(platform_db)) == 47


def test_run_auth_is_checked_before_the_query(client):
    assert_json_error(client.post(RUN + "?dry_run=garbage"), 401)


# --- GET /api/v1/system/cleanup/history ------------------------------------------------


def test_history_is_empty_at_first(client):
    response = client.get(HISTORY)
    assert response.status_code == 200
    assert response.get_json() == {"entries": [], "next_before": None}


def test_history_pages_newest_first(client):
    assert client.post(RUN + "?force=true", headers=bearer()).status_code == 200
    seen: list[int] = []
    before, pages = None, 0
    while True:
        query = "limit=20" + (f"&before={before}" if before else "")
        page = client.get(f"{HISTORY}?{query}").get_json()
        pages += 1
        ids = [e["id"] for e in page["entries"]]
        assert ids == sorted(ids, reverse=True)
        assert not seen or max(ids) < min(seen)
        seen += ids
        before = page["next_before"]
        if before is None:
            break
        assert before == ids[-1]
    assert (pages, len(seen), len(set(seen))) == (3, 41, 41)
    entry = client.get(f"{HISTORY}?limit=1", headers=bearer()).get_json()["entries"][0]
    assert entry["reason"] == "ghost" and entry["source"] == "manual" and entry["vmid"] in ERROR_VMIDS
    assert entry["row"]["lxc_id"] == entry["vmid"] and entry["restored_at"] is None
    assert len(client.get(HISTORY).get_json()["entries"]) == 41  # default limit 50


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}])
def test_history_shows_the_whole_removed_row_only_to_the_admin(client, headers):
    """The audit copy has every column of the platform's row, which may hold credentials."""
    assert client.post(RUN + "?force=true", headers=bearer()).status_code == 200
    public = client.get(f"{HISTORY}?limit=5", headers=headers).get_json()["entries"]
    assert len(public) == 5 and all("row" not in e for e in public)
    assert {"id", "vmid", "hostname", "reason", "removed_at"} <= set(public[0])
    admin = client.get(f"{HISTORY}?limit=5", headers=bearer()).get_json()["entries"]
    assert all(e["row"]["lxc_id"] == e["vmid"] for e in admin)


def test_history_last_page_of_exact_size_has_no_next(client):
    assert client.post(RUN + "?force=true", headers=bearer()).status_code == 200
    page = client.get(f"{HISTORY}?limit=41").get_json()
    assert len(page["entries"]) == 41 and page["next_before"] is None


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=501",
        "limit=abc",
        "limit=-1",
        "limit=1.5",
        "limit=",
        "limit=%E0%A5%A7",
        "before=0",
        "before=x",
        "before=-3",
        "before=1e3",
    ],
)
def test_history_with_bad_parameters_is_400(client, query):
    assert_json_error(client.get(f"{HISTORY}?{query}"), 400, query.split("=")[0])


# --- GET /api/v1/system/cleanup/stats --------------------------------------------------

SEED_KEYS = {
    "enabled",
    "last_run",
    "ghost_apps_removed",
    "old_errors_removed",
    "ports_freed",
    "total_removed",
    "errors",
    "config",
}
EXTRA_KEYS = {
    "rows_marked",
    "rows_restored",
    "watched_vmids",
    "inbox_backlog",
    "last_event_per_node",
    "last_sweep",
    "leader",
    "action",
}


def test_stats_have_the_seed_shape_and_more(client):
    response = client.get(STATS)
    assert response.status_code == 200
    stats = response.get_json()
    assert SEED_KEYS | EXTRA_KEYS <= set(stats)
    assert stats["config"] == {
        "error_retention_hours": 24,
        "ghost_cleanup_enabled": True,
        "cleanup_interval_minutes": 60,
        "dry_run": False,
    }
    assert (stats["enabled"], stats["action"], stats["last_run"], stats["last_sweep"]) == (True, "delete", None, None)
    assert stats["total_removed"] == 0 and stats["errors"] == []
    assert stats["leader"] is True and stats["watcher"]["alive"] is True


def test_stats_follow_events_sweeps_and_the_watch_list(client, platform_db):
    assert send(client, event_body("a", node="pve1")).status_code == 202
    assert send(client, event_body("b", node="pve2", phase="pre-start")).status_code == 202
    client.post(RUN, headers=bearer())  # refused by the guard: an error entry
    assert client.post(RUN + "?force=true", headers=bearer()).status_code == 200
    now = utcnow()
    with platform_db.engine.begin() as conn:
        conn.execute(
            store.watch.insert(),
            [
                {"vmid": 133, "since": now, "until": now + timedelta(minutes=10), "hint": "stop"},
                {"vmid": 131, "since": now, "until": now + timedelta(minutes=10), "hint": "task"},
                {"vmid": 132, "since": now - timedelta(hours=1), "until": now - timedelta(minutes=1), "hint": "stop"},
            ],
        )
    stats = client.get(STATS).get_json()
    assert (stats["ghost_apps_removed"], stats["total_removed"], stats["ports_freed"]) == (41, 41, 82)
    assert stats["inbox_backlog"] == 2
    assert set(stats["last_event_per_node"]) == {"pve1", "pve2"}
    assert stats["watched_vmids"] == [131, 133]  # the expired entry is not watched any more
    assert stats["last_sweep"]["outcome"] == "done" and stats["last_sweep"]["source"] == "manual"
    assert stats["last_run"] == stats["last_sweep"]["finished_at"] is not None
    assert "CLEANUP_MAX_DELETE_PERCENT" in stats["errors"][0]["message"]


def test_stats_never_show_a_secret(client, runtime):
    send(client, event_body())
    client.post(RUN, headers=bearer())
    text = client.get(STATS).get_data(as_text=True)
    secrets = [HOOK_SECRET, ADMIN_TOKEN, runtime.settings.pve_token_value]
    assert all(secrets) and not [s for s in secrets if s in text]


def test_stats_are_503_json_when_the_database_is_down(client, runtime):
    good = runtime.engine
    runtime.engine = sa.create_engine("sqlite:////nonexistent-dir/x.db")
    try:
        assert_json_error(client.get(STATS), 503, "database")
    finally:
        runtime.engine.dispose()
        runtime.engine = good


# --- GET /healthz, GET /metrics --------------------------------------------------------


def test_healthz_ok(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "ok" and body["database"] == "ok" and "reasons" not in body
    assert body["watcher"]["alive"] is True and body["scheduler"] == {"running": True}


def test_healthz_ok_without_watcher_or_scheduler(runtime):
    response = create_app(runtime.settings, runtime=runtime).test_client().get("/healthz")
    assert response.status_code == 200 and response.get_json()["watcher"] is None


def test_healthz_503_when_watcher_and_scheduler_are_dead(runtime):
    app = create_app(
        runtime.settings, runtime=runtime, watcher=WatcherStub(alive=False), scheduler=SchedulerStub(running=False)
    )
    response = app.test_client().get("/healthz")
    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] == "unhealthy"
    assert body["reasons"] == ["watcher: not running", "scheduler: not running"]


def test_healthz_503_when_the_database_is_unreachable(client, runtime):
    good = runtime.engine
    runtime.engine = sa.create_engine("sqlite:////nonexistent-dir/x.db")
    try:
        response = client.get("/healthz")
    finally:
        runtime.engine.dispose()
        runtime.engine = good
    assert response.status_code == 503
    body = response.get_json()
    assert body["database"] == "unreachable" and body["reasons"][0].startswith("database:")


def test_metrics_are_prometheus_text(client, app, watcher):
    send(client, event_body())
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == CONTENT_TYPE
    text = response.get_data(as_text=True)
    for name in (
        "pve_janitor_events_total",
        "pve_janitor_sweeps_total",
        "pve_janitor_rows_removed_total",
        "pve_janitor_inventory_read_seconds",
        "pve_janitor_watched_vmids",
        "pve_janitor_inbox_backlog",
        "pve_janitor_last_successful_sweep_timestamp_seconds",
        "pve_janitor_leader",
    ):
        assert f"# TYPE {name}" in text
    assert metric_value(app, "pve_janitor_inbox_backlog") == 1
    assert metric_value(app, "pve_janitor_watched_vmids") == len(watcher.watched)


def test_metrics_show_the_last_successful_sweep_from_the_database(client, app):
    assert client.post(RUN + "?force=true", headers=bearer()).status_code == 200
    client.get("/metrics")
    last = metric_value(app, "pve_janitor_last_successful_sweep_timestamp_seconds")
    assert last is not None and abs(last - time.time()) < 60


# --- errors are JSON -------------------------------------------------------------------


def test_unknown_route_is_json_404(client):
    assert_json_error(client.get("/api/v1/nothing-here"), 404)


@pytest.mark.parametrize(
    "method, path, allowed",
    [
        ("get", EVENTS, "POST"),
        ("delete", STATS, "GET"),
        ("get", RUN, "POST"),
        ("put", "/healthz", "GET"),
        ("post", "/metrics", "GET"),
        ("post", HISTORY, "GET"),
    ],
)
def test_wrong_method_is_json_405(client, method, path, allowed):
    response = getattr(client, method)(path)
    assert_json_error(response, 405, allowed)
    assert allowed in response.headers["Allow"]


def test_unexpected_error_is_json_500_without_details(runtime, caplog):
    class Broken(WatcherStub):
        def status(self):
            raise RuntimeError("internal detail 12345")

    app = create_app(runtime.settings, runtime=runtime, watcher=Broken())
    with caplog.at_level(logging.ERROR, logger="receiver.app"):
        response = app.test_client().get("/healthz")
    body = assert_json_error(response, 500)
    assert "12345" not in response.get_data(as_text=True) and "RuntimeError" not in body["message"]
    assert any(r.exc_info and "12345" in str(r.exc_info[1]) for r in caplog.records)


def test_index_lists_the_routes(client):
    body = client.get("/").get_json()
    routes = {(r["method"], r["path"]) for r in body["routes"]}
    assert ("POST", EVENTS) in routes and ("GET", "/metrics") in routes
    assert all(r["description"] for r in body["routes"])


# --- the OpenAPI document --------------------------------------------------------------


def test_openapi_paths_and_methods_match_the_app(app):
    # /ui is the dashboard's HTML pages, not the API: docs/dashboard.md documents them.
    served = served_routes(app, lambda endpoint: endpoint != "static" and not endpoint.startswith("ui."))
    assert documented_routes() == served


def test_openapi_error_schema_names_every_error_code():
    error = openapi_spec()["components"]["schemas"]["Error"]
    assert error["required"] == ["error", "message"]
    assert set(error["properties"]["error"]["enum"]) == set(ERROR_CODES.values())


def test_openapi_stats_schema_requires_what_the_app_returns(client):
    required = set(openapi_spec()["components"]["schemas"]["Stats"]["required"])
    assert required == SEED_KEYS | EXTRA_KEYS
    assert required <= set(client.get(STATS).get_json())


def test_openapi_documents_each_status_the_tests_see():
    paths = openapi_spec()["paths"]
    assert set(paths[EVENTS]["post"]["responses"]) >= {"200", "202", "400", "401", "413", "415", "503"}
    assert set(paths[RUN]["post"]["responses"]) >= {"200", "400", "401", "403", "409", "422", "503"}
    assert set(paths[HISTORY]["get"]["responses"]) >= {"200", "400"}
    assert set(paths["/healthz"]["get"]["responses"]) >= {"200", "503"}


# --- every database ----------------------------------------------------------------------


def test_events_runs_and_history_on_every_database(seed_sim, seeded):
    """SQLite here; PostgreSQL and MariaDB too when configured (always in CI)."""
    runtime = build(seed_sim, seeded)
    client = create_app(runtime.settings, runtime=runtime).test_client()
    body = event_body("ev-any-db", vmid=140)
    assert send(client, body).status_code == 202
    assert send(client, body).status_code == 200
    assert client.post(RUN + "?force=true", headers=bearer()).status_code == 200
    assert table_vmids(seeded) == list(RUNNING_VMIDS)
    first = client.get(f"{HISTORY}?limit=40").get_json()
    rest = client.get(f"{HISTORY}?before={first['next_before']}").get_json()
    assert len(first["entries"]) + len(rest["entries"]) == 41 and rest["next_before"] is None
    stats = client.get(STATS).get_json()
    assert stats["total_removed"] == 41 and stats["inbox_backlog"] == 1
