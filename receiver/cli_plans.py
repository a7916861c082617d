"""``pve-janitor pending | approve ID | reject ID`` and ``hold | release | holds``.

A tripped guard is not a dead end: the refused plan is kept (:mod:`receiver.pending`) and a
person reviews it here, then approves or rejects it.  Holds keep rows that must not go.

Exit codes as everywhere: 0 done; 1 no such plan or hold; 2 bad configuration or usage;
3 refused (the plan was decided, expired or superseded, or the confirming reads refused:
nothing changed).
"""

from __future__ import annotations

import json
import sys
from datetime import datetime

import click
from sqlalchemy.engine import Engine

from . import approval, holds, pending
from .cli_common import EXIT_CONFIG, EXIT_NOT_FOUND, EXIT_OK, EXIT_REFUSED, config_failure, engine, fail, runtime
from .cli_common import settings as settings_from_env
from .cli_common import text_table as _table
from .config import ConfigError, Settings
from .db import DatabaseError
from .table import PlatformTable
from .timeutil import age_text, utcnow

ROWS_SHOWN = 50  # rows of a plan printed by `pending ID` without --json


def _when(now: datetime, then: datetime | None) -> str:
    if then is None:
        return "-"
    relative = f"{age_text(now, then)} ago" if then <= now else f"in {age_text(then, now)}"
    return f"{then:%Y-%m-%d %H:%M:%S} ({relative})"


# --- pending plans ---------------------------------------------------------


