"""Approving a pending plan (receiver/approval.py): exactly the reviewed rows that still match
go, through the whole removal pipeline; every other reviewed row is named with the reason.

Against the simulator over HTTPS and real databases: approvals are a database behaviour
(the decision, the guarded apply, the audit), so they run on SQLite, PostgreSQL and MariaDB.
"""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import Database, after_read, table_vmids
from test_pending import GHOSTS, RUNNING, Clock, clocked_runtime, get, guard_world

from receiver import approval, holds, pending, store
from receiver.model import Outcome, Reason, Refusal, Verb
from receiver.outbox import EventType
from receiver.pending import PlanClosed, PlanNotFound, PlanState
from receiver.runtime import Runtime
from receiver.simulator.scene import app_row, create_apps_table
from receiver.timeutil import utcnow

MANY = tuple(range(200, 214))  # 14 ghosts beside 4 running apps: the guard trips


def audit(db: Database) -> list[dict[str, Any]]:
    with db.engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(store.audit).order_by(store.audit.c.vmid)).mappings()]


def keys_by_vmid(db: Database) -> dict[int, int]:
    with db.engine.connect() as conn:
        return {vmid: key for key, vmid in conn.execute(sa.text("SELECT id, lxc_id FROM apps"))}


def kept_plan(runtime: Runtime) -> int:
    result = runtime.sweeper.run()
    assert result.refusal == Refusal.GUARD and result.pending_id is not None, result.summary()
    return result.pending_id


def old(hours: float) -> Any:
    """A platform timestamp ``hours`` ago (naive UTC, whole seconds)."""
    return (utcnow() - timedelta(hours=hours)).replace(tzinfo=None, microsecond=0)


def last_run(db: Database) -> dict[str, Any]:
    with db.engine.connect() as conn:
        found = store.last_run(conn)
    assert found is not None
    return found


# --- what an approval removes ----------------------------------------------------------------


def test_an_approval_removes_exactly_the_reviewed_rows_that_still_match(sim, any_db):
    table = guard_world(sim, any_db, ghosts=MANY)
    clock = Clock()
    runtime = clocked_runtime(sim, any_db, clock)
    plan_id = kept_plan(runtime)
    key = keys_by_vmid(any_db)
    t = table.c

    # Between the review and the approval, the platform and the cluster move on.
    with any_db.engine.begin() as conn:
        conn.execute(table.update().where(t.lxc_id == 200).values(status="stopped"))
        conn.execute(table.update().where(t.lxc_id == 201).values(updated_at=old(20)))
        conn.execute(table.update().where(t.lxc_id == 202).values(hostname="renamed.apps.local"))
        conn.execute(table.update().where(t.lxc_id == 203).values(lxc_id=250))
        conn.execute(table.delete().where(t.lxc_id == 204))
        # Deleted and inserted again under the same key: a row the review never saw.
        conn.execute(table.delete().where(t.lxc_id == 212))
        conn.execute(
            table.insert(), [{**app_row(212, "running", age=timedelta(days=2)), "id": key[212], "name": "again212"}]
        )
        conn.execute(table.insert(), [app_row(260, "running", age=timedelta(days=3))])  # added after the review
    row_hold = holds.place(any_db.engine, "apps", now=clock.now, source="cli", row_key=str(key[205]), reason="keep")
    holds.place(any_db.engine, "apps", now=clock.now, source="cli", vmid=206)
    sim.add_guest(207, name="app207.apps.local")  # a guest with the VMID again
    sim.add_guest(209, name="hidden209")  # in use, but the token is not shown it
    sim.set_visible({*RUNNING, 207, 208})
    after_read(sim, 1, lambda: sim.add_guest(208))  # back between the planning and the confirming read

    decision = approval.approve(runtime.sweeper, plan_id, by="cli")

    assert decision.state is PlanState.APPROVED and not decision.refused, decision.message
    assert decision.removed == 3
    assert decision.message == (
        f"plan {plan_id} approved: 3 of 14 rows removed, 11 not (they no longer match what was reviewed)"
    )
    why = {entry["vmid"]: entry["why"] for entry in decision.not_removed}
    assert {entry["row_key"] for entry in decision.not_removed} == {key[v] for v in why}  # as typed
    assert why == {
        200: "changed since review: status",
        201: "changed since review: updated",
        202: "changed since review: hostname",
        203: "changed since review: vmid",
        204: "no longer planned (gone from the table, or kept: protected, young, unreadable)",
        205: "held",
        206: "held",
        207: "guest 207 exists now",
        208: "guest 208 came back before the removal",
        209: "VMID 209 is in use by a guest the token cannot see (hidden_guest)",
        212: "changed since review: created, updated",
    }
    assert sorted(r["vmid"] for r in audit(any_db)) == [210, 211, 213]
    assert {(r["source"], r["action"], r["reason"]) for r in audit(any_db)} == {("approval", "delete", "ghost")}
    assert table_vmids(any_db) == [*RUNNING, 200, 201, 202, 205, 206, 207, 208, 209, 212, 250, 260]
    plan = get(any_db, plan_id)
    assert (plan.state, plan.decided_by, plan.note, plan.decided_at) == (
        PlanState.APPROVED,
        "cli",
        decision.message,
        clock.now,
    )
    assert (last_run(any_db)["source"], last_run(any_db)["outcome"]) == ("approval", "done")
    with any_db.engine.connect() as conn:
        assert store.read_counters(conn)["ghost_apps_removed"] == 3
        assert holds.count(conn, "apps", clock.now) == 2  # an approval releases no hold
    assert row_hold.row_key == str(key[205])
    shown = decision.to_dict()
    assert shown["state"] == "approved" and shown["removed"] == 3 and shown["result"]["outcome"] == "done"
    json.dumps(shown, default=str)


