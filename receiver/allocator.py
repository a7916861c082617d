"""The allocator: a VMID free in Proxmox and in the platform table, optionally a hostname and
ports, reserved for a while so that no other allocation hands them out.

Proxmox reserves nothing: ``/cluster/nextid`` says what is free at the moment it answers, so
two deployments that ask at once both get the same VMID, and one of them fails.  Here an
allocation chooses values, confirms the VMID with Proxmox, and reserves all of them in
``janitor_reserved_values`` (:mod:`receiver.reservations`), whose primary key (table, kind,
value) is the UNIQUE constraint.  Why it is built this way:

- **The database decides, in one transaction.**  Reserving is one transaction that deletes
  the stale reservations it found (expired, or ended because their row appeared: their
  values free up) and inserts the reservation with its values.  Two allocations that chose
  the same value cannot both commit: the second meets the primary key (IntegrityError), or a
  lock conflict with the first, and chooses again.  That holds for allocations in one
  receiver and in several sharing the database, on SQLite, PostgreSQL and MariaDB alike, with
  no lock held while Proxmox is asked.  A lock instead (a lease row, an advisory lock) would
  make every allocation wait for the one before it, Proxmox's answer included, and
  advisory locks exist on two of the three databases only.
- **Bounded retries, spread out.**  The first choice is the lowest free value.  After a
  conflict the choice is random among the first few free values (8, 16, 32, then 64), so a
  crowd of allocations that all chose the same lowest value spreads out in a few rounds
  instead of colliding once per member.  After :data:`MAX_TRIES` conflicts the answer is
  "contention, try again" (HTTP 503); a range with no free value left is a conflict of the
  request with the state (HTTP 409), as is a hostname in use.
- **Fail closed.**  The guest list is read (completely and surely, as a sweep reads it)
  before anything is chosen, and the chosen VMID is confirmed with
  ``/cluster/nextid?vmid=N`` (:meth:`ProxmoxInventory.vmid_in_use`), which also sees guests
  an ACL hides from the token.  Any failure of either: nothing is reserved, HTTP 503.
- **Cheap on a large table.**  The lowest free values come from the database by an indexed
  scan from the range's low end that stops at the first gaps (``LEAD()`` over the column's
  order, :func:`free_numbers`), not by loading the table's VMIDs into Python; only the
  reserved values (a few) and the guest list are held in memory.
- **One guest-list read for a crowd.**  Allocations that arrive while a read is running wait
  for the next read and share it (:class:`FreshInventory`): every allocation still sees a
  list read after it arrived, and a burst of allocations costs Proxmox a read or two, not
  one each.

What stays racy, and how the platform closes it, is in docs/allocator.md: a guest created
outside the platform between the allocation and the platform's create call can take the
VMID; the platform creates the guest with the allocated VMID at once, and on Proxmox's
"already exists" allocates again.
"""

from __future__ import annotations

import logging
import math
import random
import re
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import reservations
from .model import Inventory, InventoryError
from .reservations import HOSTNAME, VMID, Reservation

if TYPE_CHECKING:  # types only: no import at run time
    from .config import Settings
    from .inventory import ProxmoxInventory
    from .table import PlatformTable

logger = logging.getLogger(__name__)

MAX_TRIES = 20  # conflicts with other allocations before "contention, try again"
MAX_PROBES = 32  # /cluster/nextid checks per allocation (VMIDs taken by guests the token cannot see)
WINDOW_START, WINDOW_MAX = 8, 64  # after a conflict: choose among the first N free values
MAX_PORTS = 32  # ports per column in one allocation
MAX_SUFFIX = 99  # hostname, hostname-2 ... hostname-99
GAP_PAGE = 256  # gaps read per statement
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")

# Why an allocation reserved nothing -> HTTP status.
STATUS = {
    "invalid": 400,
    "hostname_taken": 409,
    "vmid_range_exhausted": 409,
    "port_range_exhausted": 409,
    "contention": 503,
    "proxmox": 503,
}


