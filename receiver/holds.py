"""Holds: rows and VMIDs that pve-janitor never removes, until released or until a time.

A hold names one row (by its key) or a VMID (every row that carries it), in one platform
table.  The planner keeps a held row and reports it (``held``); the apply step checks the
holds again inside its own transaction, so a hold placed while a removal was planning still
keeps its row.  ``restore`` places one on the row it puts back, so the next sweep does not
remove it again while its guest is still gone.

This module is the only one that writes ``janitor_holds``, and the one that cleans it
(:func:`prune`: holds whose time has passed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from . import store
from .db import write_transaction
from .model import VMID_MAX, VMID_MIN, Holds
from .timeutil import isoformat, parse_timestamp_strict

MAX_REASON = 2000
# The latest end a hold may have: every database stores it, and "until released" says the rest.
LATEST = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc)
_DURATION = re.compile(r"([0-9]{1,6})\s*([mhdw])")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class HoldError(ValueError):
    """A hold cannot be placed as asked (the message says why); nothing was changed."""


@dataclass(frozen=True)
class Hold:
    id: int
    table: str
    vmid: int | None
    row_key: str | None
    until: datetime | None
    reason: str | None
    source: str
    created_at: datetime

    def describe(self) -> str:
        """How plans and logs name it: ``hold 7 until 2026-12-04T10:00:00+00:00: restored``."""
        text = f"hold {self.id}"
        if self.until is not None:
            text += f" until {isoformat(self.until)}"
        return text + (f": {self.reason}" if self.reason else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "table": self.table,
            "vmid": self.vmid,
            "row_key": self.row_key,
            "until": isoformat(self.until),
            "reason": self.reason,
            "source": self.source,
            "created_at": isoformat(self.created_at),
        }


def parse_until(text: str, now: datetime) -> datetime:
    """``--until``: a duration (``30m``, ``12h``, ``7d``, ``2w``) or an ISO 8601 time (UTC when
    it names no zone); HoldError unless it is in the future."""
    raw = text.strip()
    match = _DURATION.fullmatch(raw.lower())
    until: datetime | None
    try:
        if match:
            until = now + timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
        else:
            until = parse_timestamp_strict(raw)
            if until is not None:
                until = until.astimezone(timezone.utc)  # as stored; past year 9999 it overflows here
    except ValueError:
        until = None
    except OverflowError:  # beyond year 9999
        raise HoldError(f"--until {raw!r} is beyond {LATEST:%Y-%m-%d}: omit --until to hold until released") from None
    if until is None:
        raise HoldError(f"--until {raw!r} is neither a duration (30m, 12h, 7d, 2w) nor an ISO 8601 time")
    if until <= now:
        raise HoldError(f"--until {raw!r} is not in the future")
    if until > LATEST:
        raise HoldError(f"--until {raw!r} is beyond {LATEST:%Y-%m-%d}: omit --until to hold until released")
    return until


def _in_force(now: datetime) -> sa.ColumnElement[bool]:
    h = store.holds
    return sa.or_(h.c.until.is_(None), h.c.until > now)


def _hold(row: Any) -> Hold:
    return Hold(row.id, row.table_name, row.vmid, row.row_key, row.until, row.reason, row.source, row.created_at)


def active(conn: Connection, table_name: str, now: datetime) -> Holds:
    """The holds in force on ``table_name`` now, as the planner and the apply step read them."""
    keys: dict[str, str] = {}
    vmids: dict[int, str] = {}
    h = store.holds
    for row in conn.execute(sa.select(h).where(h.c.table_name == table_name, _in_force(now)).order_by(h.c.id)):
        hold = _hold(row)
        if hold.row_key is not None:
            keys.setdefault(hold.row_key, hold.describe())
        elif hold.vmid is not None:
            vmids.setdefault(hold.vmid, hold.describe())
    return Holds(keys, vmids)


def listing(conn: Connection, table_name: str, now: datetime) -> list[Hold]:
    """The holds in force, oldest first."""
    h = store.holds
    rows = conn.execute(sa.select(h).where(h.c.table_name == table_name, _in_force(now)).order_by(h.c.id))
    return [_hold(r) for r in rows]


def count(conn: Connection, table_name: str, now: datetime) -> int:
    h = store.holds
    return int(
        conn.execute(
            sa.select(sa.func.count()).select_from(h).where(h.c.table_name == table_name, _in_force(now))
        ).scalar_one()
    )


def place_in(
    conn: Connection,
    table_name: str,
    *,
    now: datetime,
    source: str,
    vmid: int | None = None,
    row_key: str | None = None,
    until: datetime | None = None,
    reason: str | None = None,
) -> Hold:
    """Place a hold in the caller's transaction (``restore`` places one with the row it puts back)."""
    if (vmid is None) == (row_key is None):
        raise HoldError("a hold names either a VMID or a row key")
    if vmid is not None and not VMID_MIN <= vmid <= VMID_MAX:
        raise HoldError(f"VMID {vmid} is outside Proxmox's range {VMID_MIN}-{VMID_MAX}")
    if row_key is not None and not 0 < len(row_key) <= 255:
        raise HoldError("a row key is 1 to 255 characters")
    if until is not None and until <= now:
        raise HoldError("the hold's end is not in the future")
    if until is not None and until > LATEST:
        raise HoldError(f"the hold's end is beyond {LATEST:%Y-%m-%d}")
    reason = (reason or "").strip()[:MAX_REASON] or None
    values = {
        "table_name": table_name,
        "vmid": vmid,
        "row_key": row_key,
        "until": until,
        "reason": reason,
        "source": source,
        "created_at": now,
    }
    hold_id = conn.execute(store.holds.insert().values(values)).inserted_primary_key[0]  # type: ignore[index]
    # Read back: the database keeps its own precision (MariaDB: whole seconds), and the answer
    # should show what a later read shows.
    return _hold(conn.execute(sa.select(store.holds).where(store.holds.c.id == hold_id)).one())


def place(engine: Engine, table_name: str, **kwargs: Any) -> Hold:
    """Place a hold in a transaction of its own (``pve-janitor hold``, ``POST .../holds``)."""
    with write_transaction(engine) as conn:
        return place_in(conn, table_name, **kwargs)


def release(
    engine: Engine,
    table_name: str,
    *,
    hold_id: int | None = None,
    vmid: int | None = None,
    row_key: str | None = None,
) -> list[Hold]:
    """Release the hold ``hold_id``, or every hold on ``vmid`` or ``row_key``; returns those released."""
    h = store.holds
    where = [h.c.table_name == table_name]
    if hold_id is not None:
        if not 0 < hold_id < 2**63:
            return []
        where.append(h.c.id == sa.literal(hold_id, sa.BigInteger))
    elif vmid is not None:
        if not VMID_MIN <= vmid <= VMID_MAX:
            return []  # no hold names it (place_in refuses it)
        where.append(h.c.vmid == vmid)
    elif row_key is not None:
        where.append(h.c.row_key == row_key)
    else:
        raise HoldError("release names a hold id, a VMID or a row key")
    with write_transaction(engine) as conn:
        found = [_hold(r) for r in conn.execute(sa.select(h).where(*where).order_by(h.c.id))]
        if found:
            conn.execute(h.delete().where(h.c.id.in_([x.id for x in found])))
    return found


def prune(conn: Connection, now: datetime) -> int:
    """Drop holds whose time has passed; returns how many."""
    h = store.holds
    return conn.execute(h.delete().where(h.c.until.is_not(None), h.c.until <= now)).rowcount
