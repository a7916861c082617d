"""The allocator: 100 concurrent allocations against a real ``pve-janitor serve`` on PostgreSQL.

End to end, as a deployment pipeline sees it: HTTP clients (threads, each with its own
keep-alive connection, opened beforehand) → ``POST /api/v1/allocations`` of a real receiver
(waitress, its 32 threads) → the guest list from the simulator, the PostgreSQL reads, the
``/cluster/nextid`` confirmation and the reserving transaction.

The platform table holds ``SIZE`` rows with dense VMIDs from 100 (the worst case for "the
lowest free VMID": the scan walks the whole dense prefix), each with its running guest in
the simulator; public ports are dense up to the range's start.  Each request asks for a VMID,
a hostname of its own and one public port (``{"hostname": "bench-<n>", "ports": 1}``).

* ``allocator_sequential_*``: one client, one allocation after another (no contention).
* ``allocator_burst_*``: ``CONCURRENCY`` clients held at a barrier and let go together, so
  all of them want the same lowest VMID and port at the same moment; latency from the
  request's first byte to the end of the answer.  ``ROUNDS`` rounds (the allocations of each
  are released before the next); the figures pool every round's allocations.  Duplicates:
  VMIDs, hostnames or ports handed out twice, over all rounds (must be 0).

Goal: p99 <= 100 ms for the burst.  A goal missed is reported, never a failure.

    .venv/bin/python -m bench.allocator [--size 10000] [--concurrency 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench.common import Receiver, drop_schema, percentile, postgres_schema_url, postgres_url
from receiver.db import make_engine
from receiver.simulator import ProxmoxSimulator
from receiver.simulator.scene import app_row, create_apps_table

SIZE = 10_000
CONCURRENCY = 100
ROUNDS = 3
SEQUENTIAL = 30
INSERT_CHUNK = 5_000
PORTS = "public_port=30000-39999"  # rows hold 30000-30099 (20000 + VMID for VMIDs 10000-10099)


class Client:
    """One keep-alive HTTP connection to the receiver, with the allocator token."""

    def __init__(self, port: int, token: str):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any, float]:
        data = json.dumps(body).encode() if body is not None else None
        started = time.perf_counter()
        self.conn.request(method, path, body=data, headers=self.headers)
        answer = self.conn.getresponse()
        raw = answer.read()
        elapsed = time.perf_counter() - started
        return answer.status, json.loads(raw), elapsed

    def close(self) -> None:
        self.conn.close()


def _fill(engine: Any, sim: ProxmoxSimulator, size: int) -> None:
    table = create_apps_table(engine)
    vmids = list(range(100, 100 + size))
    for start in range(0, size, INSERT_CHUNK):
        with engine.begin() as conn:
            conn.execute(
                table.insert(),
                [app_row(v, "running", age=timedelta(days=1)) for v in vmids[start : start + INSERT_CHUNK]],
            )
    with engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE")
    for i, v in enumerate(vmids):
        sim.add_guest(v, node="pve1" if i % 2 else "pve2", name=f"app{v}.apps.local")


def _duplicates(got: list[dict[str, Any]]) -> int:
    """Values handed out more than once among ``got``: VMIDs, hostnames, ports."""
    found = 0
    for key in ("vmid", "hostname"):
        found += len(got) - len({g[key] for g in got})
    ports = [p for g in got for p in g["ports"].get("public_port", [])]
    return found + len(ports) - len(set(ports))


def _release(client: Client, got: list[dict[str, Any]]) -> None:
    for allocation in got:
        status, _, _ = client.call("DELETE", f"/api/v1/allocations/{allocation['id']}")
        assert status == 200, status


def _together(port: int, token: str, bodies: list[dict[str, Any]]) -> list[tuple[int, Any, float]]:
    """``POST /api/v1/allocations`` with each of ``bodies`` at once, one client each (connected
    and warmed before the barrier, so only the allocations are measured): (status, answer,
    seconds) per body, in their order."""
    clients = [Client(port, token) for _ in bodies]
    for c in clients:
        c.call("GET", "/healthz")
    barrier = threading.Barrier(len(bodies))
    answers: list[Any] = [None] * len(bodies)

    def one(i: int) -> None:
        barrier.wait()
        answers[i] = clients[i].call("POST", "/api/v1/allocations", bodies[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for c in clients:
        c.close()
    return answers


def _burst(port: int, token: str, concurrency: int, round_no: int) -> tuple[list[float], list[dict[str, Any]], list]:
    answers = _together(port, token, [{"hostname": f"bench-{round_no}-{i}", "ports": 1} for i in range(concurrency)])
    got = [body for status, body, _ in answers if status == 201]
    failures = [(status, body) for status, body, _ in answers if status != 201]
    return [elapsed for _, _, elapsed in answers], got, failures


def _floor(port: int, concurrency: int) -> list[float]:
    """The same burst with a wrong token: every request answered 401 by the route, nothing
    allocated, so its latency is what HTTP, Flask and the token check alone cost a burst."""
    answers = _together(
        port, "wrong-" + secrets.token_hex(8), [{"hostname": f"floor-{i}", "ports": 1} for i in range(concurrency)]
    )
    assert all(status == 401 for status, _, _ in answers), [status for status, _, _ in answers]
    return [elapsed for _, _, elapsed in answers]


def measure(size: int = SIZE, concurrency: int = CONCURRENCY, rounds: int = ROUNDS) -> tuple[dict[str, Any], list[str]]:
    base, why = postgres_url()
    if base is None:
        return {}, [f"allocator: {why}"]
    schema = f"bench_alloc_{os.getpid()}"
    db_url = postgres_schema_url(base, schema)
    engine = make_engine(db_url)
    sim = ProxmoxSimulator(keep_alive=True).start()  # pveproxy keeps connections, as a real cluster's would
    token = secrets.token_hex(16)
    receiver = None
    figures: dict[str, Any] = {}
    notes: list[str] = []
    try:
        _fill(engine, sim, size)
        with tempfile.TemporaryDirectory() as tmp:
            receiver = Receiver(
                Path(tmp),
                sim,
                db_url,
                CLEANUP_ALLOCATOR_TOKEN=token,
                CLEANUP_ALLOCATOR_PORTS=PORTS,
                CLEANUP_INTERVAL_MINUTES="60",
            )
            admin = Client(receiver.port, token)
            # The sweep at start reads the same guest list: let it finish first.
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                status, stats, _ = admin.call("GET", "/api/v1/system/cleanup/stats")
                if stats.get("last_sweep") and not stats.get("sweep_running"):
                    break
                time.sleep(0.2)
            warm = [
                admin.call("POST", "/api/v1/allocations", {"hostname": f"warm-{i}", "ports": 1})[1] for i in range(3)
            ]
            _release(admin, warm)
            sequential, seq_got = [], []
            for i in range(SEQUENTIAL):
                status, body, elapsed = admin.call("POST", "/api/v1/allocations", {"hostname": f"seq-{i}", "ports": 1})
                assert status == 201, body
                sequential.append(elapsed)
                seq_got.append(body)
            assert [g["vmid"] for g in seq_got] == list(range(100 + size, 100 + size + SEQUENTIAL))
            _release(admin, seq_got)
            latencies: list[float] = []
            handed: list[dict[str, Any]] = []
            failures: list = []
            per_round_p99 = []
            duplicates = 0
            cpu = {"receiver": 0.0, "bench": 0.0}
            span = 0.0
            for r in range(rounds):
                before = (receiver.cpu_seconds(), sum(os.times()[:2]), time.perf_counter())
                lat, got, failed = _burst(receiver.port, token, concurrency, r)
                after = (receiver.cpu_seconds(), sum(os.times()[:2]), time.perf_counter())
                cpu["receiver"] += after[0] - before[0]
                cpu["bench"] += after[1] - before[1]
                span += after[2] - before[2]
                latencies += lat
                handed += got
                failures += failed
                per_round_p99.append(round(percentile(lat, 99) * 1000, 1))
                duplicates += _duplicates(got)  # values in force at once: each round's
                _release(admin, got)
            floor_cpu = receiver.cpu_seconds()
            floor = [v * 1000 for r in range(rounds) for v in _floor(receiver.port, concurrency)]
            floor_cpu = receiver.cpu_seconds() - floor_cpu
            admin.close()
            ms = [v * 1000 for v in latencies]
            spread = max(g["vmid"] for g in handed) - (100 + size) + 1 if handed else 0  # highest VMID handed
            figures = {
                "allocator_table_rows": size,
                "allocator_sequential_p50_ms": round(percentile([v * 1000 for v in sequential], 50), 1),
                "allocator_sequential_p99_ms": round(percentile([v * 1000 for v in sequential], 99), 1),
                "allocator_burst_concurrency": concurrency,
                "allocator_burst_rounds": rounds,
                "allocator_burst_p50_ms": round(percentile(ms, 50), 1),
                "allocator_burst_p95_ms": round(percentile(ms, 95), 1),
                "allocator_burst_p99_ms": round(percentile(ms, 99), 1),
                "allocator_burst_max_ms": round(max(ms), 1),
                "allocator_burst_p99_per_round_ms": "/".join(str(p) for p in per_round_p99),
                "allocator_burst_allocated": len(handed),
                "allocator_burst_refused": len(failures),
                "allocator_burst_duplicates": duplicates,
                "allocator_burst_vmid_spread": spread,
                # The same burst refused 401 by the route: HTTP, Flask and the token check alone.
                "allocator_burst_http_floor_p50_ms": round(percentile(floor, 50), 1),
                "allocator_burst_http_floor_p99_ms": round(percentile(floor, 99), 1),
                # ... and its receiver CPU per request (the 100 connections' warm-up included)
                "allocator_burst_http_floor_receiver_cpu_ms": round(floor_cpu / len(floor) * 1000, 1)
                if floor
                else None,
                "allocator_burst_per_s": round(len(handed) / span, 1) if span else None,
                # CPU per burst allocation, each connection's warm-up GET /healthz included (the
                # bench's process holds the HTTP clients and the simulator, which keeps its
                # connections alive as pveproxy does).
                "allocator_burst_receiver_cpu_ms": round(cpu["receiver"] / len(handed) * 1000, 1) if handed else None,
                "allocator_burst_sim_and_clients_cpu_ms": round(cpu["bench"] / len(handed) * 1000, 1)
                if handed
                else None,
            }
            if failures:
                notes.append(f"allocator: {len(failures)} burst allocations refused, e.g. {failures[:2]}")
    finally:
        if receiver is not None:
            receiver.close()
        sim.stop()
        engine.dispose()
        drop_schema(base, schema)
    return figures, notes


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    args = parser.parse_args(argv)
    figures, notes = measure(args.size, args.concurrency, args.rounds)
    for name, value in figures.items():
        print(f"{name:40} {value}")
    for note in notes:
        print("note:", note)
    return figures


if __name__ == "__main__":
    main()
