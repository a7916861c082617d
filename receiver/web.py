"""What every HTTP route shares: the janitor object, JSON answers and errors, the admin token.

Every answer is JSON, errors included, as ``{"error": <code>, "message": <text>}``; the
routes (in the ``api_*`` modules) and the app's error handlers (:mod:`receiver.app`) build
them here, so a status code has one word everywhere.  The routes that change something
(or show what a platform's rows hold) ask :func:`require_admin` first, so all of them
answer a missing token the same way.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flask import Response, current_app, jsonify, request

from .config import Settings

if TYPE_CHECKING:  # types only: no import at run time
    from .inbox import Inbox
    from .metrics import Metrics
    from .runtime import Runtime

ERROR_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "refused",
    431: "request_header_fields_too_large",
    500: "internal_error",
    501: "not_implemented",
    503: "unavailable",
}


@dataclass
class Janitor:
    """What the routes use; ``app.extensions["janitor"]``."""

    settings: Settings
    runtime: Runtime
    inbox: Inbox
    metrics: Metrics
    watcher: Any = None  # status() -> dict, wake(); None when this process runs no watcher
    scheduler: Any = None  # has ``running``; None when this process runs no scheduler


def janitor() -> Janitor:
    """The janitor of the app handling the current request."""
    return current_app.extensions["janitor"]


def error(status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> Response:
    response = jsonify({"error": ERROR_CODES.get(status, "error"), "message": message, **extra})
    response.status_code = status
    response.headers.update(headers or {})
    return response


def json_response(body: dict[str, Any], status: int) -> Response:
    response = jsonify(body)
    response.status_code = status
    return response


_ID = re.compile(r"[0-9]{1,19}")


def path_id(text: str) -> int | None:
    """An id from a URL path (a plan, a hold, an allocation): a whole number 1..2**63-1, the
    range every database stores; None for anything else, which names nothing (a 404)."""
    return int(text) if _ID.fullmatch(text) and 0 < int(text) < 2**63 else None


def require_admin() -> Response | None:
    """None when the request carries the admin token; else the answer to give instead.

    403 when ``CLEANUP_ADMIN_TOKEN`` is not set (the route is disabled: there is no token a
    client could send), 401 with ``WWW-Authenticate`` when the header is missing or wrong.
    """
    token = janitor().settings.admin_token
    if not token:
        return error(403, "CLEANUP_ADMIN_TOKEN is not set: this endpoint is disabled")
    if not is_admin(token):
        return error(
            401,
            "a valid 'Authorization: Bearer <CLEANUP_ADMIN_TOKEN>' header is required",
            headers={"WWW-Authenticate": 'Bearer realm="pve-janitor"'},
        )
    return None


def is_admin(token: str) -> bool:
    """Whether the request carries ``Authorization: Bearer <token>`` (constant-time compare)."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return (
        bool(token) and scheme.lower() == "bearer" and hmac.compare_digest(_header_bytes(given.strip()), _bytes(token))
    )


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _header_bytes(text: str) -> bytes:
    """The bytes the client sent: WSGI hands header values over decoded as Latin-1."""
    return text.encode("latin-1", "replace")
