"""Settings: defaults, TOML, environment, bounds, and errors that name every bad variable."""
from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from receiver.config import VARIABLES, ConfigError, Settings, load_settings


def test_defaults_match_the_contract():
    s = load_settings(env={})
    assert (s.enabled, s.error_retention_hours, s.ghost_cleanup_enabled, s.interval_minutes, s.dry_run) == \
        (True, 24, True, 60, False)
    assert (s.table, s.vmid_column, s.hostname_column, s.status_column) == ("apps", "lxc_id", "hostname", "status")
    assert s.port_columns == ("public_port", "internal_port")
    assert s.protected_statuses == ("deploying", "creating", "pending", "provisioning")
    assert (s.grace_minutes, s.action, s.mark_status, s.max_delete_percent) == (15, "delete", "destroyed", 50)
    assert (s.bind_host, s.bind_port) == ("127.0.0.1", 8765)
    assert (s.watch_seconds, s.watch_interval_seconds, s.task_poll_seconds) == (600, 1.0, 5.0)


@pytest.mark.parametrize("text, expected", [("true", True), ("1", True), ("YES", True), ("false", False),
                                            ("0", False), ("no", False)])
def test_booleans(text, expected):
    assert load_settings(env={"CLEANUP_DRY_RUN": text}).dry_run is expected


def test_every_bad_variable_is_named_at_once():
    with pytest.raises(ConfigError) as err:
        load_settings(env={"CLEANUP_ENABLED": "maybe", "CLEANUP_INTERVAL_MINUTES": "soon",
                           "CLEANUP_ACTION": "nuke", "PVE_HOST": "https://pve:8006/"})
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
    path.write_text('CLEANUP_TABLE = "deployments"\ncleanup_grace_minutes = 30\n'
                    'CLEANUP_PORT_COLUMNS = ["port"]\nCLEANUP_DRY_RUN = true\n')
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
