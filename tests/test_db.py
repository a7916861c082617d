"""The engine and its transactions (receiver/db.py)."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from receiver.config import ConfigError
from receiver.db import (
    BIND_LIMIT,
    SQLITE_BUSY_TIMEOUT_MS,
    bind_limit,
    chunks,
    describe_db_error,
    make_engine,
    write_transaction,
)

SQLITE_LIMIT_VARIABLE_NUMBER = getattr(sqlite3, "SQLITE_LIMIT_VARIABLE_NUMBER", None)  # Python 3.11+


@pytest.mark.parametrize(
    "url",
    [
        "nosuchdialect://janitor:s3cr3t-pw@db.example/platform",
        "postgresql+nosuchdriver://janitor:s3cr3t-pw@db.example/platform",
    ],
)
def test_an_unusable_url_is_a_config_error_naming_database_url_without_the_password(url):
    with pytest.raises(ConfigError) as caught:
        make_engine(url)
    [problem] = caught.value.problems
    assert problem.startswith("DATABASE_URL=")
    assert "s3cr3t-pw" not in problem
    assert "janitor:***@db.example" in problem
    assert "\n" not in problem
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # no chained traceback to leak it


@pytest.mark.parametrize(
    "url",
    [
        "not a url janitor:s3cr3t-pw@db.example",
        "mysql+pymysql://janitor:s3cr3t-pw@db.example:notaport/platform",
        "postgresql://janitor:s3cr3t-pw@[::1/platform",
    ],
)
def test_an_unparsable_url_is_a_config_error_that_shows_no_part_of_it(url):
    with pytest.raises(ConfigError) as caught:
        make_engine(url)
    [problem] = caught.value.problems
    assert problem.startswith("DATABASE_URL='(unparsable URL)' cannot be used: ")
    assert "s3cr3t-pw" not in problem and "db.example" not in problem


def _failing_query(engine) -> DBAPIError:
    with pytest.raises(DBAPIError) as caught, engine.connect() as conn:
        conn.execute(
            sa.text("SELECT secret_column FROM no_such_table WHERE token = :token"), {"token": "hunter2-parameter"}
        )
    return caught.value


def test_describe_db_error_is_the_driver_error_s_first_line_without_sql_or_parameters(any_db):
    exc = _failing_query(any_db.engine)
    assert "hunter2-parameter" in str(exc)  # SQLAlchemy's own text would show it
    text = describe_db_error(exc)
    assert text.startswith(type(exc.orig).__name__ + ": ")
    assert "no_such_table" in text
    assert "\n" not in text
    assert "hunter2-parameter" not in text and "[SQL" not in text and "[parameters" not in text


@pytest.mark.parametrize(
    "exc, text",
    [
        (ValueError("first line\nsecond line\n"), "ValueError: first line"),
        (ValueError("  \n  padded  \nmore"), "ValueError: padded  "),
        (RuntimeError(""), "RuntimeError: "),
        (OSError("   "), "OSError: "),
    ],
)
def test_describe_db_error_of_a_plain_exception(exc, text):
    assert describe_db_error(exc) == text


def test_write_transaction_commits_on_success_and_rolls_back_on_error(any_db):
    engine = any_db.engine
    t = sa.Table("items", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True))
    t.create(engine)
    with write_transaction(engine) as conn:
        conn.execute(t.insert(), [{"id": 1}, {"id": 2}])
    with pytest.raises(RuntimeError, match="half-way"), write_transaction(engine) as conn:
        conn.execute(t.delete())
        conn.execute(t.insert().values(id=3))
        raise RuntimeError("half-way")
    with engine.connect() as conn:
        assert sorted(conn.execute(sa.select(t.c.id)).scalars()) == [1, 2]


def _sqlite_path(db) -> str:
    return db.engine.url.database


def test_sqlite_gets_the_busy_timeout(sqlite_db):
    with sqlite_db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == SQLITE_BUSY_TIMEOUT_MS


def _other_writer_is_locked_out(path: str) -> bool:
    """Whether another process's writer would have to wait now (it does not wait here)."""
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        assert "locked" in str(exc)
        return True
    else:
        other.execute("ROLLBACK")
        return False
    finally:
        other.close()


