"""Bad input: the HTTP API under schemathesis, the parsers under hypothesis, the hookscript
under garbage.  The contract under test: no 5xx and no non-JSON answer from the receiver;
only ConfigError / EventRejected from the parsers; exit 0, in time and without a traceback,
from the hookscript.  ``make test`` runs the short versions, ``make reliability`` the long ones.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import math
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
import sqlalchemy as sa
from apscheduler.triggers.interval import IntervalTrigger
from conftest import ROOT
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from receiver import store
from receiver.config import SECRET_VARIABLES, VARIABLES, ConfigError, Settings, load_settings
from receiver.events import MAX_BODY_BYTES, MAX_TS, EventRejected, parse_event, signature, verify_signature
from receiver.model import PHASES, Event, Inventory
from receiver.plan import make_plan
from receiver.simulator.scene import app_row
from receiver.timeutil import utcnow

from .support_io import HOOK, LONG, Serve, record, seed_guests_and_rows, table_rows, wait_until

OPENAPI = ROOT / "docs" / "openapi.yaml"
API_REQUESTS = 10_000 if LONG else 1_000
PARSER_EXAMPLES = 3_000 if LONG else 300
HOOK_GARBAGE_RUNS = 20 if LONG else 1  # per (config, spool) case, after two valid runs
NO_DEADLINE: dict[str, Any] = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck))


# =====================================================================================
# The HTTP API: schemathesis against a running `pve-janitor serve`
# =====================================================================================

RUNNING = tuple(range(100, 106))  # guests that exist: their rows must survive anything
GHOSTS = (120, 121, 122)  # rows whose guests are gone: a real sweep may remove them
# Share of the generated requests per operation: events and the guarded sweep are where the risk is.
SHARES = {
    "POST /api/v1/events": 0.5,
    "POST /api/v1/system/cleanup/run": 0.18,
    "GET /api/v1/system/cleanup/history": 0.13,
    # Pending plans and holds (admin token): approvals and holds must not remove a running guest's row.
    "GET /api/v1/system/cleanup/pending": 0.01,
    "GET /api/v1/system/cleanup/pending/{plan_id}": 0.01,
    "POST /api/v1/system/cleanup/pending/{plan_id}/approve": 0.02,
    "POST /api/v1/system/cleanup/pending/{plan_id}/reject": 0.01,
    "GET /api/v1/system/cleanup/holds": 0.01,
    "POST /api/v1/system/cleanup/holds": 0.02,
    "DELETE /api/v1/system/cleanup/holds/{hold_id}": 0.01,
    # Allocations (allocator or admin token): they reserve, never remove.
    "POST /api/v1/allocations": 0.02,
    "GET /api/v1/allocations": 0.01,
    "DELETE /api/v1/allocations/{reservation_id}": 0.01,
    "GET /api/v1/system/cleanup/stats": 0.025,
    "GET /": 0.025,
    "GET /healthz": 0.025,
    "GET /metrics": 0.025,
}
CHECKS = [status_code_conformance, content_type_conformance, response_schema_conformance, response_headers_conformance]


def generate_cases(schema, total: int) -> list:
    """About ``total`` cases, positive and negative, shared out by SHARES.

    Each operation's cases come from its own hypothesis run, so they are distinct; an
    operation with nothing to vary (GET /healthz) yields one case, sent repeatedly.
    """
    cases = []
    for result in schema.get_all_operations():
        op = result.ok()
        want = max(1, round(total * SHARES[op.label]))
        modes = [GenerationMode.POSITIVE]
        if list(op.iter_parameters()) or op.body:
            modes.append(GenerationMode.NEGATIVE)
        found = []
        for mode in modes:
            found.extend(_collect(op.as_strategy(generation_mode=mode), -(-want // len(modes))))
        cases.extend((found * (-(-want // len(found))))[:want])
    assert {c.operation.label for c in cases} == set(SHARES), "docs/openapi.yaml and SHARES disagree"
    return cases


def _collect(strategy, n: int) -> list:
    found = []

    @hsettings(max_examples=n, phases=[Phase.generate], **NO_DEADLINE)
    @given(strategy)
    def collect(case):
        found.append(case)

    collect()
    return found


class ApiFuzz:
    """Sends generated requests, counts them, and keeps every broken answer."""

    def __init__(self, receiver: Serve, seed: int = 0):
        self.receiver = receiver
        self.rng = random.Random(seed)
        self.session = requests.Session()
        self.sent: Counter[str] = Counter()  # by operation label
        self.statuses: Counter[tuple[str, int]] = Counter()  # by (label, status)
        self.variants: Counter[str] = Counter()  # how events were signed and sweeps authorized
        self.unsendable = 0  # generated requests the HTTP client refused to send (bad headers)
        self.failures: list[str] = []

    def send(self, case) -> None:
        label = case.operation.label
        kwargs = case.as_transport_kwargs(base_url=self.receiver.base)
        kwargs["headers"] = dict(kwargs.get("headers") or {})
        kwargs["headers"].pop("X-Schemathesis-TestCaseId", None)
        if label == "POST /api/v1/events":
            self._sign(kwargs)
        elif label == "POST /api/v1/system/cleanup/run":
            self._authorize(kwargs, "run", dry_run=True)
        elif "/cleanup/pending" in label or "/cleanup/holds" in label or "/api/v1/allocations" in label:
            self._authorize(kwargs, "admin")
        try:
            response = self.session.request(timeout=30, allow_redirects=False, **kwargs)
        except (requests.exceptions.InvalidHeader, requests.exceptions.InvalidURL, UnicodeError, ValueError):
            self.unsendable += 1  # refused by the client before anything was sent
            return
        except requests.RequestException as exc:
            self.failures.append(f"{label}: no answer: {type(exc).__name__}: {exc}")
            return
        self.sent[label] += 1
        self.statuses[(label, response.status_code)] += 1
        self._check(label, case, kwargs, response)

    def _sign(self, kwargs) -> None:
        """Sign most events, so that generated bodies get past the signature to the parser."""
        how = self.rng.choices(["as generated", "signed", "stale", "wrong secret"], [2, 6, 1, 1])[0]
        self.variants[f"event {how}"] += 1
        if how == "as generated":
            return
        if "json" in kwargs:
            body = json.dumps(kwargs.pop("json")).encode()
            kwargs["headers"].setdefault("Content-Type", "application/json")
        else:
            raw = kwargs.pop("data", b"") or b""
            body = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
        ts = int(time.time()) - (1000 if how == "stale" else 0)
        secret = "not-the-secret" if how == "wrong secret" else self.receiver.secret
        kwargs["data"] = body
        kwargs["headers"]["X-Janitor-Timestamp"] = str(ts)
        kwargs["headers"]["X-Janitor-Signature"] = signature(secret, ts, body)

    def _authorize(self, kwargs, what: str, dry_run: bool = False) -> None:
        """The right token most of the time; for sweeps, then nine times in ten a dry run, so they
        stay cheap."""
        how = self.rng.choices(["as generated", "none", "wrong", "right"], [3, 2, 3, 12])[0]
        if how == "none":
            kwargs["headers"].pop("Authorization", None)
        elif how == "wrong":
            kwargs["headers"]["Authorization"] = "Bearer " + "0" * 32
        elif how == "right":
            kwargs["headers"]["Authorization"] = f"Bearer {self.receiver.admin}"
            params = kwargs.get("params")
            if dry_run and isinstance(params, dict) and self.rng.random() < 0.9:
                params["dry_run"] = "true"
                how = "right, dry run"
        self.variants[f"{what} {how}"] += 1

    def _check(self, label, case, kwargs, response) -> None:
        where = f"{label} -> {response.status_code} (request {kwargs.get('params')!r}, {kwargs['headers']!r})"
        if response.status_code >= 500:
            self.failures.append(f"5xx: {where}: {response.text[:300]}")
        content_type = response.headers.get("Content-Type", "")
        if label == "GET /metrics" and response.status_code == 200:
            if not content_type.startswith("text/plain"):
                self.failures.append(f"metrics not Prometheus text: {where}: {content_type}")
        elif content_type != "application/json":
            self.failures.append(f"not JSON: {where}: Content-Type {content_type!r}")
        else:
            try:
                json.loads(response.content)
            except ValueError:
                self.failures.append(f"body is not JSON: {where}: {response.text[:200]!r}")
        try:
            case.validate_response(response, checks=CHECKS)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - schemathesis' Failure, or a FailureGroup of them
            found = getattr(exc, "exceptions", None) or [exc]
            self.failures.append(f"does not match docs/openapi.yaml: {where}: {[str(e)[:300] for e in found]}")


@pytest.mark.slow
def test_generated_requests_never_get_a_5xx_or_a_non_json_answer(sim, sqlite_db, tmp_path):
    seed_guests_and_rows(sqlite_db, sim, RUNNING)
    _add_ghost_rows(sqlite_db)
    before = table_rows(sqlite_db)
    receiver = Serve(sim, sqlite_db, tmp_path).start()
    fuzz = ApiFuzz(receiver)
    try:
        schema = schemathesis.openapi.from_path(str(OPENAPI))
        started = time.monotonic()
        cases = generate_cases(schema, API_REQUESTS + API_REQUESTS // 20)
        generated = time.monotonic() - started
        fuzz.rng.shuffle(cases)
        for case in cases:
            fuzz.send(case)
        elapsed = time.monotonic() - started
        sent = sum(fuzz.sent.values())
        print(
            f"\nschemathesis: {len(cases)} cases generated in {generated:.1f} s; {sent} requests sent "
            f"({fuzz.unsendable} refused by the client) in {elapsed:.1f} s; "
            f"{sum(n for (_, s), n in fuzz.statuses.items() if s >= 500)} answered 5xx"
        )
        for label in SHARES:
            codes = {s: n for (shown, s), n in sorted(fuzz.statuses.items()) if shown == label}
            print(f"  {label}: {fuzz.sent[label]} sent, statuses {codes}")
        print(f"  variants: {dict(sorted(fuzz.variants.items()))}")
        record(
            "api_fuzz",
            requests=sent,
            server_errors=sum(n for (_, s), n in fuzz.statuses.items() if s >= 500),
            failures=len(fuzz.failures),
            seconds=round(elapsed, 1),
            statuses={f"{shown} {s}": n for (shown, s), n in sorted(fuzz.statuses.items())},
        )
        assert not fuzz.failures, "\n".join(fuzz.failures[:20])
        assert sent >= API_REQUESTS
        assert all(fuzz.sent[label] > 0 for label in SHARES)
        # The fuzz got past the checks: events accepted and parsed, sweeps run for real.
        assert fuzz.statuses[("POST /api/v1/events", 202)] > 0
        assert fuzz.statuses[("POST /api/v1/events", 400)] > 0
        assert fuzz.variants["run right"] > 0 and fuzz.statuses[("POST /api/v1/system/cleanup/run", 200)] > 0

        # The state stayed sane: only ghost rows may have gone, each exactly once, audited.
        wait_until(lambda: receiver.stats()["inbox_backlog"] == 0, 30, what="inbox drained")
        after = table_rows(sqlite_db)
        gone = {before[k]["lxc_id"] for k in set(before) - set(after)}
        assert gone <= set(GHOSTS)
        assert {row["lxc_id"] for row in after.values()} >= set(RUNNING)
        stats = receiver.stats()
        with sqlite_db.engine.connect() as conn:
            audited = conn.execute(sa.select(store.audit.c.vmid)).scalars().all()
        assert sorted(audited) == sorted(gone)
        assert stats["total_removed"] == len(audited) == stats["ghost_apps_removed"]
        assert receiver.get("/healthz").status == 200
        assert "Traceback" not in receiver.log_text()
    finally:
        receiver.close()
        fuzz.session.close()


def _add_ghost_rows(db) -> None:
    with db.engine.begin() as conn:
        table = sa.Table("apps", sa.MetaData(), autoload_with=conn)
        conn.execute(table.insert(), [app_row(v, "error", age=timedelta(days=2)) for v in GHOSTS])


# =====================================================================================
# The settings parser: arbitrary environments and TOML files
# =====================================================================================

NAMED = set(VARIABLES) | {"CLEANUP_CONFIG"}
env_text = st.text(max_size=40) | st.binary(max_size=30).map(lambda b: b.decode("utf-8", "surrogateescape"))
env_numbers = st.one_of(
    st.integers(-(10**40), 10**40).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        [
            "1e400",
            "-1e400",
            "nan",
            "-inf",
            "9" * 5000,
            " 12 ",
            "0x10",
            "1_000",
            "١٢",
            "+5",
            "-0",
            "1.5",
            "",
            "  ",
            "99999999",
            "999999999999",
            "1e300",
            "3600.0001",
            "86401",
        ]
    ),
)
env_values = env_text | env_numbers


def toml_value(value) -> str:
    """A TOML literal for a Python value (enough of TOML for the fuzz)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        escaped = "".join(
            f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else "\\" + c if c in '"\\' else c for c in value
        )
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_value(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    return value.isoformat()  # dates and times


toml_scalars = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(),
    st.booleans(),
    st.text(max_size=30),
    st.datetimes(),
    st.dates(),
    st.times(),
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(min_size=1, max_size=5), inner, max_size=3),
    max_leaves=6,
)
toml_keys = st.sampled_from(VARIABLES).map(lambda k: k if len(k) % 2 else k.lower()) | st.from_regex(
    r"[A-Za-z_][A-Za-z0-9_]{0,15}", fullmatch=True
)
toml_documents = (
    st.dictionaries(toml_keys, toml_values, max_size=6).map(
        lambda d: "".join(f"{k} = {toml_value(v)}\n" for k, v in d.items()).encode()
    )
    | st.binary(max_size=300)
    | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass"))
)


