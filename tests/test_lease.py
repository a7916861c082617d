"""The sweep lease (receiver/lease.py): one leader among receivers sharing a database."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
import sqlalchemy as sa

from receiver import store
from receiver.db import make_engine
from receiver.lease import NAME, Lease
from receiver.timeutil import utcnow


@pytest.fixture
def db(any_db):
    return any_db


def put_lease(engine, holder: str, expires_in: timedelta) -> None:
    """The lease row as another receiver would have left it."""
    with engine.begin() as conn:
        conn.execute(store.lease.delete())
        conn.execute(store.lease.insert().values(name=NAME, holder=holder, expires_at=utcnow() + expires_in))


def lease_rows(engine) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(store.lease)).mappings()]


def test_first_acquire_takes_the_lease_and_names_the_holder(db):
    lease = Lease(db.engine, ttl_seconds=30, holder="a")
    assert lease.acquire() is True
    assert lease.held and lease.still_held()
    assert lease.current_holder() == "a"
    [row] = lease_rows(db.engine)
    assert row["holder"] == "a"
    assert timedelta(seconds=25) < row["expires_at"] - utcnow() <= timedelta(seconds=30)


def test_a_second_receiver_is_refused_while_the_lease_is_held(db):
    a, b = Lease(db.engine, 30, holder="a"), Lease(db.engine, 30, holder="b")
    assert a.acquire()
    assert b.acquire() is False
    assert not b.held and not b.still_held()
    assert b.current_holder() == "a"
    assert a.acquire()  # the holder keeps it


def test_the_default_holder_names_this_host_and_process(db):
    lease = Lease(db.engine, 30)
    host, pid, _namespace, _random = lease.holder.split(":")
    assert (host, pid) == (socket.gethostname(), str(os.getpid()))
    assert Lease(db.engine, 30).holder != lease.holder  # two receivers in one process never share it
    assert lease.acquire()


def test_renewal_moves_the_expiry_on(sqlite_db):
    lease = Lease(sqlite_db.engine, ttl_seconds=0.6, holder="a")
    assert lease.acquire()
    [first] = lease_rows(sqlite_db.engine)
    time.sleep(0.3)  # past a third of the TTL: the next acquire writes
    assert lease.acquire()
    [renewed] = lease_rows(sqlite_db.engine)
    assert renewed["holder"] == "a"
    assert renewed["expires_at"] >= first["expires_at"] + timedelta(seconds=0.25)


def test_an_unrenewed_lease_expires_and_is_taken_over(sqlite_db):
    a, b = Lease(sqlite_db.engine, 0.3, holder="a"), Lease(sqlite_db.engine, 0.3, holder="b")
    assert a.acquire()
    assert not b.acquire()
    time.sleep(0.4)
    assert not a.still_held()  # a knows without asking that it may have lost it
    assert a.current_holder() is None
    assert b.acquire()
    assert not a.acquire()
    assert not a.held
    assert a.current_holder() == "b"


@pytest.mark.parametrize(
    "expires_in, taken",
    [
        (timedelta(seconds=-1), True),
        (timedelta(minutes=-10), True),
        (timedelta(seconds=60), False),
    ],
)
def test_another_holder_s_row_is_taken_only_once_expired(db, expires_in, taken):
    put_lease(db.engine, "other", expires_in)
    lease = Lease(db.engine, 30, holder="me")
    assert lease.acquire() is taken
    assert lease.current_holder() == ("me" if taken else "other")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _namespace() -> str:
    return str(os.stat("/proc/self/ns/pid").st_ino)


@pytest.mark.skipif(not os.path.exists("/proc/self/ns/pid"), reason="needs Linux PID namespaces")
@pytest.mark.parametrize(
    "holder, taken",
    [
        pytest.param(
            lambda: f"{socket.gethostname()}:{_dead_pid()}:{_namespace()}:x", True, id="dead-process-on-this-host"
        ),
        pytest.param(lambda: f"{socket.gethostname()}:{os.getpid()}:{_namespace()}:x", False, id="this-process"),
        pytest.param(lambda: f"other-{socket.gethostname()}:{_dead_pid()}:{_namespace()}:x", False, id="other-host"),
        pytest.param(
            lambda: f"{socket.gethostname()}:{_dead_pid()}:1{_namespace()}:x", False, id="other-pid-namespace"
        ),
        pytest.param(lambda: f"{socket.gethostname()}:{_dead_pid()}:0:x", False, id="unknown-namespace"),
        pytest.param(lambda: "not-a-holder-of-ours", False, id="foreign-format"),
    ],
)
def test_an_unexpired_lease_of_a_dead_process_on_this_host_is_taken_at_once(sqlite_db, holder, taken):
    put_lease(sqlite_db.engine, holder(), timedelta(minutes=5))
    assert Lease(sqlite_db.engine, 30, holder="me").acquire() is taken


def race(leases: list[Lease]) -> dict[str, bool]:
    """Each lease's acquire(), all let go at the same moment from threads of their own."""
    start = threading.Barrier(len(leases))
    results: dict[str, bool] = {}

    def run(lease):
        start.wait()
        results[lease.holder] = lease.acquire()

    threads = [threading.Thread(target=run, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == len(leases)
    return results


def test_two_holders_never_both_lead(db):
    leases = [Lease(db.engine, 30, holder=f"r{i}") for i in range(6)]
    for _round in range(3):
        leaders = [h for h, held in race(leases).items() if held]
        assert leaders == [leases[0].current_holder()]
        assert [lease.holder for lease in leases if lease.held] == leaders


def test_two_engines_on_one_database_never_both_lead(db):
    other = make_engine(db.url)
    try:
        a, b = Lease(db.engine, 30, holder="a"), Lease(other, 30, holder="b")
        assert sorted(race([a, b]).values()) == [False, True]
        assert [x.holder for x in (a, b) if x.held] == [a.current_holder()]
    finally:
        other.dispose()


def test_release_lets_the_next_receiver_take_over_at_once(db):
    a, b = Lease(db.engine, 30, holder="a"), Lease(db.engine, 30, holder="b")
    assert a.acquire()
    a.release()
    assert not a.held and not a.still_held()
    assert a.current_holder() is None
    assert b.acquire()


def test_release_never_removes_another_holder_s_lease(sqlite_db):
    a, b = Lease(sqlite_db.engine, 0.2, holder="a"), Lease(sqlite_db.engine, 30, holder="b")
    assert a.acquire()
    time.sleep(0.3)
    assert b.acquire()  # a's lease ran out; a has not noticed yet
    a.release()
    assert b.current_holder() == "b"
    Lease(sqlite_db.engine, 30, holder="c").release()  # never held: nothing to do
    assert b.current_holder() == "b"


def test_a_database_error_means_follower(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'missing-dir' / 'db.sqlite'}")  # cannot be opened
    try:
        lease = Lease(engine, 30, holder="a")
        assert lease.acquire() is False
        assert not lease.held and not lease.still_held()
    finally:
        engine.dispose()


def test_a_leader_that_meets_a_database_error_steps_down(sqlite_db):
    lease = Lease(sqlite_db.engine, 0.6, holder="a")
    assert lease.acquire()
    with sqlite_db.engine.begin() as conn:
        store.lease.drop(conn)
    time.sleep(0.3)  # past a third of the TTL: the next acquire asks the database
    assert lease.acquire() is False
    assert not lease.held and not lease.still_held()
    lease.release()  # no longer held: nothing to release, and no error
