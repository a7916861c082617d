"""Alembic's entry point, run by ``receiver.schema`` on a connection it already holds.

The caller opened the transaction (under the schema lease) and commits it: Alembic
joins it.  Batch mode lets SQLite, which alters little in place, change a table by
copying it.
"""

from __future__ import annotations

from alembic import context

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    version_table=context.config.attributes["version_table"],
    render_as_batch=True,
)
with context.begin_transaction():
    context.run_migrations()
