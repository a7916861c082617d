"""An approval racing the platform: the reviewed rows change while the approval runs.

An approval (receiver/approval.py) removes the reviewed rows that still match what was
reviewed.  Here the platform writes to a reviewed row from its own connection, in a thread,
while the approval is under way:

* at the confirming read (just before it, and just after it, the last Proxmox call before the
  apply): it updates the row (status and updated_at), deletes it and inserts it again under
  the same key (a new deployment), or tears the app down and gives its VMID to a new row and
  a new guest;
* while the apply holds its transaction: the platform's write waits on the row lock
  (PostgreSQL, MariaDB: ``SELECT ... FOR UPDATE``) or on the database lock (SQLite), and runs
  once the removal has committed;
* and, in a loop, a writer that keeps changing some reviewed rows while approvals run.

Every time: a row changed before the removal locked it is not removed; every unchanged one is;
the audit holds exactly the rows removed, each once and as it was reviewed; rows the platform
wrote after the review are never touched.  On SQLite, PostgreSQL and MariaDB.
"""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import Database, make_runtime

import receiver.removal as removal_module
from receiver import approval, store
from receiver.model import Refusal
from receiver.pending import PlanState
from receiver.runtime import Runtime
from receiver.simulator.scene import app_row, create_apps_table
from receiver.timeutil import utcnow

from .conftest import record, scaled

RUNNING = (100, 101, 102, 103)
MARKER = "/* platform-race-writer */"
COLUMNS = (
    "id",
    "name",
    "lxc_id",
    "hostname",
    "public_port",
    "internal_port",
    "status",
    "image",
    "created_at",
    "updated_at",
)


class Platform:
    """The platform's own connection: sqlite3 as a platform would use it, or its own engine."""

    def __init__(self, db: Database):
        self.db = db
        self.engine = None if db.kind == "sqlite" else sa.create_engine(db.url, poolclass=sa.pool.NullPool)

    def stamp(self, hours: float) -> Any:
        value = (utcnow() - timedelta(hours=hours)).replace(tzinfo=None, microsecond=0)
        return value.isoformat(sep=" ") if self.db.kind == "sqlite" else value

    def run(self, statements: list[tuple[str, dict[str, Any]]]) -> list[int]:
        """The statements in one transaction; the rows each touched."""
        if self.engine is None:
            path = self.db.engine.url.database
            assert path is not None
            conn = sqlite3.connect(path, timeout=30, isolation_level=None)
            try:
                conn.execute("BEGIN IMMEDIATE")
                counts = [conn.execute(sql, params).rowcount for sql, params in statements]
                conn.execute("COMMIT")
            finally:
                conn.close()
            return counts
        with self.engine.begin() as connection:
            return [connection.execute(sa.text(sql), params).rowcount for sql, params in statements]

    def close(self) -> None:
        if self.engine is not None:
            self.engine.dispose()


def _insert_sql() -> str:
    return f"INSERT INTO apps ({', '.join(COLUMNS)}) VALUES ({', '.join(':' + c for c in COLUMNS)}) {MARKER}"


def snapshot(db: Database) -> dict[int, dict[str, Any]]:
    with db.engine.connect() as conn:
        return {r["id"]: dict(r) for r in conn.execute(sa.text("SELECT * FROM apps")).mappings()}


def audit(db: Database) -> list[dict[str, Any]]:
    with db.engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(store.audit).order_by(store.audit.c.id)).mappings()]


def comparable(row: dict[str, Any]) -> dict[str, Any]:
    """A row as text where it holds a time: the audit copy keeps what the janitor read."""
    return {k: v.isoformat(sep=" ") if hasattr(v, "isoformat") else v for k, v in row.items()}


def build(sim: Any, db: Database, ghosts: range, **overrides: Any) -> tuple[Runtime, int, dict[int, dict[str, Any]]]:
    """Guests 100-103 with their rows, day-old rows of ``ghosts`` (gone): the guard keeps a plan.
    Returns the runtime, the plan and the reviewed rows by key, as the review saw them."""
    table = create_apps_table(db.engine)
    with db.engine.begin() as conn:
        if not conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one():
            conn.execute(table.insert(), [app_row(v, "running", age=timedelta(days=1)) for v in RUNNING])
            for v in RUNNING:
                sim.add_guest(v, name=f"app{v}.apps.local")
        conn.execute(table.insert(), [app_row(v, "running", age=timedelta(days=1)) for v in ghosts])
    runtime = make_runtime(sim, db, **overrides)
    result = runtime.sweeper.run()
    assert result.refusal == Refusal.GUARD and result.pending_id is not None, result.summary()
    reviewed = {k: r for k, r in snapshot(db).items() if r["lxc_id"] in ghosts}
    assert len(reviewed) == len(ghosts)
    return runtime, result.pending_id, reviewed


