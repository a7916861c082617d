"""Reading the cluster (receiver.inventory) against the simulator over HTTPS: the ACL proof and
the mode it logs, the privilege and quorum checks around every guest list, and an answer without
'data' refused, never guessed at.  What each answer says is tests/test_answers.py's.
"""

from __future__ import annotations

import logging

import pytest
from conftest import janitor_env

from receiver.config import load_settings
from receiver.inventory import ProxmoxInventory
from receiver.model import InventoryError


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


@pytest.mark.parametrize(
    "path", ["/access/permissions", "/cluster/resources", "/cluster/status", "/access/acl", "/cluster/nextid"]
)
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


def test_a_whole_read_leaves_its_shape_for_the_probes(sim, sqlite_db):
    for v in range(100, 110):
        sim.add_guest(v, node="pve1" if v < 107 else "pve2", type="lxc" if v % 2 else "qemu")
    inventory = ProxmoxInventory(load_settings(env=janitor_env(sim, sqlite_db)))
    assert inventory.shape is None
    inventory.read()
    shape = inventory.shape
    assert shape is not None
    assert shape.guests == 10 and shape.body_bytes == inventory.bytes_read.by_path()["/cluster/resources"]
    assert shape.per_node == {("pve1", "lxc"): 3, ("pve1", "qemu"): 4, ("pve2", "lxc"): 2, ("pve2", "qemu"): 1}
