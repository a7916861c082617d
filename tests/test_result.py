"""What one run of the removal pipeline did, in words (receiver/result.py)."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from datetime import datetime, timezone
from decimal import Decimal

import pytest

from receiver.model import Action, ApplyResult, Finding, Outcome, Plan, Reason, Refusal, Report, Row, Verb
from receiver.result import SweepResult, short_vmids

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


def action(key, vmid, reason=Reason.GHOST, verb=Verb.DELETE) -> Action:
    return Action(Row(key, vmid, f"app{vmid}.local", "error"), verb, reason, f"guest {vmid} is gone")


def full_result() -> SweepResult:
    actions = (action(1, 120), action(2, 121, Reason.OLD_ERROR, Verb.MARK), action(3, 122))
    plan = Plan(
        actions, (Report(Finding.UNMANAGED_GUEST, 106, "guest without a row"),), rows_seen=47, kept={"young": 2}
    )
    applied = ApplyResult(
        applied=list(actions[:2]),
        skipped=[(actions[2], "changed since planning")],
        counts=Counter({"ghost_apps_removed": 1, "total_removed": 2}),
    )
    return SweepResult(
        Outcome.DONE, plan=plan, applied=applied, dropped=[130], hidden=[140, 141], duration_s=1.23456, started_at=T0
    )


@pytest.mark.parametrize(
    "outcome, code",
    [
        (Outcome.DONE, 0),
        (Outcome.NOTHING, 0),
        (Outcome.DRY_RUN, 0),
        (Outcome.DISABLED, 0),
        (Outcome.REFUSED, 3),
        (Outcome.FAILED, 3),
    ],
)
def test_exit_code_per_outcome(outcome, code):
    assert SweepResult(outcome).exit_code == code


def test_every_outcome_has_an_exit_code():
    assert {SweepResult(o).exit_code for o in Outcome} == {0, 3}


def test_summary_of_a_bare_result():
    assert SweepResult(Outcome.NOTHING, duration_s=0.004).summary() == "sweep nothing: 0 planned, 0 applied (0.00 s)"


def test_summary_names_each_part_that_happened():
    assert full_result().summary() == (
        "sweep done: 3 planned, 2 applied, 1 skipped (changed since planning), 1 dropped (guest is back), "
        "2 kept (hidden_guest: VMIDs 140, 141) (1.23 s)"
    )


def test_summary_of_a_refusal_gives_its_word_and_reason():
    result = SweepResult(Outcome.REFUSED, reason="41 of 47 rows would go", refusal=Refusal.GUARD, duration_s=2)
    assert result.summary() == "sweep refused: 0 planned, 0 applied — refused (guard) — 41 of 47 rows would go (2.00 s)"


@pytest.mark.parametrize(
    "vmids, text",
    [
        ([], ""),
        ([101], "101"),
        (list(range(100, 110)), "100, 101, 102, 103, 104, 105, 106, 107, 108, 109"),
        (list(range(100, 113)), "100, 101, 102, 103, 104, 105, 106, 107, 108, 109 and 3 more"),
    ],
)
def test_short_vmids(vmids, text):
    assert short_vmids(vmids) == text


def test_to_dict_is_json_with_the_words_users_see():
    data = json.loads(json.dumps(full_result().to_dict()))
    assert data["outcome"] == "done"
    assert data["refusal"] is None
    assert data["started_at"] == "2024-05-01T12:00:00+00:00"
    assert data["duration_s"] == 1.235
    assert data["rows_seen"] == 47
    assert data["planned"][1] == {
        "action": "mark",
        "reason": "old_error",
        "row_id": 2,
        "vmid": 121,
        "hostname": "app121.local",
        "status": "error",
        "detail": "guest 121 is gone",
    }
    assert data["reports"] == [{"kind": "unmanaged_guest", "vmid": 106, "detail": "guest without a row"}]
    assert data["kept"] == {"young": 2}
    assert data["applied"] == 2
    assert data["skipped"] == [{"row_id": 3, "why": "changed since planning"}]
    assert (data["dropped_vmids"], data["hidden_guests"]) == ([130], [140, 141])
    assert data["counts"] == {"ghost_apps_removed": 1, "total_removed": 2}


def test_to_dict_of_a_refusal_without_a_plan():
    data = SweepResult(Outcome.REFUSED, reason="no quorum", refusal=Refusal.NO_QUORUM, dry_run=True).to_dict()
    assert json.loads(json.dumps(data)) == {
        "outcome": "refused",
        "reason": "no quorum",
        "refusal": "no_quorum",
        "dry_run": True,
        "started_at": None,
        "duration_s": 0.0,
        "rows_seen": None,
        "planned": [],
        "reports": [],
        "kept": {},
        "applied": 0,
        "skipped": [],
        "dropped_vmids": [],
        "hidden_guests": [],
        "pending_plan": None,
        "counts": {},
    }


@pytest.mark.parametrize(
    "key, shown",
    [
        (uuid.UUID("12345678-1234-5678-1234-567812345678"), "12345678-1234-5678-1234-567812345678"),
        (Decimal("42"), "42"),
        (b"k1", "b'k1'"),
        ("text-key", "text-key"),
        (7, 7),
    ],
)
def test_row_keys_of_any_column_type_serialise(key, shown):
    row = Row(key, 120, hostname=b"host", status="error")
    a = Action(row, Verb.DELETE, Reason.GHOST, "")
    result = SweepResult(Outcome.DONE, plan=Plan((a,), (), 1), applied=ApplyResult(skipped=[(a, "changed")]))
    data = json.loads(json.dumps(result.to_dict()))
    assert data["planned"][0]["row_id"] == shown
    assert data["skipped"][0]["row_id"] == shown
    assert data["planned"][0]["hostname"] == "b'host'"
