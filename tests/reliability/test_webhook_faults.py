"""Webhook faults against a real ``pve-janitor serve``: the target down, slow, answering 500 or
with an untrusted certificate, and the receiver killed (SIGKILL) with events not yet delivered.

For each fault, on SQLite and PostgreSQL: the receiver starts, its first sweep removes the
ghosts (their events committed with the removal), the fault shows in the stats' ``webhooks``
(``last_error``, backlog) and nothing reaches the target; then the fault is cleared and every
event arrives, in the outbox's order, with the ids the outbox holds.  No secret (the webhook
secret, the URL's token or password) appears in the receiver's log or answers.

The kill cases: a receiver killed between the removal's commit and the delivery (target
down), and one killed half-way through delivering; the next receiver, with the target up,
delivers every event of every committed change (the same ids; a repeat only of an id already
sent, at most :data:`receiver.webhooks.PERSIST_EVERY` of them), and no event exists for a
removal whose apply transaction failed (a trigger refuses one row's DELETE).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import trustme
from conftest import Database, running_apps, table_vmids
from test_serve import Receiver
from test_webhooks import PASSWORD, QUERY_TOKEN, SECRET, Hook, outbox_ids, outbox_rows, verify, wait_for

from receiver import store
from receiver.webhooks import PERSIST_EVERY

from .conftest import record

STATS, RUN = "/api/v1/system/cleanup/stats", "/api/v1/system/cleanup/run"
GHOSTS = (100, 103, 106)


@pytest.fixture
def started() -> Iterator[list[Any]]:
    """Hooks and receivers a test started: stopped (receivers killed) at the end whatever happens."""
    things: list[Any] = []
    yield things
    for thing in reversed(things):
        if isinstance(thing, Receiver):
            thing.kill()
        else:
            thing.stop()


def receiver_for(sim, db: Database, tmp_path: Path, name: str, hook: Hook, **extra: Any) -> Receiver:
    return Receiver(
        sim,
        db,
        tmp_path,
        name=name,
        CLEANUP_WEBHOOK_URLS=hook.url,
        CLEANUP_WEBHOOK_SECRET=SECRET,
        CLEANUP_GRACE_MINUTES=15,
        **extra,
    )


def webhook_stats(receiver: Receiver) -> dict[str, Any]:
    status, body = receiver.get(STATS)
    assert status == 200, body
    return body["webhooks"]


def metrics_text(receiver: Receiver) -> str:
    with urllib.request.urlopen(receiver.base + "/metrics", timeout=10) as answer:
        return answer.read().decode()


def no_secret_in(*texts: str) -> None:
    for text in texts:
        for secret in (SECRET, QUERY_TOKEN, PASSWORD):
            assert secret not in text


# --- the fault matrix ------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    name: str
    error: str  # how last_error starts
    arm: Callable[[Hook], None]
    clear: Callable[[Hook], None]
    tls: bool = False
    extra: tuple[tuple[str, str], ...] = ()


def _set(**values: Any) -> Callable[[Hook], None]:
    def apply(hook: Hook) -> None:
        for name, value in values.items():
            setattr(hook, name, value)

    return apply


def _nothing(hook: Hook) -> None:
    pass


def _start(hook: Hook) -> None:
    hook.start()


FAULTS = [
    Fault("down", "connection failed: refused", arm=_nothing, clear=_start),
    Fault("http_500", "HTTP 500", arm=_set(status=500), clear=_set(status=200)),
    Fault(
        "slow",
        "timeout after 0.5 s",
        arm=_set(delay=2.0),
        clear=_set(delay=0.0),
        extra=(("CLEANUP_WEBHOOK_TIMEOUT_SECONDS", "0.5"),),
    ),
    Fault("tls", "TLS: certificate verify failed", arm=_nothing, clear=_nothing, tls=True),
]


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_a_webhook_fault_delays_delivery_and_loses_nothing(sim, db, tmp_path, started, fault):
    running_apps(sim, db, vmids=range(100, 110))
    for vmid in GHOSTS:
        sim.destroy_guest(vmid)
    ca = trustme.CA() if fault.tls else None
    hook = Hook(ca)
    started.append(hook)
    if fault.name != "down":
        hook.start()
    fault.arm(hook)
    began = time.monotonic()
    receiver = receiver_for(sim, db, tmp_path, f"{fault.name}-1", hook, **dict(fault.extra)).start()
    started.append(receiver)

    # The first sweep removes the ghosts; their events wait, the fault in the stats.
    wait_for(lambda: table_vmids(db) == [v for v in range(100, 110) if v not in GHOSTS], what="ghosts removed")
    during = wait_for(
        lambda: (w := webhook_stats(receiver))["targets"][0]["last_error"] and w, what="the fault in the stats"
    )
    (target,) = during["targets"]
    assert target["last_error"].startswith(fault.error), target
    assert target["url"] == hook.shown and target["undelivered"] == len(GHOSTS) == during["backlog"]
    assert hook.accepted() == []
    assert f'pve_janitor_webhook_backlog{{target="{hook.shown}"}} 3.0' in metrics_text(receiver)

    fault.clear(hook)
    if fault.tls:  # the cure is configuration: the CA that issued the target's certificate
        assert receiver.terminate() == 0
        ca_file = tmp_path / "webhook-ca.pem"
        assert ca is not None
        ca.cert_pem.write_to_path(str(ca_file))
        receiver = receiver_for(sim, db, tmp_path, "tls-2", hook, CLEANUP_WEBHOOK_VERIFY_SSL=str(ca_file)).start()
        started.append(receiver)
    wait_for(lambda: len(hook.accepted()) == len(GHOSTS), timeout=30, what="every event delivered")
    took = time.monotonic() - began
    ids = outbox_ids(db, hook.url)
    assert hook.accepted_ids() == ids and len(ids) == len(GHOSTS)
    events = [verify(r) for r in hook.accepted()]
    assert sorted(e["data"]["vmid"] for e in events) == list(GHOSTS)
    assert {e["type"] for e in events} == {"pve-janitor.row.removed"}
    after = wait_for(lambda: (w := webhook_stats(receiver))["backlog"] == 0 and w, what="backlog 0")
    assert after["targets"][0]["undelivered"] == 0
    text = metrics_text(receiver)
    assert f'pve_janitor_webhook_deliveries_total{{outcome="delivered",target="{hook.shown}"}} 3.0' in text
    no_secret_in(receiver.log.read_text(), json.dumps(during), text)
    for log in tmp_path.glob("*.log"):
        no_secret_in(log.read_text())
    record(
        "webhook_fault",
        fault=fault.name,
        db=db.kind,
        error=target["last_error"],
        delivered=len(hook.accepted()),
        tries=len(hook.received),
        seconds=round(took, 1),
    )


# --- SIGKILL ---------------------------------------------------------------------------------


def refuse_delete(db: Database, vmid: int) -> None:
    """A trigger that makes any DELETE of the row of ``vmid`` fail (its apply transaction rolls back)."""
    with db.engine.begin() as conn:
        if db.kind == "sqlite":
            conn.exec_driver_sql(
                f"CREATE TRIGGER keep_{vmid} BEFORE DELETE ON apps WHEN old.lxc_id = {vmid} "
                "BEGIN SELECT RAISE(ABORT, 'kept by a trigger'); END"
            )
        else:
            conn.exec_driver_sql(
                f"CREATE FUNCTION keep_{vmid}() RETURNS trigger AS $$ BEGIN "
                f"IF OLD.lxc_id = {vmid} THEN RAISE EXCEPTION 'kept by a trigger'; END IF; RETURN OLD; END $$ "
                "LANGUAGE plpgsql"
            )
            conn.exec_driver_sql(
                f"CREATE TRIGGER keep_{vmid} BEFORE DELETE ON apps FOR EACH ROW EXECUTE FUNCTION keep_{vmid}()"
            )


def removed_events(db: Database) -> list[dict[str, Any]]:
    return [e for r in outbox_rows(db) for e in json.loads(r["events"]) if e["type"] == "pve-janitor.row.removed"]


def test_sigkill_before_delivery_then_every_committed_change_arrives_and_no_rolled_back_one(sim, db, tmp_path, started):
    running_apps(sim, db, vmids=range(100, 120))
    for vmid in range(100, 105):
        sim.destroy_guest(vmid)
    refuse_delete(db, 118)
    hook = Hook()  # down: nothing listens on its port
    started.append(hook)
    first = receiver_for(sim, db, tmp_path, "kill-1", hook).start()
    started.append(first)
    wait_for(lambda: table_vmids(db) == list(range(105, 120)), what="the first sweep's removals")
    wait_for(lambda: (h := outbox_rows(db)) and h[0]["attempts"] >= 1, what="a failed delivery")
    # A removal that fails in its apply transaction: refused (503), nothing committed but the refusal.
    sim.destroy_guest(118)
    request = urllib.request.Request(
        first.base + RUN + "?force=true", method="POST", headers={"Authorization": f"Bearer {first.admin}"}
    )
    try:
        urllib.request.urlopen(request, timeout=60)
        raise AssertionError("the removal of 118 should have failed")
    except urllib.error.HTTPError as err:
        assert err.code in (422, 503), err.read()
    first.kill()  # SIGKILL: events committed, none delivered
    assert 118 in table_vmids(db)
    with db.engine.connect() as conn:
        assert 118 not in set(conn.execute(sa.select(store.audit.c.vmid)).scalars())
    committed = outbox_ids(db, hook.url)
    assert sorted(e["data"]["vmid"] for e in removed_events(db)) == [100, 101, 102, 103, 104]
    assert hook.received == []

    hook.start()
    second = receiver_for(sim, db, tmp_path, "kill-2", hook).start()
    started.append(second)
    wait_for(lambda: set(hook.accepted_ids()) >= set(committed), timeout=30, what="every committed event")
    wait_for(lambda: webhook_stats(second)["backlog"] == 0, what="backlog 0")
    every = outbox_ids(db, hook.url)  # the second receiver's own sweeps may have added refusals
    accepted = hook.accepted_ids()
    assert set(accepted) == set(every)
    assert list(dict.fromkeys(accepted)) == every  # first arrivals in the outbox's order
    delivered = [verify(r) for r in hook.accepted()]
    assert not [e for e in delivered if e["type"] == "pve-janitor.row.removed" and e["data"]["vmid"] == 118]
    assert sorted(e["data"]["vmid"] for e in delivered if e["type"] == "pve-janitor.row.removed") == list(
        range(100, 105)
    )
    assert any(e["type"] == "pve-janitor.removal.refused" for e in delivered)
    no_secret_in(*(log.read_text() for log in tmp_path.glob("*.log")))


def test_sigkill_while_delivering_resends_at_most_one_progress_step(sim, db, tmp_path, started):
    running_apps(sim, db, vmids=range(100, 400))
    ghosts = list(range(100, 220))  # 120 of 300: under the guard
    for vmid in ghosts:
        sim.destroy_guest(vmid)
    hook = Hook().start()
    hook.delay = 0.02
    started.append(hook)
    first = receiver_for(sim, db, tmp_path, "mid-1", hook).start()
    started.append(first)
    wait_for(lambda: len(hook.accepted()) >= 70, timeout=60, what="70 events delivered")
    first.kill()
    before_kill = len(hook.accepted())
    assert before_kill < len(ghosts), "all delivered before the kill: nothing was tested"
    second = receiver_for(sim, db, tmp_path, "mid-2", hook).start()
    started.append(second)
    ids = outbox_ids(db, hook.url)
    wait_for(lambda: set(hook.accepted_ids()) >= set(ids), timeout=60, what="every event delivered")
    accepted = hook.accepted_ids()
    repeats = len(accepted) - len(set(accepted))
    assert set(accepted) == set(ids) and len(ids) == len(ghosts)
    assert list(dict.fromkeys(accepted)) == ids
    assert repeats <= PERSIST_EVERY, repeats
    record("webhook_kill", db=db.kind, delivered_before_kill=before_kill, repeats=repeats)
