"""``pve-janitor check``: settings, database, mapping, Proxmox, privileges, quorum, inventory, ACL.

The stages as data, so that they are tested without the command line: iterating a
:class:`Checkup` yields one :class:`Line` as each stage ends (a slow Proxmox shows the
lines before it at once), and afterwards ``verdict`` says how the checks ended.  A stage
that leaves nothing to check after it ends the run: bad settings, an unusable database,
a token without the privileges that anything needs.  The CLI prints the lines and turns
the verdict into its exit code.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass

from .config import ConfigError, Settings, load_settings
from .db import DatabaseError
from .inventory import grant_lines, token_id
from .model import Inventory, InventoryError, Refusal, Row, Word
from .runtime import Runtime
from .safety import hidden_guests, vmid_column_problem


class Level(Word):
    """How one line ends: fine, slower or partly blind but safe, or a failure."""

    OK = "ok"
    WARN = "WARN"
    FAILED = "FAILED"


class Verdict(Word):
    """How the whole check ended."""

    PASSED = "passed"  # no line failed (warnings allowed)
    FAILED = "failed"  # a line failed
    MISCONFIGURED = "misconfigured"  # the settings, or the table they name, are wrong


@dataclass(frozen=True)
class Line:
    level: Level
    what: str  # the stage: settings, database, mapping, proxmox, privileges, quorum, inventory, acl, hidden_guest
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.level.value:<8}{self.what}{': ' + self.detail if self.detail else ''}"


def _ok(what: str, detail: str) -> Line:
    return Line(Level.OK, what, detail)


def _failed(what: str, detail: str) -> Line:
    return Line(Level.FAILED, what, detail)


class Checkup:
    """One run of the checks: iterate it for the lines, then read ``verdict``.

    ``env`` is the environment the settings are read from (the process's when None);
    ``build`` makes the runtime from them (tests hand in their engine).  ``runtime`` is
    the runtime built, once the database stage has passed.
    """

    def __init__(self, env: Mapping[str, str] | None = None, build: Callable[[Settings], Runtime] = Runtime.build):
        self.env = env
        self.build = build
        self.verdict = Verdict.PASSED
        self.runtime: Runtime | None = None

    def __iter__(self) -> Iterator[Line]:
        for line in self._stages():
            if line.level is Level.FAILED and self.verdict is Verdict.PASSED:
                self.verdict = Verdict.FAILED
            yield line

    def _stages(self) -> Iterator[Line]:
        try:
            settings = load_settings(self.env)
        except ConfigError as exc:
            self.verdict = Verdict.MISCONFIGURED
            for problem in exc.problems:
                yield _failed("settings", problem)
            return
        yield _ok(
            "settings",
            f"table {settings.table}, action {settings.action}, "
            f"interval {settings.interval_minutes} min, dry run {settings.dry_run}",
        )
        try:
            runtime = self.runtime = self.build(settings)
            rows = runtime.table.fetch_rows()
        except (ConfigError, DatabaseError) as exc:
            self.verdict = Verdict.MISCONFIGURED if isinstance(exc, ConfigError) else Verdict.FAILED
            for problem in getattr(exc, "problems", [str(exc)]):
                yield _failed("database", problem)
            return
        yield _ok(
            "database",
            f"{runtime.engine.dialect.name}, table {settings.table!r} with {len(rows)} rows and every mapped column",
        )
        mapping_problem = vmid_column_problem(rows)
        yield Line(
            Level.OK if mapping_problem is None else Level.FAILED,
            "mapping",
            mapping_problem or f"CLEANUP_VMID_COLUMN={settings.vmid_column!r} holds VMIDs",
        )
        try:
            yield from _proxmox(runtime, rows)
        except InventoryError as exc:
            yield _failed("quorum" if exc.kind == Refusal.NO_QUORUM else "proxmox", str(exc))


def _proxmox(runtime: Runtime, rows: list[Row]) -> Iterator[Line]:
    """Proxmox's stages, in the order each needs the one before; raises InventoryError."""
    settings, proxmox = runtime.settings, runtime.inventory
    version = proxmox.version()
    others = len(settings.pve_endpoints) - 1
    yield _ok(
        "proxmox",
        f"{proxmox.endpoint} answers, version {version.get('version', '?')}"
        + (f" ({others} more PVE_HOST endpoint{'s' * (others > 1)} to fall back on)" if others > 0 else ""),
    )
    if not (yield from _privileges(runtime)):
        return
    proxmox.check_quorum()
    yield _ok("quorum", "the answering node is quorate (or standalone)")
    inventory = proxmox.read()
    yield _ok("inventory", f"{len(inventory.guests)} guests in {inventory.read_seconds:.2f} s")
    proof = proxmox.acl_proof()
    if proof.hideable is not None:
        yield _ok("acl", f"Sys.Audit on /access: {proof.reason}")
    else:  # safe, only slower: not a failure
        yield Line(
            Level.WARN, "acl", f"{proof.reason}; sweeps and the watcher will make one /cluster/nextid request per ghost"
        )
    hidden = _hidden_guests(runtime, rows, inventory, proof.hideable)
    if hidden:
        yield Line(
            Level.WARN,
            "hidden_guest",
            f"VMIDs {', '.join(map(str, hidden))} have rows and are in use "
            "in Proxmox, but the token is not shown those guests (an ACL hides them); their rows are "
            "kept and reported",
        )


def _privileges(runtime: Runtime) -> Generator[Line, None, bool]:
    """The token's privileges, each with what is lost without it; returns False when nothing can work.

    A token that holds nothing at all is almost always a privilege-separated token whose user
    has no ACL: Proxmox gives such a token only what both hold.  The token cannot read its
    user's privileges (that needs Sys.Audit on /access), so the lines that grant both are shown.
    """
    inventory, settings = runtime.inventory, runtime.settings
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
    runtime: Runtime, rows: list[Row], inventory: Inventory, hideable: frozenset[int] | None
) -> list[int]:
    """Rows' VMIDs missing from the guest list that Proxmox says are in use (an ACL hides the guest)."""
    missing = {r.vmid for r in rows if r.vmid is not None and r.vmid not in inventory}
    return hidden_guests(missing, hideable, runtime.inventory.vmid_in_use)