def _usable(s: Settings) -> None:
    """What serve, the sweep and the watcher compute from the settings must not blow up."""
    now = utcnow()
    make_plan([], Inventory.of([]), now, s)  # grace and retention windows
    now + timedelta(seconds=s.watch_seconds)
    now + timedelta(seconds=s.lease_seconds)
    IntervalTrigger(minutes=s.interval_minutes, timezone="UTC").get_next_fire_time(now, now)
    for seconds in (s.watch_interval_seconds, s.task_poll_seconds, s.pve_timeout):
        assert 0 < seconds <= threading.TIMEOUT_MAX
        with socket.socket() as sock:
            sock.settimeout(seconds)


def _check_settings_outcome(env) -> None:
    try:
        settings = load_settings(env=env)
    except ConfigError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert any(name in problem for name in NAMED), problem
            for name in SECRET_VARIABLES:
                value = str(env.get(name, "")).strip()
                if problem.startswith(name) and len(value) >= 4:
                    assert value not in problem, problem
        return
    assert isinstance(settings, Settings)
    assert settings.interval_minutes >= 5 and settings.error_retention_hours >= 1
    assert 1 <= settings.max_delete_percent <= 100 and settings.lease_seconds >= 3
    _usable(settings)


@hsettings(max_examples=PARSER_EXAMPLES, **NO_DEADLINE)
@given(st.dictionaries(st.sampled_from(VARIABLES) | st.text(max_size=12), env_values, max_size=8))
def test_settings_from_any_environment_are_usable_or_a_named_config_error(env):
    _check_settings_outcome(env)


