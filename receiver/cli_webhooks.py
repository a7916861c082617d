"""``pve-janitor webhooks [--json]``: the outbox's backlog and last errors, per URL.

Read from the database alone (``DATABASE_URL`` and the webhook settings; no Proxmox), so it
answers on any host that reaches the database, whichever receiver delivers.  URLs are shown
as :func:`receiver.config.redact_webhook_url` shows them: no credentials, no query.  Events
of URLs no longer configured are counted apart (they are dropped 7 days after they were
written).  Exit 0; 2 bad configuration; 3 the database cannot be read or its tables are
behind (run ``pve-janitor db upgrade``).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import click
from sqlalchemy.exc import SQLAlchemyError

from . import outbox
from .cli_common import EXIT_REFUSED, engine, fail, text_table
from .cli_common import settings as settings_from_env
from .db import describe_db_error
from .timeutil import age_text, isoformat, utcnow


def _ago(now: datetime, then: datetime | None) -> str:
    return "-" if then is None else f"{then:%Y-%m-%d %H:%M:%S} ({age_text(now, then)} ago)"


def _as_json(found: dict[str, Any], now: datetime) -> dict[str, Any]:
    return {
        "urls": found["urls"],
        "backlog": found["backlog"],
        "targets": [
            {
                "url": t["url"],
                "undelivered": t["undelivered"],
                "oldest": isoformat(t["oldest"]),
                "oldest_age_s": round((now - t["oldest"]).total_seconds(), 1) if t["oldest"] else None,
                "attempts": t["attempts"],
                "last_error": t["last_error"],
                "last_error_at": isoformat(t["last_error_at"]),
            }
            for t in found["targets"]
        ],
        "orphaned": found["orphaned"],
    }


@click.command(name="webhooks")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of the table.")
def webhooks(as_json: bool) -> None:
    """Show the webhook backlog: per URL, events not yet delivered, the oldest, the last error.

    Undelivered events are retried until the URL answers 2xx (nothing is dropped); the
    receiver that holds the lease delivers them.
    """
    settings = settings_from_env()
    db = engine(settings)
    now = utcnow()
    try:
        with db.connect() as conn:
            found = outbox.summary(conn, settings.webhook_urls)
    except SQLAlchemyError as exc:
        fail(EXIT_REFUSED, f"database error: {describe_db_error(exc)}")
    finally:
        db.dispose()
    if as_json:
        click.echo(json.dumps(_as_json(found, now), indent=2))
        return
    if not settings.webhook_urls:
        click.echo("No webhooks: CLEANUP_WEBHOOK_URLS is not set.")
    else:
        click.echo(f"{found['urls']} URL(s), {found['backlog']} event(s) not yet delivered.")
        rows = [
            [
                t["url"],
                str(t["undelivered"]),
                _ago(now, t["oldest"]),
                str(t["attempts"]) if t["undelivered"] else "-",
                f"{t['last_error']} ({age_text(now, t['last_error_at'])} ago)" if t["last_error"] else "-",
            ]
            for t in found["targets"]
        ]
        for line in text_table(rows, ["URL", "UNDELIVERED", "OLDEST (UTC)", "ATTEMPTS", "LAST ERROR"]):
            click.echo(line)
    if found["orphaned"]:
        click.echo(
            f"{found['orphaned']} event(s) not delivered for URLs no longer in CLEANUP_WEBHOOK_URLS "
            f"(dropped {outbox.KEEP_ORPHANED.days} days after they were written)."
        )
