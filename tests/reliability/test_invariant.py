"""The invariant, proven by a model-based test: no row is removed while a guest with its VMID exists.

A hypothesis state machine drives the real product — watcher, sweep, inbox (through the
HTTP app, with signed, forged and replayed events), the removal pipeline and apply — against
the project's Proxmox simulator over HTTPS and a real table (SQLite here; PostgreSQL and
MariaDB where configured).  Its rules are what happens around a janitor in production:

* platform writes: rows inserted (NULL, old, young and unreadable timestamps; protected and
  error statuses; reused and NULL VMIDs), updated and deleted;
* guests created, stopped, started, destroyed, migrated; VMIDs reused;
* ACL changes that hide and unhide guests (per guest and by pool), nodes going offline,
  the answering node losing quorum, API faults and late answers;
* hook events (true, forged, replayed, in any order), watcher ticks (with and without the
  task poll) and sweeps (forced or not, dry runs);
* holds placed and released (on a row, on a VMID), also inside a removal;
* pending plans: a batch of ghosts that trips the guard keeps a plan; a random plan (pending,
  or already decided, superseded) is approved or rejected, with the same interleavings inside
  the approval as inside a sweep;
* interleavings *inside* a removal: right after its rows are read, right before its
  confirming read (after the ACL list), and right before its apply.

After every step: no row was removed (or marked) while a guest with its VMID existed (old
error rows, which the user asked to remove, are the one exception); no held row was removed;
an approval removed only rows of its plan, each exactly as it was reviewed; a rejection or a
refused approval removed nothing; every removed row is in the audit exactly once; nothing
changed that a removal or a stop mark did not change.

One window no tool can close is left out by construction: a guest *created* after the
confirming read and before the delete commits (milliseconds; the grace period and the
protected statuses are what cover a deployment there).  Every other operation may come
in that window.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import Database, _server_database, make_runtime
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

import receiver.removal as removal_module
from receiver import approval, holds, pending, store
from receiver.app import create_app
from receiver.db import make_engine
from receiver.events import signature
from receiver.inbox import Inbox
from receiver.metrics import Metrics
from receiver.model import Reason, Refusal
from receiver.pending import PlanClosed, PlanState
from receiver.simulator import ProxmoxSimulator
from receiver.timeutil import utcnow
from receiver.watcher import Watcher

from .conftest import record, scaled

VMIDS = tuple(range(100, 108))  # few, so that VMIDs are reused all the time
STEADY = tuple(range(200, 204))  # apps that just run, so that a removal rarely empties the table
ALL_VMIDS = VMIDS + STEADY
NODES = ("pve1", "pve2")
STATUSES = ("running", "stopped", "error", "deploying")
STAMPS = ("null", "old", "young", "unreadable")
HOOK_SECRET = "model-hook-secret-0123456789"
SEAMS = ("after_rows", "before_confirm", "before_apply")
WHATS = (
    "create",
    "destroy",
    "stop",
    "insert",
    "touch",
    "delete",
    "hide",
    "unhide",
    "no_quorum",
    "quorum",
    "hold",
    "release",
)
PICK = st.integers(0, 63)  # which row (or VMID): mapped onto what exists when the rule runs
INSIDE = st.one_of(st.none(), st.tuples(st.sampled_from(SEAMS), st.sampled_from(WHATS), PICK, st.integers(0, 3)))

EXAMPLES = {"sqlite": scaled(100, 1000), "postgres": scaled(30, 300), "mysql": scaled(30, 300)}
if os.environ.get("JANITOR_MODEL_EXAMPLES"):  # for a longer run by hand
    EXAMPLES = {kind: int(os.environ["JANITOR_MODEL_EXAMPLES"]) for kind in EXAMPLES}
STEPS = scaled(40, 60)
FIGURES: dict[str, dict[str, int]] = {}
OUTCOMES: dict[str, dict[str, int]] = {}  # sweeps by outcome or refusal, per database: every path is reached
DECISIONS: dict[str, dict[str, int]] = {}  # approvals and rejections by what came of them, per database


def _stamp(kind: str) -> str | None:
    now = utcnow().replace(tzinfo=None, microsecond=0)
    return {
        "null": None,
        "old": (now - timedelta(days=2)).isoformat(sep=" "),
        "young": now.isoformat(sep=" "),
        "unreadable": "yesterday-ish",
    }[kind]


class World:
    """One example's cluster, database, receiver parts and the seams inside a removal."""

    def __init__(self, kind: str, grace: int, action: str):
        self.dir = tempfile.mkdtemp(prefix="janitor-model-")
        self._server_db = None
        if kind == "sqlite":
            url = f"sqlite:///{self.dir}/platform.db"
            self.db = Database("sqlite", url, make_engine(url))
        else:
            self._server_db = _server_database(kind)
            self.db = next(self._server_db)
        self.platform = make_engine(self.db.url)  # the platform's own connections
        metadata = sa.MetaData()
        self.table = sa.Table(
            "apps",
            metadata,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("lxc_id", sa.BigInteger),
            sa.Column("hostname", sa.String(100)),
            sa.Column("public_port", sa.Integer),
            sa.Column("internal_port", sa.Integer),
            sa.Column("status", sa.String(32)),
            sa.Column("created_at", sa.String(40)),
            sa.Column("updated_at", sa.String(40)),
        )
        metadata.create_all(self.platform)
        self.sim = ProxmoxSimulator(nodes=NODES).start()
        self.runtime = make_runtime(
            self.sim,
            self.db,
            CLEANUP_GRACE_MINUTES=grace,
            CLEANUP_ACTION=action,
            CLEANUP_HOOK_SECRET=HOOK_SECRET,
            ERROR_RETENTION_HOURS=1,
            CLEANUP_TASK_POLL_SECONDS=0.5,
            PVE_TIMEOUT=3,
        )
        self.inbox = Inbox(self.runtime.engine)
        self.watcher = Watcher(self.runtime, self.inbox, Metrics())
        app = create_app(self.runtime.settings, runtime=self.runtime, inbox=self.inbox, watcher=self.watcher)
        self.client = app.test_client()
        self.armed: dict[str, list[Callable[[], object]]] = {seam: [] for seam in SEAMS}
        self._install_seams()

    def _install_seams(self) -> None:
        table, inventory = self.runtime.table, self.runtime.inventory
        fetch, hideable = table.fetch_rows, inventory.hideable_vmids

        def fetch_then(vmids=None):
            rows = fetch(vmids=vmids)
            self.fire("after_rows")
            return rows

        def hideable_then():
            try:
                return hideable()
            finally:
                self.fire("before_confirm")

        table.fetch_rows = fetch_then  # type: ignore[method-assign]  # a seam on this example's instance
        inventory.hideable_vmids = hideable_then  # type: ignore[method-assign]  # a seam, likewise

    def fire(self, seam: str) -> None:
        ops, self.armed[seam] = self.armed[seam], []
        for op in ops:
            op()

    def close(self) -> None:
        self.sim.stop()
        self.platform.dispose()
        self.runtime.engine.dispose()
        if self._server_db is not None:
            self._server_db.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class Model(RuleBasedStateMachine):
    """The state machine; ``db_kind`` is set per test below."""

    db_kind = "sqlite"

    def __init__(self) -> None:
        super().__init__()
        self.world: World | None = None
        self.rows: dict[int, dict[str, Any]] = {}  # what the platform wrote, as the janitor may change it
        self.keys = itertools.count(1)
        self.events: list[tuple[bytes, dict[str, str]]] = []
        self.removed: dict[int, list[str]] = {}  # row key -> "delete"/"mark", one per janitor's apply
        self.violations: list[str] = []
        self.just_marked: set[int] = set()  # rows marked since the last check
        self.holds: dict[int, tuple[str, Any]] = {}  # hold id -> ("row", key text) or ("vmid", VMID)
        self.approving: dict[str, pending.ReviewedRow] | None = None  # the plan an approval carries out
        self.applied_now = 0  # actions applied since the rule began (a rejection must apply none)
        self.steps = 0
        self._real_apply = removal_module.apply_actions
        removal_module.apply_actions = self._checked_apply

    # --- the check at the moment of every removal -------------------------------------

    def _checked_apply(self, table, actions, *, source, now, plan_id=None):
        self.live.fire("before_apply")
        existing = self.live.sim.vmids()
        held_keys = {what for kind, what in self.holds.values() if kind == "row"}
        held_vmids = {what for kind, what in self.holds.values() if kind == "vmid"}
        result = self._real_apply(table, actions, source=source, now=now, plan_id=plan_id)
        self.applied_now += len(result.applied)
        for action in result.applied:
            if action.reason == Reason.GHOST and action.row.vmid in existing:
                self.violations.append(
                    f"row {action.row.key} ({action.action}, {source}) removed while guest "
                    f"{action.row.vmid} exists: {action.detail}"
                )
            if str(action.row.key) in held_keys or action.row.vmid in held_vmids:
                self.violations.append(f"row {action.row.key} (VMID {action.row.vmid}, {source}) removed while held")
            if source == "approval":
                reviewed = (self.approving or {}).get(str(action.row.key))
                if reviewed is None or plan_id is None:
                    self.violations.append(f"approval of plan {plan_id} removed row {action.row.key}, never reviewed")
                elif (reviewed.row, reviewed.action, reviewed.reason) != (action.row, action.action, action.reason):
                    self.violations.append(
                        f"approval of plan {plan_id} removed row {action.row.key} as {action.row}, "
                        f"reviewed as {reviewed.row}"
                    )
            if "delete" in self.removed.get(action.row.key, ()):
                self.violations.append(f"row {action.row.key} deleted, then acted on again")
            # A mark can come again: the platform may set a marked row back, and it is marked anew.
            self.removed.setdefault(action.row.key, []).append(action.action)
            if action.action == "mark":
                self.just_marked.add(action.row.key)
        return result

    @property
    def live(self) -> World:
        """This example's world: made by ``setup``, which hypothesis runs before any rule."""
        assert self.world is not None
        return self.world

    def teardown(self) -> None:
        removal_module.apply_actions = self._real_apply
        figures = FIGURES.setdefault(self.db_kind, {"examples": 0, "steps": 0, "removed": 0})
        figures["examples"] += 1
        figures["steps"] += self.steps
        figures["removed"] += sum(len(actions) for actions in self.removed.values())
        if self.world is not None:
            self.world.close()

    @initialize(
        grace=st.sampled_from([0, 15]),
        action=st.sampled_from(["delete", "mark"]),
        start=st.lists(st.sampled_from(VMIDS), min_size=1, max_size=4, unique=True),
    )
    def setup(self, grace, action, start):
        self.world = World(self.db_kind, grace, action)
        for vmid in start + list(STEADY):
            self.live.sim.add_guest(vmid, node=NODES[vmid % 2], name=f"app{vmid}")
            self._insert(vmid, "running", "old")

    # --- platform writes ---------------------------------------------------------------

    def _insert(self, vmid: int | None, status: str, stamps: str) -> int:
        return self._insert_many([vmid], status, stamps)[0]

    def _insert_many(self, vmids: list[int | None], status: str, stamps: str) -> list[int]:
        """Rows written by the platform in one transaction; their keys."""
        rows: list[dict[str, Any]] = []
        for vmid in vmids:
            key = next(self.keys)
            rows.append(
                {
                    "id": key,
                    "lxc_id": vmid,
                    "hostname": f"app{key}",
                    "public_port": 20000 + key,
                    "internal_port": 30000 + key,
                    "status": status,
                    "created_at": _stamp(stamps),
                    "updated_at": _stamp(stamps),
                }
            )
        with self.live.platform.begin() as conn:
            conn.execute(self.live.table.insert(), rows)
        for row in rows:
            self.rows[row["id"]] = row
        return [row["id"] for row in rows]

    def _update(self, key: int, status: str, stamps: str) -> None:
        if key not in self.rows:
            return  # gone meanwhile (a removal, or the platform itself)
        values = {"status": status, "updated_at": _stamp(stamps)}
        with self.live.platform.begin() as conn:
            touched = conn.execute(self.live.table.update().where(self.live.table.c.id == key).values(values))
        if touched.rowcount:
            self.rows[key].update(values)

    def _delete(self, key: int) -> None:
        with self.live.platform.begin() as conn:
            conn.execute(self.live.table.delete().where(self.live.table.c.id == key))
        self.rows.pop(key, None)

    @rule(
        vmid=st.one_of(st.sampled_from(VMIDS), st.none()),
        status=st.sampled_from(STATUSES),
        stamps=st.sampled_from(STAMPS),
    )
    def platform_inserts(self, vmid, status, stamps):
        self._insert(vmid, status, stamps)

    @rule(vmid=st.sampled_from(VMIDS), stamps=st.sampled_from(["old", "null"]))
    def deployment_failed_half_way(self, vmid, stamps):
        """A row whose guest was never created (or is gone): a ghost, unless a guest has the VMID."""
        self._insert(vmid, "running", stamps)

    @rule(pick=PICK, status=st.sampled_from(STATUSES), stamps=st.sampled_from(STAMPS))
    def platform_updates(self, pick, status, stamps):
        key = self._row_key(pick)
        if key is not None:
            self._update(key, status, stamps)

    @rule(pick=PICK)
    def platform_deletes(self, pick):
        key = self._row_key(pick)
        if key is not None:
            self._delete(key)

    @rule(vmid=st.sampled_from(VMIDS), node=st.sampled_from(NODES), stamps=st.sampled_from(STAMPS))
    def platform_deploys(self, vmid, node, stamps):
        """The platform's own flow: a row in a protected status, the guest, then running."""
        if vmid in self.live.sim.vmids():
            return
        self._insert(vmid, "deploying", stamps)
        key = max(self.rows)
        self.live.sim.add_guest(vmid, node=node, name=f"app{key}")
        self._update(key, "running", stamps)

    # --- guests ------------------------------------------------------------------------

    def _guest_op(self, op: Callable[[], Any]) -> None:
        try:
            op()
        except (KeyError, ValueError, RuntimeError):
            pass  # no such guest, locked, a running VM: Proxmox refuses too

    @rule(pick=PICK, any_vmid=st.integers(0, 3), node=st.sampled_from(NODES), running=st.booleans())
    def guest_created(self, pick, any_vmid, node, running):
        vmid = self._row_vmid(pick, any_vmid, ghosts_first=True)
        self._guest_op(lambda: self.live.sim.add_guest(vmid, node=node, status="running" if running else "stopped"))

    @rule(vmid=st.sampled_from(VMIDS))
    def guest_stopped(self, vmid):
        self._guest_op(lambda: self.live.sim.stop_guest(vmid))

    @rule(vmid=st.sampled_from(VMIDS))
    def guest_started(self, vmid):
        self._guest_op(lambda: self.live.sim.start_guest(vmid))

    @rule(vmid=st.sampled_from(VMIDS))
    def guest_destroyed(self, vmid):
        self._guest_op(lambda: self.live.sim.destroy_guest(vmid))

    @rule(pick=PICK, event=st.booleans())
    def app_destroyed_by_hand(self, pick, event):
        """Someone stops and destroys an app's guest (its hookscript posts the stop, or not)."""
        vmid = self._row_vmid(pick, any_vmid=1)
        if vmid is None:
            return
        self._guest_op(lambda: self.live.sim.stop_guest(vmid))
        self._guest_op(lambda: self.live.sim.destroy_guest(vmid))
        if event:
            self.hook_event(vmid, "post-stop", "true")

    @rule(vmid=st.sampled_from(VMIDS), node=st.sampled_from(NODES))
    def guest_migrated(self, vmid, node):
        self._guest_op(lambda: self.live.sim.migrate_guest(vmid, node))

    # --- what the token sees, and how Proxmox answers ------------------------------------

    @rule(picks=st.lists(st.tuples(PICK, st.integers(0, 3)), max_size=3), via=st.sampled_from(["vms", "pool"]))
    def acl_hides(self, picks, via):
        hidden = {self._row_vmid(pick, any_vmid) for pick, any_vmid in picks}
        self.live.sim.set_visible(None if not hidden else set(ALL_VMIDS) - hidden, via=via)

    @rule(node=st.sampled_from(NODES), online=st.sampled_from([True, True, False]))
    def node_online(self, node, online):
        self.live.sim.set_node_online(node, online)

    @rule(quorate=st.sampled_from([True, True, False]))
    def quorum(self, quorate):
        self.live.sim.set_quorate(quorate)

    @rule(pick=PICK)
    def split_brain_redeploy(self, pick):
        """The answering node is cut off from quorum; on the quorate side a ghost row's VMID is
        taken by a new guest (a redeploy the stale node cannot see)."""
        self.live.sim.set_quorate(False)
        vmid = self._row_vmid(pick, 1, ghosts_first=True)
        self._guest_op(lambda: self.live.sim.add_guest(vmid, node="pve2"))

    @rule(
        kind=st.sampled_from([None, None, None, None, "refuse", "http500", "reset", "slow"]),
        delay=st.sampled_from([0.02, 0.1]),
    )
    def api_fault(self, kind, delay):
        self.live.sim.set_fault(kind, delay)

    @rule(status=st.sampled_from([None, None, None, 500, 403]))
    def acl_list_fault(self, status):
        self.live.sim.set_acl_fault(status)

    # --- interleavings inside a removal ---------------------------------------------------

    # What a rule draws never depends on the model's state (which rows exist then): the product
    # runs against real time and threads, and hypothesis must be able to replay a draw.  A
    # "pick" is mapped onto whatever exists when the rule runs.

    def _row_key(self, pick: int) -> int | None:
        keys = sorted(self.rows)
        return keys[pick % len(keys)] if keys else None

    def _row_vmid(self, pick: int, any_vmid: int, ghosts_first: bool = False) -> int | None:
        """Mostly (``any_vmid`` > 0) a VMID that has a row, where a wrong removal could happen;
        else any VMID of the churned pool.  ``ghosts_first``: a row's VMID that no guest holds
        now, if there is one (a guest created there is what a removal must notice)."""
        with_rows = sorted({r["lxc_id"] for r in self.rows.values() if r["lxc_id"] in VMIDS})
        if ghosts_first:
            ghosts = [v for v in with_rows if v not in self.live.sim.vmids()]
            with_rows = ghosts or with_rows
        if with_rows and any_vmid:
            return with_rows[pick % len(with_rows)]
        return VMIDS[pick % len(VMIDS)]

    def _interleave(self, inside: tuple[str, str, int, int] | None) -> None:
        """Arm one operation to run inside the next removal, at one of its seams."""
        if inside is None:
            return
        seam, what, pick, any_vmid = inside
        if what == "create" and seam == "before_apply":
            return  # the one window no tool can close (see the module's docstring)
        vmid = self._row_vmid(pick, any_vmid, ghosts_first=what == "create")
        sim = self.live.sim
        key = self._row_key(pick)

        def touch() -> None:
            if key is not None:
                self._update(key, "running", "young")

        def delete() -> None:
            if key is not None:
                self._delete(key)

        ops: dict[str, Callable[[], object]] = {
            "create": lambda: self._guest_op(lambda: sim.add_guest(vmid, node="pve1")),
            "destroy": lambda: self._guest_op(lambda: sim.destroy_guest(vmid)),
            "stop": lambda: self._guest_op(lambda: sim.stop_guest(vmid)),
            "insert": lambda: self._insert(vmid, "running", "null"),
            "touch": touch,
            "delete": delete,
            "hide": lambda: sim.set_visible(set(ALL_VMIDS) - {vmid}),
            "unhide": lambda: sim.set_visible(None),
            "no_quorum": lambda: sim.set_quorate(False),
            "quorum": lambda: sim.set_quorate(True),
            "hold": lambda: self._place_hold(pick, on_vmid=bool(any_vmid % 2), any_vmid=any_vmid),
            "release": lambda: self._release_hold(pick, by_id=bool(any_vmid % 2)),
        }
        self.live.armed[seam].append(ops[what])

    # --- holds ---------------------------------------------------------------------------------

    def _place_hold(self, pick: int, on_vmid: bool, any_vmid: int = 1, key: int | None = None) -> None:
        """Mostly (``any_vmid`` > 0) on a row that a removal could take now (no guest of its VMID),
        where a hold that is not honoured would show."""
        engine, now = self.live.runtime.engine, utcnow()
        if on_vmid:
            vmid = self._row_vmid(pick, any_vmid, ghosts_first=True)
            if vmid is None:
                return
            placed = holds.place(engine, "apps", now=now, source="cli", vmid=vmid, reason="model")
            self.holds[placed.id] = ("vmid", vmid)
            return
        if key is None:
            existing = self.live.sim.vmids()
            ghosts = sorted(k for k, r in self.rows.items() if r["lxc_id"] not in existing)
            key = ghosts[pick % len(ghosts)] if ghosts and any_vmid else self._row_key(pick)
        if key is None:
            return
        placed = holds.place(engine, "apps", now=now, source="http", row_key=str(key), until=now + timedelta(days=1))
        self.holds[placed.id] = ("row", str(key))

    def _release_hold(self, pick: int, by_id: bool) -> None:
        if not self.holds:
            return
        hold_id = sorted(self.holds)[pick % len(self.holds)]
        kind, what = self.holds[hold_id]
        engine = self.live.runtime.engine
        if by_id:
            released = holds.release(engine, "apps", hold_id=hold_id)
        elif kind == "vmid":
            released = holds.release(engine, "apps", vmid=what)
        else:
            released = holds.release(engine, "apps", row_key=what)
        gone = {h.id for h in released}
        assert hold_id in gone and gone <= set(self.holds), (hold_id, gone, self.holds)
        for released_id in gone:
            del self.holds[released_id]

    @rule(pick=PICK, on_vmid=st.booleans(), any_vmid=st.integers(0, 3))
    def hold_placed(self, pick, on_vmid, any_vmid):
        self._place_hold(pick, on_vmid, any_vmid)

    @rule(pick=PICK, by_id=st.booleans())
    def hold_released(self, pick, by_id):
        self._release_hold(pick, by_id)

    # --- pending plans --------------------------------------------------------------------------

    @rule(
        vmids=st.lists(st.one_of(st.sampled_from(VMIDS), st.none()), min_size=11, max_size=14),
        stamps=st.sampled_from(["old", "null"]),
        held=st.integers(0, 3),
        inside=INSIDE,
    )
    def guard_trips(self, vmids, stamps, held, inside):
        """Many ghost rows at once (a bulk import, a platform bug): the guard refuses, the plan is
        kept; some of them are held (by row or VMID), before or after the plan is kept."""
        keys = self._insert_many(vmids, "running", stamps)
        for n, key in enumerate(keys[:held]):
            vmid = self.rows[key]["lxc_id"]
            if n % 2 and vmid is not None:
                placed = holds.place(self.live.runtime.engine, "apps", now=utcnow(), source="cli", vmid=vmid)
                self.holds[placed.id] = ("vmid", vmid)
            else:
                self._place_hold(0, on_vmid=False, key=key)
        self._sweep(force=False, dry_run=False, inside=inside)

    def _decided(self, what: str) -> None:
        counts = DECISIONS.setdefault(self.db_kind, {})
        counts[what] = counts.get(what, 0) + 1

    def _plan_to_decide(self, pick: int) -> tuple[pending.PendingPlan | None, dict[str, pending.ReviewedRow]]:
        """A plan kept so far, with its reviewed rows: mostly one still open, sometimes any (decided,
        superseded), which must be refused."""
        with self.live.runtime.engine.connect() as conn:
            plans = pending.listing(conn, "apps", utcnow(), everything=True)
            open_ones = [p for p in plans if p.state is PlanState.PENDING]
            if open_ones and pick % 4:
                plans = open_ones
            if not plans:
                return None, {}
            plan = plans[pick % len(plans)]
            return plan, {str(r.row.key): r for r in pending.reviewed_rows(conn, plan.id)}

    def _state_of(self, plan_id: int) -> PlanState:
        with self.live.runtime.engine.connect() as conn:
            return pending.get(conn, plan_id, "apps").state

    @rule(pick=PICK, inside=INSIDE)
    def approve(self, pick, inside):
        plan, reviewed = self._plan_to_decide(pick)
        if plan is not None:
            self._approve(plan, reviewed, inside)

    def _approve(self, plan: pending.PendingPlan, reviewed: dict[str, pending.ReviewedRow], inside: Any) -> None:
        self._interleave(inside)
        self.approving, self.applied_now = reviewed, 0
        try:
            decision = approval.approve(self.live.runtime.sweeper, plan.id, by="cli")
        except PlanClosed:
            assert plan.state is not PlanState.PENDING, plan
            assert self.applied_now == 0
            self._decided("approve: closed")
            return
        finally:
            self.approving = None
        assert plan.state is PlanState.PENDING, plan
        if decision.state is PlanState.PENDING:  # Proxmox or the database refused: nothing changed
            assert decision.refused and self.applied_now == 0, decision.message
            assert self._state_of(plan.id) is PlanState.PENDING
            assert decision.result is not None
            self._decided(f"approve: still pending ({decision.result.refusal})")
            return
        assert decision.removed == self.applied_now, (decision.message, self.applied_now)
        assert decision.removed + len(decision.not_removed) == len(reviewed), decision.message
        assert self._state_of(plan.id) is PlanState.APPROVED
        self._decided("approved, all removed" if not decision.not_removed else "approved, some not removed")

    @rule(
        vmids=st.lists(st.one_of(st.sampled_from(VMIDS), st.none()), min_size=11, max_size=14),
        churn=st.lists(st.tuples(st.sampled_from(["insert", "change", "delete", "hold"]), PICK), max_size=4),
        inside=INSIDE,
    )
    def review_then_approve(self, vmids, churn, inside):
        """The whole review: a batch of ghosts trips the guard and its plan is kept; the platform
        moves on (a ghost added, reviewed rows changed, deleted or held); a person approves."""
        batch = self._insert_many(vmids, "running", "old")
        result = self._sweep(force=False, dry_run=False, inside=None)
        if result.pending_id is None:
            return
        for what, pick in churn:
            key = batch[pick % len(batch)]
            if what == "insert":
                self._insert(VMIDS[pick % len(VMIDS)], "running", "old")  # never reviewed
            elif what == "change":
                self._update(key, "stopped", "null")
            elif what == "delete":
                self._delete(key)
            else:
                self._place_hold(pick, on_vmid=False, key=key)
        with self.live.runtime.engine.connect() as conn:
            plan = pending.get(conn, result.pending_id, "apps")
            reviewed = {str(r.row.key): r for r in pending.reviewed_rows(conn, plan.id)}
        self._approve(plan, reviewed, inside)

    @rule(pick=PICK)
    def reject(self, pick):
        plan, _ = self._plan_to_decide(pick)
        if plan is None:
            return
        self.applied_now = 0
        try:
            approval.reject(self.live.runtime.sweeper, plan.id, by="cli", reason="model")
        except PlanClosed:
            assert plan.state is not PlanState.PENDING, plan
            self._decided("reject: closed")
            return
        assert plan.state is PlanState.PENDING and self.applied_now == 0, plan
        assert self._state_of(plan.id) is PlanState.REJECTED
        self._decided("rejected")

    # --- the janitor ------------------------------------------------------------------------

    @rule(
        vmid=st.sampled_from(VMIDS),
        phase=st.sampled_from(["pre-stop", "post-stop", "pre-start", "post-start"]),
        how=st.sampled_from(["true", "true", "forged", "replayed"]),
    )
    def hook_event(self, vmid, phase, how):
        if how == "replayed" and self.events:
            body, headers = self.events[-1]
            answer = self.live.client.post("/api/v1/events", data=body, headers=headers)
            assert answer.status_code in (200, 202), answer.get_json()
            return
        body = json.dumps(
            {
                "event_id": f"model-{time.monotonic_ns()}",
                "vmid": vmid,
                "phase": phase,
                "node": "pve1",
                "ts": time.time(),
            }
        ).encode()
        ts = int(time.time())
        secret = HOOK_SECRET if how != "forged" else "not-the-secret-at-all"
        headers = {
            "X-Janitor-Timestamp": str(ts),
            "X-Janitor-Signature": signature(secret, ts, body),
            "Content-Type": "application/json",
        }
        answer = self.live.client.post("/api/v1/events", data=body, headers=headers)
        if how == "forged":
            assert answer.status_code == 401, answer.get_json()
        else:
            assert answer.status_code == 202, answer.get_json()
            self.events.append((body, headers))

    @rule(task_poll=st.booleans(), inside=INSIDE)
    def watcher_ticks(self, task_poll, inside):
        self._interleave(inside)
        # Whether this tick polls the task list is the rule's to say, not the clock's.
        self.live.watcher._next_task_poll = 0 if task_poll else float("inf")
        self.live.watcher.tick()

    @rule(force=st.booleans(), dry_run=st.sampled_from([False, False, False, True]), inside=INSIDE)
    def sweep(self, force, dry_run, inside):
        self._sweep(force, dry_run, inside)

    def _sweep(self, force: bool, dry_run: bool, inside: Any) -> Any:
        self._interleave(inside)
        result = self.live.runtime.sweeper.run(force=force, dry_run=dry_run)
        outcomes = OUTCOMES.setdefault(self.db_kind, {})
        outcomes[str(result.refusal or result.outcome)] = outcomes.get(str(result.refusal or result.outcome), 0) + 1
        assert result.outcome != "failed" or result.refusal is not None, result.reason
        if dry_run:
            assert not result.applied and result.pending_id is None
        elif result.refusal in (Refusal.GUARD, Refusal.WOULD_EMPTY):
            assert result.pending_id is not None, result.summary()  # kept for review
        return result

    @rule(seam=st.sampled_from(["after_rows", "before_confirm"]), pick=PICK, use_watcher=st.booleans())
    def removal_racing_a_redeploy(self, seam, pick, use_watcher):
        """A sweep or a watcher tick while a ghost row's VMID is taken by a new guest inside it."""
        if use_watcher:
            self.watcher_ticks(task_poll=True, inside=(seam, "create", pick, 1))
        else:
            self.sweep(force=False, dry_run=False, inside=(seam, "create", pick, 1))

    # --- after every step ----------------------------------------------------------------------

    @invariant()
    def nothing_wrong_was_removed(self):
        if self.world is None:
            return
        self.steps += 1
        assert not self.violations, self.violations
        t = self.live.table
        with self.live.platform.connect() as conn:
            actual = {r["id"]: dict(r) for r in conn.execute(sa.select(t)).mappings()}
            audited = list(conn.execute(sa.select(store.audit.c.row_key, store.audit.c.action)).all())
        appeared = set(actual) - set(self.rows)
        assert not appeared, f"rows appeared that the platform never wrote: {appeared}"
        for key, row in list(self.rows.items()):
            got = actual.get(key)
            if got is None:
                assert "delete" in self.removed.get(key, ()), f"row {key} vanished without a removal"
                del self.rows[key]
                continue
            for column in ("lxc_id", "hostname", "public_port", "internal_port", "created_at", "updated_at"):
                assert got[column] == row[column], (
                    f"row {key}: {column} changed from {row[column]!r} to {got[column]!r}"
                )
            if got["status"] != row["status"]:
                marked = key in self.just_marked and got["status"] == "destroyed"
                stop_mark = {row["status"], got["status"]} == {"running", "stopped"}
                assert marked or stop_mark, f"row {key}: status changed from {row['status']!r} to {got['status']!r}"
                row["status"] = got["status"]
        self.just_marked.clear()
        counts: dict[str, int] = {}
        for row_key, _ in audited:
            counts[row_key] = counts.get(row_key, 0) + 1
        assert counts == {str(k): len(v) for k, v in self.removed.items()}, (
            "every removal (a delete, or each mark) is in the audit exactly once"
        )


