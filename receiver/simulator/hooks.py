"""Hookscripts run as Proxmox runs them (PROXMOX.md facts, Hookscripts).

``<script> <vmid> <phase>``, no shell, as the simulator's user, with ``LC_ALL=C`` and
a fixed ``PATH``, working directory ``/``, synchronously.  Only a failing
``pre-start`` aborts the operation; that is the caller's business (``Cluster``).
"""

from __future__ import annotations

import logging
import subprocess
import time

logger = logging.getLogger(__name__)

# pve-guest-common GuestHelpers.pm exec_hookscript: exactly these four phases exist.
HOOK_PHASES = ("pre-start", "post-start", "pre-stop", "post-stop")
HOOK_BASE_ENV = {"LC_ALL": "C", "PATH": "/sbin:/bin:/usr/sbin:/usr/bin"}
# Proxmox has no timeout for a hook; this one only keeps a broken test from hanging.
HOOK_SAFETY_TIMEOUT_S = 60.0
HOOK_OUTPUT_LOG_LIMIT = 2000


def run_hook(script: str, vmid: int, phase: str, env: dict) -> tuple:
    """Run ``script vmid phase``; returns (exit code, seconds). The code is None when the
    script could not run or was killed."""
    began = time.monotonic()
    try:
        proc = subprocess.run(
            [script, str(vmid), phase],
            env=env,
            cwd="/",
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=HOOK_SAFETY_TIMEOUT_S,
            check=False,
        )
        rc: int | None = proc.returncode
        _log_output(vmid, phase, proc)
    except subprocess.TimeoutExpired:
        rc = None
        logger.warning("hookscript for %d on %s killed after %ss", vmid, phase, HOOK_SAFETY_TIMEOUT_S)
    except OSError as exc:
        rc = None
        logger.warning("hookscript for %d on %s could not run: %s", vmid, phase, exc)
    if rc != 0:
        logger.warning("hookscript error for %d on %s: exit %s", vmid, phase, rc)
    return rc, time.monotonic() - began


def _log_output(vmid: int, phase: str, proc: subprocess.CompletedProcess) -> None:
    for stream, data in (("stdout", proc.stdout), ("stderr", proc.stderr)):
        if data:
            text = data.decode("utf-8", "replace")[:HOOK_OUTPUT_LOG_LIMIT]
            logger.debug("hook %d %s %s: %s", vmid, phase, stream, text)
