"""The fail-closed rules every removal obeys (receiver/safety.py)."""

from __future__ import annotations

import pytest

from receiver.config import Settings
from receiver.model import Guest, Inventory, InventoryError, Refusal, Row
from receiver.safety import (
    GUARD_MIN_ROWS,
    LIFTED_BY_FORCE,
    Refused,
    check_listing,
    check_plan_size,
    guard_tripped,
    hidden_guests,
    refusal_for,
    vmid_column_problem,
)

HALF = Settings(max_delete_percent=50)


def inventory(*vmids: int) -> Inventory:
    return Inventory.of([Guest(v, "pve1", "lxc") for v in vmids])


@pytest.mark.parametrize("guests, rows", [((101,), 5), ((101,), 0), ((), 0)])
def test_listing_with_guests_or_an_empty_table_goes_on(guests, rows):
    check_listing(inventory(*guests), rows)


def test_an_empty_listing_while_the_table_has_rows_is_refused():
    with pytest.raises(Refused) as caught:
        check_listing(inventory(), 47)
    assert caught.value.refusal is Refusal.EMPTY_INVENTORY
    assert "47 rows" in str(caught.value) and "VM.Audit" in str(caught.value)


@pytest.mark.parametrize(
    "would_go, total, percent, tripped",
    [
        (GUARD_MIN_ROWS, GUARD_MIN_ROWS, 50, False),  # never for 10 rows or fewer, whatever the share
        (GUARD_MIN_ROWS, 11, 1, False),
        (GUARD_MIN_ROWS + 1, 22, 50, False),  # exactly 50 %: not more than allowed
        (GUARD_MIN_ROWS + 1, 21, 50, True),
        (12, 22, 50, True),
        (11, 1000, 1, True),  # 1.1 % > 1 %
        (11, 1100, 1, False),
        (11, 11, 100, False),
        (0, 0, 50, False),
    ],
)
def test_guard_tripped_thresholds(would_go, total, percent, tripped):
    assert guard_tripped(would_go, total, Settings(max_delete_percent=percent)) is tripped


@pytest.mark.parametrize(
    "would_go, total, force, refusal",
    [
        (0, 0, False, None),
        (0, 47, False, None),
        (5, 47, False, None),
        (41, 47, False, Refusal.GUARD),
        (41, 47, True, None),
        (47, 47, False, Refusal.WOULD_EMPTY),
        (1, 1, False, Refusal.WOULD_EMPTY),  # whatever its size
        (3, 2, False, Refusal.WOULD_EMPTY),
        (47, 47, True, None),
        (1, 1, True, None),
    ],
)
def test_check_plan_size(would_go, total, force, refusal):
    if refusal is None:
        check_plan_size(would_go, total, HALF, force)
        return
    with pytest.raises(Refused) as caught:
        check_plan_size(would_go, total, HALF, force)
    assert caught.value.refusal is refusal
    assert "--force" in str(caught.value)
    assert refusal in LIFTED_BY_FORCE


def test_the_guard_refusal_names_the_setting_and_the_counts():
    with pytest.raises(Refused, match=r"41 of 47 rows would go, more than CLEANUP_MAX_DELETE_PERCENT=50%"):
        check_plan_size(41, 47, HALF, force=False)


def test_only_the_size_rules_are_lifted_by_force():
    assert LIFTED_BY_FORCE == {Refusal.GUARD, Refusal.WOULD_EMPTY}


@pytest.mark.parametrize(
    "kind, refusal",
    [
        ("privilege", Refusal.PRIVILEGE),
        ("no_quorum", Refusal.NO_QUORUM),
        ("unreachable", Refusal.INVENTORY),
        ("timeout", Refusal.INVENTORY),
        ("http", Refusal.INVENTORY),
        ("auth", Refusal.INVENTORY),
        ("tls", Refusal.INVENTORY),
        ("malformed", Refusal.INVENTORY),
        ("something new", Refusal.INVENTORY),
    ],
)
def test_refusal_for_an_unreadable_inventory(kind, refusal):
    assert refusal_for(InventoryError(kind, "message")) is refusal


class Asked:
    """A vmid_in_use that answers from a set and records what it was asked."""

    def __init__(self, in_use: set[int]):
        self.in_use = in_use
        self.asked: list[int] = []

    def __call__(self, vmid: int) -> bool:
        self.asked.append(vmid)
        return vmid in self.in_use


def test_hidden_guests_without_an_acl_proof_asks_about_every_ghost_once():
    asked = Asked({130, 120})
    assert hidden_guests([130, 120, 125, 130], None, asked) == [120, 130]
    assert asked.asked == [120, 125, 130]


def test_hidden_guests_asks_only_about_what_an_acl_could_hide():
    asked = Asked({120, 125})
    assert hidden_guests([120, 125, 130], frozenset({125, 999}), asked) == [125]
    assert asked.asked == [125]


def test_hidden_guests_with_nothing_hideable_asks_nothing():
    asked = Asked({120})
    assert hidden_guests([120], frozenset(), asked) == []
    assert asked.asked == []


def test_hidden_guests_passes_an_unanswerable_check_on():
    def unanswerable(vmid):
        raise InventoryError("timeout", "no answer")

    with pytest.raises(InventoryError):
        hidden_guests([120], None, unanswerable)


def rows(*vmids, unreadable: int = 0) -> list[Row]:
    out = [Row(i, v) for i, v in enumerate(vmids)]
    out += [Row(f"u{i}", None, unreadable="VMID 'x' is not a whole number") for i in range(unreadable)]
    return out


@pytest.mark.parametrize(
    "table, problem",
    [
        (rows(), None),
        (rows(None, None), None),  # no values at all: nothing to judge
        (rows(101, 102, 103), None),
        (rows(101, 102, unreadable=2), None),  # half unreadable: not most
        (rows(101, unreadable=2), "2 of 3 values are not VMIDs"),
        (rows(unreadable=1), "1 of 1 values are not VMIDs"),
        (rows(101, 101, 102, 103), None),  # half share a VMID: not most
        (rows(101, 101, 101, 102), "3 of 4 rows share their VMID"),
        (rows(101, 101, None, None), "2 of 2 rows share their VMID"),
    ],
)
def test_vmid_column_problem(table, problem):
    found = vmid_column_problem(table)
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert found.startswith(problem)
        assert "CLEANUP_VMID_COLUMN" in found


def test_refused_carries_its_reason_and_message():
    exc = Refused(Refusal.DATABASE, "cannot read table 'apps'")
    assert exc.refusal == "database"
    assert str(exc) == "cannot read table 'apps'"
