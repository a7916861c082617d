"""Crash safety: SIGKILL the receiver (``pve-janitor serve``) at random points, then look.

Two kinds of work are killed in the middle:

* **forced sweeps**: ``POST /api/v1/system/cleanup/run?force=true`` over a table
  of 20,000 rows to remove (19,800 error rows past retention whose guests
  exist, 200 ghosts) plus rows that must stay;
* **watcher removals**: many watched guests destroyed at once, their stop events
  posted signed over HTTP while the receiver drains, reads and removes.

After every kill: each candidate row is either still in the table or in the
audit table with exactly one entry holding the row as it was, never both and
never neither; the rows that must stay are unchanged; the counters equal the
audit; every event answered 202/200 is in the inbox.  Where the kill landed is
inferred from the state: the rows (old state / new state / in between), and
whether a write transaction was open at the moment of death (SQLite: a hot
rollback journal; PostgreSQL: the dead client's backend still holding a
transaction id).  Then the next ``serve`` start must finish the work: the inbox
backlog drained, the events the hookscript could not deliver re-sent (its spool),
all removals done, counters equal to the audit.

Kill delays are stratified over the calibrated duration of one uninterrupted
run (times 1.15), so before, during and after are all sampled.  Counts: see
:data:`KILLS`; ``make reliability`` runs the long ones.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import secrets
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import Database
from test_serve import Receiver, wait_until

from receiver import schema, store
from receiver.db import make_engine
from receiver.simulator.scene import app_row, create_apps_table

from .conftest import record, scaled

KILLS = {  # (part, database): kill points
    ("sweep", "sqlite"): scaled(10, 90),
    ("sweep", "postgres"): scaled(3, 30),
    ("watcher", "sqlite"): scaled(5, 60),
    ("watcher", "postgres"): scaled(2, 20),
}
RESTARTS = {"sweep": scaled(1, 10)}  # sweep attempts also finished by a second serve (every watcher attempt is)
SEED = int(os.environ.get("JANITOR_CRASH_SEED", "20261125"))

BIG_OLD_ERRORS, BIG_GHOSTS, BIG_KEEP = 19_800, 200, 20
WATCHED, SMALL_KEEP = 150, 170
STATS, RUN = "/api/v1/system/cleanup/stats", "/api/v1/system/cleanup/run"
# The statements of the apply transaction (apply.py; the audit copies go by COPY on PostgreSQL),
# as pg_stat_activity shows the last one.
APPLY_STATEMENTS = (
    "DELETE FROM APPS",
    "INSERT INTO JANITOR_AUDIT",
    'COPY "JANITOR_AUDIT"',
    "DELETE FROM JANITOR_STOP_MARKS",
    "SELECT JANITOR_STOP_MARKS.",
    "UPDATE JANITOR_COUNTERS",
    "SELECT APPS.",
)
# Where a sweep attempt's kill point is anchored: a random time after the POST; a random time
# into the apply transaction once it is seen open; a moment after it is seen closed.
ANCHORS = ("anytime", "in_apply", "after_commit")


# --- the databases, reset per attempt ----------------------------------------------------


class CrashDB:
    """One platform database, reset to the template before every attempt."""

    kind = ""

    def reset(self) -> None:
        raise NotImplementedError

    @property
    def target(self) -> Database:
        raise NotImplementedError

    def probe(self) -> str:
        """What write transaction is open (empty: none).  Asked right before the kill and right
        after it: a PostgreSQL backend that was idle in its transaction ends the moment its
        client dies, so only the look just before can see it."""
        raise NotImplementedError

    def settle(self) -> None:
        """Wait until the database has dealt with the dead client."""

    def apply_open(self) -> bool:
        """Whether the sweep's apply transaction is open right now (seen from outside)."""
        raise NotImplementedError


class ApplyMonitor:
    """Polls ``apply_open`` in a thread: when the apply transaction was first seen open, and
    when it was seen closed again (monotonic times)."""

    def __init__(self, crash_db: CrashDB, period: float):
        self.crash_db, self.period = crash_db, period
        self.opened, self.closed = threading.Event(), threading.Event()
        self.opened_at = self.closed_at = 0.0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and not self.closed.is_set():
            try:
                is_open = self.crash_db.apply_open()
            except Exception:  # noqa: BLE001 - the receiver is being killed; look again
                is_open = False
            if is_open and not self.opened.is_set():
                self.opened_at = time.monotonic()
                self.opened.set()
            elif not is_open and self.opened.is_set():
                self.closed_at = time.monotonic()
                self.closed.set()
            time.sleep(self.period)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(5)


