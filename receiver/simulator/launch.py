"""``pve-janitor serve`` as a real subprocess, started and waited for until ``/healthz`` answers 200.

Tooling, like the rest of this package: the tests, the demo and the benchmarks start a
receiver the way an operator does (the installed command, an environment, a log file), and
this is the one place that knows how.  The product never imports it.

:func:`start` returns once the receiver is healthy (or raises :class:`LaunchError` with the
log's tail, having stopped it); :func:`serving` is the same as a context manager that stops
it on the way out: SIGTERM first, as systemd does, then SIGKILL if it has not exited in time.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

HEALTH_POLL_SECONDS = 0.05


class LaunchError(RuntimeError):
    """The receiver exited, or did not answer ``/healthz`` with 200 before the deadline."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for ``CLEANUP_BIND``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_command() -> list[str]:
    """``pve-janitor`` as installed beside this Python, else ``python -m receiver.cli``."""
    script = Path(sys.executable).with_name("pve-janitor")
    return [str(script)] if script.exists() else [sys.executable, "-m", "receiver.cli"]


class Launched:
    """A started ``pve-janitor serve``: its process, the base URL it serves, its log file."""

    def __init__(self, proc: subprocess.Popen, base: str, log: Path):
        self.proc = proc
        self.base = base
        self.log = log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM and wait for the exit code (``subprocess.TimeoutExpired`` if it hangs)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM; SIGKILL if it has not exited within ``timeout`` seconds.  The exit code."""
        try:
            return self.terminate(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.returncode


def start(env: Mapping[str, str], log: Path, *, timeout: float = 30, cwd: Path | str | None = None) -> Launched:
    """Start ``pve-janitor serve`` with exactly ``env`` and wait until ``/healthz`` answers 200.

    ``env`` must set ``CLEANUP_BIND`` to a ``host:port`` this process can reach: that is where
    ``/healthz`` is asked.  Its output and errors are appended to ``log``.
    """
    bind = env.get("CLEANUP_BIND")
    if not bind:
        raise ValueError("CLEANUP_BIND must be set: the launcher asks /healthz there")
    base = f"http://{bind}"
    with open(log, "ab") as out:
        proc = subprocess.Popen(cli_command() + ["serve"], env=dict(env), stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    launched = Launched(proc, base, Path(log))
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise LaunchError(f"pve-janitor serve exited with {proc.returncode}:\n{_tail(launched)}")
        if _healthy(base):
            return launched
        if time.monotonic() > deadline:
            launched.stop()
            raise LaunchError(
                f"pve-janitor serve did not answer {base}/healthz within {timeout:g} s:\n{_tail(launched)}"
            )
        time.sleep(HEALTH_POLL_SECONDS)


@contextmanager
def serving(
    env: Mapping[str, str], log: Path, *, timeout: float = 30, stop_timeout: float = 30, cwd: Path | str | None = None
) -> Iterator[Launched]:
    """:func:`start`, and :meth:`Launched.stop` on the way out."""
    launched = start(env, log, timeout=timeout, cwd=cwd)
    try:
        yield launched
    finally:
        launched.stop(stop_timeout)


def _healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/healthz", timeout=2) as answer:
            return answer.status == 200
    except OSError:  # refused while starting, or 503 (urllib's HTTPError is an OSError)
        return False


def _tail(launched: Launched, lines: int = 40) -> str:
    return "\n".join(launched.log_text().splitlines()[-lines:])