@click.command(name="pending")
@click.argument("plan_id", type=int, required=False)
@click.option("--all", "everything", is_flag=True, help="Decided, expired and superseded plans too.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def pending_cmd(ctx: click.Context, plan_id: int | None, everything: bool, as_json: bool) -> None:
    """List pending plans, or show one plan's rows (PLAN_ID).

    A plan is kept here when the deletion-percentage guard or the would-empty-table
    guard refuses a removal.  Review it, then `pve-janitor approve ID` or `reject ID`.
    """
    settings = settings_from_env()
    db = engine(settings)
    now = utcnow()
    if plan_id is not None:
        try:
            with db.connect() as conn:
                plan = pending.get(conn, plan_id, settings.table)
                rows = pending.reviewed_rows(conn, plan_id)
        except pending.PlanNotFound as exc:
            fail(EXIT_NOT_FOUND, str(exc))
        body = {**plan.to_dict(), "rows_planned": [r.to_dict() for r in rows]}
        if as_json:
            click.echo(json.dumps(body, indent=2, default=str))
            return
        click.echo(
            f"Plan {plan.id}: {plan.state}, {plan.row_count} of {plan.table_rows} rows, refused by {plan.refusal}"
        )
        click.echo(f"  reason:  {plan.reason}")
        click.echo(f"  planned: {_when(now, plan.created_at)} by {plan.source}")
        click.echo(f"  expires: {_when(now, plan.expires_at)}")
        if plan.note:
            click.echo(f"  note:    {plan.note}")
        shown = [
            [
                str(r.row.key),
                str(r.row.vmid if r.row.vmid is not None else "-"),
                str(r.row.hostname or "-"),
                str(r.row.status or "-"),
                f"{r.action} ({r.reason}): {r.detail}",
            ]
            for r in rows[:ROWS_SHOWN]
        ]
        for line in _table(shown, ["ROW", "VMID", "HOSTNAME", "STATUS", "ACTION"]):
            click.echo("  " + line)
        if len(rows) > ROWS_SHOWN:
            click.echo(f"  ... and {len(rows) - ROWS_SHOWN} more (--json shows all)")
        return
    with db.connect() as conn:
        plans = pending.listing(conn, settings.table, now, everything=everything)
    if as_json:
        click.echo(json.dumps({"plans": [p.to_dict() for p in plans]}, indent=2))
        return
    if not plans:
        click.echo("No pending plans.")
        return
    lines = [
        [
            str(p.id),
            str(p.state),
            f"{p.row_count}/{p.table_rows}",
            p.refusal,
            p.source,
            _when(now, p.created_at),
            _when(now, p.expires_at),
        ]
        for p in plans
    ]
    for line in _table(lines, ["PLAN", "STATE", "ROWS", "REFUSED BY", "SOURCE", "PLANNED (UTC)", "EXPIRES (UTC)"]):
        click.echo(line)


def _print_decision(decision: approval.Decision, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(decision.to_dict(), indent=2, default=str))
        return
    click.echo(decision.message)
    for entry in decision.not_removed:
        click.echo(f"  not removed: row {entry['row_key']} (VMID {entry['vmid']}): {entry['why']}")


@click.command()
@click.argument("plan_id", type=int)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def approve(ctx: click.Context, plan_id: int, as_json: bool) -> None:
    """Approve pending plan PLAN_ID: remove the reviewed rows that still match.

    Proxmox is read again and every rule --force does not lift applies; a row that
    changed since the review, came back, or is held now, is not removed (and named).

    \b
    Exit codes: 0 approved; 1 no such plan; 3 refused, nothing changed
    (decided, expired or superseded, or the confirming reads refused).
    """
    settings = settings_from_env()
    janitor = runtime(settings)
    try:
        decision = approval.approve(janitor.sweeper, plan_id, by="cli")
    except pending.PlanNotFound as exc:
        fail(EXIT_NOT_FOUND, str(exc))
    except pending.PlanClosed as exc:
        fail(EXIT_REFUSED, f"refused, nothing changed: {exc}")
    _print_decision(decision, as_json)
    sys.exit(EXIT_REFUSED if decision.state is pending.PlanState.PENDING else EXIT_OK)


@click.command()
@click.argument("plan_id", type=int)
@click.option("--reason", default="", help="Why (kept with the plan and sent in its webhook event).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def reject(ctx: click.Context, plan_id: int, reason: str, as_json: bool) -> None:
    """Reject pending plan PLAN_ID: nothing is removed.

    \b
    Exit codes: 0 rejected; 1 no such plan; 3 already decided, expired or superseded.
    """
    settings = settings_from_env()
    janitor = runtime(settings)
    try:
        decision = approval.reject(janitor.sweeper, plan_id, by="cli", reason=reason)
    except pending.PlanNotFound as exc:
        fail(EXIT_NOT_FOUND, str(exc))
    except pending.PlanClosed as exc:
        fail(EXIT_REFUSED, f"refused, nothing changed: {exc}")
    _print_decision(decision, as_json)


# --- holds -----------------------------------------------------------------


@click.command()
@click.option("--vmid", type=int, help="Hold every row with this VMID.")
@click.option("--row", "row_key", help="Hold the row with this primary key.")
@click.option(
    "--until", "until_text", help="Until a time (ISO 8601, UTC unless it says) or for a while (30m, 12h, 7d, 2w)."
)
@click.option("--reason", default="", help="Why (shown in plans, holds and logs).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def hold(
    ctx: click.Context, vmid: int | None, row_key: str | None, until_text: str | None, reason: str, as_json: bool
) -> None:
    """Never remove a row (--row KEY) or any row of a VMID (--vmid N), until released or --until.

    \b
    Exit codes: 0 held; 1 no row with that key; 2 bad usage.
    """
    if (vmid is None) == (row_key is None):
        fail(EXIT_CONFIG, "name exactly one of --vmid N or --row KEY")
    settings = settings_from_env()
    db = engine(settings)
    now = utcnow()
    try:
        until = holds.parse_until(until_text, now) if until_text else None
        if row_key is not None:
            row_key = _stored_key(settings, db, row_key)
        placed = holds.place(
            db, settings.table, now=now, source="cli", vmid=vmid, row_key=row_key, until=until, reason=reason
        )
    except holds.HoldError as exc:
        fail(EXIT_CONFIG, str(exc))
    if as_json:
        click.echo(json.dumps(placed.to_dict(), indent=2))
        return
    what = f"VMID {vmid}" if vmid is not None else f"row {row_key}"
    click.echo(f"{what} held: {placed.describe()} (release with: pve-janitor release {placed.id})")


def _stored_key(settings: Settings, db: Engine, row_key: str) -> str:
    """The key of the row a hold names, as the table spells it; a row that does not exist is an
    error (a typo would hold nothing and say nothing)."""
    try:
        table = PlatformTable(db, settings)
    except ConfigError as exc:
        config_failure(exc)
    except DatabaseError as exc:
        fail(EXIT_REFUSED, f"database error: {exc}")
    stored = table.stored_key(row_key)
    if stored is None:
        fail(EXIT_NOT_FOUND, f"no row {row_key!r} in table {settings.table!r} ({table.pk.name})")
    return stored


@click.command()
@click.argument("hold_id", type=int, required=False)
@click.option("--vmid", type=int, help="Release every hold on this VMID.")
@click.option("--row", "row_key", help="Release every hold on this row.")
@click.pass_context
def release(ctx: click.Context, hold_id: int | None, vmid: int | None, row_key: str | None) -> None:
    """Release a hold (HOLD_ID), or every hold on --vmid N or --row KEY.

    \b
    Exit codes: 0 released; 1 no such hold; 2 bad usage.
    """
    if sum(x is not None for x in (hold_id, vmid, row_key)) != 1:
        fail(EXIT_CONFIG, "name exactly one of HOLD_ID, --vmid N or --row KEY")
    settings = settings_from_env()
    db = engine(settings)
    released = holds.release(db, settings.table, hold_id=hold_id, vmid=vmid, row_key=row_key)
    if not released:
        fail(EXIT_NOT_FOUND, "no such hold")
    for gone in released:
        click.echo(f"released {gone.describe()}")


@click.command(name="holds")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def holds_cmd(ctx: click.Context, as_json: bool) -> None:
    """List the holds in force."""
    settings = settings_from_env()
    db = engine(settings)
    now = utcnow()
    with db.connect() as conn:
        found = holds.listing(conn, settings.table, now)
    if as_json:
        click.echo(json.dumps({"holds": [h.to_dict() for h in found]}, indent=2))
        return
    if not found:
        click.echo("No holds.")
        return
    rows = [
        [
            str(h.id),
            f"VMID {h.vmid}" if h.vmid is not None else f"row {h.row_key}",
            _when(now, h.until) if h.until else "until released",
            h.source,
            h.reason or "-",
        ]
        for h in found
    ]
    for line in _table(rows, ["HOLD", "HOLDS", "UNTIL (UTC)", "BY", "REASON"]):
        click.echo(line)


COMMANDS = (pending_cmd, approve, reject, hold, release, holds_cmd)
