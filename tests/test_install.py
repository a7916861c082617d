"""install.sh, run as a real subprocess under ``--root`` with fake Proxmox and system tools.

Every fake (``pct``, ``qm``, ``pvesm``, ``pvesh``, ``systemctl``, ``useradd``,
``chown``, and the python that creates the venv) appends its argv to a calls log
and keeps just enough state for a second run to see what the first one did:
``pct set`` writes the guest's config, ``pvesm set`` rewrites storage.cfg under the
root, ``systemctl enable --now`` marks the unit enabled and active, ``useradd``
adds the user to the root's passwd.  So "running twice = once" is checked against
the same evidence a real node would give.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "install.sh"
HOOK_SOURCE = REPO / "hookscript" / "pve-janitor-hook"
SECRET = "s3cret-Value-for-tests-0123456789"
URL = "http://10.0.0.5:8765"
OURS = "local:snippets/pve-janitor-hook"
# Commands that change state; none may run twice, none may run in dry-run mode.
STATE_CHANGING = re.compile(
    r"^(pct set|qm set|pvesm set|useradd|chown|pip install|python -m venv|"
    r"systemctl (enable|restart|start|daemon-reload))"
)

STORAGE_CFG = """\
dir: local
\tpath /var/lib/vz
\tcontent iso,vztmpl,backup
\tshared 0

