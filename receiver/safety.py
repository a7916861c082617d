"""The fail-closed rules every removal obeys, sweep and watcher alike.

Each rule looks at what a removal read and planned and says whether the removal
may go on; a refusal names its reason with one of the words below, which are
part of the public contract (exit 3 reasons, stats, metrics, ``check``):

``inventory``        the guest list could not be read completely and surely
``privilege``        the token lacks a privilege the read needs (VM.Audit, Sys.Audit on /)
``no_quorum``        the answering node is not part of a quorate cluster: its guest list may be stale
``empty_inventory``  Proxmox listed no guests while the table has rows
``guard``            more rows would go than ``CLEANUP_MAX_DELETE_PERCENT`` allows (``--force`` lifts it)
``would_empty``      the plan would remove every row of the table (``--force`` lifts it)
``database``         the table could not be read or written
``lease``            another receiver may lead now (the watcher's lease ran out mid-removal)

Hidden guests are not a refusal: a ghost whose VMID Proxmox says is in use,
although the token was not shown that guest (an ACL hides it), keeps its row and
is reported (``hidden_guest``); the other rows go on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence

from .config import Settings
from .model import VMID_MAX, VMID_MIN, Inventory, InventoryError, Refusal, Row

GUARD_MIN_ROWS = 10


LIFTED_BY_FORCE = frozenset({Refusal.GUARD, Refusal.WOULD_EMPTY})


class Refused(Exception):
    """A rule stopped the removal; nothing was changed."""

    def __init__(self, refusal: Refusal, message: str):
        self.refusal = refusal
        super().__init__(message)


def refusal_for(exc: InventoryError) -> Refusal:
    """The refusal an unreadable inventory stands for."""
    if exc.kind == "privilege":
        return Refusal.PRIVILEGE
    if exc.kind == "no_quorum":
        return Refusal.NO_QUORUM
    return Refusal.INVENTORY


def guard_tripped(would_go: int, total: int, settings: Settings) -> bool:
    """The deletion-percentage guard: more than 10 rows and more than CLEANUP_MAX_DELETE_PERCENT."""
    return would_go > GUARD_MIN_ROWS and would_go * 100 > settings.max_delete_percent * total


def check_listing(inventory: Inventory, rows_in_table: int) -> None:
    """An empty guest list while the table has rows is what a token without VM.Audit sees."""
    if not inventory.guests and rows_in_table:
        raise Refused(
            Refusal.EMPTY_INVENTORY,
            f"Proxmox listed no guests while the table has {rows_in_table} rows "
            "(a token without VM.Audit sees an empty list)",
        )


def check_plan_size(would_go: int, total: int, settings: Settings, force: bool) -> None:
    """The two rules ``--force`` lifts: the percentage guard, and a plan that empties the table.

    A plan that removes every row of a non-empty table is refused whatever its size: a VMID
    column mapped to the wrong column, or a guest list that lost its guests, looks like that.
    """
    if force or not would_go:
        return
    if would_go >= total:
        raise Refused(
            Refusal.WOULD_EMPTY,
            f"all {total} rows of the table would go: refused whatever its size (a wrong "
            "CLEANUP_VMID_COLUMN or a guest list missing guests looks like this); check the "
            "plan, then run with --force",
        )
    if guard_tripped(would_go, total, settings):
        raise Refused(
            Refusal.GUARD,
            f"{would_go} of {total} rows would go, more than "
            f"CLEANUP_MAX_DELETE_PERCENT={settings.max_delete_percent}% "
            "(check the plan, then run with --force)",
        )


def hidden_guests(
    ghost_vmids: Iterable[int], hideable: frozenset[int] | None, vmid_in_use: Callable[[int], bool]
) -> list[int]:
    """The ghosts' VMIDs that a guest the token cannot see still holds.

    ``hideable`` is what the ACL list proved (the VMIDs an ACL could hide; None: any), so
    only those are asked about one by one.  InventoryError when a check cannot be answered:
    the caller then removes no ghost, since any of them might be hidden.
    """
    suspects = sorted(v for v in set(ghost_vmids) if hideable is None or v in hideable)
    return [v for v in suspects if vmid_in_use(v)]


def vmid_column_problem(rows: Sequence[Row]) -> str | None:
    """Why the mapped VMID column does not look like one (None when it does), for ``check``.

    A VMID column holds Proxmox VMIDs (100-999999999), one row per guest.  When most values
    are out of that range or not numbers, or most rows share their VMID with another row,
    the column is probably the wrong one (``CLEANUP_VMID_COLUMN=id``), and every row would
    look like a ghost.
    """
    readable = [r.vmid for r in rows if r.vmid is not None]
    unreadable = sum(1 for r in rows if r.unreadable)
    valued = len(readable) + unreadable
    if not valued:
        return None
    if unreadable * 2 > valued:
        return (
            f"{unreadable} of {valued} values are not VMIDs (whole numbers {VMID_MIN}-{VMID_MAX}): "
            "is CLEANUP_VMID_COLUMN the column that holds the guest's VMID?"
        )
    counts = Counter(readable)
    repeated = sum(n for n in counts.values() if n > 1)
    if repeated * 2 > valued:
        return (
            f"{repeated} of {valued} rows share their VMID with another row: is CLEANUP_VMID_COLUMN the "
            "column that holds the guest's VMID?"
        )
    return None
