"""Wiring: settings in, the connected collaborators out.

The CLI and ``serve`` build one Runtime per process; tests build theirs from
a temp database and the simulator.  Nothing here runs at import time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from . import store
from .config import Settings, require
from .db import DatabaseError, make_engine
from .inventory import ProxmoxInventory
from .sweep import Sweeper
from .table import PlatformTable


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    table: PlatformTable
    inventory: ProxmoxInventory
    sweeper: Sweeper

    @classmethod
    def build(cls, settings: Settings, engine: Engine | None = None,
              inventory: ProxmoxInventory | None = None,
              on_read: Callable[[float, str], None] | None = None) -> "Runtime":
        """Raises ConfigError (exit 2) or DatabaseError (exit 3)."""
        require(settings, "DATABASE_URL", "PVE_HOST", "PVE_USER", "PVE_TOKEN_NAME", "PVE_TOKEN_VALUE")
        engine = engine or make_engine(settings.database_url)
        table = PlatformTable(engine, settings)
        try:
            store.ensure_schema(engine)
        except SQLAlchemyError as exc:
            raise DatabaseError(f"cannot create pve-janitor's tables: {type(exc).__name__}") from None
        inventory = inventory or ProxmoxInventory(settings, on_read=on_read)
        return cls(settings, engine, table, inventory, Sweeper(settings, table, inventory))
