"""Settings: one frozen object, built once at start.

Order: defaults, then the TOML file named by ``CLEANUP_CONFIG``, then the
environment, then explicit overrides (tests, CLI flags).  Every problem is
collected and reported at once, by variable name, so a bad deployment fails
on its first start instead of on its first sweep.  A ``CLEANUP_*`` variable that
is not a setting is one of those problems: ignored, a typo of ``CLEANUP_DRY_RUN``
would delete for real.  Secret values never appear in an error message or in ``repr``.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import stat
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

logger = logging.getLogger(__name__)

SECRET_VARIABLES = ("PVE_TOKEN_VALUE", "CLEANUP_HOOK_SECRET", "CLEANUP_ADMIN_TOKEN")
ACTIONS = ("delete", "mark")
_TRUE = {"true", "1", "yes"}  # DESIGN.md: true/false/1/0/yes/no, anything else is an error
_FALSE = {"false", "0", "no"}


class ConfigError(Exception):
    """One or more settings are wrong; ``problems`` names each variable."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
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
        found = [s for s in (self.pve_token_value, self.hook_secret, self.admin_token) if s]
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


# Variable name -> (field name, kind, minimum).  Kinds: bool, int, float, str,
# list, action, verify, host, bind.
_VARIABLES: dict[str, tuple[str, str, float | None]] = {
    "CLEANUP_ENABLED": ("enabled", "bool", None),
    "ERROR_RETENTION_HOURS": ("error_retention_hours", "int", 1),
    "GHOST_CLEANUP_ENABLED": ("ghost_cleanup_enabled", "bool", None),
    "CLEANUP_INTERVAL_MINUTES": ("interval_minutes", "int", 5),
    "CLEANUP_DRY_RUN": ("dry_run", "bool", None),
    "DATABASE_URL": ("database_url", "str", None),
    "PVE_HOST": ("pve_host", "host", None),
    "PVE_USER": ("pve_user", "str", None),
    "PVE_TOKEN_NAME": ("pve_token_name", "str", None),
    "PVE_TOKEN_VALUE": ("pve_token_value", "str", None),
    "PVE_VERIFY_SSL": ("pve_verify_ssl", "verify", None),
    "PVE_TIMEOUT": ("pve_timeout", "float", 0.5),
    "CLEANUP_HOOK_SECRET": ("hook_secret", "str", None),
    "CLEANUP_ADMIN_TOKEN": ("admin_token", "str", None),
    "CLEANUP_BIND": ("bind_host", "bind", None),
    "CLEANUP_TABLE": ("table", "str", None),
    "CLEANUP_VMID_COLUMN": ("vmid_column", "str", None),
    "CLEANUP_HOSTNAME_COLUMN": ("hostname_column", "str", None),
    "CLEANUP_STATUS_COLUMN": ("status_column", "str", None),
    "CLEANUP_PORT_COLUMNS": ("port_columns", "list", None),
    "CLEANUP_CREATED_COLUMN": ("created_column", "str", None),
    "CLEANUP_UPDATED_COLUMN": ("updated_column", "str", None),
    "CLEANUP_ERROR_STATUSES": ("error_statuses", "list", None),
    "CLEANUP_PROTECTED_STATUSES": ("protected_statuses", "list", None),
    "CLEANUP_GRACE_MINUTES": ("grace_minutes", "int", 0),
    "CLEANUP_ACTION": ("action", "action", None),
    "CLEANUP_MARK_STATUS": ("mark_status", "str", None),
    "CLEANUP_MAX_DELETE_PERCENT": ("max_delete_percent", "int", 1),
    "CLEANUP_STOP_STATUS": ("stop_status", "str", None),
    "CLEANUP_RUNNING_STATUS": ("running_status", "str", None),
    "CLEANUP_WATCH_SECONDS": ("watch_seconds", "int", 10),
    "CLEANUP_WATCH_INTERVAL_SECONDS": ("watch_interval_seconds", "float", 0.1),
    "CLEANUP_TASK_POLL_SECONDS": ("task_poll_seconds", "float", 0.5),
    "CLEANUP_LEASE_SECONDS": ("lease_seconds", "int", 3),
}
VARIABLES = tuple(_VARIABLES)
# Every name pve-janitor reads from the environment: the settings, and the file that may hold them.
KNOWN_VARIABLES = frozenset(_VARIABLES) | {"CLEANUP_CONFIG"}
# A name with one of these prefixes is ours: if it is not a setting, it is a typo, and a typo
# of CLEANUP_DRY_RUN would delete for real.  Matched ignoring case (the TOML file ignores it too).
_OWN_PREFIXES = ("CLEANUP_", "GHOST_CLEANUP_", "ERROR_RETENTION_")
# PVE_* is shared with other tools: an unknown one is only worth a warning.  PVE_JANITOR_*
# belongs to the hookscript, which runs elsewhere and reads its own.
_SHARED_PREFIX, _HOOKSCRIPT_PREFIX = "PVE_", "PVE_JANITOR_"
# difflib's default (0.6) finds CLEANUP_BIND "close" to CLEANUP_X: the shared prefix alone
# scores that much.  0.8 keeps real typos (CLEANUP_DRYRUN, CLEANUP_INTERVAL, ERROR_RETENTION_DAYS).
_SUGGESTION_CUTOFF = 0.8
CONFIG_FILE_MAX_BYTES = 1 << 20  # a settings file is a few lines; this is only a bound on reading
# Far beyond any sensible value, and small enough that every date, interval and timeout
# computed from them stays in range (a larger one made every sweep fail with OverflowError).
_MAXIMUMS = {
    "CLEANUP_MAX_DELETE_PERCENT": 100,
    "ERROR_RETENTION_HOURS": 876_000,  # 100 years
    "CLEANUP_GRACE_MINUTES": 52_560_000,  # 100 years
    "CLEANUP_INTERVAL_MINUTES": 525_600,  # a year
    "CLEANUP_WATCH_SECONDS": 31_536_000,  # a year
    "CLEANUP_LEASE_SECONDS": 86_400,  # a day
    "CLEANUP_WATCH_INTERVAL_SECONDS": 3_600,
    "CLEANUP_TASK_POLL_SECONDS": 3_600,
    "PVE_TIMEOUT": 3_600,
}


