"""The allocator's reservations: VMIDs, hostnames and ports handed out and not yet used.

A reservation holds its values (``janitor_reserved_values``, whose primary key is the UNIQUE
constraint that keeps two allocations apart) until its row appears in the platform table, it
expires (``CLEANUP_RESERVATION_MINUTES``) or it is released.  The planner treats a row whose
VMID is reserved like a row in its grace period: the platform is creating its guest.

This module is the only one that writes the two tables, and the one that cleans them.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import store

VMID = "vmid"
HOSTNAME = "hostname"


def reserved_vmids(conn: Connection, table_name: str, now: datetime) -> frozenset[int]:
    """The VMIDs of reservations in force on ``table_name``."""
    r, v = store.reservations, store.reserved_values
    rows = conn.execute(
        sa.select(v.c.value)
        .join(r, r.c.id == v.c.reservation_id)
        .where(v.c.table_name == table_name, v.c.kind == VMID, r.c.expires_at > now)
    ).scalars()
    return frozenset(int(value) for value in rows if value.isdigit())
