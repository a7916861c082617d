"""Destroy -> row gone: how long the receiver takes, on the hook path and on the task tail.

A benchmark, not a test: it reports numbers.  The receiver is ``pve-janitor
serve`` in a subprocess with default tick settings; the simulator runs the
real hookscript on stop.  Destroys are spread at random over a few seconds so
that the samples fall on every phase of the watcher's tick.

    .venv/bin/python bench/latency.py --hook 50 --task 20
"""
from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from receiver.fakepve import ProxmoxSimulator  # noqa: E402
from receiver.scene import app_row, create_apps_table  # noqa: E402
from receiver.table import make_engine  # noqa: E402

HOOK = ROOT / "hookscript" / "pve-janitor-hook"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


class Bench:
    def __init__(self, workdir: Path, n_hook: int, n_task: int, **settings: str):
        self.dir = workdir
        self.hook_vmids = list(range(1000, 1000 + n_hook))
        self.task_vmids = list(range(5000, 5000 + n_task))
        self.db_url = f"sqlite:///{workdir / 'platform.db'}"
        self.engine = make_engine(self.db_url)
        table = create_apps_table(self.engine)
        with self.engine.begin() as conn:
            conn.execute(table.insert(), [app_row(v, "running", age=timedelta(days=1))
                                          for v in self.hook_vmids + self.task_vmids])
        self.sim = ProxmoxSimulator().start()
        self.port = _free_port()
        secret = secrets.token_hex(16)
        conf = workdir / "hook.conf"
        conf.write_text(f"URL=http://127.0.0.1:{self.port}\nSECRET={secret}\nSPOOL_DIR={workdir / 'spool'}\n")
        self.sim.hook_env = {"PVE_JANITOR_HOOK_CONF": str(conf)}
        for v in self.hook_vmids:
            self.sim.add_guest(v, hookscript=str(HOOK))
        for v in self.task_vmids:
            self.sim.add_guest(v)
        # Guests that stay: a cluster whose every guest is gone reads as an empty inventory,
        # which the receiver refuses to act on (a token without VM.Audit looks the same).
        for v in range(100, 110):
            self.sim.add_guest(v)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEANUP_", "PVE_", "DATABASE_URL"))}
        env.update(self.sim.env(), DATABASE_URL=self.db_url, CLEANUP_HOOK_SECRET=secret,
                   CLEANUP_BIND=f"127.0.0.1:{self.port}", **settings)
        self.log = open(workdir / "receiver.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "receiver.cli", "serve"], env=env,
                                     stdout=self.log, stderr=self.log, cwd=ROOT)
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("receiver did not become healthy")

    def present(self) -> set[int]:
        with self.engine.connect() as conn:
            return set(conn.execute(sa.text("SELECT lxc_id FROM apps")).scalars())

    def _measure(self, vmid: int, delay: float, results: dict[int, float], hooked: bool) -> None:
        time.sleep(delay)
        self.sim.stop_guest(vmid)  # hooked: runs pre-stop and post-stop, like Proxmox
        if hooked:
            time.sleep(random.uniform(0.5, 1.5))  # the platform destroys a moment after the stop
        started = time.monotonic()
        self.sim.destroy_guest(vmid)
        while vmid in self.present():
            if time.monotonic() - started > 60:
                results[vmid] = float("nan")
                return
            time.sleep(0.01)
        results[vmid] = time.monotonic() - started

    def run(self, vmids: list[int], hooked: bool, spread: float) -> list[float]:
        results: dict[int, float] = {}
        threads = [threading.Thread(target=self._measure, args=(v, random.uniform(0, spread), results, hooked))
                   for v in vmids]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return [results[v] for v in vmids]

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        self.log.close()
        self.sim.stop()
        self.engine.dispose()


def summarize(name: str, samples: list[float]) -> dict[str, float]:
    return {
        f"{name}_p50_s": round(statistics.median(samples), 3),
        f"{name}_p95_s": round(percentile(samples, 95), 3),
        f"{name}_max_s": round(max(samples), 3),
        f"{name}_runs": len(samples),
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hook", type=int, default=50, help="runs on the hook path")
    parser.add_argument("--task", type=int, default=20, help="runs on the task-tail path")
    parser.add_argument("--json", metavar="PATH", help="write the figures here too")
    args = parser.parse_args(argv)
    random.seed(20261125)
    with tempfile.TemporaryDirectory(prefix="pve-janitor-bench-") as workdir:
        bench = Bench(Path(workdir), args.hook, args.task)
        figures: dict[str, float] = {}
        try:
            if args.hook:
                figures.update(summarize("destroy_to_gone_hook", bench.run(bench.hook_vmids, True, spread=10)))
            if args.task:
                figures.update(summarize("destroy_to_gone_task", bench.run(bench.task_vmids, False, spread=10)))
        finally:
            bench.close()
            if any(v != v for v in figures.values()):  # NaN: a row never went; show why
                print((Path(workdir) / "receiver.log").read_text()[-4000:])
    for key, value in figures.items():
        print(f"{key:40} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