def _convert(name: str, kind: str, raw: Any) -> dict[str, Any]:
    """Turn one raw value into field values; raise ValueError with a user message."""
    field_name = _VARIABLES[name][0]
    if kind == "bool":
        if isinstance(raw, bool):
            return {field_name: raw}
        text = str(raw).strip().lower()
        if text in _TRUE:
            return {field_name: True}
        if text in _FALSE:
            return {field_name: False}
        raise ValueError("must be true/false/1/0/yes/no")
    if kind in ("int", "float"):
        if isinstance(raw, bool):
            raise ValueError("must be a number")
        try:
            value = int(str(raw).strip()) if kind == "int" else float(str(raw).strip())
        except ValueError:
            raise ValueError("must be a whole number" if kind == "int" else "must be a number") from None
        if kind == "float" and not (value == value and abs(value) != float("inf")):
            raise ValueError("must be a finite number")
        return {field_name: value}
    if kind == "list":
        items = raw if isinstance(raw, (list, tuple)) else str(raw).split(",")
        return {field_name: tuple(str(i).strip() for i in items if str(i).strip())}
    if kind == "action":
        text = str(raw).strip().lower()
        if text not in ACTIONS:
            raise ValueError("must be 'delete' or 'mark'")
        return {field_name: text}
    if kind == "verify":
        if isinstance(raw, bool):
            return {field_name: raw}
        text = str(raw).strip()
        if text.lower() in _TRUE:
            return {field_name: True}
        if text.lower() in _FALSE:
            return {field_name: False}
        if not os.path.isfile(text):
            raise ValueError("must be true/false or the path of a CA bundle that exists")
        return {field_name: text}
    if kind == "host":
        entries = [e.strip() for e in str(raw).split(",")]
        if not any(entries):
            return {"pve_host": "", "pve_endpoints": ()}
        if not all(entries):
            raise ValueError("has an empty entry (a comma-separated list of host or host:port)")
        endpoints = tuple(_split_host_port(e, 8006) for e in entries)
        if len(set(endpoints)) != len(endpoints):
            raise ValueError("names one endpoint twice")
        return {"pve_host": endpoints[0][0], "pve_port": endpoints[0][1], "pve_endpoints": endpoints}
    if kind == "bind":
        host, port = _split_host_port(str(raw).strip(), None)
        return {"bind_host": host, "bind_port": port}
    return {field_name: str(raw).strip()}


