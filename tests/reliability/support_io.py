"""Helpers for the bad-input, load, fail-over and security tests: a `serve` subprocess
driven over real HTTP, signed events, process samples from /proc, small statistics.

``LONG`` is true under ``make reliability`` (JANITOR_RELIABILITY=long); ``make test``
runs the short versions.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import requests
import sqlalchemy as sa
from conftest import ROOT, janitor_env

from receiver.events import SIGNATURE_HEADER, TIMESTAMP_HEADER, signature
from receiver.simulator import launch
from receiver.simulator.scene import app_row, create_apps_table

LONG = os.environ.get("JANITOR_RELIABILITY") == "long"
HOOK = ROOT / "hookscript" / "pve-janitor-hook"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], Any], timeout: float, step: float = 0.05, what: str = "condition") -> float:
    """Seconds it took until ``check()`` was true; AssertionError after ``timeout``."""
    started = time.monotonic()
    while True:
        if check():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what} not met within {timeout} s")
        time.sleep(step)


def percentile(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sample."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def event_body(
    vmid: int, phase: str, event_id: str | None = None, node: str = "pve1", ts: float | None = None
) -> bytes:
    return json.dumps(
        {
            "event_id": event_id or secrets.token_hex(16),
            "vmid": vmid,
            "phase": phase,
            "node": node,
            "ts": time.time() if ts is None else ts,
        }
    ).encode()


def signed_headers(secret: str, body: bytes, ts: int | None = None) -> dict[str, str]:
    ts = int(time.time()) if ts is None else ts
    return {
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: str(ts),
        SIGNATURE_HEADER: signature(secret, ts, body),
    }


def seed_guests_and_rows(
    db,
    sim,
    vmids: Iterable[int],
    *,
    status: str = "running",
    node: str = "pve1",
    age: timedelta = timedelta(days=1),
    hookscript: str | None = None,
    in_sim: bool = True,
) -> sa.Table:
    """Rows for ``vmids`` in a fresh ``apps`` table and (``in_sim``) a running guest for each."""
    table = create_apps_table(db.engine)
    vmids = list(vmids)
    with db.engine.begin() as conn:
        if vmids:
            conn.execute(table.insert(), [app_row(v, status, age=age) for v in vmids])
    if in_sim:
        for v in vmids:
            sim.add_guest(v, node=node, hookscript=hookscript)
    return table


def table_rows(db, table: str = "apps") -> dict[int, dict[str, Any]]:
    """Every row of the platform table by primary key, all columns."""
    with db.engine.connect() as conn:
        return {r["id"]: dict(r) for r in conn.execute(sa.text(f"SELECT * FROM {table}")).mappings()}


def proc_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def proc_fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float = 0.0

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Serve:
    """``pve-janitor serve`` as a subprocess against the simulator and a database."""

    sim: Any
    db: Any
    tmp_path: Path
    name: str = "receiver"
    secret: str = field(default_factory=lambda: secrets.token_hex(16))
    admin: str = field(default_factory=lambda: secrets.token_hex(16))
    extra: dict[str, Any] = field(default_factory=dict)
    env_override: dict[str, str] | None = None

    def __post_init__(self) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = janitor_env(
            self.sim,
            self.db,
            CLEANUP_HOOK_SECRET=self.secret,
            CLEANUP_ADMIN_TOKEN=self.admin,
            CLEANUP_BIND=f"127.0.0.1:{self.port}",
            **self.extra,
        )
        if self.env_override:
            self.env.update(self.env_override)
        self.log = self.tmp_path / f"{self.name}.log"
        self.proc: subprocess.Popen | None = None
        self.session = requests.Session()

    # --- life cycle -------------------------------------------------------------

    def start(self, timeout: float = 30) -> Serve:
        self.proc = launch.start(self.env, self.log, timeout=timeout, cwd=ROOT).proc
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout: float = 30) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self.kill()
        self.session.close()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    # --- HTTP ---------------------------------------------------------------------

    def request(
        self, method: str, path: str, session: requests.Session | None = None, timeout: float = 30, **kwargs: Any
    ) -> Answer:
        started = time.monotonic()
        r = (session or self.session).request(
            method, self.base + path, timeout=timeout, allow_redirects=False, **kwargs
        )
        return Answer(r.status_code, dict(r.headers), r.content, time.monotonic() - started)

    def get(self, path: str, **kwargs: Any) -> Answer:
        return self.request("GET", path, **kwargs)

    def stats(self) -> dict[str, Any]:
        answer = self.get("/api/v1/system/cleanup/stats")
        assert answer.status == 200, answer
        return answer.json()

    def wait_first_sweep(self, timeout: float = 30) -> None:
        """``serve`` sweeps once at start; wait until that is over (POST /run would get 409)."""

        def over() -> bool:
            stats = self.stats()  # the run is recorded a moment before the sweep lets go of its lock
            return stats["last_sweep"] is not None and not stats["sweep_running"]

        wait_until(over, timeout, what=f"{self.name}'s first sweep")

    def run(self, query: str = "", token: str | None = None, **kwargs: Any) -> Answer:
        token = self.admin if token is None else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self.request(
            "POST", "/api/v1/system/cleanup/run" + (f"?{query}" if query else ""), headers=headers, **kwargs
        )

    def post_event(
        self,
        vmid: int,
        phase: str,
        event_id: str | None = None,
        node: str = "pve1",
        session: requests.Session | None = None,
        secret: str | None = None,
    ) -> Answer:
        body = event_body(vmid, phase, event_id, node)
        return self.request(
            "POST",
            "/api/v1/events",
            session=session,
            data=body,
            headers=signed_headers(self.secret if secret is None else secret, body),
        )


def record(kind: str, **row: Any) -> None:
    """Hand a measured figure to the suite's report (tests/reliability/conftest.py), when it has one."""
    try:
        from .conftest import record as shared
    except ImportError:
        return
    shared(kind, **row)