class SqliteCrashDB(CrashDB):
    kind = "sqlite"

    def __init__(self, tmp_path: Path, rows: list[dict[str, Any]]):
        self.dir = tmp_path
        self.template = tmp_path / "template.db"
        engine = make_engine(f"sqlite:///{self.template}")
        table = create_apps_table(engine)
        with engine.begin() as conn:
            conn.execute(table.insert(), rows)
        engine.dispose()
        self.n = 0
        self._db: Database | None = None

    def reset(self) -> None:
        if self._db is not None:
            self._db.engine.dispose()
        self.n += 1
        path = self.dir / f"attempt{self.n}.db"
        shutil.copy(self.template, path)
        url = f"sqlite:///{path}"
        self._db = Database("sqlite", url, make_engine(url))

    @property
    def target(self) -> Database:
        if self._db is None:
            raise RuntimeError("no attempt yet: reset() first")
        return self._db

    def _journal_size(self) -> int:
        try:
            return os.path.getsize(f"{self.target.engine.url.database}-journal")
        except OSError:
            return 0

    def probe(self) -> str:
        size = self._journal_size()
        return f"hot journal {size} bytes" if size else ""

    def apply_open(self) -> bool:
        # The rollback journal of the apply grows past this at once; a lease renewal or a
        # run record journals a page or two.
        return self._journal_size() > 32 * 1024

    def close(self) -> None:
        if self._db is not None:
            self._db.engine.dispose()


class PostgresCrashDB(CrashDB):
    """A schema of the shared server (``postgres_db``); the template is a table beside ``apps``.

    Each attempt's receiver connects with its own ``application_name``, so the
    dead client's backend can be found in ``pg_stat_activity``.
    """

    kind = "postgres"

    def __init__(self, db: Database, rows: list[dict[str, Any]]):
        self.base = db
        template = create_apps_table(db.engine, "apps_template")
        with db.engine.begin() as conn:
            conn.execute(template.insert(), rows)
        self.n = 0
        self.app_name = ""

    def reset(self) -> None:
        self.n += 1
        self.app_name = f"janitor-crash-{secrets.token_hex(4)}-{self.n}"
        store.metadata.drop_all(self.base.engine)
        with self.base.engine.begin() as conn:
            # The revision goes with the tables: else the next serve finds "current" and creates none.
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {schema.VERSION_TABLE}")
            conn.exec_driver_sql("DROP TABLE IF EXISTS apps")
        create_apps_table(self.base.engine)
        with self.base.engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO apps SELECT * FROM apps_template")

    @property
    def target(self) -> Database:
        url = sa.engine.make_url(self.base.url).update_query_dict({"application_name": self.app_name})
        return Database("postgres", url.render_as_string(hide_password=False), self.base.engine)

    def _backends(self) -> Sequence[sa.Row]:
        with self.base.engine.connect() as conn:
            return conn.execute(
                sa.text(
                    "SELECT state, backend_xid IS NOT NULL AS writing, left(query, 40) AS query "
                    "FROM pg_stat_activity WHERE application_name = :app"
                ),
                {"app": self.app_name},
            ).all()

    def probe(self) -> str:
        writing = [b for b in self._backends() if b.writing]
        return "; ".join(f"{b.state} in a write transaction, last statement {b.query!r}" for b in writing)

    def settle(self) -> None:
        wait_until(lambda: not self._backends(), 30, step=0.05)

    def apply_open(self) -> bool:
        return any(b.writing and b.query.lstrip().upper().startswith(APPLY_STATEMENTS) for b in self._backends())

    def close(self) -> None:
        pass


# --- checks --------------------------------------------------------------------------


def rows_by_id(engine: sa.Engine, table: str = "apps") -> dict[int, dict[str, Any]]:
    with engine.connect() as conn:
        return {r["id"]: dict(r) for r in conn.execute(sa.text(f"SELECT * FROM {table}")).mappings()}


