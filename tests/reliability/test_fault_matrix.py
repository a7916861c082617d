"""The fault matrix: every entry point, every fault, SQLite and PostgreSQL, zero wrong deletions.

Three entry points remove rows: the sweep (``pve-janitor sweep`` as a
subprocess), the watcher (``Watcher.tick()`` in process, events posted signed
through the Flask app) and the manual run (``POST /api/v1/system/cleanup/run``
through the Flask test client).  Each runs against the Proxmox simulator over
HTTPS in the same small world (:func:`build_world`): six apps whose guests
exist, four ghosts, three deployments in flight.  For every fault in
:data:`FAULTS` and every entry point it applies to, the test

1. arms the fault and runs the entry point once;
2. asserts that exactly the expected rows went (none at all for a fail-closed
   fault), that every other row is unchanged (full-row snapshots), that
   nothing is half-done (each removed row has exactly one audit entry holding
   the row as it was; counters equal the audit), and that the reason is visible
   (exit code and message, HTTP status and body, watcher error and stats, or
   the log);
3. clears the fault, runs again, and asserts that the ghosts that really are
   gone are removed, and nothing else.

"Between plan and apply" races are injected at seams, not mocked: in the
simulator (right after the last Proxmox call before applying, the ``/access/acl``
read that follows the confirming read, so it works for the CLI subprocess too;
the test checks that Proxmox is asked nothing after it) or, for the watcher, at
``apply_actions`` itself.

``JANITOR_RELIABILITY_REPORT=<file>.json`` collects one row per case and renders
``<file>.md`` at the end of the session: the table in docs/reliability.md.
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import Database, _server_database, _sqlite_database, janitor_env, make_runtime, run_cli
from sqlalchemy import event as sa_event

from receiver import removal as removal_module
from receiver import store
from receiver.app import create_app
from receiver.config import load_settings
from receiver.events import SIGNATURE_HEADER, TIMESTAMP_HEADER, signature
from receiver.inbox import Inbox
from receiver.inventory import ProxmoxInventory
from receiver.simulator.scene import app_row, create_apps_table
from receiver.timeutil import utcnow
from receiver.watcher import Watcher

from .conftest import check_nothing_half_done, record, scaled, snapshot

HOOK_SECRET = "matrix-hook-secret-5d1e"
ADMIN_TOKEN = "matrix-admin-token-77c0"
EVENTS, RUN, STATS = "/api/v1/events", "/api/v1/system/cleanup/run", "/api/v1/system/cleanup/stats"

KEEP = (100, 101, 102, 103, 104, 105)  # guests exist (odd VMIDs on pve2)
GHOSTS = (120, 121, 122, 123)  # rows whose guests are gone
DEPLOYING, YOUNG = 130, 131  # in flight: protected status / created a minute ago
WATCHER_TICKS = 3  # two reads to confirm a gone guest, plus one
# Another writer holds the database this long: 10 s on SQLite for the sweep (the busy timeout is
# 30 s); shorter for the others in the short mode, the same mechanism.
LOCK_SECONDS = {("sqlite", "sweep"): 10.0, "sqlite": scaled(4.0, 10.0), "postgres": scaled(3.0, 10.0)}


def lock_seconds(case: Case) -> float:
    return LOCK_SECONDS.get((case.db.kind, case.entry), LOCK_SECONDS[case.db.kind])


PVE_TIMEOUT = 1.0


# --- the world -----------------------------------------------------------------------


def build_world(db: Database, sim) -> dict[Any, int]:
    """Rows and guests; returns VMID -> row id (the NULL-VMID row is under key None)."""
    table = create_apps_table(db.engine)
    day, hours = timedelta(days=1), timedelta(hours=2)
    rows = [app_row(v, "running", age=day) for v in KEEP]
    rows += [
        app_row(120, "running", age=day),
        app_row(121, "stopped", age=day),
        app_row(122, "error", age=hours),
        app_row(123, "running", age=hours),
    ]
    rows += [
        app_row(DEPLOYING, "deploying", age=timedelta(minutes=30)),
        app_row(None, "creating", age=hours, name="pending-app", port_base=999),
        app_row(YOUNG, "running", age=timedelta(seconds=60)),
    ]
    with db.engine.begin() as conn:
        conn.execute(table.insert(), rows)
    for v in KEEP:
        sim.add_guest(v, node="pve2" if v % 2 else "pve1", name=f"app{v}.apps.local")
    with db.engine.connect() as conn:
        return {vmid: key for key, vmid in conn.execute(sa.text("SELECT id, lxc_id FROM apps"))}


def naive_now(db: Database) -> Any:
    """Now, as the platform writes it (SQLite: text; the driver's datetime adapter is deprecated)."""
    now = utcnow().replace(tzinfo=None, microsecond=0)
    return now.isoformat(sep=" ") if db.kind == "sqlite" else now


# --- seams ---------------------------------------------------------------------------


class SimSeam:
    """Runs a callback inside the simulator at an exact moment of the conversation.

    ``before[n]`` / ``after[n]``: before / after the n-th ``/cluster/resources?type=vm``
    answer is built (after: before it is sent).  :meth:`before_apply`: after the ACL list
    read right after the confirming read is answered, the last Proxmox call before a removal
    applies: the pipeline reads the ACL list on both sides of the confirming read (so the
    confirming read is the first read after the first ``/access/acl`` answer, and ends with
    its quorum check), and in this world (no ACL entry on any ``/vms/N``) it asks
    ``/cluster/nextid`` about no ghost.  Every request is
    logged, so :meth:`check_last_call` can prove that no Proxmox call came after it.
    Works for subprocesses too.
    """

    LAST_CALL = "after the ACL list that follows the confirming read"

    def __init__(self, sim):
        self.sim = sim
        self.reads = 0
        self.acl_reads = 0
        self.before: dict[int, Callable[[], None]] = {}
        self.after: dict[int, Callable[[], None]] = {}
        self.last_call: Callable[[], None] | None = None
        self.fired: list[str] = []
        self.requests: list[str] = []  # every request the simulator handled, in order
        self.requests_at_last_call: int | None = None
        self.confirming = False  # a read after the ACL list has been answered
        self.confirmed = False  # ... and its quorum check too: the next ACL list is the last call
        resources, acl, status, handle = sim._api_resources, sim._api_acl, sim._api_cluster_status, sim._handle

        def wrapped_resources(query):
            if (query.get("type") or [None])[0] != "vm":
                return resources(query)
            self.reads += 1
            n = self.reads
            if n in self.before:
                self.fired.append(f"before read {n}")
                self.before.pop(n)()
            answer = resources(query)
            if n in self.after:
                self.fired.append(f"after read {n}")
                self.after.pop(n)()
            if self.acl_reads:
                self.confirming = True
            return answer

        def wrapped_status(query):
            answer = status(query)
            if self.confirming:
                self.confirmed = True
            return answer

        def wrapped_acl(query):
            try:
                return acl(query)
            finally:
                self.acl_reads += 1
                if self.confirmed and self.last_call is not None and self.LAST_CALL not in self.fired:
                    self.fired.append(self.LAST_CALL)
                    self.requests_at_last_call = len(self.requests)
                    self.last_call()

        def logged(method, target, authorization):
            self.requests.append(f"{method} {target}")
            return handle(method, target, authorization)

        sim._api_resources = wrapped_resources
        sim._api_acl = wrapped_acl
        sim._api_cluster_status = wrapped_status
        sim._handle = logged

    def before_apply(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` at the sweep's last Proxmox call before it applies (see the class)."""
        self.last_call = fn

    def check_last_call(self) -> None:
        """The :meth:`before_apply` seam fired, and Proxmox was asked nothing after it."""
        assert self.LAST_CALL in self.fired, (self.fired, self.requests)
        later = self.requests[self.requests_at_last_call :]
        assert later == [], f"Proxmox was asked {later} after the seam: it was not the last call before apply"


@dataclass
class Outcome:
    code: int | None
    text: str
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def short(self, entry: str) -> str:
        """How the run ended, in a few words, for the doc table."""
        if entry == "watcher":
            return f"last_error: {self.text[:45]}…" if self.text else "no error"
        return f"{'exit' if entry == 'sweep' else 'HTTP'} {self.code} {self.data.get('outcome') or ''}".strip()


# --- entry points ----------------------------------------------------------------------


@dataclass
class Case:
    entry: str
    db: Database
    sim: Any
    tmp_path: Any
    monkeypatch: Any
    caplog: Any
    ids: dict[Any, int] = field(default_factory=dict)
    env_extra: dict[str, str] = field(default_factory=dict)
    seam: SimSeam = field(init=False, repr=False)  # set by run_case() before any fault is armed
    mutated: set[int] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    server: Any = None  # OwnPostgres, for the database-going-away case
    runtime: Any = None
    watcher: Any = None
    client: Any = None
    before_run: list[Callable[[], object]] = field(default_factory=list)
    after_run: list[Callable[[], object]] = field(default_factory=list)
    responses: list[tuple[int, dict]] = field(default_factory=list)

    def build_in_process(self) -> None:
        """Runtime, watcher and Flask app: the watcher and manual entry points, and event posting."""
        self.runtime = make_runtime(
            self.sim, self.db, CLEANUP_HOOK_SECRET=HOOK_SECRET, CLEANUP_ADMIN_TOKEN=ADMIN_TOKEN, **self.env_extra
        )
        inbox = Inbox(self.runtime.engine)
        self.watcher = Watcher(self.runtime, inbox)
        app = create_app(self.runtime.settings, runtime=self.runtime, inbox=inbox, watcher=self.watcher)
        self.client = app.test_client()

    def post_event(
        self, vmid: int, phase: str, *, event_id: str | None = None, skew: float = 0.0, body_ts: float | None = None
    ) -> tuple[int, dict]:
        now = time.time() + skew
        body = json.dumps(
            {
                "event_id": event_id or secrets.token_hex(8),
                "vmid": vmid,
                "phase": phase,
                "node": "pve1",
                "ts": body_ts if body_ts is not None else now,
            }
        ).encode()
        stamp = str(round(now))
        answer = self.client.post(
            EVENTS,
            data=body,
            headers={
                "Content-Type": "application/json",
                TIMESTAMP_HEADER: stamp,
                SIGNATURE_HEADER: signature(HOOK_SECRET, stamp, body),
            },
        )
        self.responses.append((answer.status_code, answer.get_json()))
        return answer.status_code, answer.get_json()

    def stats(self) -> dict[str, Any]:
        return self.client.get(STATS).get_json()


def run_sweep_cli(case: Case) -> Outcome:
    env = janitor_env(case.sim, case.db, **case.env_extra)
    started = time.monotonic()
    result = run_cli(["sweep", "--json"], env, timeout=120)
    seconds = time.monotonic() - started
    try:
        data = json.loads(result.out)
    except ValueError:
        data = {}
    return Outcome(result.code, result.out + result.err, data, seconds)


def run_watcher(case: Case, ticks: int = WATCHER_TICKS) -> Outcome:
    started = time.monotonic()
    for _ in range(ticks):
        case.watcher.tick()
    seconds = time.monotonic() - started
    stats = case.stats()
    errors = " | ".join(e["message"] for e in stats.get("errors", []))
    return Outcome(None, case.watcher.last_error or "", {"stats": stats, "errors": errors}, seconds)


def run_manual(case: Case) -> Outcome:
    started = time.monotonic()
    answer = case.client.post(RUN, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    seconds = time.monotonic() - started
    data = answer.get_json()
    return Outcome(answer.status_code, data.get("message") or data.get("reason") or "", data, seconds)


RUNNERS = {"sweep": run_sweep_cli, "watcher": run_watcher, "manual": run_manual}


def post_ghost_stops(case: Case) -> None:
    """The stop events the ghosts' guests sent before they were destroyed."""
    for vmid in GHOSTS:
        assert case.post_event(vmid, "post-stop")[0] == 202


# --- faults --------------------------------------------------------------------------

ALL_ENTRIES = ("sweep", "watcher", "manual")


@dataclass(frozen=True)
class Fault:
    id: str
    what: str  # the fault, for the doc table
    arm: Callable[[Case], None]
    disarm: Callable[[Case], None]
    reason: Callable[[Case, Outcome], str]  # asserts the reason is visible, returns it in a few words
    removed_during: frozenset = frozenset()  # exactly these VMIDs go while it lasts (none: fails closed)
    during_by_entry: tuple = ()  # (entry, frozenset) pairs where an entry point differs
    stays: frozenset = frozenset()  # ghosts that are no longer ghosts once the fault is over
    entries: tuple[str, ...] = ALL_ENTRIES
    databases: tuple[str, ...] = ("sqlite", "postgres")
    watcher_events: bool = True  # post the ghosts' stop events before arming
    expect: str = ""  # what must happen, for the doc table

    def expected_during(self, entry: str) -> frozenset:
        return dict(self.during_by_entry).get(entry, self.removed_during)


def _refusal(words: str, refusal: str) -> Callable[[Case, Outcome], str]:
    def check(case: Case, out: Outcome) -> str:
        if case.entry == "sweep":
            assert out.code == 3, out.text
            assert out.data.get("outcome") == "refused" and out.data.get("refusal") == refusal, out.data
            assert words in out.data["reason"], out.data["reason"]
            return f"exit 3, refusal {refusal}: {out.data['reason'][:70]}"
        if case.entry == "manual":
            assert out.code == 422 and out.data["refusal"] == refusal, out.data
            assert words in out.data["message"]
            last = case.stats()["last_sweep"]
            assert last["outcome"] == "refused" and words in last["reason"], last
            return f"HTTP 422, refusal {refusal}; stats.last_sweep says so"
        assert words in out.text, out.text
        assert words in out.data["errors"], out.data["errors"]
        return f"watcher.last_error and stats.errors: {out.text[:70]}"

    return check


def _no_change(case: Case) -> None:
    return None


def _pveum(line: str) -> Callable[[Case], None]:
    return lambda case: case.sim.pveum(line)


def _reason_other_host(case: Case, out: Outcome) -> str:
    down = case.env_extra["PVE_HOST"].split(",")[0]
    if case.entry == "watcher":
        assert not out.text, out.text
        return f"no error; {down} skipped, {case.sim.pve_host} read"
    assert out.code in (0, 200) and out.data["outcome"] == "done", out.text
    return f"done; {down} skipped"


def _set_fault(kind: str, **kw) -> Callable[[Case], None]:
    return lambda case: case.sim.set_fault(kind, **kw)


def _clear_fault(case: Case) -> None:
    case.sim.set_fault(None)


def _arm_timeout(case: Case) -> None:
    case.sim.set_fault("slow", delay=PVE_TIMEOUT + 1.0)


def _arm_offline(case: Case) -> None:
    case.sim.set_node_online("pve2", False, stats_age=301)  # past 5 minutes: status unknown
    api = ProxmoxInventory(load_settings(env=case.sim.env()))._api
    with pytest.raises(Exception) as refused:  # the fault is real: the node's own API answers 595
        api.nodes("pve2").lxc.get()
    assert getattr(refused.value, "status_code", None) == 595
    if case.entry == "watcher":
        assert case.post_event(101, "post-stop")[0] == 202  # a stop on the offline node


def _reason_offline(case: Case, out: Outcome) -> str:
    if case.entry == "watcher":
        stats = out.data["stats"]
        assert 101 in stats["watched_vmids"], stats
        assert snapshot(case.db)[case.ids[101]]["status"] == "running"  # status unknown: neither gone nor stopped
        return "VMID 101 (offline node, status unknown) stays watched, row untouched"
    assert out.code in (0, 200) and out.data["outcome"] == "done", out.text
    assert out.data["kept"]["present"] == len(KEEP), out.data["kept"]
    return f"done; kept.present={out.data['kept']['present']} (pve2's guests listed, status unknown)"


def _arm_partial(case: Case) -> None:
    case.sim.set_visible(set(KEEP) - {101, 104})
    if case.entry == "watcher":
        assert case.post_event(101, "post-stop")[0] == 202  # a stop of a guest the token cannot see


def _reason_hidden(case: Case, out: Outcome) -> str:
    hidden = [101] if case.entry == "watcher" else [101, 104]  # the watcher asks only about what it watches
    if case.entry != "sweep":  # the CLI's sweep runs in a process of its own
        stats = out.data["stats"] if case.entry == "watcher" else case.stats()
        assert stats["hidden_guests"] == hidden, stats
    if case.entry == "watcher":
        return f"stats.hidden_guests={hidden}; the ghosts go"
    assert out.data["outcome"] == "done" and out.data["hidden_guests"] == hidden, out.data
    assert [r["vmid"] for r in out.data["reports"] if r["kind"] == "hidden_guest"] == hidden, out.data["reports"]
    return f"done; hidden_guests={hidden} kept and reported"


def _arm_reuse_before_confirm(case: Case) -> None:
    """VMID 122 is taken by a new guest between the planning read and the confirming read."""

    def reuse():
        case.sim.add_guest(122, node="pve1", name="other122.example")

    case.seam.before[2] = reuse


def _reason_dropped(case: Case, out: Outcome) -> str:
    if case.entry == "watcher":
        assert 122 in out.data["stats"]["watched_vmids"]
        return "VMID 122 back in the confirming read: row kept, still watched"
    assert out.data["outcome"] == "done" and out.data["dropped_vmids"] == [122], out.data
    return "done; dropped_vmids=[122] (guest is back)"


def _between_plan_and_apply(case: Case, change: Callable[[], None]) -> None:
    """Run ``change`` at the last moment before the apply transaction: after every check the
    sweep makes (the confirming read and the ACL proof), or, for the watcher, at ``apply_actions``."""
    if case.entry == "watcher":
        real = removal_module.apply_actions

        def apply_after_change(*args, **kwargs):
            if not case.seam.fired:
                case.seam.fired.append("at apply_actions")
                change()
            return real(*args, **kwargs)

        case.monkeypatch.setattr(removal_module, "apply_actions", apply_after_change)
    else:
        case.seam.before_apply(change)


def _platform_update(case: Case, vmid: int, **values: Any) -> None:
    sets = ", ".join(f"{k} = :{k}" for k in values)
    with case.db.engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE apps SET {sets} WHERE id = :id"), {**values, "id": case.ids[vmid]})
    case.mutated.add(case.ids[vmid])


def _arm_reuse_after_confirm(case: Case) -> None:
    """The platform re-deploys app 122 into a new guest that got VMID 122 again, after the
    confirming read and the ACL proof, just before the apply: it re-points the row (new
    hostname, deploying, updated_at now).  Only the apply's observed-value guard can catch it."""

    def reuse():
        case.sim.add_guest(122, node="pve1", name="new122.apps.local")
        _platform_update(case, 122, hostname="new122.apps.local", status="deploying", updated_at=naive_now(case.db))

    _between_plan_and_apply(case, reuse)


def _reason_skipped(**columns: str) -> Callable[[Case, Outcome], str]:
    """The rows of these VMIDs (``v122="updated_at"``) were skipped, naming a column that changed."""
    wanted = {int(k[1:]): column for k, column in columns.items()}

    def check(case: Case, out: Outcome) -> str:
        if case.entry == "watcher":
            skipped = {}
            for record_ in case.caplog.records:
                message = record_.getMessage()
                if message.startswith("skipped row") and "changed since planning" in message:
                    skipped[int(message.split("(VMID ")[1].split(")")[0])] = message.split("): ")[1]
        else:
            assert out.data["outcome"] == "done", out.data
            vmid_of = {key: vmid for vmid, key in case.ids.items()}
            skipped = {vmid_of[s["row_id"]]: s["why"] for s in out.data["skipped"]}
        assert set(skipped) == set(wanted), (skipped, wanted)
        for vmid, column in wanted.items():
            assert column in skipped[vmid] and skipped[vmid].endswith("changed since planning"), skipped
        where = "logged" if case.entry == "watcher" else "done; skipped"
        return f"{where}: " + "; ".join(f"{v}: {skipped[v]}" for v in sorted(skipped))

    return check


def _arm_row_changed(case: Case) -> None:
    """Between plan and apply the platform touches app 121 (status, updated_at) and moves app 123
    into a new guest 323 (VMID changed)."""

    def change():
        _platform_update(case, 121, status="deploying", updated_at=naive_now(case.db))
        case.sim.add_guest(323, node="pve1", name="app123.apps.local")
        _platform_update(case, 123, lxc_id=323)

    _between_plan_and_apply(case, change)


def _arm_in_flight(case: Case) -> None:
    """Two more deployments start right now: rows, no guest yet (one already says running)."""
    table = create_apps_table(case.db.engine)
    with case.db.engine.begin() as conn:
        conn.execute(
            table.insert(), [app_row(140, "deploying", age=timedelta(0)), app_row(141, "running", age=timedelta(0))]
        )
        for vmid, key in conn.execute(sa.text("SELECT lxc_id, id FROM apps WHERE lxc_id IN (140, 141)")):
            case.ids[vmid] = key
    if case.entry == "watcher":  # early or mistaken hints for every deployment in flight
        for vmid in (DEPLOYING, YOUNG, 140, 141):
            assert case.post_event(vmid, "post-stop")[0] == 202


def _disarm_in_flight(case: Case) -> None:
    for vmid in (140, 141):  # the deployments finish: their guests exist now
        case.sim.add_guest(vmid, node="pve1", name=f"app{vmid}.apps.local")


def _reason_in_flight(case: Case, out: Outcome) -> str:
    if case.entry == "watcher":
        watched = set(out.data["stats"]["watched_vmids"])
        assert {DEPLOYING, YOUNG, 140, 141} <= watched, watched
        return "kept (protected / young); their VMIDs stay watched"
    kept = out.data["kept"]
    assert out.data["outcome"] == "done" and kept["protected"] >= 3 and kept["young"] >= 2, out.data
    return f"done; kept protected={kept['protected']} young={kept['young']}"


class LockHolder:
    """Another writer holding the database for ``seconds``: SQLite ``BEGIN EXCLUSIVE`` through the
    platform's own driver; PostgreSQL ``LOCK TABLE apps IN ACCESS EXCLUSIVE MODE``."""

    def __init__(self, db: Database, seconds: float):
        self.db, self.seconds = db, seconds
        self.held = threading.Event()
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._hold, daemon=True)

    def _hold(self) -> None:
        try:
            if self.db.kind == "sqlite":
                path = self.db.engine.url.database
                assert path is not None  # a file database
                conn = sqlite3.connect(path, timeout=5, isolation_level=None)
                conn.execute("BEGIN EXCLUSIVE")
                self.held.set()
                time.sleep(self.seconds)
                conn.execute("COMMIT")
                conn.close()
            else:
                engine = sa.create_engine(self.db.url)
                with engine.connect() as connection, connection.begin():
                    connection.exec_driver_sql("LOCK TABLE apps IN ACCESS EXCLUSIVE MODE")
                    self.held.set()
                    time.sleep(self.seconds)
                engine.dispose()
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
            self.held.set()

    def start(self) -> LockHolder:
        self.thread.start()
        assert self.held.wait(10) and self.error is None, self.error
        return self


def _arm_locked(case: Case) -> None:
    seconds = lock_seconds(case)
    holder = LockHolder(case.db, seconds)
    case.before_run.append(holder.start)
    case.notes.append(f"lock held {seconds:g} s")
    case.after_run.append(lambda: holder.thread.join(30))


def _reason_locked(case: Case, out: Outcome) -> str:
    seconds = lock_seconds(case)
    assert out.seconds >= seconds - 1.0, (out.seconds, seconds)  # it waited for the other writer
    if case.entry == "sweep":
        assert out.code == 0 and out.data["outcome"] == "done", out.text
    elif case.entry == "manual":
        assert out.code == 200 and out.data["outcome"] == "done", out.data
    else:
        assert not out.text, out.text
    return f"waited, then done: {out.seconds:.1f} s with the lock held {seconds:g} s"


def _arm_db_gone(case: Case) -> None:
    """Stop the database server (``pg_ctl stop -m immediate``) in the middle: for the CLI right
    before it applies (after its last Proxmox call, the confirming read); in process inside the
    apply transaction, once the guarded DELETE was sent, just before the audit copies are
    written (by COPY on PostgreSQL, which SQLAlchemy's statement events do not see)."""
    server = case.server

    def stop():
        case.notes.append(f"server stopped in {server.stop_immediate():.2f} s")

    if case.entry == "sweep":
        case.seam.before_apply(stop)
    else:
        deleted: list[str] = []
        write_audit = store.insert_audit

        def on_execute(conn, cursor, statement, parameters, context, executemany):
            if statement.lstrip().upper().startswith("DELETE FROM APPS"):
                deleted.append(statement)

        def stop_then_write_audit(conn, entries):
            if deleted and not case.seam.fired:  # the delete was sent; the audit copy comes next
                case.seam.fired.append("inside the apply transaction")
                stop()
            return write_audit(conn, entries)

        sa_event.listen(case.db.engine, "before_cursor_execute", on_execute)
        case.after_run.append(lambda: sa_event.remove(case.db.engine, "before_cursor_execute", on_execute))
        case.monkeypatch.setattr(store, "insert_audit", stop_then_write_audit)

    def restart():
        took = server.start()
        case.notes.append(f"restarted in {took:.1f} s")

    case.after_run.append(restart)


def _reason_db_gone(case: Case, out: Outcome) -> str:
    assert case.seam.fired, "the server was never stopped"
    if case.entry == "sweep":
        assert out.code == 3 and out.data["outcome"] == "failed", out.text
        assert "nothing changed: database error" in out.data["reason"], out.data
        return f"exit 3: {out.data['reason']}"
    if case.entry == "manual":
        assert out.code == 503 and "nothing changed: database error" in out.data["message"], out.data
        return f"HTTP 503: {out.data['message']}"
    assert "database error" in out.text, out.text
    return f"watcher.last_error: {out.text}"


def _arm_clock_skew(case: Case) -> None:
    """Stop events signed with clocks 299 s and 301 s off, both ways; one for a guest that runs."""
    for vmid, skew in ((120, -301), (121, -299), (122, 301), (123, 299)):
        status, body = case.post_event(vmid, "post-stop", skew=skew)
        expected = 401 if abs(skew) > 300 else 202
        assert status == expected, (vmid, skew, status, body)
        if status == 401:
            assert body["message"] == "stale or future timestamp", body
    assert case.post_event(102, "post-stop", skew=-299)[0] == 202  # late, and the guest runs


def _disarm_clock_skew(case: Case) -> None:
    for vmid in (120, 122):  # the hookscript replays its spool with a fresh signature
        assert case.post_event(vmid, "post-stop")[0] == 202


def _reason_clock_skew(case: Case, out: Outcome) -> str:
    rejected = [b for s, b in case.responses if s == 401]
    assert len(rejected) == 2 and all(b["message"] == "stale or future timestamp" for b in rejected)
    return "±301 s: HTTP 401 'stale or future timestamp'; ±299 s: 202 and acted on"


def _arm_replayed(case: Case) -> None:
    """Duplicates, replays and reordering, as a spool replay or two nodes can produce them."""
    t = time.time()
    # 120: post-stop delivered before pre-stop, each twice (same event_id).
    for _ in range(2):
        case.post_event(120, "post-stop", event_id="e120-post", body_ts=t - 1)
        case.post_event(120, "pre-stop", event_id="e120-pre", body_ts=t - 2)
    # 121, 122: the same stop event replayed three times.
    for vmid in (121, 122):
        for _ in range(3):
            case.post_event(vmid, "post-stop", event_id=f"e{vmid}")
    # 102 (runs): stop then start in one batch; then an old stop replayed after the start.
    case.post_event(102, "post-stop", body_ts=t - 30)
    case.post_event(102, "post-start", body_ts=t - 20)
    # 103 (runs): the start arrives after a newer stop (reordered across batches).
    case.post_event(103, "post-stop", body_ts=t - 5)
    case.watcher.drain_inbox()
    case.post_event(103, "post-start", body_ts=t - 10)
    case.post_event(102, "post-stop", body_ts=t - 40)
    # 123 (gone): a stale start, older than its stop, arrives after the stop was processed.
    case.post_event(123, "post-stop", body_ts=t - 3)
    case.watcher.drain_inbox()
    case.post_event(123, "post-start", body_ts=t - 60)


def _disarm_replayed(case: Case) -> None:
    """The late start took 123 off the watch list: it is left to the sweep, the safety net."""
    case.runtime.sweeper.run(source="sweep")


def _reason_replayed(case: Case, out: Outcome) -> str:
    duplicates = [b for s, b in case.responses if s == 200]
    assert len(duplicates) == 6 and all(b["status"] == "duplicate" for b in duplicates), case.responses
    assert 123 not in out.data["stats"]["watched_vmids"]
    return "6 duplicates answered 200 'duplicate', acted on once; a late older start unwatched 123"


REFUSALS = (
    ("refused", "Proxmox refuses connections", _set_fault("refuse"), "cannot connect", "inventory"),
    (
        "timeout",
        f"Proxmox answers after PVE_TIMEOUT ({PVE_TIMEOUT:g} s)",
        _arm_timeout,
        "no answer within",
        "inventory",
    ),
    ("http500", "Proxmox answers HTTP 500", _set_fault("http500"), "HTTP 500", "inventory"),
    ("http401", "Proxmox answers HTTP 401 (token refused)", _set_fault("http401"), "HTTP 401", "inventory"),
)

FAULTS: tuple[Fault, ...] = tuple(
    Fault(fid, what, arm, _clear_fault, _refusal(words, refusal), expect="nothing removed; refused")
    for fid, what, arm, words, refusal in REFUSALS
) + (
    Fault(
        "node_offline",
        "node pve2 offline (/nodes/pve2/* answers 595)",
        _arm_offline,
        lambda case: case.sim.set_node_online("pve2", True),
        _reason_offline,
        removed_during=frozenset(GHOSTS),
        expect="pve2's rows kept (listed, status unknown); ghosts go",
    ),
    Fault(
        "privsep_user_lacks_role",
        "privilege-separated token whose user lacks PVEAuditor (the token holds "
        "nothing: Proxmox intersects user and token)",
        _pveum("acl delete / --users janitor@pve --roles PVEAuditor"),
        _pveum("acl modify / --users janitor@pve --roles PVEAuditor"),
        _refusal("VM.Audit", "privilege"),
        expect="nothing removed; refused",
    ),
    Fault(
        "no_sys_audit_root",
        "token without Sys.Audit on / (quorum unknowable, task tail blind)",
        lambda case: case.sim.set_sys_audit(False),
        lambda case: case.sim.set_sys_audit(True),
        _refusal("Sys.Audit on /", "privilege"),
        expect="nothing removed; refused",
    ),
    Fault(
        "no_quorum",
        "the answering node lost quorum (its guest list may be stale)",
        lambda case: case.sim.set_quorate(False),
        lambda case: case.sim.set_quorate(True),
        _refusal("not quorate", "no_quorum"),
        expect="nothing removed; refused",
    ),
    Fault(
        "one_host_down",
        "the first of two PVE_HOST endpoints is down",
        _no_change,
        _no_change,
        _reason_other_host,
        removed_during=frozenset(GHOSTS),
        expect="the next endpoint answers; ghosts go",
    ),
    Fault(
        "no_vm_audit",
        "token without VM.Audit (empty lists)",
        lambda case: case.sim.set_vm_audit(False),
        lambda case: case.sim.set_vm_audit(True),
        _refusal("VM.Audit", "privilege"),
        expect="nothing removed; refused",
    ),
    Fault(
        "empty_list",
        "empty guest list although /vms shows VM.Audit",
        lambda case: case.sim.set_visible(()),
        lambda case: case.sim.set_visible(None),
        _refusal("listed no guests", "empty_inventory"),
        expect="nothing removed; refused",
    ),
    Fault(
        "partial_list",
        "partial guest list (2 of 6 guests hidden by an ACL)",
        _arm_partial,
        lambda case: case.sim.set_visible(None),
        _reason_hidden,
        removed_during=frozenset(GHOSTS),
        expect="the hidden guests' rows kept and reported (hidden_guest); the ghosts confirmed free go",
    ),
    Fault(
        "vmid_reused_before_confirm",
        "ghost's VMID reused by a new guest before the confirming read",
        _arm_reuse_before_confirm,
        _no_change,
        _reason_dropped,
        removed_during=frozenset(GHOSTS) - {122},
        stays=frozenset({122}),
        expect="122 kept (guest exists again); the other ghosts go",
    ),
    Fault(
        "vmid_reused_before_apply",
        "guest destroyed, VMID reused and row re-pointed just before apply",
        _arm_reuse_after_confirm,
        _no_change,
        _reason_skipped(v122="updated_at"),
        removed_during=frozenset(GHOSTS) - {122},
        stays=frozenset({122}),
        expect="122 skipped by the observed-value guard; the other ghosts go",
    ),
    Fault(
        "deploy_in_flight",
        "deployments in flight (rows, no guest yet)",
        _arm_in_flight,
        _disarm_in_flight,
        _reason_in_flight,
        removed_during=frozenset(GHOSTS),
        expect="in-flight rows kept (protected, grace period); ghosts go",
    ),
    Fault(
        "row_changed",
        "platform changes rows between plan and apply (status; VMID)",
        _arm_row_changed,
        _no_change,
        _reason_skipped(v121="status", v123="lxc_id"),
        removed_during=frozenset({120, 122}),
        stays=frozenset({121, 123}),
        expect="both changed rows skipped; the other ghosts go",
    ),
    Fault(
        "db_locked",
        "another writer holds the database (SQLite BEGIN EXCLUSIVE 10 s; PostgreSQL LOCK TABLE)",
        _arm_locked,
        _no_change,
        _reason_locked,
        removed_during=frozenset(GHOSTS),
        expect="waits (busy timeout 30 s), then done",
    ),
    Fault(
        "db_gone",
        "database server stopped mid-run (pg_ctl stop -m immediate)",
        _arm_db_gone,
        _no_change,
        _reason_db_gone,
        databases=("own-postgres",),
        expect="nothing removed (transaction lost with the server); failed, reason shown",
    ),
    Fault(
        "clock_skew",
        "events signed 299/301 s in the past and future",
        _arm_clock_skew,
        _disarm_clock_skew,
        _reason_clock_skew,
        removed_during=frozenset({121, 123}),
        entries=("watcher",),
        watcher_events=False,
        expect="±301 s rejected (401), ±299 s accepted; no row of a running guest goes",
    ),
    Fault(
        "events_replayed",
        "duplicate, replayed and reordered events",
        _arm_replayed,
        _disarm_replayed,
        _reason_replayed,
        removed_during=frozenset({120, 121, 122}),
        entries=("watcher",),
        watcher_events=False,
        expect="acted on once; running guests kept; stale start defers 123 to the sweep",
    ),
)


def matrix(entry: str) -> list:
    params = []
    for fault in FAULTS:
        if entry not in fault.entries:
            continue
        for kind in fault.databases:
            marks = [pytest.mark.postgres] if kind == "postgres" else []
            params.append(pytest.param(fault, kind, id=f"{fault.id}-{kind}", marks=marks))
    return params


# --- the test body ---------------------------------------------------------------------


@pytest.fixture
def case_db(request, tmp_path):
    kind = request.param
    if kind == "sqlite":
        yield from _sqlite_database(tmp_path)
    elif kind == "postgres":
        yield from _server_database("postgres")
    else:
        server, database = request.getfixturevalue("own_postgres")
        database.server = server
        yield database


def run_case(entry: str, fault: Fault, db: Database, sim, tmp_path, monkeypatch, caplog) -> None:
    caplog.set_level(logging.INFO, logger="receiver")
    case = Case(entry, db, sim, tmp_path, monkeypatch, caplog, server=getattr(db, "server", None))
    if fault.id == "timeout":
        case.env_extra["PVE_TIMEOUT"] = str(PVE_TIMEOUT)
    if fault.id == "one_host_down":
        with socket.socket() as probe:  # a port nobody listens on: a node that is down
            probe.bind(("127.0.0.1", 0))
            down = f"127.0.0.1:{probe.getsockname()[1]}"
        case.env_extra["PVE_HOST"] = f"{down},{sim.pve_host}"
    case.ids = build_world(db, sim)
    case.seam = SimSeam(sim)
    if entry != "sweep":
        case.build_in_process()
    if entry == "watcher" and fault.watcher_events:
        post_ghost_stops(case)
    fault.arm(case)
    before = snapshot(db)
    ghost_keys = {case.ids[v]: v for v in GHOSTS}

    for step in case.before_run:
        step()
    out = RUNNERS[entry](case)
    for step in case.after_run:
        step()
    if case.seam.last_call is not None:  # a race placed "just before the apply" really was
        case.seam.check_last_call()

    # 1. Nothing half-done; exactly the expected rows gone; every other row as it was.
    removed = check_nothing_half_done(db, before)
    vmid_of = {key: row["lxc_id"] for key, row in before.items()}
    removed_vmids = {vmid_of[k] for k in removed}
    expected_during = fault.expected_during(entry)
    assert removed_vmids == set(expected_during), (removed_vmids, out.text[-1500:])
    now = snapshot(db)
    for key, row in before.items():
        if key not in removed and key not in case.mutated:
            assert now[key] == row, f"row {key} (VMID {row['lxc_id']}) changed: {row} -> {now[key]}"
    # 2. The reason is visible.
    reason = fault.reason(case, out)

    # 3. Recovery: the fault ends, the entry point runs again, the ghosts that are gone go.
    fault.disarm(case)
    again = RUNNERS[entry](case) if entry != "watcher" else run_watcher(case)
    final = check_nothing_half_done(db, before)
    final_vmids = {vmid_of[k] for k in final}
    expected_final = set(GHOSTS) - fault.stays
    assert final_vmids == expected_final, (final_vmids, again.text[-1500:])
    assert set(final) <= set(ghost_keys), "a row that is not a ghost was removed"
    if entry == "sweep":
        assert again.code == 0, again.text
    elif entry == "manual":
        assert again.code == 200, again.data
    now = snapshot(db)
    for key, row in before.items():
        if key not in final and key not in case.mutated:
            assert now[key] == row, f"row {key} changed after recovery"

    record(
        "matrix",
        entry=entry,
        fault=fault.id,
        what=fault.what,
        db="own-postgres" if case.server is not None else db.kind,
        expect=fault.expect,
        during=out.short(entry),
        removed_during=len(removed),
        seconds=round(out.seconds, 2),
        reason=reason,
        recovered=f"{len(final)} of {len(expected_final)} ghosts removed",
        notes="; ".join(case.notes),
    )


@pytest.mark.parametrize(("fault", "case_db"), matrix("sweep"), indirect=["case_db"])
def test_sweep_cli(fault, case_db, sim, tmp_path, monkeypatch, caplog):
    run_case("sweep", fault, case_db, sim, tmp_path, monkeypatch, caplog)


@pytest.mark.parametrize(("fault", "case_db"), matrix("watcher"), indirect=["case_db"])
def test_watcher(fault, case_db, sim, tmp_path, monkeypatch, caplog):
    run_case("watcher", fault, case_db, sim, tmp_path, monkeypatch, caplog)


@pytest.mark.parametrize(("fault", "case_db"), matrix("manual"), indirect=["case_db"])
def test_manual_run(fault, case_db, sim, tmp_path, monkeypatch, caplog):
    run_case("manual", fault, case_db, sim, tmp_path, monkeypatch, caplog)


def test_event_posted_while_another_sqlite_writer_commits_is_stored(sim, sqlite_db, tmp_path, monkeypatch, caplog):
    """An event arrives while another writer (the watcher, a sweep) is committing.

    A plain deferred transaction that reads before it writes would hold SQLite's read
    lock while the other writer waits to commit; SQLite then refuses to wait (it would
    be a deadlock): "database is locked", and the hookscript gets 503.  The inbox must
    take the write lock up front and wait its turn.
    """
    case = Case("watcher", sqlite_db, sim, tmp_path, monkeypatch, caplog)
    case.ids = build_world(sqlite_db, sim)
    case.build_in_process()
    other = sqlite3.connect(sqlite_db.engine.url.database, isolation_level=None, timeout=30, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO janitor_errors (at, source, message) VALUES ('2026-01-01 00:00:00', 'test', 'x')")
    failures: list[BaseException] = []

    def commit() -> None:
        try:
            other.execute("COMMIT")
        except sqlite3.Error as exc:
            failures.append(exc)

    held: list[str] = []

    def hold_the_read(conn, cursor, statement, parameters, context, executemany):
        if "FROM janitor_inbox" in statement and not held:  # the duplicate check: the read before the write
            held.append(statement)
            time.sleep(0.3)  # the other writer starts committing meanwhile

    sa_event.listen(sqlite_db.engine, "after_cursor_execute", hold_the_read)
    committer = threading.Timer(0.1, commit)
    started = time.monotonic()
    committer.start()
    try:
        status, body = case.post_event(120, "post-stop")
    finally:
        committer.join(40)
        sa_event.remove(sqlite_db.engine, "after_cursor_execute", hold_the_read)
        other.close()
    took = time.monotonic() - started
    assert held and failures == [], failures
    assert status == 202, body
    assert took < 5, took
    record("event_race", db="sqlite", status=status, seconds=round(took, 2))
