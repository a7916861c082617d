"""``/api/v1/system/cleanup/pending`` and ``/holds``: review and decide pending plans; hold rows.

The HTTP side of ``pve-janitor pending | approve | reject`` and ``hold | release | holds``
(:mod:`receiver.cli_plans`), with the same rules and the same words.  Every route needs
``Authorization: Bearer <CLEANUP_ADMIN_TOKEN>``: a plan lists the platform's rows, and a
decision or a hold changes what is removed.

An approval runs the removal pipeline before it answers (:func:`receiver.approval.approve`:
Proxmox is read and confirmed again, and it waits for a sweep in progress), so its answer
says what really happened.  The CLI's exit codes become statuses: no such plan or hold 404;
a plan decided, expired or superseded 409; confirming reads refused 422 and a database
failure 503 (the plan stays pending: approve it again later), as ``POST /run`` answers a
sweep.  Ids in the path are whole numbers, 1 to 2**63-1; anything else names nothing (404).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from flask import Blueprint, Response, jsonify, request

from . import approval, holds, pending
from .model import Outcome
from .pending import PlanState
from .web import ERROR_CODES, error, janitor, json_response, path_id, require_admin

logger = logging.getLogger(__name__)

PENDING, HOLDS = "/api/v1/system/cleanup/pending", "/api/v1/system/cleanup/holds"
# Status of an approval the pipeline did not carry out (the plan stays pending); else 422.
NOT_APPROVED_STATUS = {Outcome.FAILED: 503}
HOLD_FIELDS = ("vmid", "row_key", "until", "reason")
REJECT_FIELDS = ("reason",)
_FLAGS = {"true": True, "false": False}

plans = Blueprint("plans", __name__)


class _Unanswerable(Exception):
    """The request cannot be served as sent: ``status`` and a message that says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@plans.errorhandler(_Unanswerable)
def _unanswerable(exc: _Unanswerable) -> Response:
    return error(exc.status, exc.message)


# --- pending plans -------------------------------------------------------------------


@plans.get(PENDING)
def list_plans() -> Response:
    """Pending plans, newest first; ?all=true: decided, expired and superseded ones too (admin token)."""
    if (denied := require_admin()) is not None:
        return denied
    everything = _flag("all")
    j = janitor()
    with j.runtime.engine.connect() as conn:
        found = pending.listing(conn, j.settings.table, j.runtime.clock(), everything=everything)
    return jsonify({"plans": [p.to_dict() for p in found]})


@plans.get(f"{PENDING}/<plan_id>")
def show_plan(plan_id: str) -> Response:
    """One plan, in any state, with every row it would act on and the values reviewed (admin token)."""
    if (denied := require_admin()) is not None:
        return denied
    number = _path_id(plan_id, "pending plan")
    try:
        with janitor().runtime.engine.connect() as conn:
            plan = pending.get(conn, number, janitor().settings.table)
            rows = pending.reviewed_rows(conn, number)
    except pending.PlanNotFound as exc:
        return error(404, str(exc))
    return jsonify({**plan.to_dict(), "rows_planned": [r.to_dict() for r in rows]})


@plans.post(f"{PENDING}/<plan_id>/approve")
def approve_plan(plan_id: str) -> Response:
    """Approve a pending plan: remove the reviewed rows that still match (admin token)."""
    if (denied := require_admin()) is not None:
        return denied
    number = _path_id(plan_id, "pending plan")
    try:
        decision = approval.approve(janitor().runtime.sweeper, number, by="http")
    except pending.PlanNotFound as exc:
        return error(404, str(exc))
    except pending.PlanClosed as exc:
        return error(409, f"refused, nothing changed: {exc}")
    body = decision.to_dict()
    if decision.state is PlanState.PENDING:
        status = NOT_APPROVED_STATUS.get(decision.result.outcome, 422) if decision.result is not None else 422
        return json_response({"error": ERROR_CODES[status], **body}, status)
    return json_response(body, 200)


@plans.post(f"{PENDING}/<plan_id>/reject")
def reject_plan(plan_id: str) -> Response:
    """Reject a pending plan: nothing is removed; optional JSON body {"reason": "..."} (admin token)."""
    if (denied := require_admin()) is not None:
        return denied
    number = _path_id(plan_id, "pending plan")
    data = _json_object(REJECT_FIELDS, required=False)
    reason = _text(data, "reason") or ""
    try:
        decision = approval.reject(janitor().runtime.sweeper, number, by="http", reason=reason)
    except pending.PlanNotFound as exc:
        return error(404, str(exc))
    except pending.PlanClosed as exc:
        return error(409, f"refused, nothing changed: {exc}")
    return json_response(decision.to_dict(), 200)


