"""Fixtures of the reliability suite: the mode switch, databases, a PostgreSQL we may kill.

``make test`` runs the short versions; ``make reliability`` sets
``JANITOR_RELIABILITY=long`` and every count and duration comes from
:func:`scaled`.  PostgreSQL cases use the shared ``postgres_db`` fixture
(mandatory in CI, skipped with its reason elsewhere); cases that stop the
database server use :class:`OwnPostgres`, a throw-away cluster this suite
starts itself with ``initdb``/``pg_ctl``.

``JANITOR_RELIABILITY_REPORT=<path>`` writes the rows the tests record with
:func:`record` to that file as JSON at the end of the session (see
``docs/reliability.md`` for the command that produced its figures).
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import Database, _sqlite_database

from receiver import schema, store
from receiver.db import make_engine
from receiver.simulator.launch import free_port

LONG = os.environ.get("JANITOR_RELIABILITY") == "long"
MODE = "long" if LONG else "short"
REPORT_ENV = "JANITOR_RELIABILITY_REPORT"


def scaled(short: Any, long: Any) -> Any:
    """The short value under ``make test``, the long one under ``make reliability``."""
    return long if LONG else short


# --- databases ---------------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request, tmp_path) -> Iterator[Database]:
    """The same case on a SQLite file and on PostgreSQL (``postgres_db``: own schema, dropped after)."""
    if request.param == "sqlite":
        yield from _sqlite_database(tmp_path)
    else:
        yield request.getfixturevalue("postgres_db")


class OwnPostgres:
    """A PostgreSQL cluster in a temp directory, on a free port: ours to stop and start.

    ``initdb`` refuses to run as root, so as root every command runs as the
    ``postgres`` user (``runuser``) in a directory chowned to it.  The socket
    goes into the temp directory (``-k``), TCP listens on 127.0.0.1 only.
    """

    def __init__(self, bindir: str):
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="janitor-pg-"))
        self.data = self.dir / "data"
        self.logfile = self.dir / "server.log"
        self.port = free_port()
        self.as_root = os.geteuid() == 0
        self._admin: sa.Engine | None = None
        if self.as_root:
            shutil.chown(self.dir, "postgres", "postgres")
        os.chmod(self.dir, 0o700)

    def _run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        command = [os.path.join(self.bindir, args[0]), *args[1:]]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=self.dir)
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args[:2])} failed ({proc.returncode}): {proc.stderr or proc.stdout}\n{self.log_tail()}"
            )
        return proc

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def init(self) -> OwnPostgres:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        return self

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    def start(self) -> float:
        """Start (if stopped) and wait until it accepts connections; returns the seconds it took."""
        started = time.monotonic()
        if not self.running():
            options = (
                f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c full_page_writes=off -c max_connections=60"
            )
            self._run("pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-o", options, "-w", "-t", "60", "start")
        return time.monotonic() - started

    def stop_immediate(self) -> float:
        """``pg_ctl stop -m immediate``: every backend dies at once, nothing is flushed or rolled back
        politely; the next start recovers from the WAL.  Returns the seconds it took."""
        started = time.monotonic()
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
        return time.monotonic() - started

    def new_database(self) -> Database:
        """A fresh database on this server (each test its own)."""
        name = f"jt_{secrets.token_hex(6)}"
        admin = sa.create_engine(self.url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
        admin.dispose()
        url = sa.engine.make_url(self.url).set(database=name).render_as_string(hide_password=False)
        return Database("postgres", url, make_engine(url))

    def destroy(self) -> None:
        if self.data.exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


def postgres_bindir() -> str | None:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: [int(x) if x.isdigit() else 0 for x in p.split("/")[4].split(".")],
    )
    for initdb in reversed(found):
        if os.access(initdb, os.X_OK):
            return os.path.dirname(initdb)
    on_path = shutil.which("initdb")
    return os.path.dirname(on_path) if on_path else None


@pytest.fixture(scope="session")
def own_postgres_server() -> Iterator[OwnPostgres]:
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip(
            "the database-going-away cases start their own PostgreSQL and need its server "
            "binaries (initdb, pg_ctl under /usr/lib/postgresql/*/bin); none found"
        )
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root, initdb must run as the postgres user, and runuser is missing")
    server = OwnPostgres(bindir).init()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture
def own_postgres(own_postgres_server) -> Iterator[tuple[OwnPostgres, Database]]:
    """The own server, running, and a fresh database on it; the server is left running afterwards."""
    own_postgres_server.start()
    database = own_postgres_server.new_database()
    schema.upgrade(database.engine)  # as an installed receiver's database is
    try:
        yield own_postgres_server, database
    finally:
        database.engine.dispose()
        own_postgres_server.start()


# --- state checks shared by the suite ------------------------------------------------


def snapshot(db: Database, table: str = "apps") -> dict[Any, dict[str, Any]]:
    """Every row of the platform table, all columns, by primary key ``id``."""
    with db.engine.connect() as conn:
        return {r["id"]: dict(r) for r in conn.execute(sa.text(f"SELECT * FROM {table}")).mappings()}


def audit_rows(db: Database) -> list[dict[str, Any]]:
    with db.engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(store.audit).order_by(store.audit.c.id)).mappings()]


def counters(db: Database) -> dict[str, int]:
    with db.engine.connect() as conn:
        return store.read_counters(conn)


def check_nothing_half_done(db: Database, before: dict[Any, dict[str, Any]]) -> set[Any]:
    """Every row of ``before`` is either still in the table or in the audit table, never both,
    never neither; each removed row has exactly one audit entry holding the row as it was; the
    counters match the audit.  Returns the keys removed."""
    now = snapshot(db)
    audit = [a for a in audit_rows(db) if a["restored_at"] is None]
    by_key: dict[str, list[dict[str, Any]]] = {}
    for entry in audit:
        by_key.setdefault(entry["row_key"], []).append(entry)
    removed = set(before) - set(now)
    for key in before:
        entries = by_key.get(str(key), [])
        if key in now:
            assert not entries, f"row {key} is both in the table and in the audit: {entries}"
        else:
            assert len(entries) == 1, f"row {key} is gone with {len(entries)} audit entries"
            copy = store.decode_row(entries[0]["row_json"])
            assert {k: _comparable(v) for k, v in copy.items()} == {
                k: _comparable(v) for k, v in before[key].items()
            }, f"audit copy of row {key} differs"
    unexpected = set(by_key) - {str(k) for k in before}
    assert not unexpected, f"audit entries for rows that never were in the table: {unexpected}"
    c = counters(db)
    assert c["total_removed"] == len(audit), (c, len(audit))
    assert c["ghost_apps_removed"] + c["old_errors_removed"] == c["total_removed"], c
    return removed


def _comparable(value: Any) -> Any:
    return value.isoformat(sep=" ") if hasattr(value, "isoformat") else value


# --- the report ----------------------------------------------------------------------

_REPORT: list[dict[str, Any]] = []
_REPORT_LOCK = threading.Lock()


def record(kind: str, **row: Any) -> None:
    """One measured row for docs/reliability.md (written when JANITOR_RELIABILITY_REPORT is set)."""
    with _REPORT_LOCK:
        _REPORT.append({"kind": kind, "mode": MODE, **row})


def pytest_sessionfinish(session, exitstatus) -> None:
    """Append this session's rows to the JSON file and render all of them as Markdown beside it."""
    path = os.environ.get(REPORT_ENV)
    if not path or not _REPORT:
        return
    rows: list[dict[str, Any]] = []
    if os.path.exists(path):
        try:
            rows = json.loads(Path(path).read_text())
        except ValueError:
            rows = []
    rows += _REPORT
    Path(path).write_text(json.dumps(rows, indent=1, default=str))
    Path(path).with_suffix(".md").write_text(render_markdown(rows))


