"""systemd's notify protocol: ``READY=1``, ``WATCHDOG=1`` keep-alives, ``STOPPING=1``.

The unit runs ``serve`` with ``Type=notify`` and ``WatchdogSec=``: systemd counts the
receiver as started once it says ``READY=1`` (it listens), and restarts it when the
keep-alives stop.  Keep-alives are sent only while ``healthy()`` holds (the watcher's
thread and the scheduler run): a receiver whose HTTP side still answers but whose
background threads died is restarted, not left serving a half.

The protocol is one datagram of ``NAME=value`` lines to the Unix socket named by
``$NOTIFY_SOCKET`` (``@name`` for the abstract namespace); ``$WATCHDOG_USEC`` gives the
watchdog period, and a keep-alive goes out every half of it.  Standard library only, and
nothing is sent outside systemd (no ``$NOTIFY_SOCKET``), so tests and manual runs are
unaffected.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping

logger = logging.getLogger(__name__)


def _address(environ: Mapping[str, str]) -> str | None:
    name = environ.get("NOTIFY_SOCKET", "")
    if name.startswith("@"):
        return "\0" + name[1:]
    if name.startswith("/"):
        return name
    return None  # unset, or a kind this module does not speak (vsock)


def send(*fields: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``fields`` (``NAME=value``) to systemd; False when not under systemd or it failed.

    A failure is logged, never raised: the receiver must not stop because systemd's
    socket is briefly unavailable (a missed keep-alive is what the watchdog is for).
    """
    address = _address(os.environ if environ is None else environ)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
    except OSError as exc:
        logger.warning("systemd notify (%s) failed: %s", ", ".join(fields), exc)
        return False
    return True


def ready(status: str = "") -> bool:
    """The receiver listens: systemd may count it as started."""
    return send("READY=1", *([f"STATUS={status}"] if status else []))


def stopping() -> bool:
    """Shutting down: the keep-alives end on purpose."""
    return send("STOPPING=1")


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between keep-alives (half the watchdog period), or None when no watchdog is set.

    ``$WATCHDOG_PID``, when set, names the process systemd watches: another process (a
    child that inherited the environment) must not send keep-alives in its place.
    """
    environ = os.environ if environ is None else environ
    if _address(environ) is None:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


class KeepAlive:
    """A thread that sends ``WATCHDOG=1`` every ``interval`` seconds while ``healthy()`` holds.

    When ``healthy()`` turns false the keep-alives stop (systemd then restarts the service
    after ``WatchdogSec=``) and the reason is logged once, and given to systemd as
    ``STATUS=``; they resume if it holds again before that.
    """

    def __init__(
        self,
        healthy: Callable[[], str | None],
        interval: float,
        send: Callable[..., bool] = send,
    ):
        """``healthy()`` returns None when all is well, else what is wrong (for the log)."""
        self._healthy = healthy
        self._interval = interval
        self._send = send
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent = 0

    def start(self) -> KeepAlive:
        self._thread = threading.Thread(target=self._run, name="pve-janitor-keepalive", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def beat(self, was_wrong: str | None = None) -> str | None:
        """One round: a keep-alive if healthy; what is wrong otherwise (logged when it changes)."""
        wrong = self._healthy()
        if wrong is None:
            if was_wrong is not None:
                logger.warning("systemd watchdog: keep-alives resumed")
            if self._send("WATCHDOG=1"):
                self.sent += 1
        elif wrong != was_wrong:
            logger.error("systemd watchdog: keep-alives stopped (%s); systemd will restart the receiver", wrong)
            self._send(f"STATUS=unhealthy: {wrong}")
        return wrong

    def _run(self) -> None:
        wrong = self.beat()
        while not self._stop.wait(self._interval):
            wrong = self.beat(wrong)


def start_keepalive(healthy: Callable[[], str | None]) -> KeepAlive | None:
    """Keep-alives every half ``$WATCHDOG_USEC`` while ``healthy()``; None (nothing started) without a watchdog."""
    interval = watchdog_interval()
    if interval is None:
        return None
    logger.info("systemd watchdog: a keep-alive every %.1f s while the watcher and scheduler run", interval)
    return KeepAlive(healthy, interval).start()
