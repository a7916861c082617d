"""The systemd unit install.sh writes: its sandbox score, and a receiver that runs inside it.

``systemd-analyze security --offline=yes`` scores the unit as written (exposure ≤ 2.0).
systemd is not PID 1 where the tests run, so the unit cannot be started as such; the
receiver is instead started under the parts of the sandbox that can break a Python
process, applied the way systemd applies them: the unit's own ``SystemCallFilter=``
(expanded by ``systemd-analyze syscall-filter``, denied calls failing with EPERM),
``RestrictAddressFamilies=`` as a filter on ``socket()``, ``MemoryDenyWriteExecute=``
(the kernel's ``PR_SET_MDWE``) and ``NoNewPrivileges=``.  The mount options
(``ProtectSystem=``, ``ProcSubset=``, ...) are not reproduced here.
"""

from __future__ import annotations

import errno
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import cli_command, janitor_env
from test_install import UNIT_FILE, Env, assert_ok, env  # noqa: F401  (env: the fixture)

from receiver.simulator.launch import free_port
from receiver.simulator.scene import create_apps_table

MAX_EXPOSURE = 2.0
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed (Debian: package systemd)")


@pytest.fixture
def unit(env: Env) -> Path:  # noqa: F811  (the fixture imported above)
    """The unit as ``install.sh receiver`` writes it."""
    assert_ok(env.run("receiver", extra_env={"PVE_JANITOR_ASSUME_SYSTEMD": "0"}))
    return env.root / UNIT_FILE


def settings_of(unit: Path, name: str) -> list[str]:
    return [line.split("=", 1)[1] for line in unit.read_text().splitlines() if line.startswith(f"{name}=")]


