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


# --- where each setting came from, and what loading warned about ----------------------


def test_resolve_names_the_source_of_every_setting(tmp_path):
    from receiver.config import Origin, resolve

    config = tmp_path / "janitor.toml"
    config.write_text('cleanup_table = "servers"\nCLEANUP_GRACE_MINUTES = 30\n')
    env = {"CLEANUP_CONFIG": str(config), "CLEANUP_GRACE_MINUTES": "45", "CLEANUP_DRY_RUN": "yes"}
    resolved = resolve(env, overrides={"CLEANUP_ACTION": "mark"})
    assert (resolved.settings.table, resolved.settings.grace_minutes) == ("servers", 45)
    origins = resolved.origins
    assert origins["CLEANUP_TABLE"] == Origin("file", str(config))
    assert origins["CLEANUP_GRACE_MINUTES"] == Origin("environment")  # the environment wins over the file
    assert origins["CLEANUP_DRY_RUN"] == Origin("environment")
    assert origins["CLEANUP_ACTION"] == Origin("override")
    assert origins["CLEANUP_CONFIG"] == Origin("environment")
    assert origins["CLEANUP_MAX_DELETE_PERCENT"] == Origin("default")
    assert set(origins) == set(VARIABLES) | {"CLEANUP_CONFIG"}
    assert resolved.warnings == []


def test_a_raised_value_and_an_unknown_pve_name_are_warnings_and_still_logged(caplog):
    from receiver.config import resolve

    env = {"CLEANUP_INTERVAL_MINUTES": "1", "PVE_HOTS": "pve1"}
    assert resolve(env).warnings == [
        "PVE_HOTS is not a pve-janitor setting (did you mean PVE_HOST?); ignored",
        "CLEANUP_INTERVAL_MINUTES=1 is below the minimum 5; using 5",
    ]
    with caplog.at_level(logging.WARNING, logger="receiver.config"):
        assert load_settings(env=env).interval_minutes == 5
    assert "CLEANUP_INTERVAL_MINUTES=1 is below the minimum 5; using 5" in caplog.messages


def test_a_config_error_carries_the_warnings_too():
    with pytest.raises(ConfigError) as err:
        load_settings(env={"CLEANUP_INTERVAL_MINUTES": "1", "CLEANUP_ACTION": "nuke"})
    assert err.value.warnings == ["CLEANUP_INTERVAL_MINUTES=1 is below the minimum 5; using 5"]


# --- secrets from files: *_FILE and systemd credentials -------------------------------

SECRET_NAMES = ("PVE_TOKEN_VALUE", "CLEANUP_HOOK_SECRET", "CLEANUP_HOOK_SECRET_PREVIOUS", "CLEANUP_ADMIN_TOKEN")
FIELDS = {
    "PVE_TOKEN_VALUE": "pve_token_value",
    "CLEANUP_HOOK_SECRET": "hook_secret",
    "CLEANUP_HOOK_SECRET_PREVIOUS": "hook_secret_previous",
    "CLEANUP_ADMIN_TOKEN": "admin_token",
}
BASE = {"PVE_USER": "janitor@pve", "PVE_TOKEN_NAME": "sweep", "CLEANUP_HOOK_SECRET": "current-secret"}


@pytest.mark.parametrize("name", SECRET_NAMES)
def test_a_secret_file_is_read_without_its_trailing_newline(tmp_path, name):
    from receiver.config import Origin, resolve

    path = tmp_path / "secret"
    path.write_bytes(b"s3cr\xc3\xa9t-from-file\n")
    env = {k: v for k, v in BASE.items() if k != name} | {f"{name}_FILE": str(path)}
    resolved = resolve(env)
    assert getattr(resolved.settings, FIELDS[name]) == "s3cr\u00e9t-from-file"
    assert resolved.origins[name] == Origin("environment", f"{name}_FILE={path}")


