"""Sweep scaling: one forced sweep of tables of 1,000 / 10,000 / 100,000 rows, 10 % ghosts.

For each size and database (SQLite; PostgreSQL when reachable, see bench.common.postgres_url)
the parent builds the table (``apps``, the seed platform's schema, rows a day old) and a copy
of it (``apps_floor``), and a simulator with as many guests as rows: the 90 % of rows that
have their guest (named as the row's hostname), plus 10 % guests with no row.  A fresh
subprocess per size then runs, in process, ``Runtime.build`` + ``runtime.sweeper.run(force=True)``
(force only lifts the percentage guard, which 10 % does not trip anyway), so that sizes do
not pollute each other:

* wall time of the sweep, and where it went (table read, inventory reads, plan, VMID checks,
  apply), timed by wrapping those calls from outside;
* inventory reads (``on_read``) and every API call the simulator answered, by path;
* SQL statements, counted with a ``before_cursor_execute`` listener (an executemany is one), and
  PostgreSQL's ``COPY`` of the audit entries, which that listener does not see;
* peak RSS of the process after the sweep (VmHWM; see _peak_rss_mb for why not ``ru_maxrss``),
  before anything else runs in it.

Then the floor, in the same process on the copy: read the key columns (``SELECT id, lxc_id``),
parse the inventory JSON (the very bytes the simulator serves, fetched beforehand; parsing
only), compute the ghost ids, and one ``DELETE ... WHERE id IN (...)`` committed.

The simulator is a Python process too; serving 100,000 guests costs it about a second per
read (building and serialising 30 MB of JSON), which a real cluster spends in pveproxy
instead.  ``sim_serving_s`` is that cost (the best of three fetches of the raw answer from the
parent, times the sweep's inventory reads).  ``own_work_s`` is the wall time without it and
without the per-ghost VMID checks (one ``/cluster/nextid`` round trip per ghost).

    .venv/bin/python -m bench.sweep_scale [--sizes 1000,10000] [--no-postgres]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import requests
import sqlalchemy as sa

from bench.common import PROFILE_ENV, ROOT, drop_schema, postgres_schema_url, postgres_url
from receiver.db import make_engine
from receiver.simulator import ProxmoxSimulator
from receiver.simulator.scene import app_row, create_apps_table

SIZES = (1_000, 10_000, 100_000)
GHOST_EVERY = 10
INSERT_CHUNK = 5_000


# --------------------------------------------------------------------------- parent


def _vmids(size: int) -> tuple[list[int], list[int], list[int]]:
    rows = list(range(100, 100 + size))
    ghosts = [v for i, v in enumerate(rows) if i % GHOST_EVERY == 0]
    ghost_set = set(ghosts)
    unmanaged = list(range(100 + size, 100 + size + len(ghosts)))
    guests = [v for v in rows if v not in ghost_set] + unmanaged
    return rows, ghosts, guests


def _fill(engine: sa.Engine, size: int) -> None:
    rows, _, _ = _vmids(size)
    tables = [create_apps_table(engine, name) for name in ("apps", "apps_floor")]
    for table in tables:
        for start in range(0, size, INSERT_CHUNK):
            with engine.begin() as conn:
                conn.execute(table.insert(), [app_row(v, "running", age=timedelta(days=1))
                                              for v in rows[start:start + INSERT_CHUNK]])
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")


def _fetch_raw(sim: ProxmoxSimulator) -> tuple[bytes, float]:
    """The /cluster/resources?type=vm answer as bytes, and the best of three fetch times."""
    headers = {"Authorization": f"PVEAPIToken={sim.token_id}={sim.token_value}"}
    times, raw = [], b""
    for _ in range(3):
        started = time.perf_counter()
        answer = requests.get(f"{sim.url}/cluster/resources", params={"type": "vm"}, headers=headers,
                              verify=sim.ca_path, timeout=120)
        raw = answer.content
        times.append(time.perf_counter() - started)
    return raw, min(times)


def run_one(db: str, size: int, workdir: Path, pg_base: str | None) -> dict[str, Any]:
    schema = None
    if db == "sqlite":
        url = f"sqlite:///{workdir / f'sweep-{size}.db'}"
    else:
        schema = f"bench_sweep_{size}"
        url = postgres_schema_url(pg_base, schema)
    engine = make_engine(url)
    sim = ProxmoxSimulator().start()
    try:
        _fill(engine, size)
        engine.dispose()
        rows, ghosts, guests = _vmids(size)
        with_row = set(rows)
        for i, v in enumerate(guests):
            # Named as the platform's row names it (scene.app_row), as a platform's guests are:
            # a name that differs is reported as a possibly reused VMID.
            sim.add_guest(v, node="pve1" if i % 2 else "pve2", name=f"app{v}.apps.local" if v in with_row else None)
        raw, sim_serve_s = _fetch_raw(sim)
        inventory_path = workdir / f"inventory-{size}.json"
        inventory_path.write_bytes(raw)
        sim.reset_counts()
        args = {"url": url, "env": sim.env(), "inventory": str(inventory_path), "ghosts": len(ghosts)}
        command = [sys.executable, "-m", "bench.sweep_scale", "--child", json.dumps(args)]
        if os.environ.get(PROFILE_ENV):  # sample the sweep's process with py-spy
            command = [str(Path(sys.executable).with_name("py-spy")), "record", "--rate", "250", "--format", "raw",
                       "--output", f"{os.environ[PROFILE_ENV]}.{db}-{size}", "--"] + command
        proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"sweep child failed ({db}, {size}):\n{proc.stderr[-4000:]}")
        result = json.loads(next(line for line in reversed(proc.stdout.splitlines()) if line.startswith("{")))
        result["api_calls"] = {path: sim.request_count(path) for path in
                               ("/cluster/resources", "/access/permissions", "/cluster/nextid", "/cluster/tasks")}
        result["api_calls_total"] = sim.request_count("")
        result["sim_serve_s"] = round(sim_serve_s, 3)
        result["inventory_bytes"] = len(raw)
        return result
    finally:
        sim.stop()
        engine.dispose()
        if schema:
            drop_schema(pg_base, schema)


def figures_of(db: str, size: int, r: dict[str, Any]) -> dict[str, Any]:
    p = f"sweep_{db}_{size // 1000}k"
    sim_serving = r["inventory_reads"] * r["sim_serve_s"]
    vmid_checks = r["phases_s"].get("vmid_checks_s", 0.0)
    # The sweep's own work: the wall time without the simulator's serving of the inventory
    # and without the per-ghost /cluster/nextid checks (a round trip each, see docs/performance.md).
    own = r["wall_s"] - sim_serving - vmid_checks
    return {
        f"{p}_wall_s": r["wall_s"],
        f"{p}_floor_s": r["floor_s"],
        f"{p}_ratio_to_floor": round(r["wall_s"] / r["floor_s"], 2),
        f"{p}_sim_serving_s": round(sim_serving, 3),
        f"{p}_vmid_checks_s": vmid_checks,
        f"{p}_own_work_s": round(own, 3),
        f"{p}_own_work_ratio_to_floor": round(own / r["floor_s"], 2),
        f"{p}_inventory_reads": r["inventory_reads"],
        f"{p}_api_calls": r["api_calls_total"],
        f"{p}_nextid_calls": r["api_calls"]["/cluster/nextid"],
        f"{p}_sql_statements": r["statements"],
        f"{p}_peak_rss_mb": r["peak_rss_mb"],
        f"{p}_rows_removed": r["applied"],
    }


def measure(sizes: tuple[int, ...] = SIZES, postgres: bool = True,
            sqlite: bool = True) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Figures, the per-run detail (phases, statement kinds), and notes."""
    notes: list[str] = []
    dbs = ["sqlite"] if sqlite else []
    pg_base = None
    if postgres:
        pg_base, why = postgres_url()
        if pg_base:
            dbs.append("postgres")
        else:
            notes.append(why)
    figures: dict[str, Any] = {}
    detail: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="pve-janitor-sweep-") as tmp:
        for db in dbs:
            for size in sizes:
                started = time.monotonic()
                r = run_one(db, size, Path(tmp), pg_base)
                figures.update(figures_of(db, size, r))
                detail[f"{db}_{size}"] = r
                print(f"  sweep {db:8} {size:>7} rows: {r['wall_s']:.2f} s (floor {r['floor_s']:.3f} s), "
                      f"{r['statements']} statements, {r['inventory_reads']} reads, {r['peak_rss_mb']} MB "
                      f"[{time.monotonic() - started:.0f} s]", flush=True)
    return figures, detail, notes


