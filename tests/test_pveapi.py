"""One HTTP session per PVE_HOST endpoint (receiver.pveapi): every call over it, the bytes
read counted by API path, close() emptying its connection pool.  Against the simulator over HTTPS.
"""

from __future__ import annotations

import pytest
import requests
from conftest import janitor_env

from receiver.config import load_settings
from receiver.inventory import ProxmoxInventory
from receiver.model import InventoryError
from receiver.pveapi import ByteCount, PveEndpoint, path_kind


def inventory_for(sim, sqlite_db) -> ProxmoxInventory:
    return ProxmoxInventory(load_settings(env=janitor_env(sim, sqlite_db)))


def raw_answer(sim, path: str, ok: bool = True, **params) -> bytes:
    """The body Proxmox sends for ``GET path``, read with a session of its own."""
    response = requests.get(
        f"{sim.url}{path}",
        params=params,
        verify=sim.ca_path,
        timeout=5,
        headers={"Authorization": f"PVEAPIToken={sim.token_id}={sim.token_value}"},
    )
    assert response.ok == ok, response.status_code
    return response.content


@pytest.mark.parametrize(
    "url, kind",
    [
        ("https://pve1:8006/api2/json/cluster/resources?type=vm", "/cluster/resources"),
        ("https://pve1:8006/api2/json/access/permissions?path=%2Fvms", "/access/permissions"),
        ("https://[::1]:8006/api2/json/nodes/pve2/tasks?typefilter=vzdestroy", "/nodes/{node}/tasks"),
        ("https://pve1:8006/api2/json/nodes/pve2/lxc/101/status/current", "/nodes/{node}/lxc/{vmid}/status/current"),
        ("https://pve1:8006/prefix/api2/json/version", "/version"),
    ],
)
def test_path_kind_leaves_out_nodes_and_vmids(url, kind):
    assert path_kind(url) == kind


def test_byte_count_adds_up_by_path():
    count = ByteCount()
    assert count.total == 0 and count.by_path() == {}
    count.add("/cluster/status", 10)
    count.add("/cluster/status", 5)
    count.add("/cluster/resources", 100)
    assert count.by_path() == {"/cluster/status": 15, "/cluster/resources": 100}
    assert count.total == 115


def test_the_bytes_of_every_answer_are_counted(sim, sqlite_db):
    for vmid in range(100, 140):
        sim.add_guest(vmid, name=f"app{vmid}.apps.local")
    inventory = inventory_for(sim, sqlite_db)
    inventory.read()
    read = inventory.bytes_read.by_path()
    assert set(read) == {"/access/permissions", "/cluster/resources", "/cluster/status"}
    # The streamed guest list and a whole JSON answer: byte for byte what Proxmox sent.
    assert read["/cluster/resources"] == len(raw_answer(sim, "/cluster/resources", type="vm"))
    assert read["/cluster/status"] == len(raw_answer(sim, "/cluster/status"))
    assert inventory.bytes_read.total == sum(read.values())

    before = inventory.bytes_read.total
    inventory.node_tasks("pve2", ["vzdestroy"], since=0)
    assert inventory.bytes_read.by_path()["/nodes/{node}/tasks"] == inventory.bytes_read.total - before > 0


@pytest.mark.parametrize("path", ["/cluster/resources", "/cluster/status"])
def test_an_error_answer_is_counted_too(sim, sqlite_db, path):
    settings = load_settings(env=janitor_env(sim, sqlite_db))
    count = ByteCount()
    endpoint = PveEndpoint(settings, *settings.pve_endpoints[0], count)
    sim.set_fault("http500")
    with pytest.raises(InventoryError) as err:
        endpoint.guest_list() if path == "/cluster/resources" else endpoint.get(path)
    assert err.value.kind == "http" and "HTTP 500" in str(err.value)
    assert count.by_path() == {path: len(raw_answer(sim, path, ok=False))} and count.total > 0
    endpoint.close()


def pools(endpoint: PveEndpoint) -> int:
    """Connection pools the endpoint's session holds (one per host it talked to)."""
    return len(endpoint.session.get_adapter("https://").poolmanager.pools)


def test_one_session_per_endpoint_and_close_empties_it(sim, sqlite_db):
    sim.add_guest(100)
    settings = load_settings(env=janitor_env(sim, sqlite_db, PVE_HOST=f"{sim.pve_host},localhost:{sim.port}"))
    inventory = ProxmoxInventory(settings)
    first, second = inventory._endpoints
    assert pools(first) == pools(second) == 0
    inventory.read()  # permissions, the raw guest list and the quorum, all over the first node's session
    assert (pools(first), pools(second)) == (1, 0)
    inventory.close()
    assert pools(first) == 0

    assert 100 in inventory.read()  # closed is not broken: the next call connects again
    assert pools(first) == 1
    inventory.close()


def test_a_probe_gets_every_answer_as_it_came_and_counted(sim, sqlite_db):
    sim.add_guest(101, node="pve1")
    sim.set_node_online("pve2", False)
    inventory = inventory_for(sim, sqlite_db)
    here = inventory.guest_status("pve1", "lxc", 101)
    assert here.status == 200 and b'"status"' in here.body
    gone = inventory.guest_status("pve1", "qemu", 101)
    assert gone.status == 500 and "qemu-server/101.conf' does not exist" in gone.reason
    offline = inventory.node_guests("pve2", "lxc")
    assert offline.status == 595
    counted = inventory.bytes_read.by_path()
    assert counted["/nodes/{node}/lxc/{vmid}/status/current"] == len(here.body)
    assert counted["/nodes/{node}/lxc"] == len(offline.body)
    sim.set_fault("refuse")
    with pytest.raises(InventoryError) as caught:  # no answer at all: the one case that raises
        inventory.guest_status("pve1", "lxc", 101)
    assert caught.value.kind == "unreachable"
