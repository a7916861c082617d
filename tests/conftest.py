"""Shared fixtures: real databases (SQLite files, PostgreSQL, MariaDB), the simulator, the CLI.

PostgreSQL and MariaDB tests run when JANITOR_TEST_POSTGRES_URL /
JANITOR_TEST_MYSQL_URL are set (``.ci/run`` sets both, so in CI they are
mandatory: an unreachable server fails them), and otherwise whenever a server
answers on its default local port with the default URL (:data:`DEFAULT_URLS`,
probed once per session), so ``make test`` runs what CI runs.  Without a server
their tests are deselected and one line of the summary says how to run them.
Each test gets its own schema (PostgreSQL) or database (MariaDB), dropped afterwards.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from proxmoxer import ProxmoxAPI

from receiver.config import load_settings, without_settings
from receiver.db import make_engine
from receiver.runtime import Runtime
from receiver.schema import upgrade
from receiver.simulator import ProxmoxSimulator
from receiver.simulator.launch import cli_command
from receiver.simulator.scene import app_row, create_apps_table, load_into, seed_database

ROOT = Path(__file__).resolve().parent.parent
OPENAPI_SPEC = ROOT / "docs" / "openapi.yaml"
PG_ENV, MY_ENV = "JANITOR_TEST_POSTGRES_URL", "JANITOR_TEST_MYSQL_URL"
DEFAULT_URLS = {
    PG_ENV: "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    MY_ENV: "mysql+pymysql://root@127.0.0.1:3306/test",
}
SERVER_KINDS = {"postgres": PG_ENV, "mysql": MY_ENV}
_unavailable: dict[str, str] = {}  # kind -> why its server tests do not run
_not_run: dict[str, int] = {}  # kind -> how many were deselected


def _probe(url: str) -> str | None:
    """None when the server of ``url`` answers and lets us in, else why not (one line)."""
    parsed = sa.engine.make_url(url)
    where = f"{parsed.host}:{parsed.port}"
    try:
        socket.create_connection((parsed.host, parsed.port or 0), timeout=0.5).close()
    except OSError:
        return f"nothing answers on {where}"
    engine = sa.create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect():
            return None
    except sa.exc.DBAPIError as exc:
        return f"{where} answers but refused {url}: {str(exc.orig).strip().splitlines()[0]}"
    finally:
        engine.dispose()


def pytest_configure(config: pytest.Config) -> None:
    """A set URL is used as it is (and must work); otherwise the default URL, if its server answers."""
    for kind, env in SERVER_KINDS.items():
        if os.environ.get(env):
            continue
        why = _probe(DEFAULT_URLS[env])
        if why is None:
            os.environ[env] = DEFAULT_URLS[env]  # for the fixtures and the subprocesses alike
        else:
            _unavailable[kind] = why


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests of a server that does not answer are deselected (one summary line), not skipped one by one."""
    if not _unavailable:
        return
    keep, drop = [], []
    for item in items:
        kind = next(
            (k for k in _unavailable if item.get_closest_marker(k) or f"{k}_db" in getattr(item, "fixturenames", ())),
            None,
        )
        if kind is None:
            keep.append(item)
        else:
            drop.append(item)
            _not_run[kind] = _not_run.get(kind, 0) + 1
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _not_run:
        why = "; ".join(f"{kind}: {_unavailable[kind]}" for kind in _not_run)
        terminalreporter.write_line(
            f"{sum(_not_run.values())} PostgreSQL/MariaDB tests not run ({why}): start the server, "
            f"or set {PG_ENV} / {MY_ENV} (e.g. {DEFAULT_URLS[PG_ENV]}), to run them"
        )


@dataclass
class Database:
    kind: str
    url: str
    engine: sa.Engine


def _server_database(kind: str, migrated: bool = True) -> Generator[Database, None, None]:
    env = PG_ENV if kind == "postgres" else MY_ENV
    base = os.environ.get(env)
    if not base:
        pytest.skip(
            f"{kind} tests need {env} (set by .ci/run; e.g. "
            f"{'postgresql+psycopg://postgres@127.0.0.1:5432/test' if kind == 'postgres' else 'mysql+pymysql://root@127.0.0.1:3306/test'})"
        )
    name = f"jt_{secrets.token_hex(6)}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    url_obj = sa.engine.make_url(base)
    with admin.connect() as conn:
        if kind == "postgres":
            conn.exec_driver_sql(f"CREATE SCHEMA {name}")
            url = url_obj.update_query_dict({"options": f"-csearch_path={name}"}).render_as_string(hide_password=False)
        else:
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
            url = url_obj.set(database=name).render_as_string(hide_password=False)
    engine = make_engine(url)
    try:
        if migrated:
            upgrade(engine)
        yield Database(kind, url, engine)
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {name} CASCADE" if kind == "postgres" else f"DROP DATABASE {name}")
        admin.dispose()


