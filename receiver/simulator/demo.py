"""``pve-janitor demo``: the whole loop on a laptop, told as a story.

Everything is real except the cluster: the simulator serves the Proxmox API
over HTTPS and runs the real hookscript on every stop/start, the receiver is
``pve-janitor serve`` in a subprocess, the platform database is a SQLite file
with the seed platform's scene.  ``--once`` runs the story and exits 0 only if
every step happened (CI runs it); without it, it keeps running until Ctrl-C so
you can look at the URLs it prints.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from ..config import without_settings
from ..db import make_engine
from ..shipped import HOOKSCRIPT
from . import launch
from .launch import Launched, free_port
from .proxmox import ProxmoxSimulator
from .scene import ERROR_VMIDS, RUNNING_VMIDS, seed_database, seed_guests

UNHOOKED_VMID = RUNNING_VMIDS[-1]  # the guest whose hookscript was never attached


class StepFailed(Exception):
    pass


class Demo:
    def __init__(self, workdir: Path, echo: Callable[[str], None] = print):
        self.dir = workdir
        self.echo = echo
        self.db_path = workdir / "platform.db"
        self.db_url = f"sqlite:///{self.db_path}"
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.secret = secrets.token_hex(16)
        self.admin = secrets.token_hex(16)
        self.sim = ProxmoxSimulator(nodes=("pve1", "pve2"))
        self.engine = make_engine(self.db_url)  # connects only when first used
        self.receiver: Launched | None = None
        self.log_path = workdir / "receiver.log"

    # --- plumbing -----------------------------------------------------------

    def http(self, method: str, path: str, token: str | None = None) -> tuple[int, Any]:
        request = urllib.request.Request(self.base + path, method=method)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    def vmids(self) -> list[int]:
        with self.engine.connect() as conn:
            return sorted(v for v in conn.execute(sa.text("SELECT lxc_id FROM apps")).scalars() if v is not None)

    def status_of(self, vmid: int) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.text("SELECT status FROM apps WHERE lxc_id = :v"), {"v": vmid}).scalar()

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if check():
                return time.monotonic() - started
            time.sleep(0.05)
        raise StepFailed(f"{what}: not within {timeout:g} s")

    def env(self) -> dict[str, str]:
        env = without_settings(os.environ)
        env.update(self.sim.env())
        env.update(
            {
                "DATABASE_URL": self.db_url,
                "CLEANUP_HOOK_SECRET": self.secret,
                "CLEANUP_ADMIN_TOKEN": self.admin,
                "CLEANUP_BIND": f"127.0.0.1:{self.port}",
            }
        )
        return env

    # --- set-up ---------------------------------------------------------------

    def start(self) -> None:
        seed_database(self.engine)
        self.sim.start()
        hook_conf = self.dir / "hook.conf"
        hook_conf.write_text(f"URL={self.base}\nSECRET={self.secret}\nTIMEOUT=2\nSPOOL_DIR={self.dir / 'spool'}\n")
        hook_conf.chmod(0o600)
        self.sim.hook_env = {"PVE_JANITOR_HOOK_CONF": str(hook_conf)}
        for guest in seed_guests():
            if guest["vmid"] != UNHOOKED_VMID and not guest.get("template"):
                guest["hookscript"] = str(HOOKSCRIPT)
            self.sim.add_guest(**guest)
        try:
            self.receiver = launch.start(self.env(), self.log_path, timeout=30, cwd=self.dir)
        except launch.LaunchError as exc:
            raise StepFailed(f"{str(exc).splitlines()[0]}; see {self.log_path}") from exc

    def stop(self) -> None:
        if self.receiver:
            self.receiver.stop(20)
        self.sim.stop()
        self.engine.dispose()

    # --- the story ------------------------------------------------------------

    def story(self) -> None:
        say = self.echo
        say(
            f"\n== The scene: a platform database with {len(self.vmids())} apps "
            f"({len(ERROR_VMIDS)} error rows whose guests are gone, {len(RUNNING_VMIDS)} running); "
            f"Proxmox has {len(self.sim.vmids())} guests."
        )
        say(f"   Receiver: {self.base}  (stats: {self.base}/api/v1/system/cleanup/stats, metrics: {self.base}/metrics)")
        say(f"   Proxmox simulator: {self.sim.url}")

        say("\n== 1. The first sweep (run by `serve` at start) and why the guard stops it")
        self.wait_for("the initial sweep finished", lambda: self._last_sweep() is not None, 30)
        last = self._last_sweep() or {}
        say(f"   outcome: {last['outcome']} — {last['reason']}")
        if last["outcome"] != "refused" or len(self.vmids()) != 47:
            raise StepFailed("the guard should have refused the first sweep and changed nothing")
        code, plan = self.http("POST", "/api/v1/system/cleanup/run?dry_run=true&force=true", self.admin)
        say(f"   the plan (dry run): {len(plan['planned'])} rows, for example:")
        for action in plan["planned"][:3]:
            say(
                f"     {action['action']} row {action['row_id']} VMID {action['vmid']} "
                f"{action['hostname']}: {action['reason']}: {action['detail']}"
            )
        say(f"   reports (never acted on): {len(plan['reports'])}, e.g. {plan['reports'][0]['detail']}")

        say("\n== 2. An operator checks the plan and forces the cleanup")
        code, result = self.http("POST", "/api/v1/system/cleanup/run?force=true", self.admin)
        say(
            f"   POST /api/v1/system/cleanup/run?force=true -> {code}: {result['outcome']}, "
            f"{result['applied']} rows removed"
        )
        if code != 200 or self.vmids() != list(RUNNING_VMIDS):
            raise StepFailed(f"forced cleanup should leave exactly the 6 running apps, left {self.vmids()}")
        say(f"   left: {len(self.vmids())} apps, VMIDs {self.vmids()}")

        victim = RUNNING_VMIDS[0]
        say(f"\n== 3. Someone stops and destroys guest {victim} by hand")
        runs_before = len(self.sim.hook_runs)
        self.sim.stop_guest(victim)
        phases = [run[1] for run in self.sim.hook_runs[runs_before:]]
        say(f"   the hookscript ran for: {', '.join(phases)}")
        self.wait_for("row marked stopped", lambda: self.status_of(victim) == "stopped", 10)
        say(f"   the row's status is now {self.status_of(victim)!r} (the guest still exists)")
        self.sim.destroy_guest(victim)
        took = self.wait_for(f"row of {victim} gone", lambda: victim not in self.vmids(), 10)
        say(f"   destroyed; the row was gone {took:.1f} s later (two confirming inventory reads)")

        say(f"\n== 4. Guest {UNHOOKED_VMID} (no hookscript attached) is stopped, then destroyed: no event at all")
        self.sim.stop_guest(UNHOOKED_VMID)
        self.sim.destroy_guest(UNHOOKED_VMID)
        took = self.wait_for(f"row of {UNHOOKED_VMID} gone", lambda: UNHOOKED_VMID not in self.vmids(), 20)
        say(f"   the task tail saw the finished vzdestroy; the row was gone {took:.1f} s later")

        say("\n== 5. Nothing is lost: restore a removed row")
        code, history = self.http("GET", "/api/v1/system/cleanup/history?limit=50")
        entry = next(e for e in history["entries"] if e["vmid"] == ERROR_VMIDS[0])
        restored = subprocess.run(
            [sys.executable, "-m", "receiver.cli", "restore", str(entry["id"])],
            env=self.env(),
            capture_output=True,
            text=True,
            cwd=self.dir,
        )
        say(f"   $ pve-janitor restore {entry['id']}\n   {restored.stdout.strip() or restored.stderr.strip()}")
        if restored.returncode != 0 or ERROR_VMIDS[0] not in self.vmids():
            raise StepFailed("restore should put the row back")

        say("\n== 6. The stats")
        code, stats = self.http("GET", "/api/v1/system/cleanup/stats")
        say(
            f"   ghost_apps_removed={stats['ghost_apps_removed']} old_errors_removed={stats['old_errors_removed']} "
            f"ports_freed={stats['ports_freed']} total_removed={stats['total_removed']} "
            f"rows_restored={stats.get('rows_restored')}"
        )
        if stats["ghost_apps_removed"] != len(ERROR_VMIDS) + 2:
            raise StepFailed(f"expected {len(ERROR_VMIDS) + 2} ghosts removed, stats say {stats['ghost_apps_removed']}")

    def _last_sweep(self) -> dict | None:
        code, stats = self.http("GET", "/api/v1/system/cleanup/stats")
        last = stats.get("last_sweep") if code == 200 else None
        return last if last and last.get("outcome") else None


def run(once: bool, echo: Callable[[str], None] = print) -> int:
    with tempfile.TemporaryDirectory(prefix="pve-janitor-demo-") as workdir:
        demo = Demo(Path(workdir), echo)
        try:
            if not HOOKSCRIPT.exists():
                raise StepFailed(f"the hookscript is not at {HOOKSCRIPT}: reinstall pve-janitor")
            demo.start()
            demo.story()
            echo("\nEvery step happened.")
            if not once:
                echo(
                    f"\nStill running: try  curl -s {demo.base}/api/v1/system/cleanup/stats  "
                    f"or  curl -s {demo.base}/metrics\nCtrl-C to stop."
                )
                try:
                    while demo.receiver is not None and demo.receiver.alive():
                        time.sleep(0.5)
                except KeyboardInterrupt:
                    echo("stopping")
            return 0
        except StepFailed as exc:
            echo(f"\nDEMO FAILED: {exc}")
            if demo.log_path.exists():
                echo("--- receiver log (last 30 lines) ---")
                echo("\n".join(demo.log_path.read_text().splitlines()[-30:]))
            return 1
        finally:
            demo.stop()