@pytest.mark.parametrize(
    "kind",
    ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres), pytest.param("mysql", marks=pytest.mark.mysql)],
)
def test_no_row_is_removed_while_a_guest_with_its_vmid_exists(kind):
    machine = type(f"Model_{kind}", (Model,), {"db_kind": kind})
    if kind != "sqlite":
        # Fail (CI) or skip (elsewhere) exactly as the other database tests do, before hypothesis starts.
        probe = _server_database(kind)
        next(probe)
        probe.close()
    started = time.monotonic()
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=EXAMPLES[kind],
            stateful_step_count=STEPS,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
    figures = FIGURES.get(kind, {})
    record(
        "invariant",
        db=kind,
        examples=figures.get("examples"),
        steps=figures.get("steps"),
        rows_removed=figures.get("removed"),
        sweeps=OUTCOMES.get(kind),
        decisions=DECISIONS.get(kind),
        seconds=round(time.monotonic() - started, 1),
    )
    print(
        f"\ninvariant model on {kind}: {figures.get('examples')} examples, {figures.get('steps')} steps, "
        f"{figures.get('removed')} rows removed, {time.monotonic() - started:.1f} s; sweeps: {OUTCOMES.get(kind)}; "
        f"decisions: {DECISIONS.get(kind)}"
    )
    assert figures.get("examples", 0) >= EXAMPLES[kind] // 2 and figures.get("steps", 0) > 0
