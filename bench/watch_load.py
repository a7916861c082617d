"""The watcher's load on Proxmox: bytes read per stop, per stop-then-destroy, per node-shutdown burst.

In-process, against the simulator over HTTPS: the real watcher (receiver.watcher) on a real
SQLite table, its clock injected and moved one second per tick, so a whole watch window
(``CLEANUP_WATCH_SECONDS``, 600 s) takes a few seconds.  Every byte of every answer the
watcher reads is counted (``ProxmoxInventory.bytes_read``).  Before measuring, the guest list
is read once, as the start-up sweep does in ``serve``: the watcher estimates costs from it.
The task tail (``/cluster/tasks`` every ``CLEANUP_TASK_POLL_SECONDS``) is left out of the
watch figures and measured on its own, with every node's list full (25 finished tasks): it
runs whether anything is watched or not, and its size grows with the nodes, not the guests.

* ``watch_stop_*``: one guest stopped and *not* destroyed, over the whole watch window;
* ``watch_stop_destroy_*``: one guest stopped, destroyed 5 s later: whole-list reads until
  its row is gone;
* ``watch_burst_*``: a node shutdown, 500 guests of one node stopped at once.

    .venv/bin/python -m bench.watch_load [--sizes 1000,10000,100000]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from receiver.config import load_settings, without_settings
from receiver.db import make_engine
from receiver.inbox import Inbox
from receiver.model import Event
from receiver.runtime import Runtime
from receiver.simulator import ProxmoxSimulator
from receiver.simulator.scene import app_row, create_apps_table
from receiver.timeutil import utcnow
from receiver.watcher import Watcher

SIZES = (1_000, 10_000, 100_000)
NODES = tuple(f"pve{i}" for i in range(1, 11))
BURST = 500
FULL = "/cluster/resources"


class Clock:
    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self):
        return self.now


class Scene:
    """A cluster of ``size`` guests spread over ten nodes, a table with a row for each of the
    first guests of every node, a watcher on an injected clock."""

    def __init__(self, size: int, workdir: Path):
        self.sim = ProxmoxSimulator(nodes=NODES).start()
        self.guests: dict[int, str] = {}
        for i in range(size):
            vmid = 100 + i
            self.guests[vmid] = NODES[i % len(NODES)]
            self.sim.add_guest(vmid, node=self.guests[vmid], name=f"app{vmid}.apps.local")
        env = without_settings(os.environ)
        env.update(self.sim.env())
        env["DATABASE_URL"] = f"sqlite:///{workdir / f'watch-{size}.db'}"
        settings = load_settings(env=env)
        engine = make_engine(settings.database_url)
        table = create_apps_table(engine)
        with_rows = [v for v in self.guests if v < 100 + 20 * BURST]  # every burst guest has a row
        with engine.begin() as conn:
            conn.execute(table.insert(), [app_row(v, "running", age=timedelta(days=1)) for v in with_rows])
        self.runtime = Runtime.build(settings, engine=engine, upgrade=True)
        self.inbox = Inbox(self.runtime.engine)
        self.clock = Clock()
        self.watcher = Watcher(self.runtime, self.inbox, clock=self.clock)
        self.watcher._next_task_poll = float("inf")  # the task tail is measured on its own
        self.runtime.inventory.read()  # the start-up sweep's read
        self._events = 0

    def close(self) -> None:
        self.runtime.inventory.close()
        self.runtime.engine.dispose()
        self.sim.stop()

    @property
    def bytes(self) -> int:
        return self.runtime.inventory.bytes_read.total

    def full_bytes(self) -> int:
        return self.runtime.inventory.bytes_read.by_path().get(FULL, 0)

    def stop(self, vmids: list[int]) -> None:
        """Stop each guest and deliver its post-stop event (the node it ran on)."""
        for vmid in vmids:
            self.sim.stop_guest(vmid)
            self._events += 1
            self.inbox.accept(Event(f"bench-{self._events}", vmid, "post-stop", self.guests[vmid], time.time()))

    def tick(self) -> None:
        self.clock.now += timedelta(seconds=1)
        self.watcher.tick()

    def has_row(self, vmid: int) -> bool:
        with self.runtime.engine.connect() as conn:
            return conn.execute(sa.text("SELECT count(*) FROM apps WHERE lxc_id = :v"), {"v": vmid}).scalar_one() > 0


def one_size(size: int, workdir: Path) -> dict[str, Any]:
    scene = Scene(size, workdir)
    try:
        figures: dict[str, Any] = {"full_list_bytes": scene.runtime.inventory.shape.body_bytes}
        watch_seconds = scene.runtime.settings.watch_seconds

        # One stop, no destroy, over the whole watch window.
        quiet = 100 + 3
        scene.sim.reset_counts()
        before, full_before = scene.bytes, scene.full_bytes()
        scene.stop([quiet])
        for _ in range(watch_seconds + 2):
            scene.tick()
        figures["stop_bytes"] = scene.bytes - before
        figures["stop_full_reads"] = scene.sim.request_count(FULL)
        figures["stop_requests"] = scene.sim.request_count("")
        figures["stop_full_bytes"] = scene.full_bytes() - full_before
        figures["stop_still_watched_after_window"] = len(scene.watcher.watched)

        # One stop, then the destroy 5 s later.
        doomed = 100 + 4
        scene.sim.reset_counts()
        before = scene.bytes
        scene.stop([doomed])
        for _ in range(5):
            scene.tick()
        scene.sim.destroy_guest(doomed)
        ticks = 0
        while scene.has_row(doomed) and ticks < 30:
            scene.tick()
            ticks += 1
        figures["stop_destroy_full_reads"] = scene.sim.request_count(FULL)
        figures["stop_destroy_bytes"] = scene.bytes - before
        figures["stop_destroy_ticks_to_gone"] = ticks
        if scene.watcher.watched:  # not gone: let its watch end before the next measure
            for _ in range(watch_seconds + 2):
                scene.tick()

        # The task tail, on its own: one poll of /cluster/tasks, every node's list full (25 tasks).
        for node in NODES:
            vmid = next(v for v, n in scene.guests.items() if n == node and v not in (quiet, doomed))
            for _ in range(13):
                scene.sim.stop_guest(vmid)
                scene.sim.start_guest(vmid)
        before = scene.bytes
        scene.watcher.tasks.poll()
        figures["task_tail_bytes_per_poll"] = scene.bytes - before
        figures["task_tail_bytes_per_watch_window"] = round(
            figures["task_tail_bytes_per_poll"] * watch_seconds / scene.runtime.settings.task_poll_seconds)
        return figures | burst(scene) if size == 10_000 else figures
    finally:
        scene.close()


def burst(scene: Scene) -> dict[str, Any]:
    """A node shutdown: the first BURST guests of one node stop at once."""
    node = NODES[5]
    vmids = [v for v, n in scene.guests.items() if n == node][:BURST]
    scene.sim.reset_counts()
    scene.stop(vmids)
    requests, sizes = [], []
    for _ in range(60):  # the first minute: every watched guest is due at every tick
        count, before = scene.sim.request_count(""), scene.bytes
        scene.tick()
        requests.append(scene.sim.request_count("") - count)
        sizes.append(scene.bytes - before)
    return {"burst_requests_first_tick": requests[0], "burst_requests_per_tick": round(sum(requests) / 60, 2),
            "burst_full_reads_per_tick": round(scene.sim.request_count(FULL) / 60, 3),
            "burst_bytes_first_tick": sizes[0], "burst_bytes_per_tick": round(sum(sizes) / 60)}


def measure(sizes: tuple[int, ...] = SIZES) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="pve-janitor-watch-") as workdir:
        for size in sizes:
            k = f"{size // 1000}k"
            r = one_size(size, Path(workdir))
            figures[f"watch_full_list_{k}_bytes"] = r["full_list_bytes"]
            figures[f"watch_stop_no_destroy_{k}_bytes"] = r["stop_bytes"]
            figures[f"watch_stop_no_destroy_{k}_full_reads"] = r["stop_full_reads"]
            figures[f"watch_stop_no_destroy_{k}_requests"] = r["stop_requests"]
            figures[f"watch_stop_destroy_{k}_full_reads"] = r["stop_destroy_full_reads"]
            figures[f"watch_stop_destroy_{k}_bytes"] = r["stop_destroy_bytes"]
            figures[f"watch_stop_destroy_{k}_ticks_to_gone"] = r["stop_destroy_ticks_to_gone"]
            figures[f"watch_task_tail_{k}_bytes_per_poll"] = r["task_tail_bytes_per_poll"]
            figures[f"watch_task_tail_{k}_bytes_per_watch_window"] = r["task_tail_bytes_per_watch_window"]
            for name in ("burst_requests_first_tick", "burst_requests_per_tick", "burst_full_reads_per_tick",
                         "burst_bytes_first_tick", "burst_bytes_per_tick"):
                if name in r:
                    figures[f"watch_{name.replace('burst_', f'burst_{k}_')}"] = r[name]
    return figures


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(str(s) for s in SIZES))
    args = parser.parse_args(argv)
    figures = measure(tuple(int(s) for s in args.sizes.split(",")))
    for key, value in figures.items():
        print(f"{key:52} {value}")
    return figures


if __name__ == "__main__":
    main()
