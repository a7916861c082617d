"""The removal pipeline: the one way rows leave the table, for the sweep and the watcher.

1. Read the rows (the whole table, or the rows of some VMIDs).
2. Take a guest list: the sweep reads one now; the watcher hands in the read that made
   its VMIDs candidates.  Plan with the pure planner; check the safety rules.
3. Confirm: read the guest list again, with the ACL list read on both sides of it (which
   VMIDs an ACL could hide).  This confirming read starts after the rows were read, so a
   guest that exists by then keeps its rows, whatever the first read said.  A ghost whose
   guest is back is dropped; a ghost whose VMID Proxmox says is taken although the token
   was not shown it (``hidden_guest``) keeps its row and is reported.
4. Apply: delete or mark only the rows read in step 1, guarded in the WHERE clause by the
   values observed then (:mod:`receiver.apply`).  A row that appeared after step 1 is never
   part of this removal; one that changed is skipped.

Every read of the guest list checks the token's privilege and the answering node's quorum
(:meth:`ProxmoxInventory.read`); whatever cannot be read surely refuses the removal
(:mod:`receiver.safety`) and changes nothing.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy.exc import SQLAlchemyError

from . import holds, pending, reservations
from .apply import ApplyConflict, apply_actions
from .config import Settings
from .db import DatabaseError
from .model import Action, Finding, Inventory, InventoryError, Outcome, Plan, Reason, Refusal, Report
from .plan import make_plan
from .result import SweepResult, short_vmids
from .safety import LIFTED_BY_FORCE, Refused, check_listing, check_plan_size, hidden_guests, refusal_for
from .timeutil import utcnow

if TYPE_CHECKING:  # types only: no import at run time
    from .table import PlatformTable

logger = logging.getLogger(__name__)


Narrow = Callable[[Plan, Inventory], Plan]
"""Cuts a plan down to what was reviewed (an approval, :mod:`receiver.approval`)."""


class Proxmox(Protocol):
    """What the pipeline reads from Proxmox (:class:`receiver.inventory.ProxmoxInventory`)."""

    def read(self) -> Inventory: ...

    def hideable_vmids(self) -> frozenset[int] | None: ...

    def vmid_in_use(self, vmid: int) -> bool: ...


class _CyclicGc:
    """Keeps CPython's cyclic garbage collector off a whole-table removal's objects.

    Reading and planning 100,000 rows makes about a million objects that hold no reference
    cycles, and the collector walked them again and again (docs/performance.md).  So it is
    off while the pipeline reads and plans (:meth:`paused`), which waits for no one else's
    lock.  For the confirming read and the apply, which may wait for a database lock, it
    runs as usual for new objects but leaves alone everything that existed before
    (:meth:`frozen`, ``gc.freeze``).  Overlapping uses nest; the last one restores it.
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
                thawed = self._freezes == 0
                if thawed:
                    gc.unfreeze()
            if thawed:
                # Unfrozen objects land in the oldest generation without counting towards its
                # next collection, so cycles other threads left while frozen (request objects,
                # statements) would wait there, and the process would grow; one collection now
                # frees them (docs/performance.md).
                gc.collect()


_cyclic_gc = _CyclicGc()