def check_exact(
    db: Database, reviewed: dict[int, dict[str, Any]], before_ids: int = 0
) -> tuple[set[int], list[dict[str, Any]]]:
    """Each reviewed row is in the table or in the audit (once, as reviewed), never both; the
    audit (entries after ``before_ids``) names reviewed rows only.  Returns the keys removed."""
    now = snapshot(db)
    entries = [a for a in audit(db) if a["id"] > before_ids]
    by_key: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        by_key.setdefault(entry["row_key"], []).append(entry)
    assert set(by_key) <= {str(k) for k in reviewed}, f"audit names rows never reviewed: {set(by_key)}"
    removed = set()
    for key, row in reviewed.items():
        found = by_key.get(str(key), [])
        assert len(found) <= 1, f"row {key} removed {len(found)} times"
        if found:
            removed.add(key)
            copy = comparable(store.decode_row(found[0]["row_json"]))
            assert copy == comparable(row), f"row {key} was removed in another state than reviewed: {copy}"
            assert now.get(key) != row, f"row {key} is both in the audit and, unchanged, in the table"
    with db.engine.connect() as conn:
        counters = store.read_counters(conn)
    assert counters["total_removed"] == len(audit(db)), counters
    return removed, entries


# --- writes the platform makes ---------------------------------------------------------------


def write_for(kind: str, platform: Platform, sim: Any, key: int, row: dict[str, Any]) -> Callable[[], list[int]]:
    """The platform's write of ``kind`` on reviewed row ``key``: the rows each statement touched."""
    vmid = row["lxc_id"]

    def update() -> list[int]:
        return platform.run(
            [
                (
                    f"UPDATE apps SET status = 'stopped', updated_at = :u WHERE id = :id {MARKER}",
                    {"u": platform.stamp(20), "id": key},
                )
            ]
        )

    def reinsert() -> list[int]:
        fresh = {
            **row,
            "name": f"again{vmid}",
            "hostname": f"again{vmid}.apps.local",
            "created_at": platform.stamp(30),
            "updated_at": platform.stamp(30),
        }
        return platform.run([(f"DELETE FROM apps WHERE id = :id {MARKER}", {"id": key}), (_insert_sql(), fresh)])

    def reuse() -> list[int]:
        newcomer = {
            **app_row(vmid, "deploying", age=timedelta(0), name=f"new{vmid}", port_base=vmid + 5000),
            "id": key + 100_000,
        }
        newcomer["created_at"] = newcomer["updated_at"] = platform.stamp(0)
        counts = platform.run([(f"DELETE FROM apps WHERE id = :id {MARKER}", {"id": key}), (_insert_sql(), newcomer)])
        sim.add_guest(vmid, name=f"new{vmid}.apps.local")
        return counts

    return {"update": update, "reinsert": reinsert, "reuse": reuse}[kind]


def in_a_thread(write: Callable[[], list[int]]) -> list[int]:
    """Run the platform's write from a thread of its own and wait for it (it commits first)."""
    done: list[Any] = []

    def run() -> None:
        try:
            done.append(write())
        except Exception as exc:  # noqa: BLE001 - reported below
            done.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    assert done and not isinstance(done[0], Exception), done
    return done[0]


@pytest.fixture
def platform(any_db) -> Iterator[Platform]:
    writer = Platform(any_db)
    yield writer
    writer.close()


