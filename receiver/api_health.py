"""``/healthz`` and ``/metrics``: what a load balancer and Prometheus ask.

Health checks something real (the database answers, the watcher and scheduler run when
this process runs them); metrics are still served when the database is down, without
the figures read from it.
"""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa
from flask import Blueprint, Response
from sqlalchemy.exc import SQLAlchemyError

from . import coverage_db, holds, outbox, pending, reservations, store
from .db import describe_db_error
from .metrics import CONTENT_TYPE
from .web import janitor, json_response

logger = logging.getLogger(__name__)

health = Blueprint("health", __name__)


@health.get("/healthz")
def healthz() -> Response:
    """200 when the database answers and the watcher and scheduler (when run here) are alive."""
    j = janitor()
    reasons = []
    try:
        with j.runtime.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        database = "ok"
    except SQLAlchemyError as exc:
        logger.warning("health check: database error %s", describe_db_error(exc))
        database = "unreachable"
        reasons.append(f"database: {type(exc).__name__}")
    watcher = None
    if j.watcher is not None:
        status = j.watcher.status()
        watcher = {
            "alive": bool(status.get("alive")),
            "leader": bool(status.get("leader")),
            "last_tick": status.get("last_tick"),
        }
        if not watcher["alive"]:
            reasons.append("watcher: not running")
    scheduler = None
    if j.scheduler is not None:
        scheduler = {"running": bool(j.scheduler.running)}
        if not scheduler["running"]:
            reasons.append("scheduler: not running")
    body: dict[str, Any] = {
        "status": "unhealthy" if reasons else "ok",
        "database": database,
        "watcher": watcher,
        "scheduler": scheduler,
    }
    if reasons:
        body["reasons"] = reasons
    return json_response(body, 503 if reasons else 200)


@health.get("/metrics")
def metrics() -> Response:
    """Prometheus text format."""
    j = janitor()
    try:
        j.metrics.inbox_backlog.set(j.inbox.backlog())
        now = j.runtime.clock()
        with j.runtime.engine.connect() as conn:
            last_success = store.last_success_time(conn)
            j.metrics.pending_plans.set(pending.count_open(conn, j.settings.table, now))
            j.metrics.holds.set(holds.count(conn, j.settings.table, now))
            j.metrics.allocations.set(reservations.count(conn, j.settings.table, now))
            labels = outbox.target_labels(j.settings.webhook_urls)
            for target, found in outbox.backlog(conn, labels).items():
                j.metrics.webhook_backlog.labels(target=labels[target]).set(found["undelivered"])
            j.metrics.coverage_guests({node: w for node, (_, w) in coverage_db.node_counts(conn).items()})
        if last_success is not None:
            j.metrics.last_success.set(last_success.timestamp())
    except SQLAlchemyError as exc:  # the rest of the metrics are still worth serving
        logger.warning("metrics: database error %s", describe_db_error(exc))
    if j.watcher is not None:
        j.metrics.watched.set(len(j.watcher.status().get("watched") or ()))
    return Response(j.metrics.render(), content_type=CONTENT_TYPE)
