"""``/ui``: the dashboard, a few server-rendered pages over what the API and the CLI show.

The receiver's one HTML surface (every other answer is JSON, :mod:`receiver.app`).  No
JavaScript and no build step: Jinja templates in ``receiver/templates/ui/`` (autoescaped, so
a hostname holding markup is shown as text), a form that POSTs for every action, and a
Content-Security-Policy that lets no script run at all.

Who may do what:

* reading: the admin's session, or anyone when ``CLEANUP_UI_PUBLIC=true``;
* every action (restore, approve, reject, hold, release): the admin's session only.

The admin logs in once with ``CLEANUP_ADMIN_TOKEN`` in a POSTed form: the token is never in a
page, a log or a URL.  The session is Flask's signed cookie: HttpOnly, SameSite=Strict, path
``/ui``, Secure when the request came over https, valid for :data:`LOGIN_HOURS` after the last
page, and it holds a CSRF token that every POST must send back.  Its signing key is derived
from the admin token (:func:`session_key`), so receivers behind one load balancer accept each
other's cookies and rotating the token logs everyone out.  Without an admin token there is no
key, hence no login and no action; the pages are then readable only with ``CLEANUP_UI_PUBLIC``.

Actions call what the CLI and the API call (:mod:`receiver.restore`, :mod:`receiver.approval`,
:mod:`receiver.holds`, :mod:`receiver.reservations`), as ``ui``, and each one logs who and
what.  Hook coverage is read as the stats read it (:mod:`receiver.coverage_refresh`).
docs/dashboard.md shows every page.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

from flask import Blueprint, Flask, Response, current_app, flash, redirect, render_template, request, session, url_for
from flask.sessions import SecureCookieSessionInterface
from werkzeug.exceptions import HTTPException
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.wrappers import Response as BaseResponse

from . import approval, coverage_db, coverage_refresh, holds, outbox, pending, reservations, restore, store
from .config import Settings
from .guestconfig import attach_command
from .history import audit_entries
from .pending import PlanState
from .timeutil import age_text, parse_timestamp
from .watchlist import watched_vmids
from .web import janitor

logger = logging.getLogger(__name__)

PREFIX = "/ui"
SESSION_LABEL = b"pve-janitor ui session"
SESSION_COOKIE = "pve_janitor_ui"
LOGIN_HOURS = 12
PAGE_SIZE = 50  # audit entries a page
ROWS_SHOWN = 1000  # rows of one pending plan on its page
LISTED = 500  # coverage and allocation lines
FLASHED_REASONS = 10  # "not removed" lines shown after an approval
SECURITY_HEADERS = {
    # No script at all: a value that slipped past escaping still could not run.
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",  # a page of rows must not outlive the session in a cache
}
_NEXT = re.compile(r"/ui(/[A-Za-z0-9_/-]*)?(\?[A-Za-z0-9_=&%.-]*)?")
_VMID = re.compile(r"[0-9]{1,10}")
_R = TypeVar("_R", bound=BaseResponse)

ui = Blueprint("ui", __name__, url_prefix=PREFIX, template_folder="templates")


# --- sessions ------------------------------------------------------------------------


def session_key(admin_token: str) -> bytes | None:
    """The session cookies' signing key: HMAC(admin token, label); None without a token."""
    if not admin_token:
        return None
    return hmac.new(admin_token.encode("utf-8", "surrogateescape"), SESSION_LABEL, hashlib.sha256).digest()


class _Sessions(SecureCookieSessionInterface):
    def get_cookie_secure(self, app: Flask) -> bool:
        """Secure when the browser spoke https: to waitress, or to a TLS proxy in front that says so.

        Trusting ``X-Forwarded-Proto`` here is safe: it can only make the cookie stricter."""
        return request.is_secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https"


def init_sessions(app: Flask, settings: Settings) -> None:
    """The dashboard's session cookie; the API never reads it (its path is ``/ui``)."""
    app.secret_key = session_key(settings.admin_token)
    app.session_interface = _Sessions()
    app.config.update(
        SESSION_COOKIE_NAME=SESSION_COOKIE,
        SESSION_COOKIE_PATH=PREFIX,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        PERMANENT_SESSION_LIFETIME=timedelta(hours=LOGIN_HOURS),
    )