@hsettings(max_examples=PARSER_EXAMPLES, **NO_DEADLINE)
@given(toml_documents, st.dictionaries(st.sampled_from(VARIABLES), env_values, max_size=3))
def test_settings_from_any_toml_file_are_usable_or_a_named_config_error(tmp_path_factory, document, env):
    path = tmp_path_factory.mktemp("toml") / "janitor.toml"
    path.write_bytes(document)
    _check_settings_outcome({**env, "CLEANUP_CONFIG": str(path)})


@pytest.mark.parametrize(
    "name, value",
    [
        ("ERROR_RETENTION_HOURS", "99999999"),  # "keep error rows forever", 11 000 years
        ("CLEANUP_GRACE_MINUTES", "99999999999"),
        ("CLEANUP_INTERVAL_MINUTES", "99999999999"),
        ("CLEANUP_WATCH_SECONDS", "999999999999"),
        ("CLEANUP_LEASE_SECONDS", "999999999999"),
        ("CLEANUP_WATCH_INTERVAL_SECONDS", "1e300"),
        ("CLEANUP_TASK_POLL_SECONDS", "1e300"),
        ("PVE_TIMEOUT", "1e300"),
    ],
)
def test_a_duration_too_large_to_compute_with_is_a_named_config_error(name, value):
    with pytest.raises(ConfigError, match=name):
        load_settings(env={name: value})


