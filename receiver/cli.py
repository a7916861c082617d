"""``pve-janitor``: the command line.

Exit codes (a contract scripts rely on): 0 done or nothing to do; 1 not found
or interrupted; 2 bad configuration; 3 refused for safety or failed with
nothing changed.
"""
from __future__ import annotations

import json
import logging
import sys
from datetime import datetime
from typing import Any, Callable

import click

from . import __version__
from .config import ConfigError, Settings, load_settings
from .db import DatabaseError
from .history import audit_entries
from .inventory import grant_lines, token_id
from .logs import setup_logging
from .model import Inventory, InventoryError
from .restore import AuditNotFound, RestoreRefused, restore
from .result import SweepResult
from .runtime import Runtime
from .safety import hidden_guests, vmid_column_problem
from .timeutil import utcnow

EXIT_OK, EXIT_NOT_FOUND, EXIT_CONFIG, EXIT_REFUSED = 0, 1, 2, 3


def _fail(code: int, lines: list[str] | str) -> None:
    for line in [lines] if isinstance(lines, str) else lines:
        click.echo(f"pve-janitor: {line}", err=True)
    sys.exit(code)


def _settings(overrides: dict[str, Any] | None = None) -> Settings:
    setup_logging(logging.WARNING)  # so that what loading says (an unknown PVE_* name) is formatted
    try:
        return load_settings(overrides=overrides)
    except ConfigError as exc:
        _fail(EXIT_CONFIG, ["configuration error:"] + [f"  {p}" for p in exc.problems])
        raise  # unreachable


