"""Wiring: settings in, the connected collaborators out.

The CLI and ``serve`` build one Runtime per process; tests build theirs from
a temp database and the simulator.  Nothing here runs at import time, and
nothing here creates a table: only ``serve`` (``upgrade=True``) and
``pve-janitor db upgrade`` migrate pve-janitor's tables (receiver/schema.py).

The Runtime carries the process's one clock: the sweeper and (through
``serve``) the watcher read the time from it, so a test that pins it pins
every grace period and timestamp a removal writes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.engine import Engine

from . import schema
from .config import Settings, require
from .db import make_engine
from .inventory import ProxmoxInventory
from .sweep import OnResult, Sweeper
from .table import PlatformTable
from .timeutil import utcnow


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    table: PlatformTable
    inventory: ProxmoxInventory
    sweeper: Sweeper
    clock: Callable[[], datetime] = utcnow

    @classmethod
    def build(
        cls,
        settings: Settings,
        engine: Engine | None = None,
        inventory: ProxmoxInventory | None = None,
        on_read: Callable[[float, str], None] | None = None,
        on_sweep: OnResult | None = None,
        clock: Callable[[], datetime] = utcnow,
        upgrade: bool = False,
    ) -> Runtime:
        """Raises ConfigError (exit 2) or DatabaseError (exit 3).

        pve-janitor's tables must be at this version's revision, or a SchemaNotCurrent (a
        DatabaseError) says to run ``pve-janitor db upgrade``; with ``upgrade`` they are
        brought there first, under the schema lease (``serve``).

        ``on_read`` sees each inventory read (seconds, outcome); ``on_sweep`` each sweep's
        result and source (``serve`` hands in its metrics for both).
        """
        require(settings, "DATABASE_URL", "PVE_HOST", "PVE_USER", "PVE_TOKEN_NAME", "PVE_TOKEN_VALUE")
        engine = engine or make_engine(settings.database_url)
        table = PlatformTable(engine, settings)
        if upgrade:
            schema.upgrade(engine)
        schema.require_current(engine)
        inventory = inventory or ProxmoxInventory(settings, on_read=on_read)
        sweeper = Sweeper(settings, table, inventory, on_result=on_sweep, clock=clock)
        return cls(settings, engine, table, inventory, sweeper, clock)
