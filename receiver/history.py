"""The audit trail as users read it: ``pve-janitor history`` and ``GET /api/v1/system/cleanup/history``."""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa

from . import store
from .timeutil import isoformat


def audit_entries(engine: sa.Engine, limit: int = 20, before: int | None = None) -> list[dict[str, Any]]:
    """Audit entries newest first; ``before`` pages on (entries with a smaller id)."""
    a = store.audit
    stmt = sa.select(a).order_by(a.c.id.desc()).limit(limit)
    if before is not None:
        stmt = stmt.where(a.c.id < before)
    with engine.connect() as conn:
        rows = conn.execute(stmt).mappings().all()
    return [
        {
            "id": r["id"],
            "table": r["table_name"],
            "row_key": r["row_key"],
            "vmid": r["vmid"],
            "hostname": r["hostname"],
            "action": r["action"],
            "reason": r["reason"],
            "source": r["source"],
            "detail": r["detail"],
            "removed_at": isoformat(r["removed_at"]),
            "restored_at": isoformat(r["restored_at"]),
            "row": json.loads(r["row_json"]),
        }
        for r in rows
    ]