def _runtime(settings: Settings) -> Runtime:
    try:
        return Runtime.build(settings)
    except ConfigError as exc:
        _fail(EXIT_CONFIG, ["configuration error:"] + [f"  {p}" for p in exc.problems])
    except DatabaseError as exc:
        _fail(EXIT_REFUSED, f"database error: {exc}")
    raise AssertionError("unreachable")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pve-janitor")
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level (default: warnings only).")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """Remove ghost rows (apps whose Proxmox guest is gone) from a platform database."""
    ctx.ensure_object(dict)
    ctx.obj["log_level"] = logging.INFO if verbose else logging.WARNING


def _init_logging(ctx: click.Context, settings: Settings, level: int | None = None) -> None:
    setup_logging(level or ctx.obj["log_level"], settings.secrets())


# --- serve -----------------------------------------------------------------

@main.command()
@click.pass_context
def serve(ctx: click.Context) -> None:
    """Run the receiver: HTTP API, watcher and the scheduled sweep."""
    from .serve import serve as run_server

    settings = _settings()
    _init_logging(ctx, settings, logging.INFO)
    try:
        code = run_server(settings)
    except ConfigError as exc:
        _fail(EXIT_CONFIG, ["configuration error:"] + [f"  {p}" for p in exc.problems])
    except DatabaseError as exc:
        _fail(EXIT_REFUSED, f"database error: {exc}")
    except OSError as exc:
        _fail(EXIT_CONFIG, f"CLEANUP_BIND={settings.bind_host}:{settings.bind_port}: cannot listen: {exc.strerror}")
    sys.exit(code)


# --- sweep -----------------------------------------------------------------

@main.command()
@click.option("--dry-run", is_flag=True, help="Plan and report; change nothing.")
@click.option("--force", is_flag=True, help="Lift the deletion-percentage guard and the would-empty-table "
              "guard (only those two).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan and result as JSON.")
@click.pass_context
def sweep(ctx: click.Context, dry_run: bool, force: bool, as_json: bool) -> None:
    """Reconcile the whole table against the cluster, once, now."""
    settings = _settings()
    _init_logging(ctx, settings)
    runtime = _runtime(settings)
    result = runtime.sweeper.run(dry_run=dry_run, force=force, source="manual")
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        print_sweep(result)
    sys.exit(result.exit_code)


def _table(rows: list[list[str]], headers: list[str]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*headers), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows]


def _age(now: datetime, then: datetime | None) -> str:
    if then is None:
        return "-"
    seconds = max(0, int((now - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def print_sweep(result: SweepResult, echo: Callable[[str], None] = click.echo) -> None:
    plan = result.plan
    now = result.started_at or utcnow()
    if plan is not None:
        title = "Plan (dry run)" if result.dry_run else "Plan"
        echo(f"{title}: {len(plan.actions)} of {plan.rows_seen} rows")
        if plan.actions:
            rows = [[a.action, str(a.row.key), str(a.row.vmid if a.row.vmid is not None else "-"),
                     str(a.row.hostname or "-"), str(a.row.status or "-"), _age(now, a.row.last_touched()),
                     f"{a.reason}: {a.detail}"] for a in plan.actions]
            for line in _table(rows, ["ACTION", "ROW", "VMID", "HOSTNAME", "STATUS", "AGE", "REASON"]):
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
        echo(f"Kept, hidden_guest (in use in Proxmox, not shown to the token): "
             f"{', '.join(map(str, result.hidden))}")
    echo(result.summary())


# --- check -----------------------------------------------------------------

@main.command()
@click.pass_context
def check(ctx: click.Context) -> None:
    """Check settings, database, table mapping, Proxmox and the token's privileges."""
    setup_logging(logging.WARNING)
    failed = False

    def line(ok: bool, what: str, detail: str = "") -> None:
        nonlocal failed
        failed |= not ok
        click.echo(f"{'ok    ' if ok else 'FAILED'}  {what}{': ' + detail if detail else ''}")

    try:
        settings = load_settings()
    except ConfigError as exc:
        for problem in exc.problems:
            line(False, "settings", problem)
        sys.exit(EXIT_CONFIG)
    line(True, "settings", f"table {settings.table}, action {settings.action}, "
                           f"interval {settings.interval_minutes} min, dry run {settings.dry_run}")
    try:
        runtime = Runtime.build(settings)
        rows = runtime.table.fetch_rows()
        line(True, "database", f"{runtime.engine.dialect.name}, table {settings.table!r} with "
                               f"{len(rows)} rows and every mapped column")
    except (ConfigError, DatabaseError) as exc:
        for problem in getattr(exc, "problems", [str(exc)]):
            line(False, "database", problem)
        sys.exit(EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_REFUSED)
    problem = vmid_column_problem(rows)
    line(problem is None, "mapping", problem or f"CLEANUP_VMID_COLUMN={settings.vmid_column!r} holds VMIDs")
    try:
        version = runtime.inventory.version()
        others = len(settings.pve_endpoints) - 1
        line(True, "proxmox", f"{runtime.inventory.endpoint} answers, version {version.get('version', '?')}"
                              + (f" ({others} more PVE_HOST endpoint{'s' * (others > 1)} to fall back on)"
                                 if others > 0 else ""))
        if not _privileges(runtime, line):
            sys.exit(EXIT_REFUSED)
        runtime.inventory.check_quorum()
        line(True, "quorum", "the answering node is quorate (or standalone)")
        inventory = runtime.inventory.read()
        line(True, "inventory", f"{len(inventory.guests)} guests in {inventory.read_seconds:.2f} s")
        proof = runtime.inventory.acl_proof()
        if proof.hideable is not None:
            line(True, "acl", f"Sys.Audit on /access: {proof.reason}")
        else:  # safe, only slower: not a failure
            click.echo(f"WARN    acl: {proof.reason}; sweeps and the watcher will make one "
                       "/cluster/nextid request per ghost")
        hidden = _hidden_guests(runtime, rows, inventory, proof.hideable)
        if hidden:
            click.echo(f"WARN    hidden_guest: VMIDs {', '.join(map(str, hidden))} have rows and are in use in "
                       "Proxmox, but the token is not shown those guests (an ACL hides them); their rows are "
                       "kept and reported")
    except InventoryError as exc:
        line(False, "quorum" if exc.kind == "no_quorum" else "proxmox", str(exc))
    sys.exit(EXIT_REFUSED if failed else EXIT_OK)


