"""The plain data every layer shares (receiver/model.py)."""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta, timezone

import msgspec
import pytest

from receiver.model import (
    Action,
    Finding,
    Guest,
    Inventory,
    InventoryError,
    Outcome,
    Plan,
    Reason,
    Refusal,
    Report,
    Row,
    Verb,
)

UTC = timezone.utc
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
WORDS = [member for enum in (Reason, Verb, Finding, Outcome, Refusal) for member in enum]


@pytest.mark.parametrize("member", WORDS, ids=str)
def test_every_enum_member_is_its_word(member):
    word = member.value
    assert member == word and word == member
    assert str(member) == word
    assert f"{member}" == word and "%s" % member == word
    assert json.dumps({"k": member}) == json.dumps({"k": word})
    assert msgspec.json.encode(member) == msgspec.json.encode(word)
    assert hash(member) == hash(word)  # usable as the word in sets and dict keys
    assert type(member)(word) is member


@pytest.mark.parametrize(
    "enum, words",
    [
        (Reason, {"ghost", "old_error"}),
        (Verb, {"delete", "mark"}),
        (Outcome, {"done", "nothing", "dry_run", "refused", "disabled", "failed"}),
        (
            Refusal,
            {"inventory", "privilege", "no_quorum", "empty_inventory", "guard", "would_empty", "database", "lease"},
        ),
    ],
)
def test_the_words_of_the_public_contract(enum, words):
    assert {m.value for m in enum} == words


@pytest.mark.parametrize(
    "created, updated, expected",
    [
        (None, None, None),
        (T0, None, T0),
        (None, T0, T0),
        (T0, T0 + timedelta(hours=1), T0 + timedelta(hours=1)),
        (T0 + timedelta(hours=1), T0, T0 + timedelta(hours=1)),
        (datetime(2024, 5, 1, 12, 0), None, T0),  # naive: read as UTC
        (datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2))), None, T0),
        ("2024-05-01 12:00:00", "2024-05-01T11:00:00Z", T0),
        (date(2024, 5, 1), None, datetime(2024, 5, 1, tzinfo=UTC)),
        (1714564800, None, T0),
        (1714564800000, None, T0),  # epoch milliseconds
        ("", None, None),
    ],
)
def test_last_touched_is_the_later_timestamp_timezone_aware(created, updated, expected):
    touched = Row(1, 101, raw_created=created, raw_updated=updated).last_touched()
    assert touched == expected
    if touched is not None:
        assert touched.tzinfo is not None


@pytest.mark.parametrize(
    "created, updated, column",
    [
        ("yesterday", T0, "created_at"),
        (T0, "not a time", "updated_at"),
        (T0, object(), "updated_at"),
    ],
)
def test_last_touched_names_the_column_it_cannot_read(created, updated, column):
    with pytest.raises(ValueError, match=rf"^{column}: "):
        Row(1, 101, raw_created=created, raw_updated=updated).last_touched()


def test_last_touched_names_the_mapped_columns():
    with pytest.raises(ValueError, match="^made: "):
        Row(1, 101, raw_created="garbage").last_touched(created_column="made", updated_column="changed")


def test_a_row_is_its_values():
    row = Row(1, 101, "app.local", "error")
    assert row == Row(1, 101, "app.local", "error", None, None, None, None, None)
    assert (row.key, row.vmid, row.unreadable) == (1, 101, None)


def guest(vmid: int, **fields) -> Guest:
    return Guest(vmid=vmid, node=fields.pop("node", "pve1"), type=fields.pop("type", "lxc"), **fields)


def test_inventory_of_guests_by_vmid():
    inv = Inventory.of([guest(101), guest(102, node="pve2", type="qemu")], read_at=T0)
    assert 101 in inv and 102 in inv
    assert 103 not in inv and "101" not in inv and None not in inv
    found = inv.get(102)
    assert found is not None and found.node == "pve2"
    assert inv.get(103) is None
    assert inv.read_at == T0
    assert sorted(inv.guests) == [101, 102]


def test_an_inventory_is_stamped_with_the_time_it_was_read():
    before = datetime.now(UTC)
    inv = Inventory.of([])
    assert before <= inv.read_at <= datetime.now(UTC)
    assert inv.read_at.tzinfo is not None
    assert 101 not in inv and inv.guests == {}


def test_guests_decode_from_the_api_answer_skipping_other_keys():
    answer = (
        b'[{"vmid": 101, "node": "pve1", "type": "lxc", "status": "running", "name": "a", "maxmem": 1,'
        b' "template": 1}, {"vmid": 9000, "node": "pve2", "type": "qemu"}]'
    )
    first, second = msgspec.json.decode(answer, type=list[Guest])
    assert first == Guest(101, "pve1", "lxc", "running", "a", 1)
    assert (second.status, second.name, second.template, second.lock) == ("unknown", None, 0, None)


@pytest.mark.parametrize(
    "entry",
    [
        b'{"vmid": "101", "node": "pve1", "type": "lxc"}',
        b'{"node": "pve1", "type": "lxc"}',
        b'{"vmid": 101, "node": null, "type": "lxc"}',
    ],
)
def test_a_guest_entry_of_the_wrong_shape_is_refused(entry):
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(entry, type=Guest)


def test_inventory_error_carries_its_kind_and_message():
    exc = InventoryError("timeout", "pve1:8006 did not answer within 5 s")
    assert exc.kind == "timeout"
    assert str(exc) == "pve1:8006 did not answer within 5 s"


def test_plan_count_counts_actions_by_reason():
    def action(key, reason):
        return Action(Row(key, 100 + key), Verb.DELETE, reason, "")

    plan = Plan(
        (action(1, Reason.GHOST), action(2, Reason.OLD_ERROR), action(3, Reason.GHOST)),
        (Report(Finding.UNMANAGED_GUEST, 106, "no row"),),
        rows_seen=5,
    )
    assert plan.count(Reason.GHOST) == 2
    assert plan.count(Reason.OLD_ERROR) == 1
    assert plan.count("ghost") == 2  # type: ignore[arg-type]  # on purpose: the word works as well as the enum
    assert Plan((), (), 0).count(Reason.GHOST) == 0
    assert plan.kept == {}
