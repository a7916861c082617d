"""Time in one place: timezone-aware UTC, tolerant parsing of table values, ages for people.

Platform tables hold timestamps in whatever their ORM wrote: aware or naive
datetimes, dates, ISO strings (with a space or a ``T``, with or without
``Z``), or epoch seconds or milliseconds.  Naive values are read as UTC.  NULL
is ``None`` (the planner reads it as "old"); a value that cannot be read is an
error for :func:`parse_timestamp_strict` (the planner then keeps the row).
"""

from __future__ import annotations

from datetime import date, datetime, timezone
from decimal import Decimal


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


EPOCH_MS_ABOVE = 100_000_000_000  # later than year 5138 in seconds: must be milliseconds


def parse_timestamp(value: object) -> datetime | None:
    """A table value as an aware UTC datetime; None for NULL and for what cannot be read."""
    try:
        return parse_timestamp_strict(value)
    except ValueError:
        return None


def parse_timestamp_strict(value: object) -> datetime | None:
    """Like parse_timestamp, but a non-NULL value that cannot be read raises ValueError.

    The planner treats such a row as unreadable (kept and reported), never as old.
    """
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=timezone.utc)
    if isinstance(value, (int, float, Decimal)) and not isinstance(value, bool):
        seconds = float(value)
        if abs(seconds) >= EPOCH_MS_ABOVE:
            seconds /= 1000.0
        try:
            return datetime.fromtimestamp(seconds, timezone.utc)
        except (OverflowError, OSError, ValueError):
            raise ValueError(f"timestamp {value!r} is out of range") from None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        if text.endswith("Z"):
            text = text[:-1] + "+00:00"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                raise ValueError(f"timestamp {value!r} is not ISO 8601 or epoch seconds") from None
            return parse_timestamp_strict(number)
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
    raise ValueError(f"timestamp of type {type(value).__name__} cannot be read")


def isoformat(value: datetime | None) -> str | None:
    return value.astimezone(timezone.utc).isoformat() if value else None


def age_text(now: datetime, then: datetime | None) -> str:
    """How long before ``now`` ``then`` was, for people: "3 d", "5 h", "12 min", "40 s".

    A unit is used from two of it on ("36 h", not "1 d"), so the number says enough; a
    ``then`` in the future reads as "0 s", None as "no timestamp".  The plan's reasons
    (kept in the audit table) and the CLI's AGE column both use it.
    """
    if then is None:
        return "no timestamp"
    seconds = max(0, int((now - then).total_seconds()))
    if seconds >= 2 * 86400:
        return f"{seconds // 86400} d"
    if seconds >= 2 * 3600:
        return f"{seconds // 3600} h"
    if seconds >= 120:
        return f"{seconds // 60} min"
    return f"{seconds} s"
