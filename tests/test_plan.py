"""The planner: a table of cases, and hypothesis properties."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from receiver.config import Settings
from receiver.model import Guest, Inventory, Reason, Row
from receiver.plan import make_plan

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)
DEFAULT = Settings()


def row(key=1, vmid=200, status="running", age=timedelta(days=2), updated_age=None, hostname=None):
    created = None if age is None else NOW - age
    updated = created if updated_age is None else (None if updated_age == "null" else NOW - updated_age)
    return Row(
        key=key, vmid=vmid, hostname=hostname, status=status, raw_created=created, raw_updated=updated, raw_vmid=vmid
    )


def inv(*vmids, status="running", **kw):
    return Inventory.of(
        [
            Guest(
                v, "pve1", "lxc", status, name=kw.get("name"), template=kw.get("template", False), lock=kw.get("lock")
            )
            for v in vmids
        ],
        NOW,
    )


CASES = [
    # (id, row, inventory, settings overrides, expected reason or None)
    ("present guest kept", row(vmid=100), inv(100), {}, None),
    ("missing guest, old: ghost", row(vmid=200), inv(100), {}, Reason.GHOST),
    ("NULL vmid, old: ghost", row(vmid=None), inv(100), {}, Reason.GHOST),
    ("missing guest, young: kept", row(vmid=200, age=timedelta(minutes=5)), inv(100), {}, None),
    ("created old but updated 5 min ago: kept", row(vmid=200, updated_age=timedelta(minutes=5)), inv(100), {}, None),
    ("exactly at grace edge is old", row(vmid=200, age=timedelta(minutes=15)), inv(100), {}, Reason.GHOST),
    ("NULL timestamps count as old", row(vmid=200, age=None), inv(100), {}, Reason.GHOST),
    ("protected status kept", row(vmid=200, status="deploying"), inv(100), {}, None),
    ("protected status is case-insensitive", row(vmid=200, status="Provisioning"), inv(100), {}, None),
    ("ghost cleanup disabled keeps ghost", row(vmid=200), inv(100), {"ghost_cleanup_enabled": False}, None),
    (
        "old error, guest exists: old_error",
        row(vmid=100, status="error", age=timedelta(hours=25)),
        inv(100),
        {},
        Reason.OLD_ERROR,
    ),
    ("young error, guest exists: kept", row(vmid=100, status="error", age=timedelta(hours=23)), inv(100), {}, None),
    ("old error, guest gone: ghost first", row(vmid=200, status="error"), inv(100), {}, Reason.GHOST),
    (
        "error ghost with ghost cleanup off: old_error",
        row(vmid=200, status="error"),
        inv(100),
        {"ghost_cleanup_enabled": False},
        Reason.OLD_ERROR,
    ),
    (
        "error with NULL updated_at is old",
        row(vmid=100, status="error", updated_age="null"),
        inv(100),
        {},
        Reason.OLD_ERROR,
    ),
    ("offline node guest (unknown) is present", row(vmid=100), inv(100, status="unknown"), {}, None),
    ("guest being destroyed (lock) is present", row(vmid=100), inv(100, lock="destroyed"), {}, None),
    ("already marked row not marked again", row(vmid=200, status="destroyed"), inv(100), {"action": "mark"}, None),
    ("mark action marks ghost", row(vmid=200), inv(100), {"action": "mark"}, Reason.GHOST),
    (
        "retention longer keeps error",
        row(vmid=100, status="error", age=timedelta(hours=30)),
        inv(100),
        {"error_retention_hours": 48},
        None,
    ),
]


@pytest.mark.parametrize("r, inventory, overrides, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan_cases(r, inventory, overrides, expected):
    plan = make_plan([r], inventory, NOW, replace(DEFAULT, **overrides))
    reasons = [a.reason for a in plan.actions]
    assert reasons == ([expected] if expected else [])
    if expected:
        assert plan.actions[0].action == overrides.get("action", "delete")


def test_old_error_says_guest_still_exists():
    plan = make_plan([row(vmid=100, status="error")], inv(100), NOW, DEFAULT)
    assert "still exists" in plan.actions[0].detail


def test_reports_unmanaged_guests_without_templates_and_name_mismatch():
    inventory = Inventory.of(
        [
            Guest(100, "pve1", "lxc", "running", name="web"),
            Guest(101, "pve1", "lxc", "running", name="orphan"),
            Guest(9000, "pve1", "lxc", "stopped", name="tmpl", template=True),
        ],
        NOW,
    )
    plan = make_plan([row(vmid=100, hostname="api")], inventory, NOW, DEFAULT)
    assert not plan.actions
    kinds = sorted((r.kind, r.vmid) for r in plan.reports)
    assert kinds == [("name_mismatch", 100), ("unmanaged_guest", 101)]


# --- properties --------------------------------------------------------------

statuses = st.sampled_from(["running", "stopped", "error", "deploying", "pending", "destroyed", "Error", None])
ages = st.one_of(st.none(), st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=5)))
rows_strategy = st.lists(
    st.builds(
        lambda vmid, status, age, upd: row(vmid=vmid, status=status, age=age, updated_age=upd),
        st.one_of(st.none(), st.integers(100, 130)),
        statuses,
        ages,
        st.one_of(st.none(), st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=5))),
    ),
    max_size=30,
).map(lambda rs: [r._replace(key=i) for i, r in enumerate(rs)])
inventories = st.sets(st.integers(100, 130), max_size=30).map(lambda s: inv(*s))
settings_strategy = st.builds(
    lambda action, grace, retention, ghosts: replace(
        DEFAULT, action=action, grace_minutes=grace, error_retention_hours=retention, ghost_cleanup_enabled=ghosts
    ),
    st.sampled_from(["delete", "mark"]),
    st.integers(0, 120),
    st.integers(1, 72),
    st.booleans(),
)


@hsettings(max_examples=300, deadline=None)
@given(rows_strategy, inventories, settings_strategy)
def test_present_vmid_is_never_a_ghost(rows, inventory, s):
    plan = make_plan(rows, inventory, NOW, s)
    for action in plan.actions:
        if action.reason == Reason.GHOST:
            assert action.row.vmid is None or action.row.vmid not in inventory


@hsettings(max_examples=300, deadline=None)
@given(rows_strategy, inventories, settings_strategy)
def test_protected_or_young_rows_are_never_touched(rows, inventory, s):
    plan = make_plan(rows, inventory, NOW, s)
    grace_start = NOW - timedelta(minutes=s.grace_minutes)
    for action in plan.actions:
        assert (action.row.status or "").lower() not in s.protected_statuses
        if action.reason == Reason.GHOST:
            touched = action.row.last_touched()
            assert touched is None or touched <= grace_start


def _applied(rows, plan, s):
    acted = {a.row.key for a in plan.actions}
    if s.action == "delete":
        return [r for r in rows if r.key not in acted]
    return [r._replace(status=s.mark_status) if r.key in acted else r for r in rows]


@hsettings(max_examples=300, deadline=None)
@given(rows_strategy, inventories, settings_strategy)
def test_planning_after_applying_yields_nothing(rows, inventory, s):
    plan = make_plan(rows, inventory, NOW, s)
    again = make_plan(_applied(rows, plan, s), inventory, NOW, s)
    assert again.actions == ()


@pytest.mark.parametrize(
    "r, inventory",
    [
        (row(vmid=200), inv(100)),  # missing guest: its age decides
        (row(vmid=100, status="error"), inv(100)),  # error status: its age decides
    ],
    ids=["ghost candidate", "error row"],
)
def test_unreadable_timestamp_that_would_decide_keeps_and_reports_the_row(r, inventory):
    r = r._replace(raw_updated="last tuesday")
    plan = make_plan([r], inventory, NOW, DEFAULT)
    assert plan.actions == () and plan.kept["unreadable"] == 1
    [report] = [x for x in plan.reports if x.kind == "unreadable_row"]
    assert report.vmid == r.vmid and "updated_at: timestamp 'last tuesday'" in report.detail


def test_rows_settled_by_their_guest_do_not_need_readable_timestamps():
    # The guest exists and the status is not an error: no timestamp can change that.
    r = row(vmid=100)._replace(raw_created="garbage", raw_updated=b"\xff")
    plan = make_plan([r], inv(100), NOW, DEFAULT)
    assert plan.actions == () and plan.kept == {**plan.kept, "present": 1, "unreadable": 0}
    assert [x.kind for x in plan.reports] == []


def test_fresh_error_row_with_null_updated_at_is_not_past_retention():
    r = row(vmid=100, status="error", age=timedelta(minutes=1), updated_age="null")
    assert make_plan([r], inv(100), NOW, DEFAULT).actions == ()


def test_unreadable_row_is_kept_and_reported():
    r = row(vmid=None)._replace(unreadable="VMID 'ct201' is not a whole number")
    plan = make_plan([r], inv(100), NOW, DEFAULT)
    assert plan.actions == () and plan.kept["unreadable"] == 1
    assert [x.kind for x in plan.reports if x.vmid is None] == ["unreadable_row"]
