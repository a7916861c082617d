"""One sweep: read table and inventory, plan, check the safety rules, apply.

Fail closed: if the inventory cannot be read completely and surely, or the
answer looks like a token without privileges (empty while the table has
rows), or far more rows would go than usual, nothing is changed and the
outcome says why.  Only the percentage guard can be lifted (``force``).
Ghosts are confirmed by a second inventory read just before applying; a
guest that is back is dropped from the plan.  Then a guest the token cannot see
(a partial list) refuses the sweep: the ACL list, read between the two inventory
reads, says which ghosts an ACL could hide (``hideable_vmids``, all of them when
it proves nothing), and each of those VMIDs must be free by Proxmox's own word
(``vmid_in_use``).
"""
from __future__ import annotations

import gc
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from sqlalchemy.exc import SQLAlchemyError

from . import store
from .apply import ApplyConflict, ApplyResult, apply_actions
from .config import Settings
from .inventory import Inventory, InventoryError
from .plan import GHOST, Plan, make_plan
from .table import DatabaseError, PlatformTable
from .timeutil import isoformat, utcnow

logger = logging.getLogger(__name__)

GUARD_MIN_ROWS = 10

DONE, NOTHING, DRY_RUN, REFUSED, DISABLED, FAILED = "done", "nothing", "dry_run", "refused", "disabled", "failed"


@dataclass
class SweepResult:
    outcome: str
    reason: str = ""
    refusal: str = ""  # machine word when refused: inventory, privilege, empty_inventory,
    # partial_inventory, guard, database
    plan: Plan | None = None
    applied: ApplyResult | None = None
    dropped: list[int] = field(default_factory=list)  # ghosts whose guest came back before applying
    duration_s: float = 0.0
    dry_run: bool = False
    started_at: Any = None

    @property
    def exit_code(self) -> int:
        return 3 if self.outcome in (REFUSED, FAILED) else 0

    def summary(self) -> str:
        applied = len(self.applied.applied) if self.applied else 0
        planned = len(self.plan.actions) if self.plan else 0
        text = f"sweep {self.outcome}: {planned} planned, {applied} applied"
        if self.applied and self.applied.skipped:
            text += f", {len(self.applied.skipped)} skipped (changed since planning)"
        if self.dropped:
            text += f", {len(self.dropped)} dropped (guest is back)"
        if self.reason:
            text += f" — {self.reason}"
        return text + f" ({self.duration_s:.2f} s)"

    def to_dict(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "outcome": self.outcome,
            "reason": self.reason,
            "refusal": self.refusal or None,
            "dry_run": self.dry_run,
            "started_at": isoformat(self.started_at),
            "duration_s": round(self.duration_s, 3),
            "rows_seen": plan.rows_seen if plan else None,
            "planned": [action_dict(a) for a in plan.actions] if plan else [],
            "reports": [{"kind": r.kind, "vmid": r.vmid, "detail": r.detail} for r in plan.reports] if plan else [],
            "kept": plan.kept if plan else {},
            "applied": len(self.applied.applied) if self.applied else 0,
            "skipped": [{"row_id": _jsonable(a.row.key), "why": why} for a, why in self.applied.skipped]
            if self.applied else [],
            "dropped_vmids": self.dropped,
            "counts": dict(self.applied.counts) if self.applied else {},
        }


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, type(None))) else str(value)


def action_dict(a) -> dict[str, Any]:
    return {
        "action": a.action, "reason": a.reason, "row_id": _jsonable(a.row.key), "vmid": a.row.vmid,
        "hostname": _jsonable(a.row.hostname), "status": a.row.status, "detail": a.detail,
    }


def guard_tripped(would_go: int, total: int, settings: Settings) -> bool:
    """The deletion-percentage guard: more than 10 rows and more than CLEANUP_MAX_DELETE_PERCENT."""
    return would_go > GUARD_MIN_ROWS and would_go * 100 > settings.max_delete_percent * total


