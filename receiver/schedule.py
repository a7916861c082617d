"""The periodic sweep, on APScheduler; started from ``serve`` only.

One job: a sweep at start, then every ``CLEANUP_INTERVAL_MINUTES``.
``max_instances=1`` and ``coalesce=True``: a slow sweep is never run twice at
once, and missed runs collapse into one.  With several receivers, only the
lease holder sweeps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.exc import SQLAlchemyError

from .timeutil import utcnow

if TYPE_CHECKING:  # types only: no import at run time
    from .lease import Lease
    from .sweep import Sweeper

logger = logging.getLogger(__name__)

JOB_ID = "pve-janitor-sweep"


def sweep_job(sweeper: Sweeper, lease: Lease | None, housekeeping: Callable[[], object] | None = None) -> None:
    if lease is not None and not lease.acquire():
        logger.info("scheduled sweep skipped: another receiver holds the lease")
        return
    if sweeper.try_run(source="sweep") is None:
        logger.info("scheduled sweep skipped: a sweep is already running")
    if housekeeping is not None:
        try:
            housekeeping()
        except SQLAlchemyError as exc:
            logger.warning("housekeeping failed: %s; will retry at the next sweep", type(exc).__name__)


def make_scheduler(
    sweeper: Sweeper,
    interval_minutes: int,
    lease: Lease | None = None,
    housekeeping: Callable[[], object] | None = None,
) -> BackgroundScheduler:
    """``housekeeping`` runs after each scheduled sweep on the lease holder (inbox pruning).

    The first run is due at once.  APScheduler keeps its own (wall) time, so its times come
    from :func:`utcnow`, not from the runtime's clock a test may have pinned.
    """
    scheduler = BackgroundScheduler(timezone="UTC", daemon=True)
    scheduler.add_job(
        sweep_job,
        "interval",
        minutes=interval_minutes,
        args=(sweeper, lease, housekeeping),
        id=JOB_ID,
        max_instances=1,
        coalesce=True,
        misfire_grace_time=None,
        next_run_time=utcnow(),
    )
    return scheduler


def request_sweep(scheduler: BackgroundScheduler) -> None:
    """Run the scheduled sweep now (the interval goes on from there)."""
    job = scheduler.get_job(JOB_ID)
    if job is not None:
        job.modify(next_run_time=utcnow())
