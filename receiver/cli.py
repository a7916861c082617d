"""``pve-janitor``: the command line.

Exit codes (a contract scripts rely on): 0 done or nothing to do; 1 not found
or interrupted; 2 bad configuration; 3 refused for safety or failed with
nothing changed.
"""

from __future__ import annotations

import errno
import json
import logging
import sys
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import click

from . import __version__
from .checks import Checkup, Verdict
from .cli_allocate import COMMANDS as ALLOCATE_COMMANDS
from .cli_common import (
    EXIT_CONFIG,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_REFUSED,
    config_failure,
    fail,
    init_logging,
    text_table,
)
from .cli_common import runtime as build_runtime
from .cli_common import settings as settings_from_env
from .cli_config import config_cmd
from .cli_coverage import coverage_cmd
from .cli_db import db
from .cli_hookscript import hookscript
from .cli_plans import COMMANDS as PLAN_COMMANDS
from .cli_webhooks import webhooks
from .config import ConfigError
from .db import DatabaseError
from .history import audit_entries
from .logs import setup_logging
from .restore import AuditNotFound, RestoreRefused, restore
from .timeutil import age_text, utcnow

if TYPE_CHECKING:  # types only: no import at run time
    from .result import SweepResult

CHECK_EXIT = {Verdict.PASSED: EXIT_OK, Verdict.FAILED: EXIT_REFUSED, Verdict.MISCONFIGURED: EXIT_CONFIG}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pve-janitor")
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level (default: warnings only).")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """Remove ghost rows (apps whose Proxmox guest is gone) from a platform database.

    \b
    Exit codes:
      0  done, or nothing to do
      1  not found, or interrupted
      2  bad configuration
      3  refused for safety, or failed with nothing changed
    """
    ctx.ensure_object(dict)
    ctx.obj["log_level"] = logging.INFO if verbose else logging.WARNING


# --- serve -----------------------------------------------------------------


@main.command()
@click.pass_context
def serve(ctx: click.Context) -> None:
    """Run the receiver: HTTP API, watcher and the scheduled sweep.

    Exit codes: 0 stopped (SIGTERM, SIGINT); 2 bad configuration, which a restart
    cannot fix; 3 cannot start now (the database does not answer, CLEANUP_BIND's port
    is in use or its address not yet up), which a restart may fix.
    """
    from .serve import serve as run_server

    settings = settings_from_env()
    init_logging(ctx, settings, logging.INFO)
    try:
        code = run_server(settings)
    except ConfigError as exc:
        config_failure(exc)
    except DatabaseError as exc:
        fail(EXIT_REFUSED, f"database error: {exc}")
    except OSError as exc:
        where = f"CLEANUP_BIND={settings.bind_host}:{settings.bind_port}"
        if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):  # another process, or the network not up yet
            fail(EXIT_REFUSED, f"{where}: cannot listen now: {exc.strerror} (a restart may succeed)")
        fail(EXIT_CONFIG, f"{where}: cannot listen: {exc.strerror}")
    sys.exit(code)


# --- sweep -----------------------------------------------------------------


@main.command()
@click.option("--dry-run", is_flag=True, help="Plan and report; change nothing.")
@click.option(
    "--force", is_flag=True, help="Lift the deletion-percentage guard and the would-empty-table guard (only those two)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the plan and result as JSON.")
@click.pass_context
def sweep(ctx: click.Context, dry_run: bool, force: bool, as_json: bool) -> None:
    """Reconcile the whole table against the cluster, once, now."""
    settings = settings_from_env()
    init_logging(ctx, settings)
    runtime = build_runtime(settings)
    result = runtime.sweeper.run(dry_run=dry_run, force=force, source="manual")
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        print_sweep(result)
    sys.exit(result.exit_code)


def _age(now: datetime, then: datetime | None) -> str:
    return "-" if then is None else age_text(now, then)


def print_sweep(result: SweepResult, echo: Callable[[str], None] = click.echo) -> None:
    plan = result.plan
    now = result.started_at or utcnow()
    if plan is not None:
        title = "Plan (dry run)" if result.dry_run else "Plan"
        echo(f"{title}: {len(plan.actions)} of {plan.rows_seen} rows")
        if plan.actions:
            rows = [
                [
                    a.action,
                    str(a.row.key),
                    str(a.row.vmid if a.row.vmid is not None else "-"),
                    str(a.row.hostname or "-"),
                    str(a.row.status or "-"),
                    _age(now, a.row.last_touched()),
                    f"{a.reason}: {a.detail}",
                ]
                for a in plan.actions
            ]
            for line in text_table(rows, ["ACTION", "ROW", "VMID", "HOSTNAME", "STATUS", "AGE", "REASON"]):
                echo("  " + line)
        kept = ", ".join(f"{v} {k}" for k, v in plan.kept.items() if v)
        if kept:
            echo(f"Kept: {kept}")
        if plan.reports:
            echo(f"Reports ({len(plan.reports)}, never acted on):")
            for report in plan.reports:
                echo(f"  {report.kind}: {report.detail}")
    if result.applied and result.applied.skipped:
        echo("Skipped (changed since planning):")
        for action, why in result.applied.skipped:
            echo(f"  row {action.row.key} (VMID {action.row.vmid}): {why}")
    if result.dropped:
        echo(f"Dropped, guest is back: {', '.join(map(str, result.dropped))}")
    if result.hidden:
        echo(f"Kept, hidden_guest (in use in Proxmox, not shown to the token): {', '.join(map(str, result.hidden))}")
    echo(result.summary())


# --- check -----------------------------------------------------------------


@main.command()
@click.pass_context
def check(ctx: click.Context) -> None:
    """Check settings, database, table mapping, Proxmox and the token's privileges.

    Every stage runs; one that needs a stage that failed is a "skipped" line
    saying which ("skipped mapping: needs database").  Warnings (a setting
    raised to its minimum) are WARN lines.

    \b
    Exit codes:
      0  every stage passed (warnings allowed)
      2  bad configuration: a setting, a missing PVE_* or DATABASE_URL, the table
      3  a stage failed (database unreachable, privileges, quorum, ...)
    """
    setup_logging(logging.WARNING)
    checkup = Checkup()
    for line in checkup:
        click.echo(str(line))
    sys.exit(CHECK_EXIT[checkup.verdict])


# --- history / restore -----------------------------------------------------


@main.command()
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def history(ctx: click.Context, limit: int, as_json: bool) -> None:
    """List audit entries (what was removed or marked, and why), newest first."""
    settings = settings_from_env()
    init_logging(ctx, settings)
    runtime = build_runtime(settings)
    entries = audit_entries(runtime.engine, limit=limit)
    if as_json:
        click.echo(json.dumps(entries, indent=2))
        return
    if not entries:
        click.echo("No audit entries.")
        return
    rows = [
        [
            str(e["id"]),
            e["removed_at"][:19].replace("T", " "),
            e["action"],
            e["reason"],
            e["source"],
            e["row_key"],
            str(e["vmid"] if e["vmid"] is not None else "-"),
            e["hostname"] or "-",
            "restored" if e["restored_at"] else "",
        ]
        for e in entries
    ]
    for line in text_table(rows, ["AUDIT", "WHEN (UTC)", "ACTION", "REASON", "SOURCE", "ROW", "VMID", "HOSTNAME", ""]):
        click.echo(line)


@main.command(name="restore", context_settings={"ignore_unknown_options": True})
@click.argument("audit_id", type=int)
@click.option(
    "--no-hold", is_flag=True, help="Do not hold the row: the next sweep removes it again if its guest is still gone."
)
@click.pass_context
def restore_cmd(ctx: click.Context, audit_id: int, no_hold: bool) -> None:
    """Put a removed row back (refused when its UNIQUE values are taken by now).

    The row is held (never removed) until released with `pve-janitor release --row KEY`,
    unless --no-hold: its guest is usually still gone.
    """
    settings = settings_from_env()
    init_logging(ctx, settings)
    runtime = build_runtime(settings)
    try:
        done = restore(runtime.table, audit_id, hold=not no_hold, source="cli")
    except AuditNotFound as exc:
        fail(EXIT_NOT_FOUND, str(exc))
    except RestoreRefused as exc:
        fail(EXIT_REFUSED, f"refused, nothing changed: {exc}")
    click.echo(f"restored audit entry {audit_id}: {done.message}")


# --- demo ------------------------------------------------------------------


def _simulator_tooling(module: str) -> Any:
    """A module of the simulator package, loaded only by the commands that need it: it is
    tooling, and its dependency comes with the ``simulator`` extra."""
    import importlib

    try:
        return importlib.import_module(f"receiver.simulator.{module}")
    except ModuleNotFoundError as exc:
        if exc.name != "trustme":
            raise
        fail(EXIT_CONFIG, "the Proxmox simulator needs trustme: install pve-janitor[simulator]")
        raise  # unreachable


@main.command()
@click.option("--once", is_flag=True, help="Run the story and exit: 0 only if every step happened.")
def demo(once: bool) -> None:
    """Simulator + SQLite + receiver: watch ghosts get cleaned up, end to end."""
    run = _simulator_tooling("demo").run

    setup_logging(logging.WARNING)
    sys.exit(run(once=once, echo=click.echo))


# --- simulator -------------------------------------------------------------


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8006, show_default=True, type=int)
@click.option("--scene", default="seed", show_default=True, type=click.Choice(["seed", "empty"]))
@click.option(
    "--seed-db",
    "seed_db",
    metavar="PATH",
    help="Also write the seed platform's apps table (47 rows) into this SQLite file.",
)
def simulator(host: str, port: int, scene: str, seed_db: str | None) -> None:
    """Run the built-in Proxmox API simulator, to try pve-janitor without a cluster."""
    run_standalone = _simulator_tooling("standalone").run_standalone

    setup_logging(logging.INFO)
    if seed_db:
        from .db import make_engine
        from .simulator.scene import seed_database

        engine = make_engine(f"sqlite:///{seed_db}")
        seed_database(engine)
        engine.dispose()
        click.echo(f"export DATABASE_URL=sqlite:///{seed_db}")
    run_standalone(host=host, port=port, scene=scene, print_fn=click.echo)


main.add_command(db)  # pve-janitor db upgrade | current (receiver/cli_db.py)
main.add_command(config_cmd)  # pve-janitor config [--json] (receiver/cli_config.py)
main.add_command(hookscript)  # pve-janitor hookscript [--path | --print] (receiver/cli_hookscript.py)
for _command in PLAN_COMMANDS:  # pending, approve, reject, hold, release, holds (receiver/cli_plans.py)
    main.add_command(_command)
main.add_command(webhooks)  # pve-janitor webhooks [--json] (receiver/cli_webhooks.py)
for _command in ALLOCATE_COMMANDS:  # allocate, allocations, unallocate (receiver/cli_allocate.py)
    main.add_command(_command)
main.add_command(coverage_cmd)  # pve-janitor coverage [--json] [--refresh] (receiver/cli_coverage.py)


if __name__ == "__main__":  # pragma: no cover
    main()