def test_old_error_rows_are_approved_too_and_a_fixed_one_stays(sim, any_db):
    """Error rows of guests that exist (no confirming read): one is fixed after the review."""
    table = guard_world(sim, any_db, ghosts=())
    errors = tuple(range(300, 312))
    with any_db.engine.begin() as conn:
        conn.execute(table.insert(), [app_row(v, "error", age=timedelta(days=2)) for v in errors])
    for v in errors:
        sim.add_guest(v)
    runtime = clocked_runtime(sim, any_db, Clock())
    plan_id = kept_plan(runtime)
    with any_db.engine.begin() as conn:
        conn.execute(table.update().where(table.c.lxc_id == 300).values(status="running"))
    decision = approval.approve(runtime.sweeper, plan_id, by="http")
    assert decision.removed == 11, decision.message
    assert decision.not_removed == [{"row_key": keys_by_vmid(any_db)[300], "vmid": 300, "why": "guest 300 exists now"}]
    assert {(r["reason"], r["source"]) for r in audit(any_db)} == {("old_error", "approval")}
    assert get(any_db, plan_id).decided_by == "http"


def test_an_approval_whose_rows_all_changed_removes_nothing_and_is_decided(sim, sqlite_db):
    table = guard_world(sim, sqlite_db)
    runtime = clocked_runtime(sim, sqlite_db, Clock())
    plan_id = kept_plan(runtime)
    with sqlite_db.engine.begin() as conn:
        conn.execute(table.update().where(table.c.lxc_id.in_(GHOSTS)).values(status="deploying"))
    decision = approval.approve(runtime.sweeper, plan_id, by="cli")
    assert decision.result is not None and decision.result.outcome == Outcome.NOTHING
    assert (decision.state, decision.removed, len(decision.not_removed)) == (PlanState.APPROVED, 0, 12)
    assert (
        decision.message
        == f"plan {plan_id} approved: 0 of 12 rows removed, 12 not (they no longer match what was reviewed)"
    )
    assert get(sqlite_db, plan_id).state is PlanState.APPROVED
    assert audit(sqlite_db) == []


def test_an_action_changed_by_the_settings_since_review_is_not_carried_out(sim, sqlite_db):
    guard_world(sim, sqlite_db)
    plan_id = kept_plan(clocked_runtime(sim, sqlite_db, Clock()))
    marking = clocked_runtime(sim, sqlite_db, Clock(), CLEANUP_ACTION="mark", CLEANUP_STATUS_COLUMN="status")
    decision = approval.approve(marking.sweeper, plan_id, by="cli")
    assert decision.removed == 0
    assert {e["why"] for e in decision.not_removed} == {"now planned as mark (ghost), not delete (ghost)"}
    assert table_vmids(sqlite_db) == [*RUNNING, *GHOSTS] and audit(sqlite_db) == []


# --- decisions are made once ------------------------------------------------------------------


