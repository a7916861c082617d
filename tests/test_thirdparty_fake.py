"""Cross-check: the product's read path against a third-party fake PVE (PyPI ``fakepve``).

The rest of the suite runs against the project's own simulator; this small set runs a sweep
against someone else's idea of Proxmox, so a habit the two share with nobody else would
show.  ``fakepve`` is test-only (AGPL-3.0: nothing under receiver/ imports it); its own
fixtures (``fakepve``, ``fakepve_cafile``, from its pytest plugin) serve it on loopback.

Where the fake differs from Proxmox the tests work around it, each gap named where it is
handled and listed in docs/simulator.md:

- ``/access/permissions?path=X`` keys its answer by the path that was *granted* ("/"), not
  by X as Proxmox does, so the token is granted on ``/vms`` and ``/access`` as well;
- privileges of a privilege-separated token are the *union* of its and its user's (Proxmox:
  the intersection), and every propagate flag is 1;
- ``/access/acl`` is a placeholder entry (path ``fake``): the product falls back to
  per-VMID ``/cluster/nextid`` checks, which the fake answers as Proxmox does;
- ``/cluster/tasks`` is one static vzdump task, whatever happened.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

pytest.importorskip("fakepve", reason="the third-party fake comes with fakepve (test-only): pip install fakepve")

from conftest import make_runtime, table_vmids

from receiver.model import Inventory
from receiver.simulator.scene import app_row, create_apps_table

USER, TOKEN, SECRET = "janitor@pve", "sweep", "fake-token-secret"
AUDITOR = ("VM.Audit", "Sys.Audit", "Datastore.Audit", "Pool.Audit", "SDN.Audit", "Mapping.Audit")


class FakeTarget:
    """The ``fakepve`` server seen as the tests' ``sim``: what ``janitor_env`` needs."""

    def __init__(self, pve, cafile: str):
        self.pve, self.cafile = pve, cafile

    def env(self) -> dict:
        return {
            "PVE_HOST": self.pve.url[len("https://") :],
            "PVE_USER": USER,
            "PVE_TOKEN_NAME": TOKEN,
            "PVE_TOKEN_VALUE": SECRET,
            "PVE_VERIFY_SSL": self.cafile,
        }


@pytest.fixture
def fake(fakepve, fakepve_cafile):
    token = "%s!%s" % (USER, TOKEN)
    fakepve.apitokens[token] = SECRET
    # Proxmox's set-up: PVEAuditor on / for user and token.  The extra grants on /vms and
    # /access only make the fake key its /access/permissions answer by the asked path.
    for who in (USER, token):
        for path in ("/", "/vms", "/access"):
            fakepve.grant(who, path, *AUDITOR)
    fakepve.add_vm(100, "vm-app", node="pve1", status="running")
    fakepve.add_ct(101, "web", node="pve1", status="running")
    return FakeTarget(fakepve, fakepve_cafile)


def _seed(db, vmids) -> None:
    table = create_apps_table(db.engine)
    with db.engine.begin() as conn:
        conn.execute(table.insert(), [app_row(v, "running", age=timedelta(days=1)) for v in vmids])


def test_inventory_reads_the_guests_and_quorum(fake, sqlite_db):
    create_apps_table(sqlite_db.engine)
    runtime = make_runtime(fake, sqlite_db)
    inventory = runtime.inventory.read()
    assert {100, 101} <= set(inventory.guests)
    lxc, qemu = inventory.get(101), inventory.get(100)
    assert lxc is not None and lxc.type == "lxc"
    assert qemu is not None and qemu.type == "qemu"


def test_sweep_keeps_a_live_guest_and_removes_a_gone_one(fake, sqlite_db):
    _seed(sqlite_db, (101, 250))
    result = make_runtime(fake, sqlite_db).sweeper.run(force=True)
    assert result.outcome == "done", result.reason
    assert table_vmids(sqlite_db) == [101]


def test_a_vmid_held_by_a_guest_the_list_lacks_is_kept(fake, sqlite_db):
    """The fake's ACL list proves nothing (a placeholder), so every ghost is checked with
    /cluster/nextid, which the fake answers from every guest: 400 "VM N already exists"."""
    _seed(sqlite_db, (101, 250))
    runtime = make_runtime(fake, sqlite_db)
    assert runtime.inventory.hideable_vmids() is None  # fell back to per-VMID checks
    full = runtime.inventory.read()
    runtime.inventory.read = lambda: Inventory.of(  # type: ignore[method-assign]  # this instance only
        [g for v, g in full.guests.items() if v != 101]
    )
    result = runtime.sweeper.run(force=True)
    assert result.outcome == "done" and result.hidden == [101], result.summary()
    assert table_vmids(sqlite_db) == [101]  # 250 is gone for good, 101 only missing from the list


def test_an_api_fault_removes_nothing(fake, sqlite_db):
    _seed(sqlite_db, (101, 250))
    fake.pve.fail("GET", "/cluster/resources", 500, "simulated fault")
    result = make_runtime(fake, sqlite_db).sweeper.run(force=True)
    assert result.outcome != "done"
    assert table_vmids(sqlite_db) == [101, 250]


def test_lost_quorum_removes_nothing(fake, sqlite_db):
    _seed(sqlite_db, (101, 250))
    fake.pve.lose_quorum()
    result = make_runtime(fake, sqlite_db).sweeper.run(force=True)
    assert result.outcome != "done" and "quorum" in result.reason.lower()
    assert table_vmids(sqlite_db) == [101, 250]


def test_the_watcher_removes_a_destroyed_guests_row_after_its_stop_event(fake, sqlite_db):
    """The hook path (stop event, then the guest gone from the list); the fake's task list is
    static, so the task tail finds nothing here and the event does the work."""
    from receiver.inbox import Inbox
    from receiver.model import Event
    from receiver.watcher import Watcher

    _seed(sqlite_db, (100, 101, 102))
    fake.pve.add_ct(102, "worker", node="pve1", status="running")
    runtime = make_runtime(fake, sqlite_db)
    inbox = Inbox(runtime.engine)
    watcher = Watcher(runtime, inbox)
    inbox.accept(Event("fake-ev-1", 101, "post-stop", "pve1", 1.0))
    try:
        watcher.tick()
        assert table_vmids(sqlite_db) == [100, 101, 102] and watcher.watched == [101]  # it still exists
        fake.pve.cts[:] = [ct for ct in fake.pve.cts if ct.vmid != 101]  # destroyed (no destroy in its API)
        watcher.tick()
        assert table_vmids(sqlite_db) == [100, 102] and watcher.watched == [], (watcher.last_error, watcher.hidden)
    finally:
        runtime.inventory.close()  # before the fake's server stops: it warns about open connections


def test_an_offline_nodes_guests_keep_their_rows(fake, sqlite_db):
    _seed(sqlite_db, (100, 101, 250))
    fake.pve.set_node_offline("pve1")
    listed = make_runtime(fake, sqlite_db).inventory.read()
    assert {100, 101} <= set(listed.guests)  # still listed, as Proxmox lists an offline node's guests
    result = make_runtime(fake, sqlite_db).sweeper.run(force=True)
    assert result.outcome == "done", result.reason
    assert table_vmids(sqlite_db) == [100, 101]