class _CyclicGc:
    """Keeps CPython's cyclic garbage collector off a sweep's objects.

    Reading and planning 100,000 rows makes about a million objects (rows, guests,
    actions) that hold no reference cycles.  The collector, triggered by the allocations,
    walked them again and again: 0.3 to 0.6 s of a 2 s sweep.  So it is off while the
    sweep reads and plans (:meth:`paused`), which waits for no one else's lock.  For the
    confirming read and the apply, which may wait for a database lock, it runs as usual
    for new objects (other threads' garbage too) but leaves alone everything that existed
    before (:meth:`frozen`, ``gc.freeze``): walking the plan and the loaded modules on
    each full collection cost 0.1 s of a PostgreSQL apply.  Reference counting frees
    everything as usual.  Overlapping uses nest; the last one restores the collector.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pauses = 0
        self._freezes = 0
        self._was_enabled = False

    @contextmanager
    def paused(self) -> Iterator[None]:
        with self._lock:
            if self._pauses == 0:
                self._was_enabled = gc.isenabled()
                gc.disable()
            self._pauses += 1
        try:
            yield
        finally:
            with self._lock:
                self._pauses -= 1
                if self._pauses == 0 and self._was_enabled:
                    gc.enable()

    @contextmanager
    def frozen(self) -> Iterator[None]:
        with self._lock:
            if self._freezes == 0:
                gc.freeze()
            self._freezes += 1
        try:
            yield
        finally:
            with self._lock:
                self._freezes -= 1
                if self._freezes == 0:
                    gc.unfreeze()


_cyclic_gc = _CyclicGc()


class Sweeper:
    """Runs sweeps; one at a time per process (``busy`` tells whether one runs)."""

    def __init__(self, settings: Settings, table: PlatformTable, read_inventory: Callable[[], Inventory],
                 on_result: Callable[[SweepResult, str], None] | None = None,
                 vmid_in_use: Callable[[int], bool] | None = None,
                 hideable_vmids: Callable[[], frozenset[int] | None] | None = None):
        self.settings = settings
        self.table = table
        self.read_inventory = read_inventory
        self.on_result = on_result
        self.vmid_in_use = vmid_in_use
        self.hideable_vmids = hideable_vmids
        self._lock = threading.Lock()

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    def try_run(self, **kwargs: Any) -> SweepResult | None:
        """Run unless a sweep is already running in this process (then None)."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            return self._run(**kwargs)
        finally:
            self._lock.release()

    def run(self, **kwargs: Any) -> SweepResult:
        with self._lock:
            return self._run(**kwargs)

    def _run(self, *, dry_run: bool | None = None, force: bool = False, source: str = "sweep") -> SweepResult:
        started_wall = utcnow()
        started = time.monotonic()
        dry = self.settings.dry_run if dry_run is None else (dry_run or self.settings.dry_run)
        result = self._sweep(dry, force, source)
        result.dry_run = dry
        result.started_at = started_wall
        result.duration_s = time.monotonic() - started
        self._record(result, source)
        return result

    def _sweep(self, dry: bool, force: bool, source: str) -> SweepResult:
        if not self.settings.enabled:
            return SweepResult(DISABLED, "CLEANUP_ENABLED is false: nothing is read or changed")
        with _cyclic_gc.paused():
            planned = self._read_and_plan(force)
        if isinstance(planned, SweepResult):
            return planned
        if dry:
            return SweepResult(DRY_RUN, "dry run: nothing changed", plan=planned)
        if not planned.actions:
            return SweepResult(NOTHING, "", plan=planned)
        with _cyclic_gc.frozen():
            return self._confirm_and_apply(planned, source)

    def _confirm_and_apply(self, plan: Plan, source: str) -> SweepResult:
        """Confirm the ghosts (second read, guests hidden by an ACL), then apply in one transaction."""
        actions, dropped = list(plan.actions), []
        if any(a.reason == GHOST for a in actions):
            # Which ghosts an ACL could hide is read *between* the two inventory reads: a guest
            # hidden in both either keeps its ACL entry through this read (and is checked one by
            # one below) or loses it before the confirming read (and shows up there).  Read after
            # the confirming read, an entry removed in between would let a live guest go unchecked.
            try:
                hideable = self._hideable()
            except InventoryError as exc:
                return SweepResult(REFUSED, f"could not confirm that the ghosts' VMIDs are free: {exc}",
                                   refusal="inventory", plan=plan)
            try:
                confirm = self.read_inventory()
            except InventoryError as exc:
                return SweepResult(REFUSED, f"confirming inventory read failed: {exc}", refusal="inventory", plan=plan)
            if not confirm.guests:
                return SweepResult(REFUSED, "confirming inventory read listed no guests", refusal="empty_inventory",
                                   plan=plan)
            dropped = sorted({a.row.vmid for a in actions if a.reason == GHOST and a.row.vmid in confirm})
            actions = [a for a in actions if not (a.reason == GHOST and a.row.vmid in confirm)]
            refused = self._check_vmids_free(actions, plan, hideable)
            if refused:
                return refused
        try:
            applied = apply_actions(self.table, actions, source=source, now=utcnow())
        except (ApplyConflict, DatabaseError) as exc:
            return SweepResult(FAILED, f"nothing changed: {exc}", refusal="database", plan=plan, dropped=dropped)
        except SQLAlchemyError as exc:
            logger.warning("sweep apply failed, the transaction was rolled back: %s", type(exc).__name__)
            return SweepResult(FAILED, f"nothing changed: database error {type(exc).__name__}",
                               refusal="database", plan=plan, dropped=dropped)
        return SweepResult(DONE, "", plan=plan, applied=applied, dropped=dropped)

    def _read_and_plan(self, force: bool) -> Plan | SweepResult:
        """Read the table and the inventory, and plan: the plan, or why the sweep stops here.

        Rows and inventory are let go on return, before the confirming read: the plan holds
        what is needed.
        """
        s = self.settings
        try:
            rows = self.table.fetch_rows()
        except DatabaseError as exc:
            return SweepResult(FAILED, str(exc), refusal="database")
        try:
            inventory = self.read_inventory()
        except InventoryError as exc:
            return SweepResult(REFUSED, f"inventory unreadable: {exc}",
                               refusal="privilege" if exc.kind == "privilege" else "inventory")
        if not inventory.guests and rows:
            return SweepResult(REFUSED, f"Proxmox listed no guests while the table has {len(rows)} rows "
                               "(a token without VM.Audit sees an empty list)", refusal="empty_inventory")
        plan = make_plan(rows, inventory, utcnow(), s)
        n = len(plan.actions)
        if guard_tripped(n, len(rows), s) and not force:
            return SweepResult(REFUSED, f"{n} of {len(rows)} rows would go, more than "
                               f"CLEANUP_MAX_DELETE_PERCENT={s.max_delete_percent}% "
                               "(check the plan, then run with --force)", refusal="guard", plan=plan)
        return plan

    def _hideable(self) -> frozenset[int] | None:
        """The VMIDs an ACL could hide from the token (None: any); InventoryError if unreadable."""
        if self.vmid_in_use is None or self.hideable_vmids is None:
            return None
        return self.hideable_vmids()

    def _check_vmids_free(self, actions: list, plan: Plan, hideable: frozenset[int] | None) -> SweepResult | None:
        """A refusal when a ghost's VMID is still taken in the cluster (a guest hidden from the token).

        Asked after the confirming read.  One request per ghost took 28 s at 10,000 ghosts, so
        the ACL list (two requests, read before the confirming read) narrows the check to the
        ghosts an ACL could hide; every ghost is checked when it proves nothing.
        """
        if self.vmid_in_use is None:
            return None
        vmids = sorted({a.row.vmid for a in actions if a.reason == GHOST and a.row.vmid is not None})
        if not vmids:
            return None
        try:
            suspects = vmids if hideable is None else [v for v in vmids if v in hideable]
            hidden = next((v for v in suspects if self.vmid_in_use(v)), None)
        except InventoryError as exc:
            return SweepResult(REFUSED, f"could not confirm that the ghosts' VMIDs are free: {exc}",
                               refusal="inventory", plan=plan)
        if hidden is None:
            return None
        return SweepResult(REFUSED, f"Proxmox says VMID {hidden} is in use, but /cluster/resources did not "
                           "list it: the token sees a partial inventory (an ACL hiding some guests?)",
                           refusal="partial_inventory", plan=plan)

    def _record(self, result: SweepResult, source: str) -> None:
        level = logging.WARNING if result.outcome in (REFUSED, FAILED) else logging.INFO
        logger.log(level, "%s", result.summary())
        engine = self.table.engine
        try:
            store.record_run(
                engine, source=source, started_at=result.started_at, finished_at=utcnow(),
                outcome=result.outcome, reason=result.reason[:2000], dry_run=result.dry_run,
                planned=len(result.plan.actions) if result.plan else 0,
                applied=len(result.applied.applied) if result.applied else 0,
                duration_s=result.duration_s,
            )
            if result.outcome in (REFUSED, FAILED):
                store.record_error(engine, source, result.reason)
        except Exception:  # noqa: BLE001 - bookkeeping must not hide the sweep's own outcome
            logger.warning("could not record the sweep's outcome in the database", exc_info=True)
        if self.on_result:
            self.on_result(result, source)