# --- at the confirming read --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["update", "reinsert", "reuse"])
@pytest.mark.parametrize("seam", ["before_confirm", "after_confirm"])
def test_a_row_written_at_the_confirming_read_is_not_removed(sim, any_db, platform, kind, seam):
    ghosts = range(200, 212)
    runtime, plan_id, reviewed = build(sim, any_db, ghosts)
    target = min(reviewed)
    write = write_for(kind, platform, sim, target, reviewed[target])
    touched: list[list[int]] = []
    real = runtime.inventory.hideable_vmids
    calls: list[int] = []

    def hideable() -> Any:  # read right before the confirming read, and right after it
        try:
            return real()
        finally:
            calls.append(1)
            if len(calls) == (1 if seam == "before_confirm" else 2):
                touched.append(in_a_thread(write))

    runtime.inventory.hideable_vmids = hideable  # type: ignore[method-assign]
    decision = approval.approve(runtime.sweeper, plan_id, by="cli")
    assert touched and all(n == 1 for n in touched[0]), touched
    assert decision.state is PlanState.APPROVED, decision.message
    removed, _ = check_exact(any_db, reviewed)
    assert removed == set(reviewed) - {target}, decision.message
    assert [e["vmid"] for e in decision.not_removed] == [reviewed[target]["lxc_id"]]
    now = snapshot(any_db)
    if kind == "reuse":  # the new row with the VMID is the platform's: untouched
        assert target not in now and now[target + 100_000]["status"] == "deploying"
    else:
        assert now[target]["status"] == ("stopped" if kind == "update" else "running")
        assert now[target] != reviewed[target]
    record("approval_race", db=any_db.kind, case=f"{kind}@{seam}", why=decision.not_removed[0]["why"])


def test_a_hostname_changed_after_the_confirming_read_is_not_removed(sim, any_db, platform):
    ghosts = range(200, 212)
    runtime, plan_id, reviewed = build(sim, any_db, ghosts)
    target = min(reviewed)
    real = runtime.inventory.hideable_vmids
    calls: list[int] = []

    def hideable() -> Any:
        try:
            return real()
        finally:
            calls.append(1)
            if len(calls) == 2:
                in_a_thread(
                    lambda: platform.run(
                        [
                            (
                                f"UPDATE apps SET hostname = 'someone-else.apps.local' WHERE id = :id {MARKER}",
                                {"id": target},
                            )
                        ]
                    )
                )

    runtime.inventory.hideable_vmids = hideable  # type: ignore[method-assign]
    approval.approve(runtime.sweeper, plan_id, by="cli")
    assert target in snapshot(any_db)


# --- while the apply holds its transaction -------------------------------------------------------


def _blocked(db: Database, admin: sa.Engine) -> bool:
    """Whether the platform's statement waits on a lock now (PostgreSQL, MariaDB)."""
    with admin.connect() as conn:
        if db.kind == "postgres":
            sql = (
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE :marker AND pid <> pg_backend_pid()"
            )
        else:
            sql = (
                "SELECT count(*) FROM information_schema.innodb_trx WHERE trx_state = 'LOCK WAIT' "
                "AND trx_query LIKE :marker"
            )
        return bool(conn.execute(sa.text(sql), {"marker": "%platform-race-writer%"}).scalar())


@pytest.mark.parametrize("kind", ["update", "reinsert", "reuse"])
def test_a_write_waiting_on_the_apply_runs_after_the_removal(sim, any_db, platform, kind, monkeypatch):
    ghosts = range(200, 212)
    runtime, plan_id, reviewed = build(sim, any_db, ghosts)
    target = min(reviewed)
    write = write_for(kind, platform, sim, target, reviewed[target])
    admin = sa.create_engine(any_db.url, poolclass=sa.pool.NullPool)
    writer_done: list[Any] = []
    writer = threading.Thread(target=lambda: writer_done.append(write()))
    seen: dict[str, Any] = {}
    in_apply = threading.Event()
    real_apply = removal_module.apply_actions

    def apply(*args: Any, **kwargs: Any) -> Any:
        in_apply.set()
        try:
            return real_apply(*args, **kwargs)
        finally:
            in_apply.clear()

    def after_lock(conn, cursor, statement, parameters, context, executemany):
        if not in_apply.is_set() or "started" in seen or "FROM apps" not in statement:
            return
        if any_db.kind != "sqlite" and "FOR UPDATE" not in statement:
            return
        seen["started"] = time.monotonic()
        writer.start()  # the platform's write now waits for this transaction
        deadline = time.monotonic() + 15
        if any_db.kind == "sqlite":
            time.sleep(0.5)  # the writer waits in SQLite's busy handler: nothing to ask
            seen["blocked"] = writer.is_alive()
        else:
            while time.monotonic() < deadline and not _blocked(any_db, admin):
                time.sleep(0.05)
            # Seen waiting on the lock; or, where the lock views did not show it in time (once, on a
            # loaded MariaDB), still not done while this transaction holds the row: it cannot have
            # written it.  Either way the asserts below check it wrote only after the removal.
            seen["blocked"] = _blocked(any_db, admin) or (writer.is_alive() and not writer_done)

    monkeypatch.setattr(removal_module, "apply_actions", apply)
    sa.event.listen(any_db.engine, "after_cursor_execute", after_lock)
    try:
        decision = approval.approve(runtime.sweeper, plan_id, by="cli")
    finally:
        sa.event.remove(any_db.engine, "after_cursor_execute", after_lock)
        writer.join(60)
        admin.dispose()
    assert seen.get("blocked") is True, seen
    assert writer_done and writer_done[0][0] == 0, writer_done  # it found the row removed
    assert decision.removed == 12, decision.message
    removed, entries = check_exact(any_db, reviewed)
    assert removed == set(reviewed)  # the row was unchanged when the removal locked it
    assert len(entries) == 12
    now = snapshot(any_db)
    if kind == "update":
        assert target not in now
    elif kind == "reinsert":  # the new row under the old key came after the removal: it stays
        assert now[target]["name"] == f"again{reviewed[target]['lxc_id']}"
    else:
        assert now[target + 100_000]["status"] == "deploying"
    record("approval_race", db=any_db.kind, case=f"{kind}@apply-lock", waited=True)


