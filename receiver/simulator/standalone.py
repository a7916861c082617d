"""``pve-janitor simulator``: a simulator on its own, until Ctrl-C or SIGTERM."""

from __future__ import annotations

import importlib
import logging
import shlex
import signal
import threading
from collections.abc import Callable

from .proxmox import ProxmoxSimulator

logger = logging.getLogger(__name__)


def export_lines(sim: ProxmoxSimulator) -> list:
    """Shell lines that point pve-janitor at ``sim`` (the token is a throwaway one)."""
    lines = [
        "# Proxmox VE simulator at %s" % sim.url,
        "# PVE_TOKEN_VALUE below is a throwaway token of this simulator run, not a real secret.",
    ]
    lines.extend("export %s=%s" % (key, shlex.quote(value)) for key, value in sim.env().items())
    return lines


def run_standalone(
    host: str = "127.0.0.1",
    port: int = 8006,
    scene: str = "seed",
    print_fn: Callable[[str], None] = print,
    stop_event: threading.Event | None = None,
) -> int:
    """Run a simulator until Ctrl-C / SIGTERM (or ``stop_event``); prints the env to export.

    Wrong tokens wait 3 s like real PVE. Returns the exit status (0).
    """
    scene_module = importlib.import_module("receiver.simulator.scene")  # looked up at run time
    stop = stop_event or threading.Event()
    previous = _install_sigterm(stop)
    sim = ProxmoxSimulator(auth_fail_delay=3.0)
    try:
        with sim.start(host=host, port=port):
            scene_module.load_into(sim, scene)
            for line in export_lines(sim):
                print_fn(line)
            print_fn("# Ctrl-C to stop")
            _wait_for(stop)
    finally:
        _restore_sigterm(previous)
    return 0


def _wait_for(stop: threading.Event) -> None:
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        logger.info("interrupted, stopping the simulator")


def _install_sigterm(stop: threading.Event):
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())


def _restore_sigterm(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