@pytest.mark.parametrize(
    "content",
    [
        b'CLEANUP_TABLE = "\xff\xfe"\n',
        b"\xef\xbb\xbfCLEANUP_TABLE = 'x'\n",
        b"\x00\x01\x02",
        "CLEANUP_TABLE = '\udcff'".encode("utf-8", "surrogatepass"),
    ],
)
def test_a_toml_file_that_is_not_utf8_is_a_named_config_error(tmp_path, content):
    path = tmp_path / "janitor.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="CLEANUP_CONFIG"):
        load_settings(env={"CLEANUP_CONFIG": str(path)})


# =====================================================================================
# The hookscript's parsers, in this process
# =====================================================================================


def _load_hook():
    loader = importlib.machinery.SourceFileLoader("pve_janitor_hook_fuzz", str(HOOK))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


hook = _load_hook()


def _refused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


REFUSED = _refused_url()  # nothing listens there: a post fails at once
conf_values = {
    "URL": st.sampled_from(
        [
            REFUSED,
            REFUSED + "/prefix/",
            REFUSED.replace("http", "https"),
            "ftp://x",
            "http://",
            "http://user:pw@127.0.0.1:1",
            "http://[::1",
            "http://127.0.0.1:99999",
            "http://127.0.0.1:" + "0" * 5000,
            "http://\x00",
            "",
        ]
    )
    | st.text(max_size=20),
    "SECRET": st.text(max_size=40) | st.binary(max_size=20).map(lambda b: b.decode("utf-8", "surrogateescape")),
    "TIMEOUT": st.sampled_from(["0.3", "nan", "-1", "inf", "-inf", "1e-320", "1e400", "abc", "", "0", "1_0"])
    | st.text(max_size=8),
    "SPOOL_DIR": st.sampled_from(["", "relative/spool", "/dev/null/spool", "/nonexistent\x00"]),
    "CHAIN": st.sampled_from(["", "/nonexistent/hook", "relative-hook", "/tmp\x00/x"]) | st.text(max_size=8),
}
conf_lines = st.one_of(
    *[
        st.tuples(st.sampled_from([k, k.lower(), f"export {k}", f"  {k} "]), v).map(lambda kv: f"{kv[0]}={kv[1]}")
        for k, v in conf_values.items()
    ],
    st.sampled_from(["#", "# URL=http://x", "=", "==", "URL", "just words", "'", '"', "\x00", "\r"]),
    st.text(max_size=30),
)
conf_documents = st.lists(conf_lines, max_size=8).map(
    lambda ls: "\n".join(ls).encode("utf-8", "surrogateescape")
) | st.binary(max_size=2000)
argvs = st.lists(
    st.text(max_size=12)
    | st.sampled_from(
        ["101", "100", "999999999", "1000000000", "99", "0101", "pre-start", "post-stop", "pre-stop", "post-start"]
    ),
    max_size=4,
)


