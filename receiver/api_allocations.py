"""``/api/v1/allocations``: a VMID (and a hostname, ports) free in Proxmox and in the platform
table, reserved for ``CLEANUP_RESERVATION_MINUTES``; the reservations in force; release one.

The HTTP side of ``pve-janitor allocate | allocations | unallocate`` (:mod:`receiver.cli_allocate`),
with the same rules and words (:mod:`receiver.allocator`).  Every route takes
``Authorization: Bearer`` with ``CLEANUP_ALLOCATOR_TOKEN`` or ``CLEANUP_ADMIN_TOKEN``: a
deployment pipeline gets a token that allocates and nothing else (the allocator token opens
no admin route).  Neither token set: 403, the routes are disabled.

Statuses: 201 reserved; 400 a bad request (the body not JSON, an unknown field, a hostname that
is not a DNS name, a port column without a range), 415 a body not declared
``application/json``; 409 the request conflicts with the state (the hostname is taken, no free
VMID or port left in the range); 503 nothing was reserved and it may work later (Proxmox
unreadable or could not confirm, too many conflicting allocations, the database unavailable).
Every refusal carries ``reason``, a word from
:data:`receiver.allocation.STATUS`.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from . import reservations
from .allocation import Refused, Request, port_counts
from .allocator import Allocator
from .web import error, is_admin, janitor, json_response, path_id

logger = logging.getLogger(__name__)

ALLOCATIONS = "/api/v1/allocations"
FIELDS = ("hostname", "hostname_suffix", "ports", "label")
_made = threading.Lock()

allocations = Blueprint("allocations", __name__)


class _NotJson(Exception):
    """A body that is not declared JSON (415)."""


def allocator() -> Allocator:
    """The app's allocator, made at its first use (one per app: it shares guest-list reads)."""
    found = current_app.extensions.get("allocator")
    if found is None:
        with _made:
            found = current_app.extensions.get("allocator")
            if found is None:
                runtime = janitor().runtime
                found = Allocator(runtime.settings, runtime.table, runtime.inventory, runtime.clock)
                current_app.extensions["allocator"] = found
    return found


def require_allocator() -> Response | None:
    """None when the request carries the allocator token or the admin token; else the answer
    (403 when neither is set, 401 with ``WWW-Authenticate`` when the header is missing or wrong)."""
    s = janitor().settings
    tokens = [t for t in (s.allocator_token, s.admin_token) if t]
    if not tokens:
        return error(403, "neither CLEANUP_ALLOCATOR_TOKEN nor CLEANUP_ADMIN_TOKEN is set: this endpoint is disabled")
    if not any([is_admin(token) for token in tokens]):  # a list: both compared, whichever matches
        return error(
            401,
            "a valid 'Authorization: Bearer <CLEANUP_ALLOCATOR_TOKEN or CLEANUP_ADMIN_TOKEN>' header is required",
            headers={"WWW-Authenticate": 'Bearer realm="pve-janitor"'},
        )
    return None


@allocations.post(ALLOCATIONS)
def allocate() -> Response:
    """Reserve a free VMID, and optionally a hostname and ports (allocator or admin token)."""
    if (denied := require_allocator()) is not None:
        return denied
    try:
        wanted = _request()
        reservation = allocator().allocate(wanted)
    except _NotJson as exc:
        return error(415, str(exc))
    except Refused as exc:
        return error(exc.status, str(exc), reason=exc.kind)
    return json_response(reservation.to_dict(), 201)


@allocations.get(ALLOCATIONS)
def list_allocations() -> Response:
    """The reservations in force, oldest first (allocator or admin token)."""
    if (denied := require_allocator()) is not None:
        return denied
    j = janitor()
    with j.runtime.engine.connect() as conn:
        found = reservations.listing(conn, j.settings.table, j.runtime.clock())
    return jsonify({"allocations": [r.to_dict() for r in found]})


@allocations.delete(f"{ALLOCATIONS}/<reservation_id>")
def release_allocation(reservation_id: str) -> Response:
    """Release a reservation: its VMID, hostname and ports are free again (allocator or admin token)."""
    if (denied := require_allocator()) is not None:
        return denied
    number = path_id(reservation_id)
    if number is None:
        return error(404, f"no allocation {reservation_id[:40]!r}: ids are whole numbers from 1")
    j = janitor()
    released = reservations.release(j.runtime.engine, j.settings.table, number)
    if released is None:
        return error(404, f"no allocation {reservation_id}")
    logger.info("released %s over HTTP", released.describe())
    return jsonify({"released": released.to_dict()})


def _request() -> Request:
    """The body: a JSON object with no key but :data:`FIELDS`; no body at all asks for a VMID alone."""
    raw = request.get_data(cache=False)
    data: Any = {}
    if raw.strip():
        if request.mimetype != "application/json":
            raise _NotJson("Content-Type must be application/json")
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            raise Refused("invalid", "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise Refused("invalid", "the body must be a JSON object")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise Refused("invalid", f"unknown field {', '.join(map(repr, unknown))}: the fields are {', '.join(FIELDS)}")
    hostname, label, suffix = data.get("hostname"), data.get("label"), data.get("hostname_suffix", False)
    if hostname is not None and not isinstance(hostname, str):
        raise Refused("invalid", "hostname must be a string")
    if label is not None and not isinstance(label, str):
        raise Refused("invalid", "label must be a string")
    if not isinstance(suffix, bool):
        raise Refused("invalid", "hostname_suffix must be true or false")
    ports = data.get("ports")
    if ports is None:
        counts: dict[str, int] = {}
    elif isinstance(ports, bool) or not isinstance(ports, (int, dict)):
        raise Refused("invalid", "ports must be a count (for every configured column) or an object column -> count")
    else:
        counts = port_counts(janitor().settings, ports)
    return Request(hostname=hostname, suffix=suffix, ports=counts, label=label, source="http")