def test_a_plan_is_decided_once(sim, any_db):
    table = guard_world(sim, any_db)
    runtime = clocked_runtime(sim, any_db, Clock())
    first = kept_plan(runtime)
    assert approval.approve(runtime.sweeper, first, by="cli").removed == 12
    with pytest.raises(PlanClosed, match=f"pending plan {first} was already approved at"):
        approval.approve(runtime.sweeper, first, by="cli")
    with pytest.raises(PlanClosed, match="already approved"):
        approval.reject(runtime.sweeper, first, by="cli")
    assert len(audit(any_db)) == 12

    with any_db.engine.begin() as conn:
        conn.execute(table.insert(), [app_row(v, "running", age=timedelta(days=1)) for v in range(400, 412)])
    second = kept_plan(runtime)
    rejected = approval.reject(runtime.sweeper, second, by="cli", reason="  not these  ")
    assert (rejected.state, rejected.message, rejected.removed) == (
        PlanState.REJECTED,
        f"plan {second} rejected: nothing removed",
        0,
    )
    with pytest.raises(PlanClosed, match=f"pending plan {second} was already rejected at"):
        approval.approve(runtime.sweeper, second, by="cli")
    with pytest.raises(PlanClosed, match="already rejected"):
        approval.reject(runtime.sweeper, second, by="cli")
    plan = get(any_db, second)
    assert (plan.state, plan.note, plan.decided_by) == (PlanState.REJECTED, "not these", "cli")
    assert len(audit(any_db)) == 12 and len(table_vmids(any_db)) == 4 + 12


@pytest.mark.parametrize("plan_id", [0, 7, 2**63])
def test_an_unknown_plan_is_not_found(sim, sqlite_db, plan_id):
    guard_world(sim, sqlite_db)
    runtime = clocked_runtime(sim, sqlite_db, Clock())
    with pytest.raises(PlanNotFound):
        approval.approve(runtime.sweeper, plan_id, by="cli")
    with pytest.raises(PlanNotFound):
        approval.reject(runtime.sweeper, plan_id, by="cli")
    assert len(table_vmids(sqlite_db)) == 16


def test_a_rejection_without_a_reason_says_rejected(sim, sqlite_db):
    guard_world(sim, sqlite_db)
    runtime = clocked_runtime(sim, sqlite_db, Clock())
    plan_id = kept_plan(runtime)
    approval.reject(runtime.sweeper, plan_id, by="http", reason="   ")
    assert get(sqlite_db, plan_id).note == "rejected"


def test_two_approvals_at_once_remove_each_row_once(sim, any_db):
    guard_world(sim, any_db)
    runtime = clocked_runtime(sim, any_db, Clock())
    plan_id = kept_plan(runtime)
    outcomes: list[Any] = []
    start = threading.Barrier(2)

    def approve() -> None:
        start.wait()
        try:
            outcomes.append(approval.approve(runtime.sweeper, plan_id, by="cli"))
        except PlanClosed as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=approve) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(outcomes) == 2
    decisions = [o for o in outcomes if isinstance(o, approval.Decision)]
    assert sorted(d.removed for d in decisions)[-1] == 12
    for late in decisions:
        if late.removed == 0:  # it passed the open check too, and found the rows gone
            assert "already approved" in late.message, late.message
    assert sorted(r["vmid"] for r in audit(any_db)) == list(GHOSTS)
    assert get(any_db, plan_id).state is PlanState.APPROVED


# --- when Proxmox cannot be read at approval time ----------------------------------------------


@pytest.mark.parametrize(
    ("fault", "at", "words", "refusal"),
    [
        ("http500", 0, "inventory unreadable", Refusal.INVENTORY),
        ("quorum", 0, "not quorate", Refusal.NO_QUORUM),
        ("http500", 1, "confirming inventory read failed", Refusal.INVENTORY),
    ],
    ids=["api-fault", "no-quorum", "fault-at-confirming-read"],
)
def test_an_unreadable_proxmox_leaves_the_plan_pending_and_a_later_approval_works(
    sim, any_db, fault, at, words, refusal
):
    guard_world(sim, any_db)
    clock = Clock()
    runtime = clocked_runtime(sim, any_db, clock)
    plan_id = kept_plan(runtime)

    def break_it() -> None:
        if fault == "quorum":
            sim.set_quorate(False)
        else:
            sim.set_fault(fault)

    if at:  # the planning read answers; right before the confirming read, Proxmox stops answering
        hideable = runtime.inventory.hideable_vmids

        def hideable_then_break() -> Any:
            try:
                return hideable()
            finally:
                runtime.inventory.hideable_vmids = hideable  # type: ignore[method-assign]  # once
                break_it()

        runtime.inventory.hideable_vmids = hideable_then_break  # type: ignore[method-assign]
    else:
        break_it()
    refused = approval.approve(runtime.sweeper, plan_id, by="cli")
    assert refused.state is PlanState.PENDING and refused.refused, refused.message
    assert refused.result is not None and refused.result.refusal == refusal
    assert refused.message.startswith(f"plan {plan_id} is still pending: refused ("), refused.message
    assert words in refused.message
    assert refused.removed == 0 and refused.not_removed == []
    assert len(table_vmids(any_db)) == 16 and audit(any_db) == []
    plan = get(any_db, plan_id)
    assert (plan.state, plan.decided_at, plan.note) == (PlanState.PENDING, None, None)

    sim.set_fault(None)
    sim.set_quorate(True)
    clock.now += timedelta(minutes=10)
    later = approval.approve(runtime.sweeper, plan_id, by="cli")
    assert (later.state, later.removed) == (PlanState.APPROVED, 12), later.message
    assert table_vmids(any_db) == list(RUNNING)


