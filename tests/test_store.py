"""pve-janitor's own tables (receiver/store.py): schema, audit copies, counters, errors, runs."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from decimal import Decimal

import pytest
import sqlalchemy as sa

from receiver import store

UTC = dt.timezone.utc
T0 = dt.datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

AWKWARD = {
    "id": 7,
    "none": None,
    "flag": True,
    "ratio": 0.1,
    "name": 'naïve ünïcode ✓ "quoted" \\ back',
    "price": Decimal("12.3400"),
    "huge": Decimal("123456789012345678901234567890.000000001"),
    "blob": b"\x00\xff\x10binary",
    "naive": dt.datetime(2024, 5, 1, 12, 30, 15, 123456),
    "aware": dt.datetime(2024, 5, 1, 14, 30, tzinfo=dt.timezone(dt.timedelta(hours=2))),
    "day": dt.date(2024, 2, 29),
    "clock": dt.time(23, 59, 58, 1),
    "token": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "config": {"env": ["A=1"], "nested": {"n": 1}},
    "tags": ["a", "b"],
}


@pytest.fixture
def db(any_db):
    """A database with pve-janitor's tables at this version's revision (conftest migrates it;
    the migrations themselves are tested in tests/test_migrations.py)."""
    return any_db


def test_encode_row_is_json_and_decodes_to_the_same_values():
    text = store.encode_row(AWKWARD)
    assert isinstance(json.loads(text), dict)
    assert store.decode_row(text) == AWKWARD
    back = store.decode_row(text)
    assert back["aware"].utcoffset() == dt.timedelta(hours=2) and back["naive"].tzinfo is None
    assert str(back["price"]) == "12.3400"  # trailing zeros kept: a restore writes back the same text


def test_encode_row_is_stable_whatever_the_key_order():
    shuffled = dict(reversed(list(AWKWARD.items())))
    assert store.encode_row(shuffled) == store.encode_row(AWKWARD)


@pytest.mark.parametrize(
    "value, decoded",
    [
        (bytearray(b"\x01\x02"), b"\x01\x02"),
        (memoryview(b"\x03"), b"\x03"),
        ({"b", "a"}, "a,b"),  # a MariaDB SET column: written back as its text
        (frozenset({"x"}), "x"),
        (Decimal("-0.000"), Decimal("-0.000")),
    ],
)
def test_values_that_come_back_in_another_form(value, decoded):
    back = store.decode_row(store.encode_row({"v": value}))["v"]
    assert back == decoded
    assert type(back) is type(decoded)


def test_an_unknown_type_is_kept_as_its_text():
    class Odd:
        def __str__(self):
            return "odd value"

    assert store.decode_row(store.encode_row({"v": Odd()})) == {"v": "odd value"}


def test_a_plain_dict_that_looks_like_an_encoded_value_is_stored_as_json_not_decoded():
    row = {"v": {"$t": "bytes", "v": "AAAA"}}
    assert store.decode_row(store.encode_row(row)) == row


def test_audit_entries_are_written_in_the_caller_s_transaction_and_read_back(db):
    entries = [
        {
            "table_name": "apps",
            "row_key": str(i),
            "vmid": 120 + i,
            "hostname": f"app{i}",
            "action": "delete",
            "reason": "ghost",
            "source": "sweep",
            "detail": "guest gone",
            "row_json": store.encode_row(AWKWARD),
            "removed_at": T0.astimezone(dt.timezone(dt.timedelta(hours=-5))),
        }
        for i in range(3)
    ]
    with db.engine.begin() as conn:
        store.insert_audit(conn, entries)
        store.insert_audit(conn, [])
    with pytest.raises(RuntimeError), db.engine.begin() as conn:
        store.insert_audit(conn, entries[:1])
        raise RuntimeError("the deletion failed")
    with db.engine.connect() as conn:
        rows = conn.execute(sa.select(store.audit).order_by(store.audit.c.id)).mappings().all()
    assert [r["row_key"] for r in rows] == ["0", "1", "2"]
    assert rows[0]["removed_at"] == T0 and rows[0]["removed_at"].tzinfo is not None
    assert rows[0]["restored_at"] is None
    assert store.decode_row(rows[2]["row_json"]) == AWKWARD


def test_timestamps_are_stored_as_utc_and_come_back_aware(db):
    with db.engine.begin() as conn:
        conn.execute(
            store.errors.insert(),
            [
                {
                    "at": dt.datetime(2024, 5, 1, 14, 0, tzinfo=dt.timezone(dt.timedelta(hours=2))),
                    "source": "a",
                    "message": "aware",
                },
                {"at": dt.datetime(2024, 5, 1, 12, 0), "source": "b", "message": "naive is UTC"},
            ],
        )
    with db.engine.connect() as conn:
        stored = conn.execute(sa.select(store.errors.c.at)).scalars().all()
        raw = conn.execute(sa.text("SELECT at FROM janitor_errors")).scalars().all()
    assert stored == [T0, T0]
    assert all(value.tzinfo is not None for value in stored)
    assert all(getattr(value, "tzinfo", None) is None for value in raw)  # naive UTC in the table


def test_counters_add_up_and_read_back(db):
    with db.engine.begin() as conn:
        assert store.read_counters(conn) == {n: 0 for n in store.COUNTERS}
        store.add_counters(conn, {"total_removed": 3, "ghost_apps_removed": 2, "ports_freed": 0})
        store.add_counters(conn, {"total_removed": 4})
        store.add_counters(conn, {})
    with db.engine.connect() as conn:
        counts = store.read_counters(conn)
    assert counts == {**{n: 0 for n in store.COUNTERS}, "total_removed": 7, "ghost_apps_removed": 2}
    assert all(type(v) is int for v in counts.values())


def test_recorded_errors_are_newest_first_and_bounded(db):
    for i in range(store.KEEP_ERRORS + 7):
        store.record_error(db.engine, "watcher", f"error {i}")
    store.record_error(db.engine, "sweep", "x" * 5000)
    with db.engine.connect() as conn:
        kept = conn.execute(sa.select(sa.func.count()).select_from(store.errors)).scalar_one()
        recent = store.recent_errors(conn, limit=3)
        everything = store.recent_errors(conn, limit=1000)
    assert kept == store.KEEP_ERRORS
    assert [e["message"][:8] for e in recent] == [
        "x" * 8,
        f"error {store.KEEP_ERRORS + 6}",
        f"error {store.KEEP_ERRORS + 5}",
    ]
    assert len(recent[0]["message"]) == 2000
    assert recent[0]["source"] == "sweep"
    assert dt.datetime.fromisoformat(recent[0]["at"]).utcoffset() == dt.timedelta(0)
    assert len(everything) == store.KEEP_ERRORS
    assert everything[-1]["message"] == "error 8"  # the oldest kept


def run_values(outcome: str, finished: dt.datetime, source: str = "sweep", **extra) -> dict:
    return {
        "source": source,
        "started_at": finished - dt.timedelta(seconds=2),
        "finished_at": finished,
        "outcome": outcome,
        "reason": "",
        "dry_run": False,
        "planned": 1,
        "applied": 1,
        "duration_s": 2.0,
        **extra,
    }


def test_last_run_and_last_success(db):
    with db.engine.connect() as conn:
        assert store.last_run(conn) is None
        assert store.last_success_time(conn) is None
    store.record_run(db.engine, **run_values("done", T0))
    store.record_run(db.engine, **run_values("nothing", T0 + dt.timedelta(hours=1)))
    store.record_run(db.engine, **run_values("refused", T0 + dt.timedelta(hours=2), reason="guard"))
    store.record_run(db.engine, **run_values("failed", T0 + dt.timedelta(hours=3), source="watcher"))
    with db.engine.connect() as conn:
        last = store.last_run(conn)
        last_sweep = store.last_run(conn, "sweep")
        success = store.last_success_time(conn)
    assert last is not None and last_sweep is not None
    assert (last["outcome"], last["source"]) == ("failed", "watcher")
    assert (last_sweep["outcome"], last_sweep["reason"]) == ("refused", "guard")
    assert last_sweep["finished_at"] == "2024-05-01T14:00:00+00:00"
    assert last_sweep["started_at"] == "2024-05-01T13:59:58+00:00"
    json.dumps(last_sweep)  # shown as is by stats
    assert success == T0 + dt.timedelta(hours=1)


def test_runs_are_bounded(sqlite_db):
    for i in range(store.KEEP_RUNS + 3):
        store.record_run(sqlite_db.engine, **run_values("done", T0 + dt.timedelta(minutes=i)))
    with sqlite_db.engine.connect() as conn:
        finished = conn.execute(sa.select(store.runs.c.finished_at).order_by(store.runs.c.id)).scalars().all()
    assert len(finished) == store.KEEP_RUNS
    assert finished[0] == T0 + dt.timedelta(minutes=3)
    assert finished[-1] == T0 + dt.timedelta(minutes=store.KEEP_RUNS + 2)