# --- holds ---------------------------------------------------------------------------


@plans.get(HOLDS)
def list_holds() -> Response:
    """The holds in force, oldest first (admin token)."""
    if (denied := require_admin()) is not None:
        return denied
    j = janitor()
    with j.runtime.engine.connect() as conn:
        found = holds.listing(conn, j.settings.table, j.runtime.clock())
    return jsonify({"holds": [h.to_dict() for h in found]})


@plans.post(HOLDS)
def place_hold() -> Response:
    """Never remove a row ({"row_key"}) or any row of a VMID ({"vmid"}), until released or "until" (admin token)."""
    if (denied := require_admin()) is not None:
        return denied
    data = _json_object(HOLD_FIELDS, required=True)
    vmid = _whole_number(data, "vmid")
    row_key = _row_key(data)
    if (vmid is None) == (row_key is None):
        raise _Unanswerable(400, "name exactly one of vmid or row_key")
    until_text, reason = _text(data, "until"), _text(data, "reason")
    j = janitor()
    now = j.runtime.clock()
    table = j.runtime.table
    try:
        until = holds.parse_until(until_text, now) if until_text is not None else None
        if row_key is not None:
            stored = table.stored_key(row_key)
            if stored is None:
                # A typo would hold nothing and say nothing (as `pve-janitor hold --row`).
                return error(404, f"no row {row_key!r} in table {j.settings.table!r} ({table.pk.name})")
            row_key = stored
        placed = holds.place(
            j.runtime.engine,
            j.settings.table,
            now=now,
            source="http",
            vmid=vmid,
            row_key=row_key,
            until=until,
            reason=reason,
        )
    except holds.HoldError as exc:
        return error(400, str(exc).removeprefix("--"))  # parse_until speaks of the CLI's --until
    logger.info("%s placed over HTTP", placed.describe())
    return json_response(placed.to_dict(), 201)


@plans.delete(f"{HOLDS}/<hold_id>")
def release_hold(hold_id: str) -> Response:
    """Release a hold: its rows may be removed again (admin token)."""
    if (denied := require_admin()) is not None:
        return denied
    number = _path_id(hold_id, "hold")
    j = janitor()
    released = holds.release(j.runtime.engine, j.settings.table, hold_id=number)
    if not released:
        return error(404, f"no hold {number}")
    for gone in released:
        logger.info("released %s over HTTP", gone.describe())
    return jsonify({"released": [h.to_dict() for h in released]})


# --- reading the request -------------------------------------------------------------


def _path_id(text: str, what: str) -> int:
    """An id from the path: a whole number 1..2**63-1, else there is no such thing (404)."""
    number = path_id(text)
    if number is not None:
        return number
    raise _Unanswerable(404, f"no {what} {text[:40]!r}: ids are whole numbers from 1")


def _flag(name: str) -> bool:
    raw = request.args.get(name)
    if raw is None:
        return False
    if raw.lower() not in _FLAGS:
        raise _Unanswerable(400, f"{name} must be true or false")
    return _FLAGS[raw.lower()]


def _json_object(fields: tuple[str, ...], *, required: bool) -> dict[str, Any]:
    """The body, a JSON object with no key but ``fields`` (a misspelt "until" must not make a
    hold that never ends).  Without ``required``, no body at all reads as ``{}``."""
    raw = request.get_data(cache=False)
    if not raw and not required:
        return {}
    if request.mimetype != "application/json":
        raise _Unanswerable(415, "Content-Type must be application/json")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise _Unanswerable(400, "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise _Unanswerable(400, "the body must be a JSON object")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise _Unanswerable(400, f"unknown field {', '.join(map(repr, unknown))}: the fields are {', '.join(fields)}")
    return data


def _whole_number(data: dict[str, Any], name: str) -> int | None:
    value = data.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise _Unanswerable(400, f"{name} must be a whole number")
    return value


def _row_key(data: dict[str, Any]) -> str | None:
    """``row_key`` as text; a number is taken too (plans show an integer key as a number)."""
    value = data.get("row_key")
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value:
        raise _Unanswerable(400, "row_key must be a non-empty string (or a whole number)")
    return value


def _text(data: dict[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is not None and not isinstance(value, str):
        raise _Unanswerable(400, f"{name} must be a string")
    return value
