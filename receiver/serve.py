"""``pve-janitor serve``: the receiver, its watcher and its scheduled sweep, in one process.

Waitress serves the app (:mod:`receiver.httpserver`: every answer JSON, slow clients
harmless): a pure-Python production WSGI server with a thread pool, no fork model to
reason about (the watcher and the scheduler are threads of this one process) and clean
shutdown on SIGTERM: it stops taking requests and lets the requests in flight finish.
Then the scheduler, the webhook deliverer and the watcher are shut down (each finishes its
transaction in flight) and the process exits 0.
Under systemd (``Type=notify``) it says ``READY=1`` once it listens and sends watchdog
keep-alives only while the watcher and the scheduler run (:mod:`receiver.notify`).
"""

from __future__ import annotations

import logging
import signal
from functools import partial
from typing import TYPE_CHECKING, Any

from . import holds, notify, outbox, pending, reservations
from .app import create_app
from .config import Settings
from .coverage_refresh import STATUS_EXTENSION, Refresher
from .db import write_transaction
from .httpserver import make_server
from .inbox import Inbox
from .lease import Lease
from .metrics import Metrics
from .model import Outcome, Reason
from .runtime import Runtime
from .schedule import make_scheduler, request_sweep
from .watcher import Watcher
from .webhooks import Deliverer

if TYPE_CHECKING:  # types only: no import at run time
    from apscheduler.schedulers.base import BaseScheduler

    from .result import SweepResult

logger = logging.getLogger(__name__)


def record_sweep(metrics: Metrics, result: SweepResult, source: str) -> None:
    """The sweeper's ``on_result`` hook: every sweep's outcome in the metrics, manual runs included."""
    metrics.sweep(result.outcome, result.duration_s if result.started_at is not None else None)
    if result.refusal is not None:
        metrics.refusal(str(result.refusal), "sweep")
    if result.outcome not in (Outcome.DISABLED, Outcome.DRY_RUN) or result.hidden:
        metrics.hidden_guests.labels(source="sweep").set(len(result.hidden))
    if result.applied:
        for reason in (Reason.GHOST, Reason.OLD_ERROR):
            metrics.removal(reason, source, sum(1 for a in result.applied.applied if a.reason == reason))
    if result.outcome in (Outcome.DONE, Outcome.NOTHING) and result.started_at is not None:
        metrics.last_success.set(result.started_at.timestamp() + result.duration_s)
    if result.plan is not None and source != "approval":
        metrics.rows_held.set(result.plan.kept.get("held", 0))


def build(settings: Settings, runtime: Runtime | None = None) -> dict[str, Any]:
    """Everything ``serve`` runs, wired but not started (tests start what they need).

    Every collaborator gets its hooks when it is constructed.  A test may hand in its own
    ``runtime``: its engine, inventory and clock are reused, and the sweeper is built here,
    with the metrics hook.
    """
    metrics = Metrics()
    metrics.sweep_interval.set(settings.interval_minutes * 60)
    on_sweep = partial(record_sweep, metrics)
    if runtime is None:
        runtime = Runtime.build(settings, on_read=metrics.inventory_read, on_sweep=on_sweep, upgrade=True)
    else:
        runtime = Runtime.build(
            settings, engine=runtime.engine, inventory=runtime.inventory, on_sweep=on_sweep, clock=runtime.clock
        )
    inbox = Inbox(runtime.engine)
    lease = Lease(runtime.engine, settings.lease_seconds)
    scheduler = make_scheduler(
        runtime.sweeper, settings.interval_minutes, lease, housekeeping=partial(housekeeping, runtime, inbox)
    )
    watcher = Watcher(
        runtime, inbox, metrics, lease, clock=runtime.clock, on_task_gap=partial(request_sweep, scheduler)
    )
    metrics.follow_watcher(watcher.alive, lambda: watcher.last_tick)
    # The outbox is delivered by the lease holder only: the receiver whose watcher leads.
    deliverer = (
        Deliverer(runtime.engine, settings, metrics, leader=lambda: watcher.leader) if settings.webhook_urls else None
    )
    app = create_app(settings, runtime=runtime, inbox=inbox, watcher=watcher, metrics=metrics, scheduler=scheduler)
    # Hook coverage: guests' configs read by the lease holder only, at CLEANUP_COVERAGE_RPS.
    refresher = Refresher(
        runtime.engine, runtime.inventory, settings, metrics, leader=lambda: watcher.leader, clock=runtime.clock
    )
    app.extensions[STATUS_EXTENSION] = refresher.status
    return {
        "runtime": runtime,
        "metrics": metrics,
        "inbox": inbox,
        "lease": lease,
        "watcher": watcher,
        "scheduler": scheduler,
        "deliverer": deliverer,
        "refresher": refresher,
        "app": app,
    }


def housekeeping(runtime: Runtime, inbox: Inbox) -> None:
    """After each scheduled sweep, on the lease holder: processed events, expired pending plans,
    holds past their time, decided plans and delivered webhook events past their keeping time,
    allocations expired or used."""
    inbox.forget_old()
    now = runtime.clock()
    pending.expire(runtime.engine, runtime.settings, now)
    targets = [outbox.target_id(url) for url in runtime.settings.webhook_urls]
    with write_transaction(runtime.engine) as conn:
        holds.prune(conn, now)
        pending.prune(conn, now)
        outbox.prune(conn, targets, now)
        reservations.prune(conn, runtime.table, now)  # expired, or ended by their row's appearance


def background_trouble(watcher: Watcher, scheduler: BaseScheduler) -> str | None:
    """What holds back the watchdog's keep-alives: None while the watcher and the scheduler run."""
    if not watcher.alive():
        return "watcher: not running"
    if not scheduler.running:
        return "scheduler: not running"
    return None


def _stop_on_signal(signum, _frame) -> None:
    raise SystemExit(0)


def serve(settings: Settings) -> int:
    parts = build(settings)
    server = make_server(parts["app"], settings.bind_host, settings.bind_port)
    signal.signal(signal.SIGTERM, _stop_on_signal)
    signal.signal(signal.SIGINT, _stop_on_signal)
    parts["watcher"].start()
    if parts["deliverer"] is not None:
        parts["deliverer"].start()
    parts["refresher"].start()
    parts["scheduler"].start()
    port = server.effective_port
    logger.info(
        "pve-janitor receiver listening on http://%s:%s (sweep every %s min, %s)",
        settings.bind_host,
        port,
        settings.interval_minutes,
        "enabled" if settings.enabled else "DISABLED: nothing is changed",
    )
    keepalive = notify.start_keepalive(partial(background_trouble, parts["watcher"], parts["scheduler"]))
    notify.ready(f"listening on {settings.bind_host}:{port}")
    try:
        server.run()  # returns after SIGTERM/SIGINT, once requests in flight are done
    finally:
        logger.info("shutting down: scheduler, %swatcher", "webhooks, " if parts["deliverer"] is not None else "")
        notify.stopping()
        if keepalive is not None:
            keepalive.stop()
        server.close()
        parts["scheduler"].shutdown(wait=True)
        if parts["deliverer"] is not None:  # before the watcher gives up the lease: one deliverer at a time
            parts["deliverer"].stop()
        parts["refresher"].stop()
        parts["watcher"].stop()
        parts["runtime"].engine.dispose()
    logger.info("stopped")
    return 0