def _comparable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat(sep=" ") if hasattr(v, "isoformat") else v for k, v in row.items()}


def check_state(
    db: Database, original: dict[int, dict[str, Any]], candidates: set[int], keep: set[int]
) -> tuple[int, Counter]:
    """The invariants after a kill; returns (rows removed, audit entries by source)."""
    now = rows_by_id(db.engine)
    inspector = sa.inspect(db.engine)
    if not inspector.has_table("janitor_audit"):  # killed before serve created its tables
        assert set(now) == set(original)
        return 0, Counter()
    with db.engine.connect() as conn:
        audit = conn.execute(sa.select(store.audit.c.row_key, store.audit.c.row_json, store.audit.c.source)).all()
        counters = store.read_counters(conn)
    entries = Counter(a.row_key for a in audit)
    assert max(entries.values(), default=0) <= 1, [k for k, n in entries.items() if n > 1][:5]
    audited = {int(k) for k in entries}
    assert audited <= candidates, sorted(audited - candidates)[:5]
    both = audited & set(now)
    assert not both, f"{len(both)} rows are both in the table and in the audit"
    neither = candidates - audited - set(now)
    assert not neither, f"{len(neither)} rows are gone without an audit entry"
    for key in keep:
        assert _comparable(now[key]) == _comparable(original[key]), f"row {key} that must stay changed"
    for entry in audit:
        key = int(entry.row_key)
        copy = _comparable(store.decode_row(entry.row_json))
        # A tick may see the guest stopped between its stop hook and its destroy (pct destroy
        # --force runs the hooks first): the watcher then sets the row to the stop status
        # (CLEANUP_STOP_STATUS, "stopped"), and the audit copy holds the row as it was removed.
        as_was = [_comparable(original[key]), _comparable({**original[key], "status": "stopped"})]
        assert copy in as_was, f"audit copy of {key}"
    assert counters["total_removed"] == len(audit), (counters, len(audit))
    assert counters["ghost_apps_removed"] + counters["old_errors_removed"] == len(audit), counters
    return len(audited), Counter(a.source for a in audit)


def stratified_delays(n: int, span: float, rng: random.Random) -> list[float]:
    delays = [span * (i + rng.random()) / n for i in range(n)]
    rng.shuffle(delays)
    return delays


def post_run(receiver: Receiver, out: dict[str, Any]) -> None:
    """POST /run?force=true; retried while the start-up sweep still holds the sweeper (409)."""
    request = urllib.request.Request(
        receiver.base + RUN + "?force=true",
        data=b"",
        method="POST",
        headers={"Authorization": f"Bearer {receiver.admin}"},
    )
    out["sent"] = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(request, timeout=300) as answer:
                out["status"], out["body"] = answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as err:
            out["status"], out["body"] = err.code, json.loads(err.read() or b"{}")
        except (OSError, http.client.HTTPException) as exc:  # killed, maybe in the middle of the answer
            out["status"], out["error"] = None, type(exc).__name__
        if out.get("status") != 409:
            break
        time.sleep(0.05)
    out["done"] = time.monotonic()


def classify(removed: int, total: int, probe: str) -> str:
    if probe and removed == 0:
        return "during"
    if removed == 0:
        return "before"
    if removed == total:
        return "after"
    return "between"  # the watcher removes in several transactions; each is whole


# --- forced sweeps -------------------------------------------------------------------------


@dataclass
class SweepWorld:
    rows: list[dict[str, Any]]
    original: dict[int, dict[str, Any]] = field(default_factory=dict)
    candidates: set[int] = field(default_factory=set)
    keep: set[int] = field(default_factory=set)


def sweep_rows() -> list[dict[str, Any]]:
    old = timedelta(days=2)
    rows = [app_row(10_000 + i, "error", age=old) for i in range(BIG_OLD_ERRORS)]
    rows += [app_row(40_000 + i, "error", age=old) for i in range(BIG_GHOSTS)]
    rows += [app_row(100 + i, "running", age=timedelta(days=1)) for i in range(BIG_KEEP)]
    return rows


