"""The seed platform's scene: its ``apps`` schema and the state it was found in.

47 apps: 41 error rows whose guests are gone (failed deployments and guests
destroyed by hand) and 6 running apps; 14 guests exist in the cluster (the 6
apps' guests, 2 templates and 6 guests the platform does not know).  The
demo, ``pve-janitor simulator --seed-db`` and the tests all start from it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..timeutil import utcnow

RUNNING_VMIDS = tuple(range(100, 106))  # 6 apps, guests exist
ERROR_VMIDS = tuple(range(120, 161))  # 41 error rows, guests gone
TEMPLATE_VMIDS = (9000, 9001)
UNMANAGED_VMIDS = tuple(range(106, 112))  # 6 guests with no row
NODES = ("pve1", "pve2")


def apps_table(metadata: sa.MetaData, name: str = "apps") -> sa.Table:
    """The seed platform's schema: every UNIQUE value a ghost can block."""
    return sa.Table(
        name,
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("lxc_id", sa.Integer, unique=True),
        sa.Column("hostname", sa.String(100), unique=True),
        sa.Column("public_port", sa.Integer, unique=True),
        sa.Column("internal_port", sa.Integer, unique=True),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("image", sa.String(200)),
        sa.Column("created_at", sa.DateTime),
        sa.Column("updated_at", sa.DateTime),
    )


def create_apps_table(engine: Engine, name: str = "apps") -> sa.Table:
    metadata = sa.MetaData()
    table = apps_table(metadata, name)
    metadata.create_all(engine)
    return table


def app_row(
    vmid: int | None,
    status: str,
    *,
    age: timedelta,
    name: str | None = None,
    now: datetime | None = None,
    port_base: int | None = None,
) -> dict[str, Any]:
    """One row as the platform writes it (naive UTC timestamps)."""
    now = now or utcnow()
    stamp = (now - age).replace(tzinfo=None, microsecond=0)
    label = name or f"app{vmid}"
    port = port_base if port_base is not None else (vmid if vmid is not None else 0)
    return {
        "name": label,
        "lxc_id": vmid,
        "hostname": f"{label}.apps.local",
        "public_port": 20000 + port,
        "internal_port": 30000 + port,
        "status": status,
        "image": "registry.local/app:1",
        "created_at": stamp,
        "updated_at": stamp,
    }


def seed_rows(now: datetime | None = None) -> list[dict[str, Any]]:
    now = now or utcnow()
    rows = [app_row(v, "running", age=timedelta(days=3), now=now) for v in RUNNING_VMIDS]
    rows += [app_row(v, "error", age=timedelta(days=2), now=now) for v in ERROR_VMIDS]
    return rows


def seed_database(engine: Engine, table_name: str = "apps") -> sa.Table:
    table = create_apps_table(engine, table_name)
    with engine.begin() as conn:
        conn.execute(table.delete())
        conn.execute(table.insert(), seed_rows())
    return table


def seed_guests() -> list[dict[str, Any]]:
    guests = []
    for i, vmid in enumerate(RUNNING_VMIDS + UNMANAGED_VMIDS):
        guests.append(
            {
                "vmid": vmid,
                "node": NODES[i % 2],
                "type": "lxc",
                "status": "running",
                "name": f"app{vmid}.apps.local" if vmid in RUNNING_VMIDS else f"ct{vmid}",
            }
        )
    for vmid in TEMPLATE_VMIDS:
        guests.append(
            {
                "vmid": vmid,
                "node": "pve1",
                "type": "lxc",
                "status": "stopped",
                "name": f"template{vmid}",
                "template": True,
            }
        )
    return guests


def load_into(sim, scene: str = "seed") -> None:
    """Put a scene's guests into a running simulator."""
    if scene not in ("seed", "empty"):
        raise ValueError(f"unknown scene {scene!r} (seed or empty)")
    if scene == "seed":
        for guest in seed_guests():
            sim.add_guest(**guest)