def logged_in() -> bool:
    """The session was signed with the key of the admin token in force, at a login."""
    return bool(janitor().settings.admin_token) and session.get("admin") is True


def csrf_token() -> str:
    """The session's CSRF token, made on first use; every form carries it."""
    token = session.get("csrf")
    if not isinstance(token, str):
        token = session["csrf"] = secrets.token_urlsafe(32)
    return token


def _csrf_ok() -> bool:
    expected, given = session.get("csrf"), request.form.get("csrf", "")
    return isinstance(expected, str) and hmac.compare_digest(
        expected.encode("utf-8"), given.encode("utf-8", "surrogateescape")
    )


def _who() -> str:
    return f"ui from {request.remote_addr or 'unknown'}"


@ui.before_request
def _gate() -> BaseResponse | None:
    """Reading: a login, or CLEANUP_UI_PUBLIC.  Every POST: the CSRF token, and a login but to log in or out."""
    settings = janitor().settings
    if request.method == "POST":
        if not settings.admin_token:
            return error_page(403, "CLEANUP_ADMIN_TOKEN is not set: no login and no action is possible")
        if request.endpoint not in ("ui.login", "ui.logout") and not logged_in():
            logger.warning("%s: %s %s refused: not logged in", _who(), request.method, request.path)
            return error_page(401, "log in with the admin token first: every action needs it")
        if not _csrf_ok():
            logger.warning("%s: %s %s refused: CSRF token missing or stale", _who(), request.method, request.path)
            return error_page(400, "this form is stale or came from another page: reload the page and try again")
        return None
    if request.endpoint == "ui.login" or settings.ui_public or logged_in():
        return None
    if not settings.admin_token:
        return error_page(
            403, "the dashboard is off: set CLEANUP_ADMIN_TOKEN to log in, or CLEANUP_UI_PUBLIC=true to read it"
        )
    return redirect(url_for("ui.login", next=_here()), 303)


@ui.after_request
def _after(response: Response) -> Response:
    return harden(response)


def harden(response: _R) -> _R:
    response.headers.update(SECURITY_HEADERS)
    return response


@ui.context_processor
def _context() -> dict[str, Any]:
    return _nav()


def _nav() -> dict[str, Any]:
    settings = janitor().settings
    return {
        "logged_in": logged_in(),
        "can_log_in": bool(settings.admin_token),
        "public": settings.ui_public,
        "csrf_token": csrf_token,
        "when": when,
        "ago": ago,
        "table_name": settings.table,
        "login_hours": LOGIN_HOURS,
    }


def _here() -> str:
    query = request.query_string.decode("latin-1")
    return request.path + (f"?{query}" if query else "")


def _safe_next(value: str | None) -> str:
    """Where a login goes on: a dashboard page, never another site."""
    return value if value and _NEXT.fullmatch(value) else url_for("ui.status")


def _done(message: str, *, failed: bool = False) -> None:
    """Say what an action did: in the log, with who, and on the next page."""
    if failed:
        logger.warning("%s: %s", _who(), message)
    else:
        logger.info("%s: %s", _who(), message)
    flash(message, "bad" if failed else "good")


# --- formatting ----------------------------------------------------------------------


def _moment(value: Any) -> datetime | None:
    moment = value if isinstance(value, datetime) else parse_timestamp(value)
    return moment.astimezone(timezone.utc) if moment is not None else None


def when(value: Any) -> str:
    """A time as people read it: ``2026-05-04 10:00:00 UTC``; a dash for none."""
    moment = _moment(value)
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC" if moment is not None else "—"


def ago(value: Any) -> str:
    moment = _moment(value)
    return f"{age_text(janitor().runtime.clock(), moment)} ago" if moment is not None else ""


# --- errors as pages -----------------------------------------------------------------


