"""`pve-janitor serve` as a real subprocess, against the simulator over HTTPS.

The hook path uses the real hookscript, run by the simulator the way Proxmox
runs it; the receiver is the production server (waitress) with its watcher and
scheduler.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import socket
import subprocess
import time
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import ROOT, cli_command, janitor_env, table_vmids

from receiver import store
from receiver.inbox import Inbox
from receiver.model import Event
from receiver.simulator import launch
from receiver.simulator.launch import free_port
from receiver.simulator.scene import app_row, create_apps_table

HOOK = ROOT / "hookscript" / "pve-janitor-hook"


class Receiver:
    def __init__(self, sim, db, tmp_path: Path, name: str = "receiver", **extra):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.secret = extra.pop("secret", secrets.token_hex(16))
        self.admin = secrets.token_hex(16)
        self.env = janitor_env(
            sim,
            db,
            CLEANUP_HOOK_SECRET=self.secret,
            CLEANUP_ADMIN_TOKEN=self.admin,
            CLEANUP_BIND=f"127.0.0.1:{self.port}",
            **extra,
        )
        self.log = tmp_path / f"{name}.log"
        self.launched: launch.Launched | None = None

    def start(self) -> Receiver:
        self.launched = launch.start(self.env, self.log, timeout=30)
        return self

    def get(self, path: str):
        try:
            with urllib.request.urlopen(self.base + path, timeout=10) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def post_event(self, vmid: int, phase: str, event_id: str | None = None) -> int:
        body = json.dumps(
            {
                "event_id": event_id or secrets.token_hex(8),
                "vmid": vmid,
                "phase": phase,
                "node": "pve1",
                "ts": time.time(),
            }
        ).encode()
        ts = str(int(time.time()))
        sig = hmac.new(self.secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
        request = urllib.request.Request(
            self.base + "/api/v1/events",
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "X-Janitor-Timestamp": ts,
                "X-Janitor-Signature": f"sha256={sig}",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status
        except urllib.error.HTTPError as err:
            return err.code

    def terminate(self) -> int:
        return self.launched.terminate(30) if self.launched else 0

    def kill(self) -> None:
        if self.launched:
            self.launched.kill()


@pytest.fixture
def receivers():
    started: list[Receiver] = []
    yield started
    for r in started:
        r.kill()


def wait_until(check, timeout: float, step: float = 0.05) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(step)
    raise AssertionError(f"condition not met within {timeout} s")


def seed_running(db, sim, vmids, hook_conf: Path | None = None):
    table = create_apps_table(db.engine)
    with db.engine.begin() as conn:
        conn.execute(table.insert(), [app_row(v, "running", age=timedelta(days=1)) for v in vmids])
    for v in vmids:
        sim.add_guest(v, node="pve1", hookscript=str(HOOK) if hook_conf else None)
    if hook_conf:
        sim.hook_env = {"PVE_JANITOR_HOOK_CONF": str(hook_conf)}
    return table


def write_hook_conf(tmp_path: Path, receiver: Receiver) -> Path:
    conf = tmp_path / "hook.conf"
    conf.write_text(f"URL={receiver.base}\nSECRET={receiver.secret}\nTIMEOUT=2\nSPOOL_DIR={tmp_path / 'spool'}\n")
    return conf


def status_of(db, vmid):
    with db.engine.connect() as conn:
        return conn.execute(sa.text("SELECT status FROM apps WHERE lxc_id = :v"), {"v": vmid}).scalar()


def test_stop_and_destroy_through_the_real_hookscript_row_gone_within_3s(sim, sqlite_db, tmp_path, receivers):
    receiver = Receiver(sim, sqlite_db, tmp_path)
    seed_running(sqlite_db, sim, range(100, 104), hook_conf=write_hook_conf(tmp_path, receiver))
    receivers.append(receiver.start())
    sim.stop_guest(101)
    assert [r[1] for r in sim.hook_runs] == ["pre-stop", "post-stop"]
    assert all(r[2] == 0 for r in sim.hook_runs)
    wait_until(lambda: status_of(sqlite_db, 101) == "stopped", 5)
    destroyed = time.monotonic()
    sim.destroy_guest(101)
    wait_until(lambda: 101 not in table_vmids(sqlite_db), 3)
    assert time.monotonic() - destroyed < 3
    assert table_vmids(sqlite_db) == [100, 102, 103]
    code, stats = receiver.get("/api/v1/system/cleanup/stats")
    assert code == 200 and stats["ghost_apps_removed"] == 1 and stats["ports_freed"] == 2
    assert receiver.terminate() == 0


def test_destroy_of_stopped_guest_without_event_goes_via_task_tail(sim, sqlite_db, tmp_path, receivers):
    seed_running(sqlite_db, sim, range(100, 103))
    receivers.append(Receiver(sim, sqlite_db, tmp_path, CLEANUP_TASK_POLL_SECONDS=1).start())
    time.sleep(1.5)  # the first task poll has happened
    sim.stop_guest(102)
    sim.destroy_guest(102)
    took = wait_until(lambda: 102 not in table_vmids(sqlite_db), 6)
    assert took < 6 and table_vmids(sqlite_db) == [100, 101]


def test_signed_stop_for_a_guest_that_still_exists_keeps_and_marks_the_row(sim, sqlite_db, tmp_path, receivers):
    seed_running(sqlite_db, sim, range(100, 103))
    receiver = Receiver(sim, sqlite_db, tmp_path).start()
    receivers.append(receiver)
    sim.stop_guest(100)  # no hookscript attached: the event comes from us
    assert receiver.post_event(100, "post-stop", "ev-1") == 202
    assert receiver.post_event(100, "post-stop", "ev-1") == 200
    wait_until(lambda: status_of(sqlite_db, 100) == "stopped", 5)
    time.sleep(2.5)  # several more ticks
    assert 100 in table_vmids(sqlite_db)
    sim.start_guest(100)
    assert receiver.post_event(100, "post-start") == 202
    wait_until(lambda: status_of(sqlite_db, 100) == "running", 5)


def test_restart_with_an_inbox_backlog_processes_it(sim, sqlite_db, tmp_path, receivers):
    seed_running(sqlite_db, sim, range(100, 103))
    first = Receiver(sim, sqlite_db, tmp_path).start()
    first.kill()  # the tables exist now; the receiver is gone
    # Events a crashed receiver had accepted (committed) but not processed yet:
    inbox = Inbox(sqlite_db.engine)
    for vmid in (100, 101):
        sim.stop_guest(vmid)
        sim.destroy_guest(vmid)
        assert inbox.accept(Event(f"backlog-{vmid}", vmid, "post-stop", "pve1", time.time()))
    assert inbox.backlog() == 2
    receivers.append(Receiver(sim, sqlite_db, tmp_path, name="second").start())
    wait_until(lambda: table_vmids(sqlite_db) == [102], 5)
    assert inbox.backlog() == 0


def test_proxmox_down_during_a_watch_removes_nothing_until_it_is_back(sim, sqlite_db, tmp_path, receivers):
    seed_running(sqlite_db, sim, range(100, 103))
    receiver = Receiver(sim, sqlite_db, tmp_path).start()
    receivers.append(receiver)
    sim.stop_guest(101)
    assert receiver.post_event(101, "post-stop") == 202
    wait_until(lambda: status_of(sqlite_db, 101) == "stopped", 5)
    sim.set_fault("refuse")
    sim.destroy_guest(101)
    time.sleep(3)
    assert 101 in table_vmids(sqlite_db)
    code, stats = receiver.get("/api/v1/system/cleanup/stats")
    assert 101 in stats["watched_vmids"]
    assert any("inventory unreadable" in e["message"] for e in stats["errors"])
    sim.set_fault(None)
    wait_until(lambda: 101 not in table_vmids(sqlite_db), 5)


def test_disabled_receiver_keeps_the_api_and_changes_nothing(sim, sqlite_db, tmp_path, receivers):
    seed_running(sqlite_db, sim, range(100, 103))
    receiver = Receiver(sim, sqlite_db, tmp_path, CLEANUP_ENABLED="false").start()
    receivers.append(receiver)
    sim.stop_guest(101)
    sim.destroy_guest(101)
    assert receiver.post_event(101, "post-stop") == 202
    time.sleep(2.5)
    assert table_vmids(sqlite_db) == [100, 101, 102]
    code, stats = receiver.get("/api/v1/system/cleanup/stats")
    assert code == 200 and stats["enabled"] is False


def test_bad_setting_stops_serve_with_exit_2(sim, sqlite_db, tmp_path):
    env = janitor_env(sim, sqlite_db, CLEANUP_WATCH_SECONDS="ten")
    proc = subprocess.run(cli_command() + ["serve"], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "CLEANUP_WATCH_SECONDS" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.postgres
def test_two_receivers_on_postgres_one_sweeper_and_failover(sim, postgres_db, tmp_path, receivers):
    seed_running(postgres_db, sim, range(100, 104))
    a = Receiver(sim, postgres_db, tmp_path, name="a", CLEANUP_LEASE_SECONDS=3).start()
    receivers.append(a)
    wait_until(lambda: a.get("/api/v1/system/cleanup/stats")[1].get("leader") is True, 5)
    b = Receiver(sim, postgres_db, tmp_path, name="b", secret=a.secret, CLEANUP_LEASE_SECONDS=3).start()
    receivers.append(b)
    time.sleep(1.5)
    leaders = [r.get("/api/v1/system/cleanup/stats")[1]["leader"] for r in (a, b)]
    assert leaders == [True, False]
    with postgres_db.engine.connect() as conn:
        runs = conn.execute(sa.select(store.runs)).mappings().all()
    assert [r["source"] for r in runs] == ["sweep"], runs  # exactly one initial sweep, by the leader

    a.kill()
    killed = time.monotonic()
    took = wait_until(lambda: b.get("/api/v1/system/cleanup/stats")[1].get("leader") is True, 10)
    assert time.monotonic() - killed <= 3 + 2  # TTL plus a tick or two
    # The new leader acts on events that any receiver accepted.
    sim.stop_guest(102)
    sim.destroy_guest(102)
    assert b.post_event(102, "post-stop") == 202
    wait_until(lambda: 102 not in table_vmids(postgres_db), 5)
    print(f"failover took {took:.1f} s after the kill")


def test_an_oversized_body_is_refused_before_it_is_buffered(sim, sqlite_db, tmp_path, receivers):
    seed_running(sqlite_db, sim, range(100, 102))
    receiver = Receiver(sim, sqlite_db, tmp_path).start()
    receivers.append(receiver)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=5) as conn:
        conn.sendall(
            b"POST /api/v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 200000000\r\n\r\n" + b"{" * 65536
        )
        answer = b""
        try:
            while chunk := conn.recv(65536):  # the server closes the connection after its answer
                answer += chunk
        except ConnectionResetError:  # closed with the rest of the body unread: reset, after the answer
            pass
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert time.monotonic() - started < 3
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"\r\nContent-Type: application/json\r\n" in head + b"\r\n", head
    assert json.loads(body) == {"error": "payload_too_large", "message": "body larger than 65536 bytes"}
