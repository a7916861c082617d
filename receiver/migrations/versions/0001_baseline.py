"""Baseline: the eight ``janitor_*`` tables as pve-janitor created them before migrations.

Before this chain, every command created missing tables with ``create_all`` and seeded
the counters.  An install from that time has the tables and no version row: this
migration adopts it.  It creates only the tables that are missing (all of them on a new
database), checks that the ones found have the columns it would have created, and seeds
the counters that are missing, so it is also safe on an install that stopped half-way.

Revision ID: 0001_baseline
Revises: none
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from alembic.util import CommandError

revision = "0001_baseline"
down_revision = None
branch_labels = None
depends_on = None

metadata = sa.MetaData()

sa.Table(
    "janitor_audit",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("table_name", sa.String(128), nullable=False),
    sa.Column("row_key", sa.String(255), nullable=False),
    sa.Column("vmid", sa.BigInteger),
    sa.Column("hostname", sa.String(255)),
    sa.Column("action", sa.String(16), nullable=False),
    sa.Column("reason", sa.String(32), nullable=False),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("detail", sa.Text),
    sa.Column("row_json", sa.Text, nullable=False),
    sa.Column("removed_at", sa.DateTime, nullable=False),
    sa.Column("restored_at", sa.DateTime),
    sa.Index("ix_janitor_audit_removed_at", "removed_at"),
)
counters = sa.Table(
    "janitor_counters",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.BigInteger, nullable=False, server_default="0"),
)
sa.Table(
    "janitor_runs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("started_at", sa.DateTime, nullable=False),
    sa.Column("finished_at", sa.DateTime, nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("dry_run", sa.Boolean, nullable=False),
    sa.Column("planned", sa.Integer, nullable=False),
    sa.Column("applied", sa.Integer, nullable=False),
    sa.Column("duration_s", sa.Float, nullable=False),
)
sa.Table(
    "janitor_errors",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.DateTime, nullable=False),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
)
sa.Table(
    "janitor_inbox",
    metadata,
    sa.Column("event_id", sa.String(128), primary_key=True),
    sa.Column("vmid", sa.BigInteger, nullable=False),
    sa.Column("phase", sa.String(16), nullable=False),
    sa.Column("node", sa.String(64), nullable=False),
    sa.Column("ts", sa.Double, nullable=False),
    sa.Column("received_at", sa.DateTime, nullable=False),
    sa.Column("processed_at", sa.DateTime),
    sa.Index("ix_janitor_inbox_processed_at", "processed_at"),
)
sa.Table(
    "janitor_watch",
    metadata,
    sa.Column("vmid", sa.BigInteger, primary_key=True),
    sa.Column("since", sa.DateTime, nullable=False),
    sa.Column("until", sa.DateTime, nullable=False),
    sa.Column("hint", sa.String(16), nullable=False),
    sa.Column("missing_reads", sa.Integer, nullable=False, server_default="0"),
)
sa.Table(
    "janitor_stop_marks",
    metadata,
    sa.Column("table_name", sa.String(128), primary_key=True),
    sa.Column("row_key", sa.String(255), primary_key=True),
    sa.Column("vmid", sa.BigInteger, nullable=False),
    sa.Column("marked_at", sa.DateTime, nullable=False),
)
sa.Table(
    "janitor_lease",
    metadata,
    sa.Column("name", sa.String(32), primary_key=True),
    sa.Column("holder", sa.String(128), nullable=False),
    sa.Column("expires_at", sa.DateTime, nullable=False),
)

COUNTERS = ("ghost_apps_removed", "old_errors_removed", "ports_freed", "total_removed", "rows_marked", "rows_restored")


class NotTheBaseline(CommandError):
    """A ``janitor_*`` table exists without a column the baseline has: nothing is adopted."""


def upgrade() -> None:
    conn = op.get_bind()
    inspector = sa.inspect(conn)
    present = set(inspector.get_table_names())
    for table in metadata.sorted_tables:
        if table.name not in present:
            table.create(conn)
            continue
        found = {c["name"] for c in inspector.get_columns(table.name)}
        lacking = sorted(set(table.c.keys()) - found)
        if lacking:
            raise NotTheBaseline(f"{table.name} exists but lacks {', '.join(lacking)}: not pve-janitor's table")
    seeded = set(conn.execute(sa.select(counters.c.name)).scalars())
    missing = [{"name": n, "value": 0} for n in COUNTERS if n not in seeded]
    if missing:
        conn.execute(counters.insert(), missing)


def downgrade() -> None:
    for table in reversed(metadata.sorted_tables):
        if table.name != "janitor_lease":  # it guards the chain: it stays (receiver/schema.py)
            table.drop(op.get_bind())