class Refused(Exception):
    """Nothing was reserved; ``kind`` (a key of :data:`STATUS`) says why, the message in words."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind

    @property
    def status(self) -> int:
        return STATUS[self.kind]


@dataclass(frozen=True)
class Request:
    """What a caller asks for: always a VMID; a hostname (``suffix``: the first free of name,
    name-2, name-3 ...); ports per column; a label kept with the reservation."""

    hostname: str | None = None
    suffix: bool = False
    ports: int | Mapping[str, int] = field(default_factory=dict)  # see port_counts
    label: str | None = None
    source: str = "http"


def normal_hostname(text: str) -> str:
    """A DNS name (RFC 1123 labels, at most 253 characters), in lower case: DNS names are
    case-insensitive, so ``Web`` and ``web`` are one reservation."""
    name = text.strip().lower()
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise Refused(
            "invalid",
            f"hostname {text[:80]!r} is not a DNS name (letters, digits and '-', dot-separated labels "
            "of at most 63 characters, 253 in all)",
        )
    return name


def port_counts(settings: Settings, spec: int | Mapping[str, int] | None) -> dict[str, int]:
    """How many ports of each column: a count (every column of ``CLEANUP_ALLOCATOR_PORTS``
    gets that many) or a mapping column -> count (only the columns named)."""
    if spec is None:
        return {}
    ranges = {column for column, _, _ in settings.allocator_ports}
    if isinstance(spec, Mapping):
        counts = dict(spec)
        unknown = sorted(set(counts) - ranges)
        if unknown:
            raise Refused(
                "invalid",
                f"no port range for {', '.join(map(repr, unknown))}: CLEANUP_ALLOCATOR_PORTS has "
                f"{', '.join(sorted(ranges)) or 'none'}",
            )
    else:
        if spec and not ranges:
            raise Refused("invalid", "ports asked for, but CLEANUP_ALLOCATOR_PORTS names no port range")
        counts = {column: spec for column in ranges}
    for column, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_PORTS:
            raise Refused("invalid", f"ports: the count for {column} must be a whole number 0-{MAX_PORTS}")
    return {column: n for column, n in counts.items() if n}


def with_suffix(name: str, n: int) -> str:
    """``web.apps.local`` -> ``web-2.apps.local``: the suffix goes on the first label."""
    first, dot, rest = name.partition(".")
    return f"{first}-{n}{dot}{rest}"


# --- the guest list, read after the caller arrived ---------------------------------------


class FreshInventory:
    """Guest lists read after the caller arrived; one read shared by every caller waiting for it.

    A caller that arrives while a read is running cannot use it (it may have been answered
    before the caller arrived), so it waits for that read to end and for the next one, which
    it shares with everyone who arrived in the meantime: at most two reads' time, and one
    read per crowd, however large.
    """

    def __init__(self, read: Callable[[], Inventory]):
        self._read = read
        self._cond = threading.Condition()
        self._reading = False
        self._last: tuple[float, Inventory | None, InventoryError | None] | None = None
        self.reads = 0

    def get(self) -> Inventory:
        arrived = time.monotonic()
        with self._cond:
            while True:
                last = self._last
                if last is not None and last[0] >= arrived:
                    _, inventory, failure = last
                    if failure is not None:
                        raise InventoryError(failure.kind, str(failure))
                    assert inventory is not None
                    return inventory
                if not self._reading:
                    self._reading = True
                    started = time.monotonic()
                    break
                self._cond.wait()
        result: tuple[float, Inventory | None, InventoryError | None] | None = None
        try:
            inventory = self._read()
            result = (started, inventory, None)
            return inventory
        except InventoryError as exc:
            result = (started, None, exc)
            raise
        finally:
            with self._cond:
                self.reads += 1
                if result is not None:
                    self._last = result
                self._reading = False
                self._cond.notify_all()


# --- free values in a column -----------------------------------------------------------


class _Skip:
    """Membership in any of several sets, without copying them into one."""

    def __init__(self, *sets: Collection[int]):
        self.sets = sets

    def __contains__(self, value: object) -> bool:
        return any(value in s for s in self.sets)


def _whole(value: Any) -> int | None:
    try:
        text = str(value).strip()
        return int(text) if text.isascii() and text.isdigit() else None
    except (TypeError, ValueError):
        return None


def free_numbers(
    conn: Connection, column: sa.Column, low: int, high: int, skip: Collection[int] | _Skip, want: int
) -> list[int]:
    """Up to ``want`` numbers of ``low..high``, lowest first, that no row holds in ``column`` and
    ``skip`` does not hold; fewer when the range runs out.

    A numeric column is scanned in the database from ``low``, by its order (its index), and
    the scan stops at the gaps that give enough numbers: one ``MIN`` and one ``LEAD()`` query
    per :data:`GAP_PAGE` gaps.  A text column (its order is not the numbers') is read whole.
    """
    found: list[int] = []

    def take(first: int, last: int) -> bool:
        n = max(first, low)
        while n <= min(last, high) and len(found) < want:
            if n not in skip:
                found.append(n)
            n += 1
        return len(found) >= want

    if want <= 0:
        return found
    if not isinstance(column.type, (sa.Integer, sa.Numeric)):
        used = {n for n in (_whole(v) for v in conn.execute(sa.select(column).distinct()).scalars()) if n is not None}
        _take_around(used, low, high, take)
        return found
    first = conn.execute(sa.select(sa.func.min(column)).where(column >= low, column <= high)).scalar()
    if first is None:
        take(low, high)
        return found
    if take(low, math.ceil(first) - 1):
        return found
    cursor = first
    while True:
        ordered = (
            sa.select(column.label("v"), sa.func.lead(column).over(order_by=column).label("nxt"))
            .where(column >= cursor, column <= high)
            .subquery()
        )
        gaps = conn.execute(
            sa.select(ordered.c.v, ordered.c.nxt)
            .where(sa.or_(ordered.c.nxt.is_(None), ordered.c.nxt > ordered.c.v + 1))
            .order_by(ordered.c.v)
            .limit(GAP_PAGE)
        ).all()
        for v, nxt in gaps:
            if take(math.floor(v) + 1, high if nxt is None else math.ceil(nxt) - 1) or nxt is None:
                return found
        if not gaps:
            return found
        cursor = gaps[-1][1]


def _take_around(used: set[int], low: int, high: int, take: Callable[[int, int], bool]) -> None:
    """``take`` each run of numbers of ``low..high`` between the ``used`` ones, lowest first."""
    start = low
    for n in sorted(u for u in used if low <= u <= high):
        if n > start and take(start, n - 1):
            return
        start = max(start, n + 1)
    take(start, high)


def _pick(free: list[int], n: int, window: int) -> list[int]:
    """``n`` of ``free`` (ascending): the lowest ones, or after a conflict, ``n`` at random among
    the first ``window`` (so that allocations which chose alike spread out)."""
    if window <= 1 or len(free) <= n:
        return free[:n]
    return sorted(random.sample(free[: max(window, n)], n))


# --- the allocator ---------------------------------------------------------------------


@dataclass
class _Choice:
    vmids: list[int]  # in the order to try them
    hostname: str | None
    ports: dict[str, list[int]]
    stale: list[int]


class Allocator:
    """Allocations on the platform table of ``settings``; one per process, shared by threads."""

    def __init__(
        self,
        settings: Settings,
        table: PlatformTable,
        inventory: ProxmoxInventory,
        clock: Callable[[], datetime],
    ):
        self.settings = settings
        self.table = table
        self.inventory = inventory
        self.clock = clock
        self.guests = FreshInventory(inventory.read)
        self._lock = threading.Lock()
        self.conflicts = 0  # allocations' transactions that met another's values (for the benchmark)
        self.probes = 0  # /cluster/nextid checks made

    def allocate(self, request: Request) -> Reservation:
        """Reserve a VMID (and what ``request`` asks for besides); Refused when nothing was reserved."""
        hostname = normal_hostname(request.hostname) if request.hostname is not None else None
        ports = port_counts(self.settings, request.ports)
        try:
            inventory = self.guests.get()
        except InventoryError as exc:
            raise Refused("proxmox", f"the guest list could not be read ({exc}); nothing was reserved") from None
        guests = frozenset(inventory.guests)
        names = frozenset(g.name.lower() for g in inventory.guests.values() if g.name)
        taken: set[int] = set()  # VMIDs Proxmox said are in use (guests the token cannot see)
        probes = 0
        for attempt in range(MAX_TRIES):
            window = 1 if attempt == 0 else min(WINDOW_START << (attempt - 1), WINDOW_MAX)
            now = self.clock().replace(microsecond=0)  # every database keeps whole seconds
            vmid = None
            while vmid is None:
                choice = self._choose(now, hostname, request.suffix, ports, guests, names, taken, window)
                if not choice.vmids:
                    low, high = self.settings.allocator_vmids
                    raise Refused(
                        "vmid_range_exhausted",
                        f"no free VMID in CLEANUP_ALLOCATOR_VMIDS={low}-{high}: every one is used by a row, "
                        "a guest or a reservation",
                    )
                for candidate in choice.vmids:
                    if probes >= MAX_PROBES:
                        raise Refused(
                            "contention",
                            f"Proxmox said the {probes} VMIDs checked are in use (guests this token cannot "
                            "see?); nothing was reserved, try again",
                        )
                    probes += 1
                    if self._free_in_proxmox(candidate):
                        vmid = candidate
                        break
                    taken.add(candidate)
            values = [(VMID, str(vmid))]
            if choice.hostname is not None:
                values.append((HOSTNAME, choice.hostname))
            values.extend((column, str(port)) for column, chosen in choice.ports.items() for port in chosen)
            try:
                reservation = reservations.reserve(
                    self.table.engine,
                    self.settings.table,
                    now=now,
                    expires_at=now + timedelta(minutes=self.settings.reservation_minutes),
                    source=request.source,
                    label=request.label,
                    values=values,
                    stale=choice.stale,
                )
            except reservations.Taken as exc:
                with self._lock:
                    self.conflicts += 1
                logger.debug("allocation: a value was taken meanwhile (%s), choosing again", exc)
                continue
            with self._lock:
                self.probes += probes
            logger.info("allocated %s until %s (%s)", reservation.describe(), reservation.expires_at, request.source)
            return reservation
        raise Refused("contention", f"{MAX_TRIES} tries met other allocations' values; nothing was reserved, try again")

    def _free_in_proxmox(self, vmid: int) -> bool:
        try:
            return not self.inventory.vmid_in_use(vmid)
        except InventoryError as exc:
            raise Refused(
                "proxmox", f"Proxmox could not confirm that VMID {vmid} is free ({exc}); nothing was reserved"
            ) from None

    def _choose(
        self,
        now: datetime,
        hostname: str | None,
        suffix: bool,
        ports: dict[str, int],
        guests: frozenset[int],
        names: frozenset[str],
        taken: set[int],
        window: int,
    ) -> _Choice:
        """The values to try, from one read of the reservations and the platform table."""
        table_name = self.settings.table
        with self.table.engine.connect() as conn:
            held = reservations.held_values(conn, table_name, now)
            ended = reservations.ended_ids(conn, self.table, held)
            if ended:  # their values are free (their VMID and hostname are a row's now)
                gone = set(ended)
                held = {k: {v: r for v, r in vs.items() if r not in gone} for k, vs in held.items()}
            stale = reservations.expired_ids(conn, table_name, now) + ended
            chosen_name = self._hostname(conn, hostname, suffix, names, held.get(HOSTNAME, {}), window)
            chosen_ports = {}
            for column, low, high in self.settings.allocator_ports:
                n = ports.get(column, 0)
                if not n:
                    continue
                skip = {p for p in (_whole(v) for v in held.get(column, {})) if p is not None}
                free = free_numbers(conn, self.table.table.c[column], low, high, skip, max(window, n))
                if len(free) < n:
                    raise Refused(
                        "port_range_exhausted",
                        f"{column}: {len(free)} of the {n} ports asked for are free in {low}-{high} "
                        "(the others are used by rows or reserved)",
                    )
                chosen_ports[column] = _pick(free, n, window)
            reserved = {v for v in (_whole(x) for x in held.get(VMID, {})) if v is not None}
            low, high = self.settings.allocator_vmids
            free = free_numbers(conn, self.table.vmid, low, high, _Skip(guests, reserved, taken), max(window, 8))
        if window > 1 and len(free) > 1:
            first = random.choice(free[:window])
            free = [first] + [v for v in free if v != first]
        return _Choice(free, chosen_name, chosen_ports, stale)

    def _hostname(
        self,
        conn: Connection,
        name: str | None,
        suffix: bool,
        guest_names: frozenset[str],
        held: Mapping[str, int],
        window: int,
    ) -> str | None:
        """``name`` if it is free (no row, guest or reservation has it); with ``suffix`` the first
        free of name-2, name-3 ... (after a conflict, one of the first few free); else Refused
        (``hostname_taken``) saying who has it."""
        if name is None:
            return None
        candidates = [name]
        if suffix:
            candidates += [c for c in (with_suffix(name, k) for k in range(2, MAX_SUFFIX + 1)) if len(c) <= 253]
            candidates = [c for c in candidates if len(c.split(".", 1)[0]) <= 63]
        column_name = self.settings.hostname_column
        in_rows: set[str] = set()
        if column_name:
            column = self.table.table.c[column_name]
            in_rows = {str(v).lower() for v in conn.execute(sa.select(column).where(column.in_(candidates))).scalars()}
        free = [c for c in candidates if c not in in_rows and c not in guest_names and c not in held]
        if free:
            return free[0] if window <= 1 else random.choice(free[:window])
        if suffix:
            raise Refused("hostname_taken", f"hostname {name!r} and its suffixes -2 to -{MAX_SUFFIX} are all taken")
        if name in in_rows:
            who = f"a row of {self.settings.table!r}"
        elif name in guest_names:
            who = "a guest in Proxmox"
        else:
            who = f"reservation {held[name]}"
        raise Refused("hostname_taken", f"hostname {name!r} is taken by {who} (ask with suffix to get {name}-2 ...)")
