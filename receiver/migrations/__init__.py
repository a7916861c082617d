"""pve-janitor's schema migrations (Alembic), shipped inside the package.

``receiver/schema.py`` runs them with a Config built in code (no alembic.ini), against
the version table ``janitor_alembic_version``, so a platform's own Alembic history in the
same database is never read or touched.  Each file in ``versions/`` is frozen once
released: it carries its own table definitions and never imports ``receiver.store``,
whose tables describe only the newest schema.
"""
