"""The receiver's HTTP side: events in; stats, history, health and metrics out.

``create_app`` takes its collaborators as arguments (tests hand in their own)
and starts nothing: the watcher and the scheduler belong to ``serve``.  Every
answer is JSON, errors included, as ``{"error": <code>, "message": <text>}``;
no HTML page and no stack trace ever leaves the process.  The routes are
documented in ``docs/openapi.yaml`` and ``docs/http-api.md``.
"""
from __future__ import annotations

import hmac
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from flask import Blueprint, Flask, Response, current_app, jsonify, request
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from . import __version__, store
from .config import Settings
from .db import describe_db_error
from .events import MAX_BODY_BYTES, SIGNATURE_HEADER, TIMESTAMP_HEADER, EventRejected, parse_event, verify_signature
from .history import audit_entries
from .inbox import Inbox
from .metrics import CONTENT_TYPE, Metrics
from .model import Event, Outcome, Refusal
from .runtime import Runtime
from .timeutil import utcnow
from .watcher import watched_vmids

logger = logging.getLogger(__name__)

HISTORY_DEFAULT_LIMIT, HISTORY_MAX_LIMIT = 50, 500
# Status of POST /run by sweep outcome; done, nothing, dry_run and disabled are 200.
RUN_STATUS = {Outcome.REFUSED: 422, Outcome.FAILED: 503}
ERROR_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type",
    422: "refused", 500: "internal_error", 503: "unavailable",
}
_COUNT = re.compile(r"[0-9]{1,9}")
_FLAGS = {"true": True, "false": False}


@dataclass
class Janitor:
    """What the routes use; ``app.extensions["janitor"]``."""

    settings: Settings
    runtime: Runtime
    inbox: Inbox
    metrics: Metrics
    watcher: Any = None  # status() -> dict, wake(); None when this process runs no watcher
    scheduler: Any = None  # has ``running``; None when this process runs no scheduler


def create_app(settings: Settings, runtime: Runtime | None = None, inbox: Inbox | None = None,
               watcher: Any = None, metrics: Metrics | None = None, scheduler: Any = None) -> Flask:
    """The WSGI app; building ``runtime`` may raise ConfigError or DatabaseError."""
    runtime = runtime or Runtime.build(settings)
    janitor = Janitor(settings, runtime, inbox or Inbox(runtime.engine), metrics or Metrics(),
                      watcher, scheduler)
    app = Flask(__name__, static_folder=None)
    # One byte over the limit: a body streamed without Content-Length is cut at this size
    # without an error, so reading one byte more is how _read_event tells "too large".
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES + 1
    app.extensions["janitor"] = janitor
    app.register_blueprint(api)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(SQLAlchemyError, _database_error)
    app.register_error_handler(Exception, _unexpected_error)
    return app


def _janitor() -> Janitor:
    return current_app.extensions["janitor"]


