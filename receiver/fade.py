"""When the watcher asks about each watched VMID: the fade.

Every tick for :data:`FAST_SECONDS` after the latest hint about a guest (a stop event, a
destroy task), then 2, 4, 8 ... s apart until its watch ends.  Platforms destroy right after
the stop, so a destroy is still found within a tick; a guest stopped for maintenance costs a
few dozen small answers over the whole watch window (docs/architecture.md, "The watcher's
probes and fade").  Pure: the watcher's clock decides.
"""

from __future__ import annotations

from datetime import datetime, timedelta

FAST_SECONDS = 60.0  # probed at every tick this long after a hint: a stop-then-destroy is found within a tick
MAX_GAP_SECONDS = 256.0  # a long watch (a large CLEANUP_WATCH_SECONDS) is still probed this often


class Fade:
    """When each watched VMID is probed next: every tick for :data:`FAST_SECONDS` after its
    latest hint (``anchor``), then 2, 4, 8 ... s apart (at most :data:`MAX_GAP_SECONDS`).
    A new anchor (a new stop event or destroy task) starts it over."""

    def __init__(self) -> None:
        self._state: dict[int, tuple[datetime, datetime, float]] = {}  # vmid -> anchor, next probe, gap

    def due(self, vmid: int, anchor: datetime, now: datetime, slack: float = 0.0) -> bool:
        """Whether ``vmid`` is to be probed at ``now``; ``slack`` (half a tick) keeps a probe due
        a few ms after this tick from waiting a whole tick more."""
        state = self._state.get(vmid)
        if state is None or state[0] != anchor:
            return True
        return now >= state[1] - timedelta(seconds=slack)

    def probed(self, vmid: int, anchor: datetime, now: datetime) -> None:
        """``vmid`` was asked about at ``now``: set its next probe."""
        state = self._state.get(vmid)
        gap = state[2] if state is not None and state[0] == anchor else 0.0
        if (now - anchor).total_seconds() < FAST_SECONDS:
            gap = 0.0
        else:
            gap = min(MAX_GAP_SECONDS, max(2.0, gap * 2))
        self._state[vmid] = (anchor, now + timedelta(seconds=gap), gap)

    def gap(self, vmid: int) -> float | None:
        """The seconds between ``vmid``'s last probe and its next (0: every tick)."""
        state = self._state.get(vmid)
        return None if state is None else state[2]

    def keep_only(self, vmids: set[int]) -> None:
        """Forget every VMID no longer watched."""
        for vmid in [v for v in self._state if v not in vmids]:
            del self._state[vmid]
