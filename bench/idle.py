"""Idle cost: CPU and Proxmox API calls per minute of a receiver with nothing watched.

``pve-janitor serve`` with default settings on SQLite, the seed-sized table, no events.
After the start-up sweep has run, one window of ``--seconds`` is measured: the
process's CPU time (from /proc) and every API request the simulator received, by path.
Expected: the task poll (``/cluster/tasks``, every 5 s) and nothing else; inventory
reads (``/cluster/resources``) only when the scheduled sweep runs (every 60 min).

    .venv/bin/python -m bench.idle --seconds 60
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.common import Receiver, seed_scene

PATHS = ("/cluster/tasks", "/cluster/resources", "/access/permissions", "/cluster/nextid")


def measure(seconds: float = 60.0) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="pve-janitor-idle-") as workdir:
        sim, db_url = seed_scene(Path(workdir))
        receiver = Receiver(Path(workdir), sim, db_url)
        try:
            receiver.wait_for_log("sweep ", timeout=30)
            time.sleep(2.0)  # let the start-up settle
            sim.reset_counts()
            cpu0, t0 = receiver.cpu_seconds(), time.monotonic()
            time.sleep(seconds)
            cpu1, t1 = receiver.cpu_seconds(), time.monotonic()
            counts = {p: sim.request_count(p) for p in PATHS}
            total = sim.request_count("")
        finally:
            receiver.close()
            sim.stop()
    per_min = 60.0 / (t1 - t0)
    return {
        "idle_cpu_s_per_min": round((cpu1 - cpu0) * per_min, 3),
        "idle_cpu_percent": round(100 * (cpu1 - cpu0) / (t1 - t0), 2),
        "idle_api_calls_per_min": round(total * per_min, 1),
        "idle_task_polls_per_min": round(counts["/cluster/tasks"] * per_min, 1),
        "idle_inventory_reads_per_min": round(counts["/cluster/resources"] * per_min, 1),
        "idle_other_api_calls_per_min": round((total - counts["/cluster/tasks"] - counts["/cluster/resources"])
                                              * per_min, 1),
        "idle_window_s": round(t1 - t0, 1),
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    figures = measure(args.seconds)
    for key, value in figures.items():
        print(f"{key:40} {value}")
    return figures


if __name__ == "__main__":
    main()
