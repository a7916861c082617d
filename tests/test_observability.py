"""Logs and signals: JSON logs, rejected events in the log and the metrics, the shipped alert
rules and Grafana dashboard held to what a real receiver exports."""

from __future__ import annotations

import json
import logging
import re
import secrets
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import janitor_env, make_runtime
from prometheus_client.parser import text_string_to_metric_families

from receiver import __version__
from receiver.api_events import REJECTION_LOG_PERIOD_S, rejection_reason
from receiver.app import create_app
from receiver.config import ConfigError, load_settings
from receiver.events import EventRejected, parse_event, signature, verify_signature
from receiver.model import Rejection
from receiver.simulator import launch
from receiver.simulator.launch import free_port
from receiver.simulator.scene import seed_database

DOCS = Path(__file__).resolve().parent.parent / "docs"
ALERTS, DASHBOARD = DOCS / "alerts.yml", DOCS / "grafana-dashboard.json"
EVENTS, RUN = "/api/v1/events", "/api/v1/system/cleanup/run"
HOOK_SECRET = "hook-secret-5d1e8a0c4f"
NO_PROMTOOL = "promtool is not installed (Debian: apt-get install prometheus; .ci/run installs it)"
# Series Prometheus makes itself for every scrape target, not the receiver.
SCRAPE_SERIES = {"up"}
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}


# --- the metric names a PromQL expression reads ------------------------------------------