# --- a writer that never stops -----------------------------------------------------------------------


def write_while_approving(
    platform: Platform,
    sim: Any,
    plan: list[tuple[int, str, float]],
    reviewed: dict[int, dict[str, Any]],
    done: list[tuple[int, str, int]],
    errors: list[BaseException],
) -> None:
    """The busy platform: each hot row written once, at its moment (seconds from the start)."""
    started = time.monotonic()
    for key, kind, at in plan:
        time.sleep(max(0.0, at - (time.monotonic() - started)))
        try:
            counts = write_for(kind, platform, sim, key, reviewed[key])()
        except Exception as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
            return
        done.append((key, kind, counts[0]))


@pytest.mark.slow
def test_approvals_under_a_busy_platform_remove_only_unchanged_rows(sim, any_db, platform):
    """Four of twelve reviewed rows are written at random moments of the approval: before it
    reads, between its plan and its apply, or after (0-120 ms: an approval takes about that).
    A write that found its row (it changed it) means the row stays; a write that found it gone
    came after the removal."""
    rounds = scaled(4, 20)
    rng = random.Random(20261204)
    seen = {"kept": 0, "removed_first": 0, "seen_by_the_apply": 0}
    for n in range(rounds):
        ghosts = range(1000 + 20 * n, 1012 + 20 * n)
        runtime, plan_id, reviewed = build(sim, any_db, ghosts, CLEANUP_MAX_DELETE_PERCENT=10)
        hot = rng.sample(sorted(reviewed), 4)
        moments = sorted(
            ((key, rng.choice(["update", "update", "reinsert"]), rng.uniform(0.0, 0.12)) for key in hot),
            key=lambda item: item[2],
        )
        done: list[tuple[int, str, int]] = []
        errors: list[BaseException] = []
        thread = threading.Thread(target=write_while_approving, args=(platform, sim, moments, reviewed, done, errors))
        before = max((a["id"] for a in audit(any_db)), default=0)
        thread.start()
        try:
            decision = approval.approve(runtime.sweeper, plan_id, by="cli")
        finally:
            thread.join(60)
        assert errors == [] and len(done) == 4, (errors, done)
        assert decision.state is PlanState.APPROVED, decision.message
        removed, _ = check_exact(any_db, reviewed, before)
        assert set(reviewed) - set(hot) <= removed, decision.not_removed
        for key, kind, found in done:
            if found:  # the platform changed the row before any removal of it: it stays
                assert key not in removed, (key, kind, decision.message)
                seen["kept"] += 1
            else:  # the row was gone when the platform came: the approval removed it, unchanged
                assert key in removed, (key, kind, decision.message)
                seen["removed_first"] += 1
        assert {e["row_key"] for e in decision.not_removed} == set(reviewed) - removed
        seen["seen_by_the_apply"] += sum("since planning" in e["why"] for e in decision.not_removed)
        with any_db.engine.begin() as conn:  # the platform tidies up the rows it kept writing
            conn.execute(sa.text("DELETE FROM apps WHERE lxc_id >= 1000"))
    record("approval_race", db=any_db.kind, case="busy platform", rounds=rounds, **seen)
    print(f"\nbusy platform on {any_db.kind}: {rounds} approvals, hot rows {seen}")
    assert seen["kept"] > 0