@hsettings(max_examples=PARSER_EXAMPLES, **NO_DEADLINE)
@given(conf_documents)
def test_hook_config_parser_takes_any_file(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("hook") / "hook.conf"
    path.write_bytes(content)
    notes: list[str] = []
    conf = hook.read_config({"PVE_JANITOR_HOOK_CONF": str(path)}, notes)
    assert all(isinstance(conf[k], str) for k in ("url", "secret", "spool_dir", "chain"))
    assert conf["spool_dir"] and math.isfinite(conf["timeout"]) and 0 < conf["timeout"] <= hook.MAX_TIMEOUT
    try:
        parsed = hook.parse_url(conf["url"])
    except ValueError:
        return
    _, host, port, _, path_ = parsed
    assert host and 0 < port < 65536 and path_.endswith("/api/v1/events")


@hsettings(max_examples=PARSER_EXAMPLES, **NO_DEADLINE)
@given(st.text(max_size=200))
def test_hook_url_parser_only_raises_value_error(url):
    try:
        hook.parse_url(url)
    except ValueError:
        pass


@hsettings(max_examples=PARSER_EXAMPLES, **NO_DEADLINE)
@given(argvs)
def test_hook_argument_parser_accepts_only_what_proxmox_passes(argv):
    parsed = hook.parse_args(argv)
    if parsed is not None:
        vmid, phase = parsed
        assert 100 <= vmid <= 999_999_999 and phase in PHASES and argv[0].isascii()


@hsettings(max_examples=PARSER_EXAMPLES, **NO_DEADLINE)
@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=200))
def test_hook_json_strings_round_trip_any_text(text):
    literal = hook.json_string(text)
    assert literal.isascii() and json.loads(literal) == text


