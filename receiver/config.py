"""Settings: one frozen object, built once at start.

Order: defaults, then the TOML file named by ``CLEANUP_CONFIG``, then the
environment, then explicit overrides (tests, CLI flags).  Every problem is
collected and reported at once, by variable name, so a bad deployment fails
on its first start instead of on its first sweep.  A ``CLEANUP_*`` variable that
is not a setting is one of those problems: ignored, a typo of ``CLEANUP_DRY_RUN``
would delete for real.  Secret values never appear in an error message or in ``repr``.

The variables (names, kinds, conversion, unknown names) are in :mod:`receiver.variables`,
the reading of the file in :mod:`receiver.configfile`, secrets read from files (``*_FILE``,
systemd credentials) in :mod:`receiver.secretsource`; their public names are re-exported
here.  A leaf: this module and those import nothing else of the package.

:func:`resolve` also says where each setting came from and what loading warned about
(a value raised to its minimum, an unknown ``PVE_*`` name), for ``pve-janitor config``
and ``check``; :func:`load_settings` logs the warnings and returns the settings alone.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .configfile import CONFIG_FILE_MAX_BYTES, read_toml
from .secretsource import secrets_from_files
from .variables import (
    ACTIONS,
    CREDENTIALS,
    KNOWN_VARIABLES,
    MAXIMUMS,
    SECRET_FILE_VARIABLES,
    SECRET_VARIABLES,
    TABLE,
    UNQUOTED_VARIABLES,
    VARIABLES,
    convert,
    unknown_variables,
    without_settings,
)

__all__ = [
    "ACTIONS",
    "CONFIG_FILE_MAX_BYTES",
    "CREDENTIALS",
    "KNOWN_VARIABLES",
    "SECRET_FILE_VARIABLES",
    "SECRET_VARIABLES",
    "VARIABLES",
    "ConfigError",
    "Origin",
    "Resolved",
    "Settings",
    "load_settings",
    "resolve",
    "redact_url",
    "redact_webhook_url",
    "require",
    "without_settings",
]

logger = logging.getLogger(__name__)


class ConfigError(Exception):
    """One or more settings are wrong; ``problems`` names each variable.

    ``warnings`` are what loading noticed besides (see :class:`Resolved`).
    """

    def __init__(self, problems: list[str], warnings: list[str] | None = None):
        self.problems = list(problems)
        self.warnings = list(warnings or [])
        super().__init__("; ".join(self.problems))


@dataclass(frozen=True)
class Settings:
    # The seed service's five settings.
    enabled: bool = True
    error_retention_hours: int = 24
    ghost_cleanup_enabled: bool = True
    interval_minutes: int = 60
    dry_run: bool = False
    # Connections.
    database_url: str = field(default="", repr=False)  # may hold a password
    pve_host: str = ""  # the first of pve_endpoints
    pve_port: int = 8006
    pve_endpoints: tuple[tuple[str, int], ...] = ()  # every PVE_HOST entry, in order
    pve_user: str = ""
    pve_token_name: str = ""
    pve_token_value: str = field(default="", repr=False)
    pve_verify_ssl: bool | str = True
    pve_timeout: float = 5.0
    hook_secret: str = field(default="", repr=False)
    hook_secret_previous: str = field(default="", repr=False)  # still accepted during a rotation
    admin_token: str = field(default="", repr=False)
    bind_host: str = "127.0.0.1"
    bind_port: int = 8765
    # The platform table.
    table: str = "apps"
    vmid_column: str = "lxc_id"
    hostname_column: str = "hostname"
    status_column: str = "status"
    port_columns: tuple[str, ...] = ("public_port", "internal_port")
    created_column: str = "created_at"
    updated_column: str = "updated_at"
    error_statuses: tuple[str, ...] = ("error",)
    protected_statuses: tuple[str, ...] = ("deploying", "creating", "pending", "provisioning")
    grace_minutes: int = 15
    action: str = "delete"
    mark_status: str = "destroyed"
    max_delete_percent: int = 50
    # The watcher.
    stop_status: str = "stopped"
    running_status: str = "running"
    watch_seconds: int = 600
    watch_interval_seconds: float = 1.0
    task_poll_seconds: float = 5.0
    lease_seconds: int = 15
    # Logs.
    log_format: str = "text"  # or json: one object per line
    # Pending plans and webhooks.
    pending_hours: int = 24
    webhook_urls: tuple[str, ...] = field(default=(), repr=False)  # a URL may carry a token
    webhook_secret: str = field(default="", repr=False)
    webhook_full_row: bool = False
    webhook_verify_ssl: bool | str = True
    webhook_timeout: float = 10.0
    # The allocator.
    allocator_token: str = field(default="", repr=False)
    reservation_minutes: int = 15
    allocator_vmids: tuple[int, int] = (100, 999_999_999)
    allocator_ports: tuple[tuple[str, int, int], ...] = ()  # (port column, low, high)
    # Hook coverage.
    coverage_rps: float = 5.0
    coverage_hours: float = 24.0
    # The dashboard.
    ui_public: bool = False

    def mapped_columns(self) -> dict[str, str]:
        """Setting name -> column name, for every column the mapping uses."""
        named = {
            "CLEANUP_VMID_COLUMN": self.vmid_column,
            "CLEANUP_HOSTNAME_COLUMN": self.hostname_column,
            "CLEANUP_STATUS_COLUMN": self.status_column,
            "CLEANUP_CREATED_COLUMN": self.created_column,
            "CLEANUP_UPDATED_COLUMN": self.updated_column,
        }
        named.update({f"CLEANUP_PORT_COLUMNS[{c}]": c for c in self.port_columns})
        return {k: v for k, v in named.items() if v}

    def secrets(self) -> list[str]:
        """Values that must never be shown: the tokens, the hook secret, the database password."""
        found = [
            s
            for s in (
                self.pve_token_value,
                self.hook_secret,
                self.hook_secret_previous,
                self.admin_token,
                self.webhook_secret,
                self.allocator_token,
            )
            if s
        ]
        if self.database_url:
            try:
                from sqlalchemy.engine import make_url

                password = make_url(self.database_url).password
            except Exception:  # noqa: BLE001 - an unparsable URL has no password to hide
                password = None
            if password:
                found.append(str(password))
        return found

    def public_summary(self) -> dict[str, Any]:
        """The settings as shown to users: secrets only as set/unset."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not f.repr:
                value = "(set)" if value else "(unset)"
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        out["database_url"] = redact_url(self.database_url)
        out["webhook_urls"] = [redact_webhook_url(u) for u in self.webhook_urls]
        return out