# --------------------------------------------------------------------------- child


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM).

    Not ``ru_maxrss``: on Linux it survives execve, so a child started by a parent that
    holds a 100,000-guest simulator starts with the parent's peak.  VmHWM belongs to the
    new program image only; ``ru_maxrss`` is used where /proc is missing.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def child(args: dict[str, Any]) -> dict[str, Any]:
    from sqlalchemy import event

    import receiver.removal as removal_module
    from receiver.config import load_settings
    from receiver.runtime import Runtime

    env = dict(args["env"], DATABASE_URL=args["url"])
    settings = load_settings(env=env)
    engine = make_engine(args["url"])
    statements: Counter = Counter()

    @event.listens_for(engine, "before_cursor_execute")
    def _count(conn, cursor, statement, parameters, context, executemany):
        statements[statement.lstrip().split(None, 1)[0].upper()] += 1

    try:  # on PostgreSQL the audit copies go by COPY, past SQLAlchemy's events: counted here
        import psycopg
    except ImportError:
        psycopg = None
    if psycopg is not None:
        copy = psycopg.Cursor.copy

        def counted_copy(self: Any, statement: Any, *a: Any, **k: Any) -> Any:
            statements["COPY"] += 1
            return copy(self, statement, *a, **k)
        psycopg.Cursor.copy = counted_copy

    reads: list[float] = []
    runtime = Runtime.build(
        settings, engine=engine, upgrade=True, on_read=lambda seconds, outcome: reads.append(seconds)
    )
    phases: Counter = Counter()
    peaks: dict[str, float] = {}  # peak RSS after the last call of each phase

    def timed(owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)

        def wrapper(*a: Any, **k: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                phases[label] += time.perf_counter() - started
                peaks[label] = _peak_rss_mb()
        setattr(owner, name, wrapper)

    timed(runtime.table, "fetch_rows", "table_read_s")
    timed(runtime.inventory, "read", "inventory_reads_s")
    timed(runtime.inventory, "vmid_in_use", "vmid_checks_s")
    timed(removal_module, "make_plan", "plan_s")
    timed(removal_module, "apply_actions", "apply_s")

    statements.clear()
    rss_before = _peak_rss_mb()
    started = time.perf_counter()
    result = runtime.sweeper.run(force=True)
    wall = time.perf_counter() - started
    rss = _peak_rss_mb()
    n_statements = sum(statements.values())
    kinds = dict(statements)
    applied = len(result.applied.applied) if result.applied else 0
    if result.outcome != "done" or applied != args["ghosts"]:
        raise SystemExit(f"sweep outcome {result.outcome!r} ({result.reason}), applied {applied} "
                         f"of {args['ghosts']} ghosts")

    # The floor, on the copy: key columns, JSON parse, ghost ids, one DELETE.
    raw = Path(args["inventory"]).read_bytes()
    floor: dict[str, float] = {}
    t0 = time.perf_counter()
    with engine.connect() as conn:
        keys = conn.execute(sa.text("SELECT id, lxc_id FROM apps_floor")).all()
    t1 = time.perf_counter()
    guests = {e["vmid"] for e in json.loads(raw)["data"] if e.get("type") in ("lxc", "qemu")}
    t2 = time.perf_counter()
    ghost_ids = [k for k, vmid in keys if vmid not in guests]
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM apps_floor WHERE id IN :ids").bindparams(sa.bindparam("ids", expanding=True)),
                     {"ids": ghost_ids})
    t3 = time.perf_counter()
    floor = {"read_keys_s": t1 - t0, "parse_json_s": t2 - t1, "delete_s": t3 - t2}
    if len(ghost_ids) != args["ghosts"]:
        raise SystemExit(f"floor found {len(ghost_ids)} ghosts, expected {args['ghosts']}")
    engine.dispose()
    return {
        "wall_s": round(wall, 3),
        "phases_s": {k: round(v, 3) for k, v in sorted(phases.items())},
        "peak_rss_after_phase_mb": peaks,
        "inventory_reads": len(reads),
        "statements": n_statements,
        "statement_kinds": kinds,
        "peak_rss_mb": rss,
        "rss_before_sweep_mb": rss_before,
        "applied": applied,
        "floor_s": round(sum(floor.values()), 3),
        "floor_parts_s": {k: round(v, 3) for k, v in floor.items()},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(str(s) for s in SIZES))
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--no-sqlite", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return {}
    figures, detail, notes = measure(tuple(int(s) for s in args.sizes.split(",")), not args.no_postgres,
                                     not args.no_sqlite)
    for key, value in figures.items():
        print(f"{key:50} {value}")
    print(json.dumps(detail, indent=1))
    for note in notes:
        print("note:", note)
    return figures


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