@needs_analyze
def test_the_unit_scores_at_most_2_in_systemd_analyze_security(unit: Path) -> None:
    result = subprocess.run(
        [str(ANALYZE), "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, result.stdout


def test_the_unit_is_notified_and_watched_and_retries_what_a_restart_can_fix(unit: Path) -> None:
    assert settings_of(unit, "Type") == ["notify"]
    assert settings_of(unit, "NotifyAccess") == ["main"]
    assert [int(s) for s in settings_of(unit, "WatchdogSec")] and int(settings_of(unit, "WatchdogSec")[0]) >= 10
    assert settings_of(unit, "Restart") == ["on-failure"]  # a missed watchdog is a failure
    prevented = {int(code) for value in settings_of(unit, "RestartPreventExitStatus") for code in value.split()}
    assert prevented == {2}  # configuration errors only: 3 (port in use, database down) is retried


def test_a_port_in_use_exits_3_which_systemd_retries(sim, sqlite_db, unit: Path) -> None:
    create_apps_table(sqlite_db.engine)  # everything else is in order
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        environ = janitor_env(sim, sqlite_db, CLEANUP_BIND=f"127.0.0.1:{port}")
        proc = subprocess.run(cli_command() + ["serve"], env=environ, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert f"CLEANUP_BIND=127.0.0.1:{port}: cannot listen now: Address already in use" in proc.stderr
    assert "a restart may succeed" in proc.stderr and "Traceback" not in proc.stderr
    assert str(proc.returncode) not in " ".join(settings_of(unit, "RestartPreventExitStatus")).split()


# --- the receiver inside the unit's system-call sandbox -------------------------

SANDBOX_LAUNCHER = r"""
import ctypes, os, socket, sys
PR_SET_NO_NEW_PRIVS, PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 38, 65, 1
SCMP_ACT_ALLOW, SCMP_ACT_ERRNO_EPERM, SCMP_CMP_EQ = 0x7FFF0000, 0x00050000 | 1, 4

class ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]

libc = ctypes.CDLL(None, use_errno=True)
for option, value in ((PR_SET_NO_NEW_PRIVS, 1), (PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN)):
    if libc.prctl(option, value, 0, 0, 0) != 0:
        sys.exit(f"prctl({option}) failed: {os.strerror(ctypes.get_errno())}")
seccomp = ctypes.CDLL("libseccomp.so.2")
seccomp.seccomp_init.restype = ctypes.c_void_p
seccomp.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
seccomp.seccomp_rule_add_array.argtypes = [
    ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(ArgCmp)
]
seccomp.seccomp_load.argtypes = [ctypes.c_void_p]
ctx = seccomp.seccomp_init(SCMP_ACT_ERRNO_EPERM)
families, allowed, command = sys.argv[1], sys.argv[2], sys.argv[3:]
for name in allowed.split(","):
    number = seccomp.seccomp_syscall_resolve_name(name.encode())
    if number < 0 or name == "socket":
        continue  # not a call on this architecture; socket() is allowed per family below
    if seccomp.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, number, 0, None) != 0:
        sys.exit(f"seccomp rule for {name} failed")
for family in families.split():
    cmp = ArgCmp(0, SCMP_CMP_EQ, getattr(socket, family), 0)
    number = seccomp.seccomp_syscall_resolve_name(b"socket")
    if seccomp.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, number, 1, ctypes.byref(cmp)) != 0:
        sys.exit(f"seccomp rule for socket({family}) failed")
if seccomp.seccomp_load(ctx) != 0:
    sys.exit("seccomp_load failed")
os.execv(command[0], command)
"""


def sandboxed(unit: Path, code: str) -> subprocess.CompletedProcess:
    """``python -c code`` under the unit's system-call sandbox."""
    (families,) = settings_of(unit, "RestrictAddressFamilies")
    command = [sys.executable, "-c", SANDBOX_LAUNCHER, families, ",".join(sorted(allowed_syscalls(unit)))]
    return subprocess.run([*command, sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def syscall_groups() -> dict[str, list[str]]:
    """``systemd-analyze syscall-filter``: every ``@group`` with its calls and subgroups."""
    out = subprocess.run([str(ANALYZE), "syscall-filter", "--no-pager"], capture_output=True, text=True, check=True)
    groups: dict[str, list[str]] = {}
    current: list[str] = []
    for line in out.stdout.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.split()[0], [])
        elif line.strip() and not line.strip().startswith("#"):
            current.append(line.split()[0])
    return groups


def allowed_syscalls(unit: Path) -> set[str]:
    """What the unit's ``SystemCallFilter=`` lines allow: the allow-list, minus each ``~`` list."""
    groups = syscall_groups()

    def expand(names: list[str]) -> set[str]:
        out: set[str] = set()
        for name in names:
            out |= expand(groups[name]) if name.startswith("@") else {name}
        return out

    allowed: set[str] = set()
    for value in settings_of(unit, "SystemCallFilter"):
        if value.startswith("~"):
            allowed -= expand(value[1:].split())
        else:
            allowed |= expand(value.split())
    return allowed


def _libseccomp() -> bool:
    try:
        import ctypes

        ctypes.CDLL("libseccomp.so.2")
        return True
    except OSError:
        return False


def _mdwe() -> bool:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    PR_GET_MDWE = 66
    return libc.prctl(PR_GET_MDWE, 0, 0, 0, 0) >= 0 or ctypes.get_errno() != errno.EINVAL


sandbox = pytest.mark.skipif(
    ANALYZE is None or not _libseccomp() or not _mdwe(),
    reason="needs systemd-analyze, libseccomp.so.2 (Debian: libseccomp2) and a kernel with PR_SET_MDWE (Linux >= 6.3)",
)


@sandbox
@pytest.mark.parametrize(
    ("code", "refused"),
    [
        ("import socket; socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)", "PermissionError"),
        ("import os; os.setuid(1)", "PermissionError"),
        ("import os; os.nice(1)", "PermissionError"),  # setpriority: @resources
        ("import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)", "PermissionError"),
    ],
)
def test_the_sandbox_refuses_what_the_unit_forbids(unit: Path, code: str, refused: str) -> None:
    """The control: the emulation bites, so a receiver that runs inside it has been tested."""
    assert sandboxed(unit, "print('ok')").stdout == "ok\n"
    result = sandboxed(unit, code)
    assert result.returncode != 0 and refused in result.stderr, result.stderr


@sandbox
def test_the_receiver_serves_inside_the_units_system_call_sandbox(sim, sqlite_db, tmp_path: Path, unit: Path) -> None:
    assert settings_of(unit, "MemoryDenyWriteExecute") == ["yes"] and settings_of(unit, "NoNewPrivileges") == ["yes"]
    assert settings_of(unit, "SystemCallErrorNumber") == ["EPERM"]
    allowed = allowed_syscalls(unit)
    assert "mount" not in allowed and "setuid" not in allowed and "setrlimit" not in allowed and "read" in allowed
    (families,) = settings_of(unit, "RestrictAddressFamilies")
    create_apps_table(sqlite_db.engine)
    port = free_port()
    environ = janitor_env(
        sim,
        sqlite_db,
        CLEANUP_BIND=f"127.0.0.1:{port}",
        CLEANUP_HOOK_SECRET=secrets.token_hex(16),
        CLEANUP_ADMIN_TOKEN=secrets.token_hex(16),
    )
    command = [sys.executable, "-c", SANDBOX_LAUNCHER, families, ",".join(sorted(allowed)), *cli_command(), "serve"]
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, env=environ, stdout=out, stderr=subprocess.STDOUT)
    try:
        health = None
        deadline = time.monotonic() + 30
        while health is None and proc.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as answer:
                    health = answer.status
            except OSError:
                time.sleep(0.1)
        assert health == 200, log.read_text()
        # The first sweep (due at start) reads Proxmox over HTTPS and records itself in SQLite.
        outcomes: list[str] = []
        while not outcomes and time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
                outcomes = re.findall(
                    r'^pve_janitor_sweeps_total\{outcome="(\w+)"\} 1\.0$', answer.read().decode(), re.M
                )
            time.sleep(0.1)
        assert outcomes in (["nothing"], ["dry_run"]), log.read_text()
        proc.terminate()
        assert proc.wait(30) == 0, log.read_text()
        assert "Traceback" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
