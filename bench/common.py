"""What every benchmark shares: a receiver (``pve-janitor serve``) in a subprocess, statistics,
the machine's description, and where the PostgreSQL figures run.

Benchmarks report numbers; none of this ever fails on a slow machine.
"""
from __future__ import annotations

import os
import platform
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from receiver.config import without_settings
from receiver.db import make_engine
from receiver.simulator import ProxmoxSimulator, launch
from receiver.simulator.scene import load_into, seed_database

ROOT = Path(__file__).resolve().parent.parent

HOOK = ROOT / "hookscript" / "pve-janitor-hook"
POSTGRES_ENV = "JANITOR_BENCH_POSTGRES_URL"
POSTGRES_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROFILE_ENV = "JANITOR_BENCH_PYSPY"  # a path prefix: py-spy samples of each receiver and sweep go there


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile on the sorted samples (p50 of an even count is the upper middle)."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def postgres_url() -> tuple[str | None, str]:
    """The PostgreSQL URL to benchmark on, or None and why not."""
    url = os.environ.get(POSTGRES_ENV) or POSTGRES_DEFAULT
    try:
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        engine.dispose()
    except Exception as exc:  # noqa: BLE001 - any failure means "skip these figures"
        return None, f"PostgreSQL figures skipped: {url} not reachable ({type(exc).__name__}); set {POSTGRES_ENV}"
    return url, ""


def postgres_schema_url(base: str, name: str) -> str:
    """A URL whose search_path is a fresh schema ``name`` (created here; drop_schema removes it)."""
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {name} CASCADE")
        conn.exec_driver_sql(f"CREATE SCHEMA {name}")
    admin.dispose()
    url = sa.engine.make_url(base).update_query_dict({"options": f"-csearch_path={name}"})
    return url.render_as_string(hide_password=False)


def drop_schema(base: str, name: str) -> None:
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {name} CASCADE")
    admin.dispose()


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    info = {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": ram_gib,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "sqlalchemy": sa.__version__,
        "postgresql": None,
    }
    try:
        out = subprocess.run(["/usr/bin/python3", "--version"], capture_output=True, text=True, timeout=10)
        info["hook_python"] = out.stdout.strip() or out.stderr.strip()
    except OSError:
        info["hook_python"] = None
    url, _ = postgres_url()
    if url:
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            info["postgresql"] = conn.exec_driver_sql("SHOW server_version").scalar()
        engine.dispose()
    return info


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def seed_scene(workdir: Path) -> tuple[Any, str]:
    """The demo's seed scene: a started simulator with its guests, and the URL of a SQLite
    platform database in ``workdir`` holding its rows."""
    db_url = f"sqlite:///{workdir / 'platform.db'}"
    engine = make_engine(db_url)
    seed_database(engine)
    engine.dispose()
    sim = ProxmoxSimulator().start()
    load_into(sim, "seed")
    return sim, db_url


class Receiver:
    """``pve-janitor serve`` in a subprocess, pointed at a simulator and a database.

    ``settings`` are extra environment variables (CLEANUP_*); everything else is the default.
    """

    def __init__(self, workdir: Path, sim, db_url: str, **settings: str):
        self.dir = workdir
        self.port = launch.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.secret = secrets.token_hex(16)
        env = without_settings(os.environ)
        env.update(sim.env(), DATABASE_URL=db_url, CLEANUP_HOOK_SECRET=self.secret,
                   CLEANUP_BIND=f"127.0.0.1:{self.port}", **settings)
        self.log_path = workdir / "receiver.log"
        self.profiler = None
        self.launched = launch.start(env, self.log_path, timeout=60, cwd=ROOT)
        self.proc = self.launched.proc
        if os.environ.get(PROFILE_ENV):
            self.start_profile(f"{os.environ[PROFILE_ENV]}.{self.port}")

    def start_profile(self, path: str) -> None:
        """Sample the receiver with py-spy (``pip install py-spy``) until close(): collapsed stacks to ``path``."""
        extra = os.environ.get("JANITOR_BENCH_PYSPY_ARGS", "").split()  # e.g. --gil
        self.profiler = subprocess.Popen(
            [str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(self.proc.pid), "--rate", "250",
             "--format", "raw", "--threads", *extra, "--output", path],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)

    def hook_conf(self, path: Path, spool: Path, url: str | None = None, timeout: float | None = None) -> Path:
        text = f"URL={url or self.url}\nSECRET={self.secret}\nSPOOL_DIR={spool}\n"
        if timeout is not None:
            text += f"TIMEOUT={timeout}\n"
        path.write_text(text)
        return path

    def wait_for_log(self, text: str, timeout: float = 30) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log_text():
                return True
            time.sleep(0.1)
        return False

    def log_text(self) -> str:
        return self.launched.log_text()

    def log_tail(self, n: int = 4000) -> str:
        return self.log_text()[-n:]

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)

    def close(self) -> None:
        if self.profiler is not None:
            self.profiler.send_signal(signal.SIGINT)
            self.profiler.wait(30)
        self.launched.stop(30)
