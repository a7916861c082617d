"""The watcher's probes, made: where each watched guest was last seen, which are due, the requests.

What to ask and what an answer means is :mod:`receiver.probe`'s (pure); this module makes
the requests through :class:`receiver.inventory.ProxmoxInventory`, measures what each
answer weighs, counts every answer in ``pve_janitor_probe_results`` and says an odd one
(595, 403, ...) once per VMID and answer, not at every tick.

Where a guest is comes from its stop event (the node only), a destroy task (node and
type), a probe that found it, and every whole-list read; it is kept in memory only.  After
a restart the first tick reads the whole list once, which says where every guest is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from .fade import Fade
from .probe import Ask, Choice, Costs, Kind, Result, Seen, Where, merge, node_name_ok, read_node_list, read_status

if TYPE_CHECKING:
    from .inventory import ProxmoxInventory
    from .metrics import Metrics
    from .model import Inventory

logger = logging.getLogger(__name__)

DESTROY_TYPES = {"vzdestroy": "lxc", "qmdestroy": "qemu"}


@dataclass(frozen=True)
class Look:
    """What one tick learnt: ``statuses`` of the VMIDs it has an answer for (None: missing from
    the whole list ``inventory``, the only read that may say so), and what odd answers said."""

    statuses: dict[int, str | None]
    inventory: Inventory | None
    odd: str | None


class Probes:
    """The probe state of one watcher: locations, the fade, the measured answer sizes."""

    def __init__(self, inventory: ProxmoxInventory, metrics: Metrics, watch_seconds: float, tick_seconds: float):
        self.inventory = inventory
        self.metrics = metrics
        self.watch_seconds = watch_seconds
        self.slack = tick_seconds / 2
        self.costs = Costs()
        self.fade = Fade()
        self.where: dict[int, Where] = {}
        self._said: set[tuple[int, str]] = set()

    # --- where guests are --------------------------------------------------------------

    def hinted(self, vmid: int, node: str, task_type: str | None = None) -> None:
        """A stop event (on ``node``) or a destroy task (``task_type``) about ``vmid``: its node,
        and its type when the hint says; a type known before is kept (a migration keeps it)."""
        if not node_name_ok(node):
            return
        before = self.where.get(vmid)
        kind = DESTROY_TYPES.get(task_type or "") or (before.type if before else None)
        self.where[vmid] = Where(node, kind)

    def lost(self, vmid: int) -> None:
        """Where ``vmid`` is is no longer known: its next probe reads the whole list."""
        self.where.pop(vmid, None)

    def keep_only(self, vmids: set[int]) -> None:
        """Forget everything about VMIDs no longer watched."""
        for vmid in [v for v in self.where if v not in vmids]:
            del self.where[vmid]
        self.fade.keep_only(vmids)
        self._said = {s for s in self._said if s[0] in vmids}

    # --- one tick ----------------------------------------------------------------------

    def anchor(self, watch: Mapping[str, Any]) -> datetime:
        """When the latest hint about a watched VMID came: each hint sets its deadline to
        then + CLEANUP_WATCH_SECONDS, so the watch list itself remembers it (and a fail-over
        keeps the fade where it was)."""
        since: datetime = watch["since"]
        return max(since, watch["until"] - timedelta(seconds=self.watch_seconds))

    def due(self, watches: Mapping[int, Mapping[str, Any]], now: datetime) -> dict[int, Where | None]:
        """The watched VMIDs to ask about at ``now``, with where each was last seen."""
        return {v: self.where.get(v) for v, w in watches.items() if self.fade.due(v, self.anchor(w), now, self.slack)}

    def choose(self, due: dict[int, Where | None]) -> Choice:
        return self.costs.choose(due, self.inventory.shape)

    def look(
        self, watches: Mapping[int, Mapping[str, Any]], now: datetime, read_whole: Callable[[], Inventory | None]
    ) -> Look | None:
        """One tick's reads: the due VMIDs probed, or the whole list read (``read_whole``: None
        when it could not be read surely) when that is the cheaper way, a VMID's node is not
        known, or a probe found a candidate.  None: nothing due, or nothing read.  Raises
        InventoryError when a probe got no answer at all."""
        due = self.due(watches, now)
        if not due:
            return None
        choice = self.choose(due)
        seen = {} if choice.full else self.ask(choice.asks)
        inventory = None
        if choice.full or any(s.result == Result.GONE for s in seen.values()):
            inventory = read_whole()
            if inventory is None:
                return None
            self.saw_whole(inventory, watches)
        self.probed(due, watches, now)
        if inventory is not None:
            return Look({v: g.status if (g := inventory.get(v)) else None for v in watches}, inventory, None)
        odd = sorted(v for v, s in seen.items() if s.result not in (Result.PRESENT, Result.GONE))
        said = (
            (
                f"probes of VMIDs {odd[:5]} answered {seen[odd[0]].result} ({seen[odd[0]].detail}): not "
                "candidates, still watched"
            )
            if odd
            else None
        )
        return Look({v: s.status for v, s in seen.items() if s.result == Result.PRESENT}, None, said)

    def probed(self, vmids: Iterable[int], watches: Mapping[int, Mapping[str, Any]], now: datetime) -> None:
        for vmid in vmids:
            self.fade.probed(vmid, self.anchor(watches[vmid]), now)

    def ask(self, asks: Iterable[Ask]) -> dict[int, Seen]:
        """Make the requests; what each answer says of each VMID.  Raises InventoryError when
        Proxmox gave no answer at all (the tick then stops there)."""
        seen: dict[int, Seen] = {}
        kinds: dict[int, Kind] = {}
        for ask in asks:
            kinds.update(dict.fromkeys(ask.vmids, ask.kind))
            if ask.kind == Kind.GUEST:
                vmid = ask.vmids[0]
                for kind in ask.types:
                    reply = self.inventory.guest_status(ask.node, kind, vmid)
                    self.costs.measured_status(len(reply.body))
                    self.metrics.watcher_read_bytes.labels(kind=Kind.GUEST).inc(len(reply.body))
                    seen[vmid] = merge(seen.get(vmid), read_status(vmid, ask.node, kind, *reply))
                    if seen[vmid].result != Result.GONE:
                        break
            else:
                kind = ask.types[0]
                reply = self.inventory.node_guests(ask.node, kind)
                said, listed = read_node_list(list(ask.vmids), ask.node, kind, *reply)
                self.costs.measured_list(len(reply.body), listed)
                self.metrics.watcher_read_bytes.labels(kind=Kind.NODE).inc(len(reply.body))
                for vmid, answer in said.items():
                    seen[vmid] = merge(seen.get(vmid), answer)
        for vmid, answer in seen.items():
            self._count(vmid, kinds[vmid], answer)
            if answer.result == Result.PRESENT and answer.node and answer.type:
                self.where[vmid] = Where(answer.node, answer.type)
        return seen

    def saw_whole(self, inventory: Inventory, vmids: Iterable[int]) -> None:
        """A whole-list read: where each watched guest is now, and its answer counted."""
        shape = self.inventory.shape
        if shape is not None:
            self.metrics.watcher_read_bytes.labels(kind=Kind.FULL).inc(shape.body_bytes)
        for vmid in vmids:
            guest = inventory.get(vmid)
            if guest is not None:
                self.where[vmid] = Where(guest.node, guest.type)
            self._count(vmid, Kind.FULL, Seen(Result.PRESENT if guest is not None else Result.GONE))

    def _count(self, vmid: int, kind: Kind, answer: Seen) -> None:
        self.metrics.probe_results.labels(kind=kind, result=answer.result).inc()
        if answer.result in (Result.PRESENT, Result.GONE) or (vmid, answer.result) in self._said:
            return
        self._said.add((vmid, answer.result))
        logger.warning(
            "watcher: probe of VMID %s answered %s (%s): not a candidate for removal, still watched",
            vmid,
            answer.result,
            answer.detail,
        )
