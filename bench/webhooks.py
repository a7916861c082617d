"""Webhooks: delivery latency after the commit, and what the outbox costs a 100,000-row sweep.

(a) **Latency.**  ``pve-janitor serve`` in a subprocess (SQLite, the simulator) with one
    webhook URL, a local target (a threaded ``http.server`` on 127.0.0.1 answering 204 at
    once).  Each of N removals is a guest destroyed and ``POST /api/v1/system/cleanup/run``
    (one row per sweep), spaced by a random 0.2-0.8 s so that commits fall on every phase of
    the deliverer's 0.5 s poll.  Latency: from the event's ``time`` (the change's clock,
    read as its apply transaction begins, so the figure includes that transaction) to the
    target's receipt of the POST.  Goal: p95 <= 1 s.

(b) **Cost in the transaction.**  The forced 100,000-row sweep of bench/sweep_scale.py (10 %
    ghosts: 10,000 rows removed, audited and, here, reported) run in a fresh process, once
    with ``CLEANUP_WEBHOOK_URLS`` set (one URL, nothing listening: no deliverer runs in that
    process, so only the events written in the removal's transaction count) and once
    without, alternately, ``RUNS`` times each, on SQLite and on PostgreSQL when reachable.
    The events change one thing only, the apply transaction (``apply_actions``: the audit
    ids read back, the events built, the outbox rows inserted), so the figure is what they
    add there: the difference of the medians of the apply phase's wall time, as a % of the
    median sweep without a URL.  Goal: <= 10 %.  Beside it: the same in CPU seconds of the
    sweep's process (``_cpu_cost_pct``: another job on this 2-CPU machine hardly moves them;
    the I/O waits and PostgreSQL's server are not in them), and the difference of the whole
    sweeps (``_sweep_diff_pct``: the same cost plus the noise of the rest, the simulator
    serving a 30 MB guest list twice, which on a loaded machine is larger than the cost).

    .venv/bin/python -m bench.webhooks [--removals 50] [--runs 7] [--size 100000] [--no-postgres]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench.common import ROOT, Receiver, drop_schema, percentile, postgres_schema_url, postgres_url
from bench.sweep_scale import _fetch_raw, _fill, _vmids
from receiver.db import make_engine
from receiver.simulator import ProxmoxSimulator, launch
from receiver.simulator.scene import app_row, create_apps_table

SECRET = "bench-webhook-secret"
STAYING = range(100, 200)  # rows whose guests stay: one removal per sweep is never near the guard
RUNS = 7
SIZE = 100_000


# --------------------------------------------------------------------------- (a) latency


class Target:
    """A webhook target on 127.0.0.1 that notes when each event arrived (by its id)."""

    def __init__(self) -> None:
        self.arrived: dict[str, tuple[float, dict[str, Any]]] = {}
        self.lock = threading.Lock()
        target = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                at = time.time()
                event = json.loads(body)
                with target.lock:
                    target.arrived.setdefault(event["id"], (at, event))
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", launch.free_port()), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def removed(self, vmid: int) -> tuple[float, dict[str, Any]] | None:
        with self.lock:
            for at, event in self.arrived.values():
                if event["type"] == "pve-janitor.row.removed" and event["data"]["vmid"] == vmid:
                    return at, event
        return None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _run_sweep(receiver: Receiver, token: str) -> int:
    """``POST /run``; again while another sweep (the one at start, a scheduled one) is running (409)."""
    request = urllib.request.Request(
        receiver.url + "/api/v1/system/cleanup/run", method="POST", headers={"Authorization": f"Bearer {token}"}
    )
    for _ in range(600):
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                return answer.status
        except urllib.error.HTTPError as err:
            if err.code != 409:
                return err.code
        time.sleep(0.05)
    return 409


def measure_latency(removals: int = 50, seed: int = 20261125) -> dict[str, Any]:
    rng = random.Random(seed)
    ghosts = list(range(1000, 1000 + removals))
    latencies: list[float] = []
    missed = 0
    with tempfile.TemporaryDirectory(prefix="pve-janitor-webhooks-") as tmp:
        workdir = Path(tmp)
        db_url = f"sqlite:///{workdir / 'platform.db'}"
        engine = make_engine(db_url)
        table = create_apps_table(engine)
        with engine.begin() as conn:
            conn.execute(table.insert(), [app_row(v, "running", age=timedelta(days=1)) for v in [*STAYING, *ghosts]])
        engine.dispose()
        sim = ProxmoxSimulator().start()
        target = Target()
        token = "bench-admin-token"
        receiver = None
        try:
            for v in [*STAYING, *ghosts]:
                sim.add_guest(v, node="pve1" if v % 2 else "pve2", name=f"app{v}.apps.local")
            receiver = Receiver(
                workdir,
                sim,
                db_url,
                CLEANUP_WEBHOOK_URLS=target.url,
                CLEANUP_WEBHOOK_SECRET=SECRET,
                CLEANUP_ADMIN_TOKEN=token,
            )
            for vmid in ghosts:
                sim.destroy_guest(vmid)
                status = _run_sweep(receiver, token)
                deadline = time.monotonic() + 10
                found = target.removed(vmid)
                while found is None and time.monotonic() < deadline:
                    time.sleep(0.002)
                    found = target.removed(vmid)
                if found is None or status != 200:
                    missed += 1
                else:
                    at, event = found
                    changed = datetime.fromisoformat(event["time"].replace("Z", "+00:00")).timestamp()
                    latencies.append(at - changed)
                time.sleep(rng.uniform(0.2, 0.8))
        finally:
            if receiver is not None:
                receiver.close()
            target.close()
            sim.stop()
    if not latencies:
        return {"webhook_latency_missed": missed}
    return {
        "webhook_latency_p50_s": round(percentile(latencies, 50), 3),
        "webhook_latency_p95_s": round(percentile(latencies, 95), 3),
        "webhook_latency_max_s": round(max(latencies), 3),
        "webhook_latency_mean_s": round(statistics.fmean(latencies), 3),
        "webhook_latency_removals": len(latencies),
        "webhook_latency_missed": missed,
    }


# --------------------------------------------------------------------------- (b) cost in the sweep


def _one_sweep(
    db: str,
    size: int,
    sim: ProxmoxSimulator,
    inventory: Path,
    workdir: Path,
    pg_base: str | None,
    n: int,
    with_url: bool,
) -> dict[str, Any]:
    """A fresh table, then :func:`child` in a fresh process, with or without a webhook URL."""
    schema = None
    if db == "sqlite":
        url = f"sqlite:///{workdir / f'webhooks-{size}-{n}.db'}"
    else:
        schema = f"bench_webhooks_{n}"
        url = postgres_schema_url(pg_base or "", schema)
    engine = make_engine(url)
    try:
        _fill(engine, size)
        engine.dispose()
        env = dict(sim.env())
        if with_url:  # nothing listens there; the child runs no deliverer anyway
            env.update(
                CLEANUP_WEBHOOK_URLS=f"http://127.0.0.1:{launch.free_port()}/hook", CLEANUP_WEBHOOK_SECRET=SECRET
            )
        args = {"url": url, "env": env, "inventory": str(inventory), "ghosts": len(_vmids(size)[1])}
        proc = subprocess.run(
            [sys.executable, "-m", "bench.webhooks", "--child", json.dumps(args)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=1800,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"sweep child failed ({db}, {size}, url={with_url}):\n{proc.stderr[-4000:]}")
        result = json.loads(next(line for line in reversed(proc.stdout.splitlines()) if line.startswith("{")))
        check = make_engine(url)
        with check.connect() as conn:
            events = conn.execute(sa.text("SELECT COALESCE(SUM(event_count), 0) FROM janitor_outbox")).scalar_one()
        check.dispose()
        result["events"] = int(events)
        return result
    finally:
        engine.dispose()
        if schema:
            drop_schema(pg_base or "", schema)


def child(args: dict[str, Any]) -> dict[str, Any]:
    """One forced sweep, in this fresh process: its wall and CPU time, and its apply phase's.

    CPU time is this process's (the simulator serves from the parent), so another job on the
    machine slows the wall clock, not these seconds; on PostgreSQL the server's own work is not
    in them (its wall time is).
    """
    import receiver.removal as removal_module
    from receiver.config import load_settings
    from receiver.runtime import Runtime

    settings = load_settings(env=dict(args["env"], DATABASE_URL=args["url"]))
    engine = make_engine(args["url"])
    runtime = Runtime.build(settings, engine=engine, upgrade=True)
    apply: dict[str, float] = {"wall": 0.0, "cpu": 0.0}
    original = removal_module.apply_actions

    def timed(*a: Any, **k: Any) -> Any:
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return original(*a, **k)
        finally:
            apply["wall"] += time.perf_counter() - wall
            apply["cpu"] += time.thread_time() - cpu

    removal_module.apply_actions = timed  # type: ignore[assignment]
    wall, cpu = time.perf_counter(), time.process_time()
    result = runtime.sweeper.run(force=True)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    applied = len(result.applied.applied) if result.applied else 0
    if result.outcome != "done" or applied != args["ghosts"]:
        raise SystemExit(f"sweep {result.outcome!r} ({result.reason}), applied {applied} of {args['ghosts']}")
    engine.dispose()
    return {
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "apply_wall_s": round(apply["wall"], 3),
        "apply_cpu_s": round(apply["cpu"], 3),
        "applied": applied,
    }


def measure_cost(
    size: int = SIZE, runs: int = RUNS, postgres: bool = True
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    notes: list[str] = []
    dbs = ["sqlite"]
    pg_base = None
    if postgres:
        pg_base, why = postgres_url()
        if pg_base:
            dbs.append("postgres")
        else:
            notes.append(why)
    figures: dict[str, Any] = {}
    detail: dict[str, Any] = {}
    label = f"{size // 1000}k"
    with tempfile.TemporaryDirectory(prefix="pve-janitor-webhooks-") as tmp:
        workdir = Path(tmp)
        rows, ghosts, guests = _vmids(size)
        with_row = set(rows)
        sim = ProxmoxSimulator().start()
        try:
            for i, v in enumerate(guests):
                sim.add_guest(v, node="pve1" if i % 2 else "pve2", name=f"app{v}.apps.local" if v in with_row else None)
            raw, _ = _fetch_raw(sim)
            inventory = workdir / "inventory.json"
            inventory.write_bytes(raw)
            for db in dbs:
                runs_of: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
                events = 0
                for n in range(runs):
                    for with_url in (False, True) if n % 2 == 0 else (True, False):
                        r = _one_sweep(db, size, sim, inventory, workdir, pg_base, n * 2 + with_url, with_url)
                        runs_of[with_url].append(r)
                        if with_url:
                            events = r["events"]
                        elif r["events"]:
                            raise RuntimeError("events written without a webhook URL")
                        print(
                            f"  outbox cost {db:8} {size:>7} rows, URL {'set' if with_url else 'unset'}: "
                            f"{r['wall_s']:.2f} s, CPU {r['cpu_s']:.2f} s (apply {r['apply_wall_s']:.3f} s, "
                            f"CPU {r['apply_cpu_s']:.3f} s)",
                            flush=True,
                        )

                def med(key: str, with_url: bool, runs_of: dict[bool, list[dict[str, Any]]] = runs_of) -> float:
                    return statistics.median(r[key] for r in runs_of[with_url])

                p = f"webhook_outbox_{db}_{label}"
                added = med("apply_wall_s", True) - med("apply_wall_s", False)
                added_cpu = med("apply_cpu_s", True) - med("apply_cpu_s", False)
                figures.update(
                    {
                        # What the events add to the removal's transaction, as a % of the sweep.
                        f"{p}_cost_pct": round(100 * added / med("wall_s", False), 1),
                        f"{p}_added_s": round(added, 3),
                        f"{p}_apply_without_s": round(med("apply_wall_s", False), 3),
                        f"{p}_apply_with_s": round(med("apply_wall_s", True), 3),
                        f"{p}_sweep_without_s": round(med("wall_s", False), 3),
                        f"{p}_sweep_with_s": round(med("wall_s", True), 3),
                        # The same in CPU seconds of the sweep's process (another job on the
                        # machine hardly moves them; I/O waits and PostgreSQL's server are not in them).
                        f"{p}_cpu_cost_pct": round(100 * added_cpu / med("cpu_s", False), 1),
                        f"{p}_cpu_added_s": round(added_cpu, 3),
                        # The whole sweeps' difference: the same cost plus the noise of the rest.
                        f"{p}_sweep_diff_pct": round(100 * (med("wall_s", True) / med("wall_s", False) - 1), 1),
                        f"{p}_events": events,
                    }
                )
                detail[f"{db}_{size}"] = {
                    key: {"without": [r[key] for r in runs_of[False]], "with": [r[key] for r in runs_of[True]]}
                    for key in ("wall_s", "cpu_s", "apply_wall_s", "apply_cpu_s")
                }
        finally:
            sim.stop()
    return figures, detail, notes


def measure(
    removals: int = 50, runs: int = RUNS, size: int = SIZE, postgres: bool = True
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    figures = measure_latency(removals)
    cost, detail, notes = measure_cost(size, runs, postgres)
    figures.update(cost)
    return figures, detail, notes


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--removals", type=int, default=50)
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return {}
    figures, detail, notes = measure(args.removals, args.runs, args.size, not args.no_postgres)
    for key, value in figures.items():
        print(f"{key:50} {value}")
    print(json.dumps(detail, indent=1))
    for note in notes:
        print("note:", note)
    return figures


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
