"""Fail-over: two `pve-janitor serve` on one PostgreSQL database, the leader killed again and again.

What must hold (DESIGN.md, "Scaling out"): exactly one receiver holds the lease and
watches; when it dies another takes over within the lease TTL; no scheduled sweep
runs twice at once; nothing is removed twice and the counters equal the audit.
Meanwhile guests are destroyed (with their stop events), guests stop and start
(tasks), and both receivers get manual sweeps (POST /run) as fast as they answer.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests
import sqlalchemy as sa

from receiver import store

from .support_io import LONG, Serve, record, seed_guests_and_rows, table_rows, wait_until

if TYPE_CHECKING:
    from conftest import Database

    from receiver.simulator import ProxmoxSimulator

LEASE_SECONDS = 3
TICK = 1.0  # CLEANUP_WATCH_INTERVAL_SECONDS
KILLS = 20 if LONG else 3
GUESTS = range(100, 200)


@dataclass
class Cluster:
    """The receivers, the traffic against them, and what was observed."""

    sim: ProxmoxSimulator
    db: Database
    tmp_path: Path
    secret: str = "failover-hook-secret-0123456789"
    admin: str = "failover-admin-token-0123456789"
    receivers: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    frozen: set = field(default_factory=set)  # names of SIGSTOPped receivers
    resumed: dict = field(default_factory=dict)  # name -> monotonic time of SIGCONT
    samples: list = field(default_factory=list)  # [(t, {name: leader flag})]
    runs: list = field(default_factory=list)  # (name, status, body) of POST /run
    statuses: list = field(default_factory=list)  # every HTTP status seen
    alive: list = field(default_factory=lambda: list(GUESTS))
    destroyed: list = field(default_factory=list)
    started_count: int = 0

    def start_receiver(self) -> Serve:
        self.started_count += 1
        receiver = Serve(
            self.sim,
            self.db,
            self.tmp_path,
            name=f"r{self.started_count}",
            secret=self.secret,
            admin=self.admin,
            extra={
                "CLEANUP_LEASE_SECONDS": LEASE_SECONDS,
                "CLEANUP_WATCH_INTERVAL_SECONDS": TICK,
                "CLEANUP_TASK_POLL_SECONDS": 2,
                "CLEANUP_GRACE_MINUTES": 0,
            },
        ).start()
        with self.lock:
            self.receivers.append(receiver)
        return receiver

    def live(self) -> list[Serve]:
        with self.lock:
            return [r for r in self.receivers if r.alive() and r.name not in self.frozen]

    def leader_flag(self, receiver: Serve) -> bool | None:
        try:
            answer = receiver.get("/api/v1/system/cleanup/stats", timeout=2, session=requests.Session())
        except requests.RequestException:
            return None
        self.statuses.append(answer.status)
        return answer.json().get("leader") if answer.status == 200 else None

    # --- background traffic -----------------------------------------------------

    def sample_leaders(self) -> None:
        while not self.stop.wait(0.2):
            now = time.monotonic()
            flags = {r.name: self.leader_flag(r) for r in self.live()}
            # A receiver just woken from SIGSTOP answers from its last tick until its next one.
            flags = {n: f for n, f in flags.items() if now - self.resumed.get(n, -1e9) > 2 * TICK}
            self.samples.append((now, flags))

    def manual_sweeps(self, seed: int) -> None:
        rng = random.Random(seed)
        with requests.Session() as session:
            while not self.stop.wait(0.15):
                live = self.live()
                if not live:
                    continue
                receiver = rng.choice(live)
                try:
                    answer = receiver.run(session=session, timeout=10)
                except requests.RequestException:
                    continue  # killed while answering
                self.statuses.append(answer.status)
                self.runs.append((receiver.name, answer.status, answer.json()))

    def churn(self) -> None:
        """Guests stop and start, some are destroyed, each with its event; the task list rolls over."""
        rng = random.Random(2)
        with requests.Session() as session:
            while not self.stop.wait(0.05):
                vmid = rng.choice(self.alive)
                guest = self.sim.guest(vmid)
                assert guest is not None, f"guest {vmid} is alive"
                if rng.random() < 0.1 and len(self.alive) > 30:
                    self.alive.remove(vmid)
                    self.destroyed.append(vmid)
                    self.sim.destroy_guest(vmid)
                    phase = "post-stop"
                elif guest["status"] == "running":
                    self.sim.stop_guest(vmid)
                    phase = "post-stop"
                else:
                    self.sim.start_guest(vmid)
                    phase = "post-start"
                live = self.live()
                if live:
                    try:
                        self.statuses.append(rng.choice(live).post_event(vmid, phase, session=session).status)
                    except requests.RequestException:
                        pass  # killed while answering: the hookscript would spool it

    def leader(self, timeout: float) -> Serve:
        """The one live receiver that says it leads (waits until there is exactly one)."""
        found: list[Serve] = []

        def one() -> bool:
            found[:] = [r for r in self.live() if self.leader_flag(r)]
            return len(found) == 1

        wait_until(one, timeout, step=0.1, what="exactly one leader")
        return found[0]


@pytest.mark.slow
@pytest.mark.postgres
def test_leader_killed_again_and_again_the_other_takes_over_and_nothing_runs_twice(sim, postgres_db, tmp_path):
    seed_guests_and_rows(postgres_db, sim, GUESTS)
    cluster = Cluster(sim, postgres_db, tmp_path)
    takeovers: list[float] = []
    threads = [
        threading.Thread(target=f, args=a, daemon=True)
        for f, a in (
            (cluster.sample_leaders, ()),
            (cluster.manual_sweeps, (1,)),
            (cluster.manual_sweeps, (2,)),
            (cluster.churn, ()),
        )
    ]
    leaderless: list[tuple[float, float]] = []  # when no leader is expected: start-up and each takeover
    try:
        began = time.monotonic()
        cluster.start_receiver()
        cluster.start_receiver()
        for t in threads:
            t.start()
        cluster.leader(LEASE_SECONDS + 5)
        leaderless.append((began, time.monotonic() + 0.5))
        for _ in range(KILLS):
            proc = cluster.leader(LEASE_SECONDS + 5).proc
            assert proc is not None  # the leader is a running receiver
            proc.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            proc.wait()
            cluster.leader(LEASE_SECONDS + 5)
            takeovers.append(time.monotonic() - killed)
            leaderless.append((killed - 0.5, time.monotonic() + 0.5))
            cluster.start_receiver()

        # A leader that hangs (SIGSTOP) rather than dies: its process still exists, so the
        # lease must run out before the other takes over; woken up, it must step down.
        leader = cluster.leader(LEASE_SECONDS + 5)
        with cluster.lock:
            cluster.frozen.add(leader.name)
        os.kill(leader.pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        cluster.leader(LEASE_SECONDS + 5)
        hung_takeover = time.monotonic() - frozen_at
        leaderless.append((frozen_at - 0.5, time.monotonic() + 0.5))
        os.kill(leader.pid, signal.SIGCONT)
        cluster.resumed[leader.name] = time.monotonic()
        with cluster.lock:
            cluster.frozen.discard(leader.name)
        step_down = wait_until(
            lambda: cluster.leader_flag(leader) is False,
            2 * TICK + 2,
            step=0.05,
            what="the woken receiver stepping down",
        )
        time.sleep(2)
    finally:
        cluster.stop.set()
        for t in threads:
            t.join(15)

    try:
        # Settle: the remaining leader removes what the churn destroyed.
        wait_until(
            lambda: not ({r["lxc_id"] for r in table_rows(postgres_db).values()} & set(cluster.destroyed)),
            20,
            what="every destroyed guest's row removed",
        )
        remaining = {r["lxc_id"] for r in table_rows(postgres_db).values()}
        with postgres_db.engine.connect() as conn:
            audit = conn.execute(sa.select(store.audit.c.row_key, store.audit.c.vmid)).all()
            counters = store.read_counters(conn)
            sweeps = conn.execute(
                sa.select(store.runs.c.started_at, store.runs.c.finished_at)
                .where(store.runs.c.source == "sweep")
                .order_by(store.runs.c.started_at)
            ).all()
        overlapping_sweeps = [(a, b) for a, b in itertools.pairwise(sweeps) if b.started_at < a.finished_at]
        manual = [
            (datetime.fromisoformat(body["started_at"]), body["duration_s"], name)
            for name, status, body in cluster.runs
            if status == 200 and body.get("started_at")
        ]
        manual_overlaps = sum(
            1
            for i, (a, da, na) in enumerate(manual)
            for b, db_, nb in manual[i + 1 :]
            if na != nb and a < b + timedelta(seconds=db_) and b < a + timedelta(seconds=da)
        )
        leaders_per_sample = [sum(1 for f in flags.values() if f) for _, flags in cluster.samples]
        print(
            f"\nfail-over: {KILLS} SIGKILLs, takeover after {', '.join(f'{t:.2f}' for t in takeovers)} s "
            f"(max {max(takeovers):.2f} s, lease {LEASE_SECONDS} s, tick {TICK} s); SIGSTOP takeover "
            f"{hung_takeover:.2f} s, woken leader stepped down after {step_down:.2f} s; "
            f"{len(cluster.samples)} leader samples, max leaders at once {max(leaders_per_sample)}; "
            f"{len(cluster.runs)} manual sweeps ({sum(1 for r in cluster.runs if r[1] == 200)} ok, "
            f"{sum(1 for r in cluster.runs if r[1] == 409)} 409, {manual_overlaps} pairs on two receivers at once); "
            f"{len(sweeps)} scheduled sweeps; "
            f"{len(cluster.destroyed)} guests destroyed, {len(audit)} rows removed"
        )

        record(
            "failover",
            kills=KILLS,
            takeover_s=[round(t, 2) for t in takeovers],
            hung_takeover_s=round(hung_takeover, 2),
            step_down_s=round(step_down, 2),
            max_leaders=max(leaders_per_sample),
            manual_sweeps=len(cluster.runs),
            manual_overlaps=manual_overlaps,
            scheduled_sweeps=len(sweeps),
            removed=len(audit),
        )
        assert max(takeovers) <= LEASE_SECONDS + 2 * TICK
        assert hung_takeover <= LEASE_SECONDS + 2 * TICK + 1
        assert max(leaders_per_sample) == 1
        unexpected = [
            t for t, flags in cluster.samples if not any(flags.values()) and not any(a <= t <= b for a, b in leaderless)
        ]
        assert not unexpected, f"{len(unexpected)} samples without a leader outside start-up and takeovers"
        assert not overlapping_sweeps, overlapping_sweeps
        assert all(status < 500 for status in cluster.statuses), sorted(set(cluster.statuses))
        # Nothing removed twice, nothing removed that exists, counters equal to the audit.
        assert len({key for key, _ in audit}) == len(audit)
        assert sorted(v for _, v in audit) == sorted(cluster.destroyed)
        assert remaining == set(cluster.alive)
        assert counters["total_removed"] == counters["ghost_apps_removed"] == len(audit)
        assert counters["ports_freed"] == 2 * len(audit)
        for receiver in cluster.receivers:
            assert "Traceback" not in receiver.log_text(), receiver.name
    finally:
        for receiver in cluster.receivers:
            receiver.close()
