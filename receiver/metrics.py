"""Prometheus metrics, on a registry of the app's own (so tests can build many apps).

The watcher, the sweep and the HTTP side report here; ``GET /metrics`` renders it.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.removals = Counter(
            "pve_janitor_rows_removed", "Rows removed or marked, by reason and source", ["reason", "source"], registry=r
        )
        self.sweeps = Counter("pve_janitor_sweeps", "Sweeps, by outcome", ["outcome"], registry=r)
        self.events = Counter(
            "pve_janitor_events", "Hookscript events received, by phase and outcome", ["phase", "outcome"], registry=r
        )
        self.inventory_reads = Histogram(
            "pve_janitor_inventory_read_seconds",
            "Latency of inventory reads from the Proxmox API",
            ["outcome"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.watched = Gauge("pve_janitor_watched_vmids", "VMIDs on the watch list", registry=r)
        self.inbox_backlog = Gauge("pve_janitor_inbox_backlog", "Events received but not yet processed", registry=r)
        self.last_success = Gauge(
            "pve_janitor_last_successful_sweep_timestamp_seconds",
            "Unix time of the last sweep that completed (done or nothing to do)",
            registry=r,
        )
        self.watcher_errors = Counter(
            "pve_janitor_watcher_errors", "Watcher ticks that could not complete, by kind", ["kind"], registry=r
        )
        self.refusals = Counter(
            "pve_janitor_refusals",
            "Removals refused for safety (nothing changed), by "
            "reason (inventory, privilege, no_quorum, empty_inventory, guard, would_empty, "
            "database, lease) and source",
            ["reason", "source"],
            registry=r,
        )
        self.hidden_guests = Gauge(
            "pve_janitor_hidden_guests",
            "Ghosts' VMIDs that Proxmox says are in use "
            "although the token was not shown the guest (rows kept), at the last removal",
            ["source"],
            registry=r,
        )
        self.task_tail_blind = Gauge(
            "pve_janitor_task_tail_blind",
            "1 when the token lacks Sys.Audit on /, so "
            "/cluster/tasks shows only its own tasks (destroys of stopped guests wait "
            "for the sweep)",
            registry=r,
        )
        self.probe_results = Counter(
            "pve_janitor_probe_results",
            "What the watcher's reads said of each watched VMID, by kind (guest: "
            "its status on its node, node: its node's guest list, full: the whole guest list) and result "
            "(present, gone, offline, privilege, auth, http, malformed); gone only nominates a VMID for the "
            "removal pipeline",
            ["kind", "result"],
            registry=r,
        )
        self.watcher_read_bytes = Counter(
            "pve_janitor_watcher_read_bytes",
            "Bytes of answers the watcher read from Proxmox, by kind (guest, node, full)",
            ["kind"],
            registry=r,
        )
        self.leader = Gauge("pve_janitor_leader", "1 when this receiver holds the sweep lease", registry=r)

    def removal(self, reason: str, source: str, n: int = 1) -> None:
        if n:
            self.removals.labels(reason=reason, source=source).inc(n)

    def refusal(self, reason: str, source: str) -> None:
        self.refusals.labels(reason=reason, source=source).inc()

    def sweep(self, outcome: str) -> None:
        self.sweeps.labels(outcome=outcome).inc()

    def event(self, phase: str, outcome: str) -> None:
        self.events.labels(phase=phase, outcome=outcome).inc()

    def inventory_read(self, seconds: float, outcome: str) -> None:
        self.inventory_reads.labels(outcome=outcome).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
