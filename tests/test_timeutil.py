"""Time in one place: aware UTC, the table values the planner must read, and ages for people."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from receiver.timeutil import EPOCH_MS_ABOVE, age_text, isoformat, parse_timestamp, parse_timestamp_strict, utcnow

UTC = timezone.utc
NOON = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def test_utcnow_is_aware_utc_and_now():
    before = datetime.now(UTC)
    now = utcnow()
    assert now.tzinfo is not None and now.utcoffset() == timedelta(0)
    assert before <= now <= datetime.now(UTC)


@pytest.mark.parametrize(
    "then, text",
    [
        (NOON, "0 s"),
        (NOON - timedelta(seconds=40), "40 s"),
        (NOON - timedelta(seconds=119), "119 s"),  # a unit is used from two of it on
        (NOON - timedelta(minutes=2), "2 min"),
        (NOON - timedelta(minutes=12, seconds=59), "12 min"),
        (NOON - timedelta(minutes=119), "119 min"),
        (NOON - timedelta(hours=2), "2 h"),
        (NOON - timedelta(hours=36), "36 h"),
        (NOON - timedelta(hours=47, minutes=59), "47 h"),
        (NOON - timedelta(days=2), "2 d"),
        (NOON - timedelta(days=3, hours=23), "3 d"),
        (NOON - timedelta(days=400), "400 d"),
        (NOON + timedelta(minutes=5), "0 s"),  # a clock a little ahead never reads as negative
        (None, "no timestamp"),
    ],
)
def test_age_text(then, text):
    assert age_text(NOON, then) == text


def test_age_text_compares_instants_not_wall_clocks():
    two_hours_ago_in_paris = (NOON - timedelta(hours=2)).astimezone(timezone(timedelta(hours=2)))
    assert age_text(NOON, two_hours_ago_in_paris) == "2 h"


@given(st.integers(min_value=0, max_value=10 * 365 * 86400))
def test_age_text_never_says_more_than_it_was(seconds):
    number, unit = age_text(NOON, NOON - timedelta(seconds=seconds)).split()
    size = {"s": 1, "min": 60, "h": 3600, "d": 86400}[unit]
    assert int(number) * size <= seconds < (int(number) + 1) * size
    assert int(number) >= 2 or unit == "s"


@pytest.mark.parametrize(
    "value, expected",
    [
        (datetime(2024, 5, 1, 12, 0), NOON),  # naive: read as UTC
        (datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2))), NOON),
        (date(2024, 5, 1), datetime(2024, 5, 1, tzinfo=UTC)),
        (NOON.timestamp(), NOON),
        (int(NOON.timestamp()), NOON),
        (int(NOON.timestamp()) * 1000, NOON),  # epoch milliseconds
        (Decimal(int(NOON.timestamp())), NOON),
        ("2024-05-01 12:00:00", NOON),
        ("2024-05-01T12:00:00Z", NOON),
        ("2024-05-01T14:00:00+02:00", NOON),
        (f" {int(NOON.timestamp())} ", NOON),  # epoch seconds as text
        (b"2024-05-01T12:00:00", NOON),
        (None, None),
        ("", None),
        ("   ", None),
    ],
)
def test_parse_timestamp_strict_reads_what_orms_write(value, expected):
    parsed = parse_timestamp_strict(value)
    assert parsed == expected
    assert parsed is None or parsed.tzinfo is not None  # never naive
    assert parse_timestamp(value) == expected


@pytest.mark.parametrize(
    "value, message",
    [
        ("yesterday", "is not ISO 8601 or epoch seconds"),
        ("2024-13-01", "is not ISO 8601 or epoch seconds"),
        (True, "of type bool cannot be read"),  # a bool is not epoch seconds
        ([2024, 5, 1], "of type list cannot be read"),
        (1e300, "is out of range"),
        ("1e300", "is out of range"),
        (float("nan"), "is out of range"),
    ],
)
def test_parse_timestamp_strict_raises_for_what_cannot_be_read(value, message):
    with pytest.raises(ValueError, match=message):
        parse_timestamp_strict(value)
    assert parse_timestamp(value) is None  # the tolerant reader says "no value" instead


def test_epoch_seconds_and_milliseconds_are_told_apart_at_the_threshold():
    below = parse_timestamp_strict(EPOCH_MS_ABOVE - 1)
    above = parse_timestamp_strict(EPOCH_MS_ABOVE)
    assert below is not None and below.year > 5000  # still seconds
    assert above == datetime.fromtimestamp(EPOCH_MS_ABOVE / 1000, UTC)


def test_isoformat_is_utc_and_none_stays_none():
    assert isoformat(NOON.astimezone(timezone(timedelta(hours=-5)))) == "2024-05-01T12:00:00+00:00"
    assert isoformat(None) is None
