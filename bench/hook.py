"""Hookscript wall time, as Proxmox runs it (executed directly, through its ``#!/usr/bin/python3 -IS``).

* receiver up: the real ``pve-janitor serve`` (SQLite), which stores the event before it
  answers 202; median of 30 runs, each with an empty spool, interleaved with 30 runs of a
  bare ``/usr/bin/python3 -I -c pass`` measured in the same run: the ratio is the hook's
  cost in units of interpreter start-up, which is what a slower or faster machine scales.
* receiver refused (a closed port): the event is spooled.  Each run starts without the hook's
  "receiver down" marker (``SPOOL_DIR/.down``), so it tries: the spool replay first (the spool
  grows run by run), then its own event.  Then 10 runs inside the 30 s window the marker opens,
  which spool at once without touching the network;
* receiver black-holed (a socket that accepts TCP connections and never answers), without the
  marker: with an empty spool the hook waits its whole ``TIMEOUT`` (2 s, the default); with a
  spool, the replay meets the silence first.  Then 10 runs inside the marker's window.

    .venv/bin/python -m bench.hook
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import HOOK, Receiver, median, seed_scene
from receiver.simulator.launch import free_port

PY = "/usr/bin/python3"
TIMEOUT = 2.0
BASE_ENV = {"PATH": "/sbin:/bin:/usr/sbin:/usr/bin", "LC_ALL": "C"}


def _run(cmd: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, cwd="/")
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} exited {proc.returncode}: {proc.stderr!r}")
    return elapsed


def measure(runs_up: int = 30, runs_down: int = 10) -> dict[str, float]:
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="pve-janitor-hook-") as tmp:
        tmp_path = Path(tmp)
        sim, db_url = seed_scene(tmp_path)
        receiver = Receiver(tmp_path, sim, db_url)
        hole = socket.socket()
        hole.bind(("127.0.0.1", 0))
        hole.listen(1024)
        try:
            receiver.wait_for_log("sweep ", timeout=30)
            spool = tmp_path / "spool"
            cases = {
                "up": receiver.hook_conf(tmp_path / "up.conf", spool),
                "refused": receiver.hook_conf(tmp_path / "refused.conf", spool,
                                              url=f"http://127.0.0.1:{free_port()}"),
                "blackholed": receiver.hook_conf(tmp_path / "hole.conf", spool,
                                                 url=f"http://127.0.0.1:{hole.getsockname()[1]}"),
            }
            env = {name: dict(BASE_ENV, PVE_JANITOR_HOOK_CONF=str(conf)) for name, conf in cases.items()}
            hook = [str(HOOK), "101", "post-stop"]
            bare = [PY, "-I", "-c", "pass"]
            for _ in range(3):  # warm the page cache and the receiver
                _run(bare, BASE_ENV)
                _run(hook, env["up"])

            bare_times, up_times = [], []
            for _ in range(runs_up):
                shutil.rmtree(spool, ignore_errors=True)
                bare_times.append(_run(bare, BASE_ENV))
                up_times.append(_run(hook, env["up"]))
            spooled_while_up = len(list(spool.glob("*.json"))) if spool.exists() else 0

            down = spool / ".down"  # the hook's "receiver down" marker: 30 s of spooling at once
            refused, refused_window = [], []
            shutil.rmtree(spool, ignore_errors=True)
            for _ in range(runs_down):
                down.unlink(missing_ok=True)
                refused.append(_run(hook, env["refused"]))  # tries (replay first): refused, spools
            refused_spool = len(list(spool.glob("*.json")))
            refused_window = [_run(hook, env["refused"]) for _ in range(runs_down)]

            hole_empty, hole_spool = [], []
            for _ in range(runs_down):
                shutil.rmtree(spool, ignore_errors=True)
                hole_empty.append(_run(hook, env["blackholed"]))  # waits its whole TIMEOUT
            for _ in range(runs_down):
                down.unlink(missing_ok=True)
                hole_spool.append(_run(hook, env["blackholed"]))  # replay first, then the event
            hole_window = [_run(hook, env["blackholed"]) for _ in range(runs_down)]
        finally:
            hole.close()
            receiver.close()
            sim.stop()
    figures["hook_bare_python_median_ms"] = round(median(bare_times) * 1000, 2)
    figures["hook_up_median_ms"] = round(median(up_times) * 1000, 2)
    figures["hook_up_ratio"] = round(median(up_times) / median(bare_times), 3)
    figures["hook_up_runs"] = runs_up
    figures["hook_up_events_spooled"] = spooled_while_up  # expect 0: every event delivered
    figures["hook_refused_median_ms"] = round(median(refused) * 1000, 2)
    figures["hook_refused_max_ms"] = round(max(refused) * 1000, 2)
    figures["hook_refused_spool_files"] = refused_spool
    figures["hook_refused_in_down_window_median_ms"] = round(median(refused_window) * 1000, 2)
    figures["hook_blackholed_median_ms"] = round(median(hole_empty) * 1000, 2)
    figures["hook_blackholed_max_ms"] = round(max(hole_empty) * 1000, 2)
    figures["hook_blackholed_spool_median_ms"] = round(median(hole_spool) * 1000, 2)
    figures["hook_blackholed_spool_max_ms"] = round(max(hole_spool) * 1000, 2)
    figures["hook_blackholed_in_down_window_median_ms"] = round(median(hole_window) * 1000, 2)
    figures["hook_down_runs"] = runs_down
    figures["hook_timeout_s"] = TIMEOUT
    return figures


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs-up", type=int, default=30)
    parser.add_argument("--runs-down", type=int, default=10)
    args = parser.parse_args(argv)
    figures = measure(args.runs_up, args.runs_down)
    for key, value in figures.items():
        print(f"{key:40} {value}")
    return figures


if __name__ == "__main__":
    os.environ.pop("PVE_JANITOR_URL", None)
    main()