ENTRY_NAMES = {"sweep": "sweep (CLI)", "watcher": "watcher", "manual": "manual run (POST /run)"}


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(rows: list[dict[str, Any]]) -> str:
    """The fault matrix and the crash summary as Markdown tables (docs/reliability.md)."""
    out: list[str] = []
    matrix = [r for r in rows if r["kind"] == "matrix"]
    if matrix:
        out += _matrix_table(matrix) + [""]
    crash = [r for r in rows if r["kind"] == "crash"]
    if crash:
        out += _crash_table(crash) + [""]
    return "\n".join(out)


def _matrix_result(case: dict[str, Any] | None) -> str:
    if case is None:
        return "–"
    own = " (own server)" if case["db"] == "own-postgres" else ""
    return (
        f"pass{own}: {case['during']}, {case['removed_during']} removed, {case['seconds']:.1f} s; "
        f"then {case['recovered']}"
    )


def _matrix_table(matrix: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| fault | entry point | expected | SQLite | PostgreSQL | reason shown (from the SQLite run if any) |",
        "|---|---|---|---|---|---|",
    ]
    for fault in dict.fromkeys(r["fault"] for r in matrix):
        for entry, entry_name in ENTRY_NAMES.items():
            cases = {r["db"]: r for r in matrix if r["fault"] == fault and r["entry"] == entry}
            if not cases:
                continue
            first = next(iter(cases.values()))
            reason = (cases.get("sqlite") or first)["reason"]
            reason = reason if len(reason) <= 110 else reason[:110] + "…"
            postgres = cases.get("postgres") or cases.get("own-postgres")
            cells = [
                first["what"],
                entry_name,
                first["expect"],
                _matrix_result(cases.get("sqlite")),
                _matrix_result(postgres),
                reason,
            ]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def _crash_table(crash: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| part | database | kills | one run takes | before | during | between | after | "
        "backlog left by the kill | next start finished in | violations |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for part in ("sweep", "watcher"):
        for db in ("sqlite", "postgres"):
            group = [r for r in crash if r["part"] == part and r["db"] == db]
            if not group:
                continue
            states = Counter(r["state"] for r in group)
            backlog = [r["backlog_left"] for r in group if "backlog_left" in r]
            recovery = sorted(r["recovered_s"] for r in group if "recovered_s" in r)
            cells = [
                part,
                db,
                len(group),
                f"{group[0]['calibration_s']:.2f} s",
                states["before"],
                states["during"],
                states["between"],
                states["after"],
                f"{min(backlog)}–{max(backlog)} events" if backlog else "–",
                f"median {recovery[len(recovery) // 2]:.1f} s" if recovery else "–",
                0,
            ]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines
