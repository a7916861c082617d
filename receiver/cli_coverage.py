"""``pve-janitor coverage [--json] [--refresh]``: which guests would never send an event.

Per node: the last event received and the events per phase (the inbox keeps 7 days), its
guests and those without the hook, and a flag when its guests whose config names the
hookscript started or stopped (Proxmox's recent task list) and it sent no event for any of
it.  Per guest without the hook: the exact line that attaches it, to run as root on a node
(only ``root@pam`` may): ``pct set 101 --hookscript local:snippets/pve-janitor-hook``, ``qm
set`` for a VM.  The volume is the one docs/hookscript.md and install.sh install, not a
setting: a hookscript on another storage is recognised, but the line names the documented one.

What ``serve`` cached is shown (its lease holder reads each guest's config at
``CLEANUP_COVERAGE_RPS``), with the guest list (guests not checked yet) and the task list read
now; ``--refresh`` first reads every listed guest's config, at ``CLEANUP_COVERAGE_RPS``.

Exit 0 when the report was made, whatever it shows: a guest without the hook costs speed, not
safety (the sweep still removes its ghosts), and exit 3 means "failed, nothing changed" to
every other command; scripts read ``--json``'s ``without_hook``.  2 bad configuration; 3 the
database cannot be read, or Proxmox could not be (the cache is still shown).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import click
from sqlalchemy.exc import SQLAlchemyError

from . import coverage, coverage_db, coverage_refresh
from .cli_common import EXIT_REFUSED, config_failure, engine, fail, init_logging, text_table
from .cli_common import settings as settings_from_env
from .config import ConfigError, require
from .db import describe_db_error
from .guestconfig import HOOK_FILE, HOOK_VOLUME, attach_command
from .inventory import ProxmoxInventory
from .model import InventoryError
from .timeutil import age_text, isoformat, utcnow

PHASE_ORDER = ("pre-start", "post-start", "pre-stop", "post-stop")


def build_report(
    cached: dict[int, coverage.Cached],
    listed: dict[int, tuple[str, str]] | None,
    events: dict[str, dict[str, Any]],
    checks: dict[str, coverage.NodeCheck] | None,
    unreadable: dict[int, str],
) -> dict[str, Any]:
    """The report as data (the JSON output); ``listed`` None: the guest list could not be read,
    so the cache is taken as it is."""
    if listed is not None:
        cached = {v: c for v, c in cached.items() if v in listed}
    without = sorted((c for c in cached.values() if not c.has_hook), key=lambda c: c.vmid)
    per_node: dict[str, list[int]] = {}
    for vmid, (node, _) in (listed or {v: (c.node, c.type) for v, c in cached.items()}).items():
        per_node.setdefault(node, []).append(vmid)
    nodes: dict[str, Any] = {}
    for node in sorted(set(per_node) | set(events) | set(checks or ())):
        seen = events.get(node, {"last_event": None, "events": {}})
        check = (checks or {}).get(node)
        nodes[node] = {
            "last_event": isoformat(seen["last_event"]),
            "events": {phase: seen["events"].get(phase, 0) for phase in PHASE_ORDER},
            "guests": len(per_node.get(node, ())),
            "without_hook": sum(1 for c in without if c.node == node),
            "flagged": None if checks is None else check is not None and check.flagged,
            "tasks": check.tasks if check is not None else None,
            "missed": check.missed if check is not None else None,
            "hook_errors": check.hook_errors if check is not None else None,
        }
    oldest = min((c.checked_at for c in cached.values()), default=None)
    return {
        "hook_volume": HOOK_VOLUME,
        "guests": len(listed) if listed is not None else len(cached),
        "checked": len(cached),
        "with_hook": len(cached) - len(without),
        "without_hook": len(without),
        "not_checked": sorted(set(listed) - set(cached)) if listed is not None else None,
        "checked_at": isoformat(oldest),
        "nodes": nodes,
        "without": [
            {
                "vmid": c.vmid,
                "node": c.node,
                "type": c.type,
                "hookscript": c.hookscript,
                "command": attach_command(c.type, c.vmid),
            }
            for c in without
        ],
        "unreadable": [
            {"vmid": vmid, "node": (listed or {}).get(vmid, ("", ""))[0], "reason": why}
            for vmid, why in sorted(unreadable.items())
        ],
    }


def _when(now: datetime, iso: str | None) -> str:
    if iso is None:
        return "-"
    then = datetime.fromisoformat(iso)
    return f"{then:%Y-%m-%d %H:%M:%S} ({age_text(now, then)} ago)"


def _flag(node: dict[str, Any]) -> str:
    if node["flagged"]:
        return "FLAGGED"
    return "ok" if node["tasks"] else "-"


def print_report(report: dict[str, Any], now: datetime) -> None:
    checked = f", configs read {_when(now, report['checked_at'])} at the oldest" if report["checked_at"] else ""
    not_checked = report["not_checked"] or []
    click.echo(
        f"{report['guests']} guests: {report['with_hook']} with pve-janitor's hookscript, "
        f"{report['without_hook']} without, {len(not_checked)} not checked yet{checked}."
    )
    rows = [
        [
            name,
            _when(now, node["last_event"]),
            *(str(node["events"][phase]) for phase in PHASE_ORDER),
            str(node["guests"]),
            str(node["without_hook"]),
            _flag(node),
        ]
        for name, node in report["nodes"].items()
    ]
    if rows:
        click.echo("")
        headers = ["NODE", "LAST EVENT (UTC)", *(p.upper() for p in PHASE_ORDER), "GUESTS", "WITHOUT HOOK", "FLAG"]
        for line in text_table(rows, headers):
            click.echo(line)
    for name, node in report["nodes"].items():
        if node["flagged"]:
            failed = f" ({node['hook_errors']} failed on the hookscript)" if node["hook_errors"] else ""
            click.echo(
                f"\n{name}: no event for {node['tasks']} starts/stops of guests whose config names the "
                f"hookscript{failed}. Is /var/lib/vz/snippets/{HOOK_FILE} on {name}, executable, and does "
                f"its /etc/pve-janitor/hook.conf reach the receiver?"
            )
    bare = [g for g in report["without"] if not g["hookscript"]]
    other = [g for g in report["without"] if g["hookscript"]]
    if bare:
        click.echo(
            "\nWithout a hookscript; as root on a Proxmox node (the file must be on every node, docs/hookscript.md):"
        )
        for guest in bare:
            click.echo(guest["command"])
    if other:
        click.echo(
            "\nWith another hookscript; attaching pve-janitor's replaces it (to keep it, name its path as "
            "CHAIN in hook.conf, docs/hookscript.md):"
        )
        for guest in other:
            click.echo(f"{guest['command']}  # now {guest['hookscript']}")
    if not_checked:
        click.echo(
            f"\nNot checked yet (serve reads new guests' configs first; --refresh reads them now): "
            f"{', '.join(map(str, not_checked))}"
        )
    for guest in report["unreadable"]:
        click.echo(f"\nConfig of {guest['vmid']} not read: {guest['reason']}")


@click.command(name="coverage")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of the text.")
@click.option("--refresh", is_flag=True, help="Read every guest's config now (at CLEANUP_COVERAGE_RPS).")
@click.pass_context
def coverage_cmd(ctx: click.Context, as_json: bool, refresh: bool) -> None:
    """Show which guests lack pve-janitor's hookscript, and the lines that attach it.

    \b
    Exit codes:
      0  the report was made (guests without the hook included)
      2  bad configuration
      3  the database or Proxmox could not be read
    """
    settings = settings_from_env()
    init_logging(ctx, settings)
    try:
        require(settings, "PVE_HOST", "PVE_USER", "PVE_TOKEN_NAME", "PVE_TOKEN_VALUE")
    except ConfigError as exc:
        config_failure(exc)
    db = engine(settings)
    inventory = ProxmoxInventory(settings)
    refresher = coverage_refresh.Refresher(db, inventory, settings, log_findings=False)  # the report says them
    listed = checks = None
    proxmox_error: str | None = None
    try:
        listed = refresher.list_guests()
        if refresh and listed is not None:
            click.echo(
                f"reading {len(listed)} guest configs at {settings.coverage_rps:g} a second "
                f"(about {max(1, round(len(listed) / settings.coverage_rps))} s)",
                err=True,
            )
            refresher.refresh(listed, everything=True)
        checks = refresher.check_nodes()
    except InventoryError as exc:
        proxmox_error = str(exc)
    except SQLAlchemyError as exc:
        fail(EXIT_REFUSED, f"database error: {describe_db_error(exc)}")
    try:
        with db.connect() as conn:
            cached = coverage_db.read_cache(conn)
            events = coverage_db.event_counts(conn)
    except SQLAlchemyError as exc:
        fail(EXIT_REFUSED, f"database error: {describe_db_error(exc)}")
    finally:
        db.dispose()
        inventory.close()
    report = build_report(cached, listed, events, checks, refresher.status.unreadable)
    report["proxmox_error"] = proxmox_error
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        print_report(report, utcnow())
    if proxmox_error is not None:
        fail(EXIT_REFUSED, f"Proxmox could not be read ({proxmox_error}): shown is what the cache holds")