def sweep_guests(sim) -> None:
    for i in range(BIG_OLD_ERRORS):
        sim.add_guest(10_000 + i, node="pve1" if i % 2 else "pve2", status="stopped")
    for i in range(BIG_KEEP):
        sim.add_guest(100 + i, node="pve1", name=f"app{100 + i}.apps.local")


def sweep_attempt(
    sim, crash_db: CrashDB, world: SweepWorld, tmp_path: Path, name: str, kill: tuple[str, float] | None, restart: bool
) -> dict[str, Any]:
    """One forced sweep; ``kill`` = (anchor, seconds after it), or None to let it finish (calibration)."""
    crash_db.reset()
    db = crash_db.target
    receiver = Receiver(sim, db, tmp_path, name=name).start()
    monitor = None
    try:
        wait_until(lambda: receiver.get(STATS)[1].get("last_sweep") is not None, 60)  # start-up sweep: refused
        out: dict[str, Any] = {}
        monitor = ApplyMonitor(crash_db, 0.002 if crash_db.kind == "sqlite" else 0.01)
        poster = threading.Thread(target=post_run, args=(receiver, out), daemon=True)
        poster.start()
        if kill is None:
            poster.join(300)
            assert out["status"] == 200 and out["body"]["applied"] == len(world.candidates), out
            removed, _ = check_state(db, world.original, world.candidates, world.keep)
            assert removed == len(world.candidates)
            assert monitor.opened.is_set() and monitor.closed.is_set(), "the apply was not seen from outside"
            sent = out["sent"]
            return {
                "run": out["done"] - sent,
                "apply_from": monitor.opened_at - sent,
                "apply_to": monitor.closed_at - sent,
            }
        anchor, delay = kill
        while "sent" not in out:
            time.sleep(0.001)
        if anchor == "in_apply":
            monitor.opened.wait(120)
        elif anchor == "after_commit":
            monitor.closed.wait(120)
        time.sleep(delay)
        before_kill = crash_db.probe() if crash_db.kind == "postgres" else ""
        killed_at = time.monotonic() - out["sent"]
        receiver.kill()
        poster.join(30)
    finally:
        receiver.kill()
        if monitor is not None:
            monitor.stop()
    probe = crash_db.probe() or before_kill
    crash_db.settle()
    removed, _ = check_state(db, world.original, world.candidates, world.keep)
    state = classify(removed, len(world.candidates), probe)
    assert state != "between", "a sweep removes in ONE transaction: all or nothing"
    result = {
        "anchor": anchor,
        "delay": round(delay, 3),
        "killed_at": round(killed_at, 3),
        "state": state,
        "removed": removed,
        "probe": probe,
        "answered": out.get("status"),
    }
    if restart:
        again = Receiver(sim, db, tmp_path, name=name + "-restart").start()
        try:
            wait_until(lambda: again.get(STATS)[1].get("last_sweep") is not None, 60)
            out2: dict[str, Any] = {}
            post_run(again, out2)
            assert out2["status"] == 200, out2
            removed, _ = check_state(db, world.original, world.candidates, world.keep)
            assert removed == len(world.candidates)
            result["recovered_s"] = round(out2["done"] - out2["sent"], 2)
        finally:
            again.kill()
    return result


def kill_points(kills: int, calibration: dict[str, float], rng: random.Random) -> list[tuple[str, float]]:
    """Anchors in turn (anytime, in_apply, after_commit, ...); delays stratified within each."""
    per_anchor = {a: [i for i in range(kills) if ANCHORS[i % len(ANCHORS)] == a] for a in ANCHORS}
    spans = {
        "anytime": 1.3 * calibration["run"],
        "in_apply": 0.6 * (calibration["apply_to"] - calibration["apply_from"]),
        "after_commit": 0.2,
    }
    points: list[tuple[str, float]] = [("", 0.0)] * kills
    for anchor, slots in per_anchor.items():
        for slot, delay in zip(slots, stratified_delays(len(slots), spans[anchor], rng), strict=True):
            points[slot] = (anchor, delay)
    return points