def _sqlite_database(tmp_path: Path, migrated: bool = True) -> Generator[Database, None, None]:
    """``migrated``: pve-janitor's tables made, as ``pve-janitor db upgrade`` makes them on an install."""
    url = f"sqlite:///{tmp_path / 'platform.db'}"
    engine = make_engine(url)
    if migrated:
        upgrade(engine)
    yield Database("sqlite", url, engine)
    engine.dispose()


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    yield from _sqlite_database(tmp_path)


@pytest.fixture
def postgres_db() -> Iterator[Database]:
    yield from _server_database("postgres")


@pytest.fixture
def mysql_db() -> Iterator[Database]:
    yield from _server_database("mysql")


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("mysql", marks=pytest.mark.mysql),
    ]
)
def any_db(request, tmp_path) -> Iterator[Database]:
    """The same test on SQLite, PostgreSQL and MariaDB."""
    if request.param == "sqlite":
        yield from _sqlite_database(tmp_path)
    else:
        yield from _server_database(request.param)


@pytest.fixture
def sim() -> Iterator[ProxmoxSimulator]:
    with ProxmoxSimulator(nodes=("pve1", "pve2")).start() as simulator:
        yield simulator


@pytest.fixture
def seed_sim(sim) -> ProxmoxSimulator:
    load_into(sim, "seed")
    return sim


def proxmox_client(sim: ProxmoxSimulator) -> ProxmoxAPI:
    """proxmoxer's own client on the simulator, as a user's script would make one."""
    host, port = sim.pve_host.rsplit(":", 1)
    return ProxmoxAPI(
        host,
        port=int(port),
        user=sim.user,
        token_name=sim.token_name,
        token_value=sim.token_value,
        verify_ssl=sim.ca_path,
        timeout=5,
    )


def janitor_env(sim: ProxmoxSimulator, db: Database, **extra: Any) -> dict[str, str]:
    """The environment a user would export: simulator connection + database + extras."""
    env = without_settings(os.environ)
    env.update(sim.env())
    env["DATABASE_URL"] = db.url
    env.update({k: str(v) for k, v in extra.items()})
    return env


def make_runtime(sim: ProxmoxSimulator, db: Database, **overrides: Any) -> Runtime:
    """A runtime as ``serve`` builds one: pve-janitor's tables brought up to date first."""
    settings = load_settings(env=janitor_env(sim, db), overrides=overrides)
    return Runtime.build(settings, engine=db.engine, upgrade=True)


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def run_cli(args: list[str], env: dict[str, str], timeout: float = 60) -> CliResult:
    proc = subprocess.run(cli_command() + args, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def seeded(any_db) -> Database:
    seed_database(any_db.engine)
    return any_db


def running_apps(sim: ProxmoxSimulator, db: Database, vmids=range(100, 105)) -> sa.Table:
    """An ``apps`` table with a day-old running row for each VMID, and each guest running
    (odd VMIDs on pve1, even ones on pve2), named after its row's hostname."""
    table = create_apps_table(db.engine)
    with db.engine.begin() as conn:
        conn.execute(table.insert(), [app_row(v, "running", age=timedelta(days=1)) for v in vmids])
    for v in vmids:
        sim.add_guest(v, node="pve1" if v % 2 else "pve2", name=f"app{v}.apps.local")
    return table


def sorted_vmids(vmids: Iterable[int | None]) -> list[int | None]:
    """In order, a NULL (no VMID) last."""
    return sorted(vmids, key=lambda v: (v is None, v or 0))


def table_vmids(db: Database, table: str = "apps") -> list[int | None]:
    with db.engine.connect() as conn:
        return sorted_vmids(conn.execute(sa.text(f"SELECT lxc_id FROM {table}")).scalars())


def after_read(sim, n, fn):
    """Run ``fn`` right after the simulator has built its n-th /cluster/resources?type=vm answer."""
    resources, reads = sim._api_resources, []

    def wrapped(query):
        answer = resources(query)
        if (query.get("type") or [None])[0] == "vm":
            reads.append(1)
            if len(reads) == n:
                fn()
        return answer

    sim._api_resources = wrapped


def openapi_spec() -> dict:
    """docs/openapi.yaml, parsed."""
    return yaml.safe_load(OPENAPI_SPEC.read_text())


def served_routes(app: Any, endpoint: Any) -> set[tuple[str, str]]:
    """(path in OpenAPI's spelling, METHOD) of every rule of ``app`` whose endpoint name
    ``endpoint`` accepts; HEAD and OPTIONS, which every route answers, left out."""
    return {
        (re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule), method)  # Flask's <int:id> is OpenAPI's {id}
        for rule in app.url_map.iter_rules()
        if endpoint(rule.endpoint)
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}
    }


def documented_routes(prefixes: str | tuple[str, ...] = "") -> set[tuple[str, str]]:
    """(path, METHOD) of every operation docs/openapi.yaml documents under ``prefixes``."""
    return {
        (path, method.upper())
        for path, item in openapi_spec()["paths"].items()
        if path.startswith(prefixes)
        for method in item
        if method in ("get", "post", "put", "patch", "delete")
    }
