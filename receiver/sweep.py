"""One sweep: the whole table through the removal pipeline, now or on schedule.

The pipeline (:mod:`receiver.removal`) reads the rows, reads and confirms the
guest list, plans, checks the safety rules (:mod:`receiver.safety`) and applies.
The sweeper adds what is a sweep's own: one at a time per process, the master
switch, dry run, ``--force``, and the record of each run (log line, runs table,
errors, the ``on_result`` hook that feeds the metrics).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from . import outbox, store
from .config import Settings
from .model import Outcome
from .removal import Narrow, Proxmox, Removal
from .result import SweepResult
from .timeutil import utcnow

if TYPE_CHECKING:  # types only: no import at run time
    from .table import PlatformTable

logger = logging.getLogger(__name__)

OnResult = Callable[[SweepResult, str], None]
"""Told of every sweep's result and its source, after it was recorded (``serve``: the metrics)."""


class Sweeper:
    """Runs sweeps; one at a time per process (``busy`` tells whether one runs).

    ``clock`` is the process's one clock (:class:`receiver.runtime.Runtime`): it decides the
    grace periods and stamps the run; ``on_result`` is given at construction, never set later.
    """

    def __init__(
        self,
        settings: Settings,
        table: PlatformTable,
        proxmox: Proxmox,
        on_result: OnResult | None = None,
        clock: Callable[[], datetime] = utcnow,
    ):
        self.settings = settings
        self.table = table
        self.clock = clock
        self.pipeline = Removal(settings, table, proxmox, clock=clock)
        self._on_result = on_result
        # What stats show of the last sweep beyond the runs table (not the plan: it may hold
        # 100,000 actions).
        self.last_hidden: list[int] = []
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

    def _run(
        self,
        *,
        dry_run: bool | None = None,
        force: bool = False,
        source: str = "sweep",
        narrow: Narrow | None = None,
        plan_id: int | None = None,
    ) -> SweepResult:
        started_wall = self.clock()
        started = time.monotonic()
        dry = self.settings.dry_run if dry_run is None else (dry_run or self.settings.dry_run)
        if not self.settings.enabled:
            result = SweepResult(Outcome.DISABLED, "CLEANUP_ENABLED is false: nothing is read or changed")
        else:
            result = self.pipeline.run(dry_run=dry, force=force, source=source, narrow=narrow, plan_id=plan_id)
        result.dry_run = dry
        result.started_at = started_wall
        result.duration_s = time.monotonic() - started
        self._record(result, source)
        return result

    def _record(self, result: SweepResult, source: str) -> None:
        level = logging.WARNING if result.outcome in (Outcome.REFUSED, Outcome.FAILED) else logging.INFO
        logger.log(level, "%s", result.summary())
        engine = self.table.engine
        reason = f"{result.refusal}: {result.reason}" if result.refusal else result.reason
        events = outbox.Events(self.settings, self.clock())
        if result.refusal is not None:
            events.add(
                outbox.EventType.REMOVAL_REFUSED,
                "removal",
                refusal_data(
                    self.settings,
                    source,
                    result.outcome,
                    result.refusal,
                    result.reason,
                    len(result.plan.actions) if result.plan else 0,
                    result.pending_id,
                ),
            )
        try:
            store.record_run(
                engine,
                also=events.write,
                source=source,
                started_at=result.started_at,
                finished_at=self.clock(),
                outcome=result.outcome,
                reason=reason[:2000],
                dry_run=result.dry_run,
                planned=len(result.plan.actions) if result.plan else 0,
                applied=len(result.applied.applied) if result.applied else 0,
                duration_s=result.duration_s,
            )
            if result.outcome in (Outcome.REFUSED, Outcome.FAILED):
                store.record_error(engine, source, reason)
        except Exception:  # bookkeeping must not hide the sweep's own outcome
            logger.warning("could not record the sweep's outcome in the database", exc_info=True)
        self.last_hidden = list(result.hidden)
        if self._on_result:
            self._on_result(result, source)


def refusal_data(
    settings: Settings,
    source: str,
    outcome: str,
    refusal: str,
    reason: str,
    planned: int = 0,
    pending_plan: int | None = None,
) -> dict[str, Any]:
    """A refusal event's ``data``: who was refused, by which rule, and the pending plan it left."""
    return {
        "table": settings.table,
        "source": source,
        "outcome": str(outcome),
        "refusal": str(refusal),
        "reason": reason,
        "planned": planned,
        "pending_plan": pending_plan,
    }
