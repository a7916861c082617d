"""The platform table, reflected (receiver/table.py)."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from decimal import Decimal

import pytest
import sqlalchemy as sa
from conftest import sorted_vmids

from receiver.config import ConfigError, Settings
from receiver.db import DatabaseError, make_engine
from receiver.model import VMID_MAX, VMID_MIN, Row
from receiver.simulator.scene import ERROR_VMIDS, RUNNING_VMIDS, app_row, create_apps_table
from receiver.table import PlatformTable, as_vmid

SETTINGS = Settings()  # the seed platform's mapping: apps(id, lxc_id, hostname, status, ...)


def test_reflects_the_mapped_columns_of_the_platform_table(seeded):
    table = PlatformTable(seeded.engine, SETTINGS)
    assert table.pk.name == "id"
    assert table.status is not None and table.updated is not None
    assert (table.vmid.name, table.status.name, table.updated.name) == ("lxc_id", "status", "updated_at")
    assert table.count() == len(RUNNING_VMIDS) + len(ERROR_VMIDS)
    assert table.key_batch >= 1


def test_unmapped_status_and_updated_columns_are_none(seeded):
    table = PlatformTable(seeded.engine, replace(SETTINGS, status_column="", updated_column=""))
    assert table.status is None and table.updated is None
    assert table.observed(Row(1, 101, raw_vmid=101, raw_status="error", raw_updated="x")) == [(table.vmid, 101)]


def test_every_missing_column_is_named_at_start(seeded):
    settings = replace(SETTINGS, vmid_column="vm_id", hostname_column="fqdn", port_columns=("public_port", "ssh"))
    with pytest.raises(ConfigError) as caught:
        PlatformTable(seeded.engine, settings)
    assert caught.value.problems == [
        "CLEANUP_VMID_COLUMN='vm_id': no such column in table 'apps'",
        "CLEANUP_HOSTNAME_COLUMN='fqdn': no such column in table 'apps'",
        "CLEANUP_PORT_COLUMNS[ssh]='ssh': no such column in table 'apps'",
    ]


def test_a_missing_table_is_named(sqlite_db):
    with pytest.raises(ConfigError, match="CLEANUP_TABLE='apps': no such table"):
        PlatformTable(sqlite_db.engine, SETTINGS)


def test_a_table_without_a_single_column_primary_key_is_refused(sqlite_db):
    with sqlite_db.engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE apps (host TEXT, lxc_id INTEGER, PRIMARY KEY (host, lxc_id))")
    settings = replace(
        SETTINGS, hostname_column="host", status_column="", created_column="", updated_column="", port_columns=()
    )
    with pytest.raises(ConfigError, match=r"needs a single-column primary key \(found 2\)"):
        PlatformTable(sqlite_db.engine, settings)


def test_an_unreachable_database_is_a_database_error(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'no-such-dir' / 'platform.db'}")
    try:
        with pytest.raises(DatabaseError, match="cannot read the table 'apps'"):
            PlatformTable(engine, SETTINGS)
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "value, vmid",
    [
        (None, None),
        (101, 101),
        (VMID_MIN, VMID_MIN),
        (VMID_MAX, VMID_MAX),
        (101.0, 101),
        (Decimal("101"), 101),
        (Decimal("101.000"), 101),
        ("101", 101),
        (" 101\n", 101),
        (b"101", 101),
    ],
)
def test_as_vmid_reads_a_vmid(value, vmid):
    assert as_vmid(value) == vmid
    assert type(as_vmid(value)) is type(vmid)


@pytest.mark.parametrize(
    "value, why",
    [
        (True, "is not a number"),
        (False, "is not a number"),
        (101.5, "is not a whole number"),
        (Decimal("101.5"), "is not a whole number"),
        (float("nan"), "is not a whole number"),
        (float("inf"), "is not a whole number"),
        (Decimal("NaN"), "is not a whole number"),
        ("ct101", "is not a whole number"),
        ("101.0", "is not a whole number"),
        ("-101", "is not a whole number"),
        ("", "is not a whole number"),
        ("١٠١", "is not a whole number"),  # Arabic-Indic digits: str.isdigit, but no VMID
        (b"\xff101", "is not a whole number"),
        (1, "outside Proxmox's range"),
        (VMID_MIN - 1, "outside Proxmox's range"),
        (VMID_MAX + 1, "outside Proxmox's range"),
        (-101, "outside Proxmox's range"),
        ("42", "outside Proxmox's range"),
        (Decimal("99"), "outside Proxmox's range"),
    ],
)
def test_as_vmid_refuses_what_cannot_be_a_vmid(value, why):
    with pytest.raises(ValueError, match=why):
        as_vmid(value)


def test_fetch_rows_reads_every_row_with_its_raw_values(any_db):
    table_def = create_apps_table(any_db.engine)
    with any_db.engine.begin() as conn:
        conn.execute(
            table_def.insert(),
            [
                app_row(101, "running", age=timedelta(days=1)),
                app_row(None, "error", age=timedelta(days=2), name="novmid"),
            ],
        )
    rows = {r.hostname: r for r in PlatformTable(any_db.engine, SETTINGS).fetch_rows()}
    assert set(rows) == {"app101.apps.local", "novmid.apps.local"}
    running = rows["app101.apps.local"]
    assert (running.vmid, running.raw_vmid, running.status, running.raw_status) == (101, 101, "running", "running")
    assert running.unreadable is None
    assert running.raw_created is not None and running.last_touched() is not None
    assert rows["novmid.apps.local"].vmid is None and rows["novmid.apps.local"].unreadable is None


def test_fetch_rows_of_some_vmids_reads_only_those(any_db):
    table_def = create_apps_table(any_db.engine)
    with any_db.engine.begin() as conn:
        conn.execute(table_def.insert(), [app_row(v, "running", age=timedelta(days=1)) for v in range(100, 120)])
    table = PlatformTable(any_db.engine, SETTINGS)
    table.key_batch = 3  # several IN lists
    wanted = [119, 101, 105, 105, 110, 111, 112, 113, 999]
    assert sorted_vmids(r.vmid for r in table.fetch_rows(wanted)) == [101, 105, 110, 111, 112, 113, 119]
    assert table.fetch_rows([]) == []
    assert len(table.fetch_rows()) == 20


def test_fetch_rows_on_a_vanished_table_is_a_database_error(seeded):
    table = PlatformTable(seeded.engine, SETTINGS)
    with seeded.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE apps")
    with pytest.raises(DatabaseError, match="cannot read table 'apps'"):
        table.fetch_rows()


def test_a_text_vmid_column_is_read_and_its_unreadable_values_flagged(sqlite_db):
    with sqlite_db.engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE apps (id TEXT PRIMARY KEY, lxc_id TEXT, state INTEGER)")
        conn.exec_driver_sql("INSERT INTO apps VALUES ('a', '101', 1), ('b', 'ct102', 2), ('c', '7', NULL)")
    settings = replace(
        SETTINGS, hostname_column="", status_column="state", created_column="", updated_column="", port_columns=()
    )
    rows = {r.key: r for r in PlatformTable(sqlite_db.engine, settings).fetch_rows()}
    assert (rows["a"].vmid, rows["a"].raw_vmid, rows["a"].unreadable) == (101, "101", None)
    assert rows["b"].vmid is None and "'ct102' is not a whole number" in (rows["b"].unreadable or "")
    assert rows["c"].vmid is None and "outside Proxmox's range" in (rows["c"].unreadable or "")
    assert (rows["a"].status, rows["a"].raw_status) == ("1", 1)  # compared as text, guarded as stored
    assert rows["c"].status is None


def test_sqlite_timestamps_are_read_as_the_stored_text(sqlite_db):
    create_apps_table(sqlite_db.engine)
    with sqlite_db.engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO apps (name, lxc_id, status, created_at, updated_at) "
            "VALUES ('a', 101, 'error', '2024-05-01T12:00:00Z', 1714564800)"
        )
    [row] = PlatformTable(sqlite_db.engine, SETTINGS).fetch_rows()
    assert (row.raw_created, row.raw_updated) == ("2024-05-01T12:00:00Z", 1714564800)
    touched = row.last_touched()
    assert touched is not None and touched.isoformat() == "2024-05-01T12:00:00+00:00"


@pytest.mark.parametrize("per_row", [False, True])
def test_guarded_statements_refuse_a_row_changed_since_it_was_read(any_db, per_row):
    table_def = create_apps_table(any_db.engine)
    rows = [app_row(v, "error", age=timedelta(days=2)) for v in range(120, 130)]
    rows[3]["updated_at"] = None
    rows[4]["updated_at"] = rows[4]["lxc_id"] = None  # matched with IS NULL, not in a list of values
    rows[5]["updated_at"] = rows[5]["lxc_id"] = None
    with any_db.engine.begin() as conn:
        conn.execute(table_def.insert(), rows)
    table = PlatformTable(any_db.engine, SETTINGS)
    seen = table.fetch_rows()
    h = table_def.c.hostname
    with any_db.engine.begin() as conn:  # the platform changes three rows after we read them
        conn.execute(table_def.update().where(h == "app121.apps.local").values(status="running"))
        conn.execute(table_def.update().where(h == "app122.apps.local").values(lxc_id=222))
        conn.execute(table_def.update().where(h == "app124.apps.local").values(lxc_id=124))
    touched_by_row = []
    with any_db.engine.begin() as conn:
        for batch, where, params in table.guarded_batches(seen, per_row=per_row):
            touched = conn.execute(table.table.delete().where(where), params).rowcount
            assert len(batch) == 1 or not per_row
            touched_by_row.append(touched)
    left = PlatformTable(any_db.engine, SETTINGS).fetch_rows()
    assert sorted(r.hostname for r in left) == ["app121.apps.local", "app122.apps.local", "app124.apps.local"]
    assert sum(touched_by_row) == 7
    if per_row:
        assert sorted(touched_by_row) == [0] * 3 + [1] * 7


def test_observed_guard_matches_only_unchanged_rows(any_db):
    table_def = create_apps_table(any_db.engine)
    rows = [app_row(v, "error", age=timedelta(days=2)) for v in range(120, 126)]
    rows[0]["updated_at"] = None
    with any_db.engine.begin() as conn:
        conn.execute(table_def.insert(), rows)
    table = PlatformTable(any_db.engine, SETTINGS)
    seen = [r for r in table.fetch_rows() if r.vmid != 125]
    with any_db.engine.begin() as conn:
        conn.execute(table_def.update().where(table_def.c.lxc_id == 121).values(status="deploying"))
        conn.execute(table_def.update().where(table_def.c.lxc_id == 120).values(updated_at=rows[1]["updated_at"]))
        conn.execute(
            table_def.update()
            .where(table_def.c.lxc_id == 122)
            .values(updated_at=rows[2]["updated_at"] + timedelta(seconds=1))
        )
    with any_db.engine.connect() as conn:
        matched = conn.execute(sa.select(table.vmid).where(table.observed_guard(seen))).scalars()
        assert sorted(matched) == [123, 124]  # 125 was never read: never matched either


@pytest.mark.parametrize(
    "ddl, text, key",
    [
        ("id INTEGER PRIMARY KEY", "42", 42),
        ("id BIGINT PRIMARY KEY", "12345678901", 12345678901),
        ("id TEXT PRIMARY KEY", "app-42", "app-42"),
        ("id VARCHAR(36) PRIMARY KEY", "0042", "0042"),
    ],
)
def test_key_from_text_gives_the_key_back_in_its_column_s_type(sqlite_db, ddl, text, key):
    with sqlite_db.engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE apps ({ddl}, lxc_id INTEGER)")
    settings = replace(
        SETTINGS, hostname_column="", status_column="", created_column="", updated_column="", port_columns=()
    )
    assert PlatformTable(sqlite_db.engine, settings).key_from_text(text) == key
