"""What the ACL list proves about a guest list (receiver.inventory.parse_acl, acl_proof), and
how a /cluster/resources answer is read (parse_guests): anything odd refuses, nothing is guessed.

The table of cases is pure; the rest runs against the simulator over HTTPS.
"""
from __future__ import annotations

import logging

import pytest
from conftest import janitor_env

from receiver.config import load_settings
from receiver.inventory import ProxmoxInventory, parse_acl, parse_guests
from receiver.model import Guest, InventoryError


def acl(path, roleid="PVEAuditor", kind="token", ugid="janitor@pve!sweep", propagate=1):
    return {"path": path, "type": kind, "ugid": ugid, "roleid": roleid, "propagate": propagate}


GRANT = acl("/")

CASES = {
    "only the grant on /": ([GRANT], frozenset()),
    "no entry at all (root's token)": ([], frozenset()),
    "NoAccess on a guest, for the token": ([GRANT, acl("/vms/104", "NoAccess")], frozenset({104})),
    "any role on a guest, for a user": ([GRANT, acl("/vms/250", "PVEVMUser", "user", "alice@pve")],
                                        frozenset({250})),
    "a group's entry on a guest, not propagated": ([acl("/vms/300", "NoAccess", "group", "ops", 0)],
                                                   frozenset({300})),
    "entries elsewhere change nothing": ([GRANT, acl("/storage/local", "NoAccess"), acl("/vms", "PVEAuditor"),
                                          acl("/pool/web", "PVEVMAdmin"), acl("/nodes/pve1", "NoAccess")],
                                         frozenset()),
    "NoAccess on a pool": ([GRANT, acl("/pool/hidden", "NoAccess")], None),
    "NoAccess on a nested pool": ([GRANT, acl("/pool/a/b", "NoAccess", "group", "ops")], None),
    "NoAccess on /pool reaches every pool": ([GRANT, acl("/pool", "NoAccess", "user", "janitor@pve")], None),
    "NoAccess on / reaches every pool": ([acl("/", "NoAccess", "group", "all"), acl("/vms")], None),
    "not a list": ({"path": "/"}, None),
    "an entry that is not an object": ([GRANT, "/vms/104"], None),
    "an entry without a role": ([GRANT, {"path": "/vms/104", "type": "token"}], None),
    "a guest path that is not a VMID": ([GRANT, acl("/vms/abc", "NoAccess")], None),
    "a path that does not start with /": ([GRANT, acl("vms/104", "NoAccess")], None),
    "a relative path to a pool": ([GRANT, acl("pool/hidden", "NoAccess")], None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parse_acl(case):
    entries, expected = CASES[case]
    proof = parse_acl(entries)
    assert proof.hideable == expected
    assert proof.reason
    if expected is None:
        assert "complete" not in proof.reason


def inventory_for(sim, sqlite_db) -> ProxmoxInventory:
    return ProxmoxInventory(load_settings(env=janitor_env(sim, sqlite_db)))


def test_acl_proof_against_the_simulator(sim, sqlite_db):
    for vmid in (100, 101, 102):
        sim.add_guest(vmid)
    inventory = inventory_for(sim, sqlite_db)
    assert inventory.acl_proof().hideable == frozenset()
    sim.set_visible({100, 101})
    assert inventory.acl_proof().hideable == frozenset({102})
    sim.set_visible({100, 101}, via="pool")
    assert inventory.acl_proof().hideable is None
    sim.set_visible(None)
    sim.set_sys_audit(False)
    sim.reset_counts()
    proof = inventory.acl_proof()
    assert proof.hideable is None and "Sys.Audit" in proof.reason
    assert sim.request_count("/access/acl") == 0  # its empty answer would prove nothing
    sim.set_sys_audit(True)
    sim.set_acl_fault(500)
    with pytest.raises(InventoryError) as err:
        inventory.acl_proof()
    assert err.value.kind == "http" and "/access/acl" in str(err.value)


def test_the_mode_is_logged_once_and_again_when_it_changes(sim, sqlite_db, caplog):
    sim.add_guest(100)
    inventory = inventory_for(sim, sqlite_db)
    caplog.set_level(logging.INFO, logger="receiver.inventory")

    def modes():
        return [r.getMessage() for r in caplog.records if "/cluster/nextid" in r.getMessage()]

    for _ in range(3):
        assert inventory.hideable_vmids() == frozenset()
    assert len(modes()) == 1 and modes()[0].startswith("ACL list proves the guest list complete")
    sim.set_sys_audit(False)
    assert inventory.hideable_vmids() is None
    assert inventory.hideable_vmids() is None
    assert len(modes()) == 2 and modes()[1].startswith("per-VMID checks")
    assert "Sys.Audit on /access" in modes()[1]
    sim.set_sys_audit(True)
    inventory.hideable_vmids()
    assert len(modes()) == 3


def test_parse_guests_reads_only_what_it_needs():
    answer = (b'{"data": [{"id": "qemu/105", "type": "qemu", "vmid": 105, "node": "pve2", "template": 1, '
              b'"status": "stopped", "maxmem": 1, "tags": "a;b", "extra": {"x": [1, 2]}}, '
              b'{"type": "lxc", "vmid": 101, "node": "pve1", "status": "running", "name": "web", "lock": "backup"}, '
              b'{"type": "lxc", "vmid": 102, "node": "pve1"}]}')
    assert parse_guests(answer) == {
        105: Guest(105, "pve2", "qemu", "stopped", None, 1, None),
        101: Guest(101, "pve1", "lxc", "running", "web", 0, "backup"),
        102: Guest(102, "pve1", "lxc", "unknown"),  # an offline node's guest may come with no status
    }
    assert parse_guests(b'{"data": []}') == {}


@pytest.mark.parametrize("answer, says", [
    (b"<html>502</html>", "not JSON"),
    (b'{"data": null}', "Expected `array`, got `null`"),
    (b"[]", "Expected `object`"),
    (b'{"data": [1]}', "Expected `object`, got `int`"),
    (b'{"data": [{"type": "lxc", "vmid": "101", "node": "pve1"}]}', "Expected `int`, got `str`"),
    (b'{"data": [{"type": "lxc", "vmid": 101.0, "node": "pve1"}]}', "Expected `int`, got `float`"),
    (b'{"data": [{"type": "lxc", "vmid": true, "node": "pve1"}]}', "Expected `int`, got `bool`"),
    (b'{"data": [{"type": "lxc", "vmid": 101}]}', "missing required field `node`"),
    (b'{"data": [{"type": "node", "node": "pve1"}]}', "missing required field `vmid`"),
    (b'{"data": [{"type": "lxc", "vmid": 101, "node": "pve1", "status": null}]}', "Expected `str`, got `null`"),
], ids=["html", "null data", "a list", "a number", "vmid text", "vmid float", "vmid bool", "no node",
        "not a guest", "status null"])
def test_an_odd_resources_answer_is_malformed_not_a_shorter_list(answer, says):
    with pytest.raises(InventoryError) as refused:
        parse_guests(answer)
    assert refused.value.kind == "malformed" and says in str(refused.value)


def test_vm_audit_must_be_propagated_from_vms(sim, sqlite_db):
    # Granted on /vms with propagate=0, VM.Audit reaches no /vms/N: an empty list, and the ACL
    # proof's premise (inherited by every guest without an entry of its own) would not hold.
    sim.add_guest(100)
    sim.set_vm_audit(True, propagate=False)
    inventory = inventory_for(sim, sqlite_db)
    with pytest.raises(InventoryError) as refused:
        inventory.read()
    assert refused.value.kind == "privilege" and "without propagation" in str(refused.value)
    sim.set_vm_audit(True)
    assert list(inventory.read().guests) == [100]


@pytest.mark.parametrize("path", ["/access/permissions", "/cluster/resources", "/cluster/status", "/access/acl",
                                  "/cluster/nextid"])
def test_an_answer_without_data_is_a_refusal_not_a_crash(sim, sqlite_db, path):
    sim.add_guest(100)
    sim.add_guest(101)
    inventory = inventory_for(sim, sqlite_db)
    sim.set_fault("nodata", path=path)
    with pytest.raises(InventoryError) as err:
        if path == "/access/acl":
            inventory.acl_proof()
        elif path == "/cluster/nextid":
            inventory.vmid_in_use(150)
        else:
            inventory.read()
    assert err.value.kind == "malformed" and path in str(err.value), err.value


def test_quorum_is_checked_after_every_guest_list(sim, sqlite_db):
    sim.add_guest(100)
    inventory = inventory_for(sim, sqlite_db)
    assert 100 in inventory.read()
    sim.set_quorate(False)
    sim.add_guest(101)  # on the quorate side
    with pytest.raises(InventoryError) as err:
        inventory.read()
    assert err.value.kind == "no_quorum" and "pve1" in str(err.value)
    sim.set_quorate(True)
    assert {100, 101} <= set(inventory.read().guests)
    sim.standalone = True
    assert 101 in inventory.read()
    sim.standalone = False
    sim.set_sys_audit(False)
    with pytest.raises(InventoryError) as err:
        inventory.read()
    assert err.value.kind == "privilege" and "Sys.Audit on /" in str(err.value)
