"""systemd's notify protocol: the datagrams themselves, the keep-alive gate, and a real ``serve``.

A Unix datagram socket in ``tmp_path`` stands in for systemd's ``$NOTIFY_SOCKET``.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import cli_command, janitor_env

from receiver import notify
from receiver.serve import background_trouble
from receiver.simulator.launch import free_port
from receiver.simulator.scene import create_apps_table


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[socket.socket]:
    """What systemd listens on: a datagram socket, bound in ``tmp_path``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(10)
    yield sock
    sock.close()


def received(sock: socket.socket, timeout: float = 0.0) -> list[str]:
    """The datagrams waiting (after up to ``timeout`` s for the first), each as one string."""
    out = []
    sock.settimeout(timeout or 0.001)
    try:
        while True:
            out.append(sock.recv(4096).decode())
            sock.settimeout(0.001)
    except (TimeoutError, BlockingIOError):
        return out


def test_nothing_is_sent_outside_systemd() -> None:
    assert notify.send("READY=1", environ={}) is False
    assert notify.watchdog_interval({"WATCHDOG_USEC": "30000000"}) is None  # no socket, no watchdog


def test_fields_go_as_one_datagram_to_a_path_socket(systemd: socket.socket, tmp_path: Path) -> None:
    assert notify.send("READY=1", "STATUS=listening", environ={"NOTIFY_SOCKET": str(tmp_path / "notify")})
    assert received(systemd, 1) == ["READY=1\nSTATUS=listening"]


def test_an_abstract_socket_name_starts_with_at() -> None:
    name = f"pve-janitor-test-{secrets.token_hex(6)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        assert notify.send("WATCHDOG=1", environ={"NOTIFY_SOCKET": "@" + name})
        sock.settimeout(1)
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_a_socket_that_is_gone_is_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert notify.send("WATCHDOG=1", environ={"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False
    assert "systemd notify (WATCHDOG=1) failed" in caplog.text


@pytest.mark.parametrize(
    ("extra", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}, 0.1),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # another process is watched
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_keep_alives_come_every_half_watchdog_period(extra: dict[str, str], interval: float | None) -> None:
    assert notify.watchdog_interval({"NOTIFY_SOCKET": "/run/systemd/notify", **extra}) == interval


def recorder(sent: list[str]):
    """A ``send`` that keeps what it is given."""

    def send(*fields: str) -> bool:
        sent.extend(fields)
        return True

    return send


def test_keep_alives_stop_while_unhealthy_and_resume(caplog: pytest.LogCaptureFixture) -> None:
    state: dict[str, str | None] = {"wrong": None}
    sent: list[str] = []
    keepalive = notify.KeepAlive(lambda: state["wrong"], 60, send=recorder(sent))
    wrong = keepalive.beat()
    assert sent == ["WATCHDOG=1"] and wrong is None
    state["wrong"] = "watcher: not running"
    for _ in range(3):
        wrong = keepalive.beat(wrong)
    assert sent == ["WATCHDOG=1", "STATUS=unhealthy: watcher: not running"]  # said once, no keep-alive
    assert caplog.text.count("keep-alives stopped (watcher: not running)") == 1
    state["wrong"] = None
    keepalive.beat(wrong)
    assert sent[-1] == "WATCHDOG=1" and keepalive.sent == 2
    assert "keep-alives resumed" in caplog.text


def test_the_keep_alive_thread_beats_until_stopped() -> None:
    sent: list[str] = []
    keepalive = notify.KeepAlive(lambda: None, 0.02, send=recorder(sent)).start()
    time.sleep(0.3)
    keepalive.stop()
    count = len(sent)
    assert count >= 5 and set(sent) == {"WATCHDOG=1"}
    time.sleep(0.1)
    assert len(sent) == count


class _Thread:
    def __init__(self, alive: bool):
        self._alive = alive

    def alive(self) -> bool:
        return self._alive


class _Scheduler:
    def __init__(self, running: bool):
        self.running = running


@pytest.mark.parametrize(
    ("watcher", "scheduler", "trouble"),
    [
        (True, True, None),
        (False, True, "watcher: not running"),
        (True, False, "scheduler: not running"),
    ],
)
def test_serve_gates_keep_alives_on_the_watcher_and_the_scheduler(watcher, scheduler, trouble) -> None:
    assert background_trouble(_Thread(watcher), _Scheduler(scheduler)) == trouble  # type: ignore[arg-type]


def test_serve_says_ready_once_it_answers_then_keep_alives_then_stopping(
    sim, sqlite_db, tmp_path: Path, systemd: socket.socket
) -> None:
    create_apps_table(sqlite_db.engine)
    port = free_port()
    env = janitor_env(
        sim,
        sqlite_db,
        CLEANUP_BIND=f"127.0.0.1:{port}",
        CLEANUP_HOOK_SECRET=secrets.token_hex(16),
        CLEANUP_ADMIN_TOKEN=secrets.token_hex(16),
        NOTIFY_SOCKET=str(tmp_path / "notify"),
        WATCHDOG_USEC="200000",  # a keep-alive every 0.1 s
    )
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen(cli_command() + ["serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        first = received(systemd, 30)
        assert first, (tmp_path / "serve.log").read_text()
        messages = first + received(systemd)
        ready = [m for m in messages if m.startswith("READY=1")]
        assert ready == [f"READY=1\nSTATUS=listening on 127.0.0.1:{port}"]
        # Once READY=1 has come, /healthz answers at once: systemd may route traffic here.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
            assert answer.status == 200
        time.sleep(1)
        beats = received(systemd)
        assert 5 <= beats.count("WATCHDOG=1") <= 15 and set(beats) == {"WATCHDOG=1"}
        proc.terminate()
        assert proc.wait(30) == 0
        assert "STOPPING=1" in received(systemd, 1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