def test_a_secret_and_its_file_both_set_is_a_clear_error(tmp_path):
    path = tmp_path / "secret"
    path.write_text("from-the-file\n")
    with pytest.raises(ConfigError) as err:
        load_settings(env={**BASE, "CLEANUP_HOOK_SECRET_FILE": str(path)})
    assert err.value.problems == [
        "CLEANUP_HOOK_SECRET is given 2 ways (CLEANUP_HOOK_SECRET, CLEANUP_HOOK_SECRET_FILE): give it one way"
    ]
    assert "from-the-file" not in str(err.value) and "current-secret" not in str(err.value)


@pytest.mark.parametrize("kind", ["missing", "unreadable", "directory", "empty", "fifo"])
def test_an_unusable_secret_file_names_the_variable_never_the_content(tmp_path, kind):
    path = tmp_path / "token"
    if kind == "unreadable":
        if os.geteuid() == 0:
            pytest.skip("root reads a file whatever its mode")
        path.write_text("the-token-content\n")
        path.chmod(0)
    elif kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_text("\n")
    elif kind == "fifo":
        os.mkfifo(path)  # no writer: opening it blocking would hang for ever
    env = {"PVE_USER": "janitor@pve", "PVE_TOKEN_NAME": "sweep", "PVE_TOKEN_VALUE_FILE": str(path)}
    started = time.monotonic()
    with pytest.raises(ConfigError) as err:
        load_settings(env=env)
    assert time.monotonic() - started < 5
    [problem] = err.value.problems
    assert problem.startswith("PVE_TOKEN_VALUE_FILE: ") and str(path) in problem
    assert "the-token-content" not in problem
    expected = {
        "missing": "No such file or directory",
        "unreadable": "Permission denied",
        "directory": "is a directory, not a regular file",
        "empty": "is empty",
        "fifo": "is a FIFO, not a regular file",
    }[kind]
    assert expected in problem


