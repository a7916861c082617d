"""The allocator's reservations and the hook coverage cache: three new tables, nothing else changes.

``janitor_reservations`` and ``janitor_reserved_values``: VMIDs, hostnames and ports handed out
by ``POST /api/v1/allocations`` (``pve-janitor allocate``), held until their row appears in the
platform table, they expire or they are released; the values' primary key is the UNIQUE
constraint that keeps two allocations apart.  ``janitor_coverage``: whether each guest's config
names pve-janitor's hookscript, cached by the config's digest.

Revision ID: 0004_reservations_coverage
Revises: 0003_pending_holds_outbox
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_reservations_coverage"
down_revision = "0003_pending_holds_outbox"
branch_labels = None
depends_on = None

TABLES = ("janitor_reservations", "janitor_reserved_values", "janitor_coverage")


def upgrade() -> None:
    op.create_table(
        "janitor_reservations",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("table_name", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("expires_at", sa.DateTime, nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("label", sa.Text),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_janitor_reservations_expires_at", "janitor_reservations", ["expires_at"])
    op.create_table(
        "janitor_reserved_values",
        sa.Column("table_name", sa.String(128), primary_key=True),
        sa.Column("kind", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(255), primary_key=True),
        sa.Column("reservation_id", sa.Integer, nullable=False),
    )
    op.create_index("ix_janitor_reserved_values_reservation_id", "janitor_reserved_values", ["reservation_id"])
    op.create_table(
        "janitor_coverage",
        sa.Column("vmid", sa.BigInteger, primary_key=True),
        sa.Column("node", sa.String(64), nullable=False),
        sa.Column("type", sa.String(8), nullable=False),
        sa.Column("digest", sa.String(64)),
        sa.Column("hookscript", sa.String(255)),
        sa.Column("has_hook", sa.Boolean, nullable=False),
        sa.Column("checked_at", sa.DateTime, nullable=False),
    )


def downgrade() -> None:
    for name in reversed(TABLES):
        op.drop_table(name)