def test_sqlite_write_transaction_holds_the_write_lock_from_its_start(sqlite_db):
    engine = sqlite_db.engine
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    with engine.begin() as conn:  # a plain transaction that has only read holds no write lock
        conn.exec_driver_sql("SELECT count(*) FROM t").scalar()
        assert not _other_writer_is_locked_out(_sqlite_path(sqlite_db))
    with write_transaction(engine) as conn:
        assert _other_writer_is_locked_out(_sqlite_path(sqlite_db))  # before it has written anything
        conn.exec_driver_sql("SELECT count(*) FROM t").scalar()
    assert not _other_writer_is_locked_out(_sqlite_path(sqlite_db))


def test_sqlite_write_transaction_waits_for_another_writer_instead_of_failing(sqlite_db):
    engine = sqlite_db.engine
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    other = sqlite3.connect(_sqlite_path(sqlite_db), isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO t VALUES (1)")
    releaser = threading.Timer(0.5, lambda: other.execute("COMMIT"))
    releaser.start()
    started = time.monotonic()
    try:
        with write_transaction(engine) as conn:
            conn.exec_driver_sql("INSERT INTO t VALUES (2)")
    finally:
        releaser.join()
        other.close()
    assert time.monotonic() - started >= 0.4
    with engine.connect() as conn:
        assert sorted(conn.exec_driver_sql("SELECT x FROM t").scalars()) == [1, 2]


def test_write_transactions_of_one_engine_in_many_threads_all_commit(sqlite_db):
    engine = sqlite_db.engine
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    errors: list[BaseException] = []

    def write(i):
        try:
            with write_transaction(engine) as conn:
                n = conn.exec_driver_sql("SELECT count(*) FROM t").scalar()
                conn.exec_driver_sql(f"INSERT INTO t VALUES ({n})")
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    with engine.connect() as conn:  # each saw the one before it: read and write were one transaction
        assert sorted(conn.exec_driver_sql("SELECT x FROM t").scalars()) == list(range(20))


def test_mysql_sessions_use_utc(mysql_db):
    with mysql_db.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT @@session.time_zone").scalar() == "+00:00"


def test_bind_limit_is_within_what_the_database_takes(any_db):
    engine = any_db.engine
    limit = bind_limit(engine)
    assert 1 <= limit <= BIND_LIMIT
    if any_db.kind == "sqlite":
        with engine.connect() as conn:
            raw = conn.connection.dbapi_connection
            if hasattr(raw, "getlimit"):
                assert limit < raw.getlimit(SQLITE_LIMIT_VARIABLE_NUMBER)
    else:
        assert limit == BIND_LIMIT
    t = sa.Table("keys", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True))
    t.create(engine)
    with engine.begin() as conn:
        conn.execute(t.insert(), [{"id": 1}, {"id": limit}])
        found = conn.execute(sa.select(t.c.id).where(t.c.id.in_(list(range(1, limit + 1))))).scalars()
        assert sorted(found) == [1, limit]


@pytest.mark.parametrize(
    "items, size, expected",
    [
        ([], 3, []),
        ([1], 3, [[1]]),
        ([1, 2, 3], 3, [[1, 2, 3]]),
        ([1, 2, 3, 4, 5, 6, 7], 3, [[1, 2, 3], [4, 5, 6], [7]]),
        ([1, 2], 1, [[1], [2]]),
    ],
)
def test_chunks(items, size, expected):
    assert [list(c) for c in chunks(items, size)] == expected


def test_chunks_default_size_keeps_every_item_in_order():
    items = list(range(1234))
    parts = list(chunks(items))
    assert all(0 < len(p) <= 999 for p in parts)  # under SQLite's oldest bound-parameter limit
    assert [x for p in parts for x in p] == items
