"""``/api/v1/system/cleanup/*``: stats, a sweep on demand, and the audit history.

Stats and history are public (the whole removed row only for the admin token: it may
hold credentials); running a sweep needs ``Authorization: Bearer <CLEANUP_ADMIN_TOKEN>``
and is disabled without one.
"""

from __future__ import annotations

import re
from typing import Any, overload

from flask import Blueprint, Response, current_app, jsonify, request

from . import coverage_refresh, holds, outbox, pending, reservations, store
from .history import audit_entries
from .model import Outcome, Refusal
from .timeutil import isoformat, utcnow
from .watchlist import watched_vmids
from .web import ERROR_CODES, error, is_admin, janitor, json_response, require_admin

HISTORY_DEFAULT_LIMIT, HISTORY_MAX_LIMIT = 50, 500
# Status of POST /run by sweep outcome; done, nothing, dry_run and disabled are 200.
RUN_STATUS = {Outcome.REFUSED: 422, Outcome.FAILED: 503}
_COUNT = re.compile(r"[0-9]{1,9}")
_FLAGS = {"true": True, "false": False}

cleanup = Blueprint("cleanup", __name__)


@cleanup.get("/api/v1/system/cleanup/stats")
def stats() -> Response:
    """Counters (kept across restarts), recent errors, the last sweep, the settings in force."""
    j = janitor()
    s = j.settings
    with j.runtime.engine.connect() as conn:
        counters = store.read_counters(conn)
        errors = store.recent_errors(conn)
        last = store.last_run(conn)
        now = utcnow()
        watched = watched_vmids(conn, now)
        open_plans = pending.listing(conn, s.table, now)
        held = holds.count(conn, s.table, now)
        allocated = reservations.count(conn, s.table, now)
        webhooks = outbox.summary(conn, s.webhook_urls)
        hook_coverage = coverage_refresh.stats(conn, current_app.extensions.get(coverage_refresh.STATUS_EXTENSION))
    status = j.watcher.status() if j.watcher is not None else None
    return jsonify(
        {
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
            "last_sweep": {
                **{k: last[k] for k in ("outcome", "reason", "duration_s", "finished_at", "source")},
                "refusal": _refusal_word(last),
            }
            if last
            else None,
            # Ghosts' VMIDs held by guests the token cannot see (rows kept): last sweep, watcher.
            "hidden_guests": sorted(
                set(j.runtime.sweeper.last_hidden) | set((status or {}).get("hidden_guests") or ())
            ),
            # Plans a guard refused, kept for review (pve-janitor pending), and holds in force.
            "pending_plans": [
                {k: p[k] for k in ("id", "rows", "refusal", "source", "created_at", "expires_at")}
                for p in (plan.to_dict() for plan in open_plans)
            ],
            "holds": held,
            "allocations": allocated,  # reservations in force (POST /api/v1/allocations)
            "sweep_running": j.runtime.sweeper.busy,
            "leader": bool(status and status.get("leader")),
            "watcher": {k: status.get(k) for k in ("alive", "last_tick", "last_error")} if status else None,
            # The webhook outbox: events not yet delivered per URL (shown without credentials or query).
            "webhooks": {
                "urls": webhooks["urls"],
                "backlog": webhooks["backlog"],
                "targets": [
                    {
                        "url": t["url"],
                        "undelivered": t["undelivered"],
                        "oldest": isoformat(t["oldest"]),
                        "last_error": t["last_error"],
                        "last_error_at": isoformat(t["last_error_at"]),
                    }
                    for t in webhooks["targets"]
                ],
            },
            # Hook coverage: guests whose config names no pve-janitor hookscript, events per node.
            "coverage": hook_coverage,
        }
    )


def _refusal_word(run: dict[str, Any]) -> str | None:
    """The refusal word of a refused or failed run (its reason starts with it, see Sweeper._record)."""
    if run.get("outcome") not in (Outcome.REFUSED, Outcome.FAILED):
        return None
    word = (run.get("reason") or "").split(":", 1)[0]
    return word if word in {r.value for r in Refusal} else None


@cleanup.post("/api/v1/system/cleanup/run")
def run_sweep() -> Response:
    """Run one sweep now (Bearer CLEANUP_ADMIN_TOKEN); ?dry_run=true|false&force=true|false."""
    if (denied := require_admin()) is not None:
        return denied
    j = janitor()
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
    return json_response(body, status)


def _flag(name: str) -> bool | None:
    raw = request.args.get(name)
    if raw is None:
        return None
    if raw.lower() not in _FLAGS:
        raise ValueError(f"{name} must be true or false")
    return _FLAGS[raw.lower()]


@cleanup.get("/api/v1/system/cleanup/history")
def history() -> Response:
    """Audit entries, newest first; ?limit=1..500 (50) &before=<audit id> pages on.

    The whole removed row (``row``) only with ``Authorization: Bearer <CLEANUP_ADMIN_TOKEN>``."""
    try:
        limit = _count("limit", HISTORY_DEFAULT_LIMIT, 1, HISTORY_MAX_LIMIT)
        before = _count("before", None, 1, None)
    except ValueError as exc:
        return error(400, str(exc))
    j = janitor()
    entries = audit_entries(j.runtime.engine, limit=limit + 1, before=before)
    more = len(entries) > limit
    entries = entries[:limit]
    if not is_admin(j.settings.admin_token):
        # The audit copy holds every column of the platform's row, which may include
        # credentials; only the admin token sees it.  The mapped facts stay public.
        for entry in entries:
            entry.pop("row", None)
    return jsonify({"entries": entries, "next_before": entries[-1]["id"] if more else None})


@overload
def _count(name: str, default: int, low: int, high: int | None) -> int: ...
@overload
def _count(name: str, default: None, low: int, high: int | None) -> int | None: ...
def _count(name: str, default: int | None, low: int, high: int | None) -> int | None:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not _COUNT.fullmatch(raw) or int(raw) < low or (high is not None and int(raw) > high):
        bounds = f"{low}..{high}" if high is not None else f"at least {low}"
        raise ValueError(f"{name} must be a whole number, {bounds}")
    return int(raw)