def error(status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> Response:
    response = jsonify({"error": ERROR_CODES.get(status, "error"), "message": message, **extra})
    response.status_code = status
    response.headers.update(headers or {})
    return response


api = Blueprint("api", __name__)


@api.get("/")
def index() -> Response:
    """This list of routes."""
    routes = []
    for rule in sorted(current_app.url_map.iter_rules(), key=lambda r: r.rule):
        view = current_app.view_functions[rule.endpoint]
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            routes.append({"method": method, "path": rule.rule,
                           "description": (view.__doc__ or "").strip().splitlines()[0]})
    return jsonify({"service": "pve-janitor", "version": __version__, "routes": routes})


# --- events ------------------------------------------------------------------------

@api.post("/api/v1/events")
def post_event() -> Response:
    """A signed hookscript event: 202 stored, 200 already stored (same event_id)."""
    j = _janitor()
    try:
        event = _read_event(j.settings)
    except EventRejected as exc:
        j.metrics.event("unknown", "rejected")
        logger.info("event rejected (%s): %s", exc.status, exc.message)
        return error(exc.status, exc.message)
    try:
        new = j.inbox.accept(event)
    except SQLAlchemyError as exc:
        j.metrics.event(event.phase, "error")
        logger.warning("event %s not stored: %s", event.event_id, describe_db_error(exc))
        return error(503, "the event store is unavailable; send the event again later")
    j.metrics.event(event.phase, "accepted" if new else "duplicate")
    if new and j.watcher is not None:
        j.watcher.wake()
    body: dict[str, Any] = {"status": "accepted" if new else "duplicate", "event_id": event.event_id,
                            "vmid": event.vmid, "phase": event.phase, "cleanup_enabled": j.settings.enabled}
    if not j.settings.enabled:
        body["note"] = "CLEANUP_ENABLED is false: the event is stored, but nothing acts on it"
    return _json(body, 202 if new else 200)


def _read_event(settings: Settings) -> Event:
    """Checks in the order that costs least: secret configured, size, signature, body."""
    if not settings.hook_secret:
        raise EventRejected(503, "hook secret not configured")
    too_large = EventRejected(413, f"body larger than {MAX_BODY_BYTES} bytes")
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise too_large
    try:
        body = request.get_data(cache=False)
    except RequestEntityTooLarge:
        raise too_large from None
    if len(body) > MAX_BODY_BYTES:
        raise too_large
    now = time.time()
    verify_signature(settings.hook_secret, request.headers.get(TIMESTAMP_HEADER),
                     request.headers.get(SIGNATURE_HEADER), body, now)
    if request.mimetype != "application/json":
        raise EventRejected(415, "Content-Type must be application/json")
    return parse_event(body, now)


# --- stats, run, history -----------------------------------------------------------

@api.get("/api/v1/system/cleanup/stats")
def stats() -> Response:
    """Counters (kept across restarts), recent errors, the last sweep, the settings in force."""
    j = _janitor()
    s = j.settings
    with j.runtime.engine.connect() as conn:
        counters = store.read_counters(conn)
        errors = store.recent_errors(conn)
        last = store.last_run(conn)
        watched = watched_vmids(conn, utcnow())
    status = j.watcher.status() if j.watcher is not None else None
    return jsonify({
        "enabled": s.enabled,
        "last_run": last["finished_at"] if last else None,
        **{name: counters[name] for name in store.COUNTERS},
        "errors": errors,
        "config": {
            "error_retention_hours": s.error_retention_hours,
            "ghost_cleanup_enabled": s.ghost_cleanup_enabled,
            "cleanup_interval_minutes": s.interval_minutes,
            "dry_run": s.dry_run,
        },
        "action": s.action,
        "watched_vmids": watched,
        "inbox_backlog": j.inbox.backlog(),
        "last_event_per_node": j.inbox.last_event_per_node(),
        "last_sweep": {**{k: last[k] for k in ("outcome", "reason", "duration_s", "finished_at", "source")},
                       "refusal": _refusal_word(last)} if last else None,
        # Ghosts' VMIDs held by guests the token cannot see (rows kept): last sweep, watcher.
        "hidden_guests": sorted(set(j.runtime.sweeper.last_hidden)
                                | set((status or {}).get("hidden_guests") or ())),
        "sweep_running": j.runtime.sweeper.busy,
        "leader": bool(status and status.get("leader")),
        "watcher": {k: status.get(k) for k in ("alive", "last_tick", "last_error")} if status else None,
    })


def _refusal_word(run: dict[str, Any]) -> str | None:
    """The refusal word of a refused or failed run (its reason starts with it, see Sweeper._record)."""
    if run.get("outcome") not in (Outcome.REFUSED, Outcome.FAILED):
        return None
    word = (run.get("reason") or "").split(":", 1)[0]
    return word if word in {r.value for r in Refusal} else None


@api.post("/api/v1/system/cleanup/run")
def run_sweep() -> Response:
    """Run one sweep now (Bearer CLEANUP_ADMIN_TOKEN); ?dry_run=true|false&force=true|false."""
    j = _janitor()
    token = j.settings.admin_token
    if not token:
        return error(403, "CLEANUP_ADMIN_TOKEN is not set: this endpoint is disabled")
    if not _is_admin(token):
        return error(401, "a valid 'Authorization: Bearer <CLEANUP_ADMIN_TOKEN>' header is required",
                     headers={"WWW-Authenticate": 'Bearer realm="pve-janitor"'})
    try:
        dry_run = _flag("dry_run")
        force = bool(_flag("force"))
    except ValueError as exc:
        return error(400, str(exc))
    result = j.runtime.sweeper.try_run(dry_run=dry_run, force=force, source="manual")
    if result is None:
        return error(409, "a sweep is already running")
    # Sweep metrics are counted by the sweeper's on_result hook (serve wires it), manual runs included.
    status = RUN_STATUS.get(result.outcome, 200)
    body = result.to_dict()
    if status != 200:
        body = {"error": ERROR_CODES[status], "message": result.reason, **body}
    return _json(body, status)


def _is_admin(token: str) -> bool:
    """Whether the request carries ``Authorization: Bearer <token>`` (constant-time compare)."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return bool(token) and scheme.lower() == "bearer" and hmac.compare_digest(
        _header_bytes(given.strip()), _bytes(token))


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _header_bytes(text: str) -> bytes:
    """The bytes the client sent: WSGI hands header values over decoded as Latin-1."""
    return text.encode("latin-1", "replace")


def _flag(name: str) -> bool | None:
    raw = request.args.get(name)
    if raw is None:
        return None
    if raw.lower() not in _FLAGS:
        raise ValueError(f"{name} must be true or false")
    return _FLAGS[raw.lower()]


@api.get("/api/v1/system/cleanup/history")
def history() -> Response:
    """Audit entries, newest first; ?limit=1..500 (50) &before=<audit id> pages on.

    The whole removed row (``row``) only with ``Authorization: Bearer <CLEANUP_ADMIN_TOKEN>``."""
    try:
        limit = _count("limit", HISTORY_DEFAULT_LIMIT, 1, HISTORY_MAX_LIMIT)
        before = _count("before", None, 1, None)
    except ValueError as exc:
        return error(400, str(exc))
    j = _janitor()
    entries = audit_entries(j.runtime.engine, limit=limit + 1, before=before)
    more = len(entries) > limit
    entries = entries[:limit]
    if not _is_admin(j.settings.admin_token):
        # The audit copy holds every column of the platform's row, which may include
        # credentials; only the admin token sees it.  The mapped facts stay public.
        for entry in entries:
            entry.pop("row", None)
    return jsonify({"entries": entries, "next_before": entries[-1]["id"] if more else None})


def _count(name: str, default: int | None, low: int, high: int | None) -> int | None:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not _COUNT.fullmatch(raw) or int(raw) < low or (high is not None and int(raw) > high):
        bounds = f"{low}..{high}" if high is not None else f"at least {low}"
        raise ValueError(f"{name} must be a whole number, {bounds}")
    return int(raw)


# --- health and metrics ------------------------------------------------------------

@api.get("/healthz")
def healthz() -> Response:
    """200 when the database answers and the watcher and scheduler (when run here) are alive."""
    j = _janitor()
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
        watcher = {"alive": bool(status.get("alive")), "leader": bool(status.get("leader")),
                   "last_tick": status.get("last_tick")}
        if not watcher["alive"]:
            reasons.append("watcher: not running")
    scheduler = None
    if j.scheduler is not None:
        scheduler = {"running": bool(j.scheduler.running)}
        if not scheduler["running"]:
            reasons.append("scheduler: not running")
    body = {"status": "unhealthy" if reasons else "ok", "database": database, "watcher": watcher,
            "scheduler": scheduler}
    if reasons:
        body["reasons"] = reasons
    return _json(body, 503 if reasons else 200)


@api.get("/metrics")
def metrics() -> Response:
    """Prometheus text format."""
    j = _janitor()
    try:
        j.metrics.inbox_backlog.set(j.inbox.backlog())
        with j.runtime.engine.connect() as conn:
            last_success = store.last_success_time(conn)
        if last_success is not None:
            j.metrics.last_success.set(last_success.timestamp())
    except SQLAlchemyError as exc:  # the rest of the metrics are still worth serving
        logger.warning("metrics: database error %s", describe_db_error(exc))
    if j.watcher is not None:
        j.metrics.watched.set(len(j.watcher.status().get("watched") or ()))
    return Response(j.metrics.render(), content_type=CONTENT_TYPE)


# --- errors ------------------------------------------------------------------------

def _json(body: dict[str, Any], status: int) -> Response:
    response = jsonify(body)
    response.status_code = status
    return response


_HTTP_MESSAGES = {
    404: "no such route; GET / lists them",
    413: f"body larger than {MAX_BODY_BYTES} bytes",
}


def _http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    headers = {}
    if status == 405:
        allowed = sorted(set(getattr(exc, "valid_methods", None) or ()) - {"HEAD", "OPTIONS"})
        headers["Allow"] = ", ".join(sorted(set(getattr(exc, "valid_methods", None) or ())))
        message = f"{request.method} is not allowed here; use {', '.join(allowed) or 'another method'}"
    else:
        message = _HTTP_MESSAGES.get(status) or (exc.description or exc.name)
    return error(status, message, headers=headers)


def _database_error(exc: SQLAlchemyError) -> Response:
    logger.warning("%s %s: database error %s", request.method, request.path, describe_db_error(exc))
    return error(503, "the database is unavailable; try again later")


def _unexpected_error(exc: Exception) -> Response:
    logger.exception("%s %s failed", request.method, request.path)
    return error(500, "internal error; the receiver's log has the details")