def _privileges(runtime: Runtime, line: Callable[[bool, str, str], None]) -> bool:
    """The token's privileges, each with what is lost without it; False when nothing can work.

    A token that holds nothing at all is almost always a privilege-separated token whose user
    has no ACL: Proxmox gives such a token only what both hold.  The token cannot read its
    user's privileges (that needs Sys.Audit on /access), so the lines that grant both are shown.
    """
    inventory, settings = runtime.inventory, runtime.settings
    fix = "; run on a Proxmox node:\n" + "\n".join(f"          {cmd}" for cmd in grant_lines(settings))
    if not any(inventory.permissions().values()):
        line(False, "privileges", f"the token {token_id(settings)} holds no privilege at all. A privilege-"
             "separated token holds only what its user holds too, so its user most likely has no ACL" + fix)
        return False
    try:
        inventory.check_privileges()
    except InventoryError as exc:
        line(False, "privileges", f"{exc}{fix}")
        return False
    line(True, "privileges", "the token holds VM.Audit on /vms, propagated")
    if inventory.privilege("/", "Sys.Audit") is None:
        line(False, "privileges", "the token lacks Sys.Audit on /: quorum cannot be checked, so nothing is ever "
             "removed, and the task tail sees only the token's own tasks (a destroyed stopped guest waits for "
             "the sweep)" + fix)
        return False
    line(True, "privileges", "Sys.Audit on / (quorum, and every user's tasks for the task tail)")
    if inventory.privilege("/access", "Sys.Audit") is None:
        click.echo("WARN    privileges: the token lacks Sys.Audit on /access: the ACL list cannot prove the guest "
                   "list complete, so every ghost's VMID is asked about one by one (slower, as safe)")
    return True


def _hidden_guests(runtime: Runtime, rows: list, inventory: Inventory, hideable: frozenset[int] | None) -> list[int]:
    """Rows' VMIDs missing from the guest list that Proxmox says are in use (an ACL hides the guest)."""
    missing = {r.vmid for r in rows if r.vmid is not None and r.vmid not in inventory}
    return hidden_guests(missing, hideable, runtime.inventory.vmid_in_use)


# --- history / restore -----------------------------------------------------

@main.command()
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def history(ctx: click.Context, limit: int, as_json: bool) -> None:
    """List audit entries (what was removed or marked, and why), newest first."""
    settings = _settings()
    _init_logging(ctx, settings)
    runtime = _runtime(settings)
    entries = audit_entries(runtime.engine, limit=limit)
    if as_json:
        click.echo(json.dumps(entries, indent=2))
        return
    if not entries:
        click.echo("No audit entries.")
        return
    rows = [[str(e["id"]), e["removed_at"][:19].replace("T", " "), e["action"], e["reason"], e["source"],
             e["row_key"], str(e["vmid"] if e["vmid"] is not None else "-"), e["hostname"] or "-",
             "restored" if e["restored_at"] else ""] for e in entries]
    for line in _table(rows, ["AUDIT", "WHEN (UTC)", "ACTION", "REASON", "SOURCE", "ROW", "VMID", "HOSTNAME", ""]):
        click.echo(line)


@main.command(name="restore", context_settings={"ignore_unknown_options": True})
@click.argument("audit_id", type=int)
@click.pass_context
def restore_cmd(ctx: click.Context, audit_id: int) -> None:
    """Put a removed row back (refused when its UNIQUE values are taken by now)."""
    settings = _settings()
    _init_logging(ctx, settings)
    runtime = _runtime(settings)
    try:
        done = restore(runtime.table, audit_id)
    except AuditNotFound as exc:
        _fail(EXIT_NOT_FOUND, str(exc))
    except RestoreRefused as exc:
        _fail(EXIT_REFUSED, f"refused, nothing changed: {exc}")
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
        _fail(EXIT_CONFIG, "the Proxmox simulator needs trustme: install pve-janitor[simulator]")
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
@click.option("--seed-db", "seed_db", metavar="PATH",
              help="Also write the seed platform's apps table (47 rows) into this SQLite file.")
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


if __name__ == "__main__":  # pragma: no cover
    main()
