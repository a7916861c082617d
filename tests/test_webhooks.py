"""Webhook delivery: sweeps, restores and refusals reach real HTTP(S) targets, signed, in order,
at least once, whatever the target does (down, 500, slow, an untrusted certificate).

The targets are real servers on 127.0.0.1 (:class:`Hook`: a threaded ``http.server``, HTTPS
with a trustme CA), the changes are made by the real pipeline against the Proxmox simulator,
and the database is a real SQLite file, PostgreSQL or MariaDB.  Short timeouts and backoff
come in through the Deliverer's parameters; every wait is a poll with a deadline.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
import sqlalchemy as sa
import trustme
from conftest import Database, janitor_env, make_runtime, run_cli, running_apps, table_vmids

from receiver import __version__, outbox, store
from receiver.app import create_app
from receiver.metrics import Metrics
from receiver.model import Outcome
from receiver.restore import restore
from receiver.runtime import Runtime
from receiver.serve import build
from receiver.simulator.launch import free_port
from receiver.simulator.scene import create_apps_table
from receiver.webhooks import PERSIST_EVERY, Deliverer, backoff_seconds, failure_text

SECRET = "webhook-secret-8c1f2e"
QUERY_TOKEN = "query-token-5a9d"
PASSWORD = "basic-pw-77e1"
FAST: dict[str, Any] = {"poll_seconds": 0.05, "backoff_min": 0.05, "backoff_max": 0.2}
GRACE = {"CLEANUP_GRACE_MINUTES": 15}


# --- a webhook target ----------------------------------------------------------------------


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    status: int  # what the target answered (0: it answered nothing, too slow)
    at: float = field(default_factory=time.time)

    @property
    def event(self) -> dict[str, Any]:
        return json.loads(self.body)


class Hook:
    """A webhook target on 127.0.0.1: records every POST, answers ``status`` after ``delay`` s.

    ``answer`` may be set to a function of the request's number (from 1) that returns the status.
    Not listening until :meth:`start` (the port is reserved, so a deliverer meets a refused
    connection); ``ca`` makes it HTTPS with a certificate that CA issued."""

    def __init__(self, ca: trustme.CA | None = None, path: str = "/hooks/pve"):
        self.port = free_port()
        self.ca = ca
        self.path = path
        self.status = 200
        self.delay = 0.0
        self.answer: Callable[[int], int] | None = None
        self.received: list[Received] = []
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.ca else "http"
        return f"{scheme}://hook:{PASSWORD}@127.0.0.1:{self.port}{self.path}?token={QUERY_TOKEN}"

    @property
    def shown(self) -> str:
        return f"{'https' if self.ca else 'http'}://127.0.0.1:{self.port}{self.path}?…"

    def start(self) -> Hook:
        hook = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # the answer's two writes, without a delayed-ACK wait

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with hook.lock:
                    number = len(hook.received) + 1
                    status = hook.answer(number) if hook.answer else hook.status
                    delay = hook.delay
                    record = Received(dict(self.headers), body, 0)
                    hook.received.append(record)
                if delay:
                    time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                    record.status = status
                except OSError:  # the deliverer gave up waiting
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        if self.ca is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.ca.issue_cert("127.0.0.1").configure_cert(context)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def accepted(self) -> list[Received]:
        with self.lock:
            return [r for r in self.received if 200 <= r.status < 300]

    def accepted_ids(self) -> list[str]:
        return [r.event["id"] for r in self.accepted()]


@pytest.fixture
def hooks() -> Iterator[Callable[..., Hook]]:
    made: list[Hook] = []

    def make(ca: trustme.CA | None = None, start: bool = True) -> Hook:
        hook = Hook(ca)
        made.append(hook.start() if start else hook)
        return hook

    yield make
    for hook in made:
        hook.stop()


@pytest.fixture
def deliverers() -> Iterator[Callable[..., Deliverer]]:
    started: list[Deliverer] = []

    def make(runtime: Runtime, metrics: Metrics | None = None, **kwargs: Any) -> Deliverer:
        deliverer = Deliverer(runtime.engine, runtime.settings, metrics, **(FAST | kwargs))
        started.append(deliverer.start())
        return deliverer

    yield make
    for deliverer in started:
        deliverer.stop(10)


def wait_for(check: Callable[[], Any], timeout: float = 20, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something true; that value."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.02)


def hooked(sim, db: Database, *urls: str, **extra: Any) -> Runtime:
    """A runtime whose settings send webhooks to ``urls`` (the apps table made if missing)."""
    if not sa.inspect(db.engine).has_table("apps"):
        create_apps_table(db.engine)
    return make_runtime(sim, db, CLEANUP_WEBHOOK_URLS=",".join(urls), CLEANUP_WEBHOOK_SECRET=SECRET, **(GRACE | extra))


def outbox_rows(db: Database) -> list[dict[str, Any]]:
    with db.engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(store.outbox).order_by(store.outbox.c.id)).mappings()]


def outbox_ids(db: Database, url: str) -> list[str]:
    """Every event id written for ``url``, in the order it must be delivered."""
    target = outbox.target_id(url)
    return [e["id"] for r in outbox_rows(db) if r["target"] == target for e in json.loads(r["events"])]


def head_state(db: Database) -> dict[str, Any] | None:
    undelivered = [r for r in outbox_rows(db) if r["done_at"] is None]
    return undelivered[0] if undelivered else None


def verify(received: Received, secret: str = SECRET) -> dict[str, Any]:
    """The receiving side's check, as docs/webhooks.md writes it."""
    ts = received.headers["X-Janitor-Timestamp"]
    expected = "sha256=" + hmac.new(secret.encode(), f"{ts}.".encode() + received.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(expected, received.headers["X-Janitor-Signature"])
    assert abs(time.time() - int(ts)) <= 300
    event = json.loads(received.body)
    assert received.headers["Idempotency-Key"] == event["id"]
    assert received.headers["Content-Type"] == "application/cloudevents+json; charset=utf-8"
    assert received.headers["User-Agent"] == f"pve-janitor/{__version__}"
    return event


def audit_ids(db: Database) -> dict[str, int]:
    with db.engine.connect() as conn:
        return {k: i for i, k in conn.execute(sa.select(store.audit.c.id, store.audit.c.row_key))}


# --- what is sent ------------------------------------------------------------------------


def test_a_sweep_sends_each_removal_signed_and_a_restore_after_it(sim, any_db, hooks, deliverers):
    running_apps(sim, any_db)
    for vmid in (101, 103):
        sim.destroy_guest(vmid)
    hook = hooks()
    runtime = hooked(sim, any_db, hook.url)
    result = runtime.sweeper.run()
    assert result.outcome == Outcome.DONE, result.summary()
    assert table_vmids(any_db) == [100, 102, 104]
    audit = audit_ids(any_db)
    with any_db.engine.connect() as conn:
        key_of = {v: str(k) for k, v in conn.execute(sa.select(store.audit.c.row_key, store.audit.c.vmid))}
    restore(runtime.table, audit[key_of[101]], source="cli")

    metrics = Metrics()
    deliverers(runtime, metrics)
    wait_for(lambda: len(hook.accepted()) == 3, what="3 events delivered")
    events = [verify(r) for r in hook.accepted()]
    assert [e["type"] for e in events] == ["pve-janitor.row.removed"] * 2 + ["pve-janitor.row.restored"]
    assert [e["id"] for e in events] == outbox_ids(any_db, hook.url)
    removed = {e["data"]["vmid"]: e for e in events[:2]}
    assert sorted(removed) == [101, 103]
    for vmid, event in removed.items():
        assert event["specversion"] == "1.0"
        assert event["source"] == "/pve-janitor/apps"
        assert event["subject"] == f"apps/{key_of[vmid]}"
        assert event["datacontenttype"] == "application/json"
        assert event["time"].endswith("Z")
        data = event["data"]
        assert data["hostname"] == f"app{vmid}.apps.local"
        assert data["ports"] == {"public_port": 20000 + vmid, "internal_port": 30000 + vmid}
        assert data["status"] == "running"
        assert (data["action"], data["reason"], data["source"]) == ("delete", "ghost", "sweep")
        assert data["audit_id"] == audit[key_of[vmid]]
        assert "row" not in data  # CLEANUP_WEBHOOK_FULL_ROW is off
    restored = events[2]
    assert restored["subject"] == removed[101]["subject"]  # the same row: after its removal
    assert restored["data"]["audit_id"] == audit[key_of[101]] and restored["data"]["hold_id"] is not None
    assert len({e["id"] for e in events}) == 3
    # The outbox says delivered; the metrics count it.
    wait_for(lambda: all(r["done_at"] is not None for r in outbox_rows(any_db)), what="rows marked done")
    assert all(r["delivered"] == r["event_count"] and r["attempts"] == 0 for r in outbox_rows(any_db))
    counted = metrics.webhook_deliveries.labels(target=hook.shown, outcome="delivered")._value.get()
    assert counted == 3
    assert abs(metrics.webhook_last_delivery.labels(target=hook.shown)._value.get() - time.time()) < 30


def test_a_refused_sweep_sends_the_pending_plan_and_the_refusal(sim, sqlite_db, hooks, deliverers):
    running_apps(sim, sqlite_db, vmids=range(100, 120))
    for vmid in range(100, 115):  # 15 of 20 rows: past the 50 % guard
        sim.destroy_guest(vmid)
    hook = hooks()
    runtime = hooked(sim, sqlite_db, hook.url)
    result = runtime.sweeper.run()
    assert result.outcome == Outcome.REFUSED and str(result.refusal) == "guard", result.summary()
    deliverers(runtime)
    wait_for(lambda: len(hook.accepted()) == 2, what="2 events delivered")
    pending, refused = [verify(r) for r in hook.accepted()]
    assert pending["type"] == "pve-janitor.plan.pending"
    assert pending["subject"] == f"pending/{result.pending_id}"
    assert pending["data"]["plan_id"] == result.pending_id
    assert sorted(r["vmid"] for r in pending["data"]["rows_shown"]) == list(range(100, 115))
    assert refused["type"] == "pve-janitor.removal.refused"
    assert refused["data"]["refusal"] == "guard" and refused["data"]["pending_plan"] == result.pending_id
    assert table_vmids(sqlite_db) == list(range(100, 120))  # nothing changed


def test_without_urls_nothing_goes_to_the_outbox(sim, any_db):
    running_apps(sim, any_db)
    sim.destroy_guest(101)
    runtime = make_runtime(sim, any_db, **GRACE)
    assert runtime.sweeper.run().outcome == Outcome.DONE
    assert table_vmids(any_db) == [100, 102, 103, 104]
    assert outbox_rows(any_db) == []
    assert build(runtime.settings, runtime)["deliverer"] is None


def test_serve_builds_a_deliverer_that_follows_the_watcher_s_lease(sim, sqlite_db, hooks):
    hook = hooks()
    runtime = hooked(sim, sqlite_db, hook.url)
    parts = build(runtime.settings, runtime)
    deliverer = parts["deliverer"]
    assert isinstance(deliverer, Deliverer) and [t.label for t in deliverer.targets] == [hook.shown]
    assert deliverer._leader() is False  # no tick yet: the watcher does not hold the lease
    parts["watcher"].tick()
    assert parts["watcher"].leader and deliverer._leader() is True


# --- order, progress, leadership -----------------------------------------------------------


def write_events(runtime: Runtime, count: int, tag: str) -> None:
    events = outbox.Events(runtime.settings)
    for n in range(count):
        events.add(outbox.EventType.ROW_MARKED, f"apps/{tag}-{n}", {"n": n, "tag": tag})
    with runtime.engine.begin() as conn:
        events.write(conn)


def test_order_across_rows_and_progress_written_every_50_events(sim, sqlite_db, hooks, deliverers):
    hook = hooks()
    runtime = hooked(sim, sqlite_db, hook.url)
    write_events(runtime, 120, "a")  # one outbox row
    write_events(runtime, 3, "b")  # the next
    seen: dict[int, int] = {}

    def answer(number: int) -> int:  # the outbox's delivered count while request `number` is in flight
        with sqlite_db.engine.connect() as conn:
            seen[number] = conn.execute(sa.select(store.outbox.c.delivered).order_by(store.outbox.c.id)).first()[0]
        return 200

    hook.answer = answer
    deliverers(runtime)
    wait_for(lambda: len(hook.accepted()) == 123, what="123 events delivered")
    assert hook.accepted_ids() == outbox_ids(sqlite_db, hook.url)
    assert [r.event["data"]["tag"] for r in hook.accepted()] == ["a"] * 120 + ["b"] * 3
    assert [r.event["data"]["n"] for r in hook.accepted()[:120]] == list(range(120))
    # Progress is written every PERSIST_EVERY events, not after each: a crash resends at most that many.
    assert seen[1] == 0 and seen[PERSIST_EVERY] == 0 and seen[PERSIST_EVERY + 1] == PERSIST_EVERY
    assert seen[2 * PERSIST_EVERY + 1] == 2 * PERSIST_EVERY and seen[120] == 2 * PERSIST_EVERY
    wait_for(lambda: all(r["done_at"] is not None for r in outbox_rows(sqlite_db)), what="rows done")


def test_nothing_is_sent_while_another_receiver_leads(sim, sqlite_db, hooks, deliverers):
    hook = hooks()
    runtime = hooked(sim, sqlite_db, hook.url)
    write_events(runtime, 2, "x")
    leading = threading.Event()
    asked = []

    def leader() -> bool:
        asked.append(1)
        return leading.is_set()

    deliverers(runtime, leader=leader)
    wait_for(lambda: len(asked) >= 10, what="the deliverer asking for the lease")
    assert hook.received == []
    leading.set()
    wait_for(lambda: len(hook.accepted()) == 2, what="delivered once leading")


# --- the target misbehaves ----------------------------------------------------------------


def test_a_target_down_then_up_gets_every_event(sim, any_db, hooks, deliverers):
    running_apps(sim, any_db)
    for vmid in (100, 102, 104):
        sim.destroy_guest(vmid)
    hook = hooks(start=False)  # nothing listens on its port yet
    runtime = hooked(sim, any_db, hook.url)
    assert runtime.sweeper.run().outcome == Outcome.DONE
    metrics = Metrics()
    deliverers(runtime, metrics)
    head = wait_for(
        lambda: (h := head_state(any_db)) is not None and h["attempts"] >= 3 and h, what="three failed attempts"
    )
    assert head["last_error"] == "connection failed: refused" and head["delivered"] == 0
    assert head["last_error_at"] is not None
    hook.start()
    wait_for(lambda: len(hook.accepted()) == 3, what="3 events delivered")
    assert hook.accepted_ids() == outbox_ids(any_db, hook.url)
    assert len(hook.received) == 3  # never reached while down: no repeats
    assert metrics.webhook_deliveries.labels(target=hook.shown, outcome="failed")._value.get() >= 3


def test_http_500_is_retried_until_the_target_accepts(sim, sqlite_db, hooks, deliverers):
    hook = hooks()
    hook.status = 500
    runtime = hooked(sim, sqlite_db, hook.url)
    write_events(runtime, 3, "r")
    deliverers(runtime)
    head = wait_for(lambda: (h := head_state(sqlite_db)) is not None and h["attempts"] >= 3 and h, what="3 tries")
    assert head["last_error"] == "HTTP 500" and head["delivered"] == 0
    hook.status = 200
    wait_for(lambda: len(hook.accepted()) == 3, what="3 events delivered")
    ids = outbox_ids(sqlite_db, hook.url)
    assert hook.accepted_ids() == ids
    first = [r.event["id"] for r in hook.received]
    assert first[: head["attempts"]] == [ids[0]] * head["attempts"]  # the same event, retried, nothing skipped
    assert set(first) == set(ids)


def test_a_redirect_is_not_followed(sim, sqlite_db, hooks, deliverers):
    hook = hooks()
    hook.status = 307
    runtime = hooked(sim, sqlite_db, hook.url)
    write_events(runtime, 1, "z")
    deliverers(runtime)
    head = wait_for(lambda: (h := head_state(sqlite_db)) is not None and h["attempts"] >= 2 and h, what="2 tries")
    assert head["last_error"] == "HTTP 307 (redirects are not followed)"
    assert hook.accepted() == []


def test_a_slow_target_does_not_delay_another(sim, sqlite_db, hooks, deliverers):
    slow, fast = hooks(), hooks()
    slow.delay = 2.0  # beyond CLEANUP_WEBHOOK_TIMEOUT_SECONDS
    runtime = hooked(sim, sqlite_db, slow.url, fast.url, CLEANUP_WEBHOOK_TIMEOUT_SECONDS=0.5)
    write_events(runtime, 5, "s")
    started = time.monotonic()
    deliverers(runtime)
    wait_for(lambda: len(fast.accepted()) == 5, timeout=3, what="the healthy target served")
    fast_took = time.monotonic() - started
    assert fast_took < 1.5, fast_took  # while the slow one times out (0.5 s per try)
    assert slow.accepted() == []
    slow_target = outbox.target_id(slow.url)
    head = wait_for(
        lambda: next((r for r in outbox_rows(sqlite_db) if r["target"] == slow_target and r["attempts"] >= 2), None),
        what="the slow target's failed tries",
    )
    assert head["last_error"] == "timeout after 0.5 s"
    slow.delay = 0.0
    wait_for(lambda: len(slow.accepted()) == 5, what="the slow target served once fast again")
    assert slow.accepted_ids() == fast.accepted_ids() == outbox_ids(sqlite_db, fast.url)


def test_an_untrusted_certificate_fails_with_tls_until_the_ca_is_configured(sim, sqlite_db, hooks, tmp_path):
    ca = trustme.CA()
    hook = hooks(ca=ca)
    runtime = hooked(sim, sqlite_db, hook.url)
    write_events(runtime, 2, "t")
    untrusting = Deliverer(runtime.engine, runtime.settings, **FAST).start()
    try:
        head = wait_for(lambda: (h := head_state(sqlite_db)) is not None and h["attempts"] >= 2 and h, what="tries")
    finally:
        untrusting.stop(10)
    assert head["last_error"].startswith("TLS: certificate verify failed"), head["last_error"]
    assert hook.received == []  # the handshake failed: no request was ever made
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    trusting = make_runtime(
        sim,
        sqlite_db,
        CLEANUP_WEBHOOK_URLS=hook.url,
        CLEANUP_WEBHOOK_SECRET=SECRET,
        CLEANUP_WEBHOOK_VERIFY_SSL=str(ca_file),
    )
    deliverer = Deliverer(trusting.engine, trusting.settings, **FAST).start()
    try:
        wait_for(lambda: len(hook.accepted()) == 2, what="delivered over TLS with the CA file")
    finally:
        deliverer.stop(10)
    assert hook.accepted_ids() == outbox_ids(sqlite_db, hook.url)
    assert verify(hook.accepted()[0])["type"] == "pve-janitor.row.marked"


def test_the_database_going_away_does_not_kill_the_thread(sim, sqlite_db, hooks, deliverers, caplog):
    hook = hooks()
    runtime = hooked(sim, sqlite_db, hook.url)
    write_events(runtime, 1, "d")
    with sqlite_db.engine.begin() as conn:  # the table gone: every query fails, as with a database down
        conn.exec_driver_sql("ALTER TABLE janitor_outbox RENAME TO janitor_outbox_away")
    caplog.set_level(logging.WARNING, logger="receiver.webhooks")
    deliverer = deliverers(runtime, db_backoff_max=0.1)

    def database_errors() -> int:
        return sum("database error" in r.getMessage() for r in caplog.records if r.name == "receiver.webhooks")

    wait_for(lambda: database_errors() >= 3, what="three database errors logged")
    assert deliverer.alive()
    assert SECRET not in caplog.text and QUERY_TOKEN not in caplog.text
    with sqlite_db.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE janitor_outbox_away RENAME TO janitor_outbox")
    wait_for(lambda: len(hook.accepted()) == 1, what="delivered once the table is back")


# --- pieces --------------------------------------------------------------------------------


def test_backoff_doubles_from_the_floor_to_the_ceiling_with_at_most_a_quarter_off():
    assert [backoff_seconds(n, 1, 300, rand=lambda: 0.0) for n in (1, 2, 3, 9, 10, 50)] == [1, 2, 4, 256, 300, 300]
    assert backoff_seconds(1, 1, 300, rand=lambda: 1.0) == 0.75
    assert backoff_seconds(12, 1, 300, rand=lambda: 1.0) == 225


def test_failures_are_told_without_the_url():
    port = free_port()
    url = f"http://user:{PASSWORD}@127.0.0.1:{port}/x?token={QUERY_TOKEN}"
    with pytest.raises(requests.RequestException) as refused:
        requests.post(url, timeout=2)
    assert failure_text(refused.value, 2) == "connection failed: refused"
    assert QUERY_TOKEN in str(refused.value)  # what requests says would leak it
    with pytest.raises(requests.RequestException) as unknown:
        requests.post(f"http://no-such-host.invalid/x?token={QUERY_TOKEN}", timeout=2)
    assert failure_text(unknown.value, 2) == "connection failed: name not resolved"


def test_urls_shown_alike_get_their_own_label():
    one, two = "https://h.example/hook?token=a", "https://h.example/hook?token=b"
    labels = outbox.target_labels([one, two, "http://other.example/x"])
    assert labels[outbox.target_id("http://other.example/x")] == "http://other.example/x"
    assert labels[outbox.target_id(one)] != labels[outbox.target_id(two)]
    assert all(label.startswith("https://h.example/hook?… [") for label in list(labels.values())[:2])


# --- what users see: the command, the stats, the metrics -------------------------------------


def test_pve_janitor_webhooks_shows_backlog_and_errors_and_never_a_secret(sim, sqlite_db, hooks, tmp_path):
    hook = hooks()
    hook.status = 500
    runtime = hooked(sim, sqlite_db, hook.url)
    write_events(runtime, 4, "c")
    deliverer = Deliverer(runtime.engine, runtime.settings, **FAST).start()
    try:
        wait_for(lambda: (h := head_state(sqlite_db)) is not None and h["attempts"] >= 2, what="failed tries")
    finally:
        deliverer.stop(10)
    env = janitor_env(sim, sqlite_db, CLEANUP_WEBHOOK_URLS=hook.url, CLEANUP_WEBHOOK_SECRET=SECRET)
    shown = run_cli(["webhooks"], env)
    assert shown.code == 0, shown.err
    assert hook.shown in shown.out and "HTTP 500" in shown.out
    assert "1 URL(s), 4 event(s) not yet delivered." in shown.out
    as_json = run_cli(["webhooks", "--json"], env)
    assert as_json.code == 0, as_json.err
    found = as_json.json()
    assert found["urls"] == 1 and found["backlog"] == 4 and found["orphaned"] == 0
    (target,) = found["targets"]
    assert target["url"] == hook.shown and target["undelivered"] == 4 and target["attempts"] >= 2
    assert target["last_error"] == "HTTP 500" and target["oldest"] and target["oldest_age_s"] >= 0
    # The URL removed from the settings: its events are counted apart.
    other = dict(env, CLEANUP_WEBHOOK_URLS="https://elsewhere.example/hook")
    moved = run_cli(["webhooks"], other)
    assert moved.code == 0 and "4 event(s) not delivered for URLs no longer in CLEANUP_WEBHOOK_URLS" in moved.out
    for result in (shown, as_json, moved):
        for secret in (SECRET, QUERY_TOKEN, PASSWORD):
            assert secret not in result.out + result.err


def test_pve_janitor_webhooks_refuses_tables_behind(sim, tmp_path):
    from conftest import _sqlite_database

    db = next(_sqlite_database(tmp_path, migrated=False))
    result = run_cli(["webhooks"], janitor_env(sim, db))
    assert result.code == 3 and "pve-janitor db upgrade" in result.err


def test_stats_and_metrics_show_the_backlog(sim, sqlite_db, hooks):
    hook = hooks(start=False)
    runtime = hooked(sim, sqlite_db, hook.url)
    write_events(runtime, 3, "m")
    with sqlite_db.engine.begin() as conn:
        conn.execute(store.outbox.update().values(attempts=2, last_error="HTTP 502", last_error_at=sa.func.now()))
    metrics = Metrics()
    Deliverer(runtime.engine, runtime.settings, metrics)  # pre-creates the series; not started
    client = create_app(runtime.settings, runtime=runtime, metrics=metrics).test_client()
    stats = client.get("/api/v1/system/cleanup/stats").get_json()["webhooks"]
    assert stats["urls"] == 1 and stats["backlog"] == 3
    (target,) = stats["targets"]
    assert target["url"] == hook.shown and target["undelivered"] == 3 and target["last_error"] == "HTTP 502"
    assert target["oldest"] and target["last_error_at"]
    text = client.get("/metrics").get_data(as_text=True)
    label = f'target="{hook.shown}"'
    assert f"pve_janitor_webhook_backlog{{{label}}} 3.0" in text
    assert f'pve_janitor_webhook_deliveries_total{{outcome="failed",{label}}} 0.0' in text
    assert f"pve_janitor_webhook_last_delivery_timestamp_seconds{{{label}}} 0.0" in text
    assert QUERY_TOKEN not in text and PASSWORD not in text


def test_stats_without_urls(sim, sqlite_db):
    runtime = hooked(sim, sqlite_db)
    assert runtime.settings.webhook_urls == ()
    stats = create_app(runtime.settings, runtime=runtime).test_client().get("/api/v1/system/cleanup/stats")
    assert stats.get_json()["webhooks"] == {"urls": 0, "backlog": 0, "targets": []}


def test_full_row_adds_every_column(sim, sqlite_db, hooks, deliverers):
    running_apps(sim, sqlite_db)
    sim.destroy_guest(102)
    hook = hooks()
    runtime = hooked(sim, sqlite_db, hook.url, CLEANUP_WEBHOOK_FULL_ROW="true")
    assert runtime.sweeper.run().outcome == Outcome.DONE
    deliverers(runtime)
    (received,) = wait_for(lambda: hook.accepted(), what="delivered")
    row = verify(received)["data"]["row"]
    assert row["lxc_id"] == 102 and row["hostname"] == "app102.apps.local"