def metric_names(expr: str) -> set[str]:
    """Every metric an expression selects: identifiers outside strings, label matchers, ranges
    and grouping clauses that are neither functions, aggregations nor keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    found = set()
    for match in re.finditer(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", text):
        name, call = match.group(1), match.group(2)
        if not call and name not in _KEYWORDS:
            found.add(name)
    return found


def alert_exprs() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_the_name_extraction_sees_metrics_and_nothing_else():
    expr = (
        'histogram_quantile(0.95, sum by (le, outcome) (rate(pve_janitor_x_bucket{job="a b", kind=~"c(d)"}'
        "[$__rate_interval]))) > 2 * max(pve_janitor_y) or time() - pve_janitor_z offset 5m > bool 1e3"
    )
    assert metric_names(expr) == {"pve_janitor_x_bucket", "pve_janitor_y", "pve_janitor_z"}
    assert metric_names('up{job="pve-janitor"} == 0') == {"up"}


def test_every_rule_and_panel_has_a_query():
    assert len(alert_exprs()) >= 5 and all(metric_names(e) for e in alert_exprs())
    assert len(dashboard_exprs()) >= 10 and all(metric_names(e) for e in dashboard_exprs())


@pytest.mark.skipif(shutil.which("promtool") is None, reason=NO_PROMTOOL)
def test_the_alert_rules_pass_promtool():
    proc = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(alert_exprs())} rules found" in proc.stdout


def test_the_alert_rules_name_what_the_issue_asks_for():
    names = {r["alert"] for g in yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"] for r in g["rules"]}
    wanted = {
        "PveJanitorDown",
        "PveJanitorNoSuccessfulSweep",
        "PveJanitorRefusals",
        "PveJanitorRejectedEvents",
        "PveJanitorWatcherStalled",
    }
    assert wanted <= names


# --- a real receiver: what it exports, what it logs --------------------------------------


def _post(base: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(base + path, data=body, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as err:
        return err.code


def _event(event_id: str, node: str = "pve1") -> bytes:
    return json.dumps({"event_id": event_id, "vmid": 120, "phase": "post-stop", "node": node}).encode()


def _signed(body: bytes, secret: str) -> dict[str, str]:
    ts = int(time.time())
    return {
        "Content-Type": "application/json",
        "X-Janitor-Timestamp": str(ts),
        "X-Janitor-Signature": signature(secret, ts, body),
    }


def exported(metrics_text: str) -> tuple[set[str], set[str]]:
    """(names a query may select, names with at least one sample) in a ``/metrics`` answer.

    A family with no sample yet (a labelled counter nothing has counted) still has its
    ``# TYPE`` line: its sample names follow from its type.
    """
    selectable: set[str] = set()
    sampled: set[str] = set()
    for family in text_string_to_metric_families(metrics_text):
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(family.type, [""])
        selectable.update(family.name + s for s in suffixes)
        sampled.update(s.name for s in family.samples)
    return selectable, sampled


@pytest.fixture
def served(seed_sim, sqlite_db, tmp_path):
    """``pve-janitor serve`` on the seed scene, logging JSON; after a refused sweep (the seed
    trips the guard), a forced one, an accepted event and three with a wrong signature."""
    seed_database(sqlite_db.engine)
    admin = secrets.token_hex(16)
    port = free_port()
    env = janitor_env(
        seed_sim,
        sqlite_db,
        CLEANUP_HOOK_SECRET=HOOK_SECRET,
        CLEANUP_ADMIN_TOKEN=admin,
        CLEANUP_BIND=f"127.0.0.1:{port}",
        CLEANUP_LOG_FORMAT="json",
    )
    with launch.serving(env, tmp_path / "receiver.log", timeout=30) as receiver:
        base = receiver.base
        deadline = time.monotonic() + 20
        while "pve_janitor_sweeps_total{" not in _get(base, "/metrics"):  # the sweep at start
            assert time.monotonic() < deadline, "no sweep within 20 s of the start"
            time.sleep(0.1)
        assert _post(base, RUN + "?force=true&dry_run=false", headers={"Authorization": f"Bearer {admin}"}) == 200
        body = _event("ev-accepted")
        assert _post(base, EVENTS, body, _signed(body, HOOK_SECRET)) == 202
        for n in range(3):
            body = _event(f"ev-forged-{n}", node="pve2")
            assert _post(base, EVENTS, body, _signed(body, "not-the-secret")) == 401
        yield receiver, _get(base, "/metrics")


def _get(base: str, path: str) -> str:
    with urllib.request.urlopen(base + path, timeout=10) as answer:
        return answer.read().decode()


def test_every_metric_the_alerts_and_the_dashboard_name_is_exported(served):
    _, metrics_text = served
    selectable, sampled = exported(metrics_text)
    for source, exprs in (("docs/alerts.yml", alert_exprs()), ("docs/grafana-dashboard.json", dashboard_exprs())):
        for expr in exprs:
            unknown = metric_names(expr) - selectable - SCRAPE_SERIES
            assert not unknown, f"{source}: {expr!r} names {sorted(unknown)}, which the receiver does not export"
    # What the traffic above produced has samples, not only a declaration.
    for name in (
        "pve_janitor_build_info",
        "pve_janitor_sweeps_total",
        "pve_janitor_sweep_duration_seconds_bucket",
        "pve_janitor_sweep_interval_seconds",
        "pve_janitor_last_successful_sweep_timestamp_seconds",
        "pve_janitor_refusals_total",
        "pve_janitor_rows_removed_total",
        "pve_janitor_events_total",
        "pve_janitor_events_rejected_total",
        "pve_janitor_inventory_read_seconds_bucket",
        "pve_janitor_watcher_up",
        "pve_janitor_watcher_last_tick_timestamp_seconds",
    ):
        assert name in sampled, name


def test_the_real_receiver_exports_the_new_signals_without_created_noise(served):
    _, metrics_text = served
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics_text)
        for s in family.samples
    }
    assert values[("pve_janitor_build_info", (("version", __version__),))] == 1
    assert values[("pve_janitor_events_rejected_total", (("reason", "signature"),))] == 3
    assert values[("pve_janitor_events_rejected_total", (("reason", "timestamp"),))] == 0  # declared at 0
    assert values[("pve_janitor_refusals_total", (("reason", "guard"), ("source", "sweep")))] >= 1
    assert values[("pve_janitor_sweep_interval_seconds", ())] == 60 * 60
    assert values[("pve_janitor_sweep_duration_seconds_count", ())] >= 2  # the refused one and the forced one
    assert values[("pve_janitor_watcher_up", ())] == 1
    assert abs(time.time() - values[("pve_janitor_watcher_last_tick_timestamp_seconds", ())]) < 30
    assert abs(time.time() - values[("pve_janitor_last_successful_sweep_timestamp_seconds", ())]) < 60
    assert "_created" not in metrics_text


def test_the_real_receiver_logs_json_and_one_warning_for_three_forged_events(served):
    receiver, _ = served
    lines = [line for line in receiver.log_text().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert entries and all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    rejected = [e for e in entries if e["message"].startswith("event rejected")]
    assert len(rejected) == 1, rejected  # three alike from one address within a minute: one line
    assert rejected[0]["level"] == "WARNING" and rejected[0]["logger"] == "receiver.api_events"
    assert rejected[0]["message"] == "event rejected from 127.0.0.1 (node pve2, unsigned): 401 bad signature"
    assert HOOK_SECRET not in receiver.log_text()


# --- rejected events, in the app ---------------------------------------------------------


@pytest.fixture
def app(seed_sim, sqlite_db):
    seed_database(sqlite_db.engine)
    runtime = make_runtime(seed_sim, sqlite_db, CLEANUP_HOOK_SECRET=HOOK_SECRET)
    return create_app(runtime.settings, runtime=runtime)


def _rejections(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "receiver.api_events" and "event rejected" in r.getMessage()]


def test_rejections_are_warnings_with_address_and_node_one_per_address_and_reason(app, caplog):
    client = app.test_client()
    caplog.set_level(logging.INFO, logger="receiver.api_events")
    forged = _event("ev-1", node="pve7")
    headers = _signed(forged, "wrong-secret-123")
    for _ in range(3):
        assert client.post(EVENTS, data=forged, headers=headers).status_code == 401
    stale = _signed(forged, HOOK_SECRET) | {"X-Janitor-Timestamp": "1000"}
    stale["X-Janitor-Signature"] = signature(HOOK_SECRET, 1000, forged)
    assert client.post(EVENTS, data=forged, headers=stale).status_code == 401
    malformed = b'{"event_id": "ev-2", "vmid": "x", "phase": "post-stop", "node": "pve3"}'
    assert client.post(EVENTS, data=malformed, headers=_signed(malformed, HOOK_SECRET)).status_code == 400
    unparsable = b"not json"
    assert client.post(EVENTS, data=unparsable, headers=_signed(unparsable, "wrong-secret-123")).status_code == 401

    records = _rejections(caplog)
    assert all(r.levelno == logging.WARNING for r in records)
    assert [r.getMessage() for r in records] == [
        "event rejected from 127.0.0.1 (node pve7, unsigned): 401 bad signature",
        "event rejected from 127.0.0.1 (node pve7, unsigned): 401 stale or future timestamp",
        "event rejected from 127.0.0.1 (node pve3): 400 vmid must be an integer",
    ]  # the second and third forged ones, and the unparsable one (same address, same reason), left out
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert HOOK_SECRET not in text and headers["X-Janitor-Signature"][7:] not in text
    metrics = app.extensions["janitor"].metrics.registry
    assert metrics.get_sample_value("pve_janitor_events_rejected_total", {"reason": "signature"}) == 4
    assert metrics.get_sample_value("pve_janitor_events_rejected_total", {"reason": "timestamp"}) == 1
    assert metrics.get_sample_value("pve_janitor_events_rejected_total", {"reason": "malformed"}) == 1


def test_a_rejection_after_the_period_says_how_many_were_left_out(app, caplog):
    client = app.test_client()
    caplog.set_level(logging.WARNING, logger="receiver.api_events")
    body = b"{}"
    throttle_clock = [0.0]
    from receiver.logs import Throttle

    app.extensions["pve_janitor.rejections"] = Throttle(REJECTION_LOG_PERIOD_S, clock=lambda: throttle_clock[0])
    for _ in range(4):
        client.post(EVENTS, data=body, headers={"Content-Type": "application/json"})
    throttle_clock[0] = REJECTION_LOG_PERIOD_S
    client.post(EVENTS, data=body, headers={"Content-Type": "application/json"})
    messages = [r.getMessage() for r in _rejections(caplog)]
    assert messages == [
        "event rejected from 127.0.0.1 (node unknown): 401 missing X-Janitor-Timestamp header",
        "event rejected from 127.0.0.1 (node unknown): 401 missing X-Janitor-Timestamp header"
        " (3 more like it from this address since the last such line)",
    ]


def _rejected(fn, *args) -> EventRejected:
    with pytest.raises(EventRejected) as err:
        fn(*args)
    return err.value


NOW = 1_718_000_000.0


@pytest.mark.parametrize(
    ("rejection", "reason"),
    [
        (lambda: _rejected(verify_signature, "", "1", "x", b"", NOW), Rejection.NOT_CONFIGURED),
        (lambda: EventRejected(413, "body larger than 65536 bytes"), Rejection.TOO_LARGE),
        (lambda: _rejected(verify_signature, "s3cret", None, "x", b"", NOW), Rejection.HEADERS),
        (lambda: _rejected(verify_signature, "s3cret", "1", None, b"", NOW), Rejection.HEADERS),
        (lambda: _rejected(verify_signature, "s3cret", "abc", "sha256=" + "0" * 64, b"", NOW), Rejection.HEADERS),
        (lambda: _rejected(verify_signature, "s3cret", "1", "sha1=00", b"", NOW), Rejection.HEADERS),
        (lambda: _rejected(verify_signature, "s3cret", "1", signature("other", 1, b""), b"", NOW), Rejection.SIGNATURE),
        (
            lambda: _rejected(verify_signature, "s3cret", "1", signature("s3cret", 1, b""), b"", NOW),
            Rejection.TIMESTAMP,
        ),
        (lambda: EventRejected(415, "Content-Type must be application/json"), Rejection.CONTENT_TYPE),
        (lambda: _rejected(parse_event, b"[]", NOW), Rejection.MALFORMED),
    ],
)
def test_each_rejection_has_its_reason(rejection, reason):
    assert rejection_reason(rejection()) == reason


# --- the setting -------------------------------------------------------------------------


def test_log_format_is_text_by_default_json_on_request_and_nothing_else():
    assert load_settings(env={}).log_format == "text"
    assert load_settings(env={"CLEANUP_LOG_FORMAT": " JSON "}).log_format == "json"
    with pytest.raises(ConfigError) as err:
        load_settings(env={"CLEANUP_LOG_FORMAT": "xml"})
    assert err.value.problems == ["CLEANUP_LOG_FORMAT='xml' must be 'text' or 'json'"]