def run_sweep_kills(sim, crash_db: CrashDB, tmp_path: Path, kills: int, restarts: int) -> list[dict]:
    world = SweepWorld(sweep_rows())
    crash_db.reset()
    world.original = rows_by_id(crash_db.target.engine)
    world.keep = {k for k, r in world.original.items() if r["status"] == "running"}
    world.candidates = set(world.original) - world.keep
    assert len(world.candidates) == BIG_OLD_ERRORS + BIG_GHOSTS
    calibration = sweep_attempt(sim, crash_db, world, tmp_path, f"{crash_db.kind}-calibration", None, False)
    rng = random.Random(f"{SEED}-sweep-{crash_db.kind}")
    results = []
    for i, point in enumerate(kill_points(kills, calibration, rng)):
        result = sweep_attempt(sim, crash_db, world, tmp_path, f"{crash_db.kind}-kill{i}", point, i < restarts)
        results.append(result)
        record(
            "crash",
            part="sweep",
            db=crash_db.kind,
            calibration_s=round(calibration["run"], 2),
            apply_s=round(calibration["apply_to"] - calibration["apply_from"], 2),
            **result,
        )
    states = Counter(r["state"] for r in results)
    print(
        f"\nforced sweep of {len(world.candidates)} rows on {crash_db.kind}: one run takes "
        f"{calibration['run']:.2f} s, its apply transaction {calibration['apply_from']:.2f}-"
        f"{calibration['apply_to']:.2f} s; {kills} kills: {dict(states)}"
    )
    return results


@pytest.fixture
def big_sim(sim):
    sweep_guests(sim)
    return sim


def test_sigkill_during_forced_sweeps_sqlite(big_sim, tmp_path):
    crash_db = SqliteCrashDB(tmp_path, sweep_rows())
    try:
        results = run_sweep_kills(big_sim, crash_db, tmp_path, KILLS[("sweep", "sqlite")], RESTARTS["sweep"])
    finally:
        crash_db.close()
    states = Counter(r["state"] for r in results)
    assert states["before"] and states["during"] and states["after"], states  # the kill points cover the run


@pytest.mark.postgres
def test_sigkill_during_forced_sweeps_postgres(big_sim, postgres_db, tmp_path):
    crash_db = PostgresCrashDB(postgres_db, sweep_rows())
    results = run_sweep_kills(big_sim, crash_db, tmp_path, KILLS[("sweep", "postgres")], 1)
    assert len(results) == KILLS[("sweep", "postgres")]


# --- watcher removals ------------------------------------------------------------------


def watch_rows() -> list[dict[str, Any]]:
    day = timedelta(days=1)
    return [app_row(1000 + i, "running", age=day) for i in range(WATCHED)] + [
        app_row(3000 + i, "running", age=day) for i in range(SMALL_KEEP)
    ]


def ensure_guests(sim) -> None:
    for vmid in [1000 + i for i in range(WATCHED)] + [3000 + i for i in range(SMALL_KEEP)]:
        if sim.guest(vmid) is None:
            sim.add_guest(vmid, node="pve1" if vmid % 2 else "pve2", name=f"app{vmid}.apps.local")


def post_events(receiver: Receiver, events: list[tuple[str, int]], acked: dict[str, int], stats: Counter) -> None:
    """The hookscripts' stop events; stops at the first connection failure (receiver gone)."""
    for event_id, vmid in events:
        if event_id in acked:
            continue
        try:
            code = receiver.post_event(vmid, "post-stop", event_id)
        except (OSError, http.client.HTTPException):
            stats["connection_failed"] += 1
            return
        stats[code] += 1
        if code in (200, 202):
            acked[event_id] = code


def inbox_state(db: Database) -> tuple[set[str], int]:
    if not sa.inspect(db.engine).has_table("janitor_inbox"):
        return set(), 0
    with db.engine.connect() as conn:
        rows = conn.execute(sa.select(store.inbox.c.event_id, store.inbox.c.processed_at)).all()
    return {r.event_id for r in rows}, sum(1 for r in rows if r.processed_at is None)