@hsettings(max_examples=PARSER_EXAMPLES, **NO_DEADLINE)
@given(
    st.text(max_size=140),
    st.integers(100, 999_999_999),
    st.sampled_from(sorted(PHASES)),
    st.text(max_size=70),
    st.floats(0, MAX_TS),  # every clock reading the receiver accepts
)
def test_what_the_hook_sends_the_receiver_takes_or_rejects_with_400(event_id, vmid, phase, node, ts):
    body = hook.event_body(event_id, vmid, phase, node, ts)
    try:
        event = parse_event(body, ts)
    except EventRejected as exc:
        assert exc.status == 400
        assert not (
            event_id.isascii()
            and event_id.isprintable()
            and 0 < len(event_id) <= 128
            and node.isascii()
            and node.isprintable()
            and " " not in node
            and 0 < len(node) <= 64
        )
        return
    assert (event.event_id, event.vmid, event.phase, event.node) == (event_id, vmid, phase, node)
    # "%.3f" writes the decimal nearest to ts at a millisecond: off by half a millisecond at
    # most (32.8125 -> 32.812, a tie rounds to even).  The receiver reads that decimal back as
    # the nearest float, off by up to half a float step at ts's magnitude: float noise is
    # relative, so the allowance is an ulp of ts, not a constant (at 34359738368.3125 = 2**35
    # + 5/16 the step is 7.6e-6 and the read-back "…368.312" is 0.0005035 from ts).  The hook
    # is right: it sends the correctly rounded millisecond, which is all the receiver keeps.
    assert abs(event.ts - ts) <= 0.0005 + math.ulp(ts)


def test_a_millisecond_tie_at_a_large_timestamp_round_trips_within_a_float_step():
    """The case hypothesis found: a tie at 2**35 s, where one float step is 7.6 µs."""
    ts = 2.0**35 + 0.3125
    event = parse_event(hook.event_body("e1", 100, "post-stop", "pve1", ts), ts)
    assert event.ts == 34359738368.312  # the tie went to the even millisecond
    assert 0.0005 < abs(event.ts - ts) <= 0.0005 + math.ulp(ts)


