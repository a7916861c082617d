"""Destroy -> row gone: how long the receiver takes, on the hook path and on the task tail.

A benchmark, not a test: it reports numbers.  The receiver is ``pve-janitor serve`` in a
subprocess with default tick settings (1 s watcher tick, 5 s task poll); the simulator runs
the real hookscript on stop.

* hook path: stop (pre-stop and post-stop events via the real hookscript), 0.5-1.5 s later
  the destroy; time from the destroy to the row's disappearance.
* task tail: a guest already stopped (no hookscript, so no event) is destroyed; only the
  ``/cluster/tasks`` tail can notice it.

Destroys are spread evenly with random jitter so that they fall on every phase of the watcher's
tick and of the task poll, and so that ``/cluster/tasks`` (25 finished tasks kept) never rolls
over between two polls: every stop also makes a task, and a roll-over makes the watcher ask for
a sweep, a fallback path this benchmark does not mean to measure (it counts them: expect 0).
One thread watches the table every 2 ms for all guests, so the measuring does not load the
database with a reader per guest.

    .venv/bin/python -m bench.latency --hook 50 --task 20
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa

from bench.common import HOOK, Receiver, percentile
from receiver.db import make_engine
from receiver.simulator import ProxmoxSimulator
from receiver.simulator.scene import app_row, create_apps_table

HOOK_SPACING_S = 0.8  # 2 tasks per sample: about 12 finished tasks per 5 s poll, far below 25
TASK_SPACING_S = 1.0
STAYING = range(100, 110)  # guests and rows that are never destroyed
POLL_S = 0.002  # the measuring must not add its own delay: 2 ms granularity


class Bench:
    def __init__(self, workdir: Path, n_hook: int, n_task: int, **settings: str):
        self.dir = workdir
        self.hook_vmids = list(range(1000, 1000 + n_hook))
        self.task_vmids = list(range(5000, 5000 + n_task))
        self.db_url = f"sqlite:///{workdir / 'platform.db'}"
        self.engine = make_engine(self.db_url)
        table = create_apps_table(self.engine)
        with self.engine.begin() as conn:
            # Rows of the guests that stay (100-109, below) too: without them the last destroys
            # would take every row left, which the would_empty rule refuses (a real platform's
            # table holds its running apps as well).
            conn.execute(table.insert(), [app_row(v, "running", age=timedelta(days=1))
                                          for v in self.hook_vmids + self.task_vmids + list(STAYING)])
        self.sim = ProxmoxSimulator().start()
        for v in self.hook_vmids:
            self.sim.add_guest(v, hookscript=str(HOOK))
        for v in self.task_vmids:
            self.sim.add_guest(v)
        # Guests that stay: a cluster whose every guest is gone reads as an empty inventory,
        # which the receiver refuses to act on (a token without VM.Audit looks the same).
        for v in STAYING:
            self.sim.add_guest(v)
        self.receiver = Receiver(workdir, self.sim, self.db_url, **settings)
        conf = self.receiver.hook_conf(workdir / "hook.conf", workdir / "spool")
        self.sim.hook_env = {"PVE_JANITOR_HOOK_CONF": str(conf)}
        self.receiver.wait_for_log("sweep ", timeout=30)  # the start-up sweep is over

    def _present(self) -> set[int]:
        with self.engine.connect() as conn:
            return set(conn.execute(sa.text("SELECT lxc_id FROM apps")).scalars())

    def _monitor(self, destroyed: dict[int, float], gone: dict[int, float], expected: int,
                 stop: threading.Event) -> None:
        while len(gone) < expected and not stop.is_set():
            present = self._present()
            now = time.monotonic()
            for vmid, at in list(destroyed.items()):
                if vmid not in gone and vmid not in present:
                    gone[vmid] = now - at
            time.sleep(POLL_S)

    def _one(self, vmid: int, start_at: float, hooked: bool, destroyed: dict[int, float]) -> None:
        time.sleep(max(0.0, start_at - time.monotonic()))
        self.sim.stop_guest(vmid)  # hooked: runs pre-stop and post-stop, like Proxmox
        if hooked:
            time.sleep(random.uniform(0.5, 1.5))  # the platform destroys a moment after the stop
        at = time.monotonic()
        self.sim.destroy_guest(vmid)
        destroyed[vmid] = at

    def run(self, vmids: list[int], hooked: bool, spacing: float, timeout: float = 60) -> list[float]:
        destroyed: dict[int, float] = {}
        gone: dict[int, float] = {}
        stop = threading.Event()
        monitor = threading.Thread(target=self._monitor, args=(destroyed, gone, len(vmids), stop))
        monitor.start()
        t0 = time.monotonic() + 0.2
        threads = [threading.Thread(target=self._one,
                                    args=(v, t0 + i * spacing + random.uniform(0, spacing), hooked, destroyed))
                   for i, v in enumerate(vmids)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        monitor.join(timeout)
        stop.set()
        monitor.join()
        return [gone.get(v, float("nan")) for v in vmids]

    def rollovers(self) -> int:
        return self.receiver.log_text().count("rolled over between two polls")

    def sweeps(self) -> int:
        """Sweeps run so far (each logs one summary line); the start-up sweep is one."""
        return sum(1 for line in self.receiver.log_text().splitlines() if "sweep " in line and " planned," in line)

    def close(self) -> None:
        self.receiver.close()
        self.sim.stop()
        self.engine.dispose()


def summarize(name: str, samples: list[float]) -> dict[str, float]:
    good = [s for s in samples if s == s]
    return {
        f"{name}_p50_s": round(statistics.median(good), 3) if good else float("nan"),
        f"{name}_p95_s": round(percentile(good, 95), 3) if good else float("nan"),
        f"{name}_max_s": round(max(good), 3) if good else float("nan"),
        f"{name}_runs": len(samples),
        f"{name}_missed_runs": len(samples) - len(good),
    }


def measure(n_hook: int = 50, n_task: int = 20, seed: int = 20261125) -> dict[str, float]:
    random.seed(seed)
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="pve-janitor-bench-") as workdir:
        bench = Bench(Path(workdir), n_hook, n_task)
        try:
            if n_hook:
                figures.update(summarize("destroy_to_gone_hook", bench.run(bench.hook_vmids, True, HOOK_SPACING_S)))
                figures["destroy_to_gone_hook_task_rollovers"] = bench.rollovers()
                figures["destroy_to_gone_hook_sweeps_during_run"] = bench.sweeps() - 1
            if n_task:
                before, sweeps = bench.rollovers(), bench.sweeps()
                figures.update(summarize("destroy_to_gone_task", bench.run(bench.task_vmids, False, TASK_SPACING_S)))
                figures["destroy_to_gone_task_task_rollovers"] = bench.rollovers() - before
                figures["destroy_to_gone_task_sweeps_during_run"] = bench.sweeps() - sweeps
        finally:
            bench.close()
            if any(v != v for v in figures.values()) or figures.get("destroy_to_gone_hook_missed_runs") \
                    or figures.get("destroy_to_gone_task_missed_runs"):
                print(bench.receiver.log_tail())
    return figures


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hook", type=int, default=50, help="runs on the hook path")
    parser.add_argument("--task", type=int, default=20, help="runs on the task-tail path")
    parser.add_argument("--json", metavar="PATH", help="write the figures here too")
    args = parser.parse_args(argv)
    figures = measure(args.hook, args.task)
    for key, value in figures.items():
        print(f"{key:45} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
