"""``POST /api/v1/events``: the hookscript's signed events, into the inbox.

The checks run in the order that costs least, and a rejected event says why with the
status the hookscript acts on (see :mod:`receiver.events`); an accepted one wakes the
watcher, which does the rest.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from flask import Blueprint, Response, request
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import RequestEntityTooLarge

from .config import Settings
from .db import describe_db_error
from .events import MAX_BODY_BYTES, SIGNATURE_HEADER, TIMESTAMP_HEADER, EventRejected, parse_event, verify_signature
from .model import Event
from .web import error, janitor, json_response

logger = logging.getLogger(__name__)

events = Blueprint("events", __name__)


@events.post("/api/v1/events")
def post_event() -> Response:
    """A signed hookscript event: 202 stored, 200 already stored (same event_id)."""
    j = janitor()
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
    now = time.time()
    verify_signature(
        settings.hook_secret, request.headers.get(TIMESTAMP_HEADER), request.headers.get(SIGNATURE_HEADER), body, now
    )
    if request.mimetype != "application/json":
        raise EventRejected(415, "Content-Type must be application/json")
    return parse_event(body, now)
