"""Does holding the cyclic garbage collector off a whole-table removal still pay?

``receiver.removal`` pauses CPython's cyclic collector while a whole-table removal reads and
plans, and freezes what existed before for the confirming read and the apply.  That touches
every thread of the receiver, so it must keep earning its place.  This benchmark times one
whole-table sweep of N rows (10 % ghosts, the table and simulator of ``bench.sweep_scale``),
each in a fresh subprocess, alternating: as the product runs it, and with the pause and the
freeze replaced by no-ops.  Per run: wall time, the inventory reads' share of it (the
simulator's serving, the same for both), the process's CPU time, and the collector's passes
and time during the sweep (``gc.callbacks``).

    .venv/bin/python -m bench.gc_pause [--rows 100000] [--reps 7] [--apply]

``--apply`` runs forced sweeps that remove the ghosts (each on a fresh copy of the table);
without it, dry runs (read and plan only, where the pause applies).  The result is in
docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from bench.common import ROOT, machine
from bench.sweep_scale import _fill, _vmids
from receiver.db import make_engine
from receiver.simulator import ProxmoxSimulator

VARIANTS = ("product", "collector_untouched")


def child(args: dict[str, Any]) -> dict[str, Any]:
    import gc

    import receiver.removal as removal
    from receiver.config import load_settings
    from receiver.runtime import Runtime

    if args["variant"] == "collector_untouched":
        class Untouched:
            def paused(self) -> nullcontext:
                return nullcontext()

            def frozen(self) -> nullcontext:
                return nullcontext()
        removal._cyclic_gc = Untouched()
    settings = load_settings(env=dict(args["env"], DATABASE_URL=args["url"]))
    runtime = Runtime.build(settings, engine=make_engine(args["url"]), upgrade=True)
    reading = [0.0]
    read = runtime.inventory.read

    def timed_read() -> Any:
        started = time.perf_counter()
        try:
            return read()
        finally:
            reading[0] += time.perf_counter() - started
    runtime.inventory.read = timed_read
    passes, collecting, began = [0], [0.0], [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            passes[0] += 1
            collecting[0] += time.perf_counter() - began[0]
    gc.callbacks.append(on_gc)
    wall, cpu = time.perf_counter(), time.process_time()
    result = runtime.sweeper.run(dry_run=not args["apply"], force=True)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    gc.callbacks.remove(on_gc)
    expected = "done" if args["apply"] else "dry_run"
    if str(result.outcome) != expected:
        raise SystemExit(f"sweep outcome {result.outcome} ({result.reason}), expected {expected}")
    return {"wall_s": wall, "inventory_reads_s": reading[0], "cpu_s": cpu, "gc_passes": passes[0],
            "gc_s": collecting[0]}


def measure(rows: int, reps: int, apply: bool) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="pve-janitor-gc-") as tmp:
        master = Path(tmp) / "master.db"
        engine = make_engine(f"sqlite:///{master}")
        _fill(engine, rows)
        engine.dispose()
        table_rows, _, guests = _vmids(rows)
        with_row = set(table_rows)
        sim = ProxmoxSimulator().start()
        try:
            for i, v in enumerate(guests):
                sim.add_guest(v, node="pve1" if i % 2 else "pve2",
                              name=f"app{v}.apps.local" if v in with_row else None)
            for rep in range(reps):
                for variant in VARIANTS if rep % 2 == 0 else reversed(VARIANTS):
                    db = Path(tmp) / "run.db"
                    shutil.copy(master, db)
                    args = {"variant": variant, "url": f"sqlite:///{db}", "env": sim.env(), "apply": apply}
                    proc = subprocess.run([sys.executable, "-m", "bench.gc_pause", "--child", json.dumps(args)],
                                          capture_output=True, text=True, cwd=ROOT, timeout=900)
                    if proc.returncode != 0:
                        raise RuntimeError(f"sweep child failed ({variant}):\n{proc.stderr[-4000:]}")
                    run = json.loads(proc.stdout.strip().splitlines()[-1])
                    runs[variant].append(run)
                    print(f"  {rep} {variant:20} " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                                              for k, v in run.items()), flush=True)
        finally:
            sim.stop()
    return runs


def summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Medians per variant; ``own_s`` is the wall time without the inventory reads."""
    out = {}
    for variant, rs in runs.items():
        out[variant] = {
            "wall_s": statistics.median(r["wall_s"] for r in rs),
            "own_s": statistics.median(r["wall_s"] - r["inventory_reads_s"] for r in rs),
            "own_min_s": min(r["wall_s"] - r["inventory_reads_s"] for r in rs),
            "cpu_s": statistics.median(r["cpu_s"] for r in rs),
            "gc_s": statistics.median(r["gc_s"] for r in rs),
            "gc_passes": statistics.median(r["gc_passes"] for r in rs),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--apply", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    info = machine()
    print(f"{args.rows} rows, {'forced sweeps' if args.apply else 'dry runs'}, {args.reps} runs each; "
          f"{info['cpu']} x{info['nproc']}, Python {info['python']}, SQLite {info['sqlite']}")
    for variant, figures in summary(measure(args.rows, args.reps, args.apply)).items():
        print(f"{variant:20} " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
