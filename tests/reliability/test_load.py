"""Load: a node shutdown's burst of events against `pve-janitor serve`, and a soak.

The burst is what PROXMOX.md promises for `stopall`: pre-stop and post-stop for
every guest of a node, hundreds at once.  The receiver must keep every event
(inbox), answer none with a 5xx, read the inventory at most once per watcher
tick however many events arrive (DESIGN.md, principle 7), and remove nothing:
the guests are stopped, not gone.  The soak runs mixed traffic for a while and
samples the receiver's memory and open files.
"""

from __future__ import annotations

import os
import queue
import secrets
import threading
import time
from datetime import timedelta

import pytest
import requests
import sqlalchemy as sa

from receiver import store
from receiver.db import write_transaction
from receiver.simulator.scene import app_row

from .support_io import (
    LONG,
    Serve,
    event_body,
    percentile,
    proc_fd_count,
    proc_rss_kb,
    record,
    seed_guests_and_rows,
    signed_headers,
    table_rows,
    wait_until,
)
from .support_soak import Sample, rss_in_30_days_kib, windows

GUESTS = 500  # one node's guests: 1000 events (pre-stop + post-stop each)
SENDERS = 50
WATCH_INTERVAL = 1.0  # CLEANUP_WATCH_INTERVAL_SECONDS (the default)
# JANITOR_SOAK_SECONDS runs a soak of another length (say 300 s, to compare two builds quickly).
SOAK_SECONDS = int(os.environ.get("JANITOR_SOAK_SECONDS", 1800 if LONG else 60))
SOAK_WINDOW = max(15, SOAK_SECONDS // 6)  # seconds: the soak reports its footprint per window


def send_all(receiver: Serve, events: list[tuple[int, str, str]], senders: int) -> list[tuple[str, int, float]]:
    """POST every (vmid, phase, event_id) from ``senders`` threads; (event_id, status, seconds) each."""
    work: queue.Queue = queue.Queue()
    for item in events:
        work.put(item)
    results: list[tuple[str, int, float]] = []
    lock = threading.Lock()

    def sender() -> None:
        with requests.Session() as session:
            while True:
                try:
                    vmid, phase, event_id = work.get_nowait()
                except queue.Empty:
                    return
                body = event_body(vmid, phase, event_id)
                started = time.monotonic()
                try:
                    status = session.post(
                        receiver.base + "/api/v1/events",
                        data=body,
                        timeout=60,
                        headers=signed_headers(receiver.secret, body),
                    ).status_code
                except requests.RequestException:
                    status = 0
                with lock:
                    results.append((event_id, status, time.monotonic() - started))

    threads = [threading.Thread(target=sender) for _ in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _database(request, kind: str):
    if kind == "postgres" and not LONG:
        pytest.skip("the PostgreSQL burst runs in `make reliability` (JANITOR_RELIABILITY=long)")
    return request.getfixturevalue("sqlite_db" if kind == "sqlite" else "postgres_db")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_node_shutdown_burst_loses_nothing_and_reads_once_per_tick(request, sim, tmp_path, kind):
    db = _database(request, kind)
    vmids = list(range(1000, 1000 + GUESTS))
    seed_guests_and_rows(db, sim, vmids)
    for vmid in vmids:  # the node is shutting down: every guest ends up stopped, none destroyed
        sim.stop_guest(vmid)
    before = table_rows(db)
    receiver = Serve(sim, db, tmp_path, extra={"CLEANUP_WATCH_INTERVAL_SECONDS": WATCH_INTERVAL}).start()
    try:
        # The start-up sweep reads the inventory too: let it finish before counting.
        receiver.wait_first_sweep()
        events = [(vmid, phase, secrets.token_hex(16)) for vmid in vmids for phase in ("pre-stop", "post-stop")]
        sim.reset_counts()
        started = time.monotonic()
        results = send_all(receiver, events, SENDERS)
        sent = time.monotonic() - started

        def settled() -> bool:
            with db.engine.connect() as conn:
                stopped = conn.execute(sa.text("SELECT COUNT(*) FROM apps WHERE status = 'stopped'")).scalar()
            return stopped == GUESTS and receiver.stats()["inbox_backlog"] == 0

        wait_until(settled, 60, step=0.02, what="every event processed and every row marked stopped")
        elapsed = time.monotonic() - started
        reads = sim.request_count("/cluster/resources")
        ticks = int(elapsed / WATCH_INTERVAL) + 1

        statuses = sorted({status for _, status, _ in results})
        latencies = [seconds for _, _, seconds in results]
        p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
        print(
            f"\n{kind}: {len(results)} events from {SENDERS} senders in {sent:.2f} s "
            f"({len(results) / sent:.0f}/s), statuses {statuses}, accept latency p50 {p50 * 1000:.1f} ms "
            f"p99 {p99 * 1000:.1f} ms max {max(latencies) * 1000:.1f} ms; settled after {elapsed:.2f} s; "
            f"/cluster/resources reads {reads} for {ticks} ticks"
        )

        record(
            "burst",
            db=kind,
            events=len(results),
            senders=SENDERS,
            statuses=statuses,
            p50_ms=round(p50 * 1000, 1),
            p99_ms=round(p99 * 1000, 1),
            max_ms=round(max(latencies) * 1000, 1),
            send_s=round(sent, 2),
            settled_s=round(elapsed, 2),
            resources_reads=reads,
            ticks=ticks,
        )
        assert len(results) == 2 * GUESTS
        assert statuses == [202], [r for r in results if r[1] != 202][:5]
        with db.engine.connect() as conn:
            stored = dict(conn.execute(sa.select(store.inbox.c.event_id, store.inbox.c.processed_at)).all())
            audited = conn.execute(sa.select(sa.func.count()).select_from(store.audit)).scalar()
        assert set(stored) == {event_id for _, _, event_id in events}  # zero lost
        assert all(processed is not None for processed in stored.values())  # all processed
        assert reads <= ticks
        after = table_rows(db)
        assert after == {key: {**row, "status": "stopped"} for key, row in before.items()}
        assert audited == 0
        assert receiver.stats()["total_removed"] == 0
        assert "Traceback" not in receiver.log_text()
    finally:
        receiver.close()


class Soak:
    """Mixed traffic: stops, starts, destroys with their events, new apps, sweeps, reads."""

    def __init__(self, receiver: Serve, sim, db, first_vmid: int, count: int):
        self.receiver, self.sim, self.db = receiver, sim, db
        self.alive = list(range(first_vmid, first_vmid + count))
        self.next_vmid = first_vmid + count
        self.destroyed: list[int] = []
        self.statuses: dict[str, dict[int, int]] = {}
        self.latencies: list[float] = []
        self.step = 0
        self.apps = sa.Table("apps", sa.MetaData(), autoload_with=db.engine)

    def count(self, what: str, status: int) -> None:
        self.statuses.setdefault(what, {}).setdefault(status, 0)
        self.statuses[what][status] += 1

    def event(self, vmid: int, phase: str) -> None:
        answer = self.receiver.post_event(vmid, phase)
        self.latencies.append(answer.seconds)
        self.count("event", answer.status)

    def once(self, rng) -> None:
        self.step += 1
        roll = rng.random()
        vmid = rng.choice(self.alive)
        guest = self.sim.guest(vmid)
        if roll < 0.35:  # stop or start, with the hook's two events
            if guest["status"] == "running":
                self.sim.stop_guest(vmid)
                self.event(vmid, "pre-stop")
                self.event(vmid, "post-stop")
            else:
                self.sim.start_guest(vmid)
                self.event(vmid, "pre-start")
                self.event(vmid, "post-start")
        elif roll < 0.45 and len(self.alive) > 20:  # the platform destroys an app's guest
            self.alive.remove(vmid)
            self.destroyed.append(vmid)
            self.sim.destroy_guest(vmid)
            self.event(vmid, "post-stop")
        elif roll < 0.55:  # the platform deploys a new app
            new = self.next_vmid
            self.next_vmid += 1
            self.sim.add_guest(new)
            with write_transaction(self.db.engine) as conn:  # the platform, writing beside the receiver
                conn.execute(self.apps.insert().values(**app_row(new, "running", age=timedelta(days=1))))
            self.alive.append(new)
        elif roll < 0.65:
            answer = self.receiver.run("dry_run=true" if rng.random() < 0.7 else "")
            self.count("run", answer.status)
        else:
            path = rng.choice(
                ["/api/v1/system/cleanup/stats", "/api/v1/system/cleanup/history?limit=20", "/metrics", "/healthz", "/"]
            )
            self.count(path.split("?")[0], self.receiver.get(path).status)


@pytest.mark.slow
def test_soak_memory_and_open_files_stay_flat(sim, sqlite_db, tmp_path):
    import random

    rng = random.Random(5)
    seed_guests_and_rows(sqlite_db, sim, range(200, 260))
    receiver = Serve(sim, sqlite_db, tmp_path, extra={"CLEANUP_WATCH_SECONDS": 10, "CLEANUP_GRACE_MINUTES": 0}).start()
    soak = Soak(receiver, sim, sqlite_db, 200, 60)
    samples: list[Sample] = []
    try:
        started = time.monotonic()
        next_sample = started
        while time.monotonic() - started < SOAK_SECONDS:
            if time.monotonic() >= next_sample:
                samples.append(
                    Sample(time.monotonic() - started, proc_rss_kb(receiver.pid), proc_fd_count(receiver.pid))
                )
                next_sample += 1.0
            soak.once(rng)
            time.sleep(0.02)
        ws = windows(samples, SOAK_WINDOW, SOAK_SECONDS)
        first, second, last = ws[0], ws[1], ws[-1]
        per_hour, month = rss_in_30_days_kib(ws)
        print(
            f"\nsoak {SOAK_SECONDS} s: {soak.step} steps, {len(soak.destroyed)} guests destroyed, "
            f"{soak.next_vmid - 260} apps added; statuses {soak.statuses}; event latency "
            f"p50 {percentile(soak.latencies, 50) * 1000:.1f} ms p99 {percentile(soak.latencies, 99) * 1000:.1f} ms\n"
            + "\n".join(w.line() for w in ws)
            + f"\n  RSS trend from the second window: {per_hour / 1024:+.2f} MiB/h; "
            f"straight line to 30 days: {month / 1024:.1f} MiB"
        )
        record(
            "soak",
            seconds=SOAK_SECONDS,
            steps=soak.step,
            destroyed=len(soak.destroyed),
            rss_first_kib=first.rss_max_kib,
            rss_last_kib=last.rss_max_kib,
            fds_first=first.fds_max,
            fds_last=last.fds_max,
            windows=[
                {
                    "minutes": f"{w.start / 60:.1f}-{w.end / 60:.1f}",
                    "rss_median_mib": round(w.rss_median_kib / 1024, 1),
                    "rss_max_mib": round(w.rss_max_kib / 1024, 1),
                    "fds_max": w.fds_max,
                }
                for w in ws
            ],
            rss_mib_per_hour=round(per_hour / 1024, 2),
            rss_30_days_mib=round(month / 1024, 1),
            event_p50_ms=round(percentile(soak.latencies, 50) * 1000, 1),
            event_p99_ms=round(percentile(soak.latencies, 99) * 1000, 1),
        )
        assert all(status < 500 for counts in soak.statuses.values() for status in counts)
        assert set(soak.statuses["event"]) <= {200, 202}
        assert last.rss_max_kib <= 1.2 * first.rss_max_kib + 4096
        # Flat once warm: the last window's median within 8 MiB (or 10 %) of the second's.
        assert last.rss_median_kib <= second.rss_median_kib + max(8192, 0.1 * second.rss_median_kib), ws
        assert last.fds_max <= first.fds_max + 5

        # Every destroyed guest's row is gone (watcher or sweep), every other row is still there.
        wait_until(
            lambda: not ({r["lxc_id"] for r in table_rows(sqlite_db).values()} & set(soak.destroyed)),
            15,
            what="destroyed guests' rows removed",
        )
        remaining = {r["lxc_id"] for r in table_rows(sqlite_db).values()}
        assert remaining == set(soak.alive)
        stats = receiver.stats()
        with sqlite_db.engine.connect() as conn:
            audited = conn.execute(sa.select(store.audit.c.vmid)).scalars().all()
        assert sorted(audited) == sorted(soak.destroyed)
        assert stats["total_removed"] == len(audited) and stats["ports_freed"] == 2 * len(audited)
        assert "Traceback" not in receiver.log_text()
    finally:
        receiver.close()
