"""Settings: defaults, TOML, environment, bounds, and errors that name every bad variable."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest
import sqlalchemy as sa
from conftest import ROOT, janitor_env, run_cli
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from receiver.config import CONFIG_FILE_MAX_BYTES, VARIABLES, ConfigError, Settings, load_settings
from receiver.simulator.scene import seed_database


def test_defaults_match_the_contract():
    s = load_settings(env={})
    assert (s.enabled, s.error_retention_hours, s.ghost_cleanup_enabled, s.interval_minutes, s.dry_run) == (
        True,
        24,
        True,
        60,
        False,
    )
    assert (s.table, s.vmid_column, s.hostname_column, s.status_column) == ("apps", "lxc_id", "hostname", "status")
    assert s.port_columns == ("public_port", "internal_port")
    assert s.protected_statuses == ("deploying", "creating", "pending", "provisioning")
    assert (s.grace_minutes, s.action, s.mark_status, s.max_delete_percent) == (15, "delete", "destroyed", 50)
    assert (s.bind_host, s.bind_port) == ("127.0.0.1", 8765)
    assert (s.watch_seconds, s.watch_interval_seconds, s.task_poll_seconds) == (600, 1.0, 5.0)


@pytest.mark.parametrize(
    "text, expected", [("true", True), ("1", True), ("YES", True), ("false", False), ("0", False), ("no", False)]
)
def test_booleans(text, expected):
    assert load_settings(env={"CLEANUP_DRY_RUN": text}).dry_run is expected


def test_every_bad_variable_is_named_at_once():
    with pytest.raises(ConfigError) as err:
        load_settings(
            env={
                "CLEANUP_ENABLED": "maybe",
                "CLEANUP_INTERVAL_MINUTES": "soon",
                "CLEANUP_ACTION": "nuke",
                "PVE_HOST": "https://pve:8006/",
            }
        )
    text = str(err.value)
    for name in ("CLEANUP_ENABLED", "CLEANUP_INTERVAL_MINUTES", "CLEANUP_ACTION", "PVE_HOST"):
        assert name in text
    assert len(err.value.problems) == 4


def test_values_below_minimum_are_raised_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        s = load_settings(env={"CLEANUP_INTERVAL_MINUTES": "1", "ERROR_RETENTION_HOURS": "0"})
    assert (s.interval_minutes, s.error_retention_hours) == (5, 1)
    assert "CLEANUP_INTERVAL_MINUTES" in caplog.text and "ERROR_RETENTION_HOURS" in caplog.text


def test_secret_values_never_appear_in_errors_or_repr():
    with pytest.raises(ConfigError) as err:
        load_settings(env={"PVE_TOKEN_VALUE": "s3cret-token-value", "PVE_HOST": "x"})
    assert "s3cret-token-value" not in str(err.value)
    s = load_settings(env={"CLEANUP_HOOK_SECRET": "hook-s3cret", "CLEANUP_ADMIN_TOKEN": "admin-s3cret"})
    assert "hook-s3cret" not in repr(s) and "admin-s3cret" not in repr(s)
    assert s.public_summary()["hook_secret"] == "(set)"


def test_database_password_is_redacted_in_summary():
    s = load_settings(env={"DATABASE_URL": "postgresql+psycopg://app:pw-in-url@db/app"})
    assert "pw-in-url" not in str(s.public_summary())


def test_host_with_port_and_bind():
    s = load_settings(env={"PVE_HOST": "pve.example:8443", "CLEANUP_BIND": "0.0.0.0:9000"})
    assert (s.pve_host, s.pve_port, s.bind_host, s.bind_port) == ("pve.example", 8443, "0.0.0.0", 9000)
    assert load_settings(env={"PVE_HOST": "pve.example"}).pve_port == 8006


def test_toml_file_then_environment_wins(tmp_path):
    path = tmp_path / "janitor.toml"
    path.write_text(
        'CLEANUP_TABLE = "deployments"\ncleanup_grace_minutes = 30\n'
        'CLEANUP_PORT_COLUMNS = ["port"]\nCLEANUP_DRY_RUN = true\n'
    )
    s = load_settings(env={"CLEANUP_CONFIG": str(path), "CLEANUP_GRACE_MINUTES": "45"})
    assert (s.table, s.grace_minutes, s.port_columns, s.dry_run) == ("deployments", 45, ("port",), True)


def test_bad_toml_and_unknown_keys_are_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("CLEANUP_TABLE = \n")
    with pytest.raises(ConfigError, match="CLEANUP_CONFIG"):
        load_settings(env={"CLEANUP_CONFIG": str(bad)})
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('CLEANUP_TABEL = "x"\n')
    with pytest.raises(ConfigError, match="CLEANUP_TABEL"):
        load_settings(env={"CLEANUP_CONFIG": str(unknown)})
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(env={"CLEANUP_CONFIG": str(tmp_path / "missing.toml")})


def test_verify_ssl_accepts_a_ca_bundle_path(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    assert load_settings(env={"PVE_VERIFY_SSL": str(ca)}).pve_verify_ssl == str(ca)
    with pytest.raises(ConfigError, match="PVE_VERIFY_SSL"):
        load_settings(env={"PVE_VERIFY_SSL": str(tmp_path / "nope.pem")})


def test_max_delete_percent_bounds():
    with pytest.raises(ConfigError, match="CLEANUP_MAX_DELETE_PERCENT"):
        load_settings(env={"CLEANUP_MAX_DELETE_PERCENT": "150"})


@hsettings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(VARIABLES), st.text(max_size=20), max_size=6))
def test_parser_either_builds_settings_or_names_the_variable(env):
    try:
        s = load_settings(env=env)
    except ConfigError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert any(name in problem for name in VARIABLES) or "PVE_USER" in problem
    else:
        assert isinstance(s, Settings)
        assert s.interval_minutes >= 5 and s.error_retention_hours >= 1


@pytest.mark.parametrize("text", ["on", "off", "y", "enabled", ""])
def test_only_the_documented_booleans_are_accepted(text):
    with pytest.raises(ConfigError, match="CLEANUP_ENABLED"):
        load_settings(env={"CLEANUP_ENABLED": text})


def test_database_password_is_a_secret():
    s = load_settings(env={"DATABASE_URL": "postgresql+psycopg://app:pw-in-url-123@db/app"})
    assert "pw-in-url-123" in s.secrets()
    assert "pw-in-url-123" not in repr(s)


# --- unknown variables: a typo must stop the program, not be ignored ------------------------


@pytest.mark.parametrize(
    "name, suggestion",
    [
        ("CLEANUP_DRYRUN", "CLEANUP_DRY_RUN"),
        ("CLEANUP_DRY_RUNS", "CLEANUP_DRY_RUN"),
        ("cleanup_dry_run", "CLEANUP_DRY_RUN"),  # environment names are case-sensitive: ignored, so a typo too
        ("GHOST_CLEANUP_ENABLE", "GHOST_CLEANUP_ENABLED"),
        ("ERROR_RETENTION_DAYS", "ERROR_RETENTION_HOURS"),
        ("CLEANUP_INTERVAL", "CLEANUP_INTERVAL_MINUTES"),
        ("CLEANUP_CONFIG_FILE", "CLEANUP_CONFIG"),
        ("CLEANUP_X", None),
        ("CLEANUP_FOO", None),
    ],
)
def test_an_unknown_variable_of_ours_is_a_named_error_with_the_closest_name(name, suggestion):
    with pytest.raises(ConfigError) as err:
        load_settings(env={name: "true"})
    expected = f"{name} is not a setting" + (f" (did you mean {suggestion}?)" if suggestion else "")
    assert err.value.problems == [expected]


def test_unknown_variables_are_reported_with_every_other_problem_and_never_show_their_value():
    with pytest.raises(ConfigError) as err:
        load_settings(
            env={
                "CLEANUP_ADMIN_TOKN": "s3cret-admin-value",
                "CLEANUP_DRYRUN": "s3cret-too",
                "CLEANUP_ACTION": "nuke",
                "CLEANUP_DRY_RUN": "true",
            }
        )
    problems = err.value.problems
    assert "CLEANUP_ADMIN_TOKN is not a setting (did you mean CLEANUP_ADMIN_TOKEN?)" in problems
    assert "CLEANUP_DRYRUN is not a setting (did you mean CLEANUP_DRY_RUN?)" in problems
    assert any(p.startswith("CLEANUP_ACTION=") for p in problems) and len(problems) == 3
    assert "s3cret" not in str(err.value)


def test_every_setting_and_cleanup_config_is_known(tmp_path):
    """The known names come from the settings table itself: none of them is ever "not a setting"."""
    config = tmp_path / "empty.toml"
    config.write_text("")
    env = {name: "" for name in VARIABLES} | {"CLEANUP_CONFIG": str(config)}
    with pytest.raises(ConfigError) as err:  # "" is no number: those settings are named, and only those
        load_settings(env=env)
    assert err.value.problems and not [p for p in err.value.problems if "is not a setting" in p]


def test_unknown_pve_variables_only_warn_and_the_hookscript_s_are_ignored(caplog):
    with caplog.at_level(logging.WARNING, logger="receiver.config"):
        s = load_settings(
            env={
                "PVE_NODE": "pve-secret-node",
                "PVE_VERIFYSSL": "false",
                "PVE_JANITOR_URL": "http://x",
                "PVE_JANITOR_HOOK_CONF": "/x",
                "PVE_HOST": "pve",
            }
        )
    assert s.pve_host == "pve" and s.pve_verify_ssl is True  # PVE_VERIFYSSL changed nothing
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [
        "PVE_NODE is not a pve-janitor setting; ignored",
        "PVE_VERIFYSSL is not a pve-janitor setting (did you mean PVE_VERIFY_SSL?); ignored",
    ]
    assert "pve-secret-node" not in caplog.text and "PVE_JANITOR" not in caplog.text


def test_unknown_toml_key_suggests_the_closest_name(tmp_path):
    path = tmp_path / "janitor.toml"
    path.write_text("cleanup_dryrun = true\nCLEANUP_NOTHING_LIKE_IT = 1\n")
    with pytest.raises(ConfigError) as err:
        load_settings(env={"CLEANUP_CONFIG": str(path)})
    assert err.value.problems == [
        f"CLEANUP_CONFIG: {path} has an unknown setting 'cleanup_dryrun' (did you mean CLEANUP_DRY_RUN?)",
        f"CLEANUP_CONFIG: {path} has an unknown setting 'CLEANUP_NOTHING_LIKE_IT'",
    ]


# --- CLEANUP_CONFIG must be a regular file of sane size, read without blocking ---------------


def _problems_in_a_child(env: dict, seconds: float = 10) -> list[str]:
    """load_settings(env)'s problems, computed in a child process with bounded time and memory.

    A reader that blocks on a FIFO or keeps reading /dev/zero must fail this test, not hang
    or exhaust the machine that runs it.
    """
    script = (
        "import json, resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
        "from receiver.config import ConfigError, load_settings\n"
        "try:\n    load_settings(env=json.loads(sys.argv[1]))\n"
        "except ConfigError as exc:\n    print(json.dumps(exc.problems))\n"
        "else:\n    print('[]')\n"
    )

    try:
        proc = subprocess.run(
            [sys.executable, "-c", script, json.dumps(env)], capture_output=True, text=True, timeout=seconds, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"load_settings still running after {seconds} s (blocked reading CLEANUP_CONFIG?)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def _fifo(tmp_path):
    path = tmp_path / "fifo.toml"
    os.mkfifo(path)
    return str(path)


def _directory(tmp_path):
    return str(tmp_path)


def _huge(tmp_path):
    path = tmp_path / "huge.toml"
    with open(path, "wb") as fh:
        fh.truncate(4 << 30)  # sparse: 4 GiB that take no disk
    return str(path)


@pytest.mark.parametrize(
    "make, kind",
    [
        (_fifo, "is a FIFO, not a regular file"),
        (lambda _: "/dev/zero", "is a character device, not a regular file"),
        (lambda _: "/dev/urandom", "is a character device, not a regular file"),
        (_directory, "is a directory, not a regular file"),
        (_huge, "is larger than 1 MiB; a settings file is a few lines"),
    ],
    ids=["fifo", "dev-zero", "dev-urandom", "directory", "huge"],
)
def test_cleanup_config_that_is_not_a_regular_file_is_refused_at_once(tmp_path, make, kind):
    path = make(tmp_path)
    assert _problems_in_a_child({"CLEANUP_CONFIG": path}) == [f"CLEANUP_CONFIG: {path} {kind}"]


def test_cleanup_config_of_exactly_the_bound_is_read(tmp_path):
    path = tmp_path / "janitor.toml"
    body = b'CLEANUP_TABLE = "deployments"\n'
    path.write_bytes(body + b"#" * (CONFIG_FILE_MAX_BYTES - len(body) - 1) + b"\n")
    assert path.stat().st_size == CONFIG_FILE_MAX_BYTES
    assert load_settings(env={"CLEANUP_CONFIG": str(path)}).table == "deployments"
    with open(path, "ab") as fh:
        fh.write(b"\n")
    with pytest.raises(ConfigError, match="larger than 1 MiB"):
        load_settings(env={"CLEANUP_CONFIG": str(path)})


# --- through the real command line -----------------------------------------------------------


def _count(db, table="apps"):
    with db.engine.connect() as conn:
        return conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()


def test_a_dry_run_typo_stops_the_sweep_before_it_deletes_anything(seed_sim, seeded):
    env = janitor_env(seed_sim, seeded, CLEANUP_MAX_DELETE_PERCENT=100)  # no guard: a sweep would delete
    planned = run_cli(["sweep", "--dry-run", "--json"], env)
    assert planned.code == 0 and len(planned.json()["planned"]) == 41, planned.err
    before = _count(seeded)

    env["CLEANUP_DRYRUN"] = "true"  # meant: CLEANUP_DRY_RUN
    result = run_cli(["sweep"], env)
    assert result.code == 2, (result.out, result.err)
    assert "CLEANUP_DRYRUN is not a setting (did you mean CLEANUP_DRY_RUN?)" in result.err
    assert "Traceback" not in result.err
    assert _count(seeded) == before == 47


@pytest.mark.parametrize("args", [["sweep"], ["sweep", "--dry-run"], ["history"], ["restore", "1"], ["serve"]])
def test_every_command_that_loads_settings_exits_2_on_an_unknown_variable(sim, sqlite_db, args):
    seed_database(sqlite_db.engine)
    env = janitor_env(sim, sqlite_db, GHOST_CLEANUP_ENABLE="false", CLEANUP_BIND=f"127.0.0.1:{_free_port()}")
    result = run_cli(args, env, timeout=30)
    assert result.code == 2, (result.out, result.err)
    assert "GHOST_CLEANUP_ENABLE is not a setting (did you mean GHOST_CLEANUP_ENABLED?)" in result.err
    assert "Traceback" not in result.err


def test_check_exits_2_and_names_the_unknown_variable(sim, sqlite_db):
    seed_database(sqlite_db.engine)
    result = run_cli(["check"], janitor_env(sim, sqlite_db, CLEANUP_DRYRUN="true"))
    assert result.code == 2, (result.out, result.err)
    # check reports on stdout, one line per finding
    assert "FAILED  settings: CLEANUP_DRYRUN is not a setting (did you mean CLEANUP_DRY_RUN?)" in result.out
    assert "ok    " not in result.out


def test_an_unknown_pve_variable_is_a_warning_on_stderr_and_the_command_runs(sim, sqlite_db):
    seed_database(sqlite_db.engine)
    env = janitor_env(sim, sqlite_db, PVE_NODE="node-name-value", PVE_JANITOR_URL="http://hook")
    result = run_cli(["history"], env)
    assert result.code == 0, result.err
    assert "PVE_NODE is not a pve-janitor setting; ignored" in result.err
    assert "node-name-value" not in result.err and "PVE_JANITOR_URL" not in result.err


def test_a_fifo_as_cleanup_config_exits_2_at_once(sim, sqlite_db, tmp_path):
    seed_database(sqlite_db.engine)
    fifo = _fifo(tmp_path)
    started = time.monotonic()
    result = run_cli(["sweep"], janitor_env(sim, sqlite_db, CLEANUP_CONFIG=fifo), timeout=30)
    assert time.monotonic() - started < 15
    assert result.code == 2, (result.out, result.err)
    assert f"CLEANUP_CONFIG: {fifo} is a FIFO, not a regular file" in result.err
    assert "Traceback" not in result.err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