def watcher_attempt(
    sim, crash_db: CrashDB, tmp_path: Path, name: str, delay: float | None, secret: str
) -> dict[str, Any]:
    crash_db.reset()
    db = crash_db.target
    ensure_guests(sim)
    original = rows_by_id(db.engine)
    candidates = {k for k, r in original.items() if r["lxc_id"] < 3000}
    keep = set(original) - candidates
    events = [(f"{name}-{r['lxc_id']}", r["lxc_id"]) for k, r in sorted(original.items()) if k in candidates]
    acked: dict[str, int] = {}
    answers: Counter = Counter()

    receiver = Receiver(sim, db, tmp_path, name=name, secret=secret).start()
    try:
        started = time.monotonic()
        for _, vmid in events:  # destroyed at once; the hookscripts post their stop events
            sim.destroy_guest(vmid)
        poster = threading.Thread(target=post_events, args=(receiver, events, acked, answers), daemon=True)
        poster.start()
        if delay is None:
            poster.join(120)
            took = wait_until(lambda: not (set(rows_by_id(db.engine)) & candidates), 60)
            return {"calibration": time.monotonic() - started, "after_posting": took}
        time.sleep(delay)
        before_kill = crash_db.probe() if crash_db.kind == "postgres" else ""
        receiver.kill()
        poster.join(30)
    finally:
        receiver.kill()
    acked_before_kill = len(acked)
    probe = crash_db.probe() or before_kill
    crash_db.settle()
    removed, _ = check_state(db, original, candidates, keep)
    stored, backlog = inbox_state(db)
    missing = set(acked) - stored
    assert not missing, f"{len(missing)} events answered 2xx are not in the inbox"
    state = classify(removed, len(candidates), probe)

    # The next start: the inbox backlog is drained, the undelivered events come from the spool.
    again = Receiver(sim, db, tmp_path, name=name + "-restart", secret=secret).start()
    try:
        restarted = time.monotonic()
        post_events(again, events, acked, answers)
        assert len(acked) == len(events), answers
        wait_until(lambda: inbox_state(db)[1] == 0 and not (set(rows_by_id(db.engine)) & candidates), 60)
        recovered = time.monotonic() - restarted
    finally:
        again.kill()
    final, sources = check_state(db, original, candidates, keep)
    assert final == len(candidates)
    return {
        "delay": round(delay, 3),
        "state": state,
        "removed": removed,
        "probe": probe,
        "backlog_left": backlog,
        "events_acked_before_kill": acked_before_kill,
        "answers": {str(k): v for k, v in answers.items()},
        "recovered_s": round(recovered, 2),
        "removed_by": dict(sources),
    }


def run_watcher_kills(sim, crash_db: CrashDB, tmp_path: Path, kills: int) -> list[dict]:
    secret = secrets.token_hex(16)
    calibration = watcher_attempt(sim, crash_db, tmp_path, f"{crash_db.kind}-wcal", None, secret)
    rng = random.Random(f"{SEED}-watcher-{crash_db.kind}")
    results = []
    for i, delay in enumerate(stratified_delays(kills, 1.3 * calibration["calibration"], rng)):
        result = watcher_attempt(sim, crash_db, tmp_path, f"{crash_db.kind}-w{i}", delay, secret)
        assert "503" not in result["answers"], result  # an event store that answers 503 under load
        results.append(result)
        record("crash", part="watcher", db=crash_db.kind, calibration_s=round(calibration["calibration"], 2), **result)
    states = Counter(r["state"] for r in results)
    print(
        f"\n{WATCHED} watched guests destroyed at once on {crash_db.kind}: removed "
        f"{calibration['calibration']:.2f} s after the destroy; {kills} kills: {dict(states)}; "
        f"backlog left: {[r['backlog_left'] for r in results]}"
    )
    return results


def test_sigkill_during_watcher_removals_sqlite(sim, tmp_path):
    crash_db = SqliteCrashDB(tmp_path, watch_rows())
    try:
        results = run_watcher_kills(sim, crash_db, tmp_path, KILLS[("watcher", "sqlite")])
    finally:
        crash_db.close()
    assert any(r["backlog_left"] for r in results) or any(r["state"] == "before" for r in results), results


@pytest.mark.postgres
def test_sigkill_during_watcher_removals_postgres(sim, postgres_db, tmp_path):
    crash_db = PostgresCrashDB(postgres_db, watch_rows())
    results = run_watcher_kills(sim, crash_db, tmp_path, KILLS[("watcher", "postgres")])
    assert len(results) == KILLS[("watcher", "postgres")]