class Removal:
    """The pipeline, bound to one table and one Proxmox reader; safe to run from several threads."""

    def __init__(self, settings: Settings, table: PlatformTable, proxmox: Proxmox, clock: Callable[[], Any] = utcnow):
        self.settings = settings
        self.table = table
        self.proxmox = proxmox
        self.clock = clock

    def run(
        self,
        *,
        vmids: Collection[int] | None = None,
        first: Inventory | None = None,
        reasons: Collection[str] | None = None,
        dry_run: bool = False,
        force: bool = False,
        source: str = "sweep",
        may_apply: Callable[[], bool] | None = None,
        narrow: Narrow | None = None,
        plan_id: int | None = None,
    ) -> SweepResult:
        """One removal: of the whole table (``vmids`` None) or of the rows of ``vmids``.

        ``first``: a guest list read before this call (the watcher's tick); None reads one
        after the rows.  ``reasons``: act only for these planner reasons.  ``force`` lifts
        only the rules :data:`receiver.safety.LIFTED_BY_FORCE` names.  ``may_apply`` is
        asked right before the apply (the watcher's lease).  ``narrow`` cuts the plan down
        before the rules on its size (an approval: ``plan_id`` is the plan approved).

        When a rule that ``--force`` lifts refuses a real (not dry) run, the plan is kept as
        a pending plan (:mod:`receiver.pending`) and the result names it.
        """
        whole = vmids is None
        with _cyclic_gc.paused() if whole else nullcontext():
            planned = self._read_and_plan(vmids, first, reasons, force, narrow)
        if isinstance(planned, SweepResult):
            if planned.refusal in LIFTED_BY_FORCE and planned.plan is not None and not dry_run:
                self._keep_pending(planned, source)
            return planned
        plan, total, rows_by_key = planned
        if dry_run:
            return SweepResult(
                Outcome.DRY_RUN,
                "dry run: nothing changed",
                plan=plan,
                untouched_vmids=_untouched(rows_by_key, plan.actions),
            )
        if not plan.actions:
            return SweepResult(Outcome.NOTHING, "", plan=plan, untouched_vmids=_untouched(rows_by_key, ()))
        with _cyclic_gc.frozen() if whole else nullcontext():
            return self._confirm_and_apply(plan, total, rows_by_key, source, may_apply, plan_id)

    def _keep_pending(self, refused: SweepResult, source: str) -> None:
        """Keep a plan refused by a rule ``--force`` lifts for review; a failure is logged, the
        refusal stands either way."""
        assert refused.plan is not None and refused.refusal is not None  # checked by the caller
        try:
            refused.pending_id, new = pending.keep(
                self.table.engine,
                self.settings,
                refused.plan,
                refusal=refused.refusal,
                reason=refused.reason,
                table_rows=refused.table_rows or 0,
                source=source,
                now=self.clock(),
            )
        except SQLAlchemyError as exc:
            logger.warning("the refused plan could not be kept for review: %s", type(exc).__name__)
            return
        if new:
            logger.warning(
                "kept as pending plan %s: review it with `pve-janitor pending`, then `pve-janitor approve %s`",
                refused.pending_id,
                refused.pending_id,
            )

    def _read_and_plan(
        self,
        vmids: Collection[int] | None,
        first: Inventory | None,
        reasons: Collection[str] | None,
        force: bool,
        narrow: Narrow | None = None,
    ) -> tuple[Plan, int, dict[Any, int | None] | None] | SweepResult:
        """Rows, holds and reserved VMIDs, then the guest list, then the plan and the rules on its size."""
        try:
            rows = self.table.fetch_rows(vmids=None if vmids is None else sorted(vmids))
            total = len(rows) if vmids is None else self.table.count()
            with self.table.engine.connect() as conn:
                now = self.clock()
                held = holds.active(conn, self.settings.table, now)
                reserved = reservations.reserved_vmids(conn, self.settings.table, now)
        except DatabaseError as exc:
            return SweepResult(Outcome.FAILED, str(exc), refusal=Refusal.DATABASE)
        except SQLAlchemyError as exc:
            return SweepResult(Outcome.FAILED, f"database error {type(exc).__name__}", refusal=Refusal.DATABASE)
        try:
            inventory = first if first is not None else self.proxmox.read()
        except InventoryError as exc:
            return SweepResult(Outcome.REFUSED, f"inventory unreadable: {exc}", refusal=refusal_for(exc))
        try:
            check_listing(inventory, total)
        except Refused as exc:
            return SweepResult(Outcome.REFUSED, str(exc), refusal=exc.refusal)
        # Only a VMID-scoped run needs to know afterwards which VMIDs kept a row.
        rows_by_key = None if vmids is None else {r.key: r.vmid for r in rows}
        plan = make_plan(rows, inventory, self.clock(), self.settings, held, reserved)
        del rows
        if reasons is not None:
            plan = replace(plan, actions=tuple(a for a in plan.actions if a.reason in reasons))
        if narrow is not None:
            plan = narrow(plan, inventory)
        del inventory
        try:
            check_plan_size(len(plan.actions), total, self.settings, force)
        except Refused as exc:
            return SweepResult(Outcome.REFUSED, str(exc), refusal=exc.refusal, plan=plan, table_rows=total)
        return plan, total, rows_by_key

    def _confirm_and_apply(
        self,
        plan: Plan,
        total: int,
        rows_by_key: dict[Any, int | None] | None,
        source: str,
        may_apply: Callable[[], bool] | None,
        plan_id: int | None = None,
    ) -> SweepResult:
        actions, dropped, hidden = list(plan.actions), list[int](), list[int]()
        if any(a.reason == Reason.GHOST for a in actions):
            try:
                actions, dropped, hidden = self._confirm_ghosts(actions, total)
            except Refused as exc:
                return SweepResult(Outcome.REFUSED, str(exc), refusal=exc.refusal, plan=plan)
            if hidden:
                plan = replace(
                    plan,
                    reports=plan.reports
                    + tuple(
                        Report(
                            Finding.HIDDEN_GUEST,
                            v,
                            f"Proxmox says VMID {v} is in use, but the token was not shown "
                            "that guest (an ACL hides it?): its rows are kept",
                        )
                        for v in hidden
                    ),
                )
        if may_apply is not None and not may_apply():
            return SweepResult(
                Outcome.REFUSED,
                "the lease was lost before applying: nothing removed",
                refusal=Refusal.LEASE,
                plan=plan,
                dropped=dropped,
                hidden=hidden,
            )
        try:
            applied = apply_actions(self.table, actions, source=source, now=self.clock(), plan_id=plan_id)
        except (ApplyConflict, DatabaseError) as exc:
            return SweepResult(
                Outcome.FAILED,
                f"nothing changed: {exc}",
                refusal=Refusal.DATABASE,
                plan=plan,
                dropped=dropped,
                hidden=hidden,
            )
        except SQLAlchemyError as exc:
            logger.warning("apply failed, the transaction was rolled back: %s", type(exc).__name__)
            return SweepResult(
                Outcome.FAILED,
                f"nothing changed: database error {type(exc).__name__}",
                refusal=Refusal.DATABASE,
                plan=plan,
                dropped=dropped,
                hidden=hidden,
            )
        return SweepResult(
            Outcome.DONE,
            "",
            plan=plan,
            applied=applied,
            dropped=dropped,
            hidden=hidden,
            untouched_vmids=_untouched(rows_by_key, applied.applied),
        )

    def _confirm_ghosts(self, actions: list[Action], total: int) -> tuple[list[Action], list[int], list[int]]:
        """The actions that survive the confirming read, the ghosts dropped, the hidden VMIDs.

        The ACL list says which VMIDs an ACL could hide from the token; only those are asked
        about one by one (``/cluster/nextid``).  It is read on both sides of the confirming
        read, and a VMID named by either read is asked about.  Read only before, an entry
        added together with a new guest between that read and the confirming read would hide
        the guest unnoticed; read only after, an entry lifted right after the confirming read
        would.  When a read fails or proves nothing, every ghost is asked about.
        """
        before = self._hideable()
        try:
            confirm = self.proxmox.read()
        except InventoryError as exc:
            raise Refused(refusal_for(exc), f"confirming inventory read failed: {exc}") from None
        after = self._hideable()
        hideable = None if before is None or after is None else before | after
        check_listing(confirm, total)
        back = {
            a.row.vmid for a in actions if a.reason == Reason.GHOST and a.row.vmid is not None and a.row.vmid in confirm
        }
        actions = [a for a in actions if not (a.reason == Reason.GHOST and a.row.vmid in back)]
        ghosts = {a.row.vmid for a in actions if a.reason == Reason.GHOST and a.row.vmid is not None}
        try:
            hidden = hidden_guests(ghosts, hideable, self.proxmox.vmid_in_use)
        except InventoryError as exc:
            raise Refused(refusal_for(exc), f"could not confirm that the ghosts' VMIDs are free: {exc}") from None
        if hidden:
            logger.warning(
                "VMIDs %s are in use in Proxmox but were not listed to the token (hidden_guest): their rows are kept",
                short_vmids(hidden),
            )
            taken = set(hidden)
            actions = [a for a in actions if not (a.reason == Reason.GHOST and a.row.vmid in taken)]
        return actions, sorted(back), hidden

    def _hideable(self) -> frozenset[int] | None:
        """What the ACL list proves now (None: nothing, ask about every ghost)."""
        try:
            return self.proxmox.hideable_vmids()
        except InventoryError as exc:
            logger.warning("the ACL list could not be read (%s): every ghost's VMID is checked one by one", exc)
            return None


def _untouched(rows_by_key: dict[Any, int | None] | None, handled: Collection[Action]) -> frozenset[int]:
    if rows_by_key is None:
        return frozenset()
    done = {a.row.key for a in handled}
    return frozenset(v for k, v in rows_by_key.items() if k not in done and v is not None)
