"""Drop ``janitor_watch.missing_reads``: no longer read since the removal pipeline confirms a
missing guest with a read of its own.

Batch mode: SQLite gets the table copied without the column, the other databases an
``ALTER TABLE ... DROP COLUMN``.

Revision ID: 0002_drop_watch_missing_reads
Revises: 0001_baseline
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_drop_watch_missing_reads"
down_revision = "0001_baseline"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("janitor_watch") as batch:
        batch.drop_column("missing_reads")


def downgrade() -> None:
    with op.batch_alter_table("janitor_watch") as batch:
        batch.add_column(sa.Column("missing_reads", sa.Integer, nullable=False, server_default="0"))