def test_a_database_failure_in_the_apply_leaves_the_plan_pending(sim, sqlite_db):
    guard_world(sim, sqlite_db)
    runtime = clocked_runtime(sim, sqlite_db, Clock())
    plan_id = kept_plan(runtime)
    with sqlite_db.engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TRIGGER no_audit BEFORE INSERT ON janitor_audit BEGIN SELECT RAISE(ABORT, 'audit refused'); END"
        )
    refused = approval.approve(runtime.sweeper, plan_id, by="cli")
    assert refused.state is PlanState.PENDING and refused.refused, refused.message
    assert refused.result is not None and refused.result.outcome == Outcome.FAILED
    assert get(sqlite_db, plan_id).state is PlanState.PENDING
    assert len(table_vmids(sqlite_db)) == 16
    with sqlite_db.engine.begin() as conn:
        conn.exec_driver_sql("DROP TRIGGER no_audit")
    assert approval.approve(runtime.sweeper, plan_id, by="cli").removed == 12


# --- what an approval tells the webhooks -----------------------------------------------------


def test_the_approval_and_its_removals_are_sent_as_events(sim, sqlite_db):
    guard_world(sim, sqlite_db)
    runtime = clocked_runtime(
        sim,
        sqlite_db,
        Clock(),
        CLEANUP_WEBHOOK_URLS="https://127.0.0.1:9/hooks",
        CLEANUP_WEBHOOK_SECRET="approval-webhook-secret-0123456789",
    )
    plan_id = kept_plan(runtime)
    sim.add_guest(200)
    decision = approval.approve(runtime.sweeper, plan_id, by="cli")
    assert decision.removed == 11
    with sqlite_db.engine.connect() as conn:
        bodies = conn.execute(sa.select(store.outbox.c.events).order_by(store.outbox.c.id)).scalars().all()
    events = [e for body in bodies for e in json.loads(body)]
    kinds = [e["type"] for e in events]
    assert kinds.count(str(EventType.PLAN_PENDING)) == 1
    assert kinds.count(str(EventType.ROW_REMOVED)) == 11
    [approved] = [e for e in events if e["type"] == str(EventType.PLAN_APPROVED)]
    assert approved["subject"] == f"pending/{plan_id}"
    assert approved["data"]["plan_id"] == plan_id and approved["data"]["removed"] == 11
    assert [n["vmid"] for n in approved["data"]["not_removed"]] == [200]
    removed = [e["data"] for e in events if e["type"] == str(EventType.ROW_REMOVED)]
    assert {(d["plan_id"], d["source"]) for d in removed} == {(plan_id, "approval")}
    assert kinds.index(str(EventType.PLAN_APPROVED)) > max(
        i for i, k in enumerate(kinds) if k == str(EventType.ROW_REMOVED)
    )


def test_reviewed_rows_round_trip_every_mapped_value(sim, any_db):
    """What narrow() compares: the rows kept with the plan read back equal to the rows as read now."""
    guard_world(sim, any_db)
    runtime = clocked_runtime(sim, any_db, Clock())
    plan_id = kept_plan(runtime)
    now_rows = {str(r.key): r for r in runtime.table.fetch_rows() if r.vmid in GHOSTS}
    with any_db.engine.connect() as conn:
        kept = {str(r.row.key): r for r in pending.reviewed_rows(conn, plan_id)}
    assert {k: r.row for k, r in kept.items()} == now_rows
    assert {(r.action, r.reason) for r in kept.values()} == {(Verb.DELETE, Reason.GHOST)}


# --- a plan belongs to its table -------------------------------------------------------------


def test_a_plan_of_another_table_is_not_found(sim, sqlite_db):
    guard_world(sim, sqlite_db)
    copy = create_apps_table(sqlite_db.engine, "apps_staging")  # a copy of the table, row for row
    with sqlite_db.engine.begin() as conn:
        conn.exec_driver_sql(f"INSERT INTO {copy.name} SELECT * FROM apps")
    plan_id = kept_plan(clocked_runtime(sim, sqlite_db, Clock()))
    staging = clocked_runtime(sim, sqlite_db, Clock(), CLEANUP_TABLE="apps_staging")
    try:
        with pytest.raises(PlanNotFound):
            approval.approve(staging.sweeper, plan_id, by="cli")
    finally:
        assert len(table_vmids(sqlite_db, "apps_staging")) == 16, "rows of the other table were removed"
