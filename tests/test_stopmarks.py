"""Stop marks against a real platform table: set, set back, and dropped with their rows."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from receiver import stopmarks, store
from receiver.config import load_settings
from receiver.db import write_transaction
from receiver.simulator.scene import app_row, create_apps_table
from receiver.table import PlatformTable
from receiver.timeutil import utcnow


@pytest.fixture
def table(any_db):
    apps = create_apps_table(any_db.engine)
    with any_db.engine.begin() as conn:
        conn.execute(apps.insert(), [app_row(v, "running", age=timedelta(days=1)) for v in (100, 101, 102)])
        conn.execute(apps.update().where(apps.c.lxc_id == 102).values(status="maintenance"))
    return PlatformTable(any_db.engine, load_settings(env={}))


def statuses(table):
    with table.engine.connect() as conn:
        return dict(conn.execute(sa.select(table.vmid, table.status)).all())


def marks(table):
    with table.engine.connect() as conn:
        return sorted(conn.execute(sa.select(store.stop_marks.c.table_name, store.stop_marks.c.vmid)).all())


def keys(table):
    return {r.vmid: str(r.key) for r in table.fetch_rows()}


def test_only_running_rows_are_set_to_stopped_and_marked(table):
    with write_transaction(table.engine) as conn:
        assert stopmarks.mark_stopped(conn, table, [100, 102], utcnow()) == 1
    assert statuses(table) == {100: "stopped", 101: "running", 102: "maintenance"}
    assert marks(table) == [("apps", 100)]


def test_a_row_marked_before_is_not_marked_twice(table):
    with write_transaction(table.engine) as conn:
        stopmarks.mark_stopped(conn, table, [100], utcnow())
    with table.engine.begin() as conn:  # the platform says running; the guest is still stopped
        conn.execute(table.table.update().where(table.vmid == 100).values(status="running"))
    with write_transaction(table.engine) as conn:
        assert stopmarks.mark_stopped(conn, table, [100], utcnow()) == 1
    assert statuses(table)[100] == "stopped" and marks(table) == [("apps", 100)]


def test_a_start_sets_back_only_marked_rows_that_still_say_stopped(table):
    with write_transaction(table.engine) as conn:
        stopmarks.mark_stopped(conn, table, [100, 101], utcnow())
    with table.engine.begin() as conn:  # the platform wrote its own status meanwhile
        conn.execute(table.table.update().where(table.vmid == 101).values(status="maintenance"))
        conn.execute(table.table.update().where(table.vmid == 102).values(status="stopped"))  # never marked
    with write_transaction(table.engine) as conn:
        for vmid in (100, 101, 102):
            stopmarks.unmark_started(conn, table, vmid)
    assert statuses(table) == {100: "running", 101: "maintenance", 102: "stopped"}
    assert marks(table) == []


def test_a_start_keeps_the_marks_of_other_guests(table):
    with write_transaction(table.engine) as conn:
        stopmarks.mark_stopped(conn, table, [100, 101], utcnow())
        stopmarks.unmark_started(conn, table, 100)
    assert statuses(table) == {100: "running", 101: "stopped", 102: "maintenance"}
    assert marks(table) == [("apps", 101)]


def delete_rows(conn, table, vmids):
    conn.execute(table.table.delete().where(table.vmid.in_(vmids)))


def test_a_mark_goes_with_its_row_deleted_in_the_same_transaction(table):
    with write_transaction(table.engine) as conn:
        stopmarks.mark_stopped(conn, table, [100, 101], utcnow())
    with table.engine.begin() as conn:  # another table's mark with the same key stays
        conn.execute(
            store.stop_marks.insert().values(table_name="other", row_key=keys(table)[100], vmid=100, marked_at=utcnow())
        )
    gone = keys(table)[100]
    with write_transaction(table.engine) as conn:
        delete_rows(conn, table, [100])
        stopmarks.drop_deleted(conn, table, [gone])
    assert marks(table) == [("apps", 101), ("other", 100)]


def test_marks_are_kept_when_the_delete_rolls_back(table):
    with write_transaction(table.engine) as conn:
        stopmarks.mark_stopped(conn, table, [100], utcnow())
    gone = keys(table)[100]
    with pytest.raises(RuntimeError), write_transaction(table.engine) as conn:
        delete_rows(conn, table, [100])
        stopmarks.drop_deleted(conn, table, [gone])
        raise RuntimeError("the audit insert failed")
    assert statuses(table)[100] == "stopped" and marks(table) == [("apps", 100)]


def test_no_deleted_keys_touch_no_mark(table):
    with write_transaction(table.engine) as conn:
        stopmarks.mark_stopped(conn, table, [100], utcnow())
        stopmarks.drop_deleted(conn, table, [])
        stopmarks.drop_deleted(conn, table, ["no-such-key"])
    assert marks(table) == [("apps", 100)]
