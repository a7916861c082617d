"""The audit trail as users read it (receiver/history.py)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from receiver import store
from receiver.history import audit_entries

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def db(any_db):
    with any_db.engine.begin() as conn:
        store.insert_audit(
            conn,
            [
                {
                    "table_name": "apps",
                    "row_key": str(i),
                    "vmid": 120 + i,
                    "hostname": f"app{i}.local",
                    "action": "delete",
                    "reason": "ghost",
                    "source": "sweep",
                    "detail": f"guest {120 + i} is gone",
                    "row_json": store.encode_row({"id": i, "lxc_id": 120 + i, "blob": b"\x00"}),
                    "removed_at": T0 + timedelta(minutes=i),
                }
                for i in range(5)
            ],
        )
    return any_db


def test_entries_are_newest_first_and_limited(db):
    entries = audit_entries(db.engine, limit=3)
    assert [e["row_key"] for e in entries] == ["4", "3", "2"]
    assert entries[0] == {
        "id": entries[0]["id"],
        "table": "apps",
        "row_key": "4",
        "vmid": 124,
        "hostname": "app4.local",
        "action": "delete",
        "reason": "ghost",
        "source": "sweep",
        "detail": "guest 124 is gone",
        "removed_at": "2024-05-01T12:04:00+00:00",
        "restored_at": None,
        "row": {"id": 4, "lxc_id": 124, "blob": {"$t": "bytes", "v": "AA=="}},
    }


def test_before_pages_on_to_older_entries(db):
    first = audit_entries(db.engine, limit=2)
    second = audit_entries(db.engine, limit=2, before=first[-1]["id"])
    third = audit_entries(db.engine, limit=2, before=second[-1]["id"])
    assert [e["row_key"] for e in first + second + third] == ["4", "3", "2", "1", "0"]
    assert audit_entries(db.engine, limit=2, before=third[-1]["id"]) == []


def test_no_entries(any_db):
    assert audit_entries(any_db.engine) == []
