"""Pending plans, holds and the webhook outbox: four new tables, nothing else changes.

``janitor_pending`` and ``janitor_pending_rows``: a plan a ``--force``-liftable rule refused,
kept for review (``pve-janitor pending``, ``approve``, ``reject``).  ``janitor_holds``: rows and
VMIDs that are never removed (``pve-janitor hold``).  ``janitor_outbox``: CloudEvents written in
the transaction of the change they report, delivered to ``CLEANUP_WEBHOOK_URLS``.

The tables are written out here as they are created, not taken from ``receiver/store.py``:
a migration must keep creating what it created when it was written.

Revision ID: 0003_pending_holds_outbox
Revises: 0002_drop_watch_missing_reads
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0003_pending_holds_outbox"
down_revision = "0002_drop_watch_missing_reads"
branch_labels = None
depends_on = None

TABLES = ("janitor_holds", "janitor_pending", "janitor_pending_rows", "janitor_outbox")


def upgrade() -> None:
    op.create_table(
        "janitor_holds",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("table_name", sa.String(128), nullable=False),
        sa.Column("vmid", sa.BigInteger),
        sa.Column("row_key", sa.String(255)),
        sa.Column("until", sa.DateTime),
        sa.Column("reason", sa.Text),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_janitor_holds_table_name", "janitor_holds", ["table_name"])
    op.create_table(
        "janitor_pending",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("table_name", sa.String(128), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("refusal", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("row_count", sa.Integer, nullable=False),
        sa.Column("table_rows", sa.Integer, nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("expires_at", sa.DateTime, nullable=False),
        sa.Column("decided_at", sa.DateTime),
        sa.Column("decided_by", sa.String(16)),
        sa.Column("note", sa.Text),
        sa.Column("superseded_by", sa.Integer),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_janitor_pending_state", "janitor_pending", ["state"])
    op.create_table(
        "janitor_pending_rows",
        sa.Column("plan_id", sa.Integer, primary_key=True),
        sa.Column("row_key", sa.String(255), primary_key=True),
        sa.Column("vmid", sa.BigInteger),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("detail", sa.Text),
        sa.Column("observed", sa.Text, nullable=False),
    )
    op.create_table(
        "janitor_outbox",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("target", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("events", sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb"), nullable=False),
        sa.Column("event_count", sa.Integer, nullable=False),
        sa.Column("delivered", sa.Integer, nullable=False, server_default="0"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text),
        sa.Column("last_error_at", sa.DateTime),
        sa.Column("done_at", sa.DateTime),
    )
    op.create_index("ix_janitor_outbox_target_done", "janitor_outbox", ["target", "done_at", "id"])


def downgrade() -> None:
    for name in reversed(TABLES):
        op.drop_table(name)
