"""``POST /api/v1/events``: the hookscript's signed events, into the inbox.

The checks run in the order that costs least, and a rejected event says why with the
status the hookscript acts on (see :mod:`receiver.events`); an accepted one wakes the
watcher, which does the rest.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

from flask import Blueprint, Response, current_app, g, request
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import RequestEntityTooLarge

from .config import Settings
from .db import describe_db_error
from .events import MAX_BODY_BYTES, SIGNATURE_HEADER, TIMESTAMP_HEADER, EventRejected, parse_event, verify_signature
from .logs import Throttle
from .model import Event, Rejection
from .web import error, janitor, json_response

logger = logging.getLogger(__name__)

events = Blueprint("events", __name__)

REJECTION_LOG_PERIOD_S = 60.0  # at most one line per source address and reason in this time
_NODE = re.compile(r"[\x21-\x7e]{1,64}")
_SIGNED = (Rejection.CONTENT_TYPE, Rejection.MALFORMED)  # refused after the signature was checked
_BY_STATUS = {503: Rejection.NOT_CONFIGURED, 413: Rejection.TOO_LARGE, 415: Rejection.CONTENT_TYPE}


@events.post("/api/v1/events")
def post_event() -> Response:
    """A signed hookscript event: 202 stored, 200 already stored (same event_id)."""
    j = janitor()
    try:
        event = _read_event(j.settings)
    except EventRejected as exc:
        j.metrics.event("unknown", "rejected")
        reason = rejection_reason(exc)
        j.metrics.rejected(reason)
        _log_rejection(exc, reason)
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
    body: dict[str, Any] = {
        "status": "accepted" if new else "duplicate",
        "event_id": event.event_id,
        "vmid": event.vmid,
        "phase": event.phase,
        "cleanup_enabled": j.settings.enabled,
    }
    if not j.settings.enabled:
        body["note"] = "CLEANUP_ENABLED is false: the event is stored, but nothing acts on it"
    return json_response(body, 202 if new else 200)


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
    g.event_body = body  # for the log line, should the event be rejected
    now = time.time()
    verify_signature(
        (settings.hook_secret, settings.hook_secret_previous),
        request.headers.get(TIMESTAMP_HEADER),
        request.headers.get(SIGNATURE_HEADER),
        body,
        now,
    )
    if request.mimetype != "application/json":
        raise EventRejected(415, "Content-Type must be application/json")
    return parse_event(body, now)


def rejection_reason(exc: EventRejected) -> Rejection:
    """The word for a rejection: from its status, and for a 401 from its message."""
    if exc.status == 401:
        if exc.message == "bad signature":
            return Rejection.SIGNATURE
        if "timestamp" in exc.message and "header" not in exc.message:
            return Rejection.TIMESTAMP
        return Rejection.HEADERS
    return _BY_STATUS.get(exc.status, Rejection.MALFORMED)


def _log_rejection(exc: EventRejected, reason: Rejection) -> None:
    """A warning with the source address and the node the body names, at most one per address
    and reason per :data:`REJECTION_LOG_PERIOD_S` (a stranger must not flood the log); the
    count of the ones left out rides on the next line.  Never the secret or a signature."""
    address = request.remote_addr or "unknown"
    throttle = current_app.extensions.setdefault("pve_janitor.rejections", Throttle(REJECTION_LOG_PERIOD_S))
    dropped = throttle.allow((address, reason))
    if dropped is None:
        return
    node = _claimed_node(g.get("event_body"))
    if node is not None and reason not in _SIGNED:
        node += ", unsigned"
    logger.warning(
        "event rejected from %s (node %s): %s %s%s",
        address,
        node or "unknown",
        exc.status,
        exc.message,
        f" ({dropped} more like it from this address since the last such line)" if dropped else "",
    )


def _claimed_node(body: bytes | None) -> str | None:
    """The node a rejected body names, when it parses that far (unsigned: for the log only)."""
    if not body:
        return None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    node = data.get("node") if isinstance(data, dict) else None
    return node if isinstance(node, str) and _NODE.fullmatch(node) else None
