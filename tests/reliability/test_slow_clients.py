"""Slow clients are harmless: connections that trickle their headers do not keep anyone else out.

An unauthenticated client opens as many connections as the receiver allows and sends one header
line every few seconds on each, never finishing a request (slowloris).  A node's signed event must
still be answered 202, and ``/healthz`` 200, within 1 s, while the receiver holds the connection
limit's worth of such connections (counted from /proc: accepted, not just queued).
"""

from __future__ import annotations

import os
import selectors
import socket
import statistics
import threading
import time

import pytest
import requests

from receiver.httpserver import CONNECTION_LIMIT

from .support_io import Serve, event_body, record, seed_guests_and_rows, signed_headers

TRICKLERS = 500
LINE_EVERY_S = 5.0
ROUNDS = 15  # one probe of each kind a second: long enough to cross the 10 s deadline for a request
ANSWER_WITHIN_S = 1.0

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts connections in /proc")


class Tricklers:
    """``count`` connections, each sending one more header line every ``every`` seconds, never the end.

    A connection the receiver closes (or answers) is opened again at once, as an attacker
    would, so the pressure stays at ``count`` connections for as long as it runs.
    """

    def __init__(self, port: int, count: int, every: float):
        self.port, self.count, self.every = port, count, every
        self.selector = selectors.DefaultSelector()
        self.next_line: dict[socket.socket, float] = {}
        self.reopened = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="tricklers", daemon=True)

    def __enter__(self) -> Tricklers:
        for i in range(self.count):
            self._open(first_line_at=time.monotonic() + self.every * i / self.count)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join(10)
        for sock in list(self.next_line):
            self._close(sock)
        self.selector.close()

    def _open(self, first_line_at: float) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        sock.setblocking(False)
        sock.send(b"GET /healthz HTTP/1.1\r\nHost: receiver\r\n")
        self.selector.register(sock, selectors.EVENT_READ)
        self.next_line[sock] = first_line_at

    def _close(self, sock: socket.socket) -> None:
        self.selector.unregister(sock)
        del self.next_line[sock]
        sock.close()

    def _run(self) -> None:
        while not self.stopping.is_set():
            # Anything readable is an answer (a 408) or the end of the connection: open another.
            for key, _ in self.selector.select(timeout=0.1):
                self._close(key.fileobj)  # type: ignore[arg-type]  # registered sockets only
                self._open(first_line_at=time.monotonic() + self.every)
                self.reopened += 1
            now = time.monotonic()
            for sock, due in list(self.next_line.items()):
                if due <= now:
                    try:
                        sock.send(b"X-Trickle: %d\r\n" % int(now))
                    except OSError:
                        continue  # closed by the receiver: the selector sees it
                    self.next_line[sock] = due + self.every


def accepted_connections(pid: int, port: int) -> int:
    """Established TCP connections to ``port`` that process ``pid`` has accepted (holds as sockets)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == port and fields[3] == "01" and fields[9] in inodes:
                    count += 1
    return count


def timed(method: str, url: str, **kwargs) -> tuple[int | None, float]:
    """Status and seconds of one request on a new connection; None when it did not answer within 5 s."""
    started = time.monotonic()
    try:
        code: int | None = requests.request(method, url, timeout=5, **kwargs).status_code
    except requests.RequestException:
        code = None
    return code, time.monotonic() - started


@pytest.mark.slow
def test_a_signed_event_and_healthz_are_answered_within_1s_under_500_tricklers(sim, sqlite_db, tmp_path):
    seed_guests_and_rows(sqlite_db, sim, range(100, 103))
    serve = Serve(sim, sqlite_db, tmp_path).start()
    try:
        with Tricklers(serve.port, TRICKLERS, LINE_EVERY_S) as tricklers:
            events, health, held = [], [], []
            for _ in range(ROUNDS):
                # Probe only while the receiver holds the limit's worth of tricklers.
                deadline = time.monotonic() + 5
                while accepted_connections(serve.pid, serve.port) < CONNECTION_LIMIT and time.monotonic() < deadline:
                    time.sleep(0.02)
                held.append(accepted_connections(serve.pid, serve.port))
                body = event_body(100, "post-start")
                events.append(
                    timed("POST", serve.base + "/api/v1/events", data=body, headers=signed_headers(serve.secret, body))
                )
                health.append(timed("GET", serve.base + "/healthz"))
                time.sleep(1)
            reopened = tricklers.reopened
        assert serve.alive()
        log = serve.log_text()
    finally:
        serve.close()

    event_s = [s for _, s in events]
    health_s = [s for _, s in health]
    print(
        f"\n{TRICKLERS} tricklers (a header line every {LINE_EVERY_S:g} s), receiver holding "
        f"{min(held)}-{max(held)} connections (limit {CONNECTION_LIMIT}), {ROUNDS} rounds, "
        f"{reopened} trickler connections closed by the receiver and opened again:\n"
        f"  signed event 202 in median {statistics.median(event_s) * 1000:.0f} ms, max {max(event_s) * 1000:.0f} ms\n"
        f"  /healthz 200 in median {statistics.median(health_s) * 1000:.0f} ms, max {max(health_s) * 1000:.0f} ms"
    )
    record(
        "slow_clients",
        tricklers=TRICKLERS,
        held_min=min(held),
        event_202_max_ms=round(max(event_s) * 1000),
        healthz_max_ms=round(max(health_s) * 1000),
        reopened=reopened,
    )
    assert [code for code, _ in events] == [202] * ROUNDS, events
    assert [code for code, _ in health] == [200] * ROUNDS, health
    assert max(event_s) < ANSWER_WITHIN_S and max(health_s) < ANSWER_WITHIN_S, (events, health)
    assert min(held) >= CONNECTION_LIMIT, held  # the probes ran with the limit full of tricklers
    assert reopened > 0  # the receiver did close tricklers (to make room, or at the deadline)
    assert "Traceback" not in log