def test_a_systemd_credential_is_used_when_credentials_directory_is_set(tmp_path):
    from receiver.config import CREDENTIALS, Origin, resolve

    assert CREDENTIALS["CLEANUP_HOOK_SECRET"] == "pve-janitor.hook-secret"
    (tmp_path / "pve-janitor.hook-secret").write_text("from-a-credential\n")
    (tmp_path / "pve-janitor.admin-token").write_text("admin-from-a-credential")
    (tmp_path / "some-other-service.token").write_text("not ours")
    resolved = resolve({"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert resolved.settings.hook_secret == "from-a-credential"
    assert resolved.settings.admin_token == "admin-from-a-credential"
    assert resolved.settings.pve_token_value == ""  # no such credential: not set, no problem
    assert resolved.origins["CLEANUP_HOOK_SECRET"] == Origin("credential", "pve-janitor.hook-secret")


def test_a_credential_and_the_variable_both_set_is_a_clear_error(tmp_path):
    (tmp_path / "pve-janitor.hook-secret").write_text("from-a-credential\n")
    with pytest.raises(ConfigError) as err:
        load_settings(env={"CREDENTIALS_DIRECTORY": str(tmp_path), "CLEANUP_HOOK_SECRET": "from-env"})
    [problem] = err.value.problems
    assert problem == (
        "CLEANUP_HOOK_SECRET is given 2 ways (CLEANUP_HOOK_SECRET, the systemd credential "
        "pve-janitor.hook-secret): give it one way"
    )


def test_the_secret_file_variables_are_known_names_and_only_in_the_environment(tmp_path):
    path = tmp_path / "secret"
    path.write_text("x" * 20)
    assert load_settings(env={"CLEANUP_ADMIN_TOKEN_FILE": str(path)}).admin_token == "x" * 20
    config = tmp_path / "janitor.toml"
    config.write_text(f'CLEANUP_ADMIN_TOKEN_FILE = "{path}"\n')
    with pytest.raises(ConfigError, match="unknown setting 'CLEANUP_ADMIN_TOKEN_FILE'"):
        load_settings(env={"CLEANUP_CONFIG": str(config)})


def test_a_previous_hook_secret_needs_a_current_one():
    with pytest.raises(ConfigError) as err:
        load_settings(env={"CLEANUP_HOOK_SECRET_PREVIOUS": "old-secret-123"})
    assert err.value.problems == ["CLEANUP_HOOK_SECRET_PREVIOUS is set but CLEANUP_HOOK_SECRET is not"]
    s = load_settings(env={"CLEANUP_HOOK_SECRET": "new-secret-456", "CLEANUP_HOOK_SECRET_PREVIOUS": "old-secret-123"})
    assert "old-secret-123" in s.secrets() and "old-secret-123" not in repr(s)
    assert s.public_summary()["hook_secret_previous"] == "(set)"


# --- pve-janitor config ----------------------------------------------------------------


def test_the_config_command_prints_every_setting_its_source_and_no_secret(tmp_path):
    from receiver.config import without_settings

    config = tmp_path / "janitor.toml"
    config.write_text('CLEANUP_TABLE = "servers"\n')
    token = tmp_path / "token"
    token.write_text("tok-9f8e7d6c5b4a\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "pve-janitor.hook-secret").write_text("hook-1a2b3c4d5e6f")
    env = without_settings(os.environ) | {
        "CLEANUP_CONFIG": str(config),
        "CLEANUP_INTERVAL_MINUTES": "1",
        "DATABASE_URL": "postgresql+psycopg://janitor:pw-7g8h9i0j@db.example/platform",
        "PVE_USER": "janitor@pve",
        "PVE_TOKEN_NAME": "sweep",
        "PVE_TOKEN_VALUE_FILE": str(token),
        "CLEANUP_HOOK_SECRET_PREVIOUS": "old-hook-0z9y8x7w",
        "CREDENTIALS_DIRECTORY": str(creds),
    }
    text = run_cli(["config"], env)
    assert text.code == 0, text.err
    lines = text.out.splitlines()
    assert f"CLEANUP_TABLE=servers  (file: {config})" in lines
    assert "CLEANUP_INTERVAL_MINUTES=5  (environment)" in lines
    assert "CLEANUP_ACTION=delete  (default)" in lines
    assert f"PVE_TOKEN_VALUE=(set, redacted)  (environment: PVE_TOKEN_VALUE_FILE={token})" in lines
    assert "CLEANUP_HOOK_SECRET=(set, redacted)  (credential: pve-janitor.hook-secret)" in lines
    assert "CLEANUP_ADMIN_TOKEN=(unset)  (default)" in lines
    assert "DATABASE_URL=postgresql+psycopg://janitor:***@db.example/platform  (environment)" in lines
    assert "warning: CLEANUP_INTERVAL_MINUTES=1 is below the minimum 5; using 5" in lines
    as_json = run_cli(["config", "--json"], env)
    assert as_json.code == 0, as_json.err
    data = as_json.json()
    by_name = {e["name"]: e for e in data["settings"]}
    assert set(by_name) == set(VARIABLES) | {"CLEANUP_CONFIG"}
    assert by_name["CLEANUP_HOOK_SECRET"] == {
        "name": "CLEANUP_HOOK_SECRET",
        "value": None,
        "set": True,
        "source": "credential",
        "from": "pve-janitor.hook-secret",
    }
    assert by_name["CLEANUP_PORT_COLUMNS"]["value"] == ["public_port", "internal_port"]
    assert by_name["CLEANUP_DRY_RUN"] == {"name": "CLEANUP_DRY_RUN", "value": False, "source": "default", "from": ""}
    assert data["warnings"] == ["CLEANUP_INTERVAL_MINUTES=1 is below the minimum 5; using 5"]
    for output in (text.out, text.err, as_json.out, as_json.err):
        for secret in ("tok-9f8e7d6c5b4a", "hook-1a2b3c4d5e6f", "pw-7g8h9i0j", "old-hook-0z9y8x7w"):
            assert secret not in output
            assert secret[:6] not in output  # not even partly


def test_the_config_command_exits_2_naming_every_problem(tmp_path):
    from receiver.config import without_settings

    env = without_settings(os.environ) | {"CLEANUP_ACTION": "nuke", "CLEANUP_HOOK_SECRET_FILE": str(tmp_path / "no")}
    result = run_cli(["config"], env)
    assert result.code == 2 and result.out == ""
    assert "CLEANUP_ACTION='nuke' must be 'delete' or 'mark'" in result.err
    assert f"CLEANUP_HOOK_SECRET_FILE: cannot read {tmp_path / 'no'}: No such file or directory" in result.err
