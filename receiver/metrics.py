"""Prometheus metrics, on a registry of the app's own (so tests can build many apps).

The watcher, the sweep and the HTTP side report here; ``GET /metrics`` renders it.
The ``*_created`` series prometheus_client adds to every counter and histogram are left
out of the rendering (they double the series and no rule or dashboard reads them); the
library's own switch for that is global, this registry's filter touches nothing else.
"""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric

from . import __version__
from .model import Refusal, Rejection

CONTENT_TYPE = CONTENT_TYPE_LATEST
SWEEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _WithoutCreated:
    """A registry's families without their ``<name>_created`` samples."""

    def __init__(self, registry: CollectorRegistry):
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            created = family.name + "_created"
            if any(s.name == created for s in family.samples):
                family = copy.copy(family)
                family.samples = [s for s in family.samples if s.name != created]
            yield family


class Metrics:
    def __init__(self, version: str = __version__) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.build_info = Gauge(
            "pve_janitor_build_info", "Always 1; the version label says which pve-janitor runs", ["version"], registry=r
        )
        self.build_info.labels(version=version).set(1)
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
        self.sweep_duration = Histogram(
            "pve_janitor_sweep_duration_seconds",
            "How long sweeps took, whatever their outcome",
            buckets=SWEEP_BUCKETS,
            registry=r,
        )
        self.sweep_interval = Gauge(
            "pve_janitor_sweep_interval_seconds", "CLEANUP_INTERVAL_MINUTES, in seconds (for alert rules)", registry=r
        )
        self.events_rejected = Counter(
            "pve_janitor_events_rejected",
            "Hookscript events refused, by reason (" + ", ".join(Rejection) + ")",
            ["reason"],
            registry=r,
        )
        # Every series alert rules count is there from the start, at 0: increase() over a
        # series that appears at 1 would miss that first one.
        for rejection in Rejection:
            self.events_rejected.labels(reason=rejection.value)
        for refusal in Refusal:
            for source in ("sweep", "watcher"):
                self.refusals.labels(reason=refusal.value, source=source)
        self.pending_plans = Gauge(
            "pve_janitor_pending_plans",
            "Plans a rule that --force lifts refused, kept for review and not yet decided or expired",
            registry=r,
        )
        self.holds = Gauge("pve_janitor_holds", "Holds in force (rows and VMIDs never removed)", registry=r)
        self.allocations = Gauge(
            "pve_janitor_allocations", "Reservations in force (VMIDs, hostnames, ports handed out)", registry=r
        )
        self.rows_held = Gauge(
            "pve_janitor_rows_held",
            "Rows a hold kept that the last sweep would otherwise have acted on",
            registry=r,
        )
        self.webhook_backlog = Gauge(
            "pve_janitor_webhook_backlog",
            "Webhook events not yet delivered, by target (the URL without credentials or query), "
            "read from the outbox when scraped",
            ["target"],
            registry=r,
        )
        self.webhook_deliveries = Counter(
            "pve_janitor_webhook_deliveries",
            "Webhook POSTs by this receiver, by target and outcome (delivered: answered 2xx; failed: "
            "no connection, timeout, TLS error or another status, tried again later)",
            ["target", "outcome"],
            registry=r,
        )
        self.webhook_last_delivery = Gauge(
            "pve_janitor_webhook_last_delivery_timestamp_seconds",
            "Unix time of the last webhook event this receiver delivered, by target (0: none yet)",
            ["target"],
            registry=r,
        )
        self.watcher_up = Gauge("pve_janitor_watcher_up", "1 while the watcher's thread runs", registry=r)
        self.guests_without_hook = Gauge(
            "pve_janitor_guests_without_hook",
            "Guests whose config, as last read, names no pve-janitor hookscript (they send no event), by "
            "node; read from the coverage cache when scraped",
            ["node"],
            registry=r,
        )
        self.node_events_missing = Gauge(
            "pve_janitor_node_events_missing",
            "1 when a node's guests whose config names the hookscript started or stopped and the node "
            "sent no event for any of it (hook file missing there, or hook.conf wrong?); set by the lease holder",
            ["node"],
            registry=r,
        )
        self.watcher_last_tick = Gauge(
            "pve_janitor_watcher_last_tick_timestamp_seconds", "Unix time of the watcher's last tick", registry=r
        )

    def removal(self, reason: str, source: str, n: int = 1) -> None:
        if n:
            self.removals.labels(reason=reason, source=source).inc(n)

    def refusal(self, reason: str, source: str) -> None:
        self.refusals.labels(reason=reason, source=source).inc()

    def sweep(self, outcome: str, duration_s: float | None = None) -> None:
        self.sweeps.labels(outcome=outcome).inc()
        if duration_s is not None:
            self.sweep_duration.observe(duration_s)

    def rejected(self, reason: str) -> None:
        self.events_rejected.labels(reason=reason).inc()

    def webhook_targets(self, targets: list[str]) -> None:
        """Every configured target's series, at 0 from the start (so increase() sees the first one)."""
        for target in targets:
            self.webhook_backlog.labels(target=target)
            self.webhook_last_delivery.labels(target=target)
            for outcome in ("delivered", "failed"):
                self.webhook_deliveries.labels(target=target, outcome=outcome)

    def webhook_delivered(self, target: str, timestamp: float) -> None:
        self.webhook_deliveries.labels(target=target, outcome="delivered").inc()
        self.webhook_last_delivery.labels(target=target).set(timestamp)

    def webhook_failed(self, target: str) -> None:
        self.webhook_deliveries.labels(target=target, outcome="failed").inc()

    def coverage_nodes(self, flagged: dict[str, bool]) -> None:
        """The node checks of the last coverage pass (empty: none, this receiver stepped down)."""
        self.node_events_missing.clear()
        for node, missing in flagged.items():
            self.node_events_missing.labels(node=node).set(1 if missing else 0)

    def coverage_guests(self, without_hook: dict[str, int]) -> None:
        """Guests without the hook per node, as the coverage cache holds them now."""
        self.guests_without_hook.clear()
        for node, n in without_hook.items():
            self.guests_without_hook.labels(node=node).set(n)

    def follow_watcher(self, alive: Callable[[], bool], last_tick: Callable[[], dt.datetime | None]) -> None:
        """Read the watcher's state when scraped (a stalled watcher cannot report itself)."""
        self.watcher_up.set_function(lambda: 1.0 if alive() else 0.0)
        self.watcher_last_tick.set_function(lambda: _timestamp(last_tick()))

    def event(self, phase: str, outcome: str) -> None:
        self.events.labels(phase=phase, outcome=outcome).inc()

    def inventory_read(self, seconds: float, outcome: str) -> None:
        self.inventory_reads.labels(outcome=outcome).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(_WithoutCreated(self.registry))


def _timestamp(moment: dt.datetime | None) -> float:
    return moment.timestamp() if moment is not None else 0.0
