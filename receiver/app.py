"""The receiver's HTTP side: the app factory, the route list, and every error as JSON.

``create_app`` takes its collaborators as arguments (tests hand in their own)
and starts nothing: the watcher and the scheduler belong to ``serve``.  Every
answer is JSON, errors included, as ``{"error": <code>, "message": <text>}``, and
``OPTIONS`` too; no stack trace ever leaves the process, nor an HTML page but /ui's (what the
HTTP server answers before the app, :mod:`receiver.httpserver` makes JSON).  The
routes are in :mod:`receiver.api_events` (events in), :mod:`receiver.api_cleanup`
(stats, run, history) and :mod:`receiver.api_health` (health, metrics), and
documented in ``docs/openapi.yaml`` and ``docs/http-api.md``.  The one exception is
``/ui`` (:mod:`receiver.ui`, docs/dashboard.md): HTML pages, whose errors are pages too.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, current_app, jsonify, request
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import HTTPException

from . import __version__
from .api_allocations import allocations
from .api_cleanup import cleanup
from .api_events import events
from .api_health import health
from .api_plans import plans
from .config import Settings
from .db import describe_db_error
from .events import MAX_BODY_BYTES
from .inbox import Inbox
from .metrics import Metrics
from .runtime import Runtime
from .ui import error_page, http_error_page, init_sessions, is_ui_request, ui
from .web import ERROR_CODES, Janitor, error

__all__ = ["ERROR_CODES", "Janitor", "create_app"]

logger = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    runtime: Runtime | None = None,
    inbox: Inbox | None = None,
    watcher: Any = None,
    metrics: Metrics | None = None,
    scheduler: Any = None,
) -> Flask:
    """The WSGI app; building ``runtime`` may raise ConfigError or DatabaseError."""
    runtime = runtime or Runtime.build(settings)
    janitor = Janitor(settings, runtime, inbox or Inbox(runtime.engine), metrics or Metrics(), watcher, scheduler)
    app = _JsonFlask(__name__, static_folder=None)
    # One byte over the limit: a body streamed without Content-Length is cut at this size
    # without an error, so reading one byte more is how the events route tells "too large".
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES + 1
    app.extensions["janitor"] = janitor
    app.add_url_rule("/", view_func=index, methods=["GET"])
    for blueprint in (events, cleanup, plans, allocations, health, ui):
        app.register_blueprint(blueprint)
    init_sessions(app, settings)  # the dashboard's cookie, signed with a key derived from the admin token
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(SQLAlchemyError, _database_error)
    app.register_error_handler(Exception, _unexpected_error)
    return app


class _JsonFlask(Flask):
    def make_default_options_response(self) -> Response:
        """``OPTIONS``: the path's methods, in ``Allow`` and as JSON (Flask's own body is empty HTML)."""
        allowed = super().make_default_options_response().allow
        response = jsonify({"methods": sorted(allowed)})
        response.allow.update(allowed)
        return response


def index() -> Response:
    """This list of routes."""
    routes = []
    for rule in sorted(current_app.url_map.iter_rules(), key=lambda r: r.rule):
        view = current_app.view_functions[rule.endpoint]
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            routes.append(
                {"method": method, "path": rule.rule, "description": (view.__doc__ or "").strip().splitlines()[0]}
            )
    return jsonify({"service": "pve-janitor", "version": __version__, "routes": routes})


# --- errors ------------------------------------------------------------------------

_HTTP_MESSAGES = {
    404: "no such route; GET / lists them",
    413: f"body larger than {MAX_BODY_BYTES} bytes",
}


def _http_error(exc: HTTPException) -> Response:
    if is_ui_request():
        return http_error_page(exc)
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
    if is_ui_request():
        return error_page(503, "the database is unavailable; try again later")
    return error(503, "the database is unavailable; try again later")


def _unexpected_error(exc: Exception) -> Response:
    logger.error("%s %s failed", request.method, request.path, exc_info=exc)
    if is_ui_request():
        return error_page(500, "internal error; the receiver's log has the details")
    return error(500, "internal error; the receiver's log has the details")
