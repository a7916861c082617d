"""``pve-janitor allocate``, ``allocations`` and ``unallocate ID``: the allocator from a shell.

``allocate`` reserves a VMID free in Proxmox (confirmed with ``/cluster/nextid``) and in the
platform table, and optionally a hostname and ports, as ``POST /api/v1/allocations`` does
(:mod:`receiver.allocator`), so it needs the Proxmox settings; ``allocations`` lists the
reservations in force and ``unallocate`` releases one: the database alone.

Exit codes as everywhere: 0 done; 1 no such reservation; 2 bad configuration or usage;
3 refused, nothing reserved (Proxmox unreadable, the hostname taken, a range exhausted,
contention, the database unavailable).
"""

from __future__ import annotations

import json
from datetime import datetime

import click
from sqlalchemy.exc import SQLAlchemyError

from . import reservations
from .allocation import Refused, Request, port_counts
from .allocator import Allocator
from .cli_common import EXIT_CONFIG, EXIT_NOT_FOUND, EXIT_REFUSED, engine, fail, init_logging, runtime, text_table
from .cli_common import settings as settings_from_env
from .db import describe_db_error
from .timeutil import age_text, utcnow


def _ports(spec: tuple[str, ...]) -> int | dict[str, int] | None:
    """``--ports 2`` (every configured column) or ``--ports public_port=1`` (repeatable)."""
    if not spec:
        return None
    if len(spec) == 1 and spec[0].strip().isdigit():
        return int(spec[0])
    counts: dict[str, int] = {}
    for item in spec:
        column, sep, n = item.partition("=")
        if not sep or not column.strip() or not n.strip().isdigit() or column.strip() in counts:
            fail(EXIT_CONFIG, f"--ports {item!r}: give one count (--ports 1) or COLUMN=COUNT once per column")
        counts[column.strip()] = int(n)
    return counts


def _until(now: datetime, then: datetime) -> str:
    return f"{then:%Y-%m-%d %H:%M:%S} (in {age_text(then, now)})"


@click.command()
@click.option("--hostname", help="Reserve this hostname too (refused when a row, a guest or a reservation has it).")
@click.option("--suffix", is_flag=True, help="If the hostname is taken, the first free of NAME-2, NAME-3 ...")
@click.option(
    "--ports",
    "ports_spec",
    multiple=True,
    metavar="N|COLUMN=N",
    help="N ports of every CLEANUP_ALLOCATOR_PORTS column, or N of one column (repeatable).",
)
@click.option("--label", default="", help="What the reservation is for (kept with it, shown in the list).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def allocate(
    ctx: click.Context, hostname: str | None, suffix: bool, ports_spec: tuple[str, ...], label: str, as_json: bool
) -> None:
    """Reserve a VMID free in Proxmox and in the platform table (and a hostname, ports).

    The values are held for CLEANUP_RESERVATION_MINUTES (15): create the guest with the
    VMID at once; the reservation ends when the row appears, or with `unallocate ID`.

    \b
    Exit codes: 0 reserved; 2 bad usage or configuration; 3 refused, nothing reserved.
    """
    settings = settings_from_env()
    init_logging(ctx, settings)
    if suffix and hostname is None:
        fail(EXIT_CONFIG, "--suffix needs --hostname")
    try:
        counts = port_counts(settings, _ports(ports_spec))
    except Refused as exc:
        fail(EXIT_CONFIG, str(exc))
    janitor = runtime(settings)
    allocator = Allocator(settings, janitor.table, janitor.inventory, janitor.clock)
    try:
        reservation = allocator.allocate(Request(hostname, suffix, counts, label, source="cli"))
    except Refused as exc:
        fail(EXIT_CONFIG if exc.kind == "invalid" else EXIT_REFUSED, f"nothing reserved: {exc}")
    except SQLAlchemyError as exc:
        fail(EXIT_REFUSED, f"nothing reserved: database error {describe_db_error(exc)}")
    if as_json:
        click.echo(json.dumps(reservation.to_dict(), indent=2))
        return
    click.echo(f"VMID {reservation.vmid}")
    if reservation.hostname:
        click.echo(f"hostname {reservation.hostname}")
    for column, values in sorted(reservation.ports.items()):
        click.echo(f"{column} {' '.join(map(str, values))}")
    expires, now = reservation.expires_at, utcnow()
    click.echo(
        f"reserved until {expires:%Y-%m-%d %H:%M:%S} UTC (in {age_text(expires, now)}) as allocation "
        f"{reservation.id} (release with: pve-janitor unallocate {reservation.id})"
    )


@click.command(name="allocations")
@click.option("--json", "as_json", is_flag=True)
def allocations_cmd(as_json: bool) -> None:
    """List the reservations in force (database only)."""
    settings = settings_from_env()
    db = engine(settings)
    now = utcnow()
    try:
        with db.connect() as conn:
            found = reservations.listing(conn, settings.table, now)
    except SQLAlchemyError as exc:
        fail(EXIT_REFUSED, f"database error {describe_db_error(exc)}")
    if as_json:
        click.echo(json.dumps({"allocations": [r.to_dict() for r in found]}, indent=2))
        return
    if not found:
        click.echo("No allocations in force.")
        return
    rows = [
        [
            str(r.id),
            str(r.vmid),
            r.hostname or "-",
            " ".join(f"{c}={','.join(map(str, v))}" for c, v in sorted(r.ports.items())) or "-",
            _until(now, r.expires_at),
            r.source,
            r.label or "-",
        ]
        for r in found
    ]
    for line in text_table(rows, ["ID", "VMID", "HOSTNAME", "PORTS", "EXPIRES (UTC)", "BY", "LABEL"]):
        click.echo(line)


@click.command()
@click.argument("allocation_id", type=int)
def unallocate(allocation_id: int) -> None:
    """Release allocation ALLOCATION_ID: its VMID, hostname and ports are free again (database only).

    \b
    Exit codes: 0 released; 1 no such allocation.
    """
    settings = settings_from_env()
    db = engine(settings)
    try:
        released = reservations.release(db, settings.table, allocation_id)
    except SQLAlchemyError as exc:
        fail(EXIT_REFUSED, f"database error {describe_db_error(exc)}")
    if released is None:
        fail(EXIT_NOT_FOUND, f"no allocation {allocation_id}")
    click.echo(f"released {released.describe()}")


COMMANDS = (allocate, allocations_cmd, unallocate)