def redact_url(url: str) -> str:
    """A database URL with its password replaced, for logs and messages."""
    if not url:
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown as a placeholder
        return "(unparsable URL)"


def redact_webhook_url(url: str) -> str:
    """A webhook URL as logs and answers show it: no user, password, query or fragment (any may
    carry a token)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    hidden = "?…" if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, "", "")) + hidden


@dataclass(frozen=True)
class Origin:
    """Where a setting's value came from: ``kind`` is one of :data:`ORIGIN_KINDS`; ``detail``
    names the file, the ``_FILE`` variable or the credential, when there is one."""

    kind: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind} ({self.detail})" if self.detail else self.kind


ORIGIN_KINDS = ("default", "file", "environment", "credential", "override")


@dataclass(frozen=True)
class Resolved:
    """The settings, where each variable's value came from, and what loading warned about."""

    settings: Settings
    origins: dict[str, Origin]  # every variable, and CLEANUP_CONFIG
    warnings: list[str]


def load_settings(
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings from defaults, TOML file, environment and overrides.

    ``overrides`` uses the variable names (``{"CLEANUP_DRY_RUN": True}``).
    Raises ConfigError naming every bad variable, and every variable of ours
    (``CLEANUP_*``, ``GHOST_CLEANUP_*``, ``ERROR_RETENTION_*``) that is not a setting.
    The warnings are logged.
    """
    try:
        resolved = resolve(env, overrides)
    except ConfigError as exc:
        _log(exc.warnings)
        raise
    _log(resolved.warnings)
    return resolved.settings


def _log(warnings: list[str]) -> None:
    for warning in warnings:
        logger.warning("%s", warning)


def resolve(env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None) -> Resolved:
    """:func:`load_settings`, with the origins and the warnings returned rather than logged."""
    env = os.environ if env is None else env
    overrides = overrides or {}
    raw: dict[str, Any] = {}
    origins = {name: Origin("default") for name in (*TABLE, "CLEANUP_CONFIG")}
    problems, warnings = unknown_variables(env)
    config_path = overrides.get("CLEANUP_CONFIG") or env.get("CLEANUP_CONFIG")
    if config_path:
        origins["CLEANUP_CONFIG"] = Origin("override" if overrides.get("CLEANUP_CONFIG") else "environment")
        from_file, file_problems = read_toml(str(config_path))
        raw.update(from_file)
        origins.update({name: Origin("file", str(config_path)) for name in from_file})
        problems.extend(file_problems)
    from_env = {k: v for k, v in env.items() if k in TABLE}
    raw.update(from_env)
    origins.update({name: Origin("environment") for name in from_env})
    from_files, secret_problems = secrets_from_files(env)
    problems.extend(secret_problems)
    for name, (value, kind, detail) in from_files.items():
        raw[name] = value
        origins[name] = Origin(kind, detail)
    for key, value in overrides.items():
        if key == "CLEANUP_CONFIG":
            continue
        if key not in TABLE:
            raise KeyError(f"unknown setting {key}")
        raw[key] = value
        origins[key] = Origin("override")

    values: dict[str, Any] = {}
    for name, value in raw.items():
        key, _, minimum = TABLE[name]
        try:
            converted = convert(name, value)
        except ValueError as exc:
            shown = (
                "(secret)"
                if name in SECRET_VARIABLES
                else "(not shown: a URL may carry a token)"
                if name in UNQUOTED_VARIABLES
                else repr(str(value))
            )
            problems.append(f"{name}={shown} {exc}")
            continue
        if minimum is not None and converted[key] < minimum:
            warnings.append(f"{name}={converted[key]} is below the minimum {minimum}; using {minimum}")
            converted[key] = type(converted[key])(minimum)
        maximum = MAXIMUMS.get(name)
        if maximum is not None and converted[key] > maximum:
            problems.append(f"{name}={value!r} must be at most {maximum}")
            continue
        values.update(converted)

    settings = Settings(**values)
    problems.extend(_cross_checks(settings))
    if problems:
        raise ConfigError(problems, warnings)
    return Resolved(settings, origins, warnings)


def _cross_checks(settings: Settings) -> list[str]:
    problems = []
    if not settings.table:
        problems.append("CLEANUP_TABLE must not be empty")
    if not settings.vmid_column:
        problems.append("CLEANUP_VMID_COLUMN must not be empty")
    if settings.action == "mark" and not settings.status_column:
        problems.append("CLEANUP_ACTION=mark needs CLEANUP_STATUS_COLUMN")
    if settings.action == "mark" and not settings.mark_status:
        problems.append("CLEANUP_MARK_STATUS must not be empty when CLEANUP_ACTION=mark")
    if settings.hook_secret_previous and not settings.hook_secret:
        problems.append("CLEANUP_HOOK_SECRET_PREVIOUS is set but CLEANUP_HOOK_SECRET is not")
    unknown_ports = [c for c, _, _ in settings.allocator_ports if c not in settings.port_columns]
    if unknown_ports:
        problems.append(
            f"CLEANUP_ALLOCATOR_PORTS names {', '.join(unknown_ports)}, not in CLEANUP_PORT_COLUMNS "
            f"({', '.join(settings.port_columns) or 'none'})"
        )
    if settings.webhook_urls and not settings.webhook_secret:
        problems.append("CLEANUP_WEBHOOK_URLS is set but CLEANUP_WEBHOOK_SECRET is not (every webhook is signed)")
    if settings.pve_token_value and not (settings.pve_user and settings.pve_token_name):
        problems.append("PVE_TOKEN_VALUE is set but PVE_USER or PVE_TOKEN_NAME is missing")
    if settings.pve_user and "@" not in settings.pve_user:
        problems.append(f"PVE_USER={settings.pve_user!r} must be user@realm (for example janitor@pve)")
    return problems


def require(settings: Settings, *names: str) -> None:
    """Raise ConfigError unless every named connection setting is present."""
    fields = {
        "DATABASE_URL": "database_url",
        "PVE_HOST": "pve_host",
        "PVE_USER": "pve_user",
        "PVE_TOKEN_NAME": "pve_token_name",
        "PVE_TOKEN_VALUE": "pve_token_value",
    }
    missing = [n for n in names if not getattr(settings, fields[n])]
    if missing:
        raise ConfigError([f"{n} is not set" for n in missing])
