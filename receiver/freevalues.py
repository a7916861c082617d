"""Free numbers in a column of the platform table: the lowest VMIDs or ports that no row holds.

The allocator's reading of the table (:mod:`receiver.allocator`): an indexed scan from the low
end of a range that stops at the first gaps, not a load of the column into Python.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

GAP_PAGE = 256  # gaps read per statement


class Skip:
    """Membership in any of several sets, without copying them into one."""

    def __init__(self, *sets: Collection[int]):
        self.sets = sets

    def __contains__(self, value: object) -> bool:
        return any(value in s for s in self.sets)


def whole(value: Any) -> int | None:
    try:
        text = str(value).strip()
        return int(text) if text.isascii() and text.isdigit() else None
    except (TypeError, ValueError):
        return None


def free_numbers(
    conn: Connection, column: sa.Column, low: int, high: int, skip: Collection[int] | Skip, want: int
) -> list[int]:
    """Up to ``want`` numbers of ``low..high``, lowest first, that no row holds in ``column`` and
    ``skip`` does not hold; fewer when the range runs out (see :func:`scan_free`)."""
    return scan_free(conn, column, low, high, skip, want)[0]


def scan_free(
    conn: Connection, column: sa.Column, low: int, high: int, skip: Collection[int] | Skip, want: int
) -> tuple[list[int], int | None]:
    """:func:`free_numbers`, and the lowest number of ``low..high`` no row holds (``skip`` or
    not; None if the scan met none).

    A numeric column is scanned in the database from ``low``, in its order (its index), and
    the scan stops at the first gaps that give enough numbers: one query per :data:`GAP_PAGE`
    gaps, whose ``LAG()`` and ``LEAD()`` show each gap as the rows on either side of it (the
    range's start and end count as sides).  A text column (its order is not the numbers') is
    read whole.
    """
    found: list[int] = []
    unused: list[int] = []

    def take(first: Any, last: int) -> bool:
        n = max(math.ceil(first), low)
        if not unused and n <= min(last, high):
            unused.append(n)
        while n <= min(last, high) and len(found) < want:
            if n not in skip:
                found.append(n)
            n += 1
        return len(found) >= want

    def answer() -> tuple[list[int], int | None]:
        return found, (unused[0] if unused else None)

    if want <= 0:
        return answer()
    if not isinstance(column.type, (sa.Integer, sa.Numeric)):
        used = {n for n in (whole(v) for v in conn.execute(sa.select(column).distinct()).scalars()) if n is not None}
        _take_around(used, low, high, take)
        return answer()
    cursor: Any = low
    while True:
        ordered = (
            sa.select(
                column.label("v"),
                sa.func.lag(column).over(order_by=column).label("prev"),
                sa.func.lead(column).over(order_by=column).label("nxt"),
            )
            .where(column >= cursor, column <= high)
            .subquery()
        )
        sides = conn.execute(
            sa.select(ordered.c.v, ordered.c.prev, ordered.c.nxt)
            .where(sa.or_(ordered.c.prev.is_(None), ordered.c.nxt.is_(None), ordered.c.nxt > ordered.c.v + 1))
            .order_by(ordered.c.v)
            .limit(GAP_PAGE)
        ).all()
        if not sides:  # no row from the cursor to the range's end
            take(cursor, high)
            return answer()
        for v, prev, nxt in sides:
            if prev is None and take(cursor, math.ceil(v) - 1):  # before the first row
                return answer()
            if take(math.floor(v) + 1, high if nxt is None else math.ceil(nxt) - 1) or nxt is None:
                return answer()
        cursor = sides[-1][2]


def _take_around(used: set[int], low: int, high: int, take: Callable[[int, int], bool]) -> None:
    """``take`` each run of numbers of ``low..high`` between the ``used`` ones, lowest first."""
    start = low
    for n in sorted(u for u in used if low <= u <= high):
        if n > start and take(start, n - 1):
            return
        start = max(start, n + 1)
    take(start, high)