def is_ui_request() -> bool:
    """Whether the request is for a dashboard page (its errors are pages, not JSON)."""
    return request.path == PREFIX or request.path.startswith(PREFIX + "/")


def error_page(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    title = f"{status} {HTTP_STATUS_CODES.get(status, 'Error')}"
    body = render_template("ui/error.html", title=title, status=status, message=message, **_nav())
    response = Response(body, status=status, mimetype="text/html")
    response.headers.update(headers or {})
    return harden(response)


def http_error_page(exc: HTTPException) -> Response:
    status = exc.code or 500
    headers = {}
    if status == 404:
        message = "no such page: the dashboard starts at /ui"
    elif status == 405:
        headers["Allow"] = ", ".join(sorted(set(getattr(exc, "valid_methods", None) or ())))
        message = f"{request.method} is not allowed here"
    else:
        message = exc.description or exc.name
    return error_page(status, message, headers)


# --- log in, log out -----------------------------------------------------------------


@ui.route("/login", methods=["GET", "POST"])
def login() -> BaseResponse | str:
    """The admin token form: a session for reading and acting (HTML)."""
    settings = janitor().settings
    if not settings.admin_token:
        return error_page(403, "CLEANUP_ADMIN_TOKEN is not set: no login is possible")
    target = _safe_next(request.values.get("next"))
    if request.method == "GET":
        return render_template("ui/login.html", next=target, wrong=False)
    given = request.form.get("token", "").encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(given, settings.admin_token.encode("utf-8", "surrogateescape")):
        logger.warning("%s: login refused: wrong token", _who())
        return Response(render_template("ui/login.html", next=target, wrong=True), status=401, mimetype="text/html")
    session.clear()  # a fresh session and CSRF token at every login
    session["admin"] = True
    session.permanent = True
    csrf_token()
    logger.info("%s: logged in", _who())
    return redirect(target, 303)


@ui.post("/logout")
def logout() -> BaseResponse:
    """End the session (HTML form)."""
    if logged_in():
        logger.info("%s: logged out", _who())
    session.clear()
    return redirect(url_for("ui.login"), 303)


# --- status --------------------------------------------------------------------------


@ui.get("", strict_slashes=False)
def status() -> str:
    """Dashboard: leader, last sweep, refusals, watcher health (HTML)."""
    j = janitor()
    s = j.settings
    now = j.runtime.clock()
    with j.runtime.engine.connect() as conn:
        counters = store.read_counters(conn)
        errors = store.recent_errors(conn, limit=10)
        last = store.last_run(conn)
        watched = watched_vmids(conn, now)
        open_plans = pending.count_open(conn, s.table, now)
        held = holds.count(conn, s.table, now)
        webhooks = outbox.summary(conn, s.webhook_urls) if s.webhook_urls else None
    watcher = j.watcher.status() if j.watcher is not None else None
    hidden = sorted(set(j.runtime.sweeper.last_hidden) | set((watcher or {}).get("hidden_guests") or ()))
    return render_template(
        "ui/status.html",
        settings=s,
        counters=counters,
        errors=errors,
        last=last,
        watched=watched,
        open_plans=open_plans,
        held=held,
        webhooks=webhooks,
        watcher=watcher,
        hidden=hidden,
        sweep_running=j.runtime.sweeper.busy,
        scheduler=j.scheduler is not None and bool(getattr(j.scheduler, "running", False)),
        backlog=j.inbox.backlog(),
        last_events=j.inbox.last_event_per_node(),
    )


# --- removals ------------------------------------------------------------------------


@ui.get("/removals")
def removals() -> Response | str:
    """Dashboard: recent removals, newest first, each with a restore button (HTML)."""
    raw = request.args.get("before")
    if raw is not None and not (raw.isdigit() and 0 < int(raw) < 2**63):
        return error_page(400, "before must be an audit id, a whole number from 1")
    j = janitor()
    entries = audit_entries(j.runtime.engine, limit=PAGE_SIZE + 1, before=int(raw) if raw else None)
    more = len(entries) > PAGE_SIZE
    entries = entries[:PAGE_SIZE]
    for entry in entries:
        entry.pop("row")  # the whole row may hold credentials: the page shows the mapped facts only
    return render_template(
        "ui/removals.html", entries=entries, next_before=entries[-1]["id"] if more else None, paged=raw is not None
    )


@ui.post("/removals/<int:audit_id>/restore")
def restore_row(audit_id: int) -> BaseResponse:
    """Put a removed row back, held until released (admin session, HTML form)."""
    try:
        done = restore.restore(janitor().runtime.table, audit_id, hold=True, source="ui")
    except (restore.AuditNotFound, restore.RestoreRefused) as exc:
        _done(f"restore refused, nothing changed: {exc}", failed=True)
    else:
        _done(f"audit entry {audit_id} restored: {done.message}")
    return redirect(url_for("ui.removals"), 303)


# --- pending plans -------------------------------------------------------------------


@ui.get("/pending")
def pending_plans() -> str:
    """Dashboard: pending plans with approve and reject, and the last decided ones (HTML)."""
    j = janitor()
    now = j.runtime.clock()
    with j.runtime.engine.connect() as conn:
        open_plans = pending.listing(conn, j.settings.table, now)
        decided = [p for p in pending.listing(conn, j.settings.table, now, everything=True) if p not in open_plans]
    return render_template("ui/pending.html", plans=open_plans, decided=decided[:20])


@ui.get("/pending/<int:plan_id>")
def pending_plan(plan_id: int) -> Response | str:
    """Dashboard: one plan with the rows it would act on and the values reviewed (HTML)."""
    j = janitor()
    now = j.runtime.clock()
    try:
        with j.runtime.engine.connect() as conn:
            plan = pending.get(conn, plan_id, j.settings.table)
            rows = pending.reviewed_rows(conn, plan_id)
    except pending.PlanNotFound as exc:
        return error_page(404, str(exc))
    if plan.state is PlanState.PENDING and plan.expires_at <= now:
        plan = replace(plan, state=PlanState.EXPIRED)  # as the listing shows it
    rows.sort(key=lambda r: (r.row.vmid is None, r.row.vmid or 0, str(r.row.key)))  # as people review: by VMID
    hidden_rows = max(0, len(rows) - ROWS_SHOWN)
    return render_template("ui/plan.html", plan=plan, rows=rows[:ROWS_SHOWN], hidden_rows=hidden_rows)


@ui.post("/pending/<int:plan_id>/approve")
def approve_plan(plan_id: int) -> BaseResponse:
    """Approve a pending plan: remove the reviewed rows that still match (admin session, HTML form)."""
    try:
        decision = approval.approve(janitor().runtime.sweeper, plan_id, by="ui")
    except (pending.PlanNotFound, pending.PlanClosed) as exc:
        _done(f"approval refused, nothing changed: {exc}", failed=True)
        return redirect(url_for("ui.pending_plans"), 303)
    _done(decision.message, failed=decision.state is PlanState.PENDING)
    for item in decision.not_removed[:FLASHED_REASONS]:
        flash(f"row {item['row_key']} (VMID {item['vmid']}) not removed: {item['why']}", "warn")
    if len(decision.not_removed) > FLASHED_REASONS:
        flash(f"… and {len(decision.not_removed) - FLASHED_REASONS} more not removed", "warn")
    return redirect(url_for("ui.pending_plans"), 303)


@ui.post("/pending/<int:plan_id>/reject")
def reject_plan(plan_id: int) -> BaseResponse:
    """Reject a pending plan: nothing is removed (admin session, HTML form)."""
    reason = request.form.get("reason", "")
    try:
        decision = approval.reject(janitor().runtime.sweeper, plan_id, by="ui", reason=reason)
    except (pending.PlanNotFound, pending.PlanClosed) as exc:
        _done(f"rejection refused, nothing changed: {exc}", failed=True)
    else:
        _done(decision.message)
    return redirect(url_for("ui.pending_plans"), 303)


# --- holds ---------------------------------------------------------------------------


@ui.get("/holds")
def hold_list() -> str:
    """Dashboard: holds in force, each with a release button, and a form to place one (HTML)."""
    j = janitor()
    with j.runtime.engine.connect() as conn:
        found = holds.listing(conn, j.settings.table, j.runtime.clock())
    return render_template("ui/holds.html", holds=found)


@ui.post("/holds")
def place_hold() -> BaseResponse:
    """Hold a row (row key) or every row of a VMID, until released or a time (admin session, HTML form)."""
    j = janitor()
    vmid_text = request.form.get("vmid", "").strip()
    row_text = request.form.get("row_key", "").strip()
    until_text = request.form.get("until", "").strip()
    back = redirect(url_for("ui.hold_list"), 303)
    if bool(vmid_text) == bool(row_text):
        _done("hold not placed: name exactly one of a VMID or a row key", failed=True)
        return back
    if vmid_text and not _VMID.fullmatch(vmid_text):
        _done(f"hold not placed: VMID {vmid_text[:40]!r} is not a whole number", failed=True)
        return back
    now = j.runtime.clock()
    row_key = None
    if row_text:
        row_key = j.runtime.table.stored_key(row_text)
        if row_key is None:
            _done(f"hold not placed: no row {row_text[:80]!r} in table {j.settings.table!r}", failed=True)
            return back
    try:
        until = holds.parse_until(until_text, now) if until_text else None
        placed = holds.place(
            j.runtime.engine,
            j.settings.table,
            now=now,
            source="ui",
            vmid=int(vmid_text) if vmid_text else None,
            row_key=row_key,
            until=until,
            reason=request.form.get("reason", ""),
        )
    except holds.HoldError as exc:
        _done(f"hold not placed: {str(exc).removeprefix('--')}", failed=True)
        return back
    target = f"VMID {placed.vmid}" if placed.vmid is not None else f"row {placed.row_key}"
    _done(f"{placed.describe()} placed on {target}")
    return back


@ui.post("/holds/<int:hold_id>/release")
def release_hold(hold_id: int) -> BaseResponse:
    """Release a hold: its rows may be removed again (admin session, HTML form)."""
    j = janitor()
    released = holds.release(j.runtime.engine, j.settings.table, hold_id=hold_id)
    if released:
        for gone in released:
            _done(f"released {gone.describe()}")
    else:
        _done(f"no hold {hold_id}: nothing released", failed=True)
    return redirect(url_for("ui.hold_list"), 303)


# --- hook coverage and allocations -----------------------------------------------------


@ui.get("/coverage")
def coverage() -> str:
    """Dashboard: hook coverage per node, and each guest whose config names no pve-janitor hookscript (HTML)."""
    j = janitor()
    with j.runtime.engine.connect() as conn:
        summary = coverage_refresh.stats(conn, current_app.extensions.get(coverage_refresh.STATUS_EXTENSION))
        cached = coverage_db.read_cache(conn)
    without = sorted((c for c in cached.values() if not c.has_hook), key=lambda c: (c.node, c.vmid))
    return render_template(
        "ui/coverage.html",
        summary=summary,
        uncovered=[(c, attach_command(c.type, c.vmid)) for c in without[:LISTED]],
        more=max(0, len(without) - LISTED),
    )


@ui.get("/allocations")
def allocations() -> str:
    """Dashboard: the allocator's reservations in force, newest first, each with a release button (HTML)."""
    j = janitor()
    with j.runtime.engine.connect() as conn:
        found = reservations.listing(conn, j.settings.table, j.runtime.clock())
    found.reverse()
    return render_template("ui/allocations.html", reservations=found[:LISTED], more=len(found) > LISTED)


@ui.post("/allocations/<int:reservation_id>/release")
def release_allocation(reservation_id: int) -> BaseResponse:
    """Release a reservation: its VMID, hostname and ports free up at once (admin session, HTML form)."""
    j = janitor()
    released = reservations.release(j.runtime.engine, j.settings.table, reservation_id)
    if released is None:
        _done(f"no reservation {reservation_id}: nothing released", failed=True)
    else:
        _done(f"released {released.describe()}")
    return redirect(url_for("ui.allocations"), 303)
