"""The watcher's thread: when to tick, when to drain between ticks, and surviving anything.

A tick comes every ``interval`` seconds, or earlier when the task poll is due sooner.  An
event wakes the loop between ticks: it waits a moment so that a burst of events is drained
once, not once each (every drain takes the write lock that accepting an event needs), and
drains without reading Proxmox.  An exception in a tick is reported and the loop goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

DRAIN_GATHER_SECONDS = 0.05


class WatchLoop:
    def __init__(
        self,
        interval: float,
        tick: Callable[[], None],
        drain: Callable[[], None],
        next_poll: Callable[[], float],
        on_crash: Callable[[Exception], None],
    ):
        """``tick`` and ``drain`` do the work; ``next_poll()`` is the monotonic time the task
        poll is due; ``on_crash`` reports an exception a tick raised."""
        self._interval = interval
        self._tick = tick
        self._drain = drain
        self._next_poll = next_poll
        self._on_crash = on_crash
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pve-janitor-watcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Finish the tick in flight, then stop."""
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout)

    def wake(self) -> None:
        self._wake.set()

    def alive(self) -> bool:
        return bool(self._thread and self._thread.is_alive())

    def _run(self) -> None:
        next_tick = time.monotonic()
        while not self._stop.is_set():
            woken = self._wake.wait(max(0.0, next_tick - time.monotonic()))
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                if woken and time.monotonic() < next_tick:
                    self._stop.wait(min(DRAIN_GATHER_SECONDS, max(0.0, next_tick - time.monotonic())))
                    self._wake.clear()
                    if not self._stop.is_set():
                        self._drain()
                    continue
                started = time.monotonic()
                next_tick = started + self._interval
                self._tick()
                if self._next_poll() > started:
                    # The task poll keeps its own period: a tick comes when it is due, not at
                    # the next regular tick, which may be up to a tick later.
                    next_tick = min(next_tick, self._next_poll())
            except Exception as exc:  # the loop must survive anything; on_crash says what
                logger.exception("watcher tick failed")
                self._on_crash(exc)
