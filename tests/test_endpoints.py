"""Several PVE_HOST endpoints: the first reachable, quorate node answers; the next takes over.

Two simulators stand for two nodes of one cluster (the same guests, the same token); a
port nobody listens on stands for a node that is down.
"""

from __future__ import annotations

import logging
import socket
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import janitor_env, make_runtime, run_cli, table_vmids

from receiver.config import ConfigError, load_settings
from receiver.inventory import ProxmoxInventory
from receiver.model import InventoryError
from receiver.simulator import ProxmoxSimulator
from receiver.simulator.scene import app_row, create_apps_table

GUESTS = (100, 101, 102)


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


@pytest.fixture
def two_nodes(sim, tmp_path):
    """``sim`` and a second node of the same cluster, one CA bundle that trusts both."""
    other = ProxmoxSimulator(nodes=("pve1", "pve2"), token_value=sim.token_value).start()
    for node in (sim, other):
        for vmid in GUESTS:
            node.add_guest(vmid, name=f"app{vmid}.apps.local")
    bundle = tmp_path / "both.pem"
    bundle.write_text(Path(sim.ca_path).read_text() + Path(other.ca_path).read_text())
    try:
        yield sim, other, str(bundle)
    finally:
        other.stop()


def seeded_table(db):
    table = create_apps_table(db.engine)
    with db.engine.begin() as conn:
        conn.execute(table.insert(), [app_row(v, "running", age=timedelta(days=1)) for v in (*GUESTS, 150)])


def test_pve_host_takes_a_list(monkeypatch):
    s = load_settings(env={"PVE_HOST": "pve1.example, pve2.example:8007,[::1]"})
    assert s.pve_endpoints == (("pve1.example", 8006), ("pve2.example", 8007), ("::1", 8006))
    assert (s.pve_host, s.pve_port) == ("pve1.example", 8006)
    for bad, words in (("pve1,,pve2", "empty entry"), ("pve1,pve1:8006", "twice"), ("pve1,https://pve2", "scheme")):
        with pytest.raises(ConfigError) as err:
            load_settings(env={"PVE_HOST": bad})
        assert "PVE_HOST" in str(err.value) and words in str(err.value), err.value


def test_a_node_that_is_down_is_skipped_and_the_sweep_works(sim, sqlite_db, caplog):
    for vmid in GUESTS:
        sim.add_guest(vmid)
    seeded_table(sqlite_db)
    down = f"127.0.0.1:{dead_port()}"
    runtime = make_runtime(sim, sqlite_db, PVE_HOST=f"{down},{sim.pve_host}")
    caplog.set_level(logging.WARNING, logger="receiver.inventory")
    result = runtime.sweeper.run()
    assert result.outcome == "done" and result.applied is not None
    assert [a.row.vmid for a in result.applied.applied] == [150]
    assert runtime.inventory.endpoint == sim.pve_host
    assert any(down in r.getMessage() and "trying" in r.getMessage() for r in caplog.records)
    # Pinned: the next calls go straight to the node that answered.
    sim.reset_counts()
    runtime.inventory.read()
    assert sim.request_count("/cluster/resources") == 1


def test_a_node_without_quorum_is_passed_over_for_a_quorate_one(two_nodes, sqlite_db):
    first, second, bundle = two_nodes
    seeded_table(sqlite_db)
    first.set_quorate(False)
    first.add_guest(150)  # created on the quorate side: the cut-off node does not show it...
    second.add_guest(150)  # ...the quorate one does
    runtime = make_runtime(first, sqlite_db, PVE_HOST=f"{first.pve_host},{second.pve_host}", PVE_VERIFY_SSL=bundle)
    result = runtime.sweeper.run()
    assert result.outcome == "nothing", result.reason
    assert runtime.inventory.endpoint == second.pve_host
    assert 150 in table_vmids(sqlite_db)


def test_every_node_failing_removes_nothing_and_names_the_last_error(two_nodes, sqlite_db):
    first, second, bundle = two_nodes
    seeded_table(sqlite_db)
    first.set_quorate(False)
    second.set_fault("refuse")
    inventory = ProxmoxInventory(
        load_settings(
            env={
                **janitor_env(first, sqlite_db),
                "PVE_HOST": f"{first.pve_host},{second.pve_host}",
                "PVE_VERIFY_SSL": bundle,
            }
        )
    )
    with pytest.raises(InventoryError) as err:
        inventory.read()
    assert err.value.kind == "unreachable" and second.pve_host in str(err.value)
    env = janitor_env(first, sqlite_db, PVE_HOST=f"{first.pve_host},{second.pve_host}", PVE_VERIFY_SSL=bundle)
    result = run_cli(["sweep", "--json"], env)
    assert result.code == 3 and result.json()["refusal"] in ("inventory", "no_quorum"), result.out
    assert table_vmids(sqlite_db) == [*GUESTS, 150]


def test_a_refused_token_is_not_retried_elsewhere(two_nodes, sqlite_db):
    first, second, bundle = two_nodes
    first.set_fault("http401")
    inventory = ProxmoxInventory(
        load_settings(
            env={
                **janitor_env(first, sqlite_db),
                "PVE_HOST": f"{first.pve_host},{second.pve_host}",
                "PVE_VERIFY_SSL": bundle,
            }
        )
    )
    with pytest.raises(InventoryError) as err:
        inventory.read()
    assert err.value.kind == "auth" and second.request_count() == 0
