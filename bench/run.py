"""``make bench``: every benchmark against the simulator on this machine; a table and bench/results.json.

Benchmarks report numbers.  A figure that misses its goal is shown as such; it never makes
this command fail (a benchmark that crashes does: exit 1).  The whole run takes about ten
minutes; ``--only`` picks benchmarks, ``--quick`` shrinks them for a smoke run (its numbers
are not comparable and it does not write bench/results.json unless ``--output`` says so).

    .venv/bin/python -m bench.run [--only latency,hook,burst,sweep,idle,watch,webhooks,allocator] [--quick]
                                  [--output PATH]

bench/results.json holds one key per figure, the unit in its name (``_s``, ``_ms``, ``_mb``,
``_bytes``, ``_per_min``; ``_ratio`` and counts have none), plus ``_machine``, ``_load``, ``_goals``,
``_notes`` and ``_detail`` (per-run breakdowns of the sweep) for the reader.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench import allocator, burst, hook, idle, latency, sweep_scale, watch_load, webhooks
from bench.common import ROOT, machine

RESULTS = ROOT / "bench" / "results.json"
HOOK_TIMEOUT_MS = hook.TIMEOUT * 1000

# (figure, goal as written, predicate); a missing figure is "not measured".
GOALS: list[tuple[str, str, Callable[[Any], bool]]] = [
    ("destroy_to_gone_hook_p95_s", "<= 2.0 s (1 s tick)", lambda v: v <= 2.0),
    ("destroy_to_gone_task_p95_s", "<= 6.0 s (5 s task poll)", lambda v: v <= 6.0),
    ("hook_up_ratio", "<= 2.0 x bare python3", lambda v: v <= 2.0),
    ("hook_refused_median_ms", f"<= TIMEOUT + 0.3 s = {HOOK_TIMEOUT_MS + 300:.0f} ms",
     lambda v: v <= HOOK_TIMEOUT_MS + 300),
    ("hook_blackholed_median_ms", f"<= TIMEOUT + 0.3 s = {HOOK_TIMEOUT_MS + 300:.0f} ms",
     lambda v: v <= HOOK_TIMEOUT_MS + 300),
    ("hook_blackholed_spool_median_ms", f"<= TIMEOUT + 0.3 s = {HOOK_TIMEOUT_MS + 300:.0f} ms",
     lambda v: v <= HOOK_TIMEOUT_MS + 300),
    ("burst_accept_p99_ms", "<= 250 ms", lambda v: v <= 250),
    ("burst_inventory_reads_per_tick", "<= 1 read per tick", lambda v: v <= 1.0),
    ("burst_postgres_accept_p99_ms", "<= 250 ms", lambda v: v <= 250),
    ("burst_postgres_inventory_reads_per_tick", "<= 1 read per tick", lambda v: v <= 1.0),
    ("idle_inventory_reads_per_min", "0 while nothing is watched (sweep aside)", lambda v: v == 0),
    ("watch_stop_no_destroy_10k_bytes", "<= 1 MB (1,000,000 bytes) per stop at 10,000 guests",
     lambda v: v <= 1_000_000),
    ("watch_stop_no_destroy_same_at_every_size", "the same bytes per stop at 1k, 10k, 100k guests", bool),
    ("watch_stop_destroy_10k_full_reads", "<= 2 whole-list reads", lambda v: v <= 2),
    ("watch_burst_10k_full_reads_per_tick", "< 1 whole-list read per tick", lambda v: v < 1),
]
GOALS.append(("webhook_latency_p95_s", "<= 1.0 s from commit to delivery (0.5 s poll)", lambda v: v <= 1.0))
for _db in ("sqlite", "postgres"):
    GOALS.append((f"webhook_outbox_{_db}_100k_cost_pct", "<= 10 % of the 100k-row sweep", lambda v: v <= 10))
GOALS.append(("allocator_burst_p99_ms", "<= 100 ms (100 allocations at once, PostgreSQL)", lambda v: v <= 100))
GOALS.append(("allocator_burst_duplicates", "0 (no value handed out twice)", lambda v: v == 0))
for _k in ("1k", "100k"):
    GOALS.append((f"watch_stop_destroy_{_k}_full_reads", "<= 2 whole-list reads", lambda v: v <= 2))
for _db in ("sqlite", "postgres"):
    _p = f"sweep_{_db}_100k"
    GOALS += [
        (f"{_p}_ratio_to_floor", "<= 2.0 x floor", lambda v: v <= 2.0),
        (f"{_p}_own_work_ratio_to_floor", "<= 2.0 x floor (simulator serving and VMID checks taken out)",
         lambda v: v <= 2.0),
        (f"{_p}_inventory_reads", "<= 2", lambda v: v <= 2),
        (f"{_p}_peak_rss_mb", "<= 300 MB", lambda v: v <= 300),
    ]


def _sweep(quick: bool) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    figures, detail, notes = sweep_scale.measure((1_000, 10_000) if quick else sweep_scale.SIZES)
    # Statements must not grow with the table, only with the ghosts per batch.
    for db in ("sqlite", "postgres"):
        counts = {size: figures.get(f"sweep_{db}_{size // 1000}k_sql_statements") for size in sweep_scale.SIZES}
        if all(counts.values()):
            figures[f"sweep_{db}_statements_1k_10k_100k"] = "/".join(str(counts[s]) for s in sweep_scale.SIZES)
    return figures, detail, notes


def _burst(quick: bool) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    from bench.common import postgres_url

    figures = burst.measure("sqlite", rounds=1 if quick else 3)
    notes = []
    if postgres_url()[0]:
        figures.update(burst.measure("postgres", rounds=1))
    else:
        notes.append(postgres_url()[1])
    return figures, {}, notes


def _watch(quick: bool) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    figures = watch_load.measure((1_000, 10_000) if quick else watch_load.SIZES)
    per_stop = {v for k, v in figures.items() if k.startswith("watch_stop_no_destroy_") and k.endswith("k_bytes")}
    figures["watch_stop_no_destroy_same_at_every_size"] = len(per_stop) == 1
    return figures, {}, []


def _allocator(quick: bool) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    figures, notes = allocator.measure(1_000 if quick else allocator.SIZE, allocator.CONCURRENCY,
                                       1 if quick else allocator.ROUNDS)
    return figures, {}, notes


BENCHMARKS: dict[str, Callable[[bool], tuple[dict[str, Any], dict[str, Any], list[str]]]] = {
    "latency": lambda quick: (latency.measure(10 if quick else 50, 5 if quick else 20), {}, []),
    "hook": lambda quick: (hook.measure(10 if quick else 30, 3 if quick else 10), {}, []),
    "burst": _burst,
    "sweep": _sweep,
    "idle": lambda quick: (idle.measure(15 if quick else 60), {}, []),
    "watch": _watch,
    "webhooks": lambda quick: webhooks.measure(10 if quick else 50, 1 if quick else webhooks.RUNS,
                                               10_000 if quick else webhooks.SIZE),
    "allocator": _allocator,
}


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def table(figures: dict[str, Any]) -> list[str]:
    lines = [f"{'figure':52} {'value':>12}  goal", "-" * 100]
    goal_of = {name: (text, ok) for name, text, ok in GOALS}
    for name, value in figures.items():
        if name.startswith("_"):
            continue
        goal = ""
        if name in goal_of:
            text, ok = goal_of[name]
            goal = f"{text}: {'met' if ok(value) else 'MISSED'}"
        lines.append(f"{name:52} {_fmt(value):>12}  {goal}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated: " + ",".join(BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="smaller runs, for trying the benchmarks out")
    parser.add_argument("--output", help=f"where to write the figures (default {RESULTS.relative_to(ROOT)}, "
                                         "not written with --quick)")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")

    started = time.monotonic()
    figures: dict[str, Any] = {}
    details: dict[str, Any] = {}
    notes: list[str] = []
    load: dict[str, Any] = {}
    failed = []
    print(f"pve-janitor benchmarks: {', '.join(names)}{' (quick)' if args.quick else ''}", flush=True)
    for name in names:
        t0 = time.monotonic()
        before = os.getloadavg()[0]
        print(f"- {name} ...", flush=True)
        try:
            f, d, n = BENCHMARKS[name](args.quick)
        except Exception:  # noqa: BLE001 - report and go on with the others
            failed.append(name)
            notes.append(f"{name}: FAILED\n{traceback.format_exc()}")
            traceback.print_exc()
            continue
        figures.update(f)
        if d:
            details[name] = d
        notes.extend(n)
        load[name] = {"loadavg_1min_before": round(before, 2), "loadavg_1min_after": round(os.getloadavg()[0], 2),
                      "seconds": round(time.monotonic() - t0, 1)}
        print(f"  done in {time.monotonic() - t0:.0f} s", flush=True)

    met = {name: ok(figures[name]) for name, _, ok in GOALS if name in figures}
    results: dict[str, Any] = dict(figures)
    results["_machine"] = machine()
    results["_generated_at"] = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    results["_total_s"] = round(time.monotonic() - started, 1)
    results["_load"] = load
    results["_goals"] = {name: {"goal": text, "met": met[name]} for name, text, _ in GOALS if name in met}
    results["_notes"] = notes
    results["_detail"] = details

    print()
    print("\n".join(table(figures)))
    print()
    m = results["_machine"]
    print(f"machine: {m['nproc']} x {m['cpu']}, {m['ram_gib']} GiB, Python {m['python']}, SQLite {m['sqlite']}, "
          f"PostgreSQL {m['postgresql'] or 'not used'}; {results['_total_s']:.0f} s in all")
    missed = [n for n, ok in met.items() if not ok]
    print(f"goals: {len(met) - len(missed)} met, {len(missed)} missed{': ' + ', '.join(missed) if missed else ''}")
    for note in notes:
        print("note:", note.splitlines()[0])

    output = Path(args.output) if args.output else (None if args.quick else RESULTS)
    if output is not None:
        output.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {output}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