def _split_host_port(text: str, default_port: int | None) -> tuple[str, int]:
    if "://" in text or "/" in text:
        raise ValueError("must be host or host:port, without scheme or path")
    host, port = text, default_port
    if text.startswith("["):  # [IPv6]:port
        end = text.find("]")
        if end < 0:
            raise ValueError("has an unclosed '['")
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError("must be host or host:port")
            port = _port(rest[1:])
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        port = _port(port_text)
    if not host:
        raise ValueError("has no host")
    if port is None:
        raise ValueError("must be host:port")
    return host, port


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError("has a port that is not 1-65535")
    return int(text)


def _did_you_mean(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name.upper(), sorted(candidates), n=1, cutoff=_SUGGESTION_CUTOFF)
    return f" (did you mean {close[0]}?)" if close else ""


def without_settings(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` without any variable pve-janitor would read or refuse (for a child process that
    is given its own settings: the demo, tests, benchmarks)."""
    ours = _OWN_PREFIXES + (_SHARED_PREFIX, "DATABASE_URL")
    return {k: v for k, v in env.items() if not k.upper().startswith(ours)}


def _unknown_variables(env: Mapping[str, str]) -> list[str]:
    """Problems for names of ours that are not settings; a warning for unknown PVE_* names.

    Only names are shown, never values: an unknown variable may well hold a secret.
    """
    problems = []
    for name in sorted(env):
        if name in KNOWN_VARIABLES:
            continue
        upper = name.upper()
        if upper.startswith(_OWN_PREFIXES):
            problems.append(f"{name} is not a setting{_did_you_mean(name, KNOWN_VARIABLES)}")
        elif upper.startswith(_SHARED_PREFIX) and not upper.startswith(_HOOKSCRIPT_PREFIX):
            logger.warning("%s is not a pve-janitor setting%s; ignored",
                           name, _did_you_mean(name, KNOWN_VARIABLES))
    return problems


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class _NotASettingsFile(Exception):
    """CLEANUP_CONFIG names something that cannot be a settings file; the message says why."""


def _require_regular(mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = next((kind for test, kind in _FILE_KINDS if test(mode)), "something else")
        raise _NotASettingsFile(f"is {kind}, not a regular file")


def _read_config_file(path: str) -> bytes:
    """The bytes of a regular file of at most CONFIG_FILE_MAX_BYTES, promptly.

    A FIFO without a writer would block ``open`` for ever, /dev/zero would fill memory.
    So: stat before opening (opening some devices does something), then open without
    blocking and check again on the open file, the one that is read.  Raises OSError
    or _NotASettingsFile.
    """
    _require_regular(os.stat(path).st_mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as fh:
        _require_regular(os.fstat(fd).st_mode)
        raw = fh.read(CONFIG_FILE_MAX_BYTES + 1)
    if len(raw) > CONFIG_FILE_MAX_BYTES:
        raise _NotASettingsFile(f"is larger than {CONFIG_FILE_MAX_BYTES >> 20} MiB; a settings file is a few lines")
    return raw


def _read_toml(path: str) -> tuple[dict[str, Any], list[str]]:
    if "\0" in path:
        return {}, [f"CLEANUP_CONFIG: cannot read {path!r}: not a usable path"]
    try:
        raw = _read_config_file(path)
    except OSError as exc:
        return {}, [f"CLEANUP_CONFIG: cannot read {path}: {exc.strerror}"]
    except _NotASettingsFile as exc:
        return {}, [f"CLEANUP_CONFIG: {path} {exc}"]
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return {}, [f"CLEANUP_CONFIG: {path} is not UTF-8, as TOML must be ({exc.reason} at byte {exc.start})"]
    except tomllib.TOMLDecodeError as exc:
        return {}, [f"CLEANUP_CONFIG: {path} is not valid TOML: {exc}"]
    values, problems = {}, []
    for key, value in data.items():
        name = key.upper()
        if name not in _VARIABLES:
            problems.append(f"CLEANUP_CONFIG: {path} has an unknown setting {key!r}"
                            f"{_did_you_mean(name, _VARIABLES)}")
            continue
        values[name] = value
    return values, problems


def load_settings(
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings from defaults, TOML file, environment and overrides.

    ``overrides`` uses the variable names (``{"CLEANUP_DRY_RUN": True}``).
    Raises ConfigError naming every bad variable, and every variable of ours
    (``CLEANUP_*``, ``GHOST_CLEANUP_*``, ``ERROR_RETENTION_*``) that is not a setting.
    """
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    problems = _unknown_variables(env)
    config_path = (overrides or {}).get("CLEANUP_CONFIG") or env.get("CLEANUP_CONFIG")
    if config_path:
        from_file, file_problems = _read_toml(str(config_path))
        raw.update(from_file)
        problems.extend(file_problems)
    raw.update({k: v for k, v in env.items() if k in _VARIABLES})
    for key, value in (overrides or {}).items():
        if key == "CLEANUP_CONFIG":
            continue
        if key not in _VARIABLES:
            raise KeyError(f"unknown setting {key}")
        raw[key] = value

    values: dict[str, Any] = {}
    for name, value in raw.items():
        _, kind, minimum = _VARIABLES[name]
        try:
            converted = _convert(name, kind, value)
        except ValueError as exc:
            shown = "(secret)" if name in SECRET_VARIABLES else repr(str(value))
            problems.append(f"{name}={shown} {exc}")
            continue
        if minimum is not None:
            key = _VARIABLES[name][0]
            if converted[key] < minimum:
                logger.warning("%s=%s is below the minimum %s; using %s", name, converted[key], minimum, minimum)
                converted[key] = type(converted[key])(minimum)
        maximum = _MAXIMUMS.get(name)
        if maximum is not None and converted[_VARIABLES[name][0]] > maximum:
            problems.append(f"{name}={value!r} must be at most {maximum}")
            continue
        values.update(converted)

    settings = Settings(**values)
    problems.extend(_cross_checks(settings))
    if problems:
        raise ConfigError(problems)
    return settings


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
    if settings.pve_token_value and not (settings.pve_user and settings.pve_token_name):
        problems.append("PVE_TOKEN_VALUE is set but PVE_USER or PVE_TOKEN_NAME is missing")
    if settings.pve_user and "@" not in settings.pve_user:
        problems.append(f"PVE_USER={settings.pve_user!r} must be user@realm (for example janitor@pve)")
    return problems


def require(settings: Settings, *names: str) -> None:
    """Raise ConfigError unless every named connection setting is present."""
    fields = {"DATABASE_URL": "database_url", "PVE_HOST": "pve_host", "PVE_USER": "pve_user",
              "PVE_TOKEN_NAME": "pve_token_name", "PVE_TOKEN_VALUE": "pve_token_value"}
    missing = [n for n in names if not getattr(settings, fields[n])]
    if missing:
        raise ConfigError([f"{n} is not set" for n in missing])
