"""No secret leaks: a full run with distinctive secret values, every byte of output captured and grepped.

The run is the demo's story and its error paths: `serve` with its HTTP API (every route,
good and bad requests), the CLI (check, sweep, history, restore, and the failures:
bad settings, wrong Proxmox token, unreachable database), the real hookscript
(delivered, refused, spooled, replayed).  Captured: stdout and stderr of every
process, the receiver's log, every HTTP answer's headers and body, the hook's
stderr, the spool's file names and contents, and pve-janitor's own tables (what
stats and history are made of).  Each of the four secrets must appear nowhere.

The database password: PostgreSQL with a role that has a password (the test
server trusts local connections, so the password is not checked, but it is in
DATABASE_URL for the receiver to leak).  Without PostgreSQL the test runs on
SQLite, whose URLs hold no password, and says so.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import PG_ENV, ROOT, Database, cli_command, janitor_env

from receiver import store
from receiver.db import make_engine
from receiver.simulator import ProxmoxSimulator
from receiver.simulator.scene import load_into, seed_database

from .support_io import HOOK, Serve, event_body, signed_headers, wait_until

HOOK_SECRET = "hooksecret-" + secrets.token_hex(8)
ADMIN_TOKEN = "admintoken-" + secrets.token_hex(8)
PVE_TOKEN = "pvetoken-" + secrets.token_hex(8)
DB_PASSWORD = "dbpassword-" + secrets.token_hex(8)
WRONG_PVE_TOKEN = "wrongpvetoken-" + secrets.token_hex(8)


class Transcript:
    """Everything that came out of the run, labelled, to grep."""

    def __init__(self):
        self.parts: list[tuple[str, str]] = []

    def add(self, label: str, text: str | bytes) -> None:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        self.parts.append((label, text))

    def http(self, label: str, answer) -> None:
        self.add(f"HTTP {label} -> {answer.status} headers", json.dumps(answer.headers))
        self.add(f"HTTP {label} -> {answer.status} body", answer.body)

    def cli(self, args: list[str], env: dict[str, str], expect: int | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(cli_command() + args, env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
        self.add(f"pve-janitor {' '.join(args)} (exit {proc.returncode}) stdout", proc.stdout)
        self.add(f"pve-janitor {' '.join(args)} (exit {proc.returncode}) stderr", proc.stderr)
        if expect is not None:
            assert proc.returncode == expect, (args, proc.stdout, proc.stderr)
        return proc

    def leaks(self, secret: str) -> list[str]:
        return [label for label, text in self.parts if secret in text]


@pytest.fixture
def secret_db(tmp_path):
    """PostgreSQL through a role with a password when available; SQLite otherwise."""
    base = os.environ.get(PG_ENV)
    if not base:
        url = f"sqlite:///{tmp_path / 'platform.db'}"
        engine = make_engine(url)
        yield Database("sqlite", url, engine), None
        engine.dispose()
        return
    name = f"jsec_{secrets.token_hex(5)}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE ROLE {name} LOGIN PASSWORD '{DB_PASSWORD}'")
        conn.exec_driver_sql(f"CREATE SCHEMA {name} AUTHORIZATION {name}")
    url_obj = sa.engine.make_url(base).set(username=name, password=DB_PASSWORD)
    url = url_obj.update_query_dict({"options": f"-csearch_path={name}"}).render_as_string(hide_password=False)
    engine = make_engine(url)
    try:
        yield Database("postgres", url, engine), url_obj.set(port=1).render_as_string(hide_password=False)
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {name} CASCADE")
            conn.exec_driver_sql(f"DROP ROLE {name}")
        admin.dispose()


@pytest.mark.slow
def test_no_secret_appears_in_any_output_of_a_full_run(secret_db, tmp_path):
    db, unreachable_url = secret_db
    out = Transcript()
    seed_database(db.engine)
    with ProxmoxSimulator(nodes=("pve1", "pve2"), token_value=PVE_TOKEN) as sim:
        load_into(sim, "seed")
        receiver = Serve(sim, db, tmp_path, secret=HOOK_SECRET, admin=ADMIN_TOKEN).start()
        try:
            _http_api(receiver, out)
            _hookscript(receiver, sim, tmp_path, out)
            _cli(sim, db, unreachable_url, tmp_path, out)
        finally:
            code = receiver.terminate()
            receiver.close()
        assert code == 0
        out.add("receiver log", receiver.log_text())
    with db.engine.connect() as conn:
        for table in (store.errors, store.runs, store.audit, store.inbox, store.counters, store.watch, store.lease):
            out.add(
                f"table {table.name}",
                json.dumps([dict(r) for r in conn.execute(sa.select(table)).mappings()], default=str),
            )

    # The run did what it was meant to: every path was taken.
    text = "\n".join(t for _, t in out.parts)
    for expected in (
        "a valid 'Authorization: Bearer",
        "bad signature",
        "stale or future timestamp",
        "CLEANUP_MAX_DELETE_PERCENT",
        "spooled (receiver answered 401)",
        "sent (202)",
        "HTTP 401, the API token was refused",
        "restored audit entry",
        "configuration error",
    ):
        assert expected in text, expected
    secrets_checked = {
        "CLEANUP_HOOK_SECRET": HOOK_SECRET,
        "CLEANUP_ADMIN_TOKEN": ADMIN_TOKEN,
        "PVE_TOKEN_VALUE": PVE_TOKEN,
        "a wrong PVE_TOKEN_VALUE": WRONG_PVE_TOKEN,
    }
    if db.kind == "postgres":
        secrets_checked["the DATABASE_URL password"] = DB_PASSWORD
        assert "***" in text  # the URL is shown, its password redacted
    else:
        print("\nno PostgreSQL: DATABASE_URL is a SQLite path, which holds no password to leak")
    print(f"\n{len(out.parts)} outputs captured, {sum(len(t) for _, t in out.parts)} characters")
    for name, value in secrets_checked.items():
        assert not out.leaks(value), f"{name} leaked in: {out.leaks(value)}"


def _http_api(receiver: Serve, out: Transcript) -> None:
    for path in (
        "/",
        "/api/v1/system/cleanup/stats",
        "/api/v1/system/cleanup/history",
        "/healthz",
        "/metrics",
        "/nope",
        "/api/v1/system/cleanup/history?limit=0",
    ):
        out.http(f"GET {path}", receiver.get(path))
    out.http("DELETE /api/v1/events", receiver.request("DELETE", "/api/v1/events"))
    for label, token in (("no token", ""), ("wrong token", "not-" + ADMIN_TOKEN), ("token prefix", ADMIN_TOKEN[:-1])):
        answer = receiver.run(token=token)
        assert answer.status == 401
        out.http(f"POST /run {label}", answer)
    out.http("POST /run dry", receiver.run("dry_run=true"))
    out.http("POST /run bad flag", receiver.run("force=maybe"))
    refused = receiver.run()
    assert refused.status == 422  # 41 of 47 rows: the guard
    out.http("POST /run guard", refused)
    forced = receiver.run("force=true")
    assert forced.status == 200 and forced.json()["applied"] == 41
    out.http("POST /run force", forced)
    out.http("GET history after", receiver.get("/api/v1/system/cleanup/history?limit=500"))

    good = event_body(101, "post-stop", "secret-test-1")
    for label, body, headers in (
        ("good", good, signed_headers(HOOK_SECRET, good)),
        ("duplicate", good, signed_headers(HOOK_SECRET, good)),
        ("wrong secret", good, signed_headers("not-" + HOOK_SECRET, good)),
        ("stale", good, signed_headers(HOOK_SECRET, good, ts=int(time.time()) - 1000)),
        ("no signature", good, {"Content-Type": "application/json"}),
        ("garbled signature", good, {**signed_headers(HOOK_SECRET, good), "X-Janitor-Signature": HOOK_SECRET}),
        ("text/plain", good, {**signed_headers(HOOK_SECRET, good), "Content-Type": "text/plain"}),
        ("bad body", b"{}", signed_headers(HOOK_SECRET, b"{}")),
        ("too large", b"x" * 70_000, signed_headers(HOOK_SECRET, b"x" * 70_000)),
    ):
        out.http(f"POST /events {label}", receiver.request("POST", "/api/v1/events", data=body, headers=headers))
    wait_until(lambda: receiver.stats()["inbox_backlog"] == 0, 10)
    out.http("GET stats at the end", receiver.get("/api/v1/system/cleanup/stats"))
    out.http("GET metrics at the end", receiver.get("/metrics"))


def _hookscript(receiver: Serve, sim, tmp_path: Path, out: Transcript) -> None:
    spool = tmp_path / "spool"
    conf = tmp_path / "hook.conf"

    def run(url: str, secret: str, vmid: int, phase: str) -> str:
        conf.write_text(f"URL={url}\nSECRET={secret}\nTIMEOUT=2\nSPOOL_DIR={spool}\n")
        proc = subprocess.run(
            [sys.executable, str(HOOK), str(vmid), phase],
            cwd="/",
            capture_output=True,
            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C", "PVE_JANITOR_HOOK_CONF": str(conf)},
            timeout=30,
        )
        assert proc.returncode == 0
        out.add(f"hook {vmid} {phase} stdout", proc.stdout)
        out.add(f"hook {vmid} {phase} stderr", proc.stderr)
        for path in sorted(spool.rglob("*")) if spool.exists() else []:
            out.add(f"spool entry name {path.relative_to(spool)}", str(path.relative_to(spool)))
            if path.is_file():
                out.add(f"spool entry {path.name}", path.read_bytes())
        return proc.stderr.decode()

    with socket_closed() as refused:
        assert "spooled" in run(refused, HOOK_SECRET, 102, "pre-stop")
    assert "spooled (receiver answered 401)" in run(receiver.base, "not-" + HOOK_SECRET, 102, "post-stop")
    assert "sent (202)" in run(receiver.base, HOOK_SECRET, 103, "post-stop")  # and replays the spool
    assert "sent (202)" in run(receiver.base + "/", HOOK_SECRET, 103, "pre-start")


class socket_closed:
    """A URL nothing listens on."""

    def __enter__(self) -> str:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return f"http://127.0.0.1:{s.getsockname()[1]}"

    def __exit__(self, *exc) -> None:
        return None


def _cli(sim, db, unreachable_url: str | None, tmp_path: Path, out: Transcript) -> None:
    env = janitor_env(sim, db, CLEANUP_HOOK_SECRET=HOOK_SECRET, CLEANUP_ADMIN_TOKEN=ADMIN_TOKEN)
    out.cli(["check"], env, expect=0)
    out.cli(["-v", "sweep", "--dry-run"], env, expect=0)
    out.cli(["-v", "sweep", "--json"], env, expect=0)
    out.cli(["history"], env, expect=0)
    history = json.loads(out.cli(["history", "--json", "--limit", "100"], env, expect=0).stdout)
    out.cli(["-v", "restore", str(history[-1]["id"])], env, expect=0)
    out.cli(["restore", str(history[-1]["id"])], env)  # already restored
    out.cli(["restore", "99999999"], env, expect=1)
    out.cli(["-v", "sweep", "--force"], env)
    # Error paths.
    out.cli(["check"], {**env, "PVE_TOKEN_VALUE": WRONG_PVE_TOKEN}, expect=3)
    out.cli(["-v", "sweep"], {**env, "PVE_TOKEN_VALUE": WRONG_PVE_TOKEN}, expect=3)
    out.cli(["sweep"], {**env, "PVE_USER": ""}, expect=2)  # token value without its user
    out.cli(["sweep"], {**env, "CLEANUP_WATCH_SECONDS": "ten", "CLEANUP_ACTION": "nuke"}, expect=2)
    out.cli(["serve"], {**env, "CLEANUP_BIND": "256.0.0.1:http"}, expect=2)
    if unreachable_url:
        out.cli(["check"], {**env, "DATABASE_URL": unreachable_url}, expect=3)
        out.cli(["-v", "sweep"], {**env, "DATABASE_URL": unreachable_url}, expect=3)
        out.cli(["history"], {**env, "DATABASE_URL": unreachable_url}, expect=3)
        no_driver_url = unreachable_url.replace("postgresql+psycopg", "postgresql+nodriver")
        out.cli(["check"], {**env, "DATABASE_URL": no_driver_url}, expect=2)


# --- secrets from files, systemd credentials, and the previous hook secret ------------------

PREVIOUS_SECRET = "previoushook-" + secrets.token_hex(8)
FILE_HOOK_SECRET = "filehook-" + secrets.token_hex(8)
FILE_ADMIN_TOKEN = "fileadmin-" + secrets.token_hex(8)
CREDENTIAL_PVE_TOKEN = "credpvetoken-" + secrets.token_hex(8)


@pytest.mark.slow
def test_secrets_read_from_files_and_the_previous_hook_secret_appear_nowhere(tmp_path):
    """The same grep for secrets given as *_FILE, as a systemd credential and as
    CLEANUP_HOOK_SECRET_PREVIOUS, through serve (events signed with either hook secret),
    the hookscript still on the previous secret, `config`, `check` and their error paths."""
    out = Transcript()
    url = f"sqlite:///{tmp_path / 'platform.db'}"
    engine = make_engine(url)
    seed_database(engine)
    db = Database("sqlite", url, engine)
    files = tmp_path / "secrets"
    files.mkdir(mode=0o700)
    (files / "hook").write_text(FILE_HOOK_SECRET + "\n")
    (files / "admin").write_text(FILE_ADMIN_TOKEN + "\n")
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    (credentials / "pve-janitor.pve-token-value").write_text(CREDENTIAL_PVE_TOKEN)
    from_files = {
        "CLEANUP_HOOK_SECRET": "",
        "CLEANUP_ADMIN_TOKEN": "",
        "PVE_TOKEN_VALUE": "",
        "CLEANUP_HOOK_SECRET_FILE": str(files / "hook"),
        "CLEANUP_ADMIN_TOKEN_FILE": str(files / "admin"),
        "CLEANUP_HOOK_SECRET_PREVIOUS": PREVIOUS_SECRET,
        "CREDENTIALS_DIRECTORY": str(credentials),
    }
    try:
        with ProxmoxSimulator(nodes=("pve1", "pve2"), token_value=CREDENTIAL_PVE_TOKEN) as sim:
            load_into(sim, "seed")
            receiver = Serve(sim, db, tmp_path, env_override=from_files).start()
            try:
                for label, secret, expected in (
                    ("current", FILE_HOOK_SECRET, 202),
                    ("previous", PREVIOUS_SECRET, 202),
                    ("neither", "not-" + FILE_HOOK_SECRET, 401),
                ):
                    body = event_body(101, "post-stop", f"rotation-{label}")
                    answer = receiver.request("POST", "/api/v1/events", data=body, headers=signed_headers(secret, body))
                    assert answer.status == expected, (label, answer.status)
                    out.http(f"POST /events signed with the {label} secret", answer)
                dry = receiver.run("dry_run=true", token=FILE_ADMIN_TOKEN)
                # The token was taken: 422 is the guard (41 of 47 rows), 409 the start-up sweep still running.
                assert dry.status in (200, 409, 422), dry.body
                assert receiver.run("dry_run=true", token="not-" + FILE_ADMIN_TOKEN).status == 401
                out.http("POST /run with the admin token from its file", dry)
                out.http("GET stats", receiver.get("/api/v1/system/cleanup/stats"))
                out.http("GET metrics", receiver.get("/metrics"))
                _hook_on_the_previous_secret(receiver, tmp_path, out)
                env = {**receiver.env}
                out.cli(["config"], env, expect=0)
                out.cli(["config", "--json"], env, expect=0)
                out.cli(["check"], env, expect=0)
                guard = out.cli(["-v", "sweep", "--dry-run"], env, expect=3)  # 41 of 47 rows: the guard
                assert "CLEANUP_MAX_DELETE_PERCENT" in guard.stdout
                both = out.cli(["config"], {**env, "CLEANUP_ADMIN_TOKEN": FILE_ADMIN_TOKEN}, expect=2)
                assert "CLEANUP_ADMIN_TOKEN is given 2 ways" in both.stderr
                twice = out.cli(["check"], {**env, "PVE_TOKEN_VALUE": CREDENTIAL_PVE_TOKEN}, expect=2)
                assert "the systemd credential pve-janitor.pve-token-value" in twice.stdout
                (files / "gone").mkdir()
                missing = out.cli(["sweep"], {**env, "CLEANUP_HOOK_SECRET_FILE": str(files / "gone")}, expect=2)
                assert f"CLEANUP_HOOK_SECRET_FILE: cannot read {files / 'gone'}" in missing.stderr
            finally:
                code = receiver.terminate()
                receiver.close()
            assert code == 0
            out.add("receiver log", receiver.log_text())
    finally:
        engine.dispose()
    text = "\n".join(t for _, t in out.parts)
    assert "(set, redacted)  (credential: pve-janitor.pve-token-value)" in text
    assert "sent (202)" in text
    for name, value in {
        "CLEANUP_HOOK_SECRET_FILE's secret": FILE_HOOK_SECRET,
        "CLEANUP_ADMIN_TOKEN_FILE's token": FILE_ADMIN_TOKEN,
        "the PVE token credential": CREDENTIAL_PVE_TOKEN,
        "CLEANUP_HOOK_SECRET_PREVIOUS": PREVIOUS_SECRET,
    }.items():
        assert not out.leaks(value), f"{name} leaked in: {out.leaks(value)}"
        assert not out.leaks(value[-12:]), f"part of {name} leaked in: {out.leaks(value[-12:])}"


def _hook_on_the_previous_secret(receiver: Serve, tmp_path: Path, out: Transcript) -> None:
    """A node not yet given the new secret: its events are still delivered."""
    conf = tmp_path / "hook.conf"
    conf.write_text(f"URL={receiver.base}\nSECRET={PREVIOUS_SECRET}\nTIMEOUT=2\nSPOOL_DIR={tmp_path / 'spool'}\n")
    proc = subprocess.run(
        [sys.executable, str(HOOK), "104", "post-stop"],
        cwd="/",
        capture_output=True,
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C", "PVE_JANITOR_HOOK_CONF": str(conf)},
        timeout=30,
    )
    assert proc.returncode == 0
    out.add("hook on the previous secret stderr", proc.stderr)
    assert "sent (202)" in proc.stderr.decode()
