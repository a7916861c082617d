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
- **A crowd is served as a group.**  In one receiver, allocations that arrive while another
  is being served wait, and are then served together (:meth:`Allocator.allocate`): one read
  of what is free, the lowest free VMIDs handed out in order of arrival and confirmed with
  Proxmox side by side (:data:`CONFIRMERS` at once), one transaction for all of them.  A
  burst of 100 costs a few reads and transactions, not 100 of each, and its members never
  meet one another in the database.  What a group cannot settle (two asking for one
  hostname, the last ports of a range, a transaction that met another receiver's values) is
  served one at a time after it, as below.
- **Bounded retries, spread out.**  The first choice is the lowest free value.  Allocations
  served alone choose around the claims of others (:class:`_Claims`); after a conflict with
  another receiver the choice is random among the first few free values (8, 16, 32, then
  64), so a crowd spreads out in a few rounds instead of colliding once per member.  After
  :data:`MAX_TRIES` conflicts the answer is "contention, try again" (HTTP 503); a range with
  no free value left is a conflict of the request with the state (HTTP 409), as is a
  hostname in use.
- **Fail closed.**  The guest list is read (completely and surely, as a sweep reads it)
  before anything is chosen, and the chosen VMID is confirmed with
  ``/cluster/nextid?vmid=N`` (:meth:`ProxmoxInventory.vmid_in_use`), which also sees guests
  an ACL hides from the token.  Any failure of either: nothing is reserved, HTTP 503.
- **Cheap on a large table.**  The lowest free values come from the database by an indexed
  scan from the range's low end that stops at the first gaps (``LAG()``/``LEAD()`` over the
  column's order, :func:`~receiver.freevalues.free_numbers`), not by loading the table's
  VMIDs into Python; only the reserved values (a few) and the guest list are held in memory.
  Within :data:`FLOOR_S` of a scan from the low end, the next ones start where it found the
  first value no row held (:meth:`Allocator._free`): 36 ms at 100,000 dense rows, 2 ms from
  there.
- **One guest-list read for a crowd.**  A guest list read at most :data:`GUEST_LIST_MAX_AGE`
  (2 s) before an allocation serves it, and allocations that arrive while a read is running
  wait for it and share it (:class:`FreshInventory`): a burst of allocations costs Proxmox a
  read or two, not one each.  The list only steers the choice (skip the guests that have no
  row, find a guest's name); the VMID itself is confirmed with Proxmox every time.

What stays racy, and how the platform closes it, is in docs/allocator.md: a guest created
outside the platform between the allocation and the platform's create call can take the
VMID; the platform creates the guest with the allocated VMID at once, and on Proxmox's
"already exists" allocates again.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import reservations
from .allocation import MAX_SUFFIX, Refused, Request, name_candidates, normal_hostname, port_counts
from .db import CHUNK, chunks
from .freevalues import Skip, scan_free, whole
from .model import Inventory, InventoryError
from .reservations import HOSTNAME, VMID, Reservation, Wanted

if TYPE_CHECKING:  # types only: no import at run time
    from .config import Settings
    from .inventory import ProxmoxInventory
    from .table import PlatformTable

logger = logging.getLogger(__name__)

MAX_TRIES = 20  # conflicts with other allocations before "contention, try again"
MAX_PROBES = 32  # /cluster/nextid checks per allocation (VMIDs taken by guests the token cannot see)
WINDOW_START, WINDOW_MAX = 8, 64  # after a conflict: choose among the first N free values
MAX_GROUP = 128  # allocations served together (one read, one transaction)
CONFIRMERS = 8  # /cluster/nextid requests of a group in flight at once
# A guest list read this long before an allocation serves it: it only steers the choice (the
# VMID is confirmed with /cluster/nextid), and a burst of allocations costs one read.
GUEST_LIST_MAX_AGE = 2.0
RECENT_S = 60.0  # see _Claims
FLOOR_S = 2.0  # see Allocator._free
# --- the guest list, read after the caller arrived ---------------------------------------


class FreshInventory:
    """Guest lists read at most ``max_age`` seconds before the caller arrived; one read shared by
    every caller waiting for it.

    A caller that finds no list recent enough waits for the read in progress (it may serve, if
    it started recently enough) or starts one, and everyone who arrives meanwhile shares it: a
    crowd of allocations costs Proxmox one read.  A failed read is passed to the callers that
    waited for it, and kept for no one else.
    """

    def __init__(self, read: Callable[[], Inventory], max_age: float = 0.0):
        self._read = read
        self.max_age = max_age
        self._cond = threading.Condition()
        self._reading = False
        # (started, ended, inventory, failure) of the last read that ended
        self._last: tuple[float, float, Inventory | None, InventoryError | None] | None = None
        self.reads = 0

    def get(self) -> Inventory:
        arrived = time.monotonic()
        with self._cond:
            while True:
                last = self._last
                if last is not None and last[0] >= arrived - self.max_age:
                    _, ended, inventory, failure = last
                    if failure is None:
                        assert inventory is not None
                        return inventory
                    if ended >= arrived:  # it failed while this caller waited for it
                        raise InventoryError(failure.kind, str(failure))
                if not self._reading:
                    self._reading = True
                    started = time.monotonic()
                    break
                self._cond.wait()
        result: tuple[float, float, Inventory | None, InventoryError | None] | None = None
        try:
            inventory = self._read()
            result = (started, time.monotonic(), inventory, None)
            return inventory
        except InventoryError as exc:
            result = (started, time.monotonic(), None, exc)
            raise
        finally:
            with self._cond:
                self.reads += 1
                if result is not None:
                    self._last = result
                self._reading = False
                self._cond.notify_all()


# --- the allocator ---------------------------------------------------------------------


@dataclass
class _Choice:
    """What one read found free, each list in the order to try it."""

    vmids: list[int]
    names: list[str] | None  # None: no hostname asked for
    ports: dict[str, tuple[int, list[int]]]  # column -> (how many, free ports)
    stale: list[int]


class _Claims:
    """Values this process's allocations are trying to reserve right now, or reserved since
    another one read the database.

    Allocations in one receiver choose around each other's claims, so a burst of them does
    not all want the lowest value and collide in the database (only other processes' choices
    are met there).  A claim is held from the choice to the end of the reserving transaction;
    a value reserved then stays in sight of the allocations that read the database before its
    commit (their read cannot show it) for :data:`RECENT_S` at most.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: set[tuple[str, str]] = set()
        self._commits = 0
        self._recent: dict[tuple[str, str], tuple[int, float]] = {}  # value -> (commit number, when)

    def seen(self) -> int:
        """To be taken just before reading the database: the commits that read will show."""
        with self._lock:
            return self._commits

    def take(self, kind: str, candidates: list[Any], n: int, seen: int) -> list[Any]:
        """The first ``n`` of ``candidates`` (fewer if not enough) that no one claims and that
        were not reserved here after ``seen``; claimed."""
        with self._lock:
            got = []
            for c in candidates:
                key = (kind, str(c))
                recent = self._recent.get(key)
                if key not in self._held and (recent is None or recent[0] <= seen):
                    got.append(c)
                    if len(got) == n:
                        break
            self._held.update((kind, str(c)) for c in got)
        return got

    def drop(self, kind: str, values: Collection[Any]) -> None:
        with self._lock:
            self._held.difference_update((kind, str(v)) for v in values)

    def committed(self, values: Collection[tuple[str, str]]) -> None:
        now = time.monotonic()
        with self._lock:
            self._commits += 1
            for key in values:
                self._recent[key] = (self._commits, now)
            if len(self._recent) > 64:
                self._recent = {k: v for k, v in self._recent.items() if now - v[1] < RECENT_S}


def _spread(free: list[Any], window: int) -> list[Any]:
    """``free`` with its first ``window`` entries in random order (after a conflict)."""
    if window <= 1 or len(free) < 2:
        return free
    head = free[:window]
    random.shuffle(head)
    return head + free[window:]


@dataclass(eq=False)
class _Ask:
    """One allocation waiting to be served, and what came of it (see :meth:`Allocator.allocate`)."""

    request: Request
    hostname: str | None
    ports: dict[str, int]
    wake: threading.Event = field(default_factory=threading.Event)  # done, or handed the lead
    done: bool = False
    reservation: Reservation | None = None
    failure: BaseException | None = None

    def finish(self, reservation: Reservation | None = None, failure: BaseException | None = None) -> None:
        self.reservation, self.failure, self.done = reservation, failure, True
        self.wake.set()


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
        self.guests = FreshInventory(inventory.read, GUEST_LIST_MAX_AGE)
        self._claims = _Claims()
        self._lock = threading.Lock()
        self._queue: list[_Ask] = []  # allocations waiting to be served, in order of arrival
        self._leading = False  # one of them serves a group; the others wait for it
        self._executor: ThreadPoolExecutor | None = None  # the /cluster/nextid confirmations of a group
        self._floors: dict[str, tuple[int, float]] = {}  # column -> (lowest free found, scan from low at)
        self._known: tuple[Inventory, frozenset[int], frozenset[str]] | None = None  # a list's VMIDs and names
        self.conflicts = 0  # reserving transactions that met another's values (for the benchmark)
        self.probes = 0  # /cluster/nextid checks made

    def allocate(self, request: Request) -> Reservation:
        """Reserve a VMID (and what ``request`` asks for besides); Refused when nothing was reserved.

        Allocations that arrive while another is being served wait for it and are then served
        together as a group (:meth:`_serve`): one read of what is free, the VMIDs confirmed
        with Proxmox side by side, one transaction.  The first to arrive leads; when its group
        is served it hands the lead to the first one waiting."""
        ask = _Ask(
            request,
            normal_hostname(request.hostname) if request.hostname is not None else None,
            port_counts(self.settings, request.ports),
        )
        with self._lock:
            self._queue.append(ask)
            lead = not self._leading
            self._leading = True
        try:
            if not lead:
                ask.wake.wait()
        except BaseException:  # this thread was interrupted while it waited: leave the queue
            self._withdraw(ask)
            raise
        if not ask.done:  # handed the lead: serve the first ones waiting (this one among them)
            try:
                with self._lock:
                    group = self._queue[:MAX_GROUP]
                    del self._queue[:MAX_GROUP]
                self._serve(group)
            finally:
                self._pass_lead()
        if ask.failure is not None:
            raise ask.failure
        assert ask.reservation is not None
        return ask.reservation

    def _pass_lead(self) -> None:
        """The lead goes to the first one waiting; with no one waiting, the next to come leads."""
        with self._lock:
            if self._queue:
                self._queue[0].wake.set()
            else:
                self._leading = False

    def _withdraw(self, ask: _Ask) -> None:
        """An ask whose thread stopped waiting leaves the queue; had it been handed the lead, the
        lead goes on, so the ones behind it are not left waiting for a thread that is gone.  (An
        ask already taken into a group is served with it, and its reservation expires unused.)"""
        with self._lock:
            if ask not in self._queue:
                return
            self._queue.remove(ask)
            handed = ask.wake.is_set() and not ask.done
        if handed:
            self._pass_lead()

    def _serve(self, group: list[_Ask]) -> None:
        """Serve every ask of ``group``: a reservation or a failure each, its thread woken as it
        is done.  A failure of the whole group goes to every ask not yet done."""
        try:
            try:
                inventory = self.guests.get()
            except InventoryError as exc:
                refused = Refused("proxmox", f"the guest list could not be read ({exc}); nothing was reserved")
                for ask in group:
                    ask.finish(failure=refused)
                return
            left = self._allocate_group(group, inventory) if len(group) > 1 else group
            arrival = {ask: n for n, ask in enumerate(group)}
            for ask in sorted(left, key=arrival.__getitem__):  # the first to come, the first served
                try:
                    ask.finish(self._allocate(ask.request, ask.hostname, ask.ports, inventory))
                except Exception as exc:  # noqa: BLE001 - handed to the ask's own thread, raised there
                    ask.finish(failure=exc)
        except BaseException as exc:  # every ask left gets it, raised in its own thread
            for ask in group:
                if not ask.done:
                    ask.finish(failure=exc)
            if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: this thread's too
                raise

    def _allocate_group(self, group: list[_Ask], inventory: Inventory) -> list[_Ask]:
        """Reserve for the asks of ``group`` in one transaction, from one read of what is free,
        in their order (the first gets the lowest VMID); returns the asks left to be served one
        at a time (:meth:`_allocate`): those whose values the group could not settle (a
        hostname or the last ports wanted by another of the group, VMIDs run out), or all of
        them when the transaction met another receiver's values."""
        guests, names = self._guest_sets(inventory)
        now = self.clock().replace(microsecond=0)  # every database keeps whole seconds
        wanted_ports: dict[str, int] = {}
        for ask in group:
            for column, n in ask.ports.items():
                wanted_ports[column] = wanted_ports.get(column, 0) + n
        asked_names = {ask: name_candidates(ask.hostname, ask.request.suffix) for ask in group if ask.hostname}
        # Groups are served one at a time, so no other allocation of this allocator chooses
        # meanwhile: no claims to take (:class:`_Claims` is for those served alone).
        with self.table.engine.connect() as conn:
            held, stale = self._held(conn, now)
            in_rows = self._names_in_rows(conn, {c for candidates in asked_names.values() for c in candidates})
            free_ports: dict[str, list[int]] = {}
            for column, low, high in self.settings.allocator_ports:
                if wanted_ports.get(column):
                    skip = {p for p in (whole(v) for v in held.get(column, {})) if p is not None}
                    free_ports[column] = self._free(
                        conn, self.table.table.c[column], low, high, skip, wanted_ports[column]
                    )
            reserved = {v for v in (whole(x) for x in held.get(VMID, {})) if v is not None}
            low, high = self.settings.allocator_vmids
            free_vmids = self._free(conn, self.table.vmid, low, high, Skip(guests, reserved), len(group) + 8)
        left: list[_Ask] = []
        planned: list[tuple[_Ask, list[tuple[str, str]]]] = []
        names_taken: set[str] = set()
        for ask in group:
            values: list[tuple[str, str]] = []
            if ask.hostname is not None:
                try:
                    free = self._pick_names(
                        ask.hostname, ask.request.suffix, asked_names[ask], in_rows, names, held.get(HOSTNAME, {})
                    )
                except Refused as exc:
                    ask.finish(failure=exc)
                    continue
                free = [c for c in free if c not in names_taken]
                if not free:
                    left.append(ask)  # another of the group has it: alone, it is told who
                    continue
                values.append((HOSTNAME, free[0]))
            if any(len(free_ports[column]) < n for column, n in ask.ports.items()):
                left.append(ask)  # alone, it reads again and is told if the range ran out
                continue
            for column, n in ask.ports.items():
                got, free_ports[column] = free_ports[column][:n], free_ports[column][n:]
                values.extend((column, str(port)) for port in got)
            names_taken.update(value for kind, value in values if kind == HOSTNAME)
            planned.append((ask, values))
        vmids = self._confirm(free_vmids, len(planned))
        left += [ask for ask, _ in planned[len(vmids) :]]
        planned = [(ask, [(VMID, str(vmid)), *values]) for (ask, values), vmid in zip(planned, vmids, strict=False)]
        if not planned:
            return left
        try:
            made = reservations.reserve_many(
                self.table.engine,
                self.settings.table,
                now=now,
                expires_at=now + timedelta(minutes=self.settings.reservation_minutes),
                wanted=[Wanted(ask.request.source, ask.request.label, values) for ask, values in planned],
                stale=stale,
            )
        except reservations.Taken as exc:
            with self._lock:
                self.conflicts += 1
            logger.debug("allocation: a group of %d met another's values (%s), one by one", len(planned), exc)
            return left + [ask for ask, _ in planned]
        for (ask, _), reservation in zip(planned, made, strict=True):
            logger.info(
                "allocated %s until %s (%s)", reservation.describe(), reservation.expires_at, ask.request.source
            )
            ask.finish(reservation)
        return left

    def _confirm(self, candidates: list[int], n: int) -> list[int]:
        """Up to ``n`` of ``candidates``, in order, that Proxmox says are free
        (``/cluster/nextid?vmid=N``), asked side by side; a VMID in use (a guest the token
        cannot see) is passed over for the next candidate, within :data:`MAX_PROBES` such.
        Refused (``proxmox``) when Proxmox could not answer."""
        confirmed: list[int] = []
        rest = list(candidates)
        passed_over = 0
        while len(confirmed) < n and rest and passed_over <= MAX_PROBES:
            batch, rest = rest[: n - len(confirmed)], rest[n - len(confirmed) :]
            with self._lock:
                self.probes += len(batch)
            answers = list(self._pool().map(self._free_in_proxmox, batch))
            confirmed += [vmid for vmid, free in zip(batch, answers, strict=True) if free]
            passed_over += answers.count(False)
        return confirmed  # in candidate order, at most n: each batch asks only for what is missing

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(CONFIRMERS, thread_name_prefix="pve-janitor-nextid")
            return self._executor

    def _guest_sets(self, inventory: Inventory) -> tuple[frozenset[int], frozenset[str]]:
        """The list's VMIDs and names (lower case), made once per list read, not per allocation."""
        with self._lock:
            known = self._known
        if known is None or known[0] is not inventory:
            names = frozenset(g.name.lower() for g in inventory.guests.values() if g.name)
            known = (inventory, frozenset(inventory.guests), names)
            with self._lock:
                self._known = known
        return known[1], known[2]

    def _allocate(
        self, request: Request, hostname: str | None, ports: dict[str, int], inventory: Inventory
    ) -> Reservation:
        guests, names = self._guest_sets(inventory)
        taken: set[int] = set()  # VMIDs Proxmox said are in use (guests the token cannot see)
        probes = 0
        for attempt in range(MAX_TRIES):
            window = 1 if attempt == 0 else min(WINDOW_START << (attempt - 1), WINDOW_MAX)
            now = self.clock().replace(microsecond=0)  # every database keeps whole seconds
            claimed: list[tuple[str, list[Any]]] = []
            try:
                vmid = None
                while vmid is None:
                    seen = self._claims.seen()
                    choice = self._choose(now, hostname, request.suffix, ports, guests, names, taken, window)
                    if not choice.vmids:
                        low, high = self.settings.allocator_vmids
                        raise Refused(
                            "vmid_range_exhausted",
                            f"no free VMID in CLEANUP_ALLOCATOR_VMIDS={low}-{high}: every one is used by a row, "
                            "a guest or a reservation",
                        )
                    for candidate in choice.vmids:
                        if not self._claims.take(VMID, [candidate], 1, seen):
                            continue  # another allocation of this process is trying it
                        claimed.append((VMID, [candidate]))
                        if probes >= MAX_PROBES:
                            raise Refused(
                                "contention",
                                f"Proxmox said the {probes} VMIDs checked are in use (guests this token "
                                "cannot see?); nothing was reserved, try again",
                            )
                        probes += 1
                        if self._free_in_proxmox(candidate):
                            vmid = candidate
                            break
                        taken.add(candidate)
                    else:
                        if all(v in taken for v in choice.vmids):
                            continue  # every one is a hidden guest's: read again past them
                        break  # the others are being tried here: choose again later
                if vmid is None:
                    continue
                values = [(VMID, str(vmid))]
                if choice.names is not None:
                    name = self._claims.take(HOSTNAME, choice.names, 1, seen)
                    if not name:
                        continue  # another allocation of this process is reserving it
                    claimed.append((HOSTNAME, name))
                    values.append((HOSTNAME, name[0]))
                short = False
                for column, (n, free) in choice.ports.items():
                    got = self._claims.take(column, free, n, seen)
                    claimed.append((column, got))
                    short = short or len(got) < n
                    values.extend((column, str(port)) for port in sorted(got))
                if short:
                    continue
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
                self._claims.committed(values)
            finally:
                for kind, held in claimed:
                    self._claims.drop(kind, held)
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
        """What is free, from one read of the reservations and the platform table: enough of
        each for this allocation and the ``window``."""
        with self.table.engine.connect() as conn:
            held, stale = self._held(conn, now)
            free_names = self._hostnames(conn, hostname, suffix, names, held.get(HOSTNAME, {}))
            free_ports = {}
            for column, low, high in self.settings.allocator_ports:
                n = ports.get(column, 0)
                if not n:
                    continue
                skip = {p for p in (whole(v) for v in held.get(column, {})) if p is not None}
                free = self._free(conn, self.table.table.c[column], low, high, skip, max(window, n))
                if len(free) < n:
                    raise Refused(
                        "port_range_exhausted",
                        f"{column}: {len(free)} of the {n} ports asked for are free in {low}-{high} "
                        "(the others are used by rows or reserved)",
                    )
                free_ports[column] = (n, _spread(free, window))
            reserved = {v for v in (whole(x) for x in held.get(VMID, {})) if v is not None}
            low, high = self.settings.allocator_vmids
            not_these = Skip(guests, reserved, taken)
            free_vmids = self._free(conn, self.table.vmid, low, high, not_these, max(window, 8))
        return _Choice(
            _spread(free_vmids, window),
            None if free_names is None else _spread(free_names, window),
            free_ports,
            stale,
        )

    def _held(self, conn: Connection, now: datetime) -> tuple[dict[str, dict[str, int]], list[int]]:
        """The values reservations hold (kind -> {value: reservation id}), and the stale
        reservations to delete when reserving: expired, or ended because their row appeared
        (their values are free: their VMID and hostname are a row's now)."""
        held, expired = reservations.read(conn, self.settings.table, now)
        ended = reservations.ended_ids(conn, self.table, held)
        if ended:
            gone = set(ended)
            held = {k: {v: r for v, r in vs.items() if r not in gone} for k, vs in held.items()}
        return held, expired + ended

    def _free(
        self, conn: Connection, column: sa.Column, low: int, high: int, skip: Collection[int] | Skip, want: int
    ) -> list[int]:
        """:func:`~receiver.freevalues.free_numbers` from the lowest value no row held in a scan of the last
        :data:`FLOOR_S` seconds (every value below it was a row's then): a burst of allocations
        does not scan a table's dense VMIDs from the range's start for each.  A row deleted
        below it within those seconds waits for the next scan from the start; reservations,
        guests and Proxmox are checked as ever."""
        started = time.monotonic()
        with self._lock:
            floor, since = self._floors.get(column.name, (low, started))
        if started - since > FLOOR_S or not low <= floor <= high:
            floor, since = low, started
        free, unused = scan_free(conn, column, floor, high, skip, want)
        if unused is not None:
            with self._lock:
                self._floors[column.name] = (unused, since)
        return free

    def _hostnames(
        self,
        conn: Connection,
        name: str | None,
        suffix: bool,
        guest_names: frozenset[str],
        held: Mapping[str, int],
    ) -> list[str] | None:
        """``[name]`` if it is free (no row, guest or reservation has it); with ``suffix`` the free
        ones of name, name-2, name-3 ... in order; Refused (``hostname_taken``, saying who has
        it) when none is free; None when no name is asked for."""
        if name is None:
            return None
        candidates = name_candidates(name, suffix)
        return self._pick_names(name, suffix, candidates, self._names_in_rows(conn, candidates), guest_names, held)

    def _names_in_rows(self, conn: Connection, candidates: Collection[str]) -> set[str]:
        """Which of ``candidates`` rows of the platform table carry as their hostname."""
        column_name = self.settings.hostname_column
        if not column_name or not candidates:
            return set()
        column = self.table.table.c[column_name]
        found: set[str] = set()
        for part in chunks(sorted(candidates), CHUNK):
            found.update(str(v).lower() for v in conn.execute(sa.select(column).where(column.in_(part))).scalars())
        return found

    def _pick_names(
        self,
        name: str,
        suffix: bool,
        candidates: list[str],
        in_rows: Collection[str],
        guest_names: frozenset[str],
        held: Mapping[str, int],
    ) -> list[str]:
        """The free ones of ``candidates``; Refused, saying who has it, when none is."""
        free = [c for c in candidates if c not in in_rows and c not in guest_names and c not in held]
        if free:
            return free
        if suffix:
            raise Refused("hostname_taken", f"hostname {name!r} and its suffixes -2 to -{MAX_SUFFIX} are all taken")
        if name in in_rows:
            who = f"a row of {self.settings.table!r}"
        elif name in guest_names:
            who = "a guest in Proxmox"
        else:
            who = f"reservation {held[name]}"
        raise Refused("hostname_taken", f"hostname {name!r} is taken by {who} (ask with suffix to get {name}-2 ...)")