lvmthin: local-lvm
\tthinpool data
\tvgname pve
\tcontent rootdir,images
"""

LOG = 'printf \'%s\\n\' "$(basename "$0") $*" >>"$FAKE_CALLS"'

FAKES = {
    # Guests are files $FAKE_STATE/{lxc,qemu}/<vmid>.conf holding `pct config` output.
    "pct": f"""#!/bin/bash
{LOG}
dir=$FAKE_STATE/lxc
case $1 in
list)
    [ -z "${{FAKE_FAIL_LIST:-}}" ] || {{ echo "ipcc_send_rec failed" >&2; exit 255; }}
    echo "VMID       Status     Lock         Name"
    for f in "$dir"/*.conf; do [ -e "$f" ] || continue; v=$(basename "$f" .conf)
        printf '%-10s %-10s %-12s ct%s\\n' "$v" running "" "$v"; done ;;
config) [ -f "$dir/$2.conf" ] || {{ echo "Configuration file 'nodes/pve/lxc/$2.conf' does not exist" >&2; exit 2; }}
    cat "$dir/$2.conf" ;;
set) [ "$3" = --hookscript ] || exit 9
    grep -q '^lock:' "$dir/$2.conf" && {{ echo "CT is locked (backup)" >&2; exit 25; }}
    grep -v '^hookscript:' "$dir/$2.conf" >"$dir/$2.tmp" || true
    echo "hookscript: $4" >>"$dir/$2.tmp"; mv "$dir/$2.tmp" "$dir/$2.conf" ;;
*) exit 9 ;;
esac
""",
    "qm": f"""#!/bin/bash
{LOG}
dir=$FAKE_STATE/qemu
case $1 in
list)
    echo "      VMID NAME                 STATUS     MEM(MB)    BOOTDISK(GB) PID"
    for f in "$dir"/*.conf; do [ -e "$f" ] || continue; v=$(basename "$f" .conf)
        printf '%10s %-20s %-10s %-10s %12s %s\\n' "$v" "vm$v" stopped 2048 32.00 0; done ;;
config) [ -f "$dir/$2.conf" ] || {{ echo "no such VM" >&2; exit 2; }}
    cat "$dir/$2.conf" ;;
set) [ "$3" = --hookscript ] || exit 9
    grep -v '^hookscript:' "$dir/$2.conf" >"$dir/$2.tmp" || true
    echo "hookscript: $4" >>"$dir/$2.tmp"; mv "$dir/$2.tmp" "$dir/$2.conf" ;;
*) exit 9 ;;
esac
""",
    "pvesm": f"""#!/bin/bash
{LOG}
cfg=$FAKE_ROOT/etc/pve/storage.cfg
case $1 in
set) [ "$2" = local ] && [ "$3" = --content ] || exit 9
    [ -f "$cfg" ] || exit 0
    awk -v c="$4" '/^[^[:space:]]/ {{ s = ($0 == "dir: local") }}
        s && $1 == "content" {{ print "\\tcontent " c; next }} {{ print }}' "$cfg" >"$cfg.tmp"
    mv "$cfg.tmp" "$cfg" ;;
path) store=${{2%%:*}}; echo "/mnt/pve/$store/${{2#*:}}" ;;
*) exit 9 ;;
esac
""",
    # The cluster: $FAKE_STATE/cluster/<node> per node (default: only "pve", this node),
    # holding the volids of its local snippets; a node whose file says "offline" fails.
    "pvesh": f"""#!/bin/bash
{LOG}
cluster=$FAKE_STATE/cluster
case "$1 $2" in
"get /storage/local")
    echo '{{"content":"vztmpl,iso,backup","digest":"abc","path":"/var/lib/vz","storage":"local","type":"dir"}}' ;;
"get /nodes")
    [ -z "${{FAKE_FAIL_NODES:-}}" ] || {{ echo "ipcc_send_rec[1] failed: Connection refused" >&2; exit 255; }}
    [ -d "$cluster" ] || {{ echo '[{{"id":"node/pve","node":"pve","status":"online","type":"node"}}]'; exit 0; }}
    out=""
    for f in "$cluster"/*; do n=$(basename "$f")
        out+="{{\\"id\\":\\"node/$n\\",\\"level\\":\\"\\",\\"node\\":\\"$n\\","
        out+="\\"status\\":\\"online\\",\\"type\\":\\"node\\"}},"; done
    echo "[${{out%,}}]" ;;
"get /nodes/"*)
    n=${{2#/nodes/}}; n=${{n%%/*}}
    [ "$2 $3 $4" = "/nodes/$n/storage/local/content --content snippets" ] || exit 9
    f=$cluster/$n
    [ -f "$f" ] || {{ echo "no such node '$n'" >&2; exit 2; }}
    grep -qx offline "$f" && {{ echo "hostname lookup '$n' failed - failed to get address info" >&2; exit 2; }}
    out=""
    while read -r v; do [ -n "$v" ] || continue
        out+="{{\\"content\\":\\"snippets\\",\\"format\\":\\"snippet\\","
        out+="\\"size\\":1,\\"volid\\":\\"$v\\"}},"; done <"$f"
    echo "[${{out%,}}]" ;;
*) exit 9 ;;
esac
""",
    "systemctl": f"""#!/bin/bash
{LOG}
state=$FAKE_STATE/systemd
touch "$state"
case $1 in
is-enabled) grep -qx enabled "$state" ;;
is-active) grep -qx active "$state" ;;
enable) echo enabled >>"$state"; [ "$2" = --now ] && echo active >>"$state"; exit 0 ;;
restart|start) echo active >>"$state" ;;
daemon-reload) ;;
*) exit 9 ;;
esac
""",
    # Like useradd --prefix: the user lands in the root's passwd, with this process's ids.
    "useradd": f"""#!/bin/bash
{LOG}
prefix=""
while [ $# -gt 1 ]; do [ "$1" = --prefix ] && prefix=$2; shift; done
mkdir -p "$prefix/etc"
echo "$1:x:$FAKE_UID:$FAKE_GID::/var/lib/pve-janitor:/usr/sbin/nologin" >>"$prefix/etc/passwd"
echo "$1:x:$FAKE_GID:" >>"$prefix/etc/group"
""",
    "chown": f"""#!/bin/bash
{LOG}
""",
}


def fake_python(real: str) -> str:
    """`python -m venv DIR` makes stub pip / pve-janitor that log; anything else is the real python."""
    return f"""#!/bin/bash
if [ "$1" = -m ] && [ "$2" = venv ]; then
    printf 'python -m venv %s\\n' "$3" >>"$FAKE_CALLS"
    mkdir -p "$3/bin"
    ln -sf {real} "$3/bin/python"
    cat >"$3/bin/pip" <<'EOF'
#!/bin/bash
printf 'pip %s\\n' "$*" >>"$FAKE_CALLS"
bin=$(dirname "$0")
printf '#!/bin/sh\\nexit 0\\n' >"$bin/pve-janitor"
chmod 755 "$bin/pve-janitor"
EOF
    chmod 755 "$3/bin/pip"
    exit 0
fi
exec {real} "$@"
"""


@dataclass
class Env:
    root: Path
    bin: Path
    state: Path
    calls_file: Path
    base_env: dict = field(default_factory=dict)

    def run(
        self, *args: str, root: bool = True, extra_env: dict | None = None, script: Path = SCRIPT
    ) -> subprocess.CompletedProcess:
        env = dict(self.base_env, **(extra_env or {}))
        argv = [str(script), *args] + (["--root", str(self.root)] if root else [])
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)

    def calls(self) -> list[str]:
        """The calls logged since the last look."""
        if not self.calls_file.exists():
            return []
        lines = self.calls_file.read_text().splitlines()
        self.calls_file.write_text("")
        return lines

    def guest(self, kind: str, vmid: int, hookscript: str | None = None) -> Path:
        path = self.state / kind / f"{vmid}.conf"
        text = f"arch: amd64\nhostname: g{vmid}\nmemory: 512\n"
        if hookscript:
            text += f"hookscript: {hookscript}\n"
        path.write_text(text)
        return path

    def cluster(self, **nodes: list[str] | str) -> None:
        """The cluster's nodes besides this one ("pve"): each with its local snippets'
        volids, or "offline"."""
        (self.state / "cluster").mkdir(exist_ok=True)
        (self.state / "cluster" / "pve").write_text(OURS + "\n")
        for name, vols in nodes.items():
            (self.state / "cluster" / name).write_text(
                vols + "\n" if isinstance(vols, str) else "".join(v + "\n" for v in vols)
            )

    def hookscript_of(self, kind: str, vmid: int) -> str | None:
        for line in (self.state / kind / f"{vmid}.conf").read_text().splitlines():
            if line.startswith("hookscript: "):
                return line.split(": ", 1)[1]
        return None

    def tree(self) -> dict[str, tuple[int, bytes]]:
        """Every file under the root with its mode and content, to compare runs."""
        out = {}
        for p in sorted(self.root.rglob("*")):
            if p.is_file() and not p.is_symlink():
                out[str(p.relative_to(self.root))] = (stat.S_IMODE(p.stat().st_mode), p.read_bytes())
        return out


# The root's files before install.sh runs: empty user and group files.
SYSTEM_TREE = {"etc/group": (0o644, b""), "etc/passwd": (0o644, b"")}


@pytest.fixture
def env(tmp_path: Path) -> Env:
    root, bindir, state = tmp_path / "root", tmp_path / "bin", tmp_path / "state"
    for d in (root / "etc", bindir, state / "lxc", state / "qemu"):
        d.mkdir(parents=True)
    for name in SYSTEM_TREE:  # a system tree, as useradd --prefix needs
        (root / name).write_text("")
        (root / name).chmod(0o644)
    for name, text in FAKES.items():
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    (bindir / "python").write_text(fake_python(sys.executable))
    (bindir / "python").chmod(0o755)
    calls = tmp_path / "calls.log"
    base_env = {
        "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(tmp_path),
        "LC_ALL": "C",
        "FAKE_CALLS": str(calls),
        "FAKE_STATE": str(state),
        "FAKE_ROOT": str(root),
        "FAKE_UID": str(os.getuid()),
        "FAKE_GID": str(os.getgid()),
        "PVE_JANITOR_PYTHON": str(bindir / "python"),
        "PVE_JANITOR_NODE": "pve",  # this node's name in the fake cluster
    }
    return Env(root, bindir, state, calls, base_env)


@pytest.fixture
def node(env: Env) -> Env:
    """A Proxmox node: storage.cfg without snippets; CT 101 bare, CT 102 with another
    hookscript, VM 200 bare, VM 201 already ours."""
    (env.root / "etc/pve").mkdir(parents=True)
    (env.root / "etc/pve/storage.cfg").write_text(STORAGE_CFG)
    env.guest("lxc", 101)
    env.guest("lxc", 102, "local:snippets/other-hook")
    env.guest("qemu", 200)
    env.guest("qemu", 201, OURS)
    return env


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def env_values(path: Path) -> dict[str, str]:
    """Active KEY=value lines (comments skipped)."""
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            out[key] = value
    return out


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "error" not in result.stderr, result.stderr


def assert_no_secret(result: subprocess.CompletedProcess, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in result.stdout and secret not in result.stderr


# --- receiver ---------------------------------------------------------------------

ENV_FILE = "etc/pve-janitor/janitor.env"
UNIT_FILE = "etc/systemd/system/pve-janitor.service"
SANDBOX = [
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "ProtectHome=yes",
    "PrivateTmp=yes",
    "PrivateDevices=yes",
    "ProtectKernelTunables=yes",
    "ProtectKernelModules=yes",
    "ProtectControlGroups=yes",
    "RestrictSUIDSGID=yes",
    "LockPersonality=yes",
    "RestrictNamespaces=yes",
    "CapabilityBoundingSet=",
    # Only the receiver's own subdirectory: /var/lib/pve-janitor is root's, since a
    # Proxmox node's hookscript (root) spools under it (docs/install-script.md).
    "ReadWritePaths=/var/lib/pve-janitor/receiver",
    "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
]


def test_receiver_writes_venv_env_file_unit_and_starts_it(env: Env) -> None:
    (env.root / "run/systemd/system").mkdir(parents=True)
    result = env.run("receiver")
    assert_ok(result)
    calls = env.calls()

    env_file = env.root / ENV_FILE
    assert mode(env_file) == 0o640  # root's, readable by the service's group
    values = env_values(env_file)
    hook_secret, admin_token = values["CLEANUP_HOOK_SECRET"], values["CLEANUP_ADMIN_TOKEN"]
    assert re.fullmatch(r"[0-9a-f]{64}", hook_secret) and re.fullmatch(r"[0-9a-f]{64}", admin_token)
    assert hook_secret != admin_token
    assert values["CLEANUP_DRY_RUN"] == "true"
    text = env_file.read_text()
    for name in (
        "DATABASE_URL",
        "PVE_HOST",
        "PVE_USER",
        "PVE_TOKEN_NAME",
        "PVE_TOKEN_VALUE",
        "PVE_VERIFY_SSL",
        "CLEANUP_BIND",
    ):
        assert re.search(rf"^#{name}=", text, re.M), name
        assert name not in values
    assert "pve-janitor check" in text and "pve-janitor sweep --dry-run" in text
    # The token set-up that works on a real cluster: PVEAuditor on / for the user and the token.
    assert "#   pveum acl modify / --users janitor@pve --roles PVEAuditor" in text
    assert "#   pveum acl modify / --tokens 'janitor@pve!sweep' --roles PVEAuditor" in text
    assert_no_secret(result, hook_secret, admin_token)
    assert "CLEANUP_HOOK_SECRET: (generated)" in result.stdout

    unit = (env.root / UNIT_FILE).read_text().splitlines()
    for line in SANDBOX + [
        "User=pve-janitor",
        "EnvironmentFile=/etc/pve-janitor/janitor.env",
        "ExecStart=/opt/pve-janitor/venv/bin/pve-janitor serve",
        "Restart=on-failure",
    ]:
        assert line in unit, line

    venv = env.root / "opt/pve-janitor/venv"
    assert f"python -m venv {venv}" in calls
    assert any(c.startswith("pip install") and c.endswith(str(REPO)) for c in calls), calls
    assert any(c.startswith("useradd") and "--system" in c and c.endswith(" pve-janitor") for c in calls), calls
    assert "pve-janitor:" in (env.root / "etc/passwd").read_text()
    assert any(c.startswith(f"chown {os.getuid()}:{os.getgid()} ") and "janitor.env" in c for c in calls), calls
    assert (env.root / "var/lib/pve-janitor").is_dir()
    assert calls.index("systemctl daemon-reload") < calls.index("systemctl enable --now pve-janitor")


def test_receiver_state_is_a_subdirectory_of_a_root_owned_state_dir(env: Env) -> None:
    """On a host that is also a Proxmox node, the service user must own nothing on the
    path of the hookscript's spool /var/lib/pve-janitor/spool."""
    result = env.run("receiver")
    assert_ok(result)
    calls = env.calls()
    state, receiver_state = env.root / "var/lib/pve-janitor", env.root / "var/lib/pve-janitor/receiver"
    assert mode(state) == 0o755
    assert mode(receiver_state) == 0o750
    assert f"chown {os.getuid()}:{os.getgid()} {receiver_state}" in calls  # the service user's (fake ids)
    assert not any(c.endswith(f" {state}") for c in calls if c.startswith("chown"))
    unit = (env.root / UNIT_FILE).read_text().splitlines()
    for line in (
        "StateDirectory=pve-janitor/receiver",
        "WorkingDirectory=/var/lib/pve-janitor/receiver",
        "ReadWritePaths=/var/lib/pve-janitor/receiver",
    ):
        assert line in unit, line
    assert "ReadWritePaths=/var/lib/pve-janitor" not in unit
    assert "sqlite:////var/lib/pve-janitor/receiver/platform.db" in (env.root / ENV_FILE).read_text()


def test_receiver_gives_an_old_layout_state_dir_back_to_root(env: Env) -> None:
    state = env.root / "var/lib/pve-janitor"
    (state / "spool").mkdir(parents=True)  # a hookscript on this host spooled here
    state.chmod(0o750)  # as the earlier install.sh and StateDirectory=pve-janitor made it
    result = env.run("receiver")
    assert_ok(result)
    assert f"chmod 0755 {state}" in result.stdout
    assert mode(state) == 0o755 and mode(state / "receiver") == 0o750
    assert "ReadWritePaths=/var/lib/pve-janitor\n" not in (env.root / UNIT_FILE).read_text()


def test_receiver_keeps_an_old_layout_database_writable_and_says_how_to_move_it(env: Env) -> None:
    state = env.root / "var/lib/pve-janitor"
    state.mkdir(parents=True)
    state.chmod(0o750)
    (state / "platform.db").write_bytes(b"SQLite format 3\0")
    result = env.run("receiver")
    assert result.returncode == 0, result.stderr
    assert "platform.db" in result.stderr and "/var/lib/pve-janitor/receiver" in result.stderr
    assert "DATABASE_URL" in result.stderr and "warning" in result.stderr
    assert mode(state) == 0o750  # left as it is: the service still writes its database there
    assert (state / "platform.db").exists()
    unit = (env.root / UNIT_FILE).read_text().splitlines()
    assert "ReadWritePaths=/var/lib/pve-janitor/receiver" in unit and "ReadWritePaths=/var/lib/pve-janitor" in unit

    before = env.tree()
    env.calls()
    assert env.run("receiver").returncode == 0  # a second run: the same
    assert env.tree() == before and not [c for c in env.calls() if STATE_CHANGING.match(c)]

    # Once the database has moved, the next run gives the directory back to root.
    (state / "platform.db").rename(state / "receiver" / "platform.db")
    assert_ok(env.run("receiver"))
    assert mode(state) == 0o755
    assert "ReadWritePaths=/var/lib/pve-janitor" not in (env.root / UNIT_FILE).read_text().splitlines()


def test_receiver_second_run_changes_nothing(env: Env) -> None:
    first = env.run("receiver", extra_env={"PVE_JANITOR_ASSUME_SYSTEMD": "1"})
    assert_ok(first)
    before = env.tree()
    env.calls()
    second = env.run("receiver", extra_env={"PVE_JANITOR_ASSUME_SYSTEMD": "1"})
    assert_ok(second)
    assert env.tree() == before  # same files, same contents (same secrets), same modes
    changing = [c for c in env.calls() if STATE_CHANGING.match(c)]
    assert changing == []
    assert "CLEANUP_HOOK_SECRET: (kept)" in second.stdout
    assert "CLEANUP_ADMIN_TOKEN: (kept)" in second.stdout
    values = env_values(env.root / ENV_FILE)
    assert_no_secret(second, values["CLEANUP_HOOK_SECRET"], values["CLEANUP_ADMIN_TOKEN"])


def test_receiver_keeps_existing_values_and_adds_only_missing_secret(env: Env) -> None:
    env_file = env.root / ENV_FILE
    env_file.parent.mkdir(parents=True)
    original = (
        "# mine\nCLEANUP_HOOK_SECRET=my-own-hook-secret-0123456789\n"
        "DATABASE_URL=sqlite:////var/lib/pve-janitor/platform.db\nCLEANUP_DRY_RUN=false\n"
    )
    env_file.write_text(original)
    env_file.chmod(0o644)
    result = env.run("receiver")
    assert_ok(result)
    text = env_file.read_text()
    assert text.startswith(original)  # nothing that was there changed
    values = env_values(env_file)
    assert values["CLEANUP_HOOK_SECRET"] == "my-own-hook-secret-0123456789"
    assert values["CLEANUP_DRY_RUN"] == "false"
    assert re.fullmatch(r"[0-9a-f]{64}", values["CLEANUP_ADMIN_TOKEN"])
    assert mode(env_file) == 0o640
    assert "CLEANUP_HOOK_SECRET: (kept)" in result.stdout
    assert "CLEANUP_ADMIN_TOKEN: (generated)" in result.stdout
    assert_no_secret(result, "my-own-hook-secret-0123456789", values["CLEANUP_ADMIN_TOKEN"])


@pytest.mark.parametrize("systemd_dir, assume", [(False, None), (True, "0")])
def test_receiver_without_systemd_prints_manual_command(env: Env, systemd_dir: bool, assume: str | None) -> None:
    if systemd_dir:
        (env.root / "run/systemd/system").mkdir(parents=True)
    result = env.run("receiver", extra_env={"PVE_JANITOR_ASSUME_SYSTEMD": assume} if assume else None)
    assert_ok(result)
    assert not [c for c in env.calls() if c.startswith("systemctl")]
    assert (
        "set -a; . /etc/pve-janitor/janitor.env; set +a; /opt/pve-janitor/venv/bin/pve-janitor serve" in result.stdout
    )
    assert (env.root / UNIT_FILE).is_file()  # the unit is still there for later


def test_receiver_prefix_and_extras(env: Env) -> None:
    result = env.run(
        "receiver",
        "--prefix",
        "/srv/janitor",
        "--extras",
        "postgres",
        extra_env={"PVE_JANITOR_PIP_ARGS": "--no-index --find-links /srv/wheels"},
    )
    assert_ok(result)
    unit = (env.root / UNIT_FILE).read_text()
    assert "ExecStart=/srv/janitor/venv/bin/pve-janitor serve" in unit.splitlines()
    pip = [c for c in env.calls() if c.startswith("pip install")]
    assert pip == [
        "pip install --disable-pip-version-check --no-index --find-links /srv/wheels "
        f"--constraint {REPO}/constraints.txt {REPO}[postgres]"
    ]
    assert (env.root / "srv/janitor/venv/bin/pve-janitor").exists()
    assert "/srv/janitor/venv/bin/pve-janitor check" in (env.root / ENV_FILE).read_text()


def test_receiver_reinstalls_and_restarts_when_the_package_changed(env: Env) -> None:
    assert_ok(env.run("receiver", extra_env={"PVE_JANITOR_ASSUME_SYSTEMD": "1"}))
    env.calls()
    # What a new checkout looks like to install.sh: the recorded source no longer matches.
    (env.root / "opt/pve-janitor/venv/.pve-janitor-source").write_text("older\n")
    assert_ok(env.run("receiver", extra_env={"PVE_JANITOR_ASSUME_SYSTEMD": "1"}))
    changing = [c for c in env.calls() if STATE_CHANGING.match(c)]
    assert [c.split()[0] + " " + c.split()[1] for c in changing] == ["pip install", "systemctl restart"]


def test_receiver_dry_run_writes_nothing(env: Env) -> None:
    before = env.tree()
    result = env.run("receiver", "--dry-run", extra_env={"PVE_JANITOR_ASSUME_SYSTEMD": "1"})
    assert_ok(result)
    assert env.tree() == before == SYSTEM_TREE and [p.name for p in env.root.iterdir()] == ["etc"]
    assert [c for c in env.calls() if STATE_CHANGING.match(c)] == []
    lines = result.stdout.splitlines()
    for expected in (
        "DRY-RUN: useradd",
        "/opt/pve-janitor/venv/bin/pip install",
        f"DRY-RUN: write {env.root}/{ENV_FILE}",
        f"DRY-RUN: write {env.root}/{UNIT_FILE}",
        "DRY-RUN: systemctl enable --now pve-janitor",
    ):
        assert any(expected in line and line.startswith("DRY-RUN: ") for line in lines), expected


def test_receiver_rejects_node_options(env: Env) -> None:
    result = env.run("receiver", "--url", URL)
    assert result.returncode == 2
    assert "--url is for node mode" in result.stderr
    assert env.tree() == SYSTEM_TREE


# --- node -------------------------------------------------------------------------

HOOK_CONF = "etc/pve-janitor/hook.conf"
HOOK = "var/lib/vz/snippets/pve-janitor-hook"


def test_node_installs_hook_conf_storage_and_attaches(node: Env) -> None:
    result = node.run("node", "--url", URL, "--secret", SECRET, "--attach", "all")
    assert_ok(result)
    assert_no_secret(result, SECRET)
    calls = node.calls()

    hook = node.root / HOOK
    assert hook.read_bytes() == HOOK_SOURCE.read_bytes()
    assert mode(hook) == 0o755
    conf = node.root / HOOK_CONF
    assert mode(conf) == 0o600
    assert env_values(conf) == {"URL": URL, "SECRET": SECRET, "TIMEOUT": "2", "SPOOL_DIR": "/var/lib/pve-janitor/spool"}

    assert "pvesm set local --content iso,vztmpl,backup,snippets" in calls
    assert "\tcontent iso,vztmpl,backup,snippets" in (node.root / "etc/pve/storage.cfg").read_text()
    assert "\tcontent rootdir,images" in (node.root / "etc/pve/storage.cfg").read_text()  # other storages untouched

    sets = [c for c in calls if " set " in f" {c} " and c.startswith(("pct", "qm"))]
    assert sets == [f"pct set 101 --hookscript {OURS}", f"qm set 200 --hookscript {OURS}"]
    assert node.hookscript_of("lxc", 102) == "local:snippets/other-hook"
    assert node.hookscript_of("qemu", 201) == OURS
    # The guest with another hookscript is listed at the end, with the way out.
    tail = result.stdout[result.stdout.index("Skipped") :]
    assert "102" in tail and "local:snippets/other-hook" in tail and "--chain" in tail
    assert "Guests: 2 attached, 1 already had pve-janitor-hook, 1 skipped, 0 failed." in result.stdout
    assert "201" not in tail  # already ours: skipped silently
    assert f"pct create <vmid> ... --hookscript {OURS}" in result.stdout
    assert "root@pam" in result.stdout


SPOOL = "var/lib/pve-janitor/spool"


def test_node_creates_the_spool_root_owned_0700_under_a_root_owned_0755_parent(node: Env) -> None:
    result = node.run("node", "--url", URL, "--secret", SECRET)
    assert_ok(result)
    spool = node.root / SPOOL
    assert spool.is_dir() and mode(spool) == 0o700 and mode(spool.parent) == 0o755
    assert spool.stat().st_uid == os.getuid()  # "root" under --root: whoever runs install.sh
    assert "spool /var/lib/pve-janitor/spool: created" in result.stdout


def test_node_fixes_the_spool_mode_and_uses_the_configured_spool(node: Env) -> None:
    conf = node.root / HOOK_CONF
    conf.parent.mkdir(parents=True)
    conf.write_text("SPOOL_DIR=/srv/hook-spool/\n")
    (node.root / "srv/hook-spool").mkdir(parents=True, mode=0o755)
    (node.root / "srv/hook-spool").chmod(0o755)
    result = node.run("node", "--url", URL, "--secret", SECRET)
    assert_ok(result)
    assert mode(node.root / "srv/hook-spool") == 0o700
    assert not (node.root / SPOOL).exists()


def test_node_refuses_a_spool_that_is_a_symlink(node: Env, tmp_path: Path) -> None:
    (node.root / SPOOL).parent.mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (node.root / SPOOL).symlink_to(tmp_path / "elsewhere")
    result = node.run("node", "--url", URL, "--secret", SECRET)
    assert result.returncode == 1
    assert "spool /var/lib/pve-janitor/spool exists but is not a directory (a symlink or a file)" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the spool to another user")
def test_node_refuses_a_spool_owned_by_someone_else(node: Env) -> None:
    spool = node.root / SPOOL
    spool.mkdir(parents=True, mode=0o700)
    os.chown(spool, 65534, 65534)
    result = node.run("node", "--url", URL, "--secret", SECRET)
    assert result.returncode == 1
    assert "belongs to uid 65534, not root" in result.stderr


def test_node_warns_when_others_may_write_above_the_spool(node: Env) -> None:
    state = node.root / "var/lib/pve-janitor"
    state.mkdir(parents=True)
    state.chmod(0o775)
    result = node.run("node", "--url", URL, "--secret", SECRET)
    assert result.returncode == 0
    assert "warning: /var/lib/pve-janitor (uid" in result.stderr and "mode 775" in result.stderr
    assert "receiver' again" in result.stderr


def test_node_second_run_changes_nothing(node: Env) -> None:
    assert_ok(node.run("node", "--url", URL, "--secret", SECRET, "--attach", "all"))
    before = node.tree()
    node.calls()
    second = node.run("node", "--url", URL, "--secret", SECRET, "--attach", "all")
    assert_ok(second)
    assert node.tree() == before
    calls = node.calls()
    assert [c for c in calls if STATE_CHANGING.match(c)] == []
    assert any(c.startswith("pct config") for c in calls)  # it did look again
    assert "Guests: 0 attached, 3 already had pve-janitor-hook, 1 skipped" in second.stdout


def test_node_chain_records_other_hookscript_and_attaches(node: Env) -> None:
    node.guest("lxc", 103, "local:snippets/third-hook")  # a second, different other hookscript
    result = node.run("node", "--url", URL, "--secret", SECRET, "--attach", "all", "--chain")
    assert_ok(result)
    calls = node.calls()
    assert env_values(node.root / HOOK_CONF)["CHAIN"] == "/var/lib/vz/snippets/other-hook"
    assert node.hookscript_of("lxc", 102) == OURS
    assert node.hookscript_of("lxc", 103) == "local:snippets/third-hook"
    assert f"pct set 102 --hookscript {OURS}" in calls
    assert not any(c.startswith("pct set 103") for c in calls)
    assert re.search(
        r"103 \(CT\): has hookscript local:snippets/third-hook, but hook\.conf can CHAIN only one", result.stdout
    )

    # Re-running without --chain keeps CHAIN: guest 102 still relies on it.
    assert_ok(node.run("node", "--url", URL, "--secret", SECRET, "--attach", "all"))
    assert env_values(node.root / HOOK_CONF)["CHAIN"] == "/var/lib/vz/snippets/other-hook"
    assert [c for c in node.calls() if STATE_CHANGING.match(c)] == []


def test_node_chain_of_another_storage_uses_pvesm_path(node: Env) -> None:
    node.guest("lxc", 102, "shared:snippets/other-hook")
    assert_ok(node.run("node", "--url", URL, "--secret", SECRET, "--attach", "102", "--chain"))
    assert env_values(node.root / HOOK_CONF)["CHAIN"] == "/mnt/pve/shared/snippets/other-hook"
    assert node.hookscript_of("lxc", 102) == OURS


def test_node_attach_given_vmids_only(node: Env) -> None:
    result = node.run("node", "--url", URL, "--secret", SECRET, "--attach", "200", "101,201")
    assert_ok(result)
    sets = [c for c in node.calls() if STATE_CHANGING.match(c) and not c.startswith("pvesm")]
    assert sets == [f"qm set 200 --hookscript {OURS}", f"pct set 101 --hookscript {OURS}"]


def test_node_attach_refuses_while_another_cluster_node_lacks_the_hookscript(node: Env) -> None:
    """The hookscript setting goes with the guest to every node; the file does not.
    A guest migrated or HA-recovered to a node without it would not start."""
    node.cluster(pve2=[OURS, "local:snippets/other"], pve3=["local:snippets/other"], pve4="offline")
    result = node.run("node", "--url", URL, "--secret", SECRET, "--attach", "all")
    assert result.returncode == 1
    calls = node.calls()
    assert "not attaching" in result.stderr and "does not start there" in result.stderr
    assert re.search(r"^  pve3 \(no local:snippets/pve-janitor-hook\)$", result.stderr, re.M)
    assert re.search(r"^  pve4 \(cannot tell: .*offline\)$", result.stderr, re.M)
    assert "pve2" not in result.stderr and "--force-attach" in result.stderr
    assert "pvesh get /nodes --output-format json" in calls
    assert "pvesh get /nodes/pve2/storage/local/content --content snippets --output-format json" in calls
    assert not any(c.startswith("pvesh get /nodes/pve/") for c in calls)  # this node has it by now
    assert not [c for c in calls if c.startswith(("pct set", "qm set"))]
    assert not (node.root / HOOK_CONF).exists()  # nothing that a chained guest could rely on yet
    assert node.hookscript_of("lxc", 101) is None


def test_node_attach_goes_ahead_when_every_node_has_the_hookscript(node: Env) -> None:
    node.cluster(pve2=[OURS], pve3=["local:snippets/x", OURS])
    result = node.run("node", "--url", URL, "--secret", SECRET, "--attach", "all")
    assert_ok(result)
    assert "warning" not in result.stderr
    assert node.hookscript_of("lxc", 101) == OURS and node.hookscript_of("qemu", 200) == OURS


def test_node_force_attach_attaches_and_warns_loudly(node: Env) -> None:
    node.cluster(pve2=[], pve3="offline")
    result = node.run("node", "--url", URL, "--secret", SECRET, "--attach", "all", "--force-attach")
    assert_ok(result)
    assert "warning: --force-attach" in result.stderr and "will NOT start there" in result.stderr
    assert "  pve2 (no local:snippets/pve-janitor-hook)" in result.stderr and "  pve3 (cannot tell" in result.stderr
    assert node.hookscript_of("lxc", 101) == OURS


def test_node_attach_refuses_when_the_cluster_cannot_be_listed(node: Env) -> None:
    result = node.run("node", "--url", URL, "--secret", SECRET, "--attach", "101", extra_env={"FAKE_FAIL_NODES": "1"})
    assert result.returncode == 1
    assert "'pvesh get /nodes' failed" in result.stderr
    assert node.hookscript_of("lxc", 101) is None


def test_node_without_anything_to_attach_does_not_ask_the_cluster(node: Env) -> None:
    node.cluster(pve2=[])
    result = node.run("node", "--url", URL, "--secret", SECRET, "--attach", "201")  # already ours
    assert_ok(result)
    assert not [c for c in node.calls() if c.startswith("pvesh get /nodes")]


def test_node_chain_warns_that_every_node_needs_the_same_chain_line(node: Env) -> None:
    node.cluster(pve2=[OURS])
    result = node.run("node", "--url", URL, "--secret", SECRET, "--attach", "102", "--chain")
    assert_ok(result)
    assert "warning: CHAIN=/var/lib/vz/snippets/other-hook is written to this node's" in result.stderr
    assert "Give every node the same CHAIN line" in result.stderr and "pve2" in result.stderr
    (node.state / "cluster" / "pve2").unlink()  # a single node: nobody to warn about
    node.guest("lxc", 102, "local:snippets/other-hook")
    single = node.run("node", "--url", URL, "--secret", SECRET, "--attach", "102", "--chain")
    assert_ok(single)
    assert "same CHAIN line" not in single.stderr


def test_node_unknown_vmid_fails_after_attaching_the_others(node: Env) -> None:
    result = node.run("node", "--url", URL, "--secret", SECRET, "--attach", "101", "999")
    assert result.returncode == 1
    assert "999: no such container or VM on this node" in result.stderr
    assert node.hookscript_of("lxc", 101) == OURS


def test_node_failed_attach_is_reported_and_exits_1(node: Env) -> None:
    conf = node.guest("lxc", 101)
    conf.write_text(conf.read_text() + "lock: backup\n")
    result = node.run("node", "--url", URL, "--secret", SECRET, "--attach", "all")
    assert result.returncode == 1
    assert f"101: 'pct set 101 --hookscript {OURS}' failed" in result.stderr
    assert node.hookscript_of("qemu", 200) == OURS  # the others were still attached
    assert node.hookscript_of("lxc", 101) is None


def test_node_unreadable_guest_list_fails_before_writing_hook_conf(node: Env) -> None:
    result = node.run("node", "--url", URL, "--secret", SECRET, "--attach", "all", extra_env={"FAKE_FAIL_LIST": "1"})
    assert result.returncode == 1
    assert "'pct list' failed" in result.stderr
    assert not (node.root / HOOK_CONF).exists()
    assert not [c for c in node.calls() if c.startswith(("pct set", "qm set"))]


def test_node_without_attach_touches_no_guest(node: Env) -> None:
    result = node.run("node", "--url", URL + "/", "--secret", SECRET)
    assert_ok(result)
    calls = node.calls()
    assert not [c for c in calls if c.startswith(("pct", "qm"))]
    assert env_values(node.root / HOOK_CONF)["URL"] == URL  # trailing slash dropped


def test_node_keeps_other_hook_conf_lines_and_updates_url(node: Env) -> None:
    conf = node.root / HOOK_CONF
    conf.parent.mkdir(parents=True)
    conf.write_text("# tuned by hand\nURL=http://old:1\nTIMEOUT=5\nCHAIN=/usr/local/bin/x\n")
    assert_ok(node.run("node", "--url", URL, "--secret", SECRET))
    assert conf.read_text() == (
        f"# tuned by hand\nURL={URL}\nTIMEOUT=5\nCHAIN=/usr/local/bin/x\n"
        f"SECRET={SECRET}\nSPOOL_DIR=/var/lib/pve-janitor/spool\n"
    )
    assert mode(conf) == 0o600


def test_node_reads_content_from_pvesh_without_storage_cfg(node: Env) -> None:
    (node.root / "etc/pve/storage.cfg").unlink()
    assert_ok(node.run("node", "--url", URL, "--secret", SECRET))
    calls = node.calls()
    assert "pvesh get /storage/local --output-format json" in calls
    assert "pvesm set local --content vztmpl,iso,backup,snippets" in calls


def test_node_storage_with_snippets_is_left_alone(node: Env) -> None:
    cfg = node.root / "etc/pve/storage.cfg"
    cfg.write_text(STORAGE_CFG.replace("iso,vztmpl,backup", "snippets,iso"))
    assert_ok(node.run("node", "--url", URL, "--secret", SECRET))
    assert not [c for c in node.calls() if c.startswith("pvesm set")]


def test_node_dry_run_changes_nothing(node: Env) -> None:
    before = node.tree()
    result = node.run("node", "--url", URL, "--secret", SECRET, "--attach", "all", "--chain", "--dry-run")
    assert_ok(result)
    assert node.tree() == before
    assert not (node.root / HOOK).exists() and not (node.root / HOOK_CONF).exists()
    assert [c for c in node.calls() if STATE_CHANGING.match(c)] == []
    assert node.hookscript_of("lxc", 101) is None
    lines = result.stdout.splitlines()
    for expected in (
        "DRY-RUN: install -m 0755",
        f"DRY-RUN: write {node.root}/{HOOK_CONF} (mode 0600",
        "DRY-RUN: pvesm set local --content iso,vztmpl,backup,snippets",
        f"DRY-RUN: pct set 101 --hookscript {OURS}",
        f"DRY-RUN: pct set 102 --hookscript {OURS}",
        f"DRY-RUN: qm set 200 --hookscript {OURS}",
    ):
        assert any(line.startswith(expected) for line in lines), expected
    assert_no_secret(result, SECRET)


def test_node_secret_file(node: Env, tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    result = node.run("node", "--url", URL, "--secret-file", str(secret_file))
    assert_ok(result)
    assert env_values(node.root / HOOK_CONF)["SECRET"] == SECRET
    assert_no_secret(result, SECRET)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://10.0.0.5:8765",
        "10.0.0.5:8765",
        "http://",
        "http://host:99999",
        "http://host:0",
        "http://user:pw@host:8765",
        "http://host:8765/x?y=1",
        "http://ho st",
        "javascript:alert(1)",
    ],
)
def test_node_rejects_bad_url(node: Env, url: str) -> None:
    result = node.run("node", "--url", url, "--secret", SECRET)
    assert result.returncode == 2, result.stderr
    assert "--url" in result.stderr
    assert not (node.root / HOOK).exists() and node.calls() == []


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "needs --secret"),
        (["--secret", ""], "secret is empty"),
        (["--secret", "short-secret"], "too short"),
        (["--secret", "has spaces in the secret value"], "spaces"),
    ],
)
def test_node_rejects_missing_or_weak_secret(node: Env, args: list[str], message: str) -> None:
    result = node.run("node", "--url", URL, *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert not (node.root / HOOK_CONF).exists()


@pytest.mark.parametrize(
    "secret",
    [
        "dollar-$HOME-in-the-secret-0123",
        "hash#comment-in-the-secret-0123",
        "back\\slash-in-the-secret-0123",
        "semi;colon-in-the-secret-012345",
        "backtick`in-the-secret-01234567",
        "non-ascii-\u00e9-in-the-secret-0123",
        "percent%specifier-in-secret-0123",
        "trailing-space-in-the-secret-01 ",
    ],
)
def test_node_refuses_a_secret_that_config_readers_would_read_differently(node: Env, secret: str) -> None:
    result = node.run("node", "--url", URL, "--secret", secret)
    assert result.returncode == 2
    assert "only letters, digits and . _ ~ + / = -" in result.stderr
    assert not (node.root / HOOK_CONF).exists()


def test_node_accepts_every_allowed_secret_character(node: Env) -> None:
    secret = "AZaz09._~+/=-" + "x" * 8
    assert_ok(node.run("node", "--url", URL, "--secret", secret))
    assert env_values(node.root / HOOK_CONF)["SECRET"] == secret


def test_receiver_warns_about_a_kept_secret_the_readers_disagree_on(env: Env) -> None:
    env_file = env.root / ENV_FILE
    env_file.parent.mkdir(parents=True)
    env_file.write_text("CLEANUP_HOOK_SECRET=my $ecret with spaces#1\n")
    result = env.run("receiver")
    assert result.returncode == 0
    assert "warning: CLEANUP_HOOK_SECRET in /etc/pve-janitor/janitor.env holds characters other than" in result.stderr
    assert "my $ecret" not in result.stdout + result.stderr
    assert env_file.read_text().startswith("CLEANUP_HOOK_SECRET=my $ecret with spaces#1\n")  # kept: never rewritten


def test_node_without_pct_says_so(node: Env) -> None:
    if shutil.which("pct", path=os.environ.get("PATH", "")):
        pytest.skip("this host has a real pct on PATH")
    (node.bin / "pct").unlink()
    result = node.run("node", "--url", URL, "--secret", SECRET, "--attach", "all")
    assert result.returncode == 1
    assert "pct not found on PATH" in result.stderr and "Proxmox VE node" in result.stderr
    assert not (node.root / HOOK).exists()


def test_node_refuses_non_root_without_root_dir(node: Env) -> None:
    # A fake `id` says uid 1000; pct is removed too, so a missed check could not reach the real /.
    (node.bin / "id").write_text('#!/bin/sh\n[ "$1" = -u ] && echo 1000 && exit 0\nexec /usr/bin/id "$@"\n')
    (node.bin / "id").chmod(0o755)
    (node.bin / "pct").unlink()
    result = node.run("node", "--url", URL, "--secret", SECRET, root=False)
    assert result.returncode == 1
    assert "must run as root" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["node", "--url", URL, "--secret", SECRET, "--bogus"], "unknown option: --bogus"),
        (["upgrade"], "unknown mode 'upgrade'"),
        ([], "which mode"),
        (["node", "--url", URL, "--secret", SECRET, "--attach", "abc"], "--attach takes 'all' or VMIDs"),
        (["node", "--url"], "--url needs a value"),
        (["node", "--url", URL, "--secret", SECRET, "--chain"], "--chain only matters with --attach"),
        (["node", "--url", URL, "--secret", SECRET, "--force-attach"], "--force-attach only matters with --attach"),
        (["receiver", "--force-attach"], "--force-attach is for node mode"),
    ],
)
def test_usage_errors_exit_2(env: Env, args: list[str], message: str) -> None:
    result = env.run(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert env.tree() == SYSTEM_TREE


def test_help_exits_0() -> None:
    result = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, timeout=10)
    assert result.returncode == 0
    assert "receiver" in result.stdout and "--attach" in result.stdout


def test_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck")
    if not shellcheck:
        if os.environ.get("CI"):  # .ci/run installs it: in CI this test is never skipped
            pytest.fail("shellcheck is not installed, although .ci/run installs it")
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_script_is_executable() -> None:
    assert os.access(SCRIPT, os.X_OK)


# --- the unit, extras, and an installed package instead of a checkout ---------------

INSTALLED = Path(sys.executable).with_name("pve-janitor")  # this venv's pve-janitor
SHIPPED_UNIT = REPO / "receiver" / "data" / "pve-janitor.service"


def standalone_script(tmp_path: Path) -> Path:
    """install.sh alone, as copied out of a package or mailed to a node: no checkout beside it."""
    script = tmp_path / "standalone" / "install.sh"
    script.parent.mkdir()
    shutil.copy2(SCRIPT, script)
    return script


def test_receiver_writes_the_shipped_unit_with_its_header_and_prefix(env: Env) -> None:
    assert_ok(env.run("receiver", "--prefix", "/srv/janitor"))
    written = (env.root / UNIT_FILE).read_text()
    shipped = SHIPPED_UNIT.read_text()
    body = "[Unit]" + shipped.split("\n[Unit]", 1)[1]
    assert written == (
        "# Written by pve-janitor's install.sh; running it again rewrites this file.\n"
        "# Local changes belong in a drop-in: systemctl edit pve-janitor\n"
        + body.replace("/opt/pve-janitor/venv/", "/srv/janitor/venv/")
    )
    assert "ExecStart=/opt/pve-janitor/venv/bin/pve-janitor serve" in shipped.splitlines()


@pytest.mark.parametrize(
    ("url", "extra"),
    [
        ("postgresql+psycopg://janitor:pw@db.example:5432/platform", "postgres"),
        ("postgresql://janitor@db/platform", "postgres"),
        ("mysql+pymysql://janitor:pw@db.example:3306/platform", "mysql"),
        ("mariadb+pymysql://janitor@db/platform", "mysql"),
        ("sqlite:////var/lib/pve-janitor/receiver/platform.db", None),
    ],
)
def test_receiver_installs_the_driver_extra_of_the_env_files_database_url(
    env: Env, url: str, extra: str | None
) -> None:
    assert_ok(env.run("receiver"))
    env_file = env.root / ENV_FILE
    env_file.write_text(env_file.read_text() + f"DATABASE_URL={url}\n")
    env.calls()
    result = env.run("receiver")
    assert_ok(result)
    pip = [c for c in env.calls() if c.startswith("pip install")]
    if extra is None:
        assert pip == []  # nothing changed: no reinstall
    else:
        assert pip == [f"pip install --disable-pip-version-check --constraint {REPO}/constraints.txt {REPO}[{extra}]"]
        assert f"extras: {extra} (the driver DATABASE_URL needs)" in result.stdout
    assert "pw" not in result.stdout  # the URL, with its password, is never printed


def test_receiver_takes_the_extra_from_the_environment_on_a_first_install(env: Env) -> None:
    result = env.run("receiver", "--extras", "mysql", extra_env={"DATABASE_URL": "postgresql+psycopg://u:pw@db/p"})
    assert_ok(result)
    pip = [c for c in env.calls() if c.startswith("pip install")]
    assert pip == [
        f"pip install --disable-pip-version-check --constraint {REPO}/constraints.txt {REPO}[mysql,postgres]"
    ]


def test_receiver_under_an_empty_root_says_what_the_root_lacks(env: Env) -> None:
    for name in SYSTEM_TREE:
        (env.root / name).unlink()
    result = env.run("receiver")
    assert result.returncode == 1
    assert "has no etc/passwd and etc/group" in result.stderr
    assert "unexpected failure" not in result.stderr
    assert [c for c in env.calls() if STATE_CHANGING.match(c)] == []


def test_receiver_from_an_installed_package_leaves_the_package_and_writes_the_rest(env: Env, tmp_path: Path) -> None:
    assert INSTALLED.exists(), "the tests run from a venv with pve-janitor installed"
    bindir = env.root / "opt/pve-janitor/venv/bin"
    bindir.mkdir(parents=True)
    (bindir / "pve-janitor").write_text(f'#!/bin/sh\nexec {INSTALLED} "$@"\n')
    (bindir / "pve-janitor").chmod(0o755)
    result = env.run("receiver", script=standalone_script(tmp_path))
    assert_ok(result)
    assert [c for c in env.calls() if c.startswith(("pip", "python -m venv"))] == []
    assert "install.sh leaves it as it is" in result.stdout
    assert "ExecStart=/opt/pve-janitor/venv/bin/pve-janitor serve" in (env.root / UNIT_FILE).read_text().splitlines()
    assert (env.root / ENV_FILE).is_file()


def test_receiver_outside_a_checkout_without_a_package_says_how_to_install_one(env: Env, tmp_path: Path) -> None:
    result = env.run("receiver", script=standalone_script(tmp_path), extra_env={"PATH": f"{env.bin}:/usr/bin:/bin"})
    assert result.returncode == 1
    assert "is not a pve-janitor checkout, and no installed pve-janitor was found" in result.stderr
    assert [c for c in env.calls() if STATE_CHANGING.match(c)] == []


def test_node_from_an_installed_package_installs_the_packages_hookscript(node: Env, tmp_path: Path) -> None:
    result = node.run(
        "node", "--url", URL, "--secret", SECRET,
        script=standalone_script(tmp_path),
        extra_env={"PVE_JANITOR_COMMAND": str(INSTALLED)},
    )  # fmt: skip
    assert_ok(result)
    installed = node.root / "var/lib/vz/snippets/pve-janitor-hook"
    assert installed.read_bytes() == HOOK_SOURCE.read_bytes() and mode(installed) == 0o755
