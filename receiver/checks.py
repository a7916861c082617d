"""``pve-janitor check``: settings, database, mapping, Proxmox, privileges, quorum, inventory, ACL, coverage.

The stages as data, so that they are tested without the command line: iterating a
:class:`Checkup` yields one :class:`Line` as each stage ends (a slow Proxmox shows the
lines before it at once), and afterwards ``verdict`` says how the checks ended.  Every
stage runs, whatever failed before it, unless it needs what failed: then its line says
``skipped`` and which stage it needs (the database and Proxmox need only the settings
they use, so a wrong ``PVE_HOST`` still lets the database be checked).  What loading the
settings warned about (a value raised to its minimum) shows as ``WARN`` lines.  The CLI
prints the lines and turns the verdict into its exit code.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from .config import ConfigError, Settings, require, resolve
from .coverage_db import read_cache
from .coverage_refresh import Refresher
from .db import DatabaseError, describe_db_error, make_engine
from .guestconfig import HOOK_FILE
from .inventory import ProxmoxInventory, grant_lines, token_id
from .model import Inventory, InventoryError, Row, Word
from .safety import hidden_guests, vmid_column_problem
from .schema import require_current
from .table import PlatformTable

PROXMOX_STAGES = ("proxmox", "privileges", "quorum", "inventory", "acl")


class Level(Word):
    """How one line ends: fine, slower or partly blind but safe, a failure, or not run."""

    OK = "ok"
    WARN = "WARN"
    FAILED = "FAILED"
    SKIPPED = "skipped"  # a stage it needs failed


class Verdict(Word):
    """How the whole check ended."""

    PASSED = "passed"  # no line failed (warnings allowed)
    FAILED = "failed"  # a line failed
    MISCONFIGURED = "misconfigured"  # the settings, or the table they name, are wrong


@dataclass(frozen=True)
class Line:
    level: Level
    # the stage: settings, database, mapping, proxmox, privileges, quorum, inventory, acl, hidden_guest, coverage
    what: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.level.value:<8}{self.what}{': ' + self.detail if self.detail else ''}"


def _ok(what: str, detail: str) -> Line:
    return Line(Level.OK, what, detail)


def _failed(what: str, detail: str) -> Line:
    return Line(Level.FAILED, what, detail)


def _skipped(stages: tuple[str, ...] | list[str], needs: str) -> Iterator[Line]:
    for what in stages:
        yield Line(Level.SKIPPED, what, f"needs {needs}")


class Checkup:
    """One run of the checks: iterate it for the lines, then read ``verdict``.

    ``env`` is the environment the settings are read from (the process's when None);
    ``engine`` the database's (tests hand in theirs; made from ``DATABASE_URL`` when None).
    """

    def __init__(self, env: Mapping[str, str] | None = None, engine: Engine | None = None):
        self.env = env
        self.engine = engine
        self.verdict = Verdict.PASSED
        self._engine_read: Engine | None = None  # the database the checks could read

    def __iter__(self) -> Iterator[Line]:
        for line in self._stages():
            if line.level is Level.FAILED and self.verdict is Verdict.PASSED:
                self.verdict = Verdict.FAILED
            yield line

    def _misconfigured(self, what: str, problems: list[str]) -> Iterator[Line]:
        self.verdict = Verdict.MISCONFIGURED
        for problem in problems:
            yield _failed(what, problem)

    def _stages(self) -> Iterator[Line]:
        try:
            resolved = resolve(self.env)
        except ConfigError as exc:
            yield from self._misconfigured("settings", exc.problems)
            for warning in exc.warnings:
                yield Line(Level.WARN, "settings", warning)
            yield from _skipped(("database", "mapping", *PROXMOX_STAGES), "settings")
            return
        settings = resolved.settings
        yield _ok(
            "settings",
            f"table {settings.table}, action {settings.action}, "
            f"interval {settings.interval_minutes} min, dry run {settings.dry_run}",
        )
        for warning in resolved.warnings:
            yield Line(Level.WARN, "settings", warning)
        rows = yield from self._database(settings)
        if rows is None:
            yield from _skipped(("mapping",), "database")
        else:
            mapping_problem = vmid_column_problem(rows)
            yield Line(
                Level.OK if mapping_problem is None else Level.FAILED,
                "mapping",
                mapping_problem or f"CLEANUP_VMID_COLUMN={settings.vmid_column!r} holds VMIDs",
            )
        try:
            require(settings, "PVE_HOST", "PVE_USER", "PVE_TOKEN_NAME", "PVE_TOKEN_VALUE")
        except ConfigError as exc:
            yield from self._misconfigured("proxmox", exc.problems)
            yield from _skipped(PROXMOX_STAGES[1:], "proxmox")
            return
        proxmox = ProxmoxInventory(settings)
        yield from _proxmox(settings, proxmox, rows)
        if self._engine_read is not None and self.verdict is Verdict.PASSED:
            yield from _coverage(settings, self._engine_read, proxmox)

    def _database(self, settings: Settings) -> Generator[Line, None, list[Row] | None]:
        """The database stage; returns the platform table's rows, or None when it failed."""
        try:
            require(settings, "DATABASE_URL")
            engine = self.engine or make_engine(settings.database_url)
            table = PlatformTable(engine, settings)
            require_current(engine)
            rows = table.fetch_rows()
            self._engine_read = engine
        except ConfigError as exc:
            yield from self._misconfigured("database", exc.problems)
            return None
        except DatabaseError as exc:
            yield _failed("database", str(exc))
            return None
        yield _ok(
            "database",
            f"{engine.dialect.name}, table {settings.table!r} with {len(rows)} rows and every mapped column",
        )
        return rows


def _proxmox(settings: Settings, proxmox: ProxmoxInventory, rows: list[Row] | None) -> Iterator[Line]:
    """Proxmox's stages, each needing the one before; a failure is labelled with its stage."""
    stage = "proxmox"
    try:
        version = proxmox.version()
        others = len(settings.pve_endpoints) - 1
        yield _ok(
            "proxmox",
            f"{proxmox.endpoint} answers, version {version.get('version', '?')}"
            + (f" ({others} more PVE_HOST endpoint{'s' * (others > 1)} to fall back on)" if others > 0 else ""),
        )
        stage = "privileges"
        if not (yield from _privileges(settings, proxmox)):
            yield from _skipped(PROXMOX_STAGES[2:], "privileges")
            return
        stage = "quorum"
        proxmox.check_quorum()
        yield _ok("quorum", "the answering node is quorate (or standalone)")
        stage = "inventory"
        inventory = proxmox.read()
        yield _ok("inventory", f"{len(inventory.guests)} guests in {inventory.read_seconds:.2f} s")
        stage = "acl"
        proof = proxmox.acl_proof()
        if proof.hideable is not None:
            yield _ok("acl", f"Sys.Audit on /access: {proof.reason}")
        else:  # safe, only slower: not a failure
            yield Line(
                Level.WARN,
                "acl",
                f"{proof.reason}; sweeps and the watcher will make one /cluster/nextid request per ghost",
            )
        if rows is None:
            yield from _skipped(("hidden_guest",), "database")
            return
        stage = "hidden_guest"
        hidden = _hidden_guests(proxmox, rows, inventory, proof.hideable)
    except InventoryError as exc:
        yield _failed(stage, str(exc))
        later = PROXMOX_STAGES[PROXMOX_STAGES.index(stage) + 1 :] if stage in PROXMOX_STAGES else ()
        yield from _skipped(later, stage)
        return
    if hidden:
        yield Line(
            Level.WARN,
            "hidden_guest",
            f"VMIDs {', '.join(map(str, hidden))} have rows and are in use "
            "in Proxmox, but the token is not shown those guests (an ACL hides them); their rows are "
            "kept and reported",
        )


def _coverage(settings: Settings, engine: Engine, proxmox: ProxmoxInventory) -> Iterator[Line]:
    """Guests whose config names no pve-janitor hookscript, and nodes that sent no event while
    their hooked guests started and stopped, from what ``serve`` cached (docs/coverage.md).

    WARN lines, never a failure: such a guest costs speed, not safety (the sweep still removes
    its ghosts).  No line when all is well or nothing was checked yet, and none after another
    stage failed (that comes first)."""
    refresher = Refresher(engine, proxmox, settings, log_findings=False)  # its lines say them
    try:
        listed = refresher.list_guests() or {}
        checks = refresher.check_nodes() or {}
        with engine.connect() as conn:
            cached = read_cache(conn)
    except InventoryError as exc:
        yield Line(Level.WARN, "coverage", f"not checked: {exc}")
        return
    except SQLAlchemyError as exc:
        yield Line(Level.WARN, "coverage", f"not checked: database error {describe_db_error(exc)}")
        return
    without = sorted((c for v, c in cached.items() if v in listed and not c.has_hook), key=lambda c: c.vmid)
    if without:
        named = [f"{c.vmid} ({c.node}{', has ' + c.hookscript if c.hookscript else ''})" for c in without[:20]]
        more = f" and {len(without) - 20} more" if len(without) > 20 else ""
        yield Line(
            Level.WARN,
            "coverage",
            f"{len(without)} of {len(listed)} guests' configs name no pve-janitor hookscript, so they send "
            f"no event (the sweep still finds their ghosts): {', '.join(named)}{more}; "
            "`pve-janitor coverage` prints the lines that attach it",
        )
    for check in checks.values():
        if check.flagged:
            failed = f", {check.hook_errors} of them failed on the hookscript" if check.hook_errors else ""
            yield Line(
                Level.WARN,
                "coverage",
                f"node {check.node} sent no event for {check.tasks} starts/stops of guests whose config names "
                f"the hookscript{failed}: is /var/lib/vz/snippets/{HOOK_FILE} on {check.node}, executable, "
                "and does its /etc/pve-janitor/hook.conf reach the receiver?",
            )


def _privileges(settings: Settings, inventory: ProxmoxInventory) -> Generator[Line, None, bool]:
    """The token's privileges, each with what is lost without it; returns False when nothing can work.

    A token that holds nothing at all is almost always a privilege-separated token whose user
    has no ACL: Proxmox gives such a token only what both hold.  The token cannot read its
    user's privileges (that needs Sys.Audit on /access), so the lines that grant both are shown.
    """
    fix = "; run on a Proxmox node:\n" + "\n".join(f"          {cmd}" for cmd in grant_lines(settings))
    if not any(inventory.permissions().values()):
        yield _failed(
            "privileges",
            f"the token {token_id(settings)} holds no privilege at all. A privilege-"
            "separated token holds only what its user holds too, so its user most likely has no ACL" + fix,
        )
        return False
    try:
        inventory.check_privileges()
    except InventoryError as exc:
        yield _failed("privileges", f"{exc}{fix}")
        return False
    yield _ok("privileges", "the token holds VM.Audit on /vms, propagated")
    if inventory.privilege("/", "Sys.Audit") is None:
        yield _failed(
            "privileges",
            "the token lacks Sys.Audit on /: quorum cannot be checked, so nothing is ever "
            "removed, and the task tail sees only the token's own tasks (a destroyed stopped guest "
            "waits for the sweep)" + fix,
        )
        return False
    yield _ok("privileges", "Sys.Audit on / (quorum, and every user's tasks for the task tail)")
    if inventory.privilege("/access", "Sys.Audit") is None:
        yield Line(
            Level.WARN,
            "privileges",
            "the token lacks Sys.Audit on /access: the ACL list cannot prove the "
            "guest list complete, so every ghost's VMID is asked about one by one (slower, as safe)",
        )
    return True


def _hidden_guests(
    proxmox: ProxmoxInventory, rows: list[Row], inventory: Inventory, hideable: frozenset[int] | None
) -> list[int]:
    """Rows' VMIDs missing from the guest list that Proxmox says are in use (an ACL hides the guest)."""
    missing = {r.vmid for r in rows if r.vmid is not None and r.vmid not in inventory}
    return hidden_guests(missing, hideable, proxmox.vmid_in_use)