@hsettings(max_examples=PARSER_EXAMPLES // 2, **NO_DEADLINE)
@given(conf_documents, argvs)
def test_hook_main_returns_zero_for_any_config_and_arguments(tmp_path_factory, content, argv):
    work = tmp_path_factory.mktemp("hookmain")
    (work / "hook.conf").write_bytes(content)
    saved = {
        k: os.environ.get(k)
        for k in (
            "PVE_JANITOR_HOOK_CONF",
            "PVE_JANITOR_URL",
            "PVE_JANITOR_SECRET",
            "PVE_JANITOR_NODE",
            hook.CHAIN_GUARD,
        )
    }
    err = _StringIO()
    old_spool, old_stderr, old_cwd = hook.DEFAULT_SPOOL_DIR, sys.stderr, os.getcwd()
    try:
        os.chdir(work)  # a relative SPOOL_DIR lands here, as it would under Proxmox's cwd
        for key in saved:
            os.environ.pop(key, None)
        os.environ["PVE_JANITOR_HOOK_CONF"] = str(work / "hook.conf")
        os.environ["PVE_JANITOR_NODE"] = "pve-fuzz"
        hook.DEFAULT_SPOOL_DIR = str(work / "spool")
        sys.stderr = err
        code = hook.main(argv)
    finally:
        os.chdir(old_cwd)
        sys.stderr = old_stderr
        hook.DEFAULT_SPOOL_DIR = old_spool
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    text = err.getvalue()
    assert code == 0, text
    assert "Traceback" not in text and "event dropped" not in text, text
    assert text and all(line.startswith("pve-janitor-hook: ") for line in text.splitlines())


class _StringIO:
    """A stderr stand-in that takes what the hook writes (str, surrogates and all)."""

    def __init__(self):
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def getvalue(self) -> str:
        return "".join(self.parts)


# =====================================================================================
# The event validator: bytes, encodings, nesting, huge numbers
# =====================================================================================

NOW = 1_718_000_000.0
SECRET = "fuzz-hook-secret-0123456789"
VALID = {"event_id": "e-1", "vmid": 101, "phase": "post-stop", "node": "pve1", "ts": NOW}
json_leaves = (
    st.none() | st.booleans() | st.integers(-(10**30), 10**30) | st.floats(allow_nan=False) | st.text(max_size=10)
)
json_trees = st.recursive(
    json_leaves,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


def _encodings(body: bytes) -> st.SearchStrategy[bytes]:
    text = body.decode()
    return st.sampled_from(
        [
            body,
            b"\xef\xbb\xbf" + body,
            text.encode("utf-16"),
            text.encode("utf-16-le"),
            text.encode("utf-32"),
            body.replace(b'"e-1"', b'"\\u0065-1"'),
            body.replace(b"101", b"101.0"),
            body.replace(b"101", b"1e2"),
            body.replace(b"101", b"9" * 5000),
            body.replace(b"1718000000.0", b"1e400"),
            body.replace(b"1718000000.0", b"-0.0"),
            body.replace(b"1718000000.0", b"9" * 5000),
            body.replace(b'"e-1"', b'"\\ud800"'),
            body.replace(b'"pve1"', b'"pve\\u0000"'),
            body[:-1] + b', "vmid": "dup"}',
            body[:-1] + b', "other": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
            body[:-1] + b', "other": ' + b'{"a":' * 20_000 + b"1" + b"}" * 20_000 + b"}",
            body + b"\x00",
            b" \t\r\n" + body + b"\n",
            body[:-1],
        ]
    )


@hsettings(max_examples=PARSER_EXAMPLES, **NO_DEADLINE)
@given(
    st.dictionaries(st.sampled_from(sorted(VALID)) | st.text(max_size=6), json_trees, max_size=4)
    .map(lambda extra: json.dumps({**VALID, **extra}).encode())
    .flatmap(_encodings)
)
def test_any_body_is_an_event_or_a_400(body):
    try:
        event = parse_event(body, NOW)
    except EventRejected as exc:
        assert exc.status == 400 and exc.message
        return
    assert isinstance(event, Event)
    assert 100 <= event.vmid <= 999_999_999 and event.phase in PHASES
    assert event.event_id.isascii() and event.node.isascii() and 0 <= event.ts <= 1e11


latin1_headers = st.none() | st.binary(max_size=80).map(lambda b: b.decode("latin-1"))  # what WSGI hands over
environment_secrets = st.binary(min_size=8, max_size=64).map(lambda b: b.decode("utf-8", "surrogateescape"))


@hsettings(max_examples=PARSER_EXAMPLES, **NO_DEADLINE)
@given(
    environment_secrets,
    latin1_headers | st.integers(0, 10**12).map(str),
    latin1_headers,
    st.binary(max_size=MAX_BODY_BYTES // 64),
    st.floats() | st.integers(-(10**20), 10**20).map(float),
)
def test_signature_check_of_any_request_only_rejects(secret, ts, sig, body, now):
    try:
        verify_signature(secret, ts, sig, body, now)
    except EventRejected as exc:
        assert exc.status == 401 and secret not in exc.message
    else:
        assert sig is not None and sig.lower() == signature(secret, ts, body).lower()


# =====================================================================================
# The hookscript as Proxmox runs it, fed garbage
# =====================================================================================

PYTHON = os.environ.get("HOOK_TEST_PYTHON", sys.executable)


@pytest.fixture(scope="module")
def hook_copy(tmp_path_factory):
    """The hookscript with its built-in /etc and /var/lib paths pointed into a temp dir.

    A run with no usable hook.conf falls back to those defaults; as root (CI) it
    would otherwise write into the real /var/lib/pve-janitor.
    """
    root = tmp_path_factory.mktemp("hookroot")
    source = HOOK.read_text()
    for name, value in (("DEFAULT_CONF", root / "etc-hook.conf"), ("DEFAULT_SPOOL_DIR", root / "var-spool")):
        line = next(line for line in source.splitlines() if line.startswith(f"{name} = "))
        source = source.replace(line, f"{name} = {str(value)!r}")
    script = root / "pve-janitor-hook"
    script.write_text(source)
    script.chmod(0o755)
    return script


@pytest.fixture(scope="module")
def black_hole():
    """A port whose kernel completes the handshake while nobody ever answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


TRICKY_ARGS = [
    b"101",
    b"post-stop",
    b"pre-start",
    b"\xff\xfe",
    b"POST-STOP",
    b"-101",
    b"99",
    b"1000000000",
    b"0101",
    b" 101",
    b"101\n",
    b"\xd9\xa1\xd9\xa0\xd9\xa1",
    b"--help",
    b"-c",
    b"%s%n",
    b"$(reboot)",
    b"",
]
CONF_FRAGMENTS = [
    b"URL=",
    b"SECRET=",
    b"TIMEOUT=",
    b"SPOOL_DIR=",
    b"CHAIN=",
    b"export ",
    b"#",
    b"=",
    b"'",
    b'"',
    b"\r",
    b"\xff",
    b"\x00",
    b"nan",
    b"1e400",
    b"-1",
    b"http://",
    b"[::1",
    b"/nonexistent",
    b" ",
]


def _garbage_argv(rng: random.Random) -> list[bytes]:
    return [
        rng.choice(TRICKY_ARGS)
        if rng.random() < 0.5
        else bytes(rng.randrange(1, 256) for _ in range(rng.randrange(17)))
        for _ in range(rng.randrange(5))
    ]


def _garbled_conf(rng: random.Random) -> bytes:
    lines = [b"".join(rng.choice(CONF_FRAGMENTS) for _ in range(rng.randrange(1, 6))) for _ in range(rng.randrange(9))]
    return b"\n".join(lines)


@pytest.mark.slow
@pytest.mark.parametrize("spool_kind", ["fine", "under a file", "chmod 000"])
@pytest.mark.parametrize(
    "conf_kind",
    ["missing", "directory", "under a file", "random bytes", "garbled lines", "refused", "black hole", "chmod 000"],
)
def test_hookscript_exits_zero_in_time_without_traceback_whatever_it_is_fed(
    hook_copy, black_hole, tmp_path, conf_kind, spool_kind
):
    rng = random.Random(f"{conf_kind}/{spool_kind}/{os.environ.get('PYTEST_XDIST_WORKER', '')}")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    spool = {"fine": tmp_path / "spool", "under a file": blocker / "spool", "chmod 000": tmp_path / "locked"}[
        spool_kind
    ]
    if spool_kind == "chmod 000":
        spool.mkdir(mode=0o000)  # root writes through it anyway; "under a file" is what stops root
    conf = {"missing": tmp_path / "nope.conf", "directory": tmp_path, "under a file": blocker / "hook.conf"}.get(
        conf_kind, tmp_path / "hook.conf"
    )
    runs = [([b"101", b"post-stop"], None), ([b"101", b"pre-start"], None)] + [
        (_garbage_argv(rng), rng.choice([None, "", "ftp://nope", "http://[::1", REFUSED]))
        for _ in range(HOOK_GARBAGE_RUNS)
    ]
    for argv, env_url in runs:
        if conf_kind == "random bytes":
            conf.write_bytes(os.urandom(rng.randrange(1, 4096)))
        elif conf_kind == "garbled lines":
            conf.write_bytes(_garbled_conf(rng) + f"\nSPOOL_DIR={spool}\n".encode())
        elif conf_kind in ("refused", "black hole", "chmod 000"):
            url = black_hole if conf_kind == "black hole" else REFUSED
            conf.write_text(f"URL={url}\nSECRET=fuzz-secret-0123456789\nTIMEOUT=0.3\nSPOOL_DIR={spool}\n")
            if conf_kind == "chmod 000":
                conf.chmod(0o000)
        env = {
            "PATH": "/sbin:/bin:/usr/sbin:/usr/bin",
            "LC_ALL": "C",
            "PVE_JANITOR_HOOK_CONF": str(conf),
            "PVE_JANITOR_NODE": "pve-fuzz",
        }
        if env_url is not None:
            env["PVE_JANITOR_URL"] = env_url
        _run_hook_and_check(hook_copy, argv, env)


def _run_hook_and_check(script: Path, argv: list[bytes], env: dict[str, str]) -> None:
    timeout = hook.read_config(env, [])["timeout"]  # what the run allows itself (the parser is fuzzed above)
    started = time.monotonic()
    proc = subprocess.run(
        [PYTHON, str(script), *argv],
        env=env,
        cwd="/",
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=hook.MAX_TIMEOUT + 10,
    )
    elapsed = time.monotonic() - started
    err = proc.stderr.decode("utf-8", "replace")
    where = f"argv {argv!r}, env {env!r}: {err}"
    assert proc.returncode == 0, where
    assert elapsed <= timeout + 0.5, f"{elapsed:.2f} s with TIMEOUT {timeout}; {where}"
    assert "Traceback" not in err and "event dropped" not in err, where
    assert proc.stdout == b""
    assert err and all(line.startswith("pve-janitor-hook: ") for line in err.splitlines()), where
    assert "fuzz-secret-0123456789" not in err
