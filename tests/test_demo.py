"""`pve-janitor demo --once` runs the whole story and exits 0 only if every step happened."""

from __future__ import annotations

import os
import subprocess

from conftest import ROOT, cli_command

from receiver.config import without_settings


def test_demo_once_tells_the_whole_story():
    env = without_settings(os.environ)
    proc = subprocess.run(
        cli_command() + ["demo", "--once"], env=env, capture_output=True, text=True, timeout=180, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for step in ("== 1.", "== 2.", "== 3.", "== 4.", "== 5.", "== 6.", "Every step happened."):
        assert step in out
    assert "outcome: refused" in out and "CLEANUP_MAX_DELETE_PERCENT" in out
    assert "41 rows removed" in out
    assert "ghost_apps_removed=43" in out
    assert "Traceback" not in proc.stderr
