"""Tests of the Proxmox VE simulator (receiver/simulator/), over real HTTPS.

The simulator is what the rest of the suite and the demo trust to behave like
Proxmox (the PROXMOX.md facts), so each test pins one documented behaviour.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import threading
import time
import types

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st
from proxmoxer import ProxmoxAPI
from proxmoxer.core import ResourceException

from receiver.simulator import (
    HOOK_PHASES,
    ProxmoxSimulator,
    SimulatorError,
    lowest_free_vmid,
    parse_upid,
    run_standalone,
)

# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def sim():
    simulator = ProxmoxSimulator(nodes=("pve1", "pve2"))
    simulator.add_guest(100, node="pve1", type="qemu", status="running", name="vm-app")
    simulator.add_guest(101, node="pve1", type="lxc", status="running", name="web", tags="app")
    simulator.add_guest(102, node="pve2", type="lxc", status="stopped")
    simulator.add_guest(103, node="pve2", type="lxc", status="stopped", template=True)
    with simulator.start() as started:
        yield started


def _client(sim, token_value=None, timeout=5):
    host, port = sim.pve_host.rsplit(":", 1)
    return ProxmoxAPI(
        host,
        port=int(port),
        user=sim.user,
        token_name=sim.token_name,
        token_value=token_value or sim.token_value,
        verify_ssl=sim.ca_path,
        timeout=timeout,
    )


@pytest.fixture
def pve(sim):
    return _client(sim)


@pytest.fixture
def http(sim):
    # verify is passed per request (in _get): requests lets REQUESTS_CA_BUNDLE from the
    # environment override a Session's own .verify, but not a per-request one.
    with requests.Session() as session:
        session.headers["Authorization"] = "PVEAPIToken=%s!%s=%s" % (sim.user, sim.token_name, sim.token_value)
        yield session


def _get(http, sim, path, **kwargs):
    return http.get(sim.url + path, timeout=kwargs.pop("timeout", 5), verify=sim.ca_path, **kwargs)


def _by_vmid(entries):
    return {e["vmid"]: e for e in entries if "vmid" in e}


def _hookscript(tmp_path, body, name="hook.py"):
    """A Python hookscript (absolute interpreter: the hook's PATH is PVE's minimal one)."""
    path = tmp_path / name
    path.write_text("#!%s\n%s" % (sys.executable, body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


RECORDING_HOOK = """
import json, os, sys
with open(%r, "a") as log:
    record = {"argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}
    log.write(json.dumps(record) + "\\n")
sys.exit(int(os.environ.get("FAIL_" + sys.argv[2].replace("-", "_").upper(), "0")))
"""


def _recording_hook(tmp_path, log_path):
    return _hookscript(tmp_path, RECORDING_HOOK % str(log_path))


def _recorded(log_path):
    if not log_path.exists():
        return []
    return [json.loads(line) for line in log_path.read_text().splitlines()]


# --------------------------------------------------------------------------- connection


def test_env_points_at_a_verifiable_https_endpoint(sim):
    env = sim.env()
    assert env["PVE_HOST"] == sim.pve_host and sim.pve_host.startswith("127.0.0.1:")
    assert sim.url == "https://%s/api2/json" % sim.pve_host
    assert env["PVE_VERIFY_SSL"] == sim.ca_path and os.path.isfile(sim.ca_path)
    assert (env["PVE_USER"], env["PVE_TOKEN_NAME"]) == ("janitor@pve", "sweep")
    assert len(env["PVE_TOKEN_VALUE"]) >= 32
    # The certificate is only trusted through the simulator's own CA.
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(sim.url + "/version", timeout=5)
    assert requests.get(sim.url + "/version", verify=sim.ca_path, timeout=5).status_code == 401


def test_stop_closes_the_port_and_removes_the_ca_file():
    with ProxmoxSimulator().start() as sim:
        url, ca_path = sim.url, sim.ca_path
    assert not os.path.exists(ca_path)
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(url + "/version", verify=False, timeout=2)


def test_version(pve):
    assert pve.version.get()["version"].startswith("8.")


# --------------------------------------------------------------------------- inventory shapes


def test_cluster_resources_vm_entries(pve):
    entries = pve.cluster.resources.get(type="vm")
    assert [e["vmid"] for e in entries] == [100, 101, 102, 103]
    ct = _by_vmid(entries)[101]
    keys = ("id", "vmid", "node", "type", "status", "name", "template", "tags")
    assert {k: ct[k] for k in keys} == {
        "id": "lxc/101",
        "vmid": 101,
        "node": "pve1",
        "type": "lxc",
        "status": "running",
        "name": "web",
        "template": 0,
        "tags": "app",
    }
    assert ct["maxmem"] > 0 and ct["maxdisk"] > 0 and isinstance(ct["uptime"], int)
    assert "lock" not in ct
    assert _by_vmid(entries)[100]["id"] == "qemu/100"
    assert _by_vmid(entries)[102]["status"] == "stopped"
    assert _by_vmid(entries)[103]["template"] == 1


def test_cluster_resources_nodes_and_type_filter(pve):
    nodes = pve.cluster.resources.get(type="node")
    assert [(n["node"], n["status"], n["type"]) for n in nodes] == [
        ("pve1", "online", "node"),
        ("pve2", "online", "node"),
    ]
    everything = pve.cluster.resources.get()
    assert {e["type"] for e in everything} == {"node", "lxc", "qemu"}
    with pytest.raises(ResourceException) as err:
        pve.cluster.resources.get(type="bogus")
    assert err.value.status_code == 400 and "type" in err.value.errors


def test_node_guest_lists(pve):
    assert [n["node"] for n in pve.nodes.get()] == ["pve1", "pve2"]
    lxc_pve2 = pve.nodes("pve2").lxc.get()
    assert sorted(g["vmid"] for g in lxc_pve2) == [102, 103]
    assert all(isinstance(g["vmid"], int) for g in lxc_pve2)
    qemu_pve1 = pve.nodes("pve1").qemu.get()
    assert [(g["vmid"], g["status"], g["name"]) for g in qemu_pve1] == [(100, "running", "vm-app")]
    assert pve.nodes("pve2").qemu.get() == []


def test_guest_status_and_config(pve, sim, tmp_path):
    sim.add_guest(110, node="pve2", hookscript=str(tmp_path / "pve-janitor-hook"))
    status = pve.nodes("pve1").lxc(101).status.current.get()
    assert (status["vmid"], status["status"], status["name"]) == (101, "running", "web")
    config = pve.nodes("pve2").lxc(110).config.get()
    assert config["hostname"] == "ct110"
    assert config["hookscript"] == "local:snippets/pve-janitor-hook"
    assert pve.nodes("pve1").qemu(100).config.get()["name"] == "vm-app"
    assert "hookscript" not in pve.nodes("pve1").lxc(101).config.get()


@pytest.mark.parametrize(
    "node,kind,vmid,conf",
    [
        ("pve1", "lxc", 999, "nodes/pve1/lxc/999.conf"),
        ("pve2", "lxc", 101, "nodes/pve2/lxc/101.conf"),  # exists, but on pve1
        ("pve1", "qemu", 101, "nodes/pve1/qemu-server/101.conf"),  # exists, but is a container
    ],
)
def test_unknown_guest_is_a_missing_config_file(pve, node, kind, vmid, conf):
    with pytest.raises(ResourceException) as err:
        getattr(pve.nodes(node), kind)(vmid).status.current.get()
    assert err.value.status_code == 500
    assert "Configuration file '%s' does not exist" % conf in str(err.value)


def test_unknown_route_and_writes_are_not_implemented(http, sim):
    missing = _get(http, sim, "/nodes/pve1/storage")
    assert missing.status_code == 501 and "not implemented" in missing.json()["message"]
    write = http.post(sim.url + "/nodes/pve1/lxc", data={"vmid": 150}, timeout=5, verify=sim.ca_path)
    assert write.status_code == 501 and write.json()["data"] is None
    assert 150 not in sim.vmids()
    outside = http.get(sim.url.replace("/api2/json", "/"), timeout=5, verify=sim.ca_path)
    assert outside.status_code == 404


# --------------------------------------------------------------------------- auth and privileges


def test_wrong_or_missing_token_is_401(sim, http):
    with pytest.raises(ResourceException) as err:
        _client(sim, token_value="not-the-token").cluster.resources.get()
    assert err.value.status_code == 401
    bare = requests.get(sim.url + "/cluster/resources", verify=sim.ca_path, timeout=5)
    assert bare.status_code == 401 and "message" in bare.json()
    other_user = requests.get(
        sim.url + "/version",
        verify=sim.ca_path,
        timeout=5,
        headers={"Authorization": "PVEAPIToken=root@pam!sweep=%s" % sim.token_value},
    )
    assert other_user.status_code == 401


def test_auth_failure_waits_auth_fail_delay():
    with ProxmoxSimulator(auth_fail_delay=0.4).start() as sim:
        began = time.monotonic()
        answer = requests.get(sim.url + "/version", verify=sim.ca_path, timeout=5)
        assert answer.status_code == 401
        assert time.monotonic() - began >= 0.4
        assert _client(sim).version.get()["release"]  # right token: no delay, 200


def test_permissions_show_vm_audit(pve):
    # PVEAuditor (pve-access-control AccessControl.pm create_roles: every audit privilege)
    auditor = {"Datastore.Audit": 1, "Mapping.Audit": 1, "Pool.Audit": 1, "SDN.Audit": 1, "Sys.Audit": 1, "VM.Audit": 1}
    assert pve.access.permissions.get(path="/vms") == {"/vms": auditor}


def test_token_without_vm_audit_sees_empty_lists(pve, sim):
    sim.set_vm_audit(False)
    assert pve.cluster.resources.get(type="vm") == []
    assert pve.nodes("pve1").lxc.get() == []
    assert pve.nodes("pve1").qemu.get() == []
    assert [n["node"] for n in pve.cluster.resources.get(type="node")] == ["pve1", "pve2"]
    assert "VM.Audit" not in pve.access.permissions.get(path="/vms")["/vms"]
    with pytest.raises(ResourceException) as err:
        pve.nodes("pve1").lxc(101).status.current.get()
    assert err.value.status_code == 403
    sim.set_vm_audit(True)
    assert len(pve.cluster.resources.get(type="vm")) == 4


def test_vm_audit_on_vms_without_propagation_reaches_no_guest(pve, sim):
    sim.set_vm_audit(True, propagate=False)
    assert pve.access.permissions.get(path="/vms")["/vms"]["VM.Audit"] == 0
    assert "VM.Audit" not in pve.access.permissions.get(path="/vms/101")["/vms/101"]
    assert pve.cluster.resources.get(type="vm") == []
    sim.set_vm_audit(True)
    assert pve.access.permissions.get(path="/vms")["/vms"]["VM.Audit"] == 1
    assert len(pve.cluster.resources.get(type="vm")) == 4


def test_partial_visibility(pve, sim):
    sim.set_visible({101, 102})
    assert [e["vmid"] for e in pve.cluster.resources.get(type="vm")] == [101, 102]
    assert [g["vmid"] for g in pve.nodes("pve1").lxc.get()] == [101]
    assert pve.access.permissions.get(path="/vms")["/vms"]["VM.Audit"] == 1
    with pytest.raises(ResourceException) as err:
        pve.nodes("pve1").qemu(100).config.get()
    assert err.value.status_code == 403
    sim.set_visible(None)
    assert len(pve.cluster.resources.get(type="vm")) == 4


def _grant(sim, path, roleid):
    return {"path": path, "type": "token", "ugid": sim.token_id, "roleid": roleid, "propagate": 1}


def _set_up(sim):
    """The default set-up: PVEAuditor on / for the user and for its privilege-separated token."""
    return [
        {"path": "/", "type": "user", "ugid": sim.user, "roleid": "PVEAuditor", "propagate": 1},
        _grant(sim, "/", "PVEAuditor"),
    ]


def test_acl_lists_the_token_grant_and_a_noaccess_entry_per_hidden_guest(pve, sim):
    assert pve.access.acl.get() == _set_up(sim)
    sim.set_visible({101, 102})
    assert pve.access.acl.get() == [
        *_set_up(sim),
        _grant(sim, "/vms/100", "NoAccess"),
        _grant(sim, "/vms/103", "NoAccess"),
    ]
    assert pve.access.permissions.get(path="/vms/100") == {"/vms/100": {}}
    assert pve.access.permissions.get(path="/vms/101")["/vms/101"]["VM.Audit"] == 1
    sim.add_guest(104)  # outside the visible set: hidden, and its entry is there at the next request
    assert [e["vmid"] for e in pve.cluster.resources.get(type="vm")] == [101, 102]
    assert _grant(sim, "/vms/104", "NoAccess") in pve.access.acl.get()
    sim.set_visible(None)
    assert pve.access.acl.get() == _set_up(sim)


def test_guests_hidden_through_a_pool(pve, sim):
    sim.set_visible({101, 102}, via="pool")
    assert [e["vmid"] for e in pve.cluster.resources.get(type="vm")] == [101, 102]
    assert pve.access.acl.get() == [*_set_up(sim), _grant(sim, "/pool/hidden", "NoAccess")]
    assert pve.access.permissions.get(path="/pool/hidden") == {"/pool/hidden": {}}
    assert pve.access.permissions.get(path="/vms/100") == {"/vms/100": {}}
    assert pve.access.permissions.get(path="/vms")["/vms"]["VM.Audit"] == 1
    with pytest.raises(ValueError):
        sim.set_visible({101}, via="storage")


def test_without_sys_audit_the_acl_list_is_empty_not_an_error(pve, sim):
    assert pve.access.permissions.get(path="/access")["/access"]["Sys.Audit"] == 1
    sim.set_visible({101})
    sim.set_sys_audit(False)
    assert pve.access.acl.get() == []
    assert "Sys.Audit" not in pve.access.permissions.get(path="/access")["/access"]
    assert pve.access.permissions.get(path="/vms")["/vms"] == {"VM.Audit": 1}
    sim.set_sys_audit(True)
    assert _grant(sim, "/vms/100", "NoAccess") in pve.access.acl.get()


def test_added_acl_entries_are_listed_only(pve, sim):
    sim.add_acl("/pool/team", "NoAccess", ugid="devs", type="group", propagate=False)
    assert pve.access.acl.get()[-1] == {
        "path": "/pool/team",
        "type": "group",
        "ugid": "devs",
        "roleid": "NoAccess",
        "propagate": 0,
    }
    assert len(pve.cluster.resources.get(type="vm")) == 4
    with pytest.raises(ValueError):
        sim.add_acl("/", "PVEAuditor", type="robot")


def test_acl_fault_fails_that_route_alone(pve, sim):
    sim.set_acl_fault(500)
    with pytest.raises(ResourceException) as err:
        pve.access.acl.get()
    assert err.value.status_code == 500
    assert len(pve.cluster.resources.get(type="vm")) == 4
    sim.set_acl_fault(None)
    assert pve.access.acl.get() == _set_up(sim)


# --------------------------------------------------------------------------- offline node


def _vm_list(pve):
    return {e["vmid"]: (e["status"], e.get("lock"), e.get("name")) for e in pve.cluster.resources.get(type="vm")}


@pytest.mark.parametrize(
    "change, expect",
    [
        (lambda sim: sim.add_guest(150, node="pve2"), lambda vms: vms[150] == ("running", None, "ct150")),
        (lambda sim: sim.stop_guest(101), lambda vms: vms[101][0] == "stopped"),
        (lambda sim: sim.start_guest(102), lambda vms: vms[102][0] == "running"),
        (lambda sim: sim.destroy_guest(102, lock_seconds=30), lambda vms: vms[102][1] == "destroyed"),
        (lambda sim: sim.destroy_guest(102), lambda vms: 102 not in vms),
        (
            lambda sim: sim.set_node_online("pve2", False, stats_age=301),
            lambda vms: vms[102] == ("unknown", None, None),
        ),
        (lambda sim: sim.set_vm_audit(False), lambda vms: vms == {}),
        (lambda sim: sim.set_visible({100}), lambda vms: set(vms) == {100}),
    ],
    ids=["add", "stop", "start", "destroying", "destroyed", "node offline", "no VM.Audit", "partial"],
)
def test_the_kept_vm_answer_follows_every_change(pve, sim, change, expect):
    # The type=vm answer is served from a cache while nothing changes: each change
    # must show on the very next read.
    before = _vm_list(pve)
    assert _vm_list(pve) == before
    change(sim)
    assert expect(_vm_list(pve)), _vm_list(pve)


def test_offline_node(pve, sim):
    # Its last status and name for 5 minutes (its stats are still fresh), then unknown, no name.
    sim.set_node_online("pve2", False, stats_age=299)
    entries = _by_vmid(pve.cluster.resources.get(type="vm"))
    assert entries[102]["status"] == "stopped" and entries[102]["name"] == "ct102"
    sim.set_node_online("pve2", False, stats_age=301)
    entries = _by_vmid(pve.cluster.resources.get(type="vm"))
    assert set(entries) == {100, 101, 102, 103}  # still listed
    assert entries[102]["status"] == "unknown" and "name" not in entries[102]
    assert entries[102]["node"] == "pve2" and entries[102]["id"] == "lxc/102"
    assert entries[101]["status"] == "running" and entries[101]["name"] == "web"
    nodes = {n["node"]: n["status"] for n in pve.cluster.resources.get(type="node")}
    assert nodes == {"pve1": "online", "pve2": "offline"}
    for call in (pve.nodes("pve2").lxc.get, pve.nodes("pve2").lxc(102).status.current.get):
        with pytest.raises(ResourceException) as err:
            call()
        assert err.value.status_code == 595
    sim.set_node_online("pve2", True)
    assert _by_vmid(pve.cluster.resources.get(type="vm"))[102]["status"] == "stopped"


# --------------------------------------------------------------------------- faults


def test_fault_refuse_then_recover_on_same_port(http, sim):
    host = sim.pve_host
    sim.set_fault("refuse")
    with pytest.raises(requests.exceptions.ConnectionError):
        _get(http, sim, "/version", timeout=2)
    sim.set_fault(None)
    assert sim.pve_host == host
    assert _get(http, sim, "/version").status_code == 200


def test_fault_http500_and_http401(pve, sim):
    sim.set_fault("http500")
    with pytest.raises(ResourceException) as err:
        pve.cluster.resources.get(type="vm")
    assert err.value.status_code == 500
    sim.set_fault("http401")
    with pytest.raises(ResourceException) as err:
        pve.cluster.resources.get(type="vm")
    assert err.value.status_code == 401
    sim.set_fault(None)
    assert len(pve.cluster.resources.get(type="vm")) == 4


def test_fault_slow_times_out(http, sim):
    sim.set_fault("slow", delay=3.0)
    began = time.monotonic()
    with pytest.raises(requests.exceptions.Timeout):
        _get(http, sim, "/cluster/resources", timeout=0.3)
    assert time.monotonic() - began < 2.0
    sim.set_fault(None)
    assert _get(http, sim, "/version", timeout=2).status_code == 200


def test_fault_reset_drops_the_connection(http, sim):
    sim.set_fault("reset")
    with pytest.raises(requests.exceptions.ConnectionError):
        _get(http, sim, "/cluster/resources")
    assert sim.request_count("/cluster/resources") == 1
    sim.set_fault(None)
    assert _get(http, sim, "/cluster/resources").status_code == 200


def test_unknown_fault_kind_is_rejected(sim):
    with pytest.raises(ValueError):
        sim.set_fault("flaky")


# --------------------------------------------------------------------------- destroy, tasks, nextid


def test_destroy_shows_lock_destroyed_then_disappears(pve, sim):
    sim.destroy_guest(102, lock_seconds=0.5)
    entry = _by_vmid(pve.cluster.resources.get(type="vm"))[102]
    assert entry["lock"] == "destroyed"
    assert pve.nodes("pve2").lxc(102).config.get()["lock"] == "destroyed"
    running = [t for t in pve.cluster.tasks.get() if t["type"] == "vzdestroy"]
    assert len(running) == 1 and "status" not in running[0] and "endtime" not in running[0]
    assert pve.cluster.nextid.get() == "104"  # not free while still being destroyed
    time.sleep(0.6)
    assert 102 not in _by_vmid(pve.cluster.resources.get(type="vm"))
    assert sim.guest(102) is None and 102 not in sim.vmids()
    done = [t for t in pve.cluster.tasks.get() if t["type"] == "vzdestroy"]
    assert len(done) == 1 and done[0]["status"] == "OK"
    assert done[0]["endtime"] >= done[0]["starttime"]


def test_destroy_task_upid_parses(pve, sim):
    sim.stop_guest(100)
    sim.destroy_guest(100)
    task = next(t for t in pve.cluster.tasks.get() if t["type"] == "qmdestroy")
    fields = parse_upid(task["upid"])
    assert fields is not None
    assert (fields["node"], fields["type"], fields["id"], fields["user"]) == ("pve1", "qmdestroy", "100", "root@pam")
    assert fields["starttime"] == task["starttime"] and fields["pid"] == task["pid"]
    assert (task["id"], task["node"], task["status"]) == ("100", "pve1", "OK")
    assert isinstance(task["id"], str)
    assert task["upid"].startswith("UPID:pve1:") and task["upid"].endswith(":root@pam:")
    assert 100 not in sim.vmids()


def test_qm_destroy_refuses_a_running_vm(sim):
    with pytest.raises(SimulatorError):
        sim.destroy_guest(100)
    assert sim.guest(100)["status"] == "running" and sim.guest(100)["lock"] is None


def test_stop_records_a_task(pve, sim):
    assert sim.stop_guest(101) is True
    assert sim.stop_guest(101) is False  # already stopped: nothing to do
    tasks = [t for t in pve.cluster.tasks.get() if t["type"] == "vzstop"]
    assert [(t["id"], t["status"]) for t in tasks] == [("101", "OK")]


def test_task_list_keeps_the_last_25_finished(pve, sim):
    for _ in range(15):
        sim.start_guest(102)
        sim.stop_guest(102)
    tasks = pve.cluster.tasks.get()
    assert len(tasks) == 25
    assert tasks[0]["type"] == "vzstop"  # newest first


def test_nextid_is_a_string_and_reuses_freed_vmids(pve, sim):
    assert pve.cluster.nextid.get() == "104"
    sim.destroy_guest(101)  # a running container: pct destroy --force
    assert pve.cluster.nextid.get() == "101"
    sim.add_guest(101)
    assert pve.cluster.nextid.get() == "104"


@settings(max_examples=50, deadline=None)
@given(st.sets(st.integers(min_value=100, max_value=130)))
def test_lowest_free_vmid_property(used):
    free = lowest_free_vmid(used)
    assert free >= 100 and free not in used
    assert all(v in used for v in range(100, free))


# --------------------------------------------------------------------------- request counting


def test_request_count_by_prefix(pve, sim):
    sim.reset_counts()
    pve.cluster.resources.get(type="vm")
    pve.cluster.tasks.get()
    pve.nodes("pve1").lxc.get()
    assert sim.request_count("/cluster") == 2
    assert sim.request_count("/cluster/resources") == 1
    assert sim.request_count("/nodes") == 1
    assert sim.request_count() == 3
    sim.reset_counts()
    assert sim.request_count() == 0


def test_request_count_is_thread_safe(http, sim):
    sim.reset_counts()

    def hammer():
        for _ in range(5):
            requests.get(sim.url + "/version", verify=sim.ca_path, timeout=5, headers=dict(http.headers))

    threads = [threading.Thread(target=hammer) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sim.request_count("/version") == 30


# --------------------------------------------------------------------------- hookscripts


def test_hooks_run_like_proxmox_in_order(sim, tmp_path):
    log = tmp_path / "hook.log"
    sim.hook_env["PVE_JANITOR_HOOK_CONF"] = "/tmp/hook.conf"
    sim.add_guest(120, node="pve2", status="stopped", hookscript=_recording_hook(tmp_path, log))
    assert sim.start_guest(120) is True
    sim.stop_guest(120)
    runs = _recorded(log)
    assert [r["argv"] for r in runs] == [
        ["120", phase] for phase in ("pre-start", "post-start", "pre-stop", "post-stop")
    ]
    assert runs[0]["cwd"] == "/"
    assert runs[0]["env"] == {
        "LC_ALL": "C",
        "PATH": "/sbin:/bin:/usr/sbin:/usr/bin",
        "PVE_JANITOR_HOOK_CONF": "/tmp/hook.conf",
        "PVE_JANITOR_NODE": "pve2",
    }
    assert [(v, p, rc) for v, p, rc, _ in sim.hook_runs] == [(120, p, 0) for p in HOOK_PHASES]
    assert all(duration >= 0 for *_, duration in sim.hook_runs)


def test_node_name_env_can_be_turned_off(tmp_path):
    log = tmp_path / "hook.log"
    sim = ProxmoxSimulator(node_name_env=False)
    sim.add_guest(130, status="stopped", hookscript=_recording_hook(tmp_path, log))
    sim.start_guest(130)
    assert "PVE_JANITOR_NODE" not in _recorded(log)[0]["env"]


def test_failing_pre_start_aborts_the_start(pve, sim, tmp_path):
    log = tmp_path / "hook.log"
    sim.hook_env["FAIL_PRE_START"] = "3"
    sim.add_guest(121, status="stopped", hookscript=_recording_hook(tmp_path, log))
    assert sim.start_guest(121) is False
    assert sim.guest(121)["status"] == "stopped"
    assert [r["argv"][1] for r in _recorded(log)] == ["pre-start"]
    assert sim.hook_runs[-1][:3] == (121, "pre-start", 3)
    task = next(t for t in pve.cluster.tasks.get() if t["type"] == "vzstart")
    assert task["status"].startswith("hookscript error for 121 on pre-start")


def test_missing_hookscript_aborts_the_start(sim, tmp_path):
    sim.add_guest(122, status="stopped", hookscript=str(tmp_path / "absent"))
    assert sim.start_guest(122) is False
    assert sim.guest(122)["status"] == "stopped"
    assert sim.hook_runs == [(122, "pre-start", None, sim.hook_runs[0][3])]


def test_failing_stop_hooks_are_only_warnings(sim, tmp_path):
    log = tmp_path / "hook.log"
    sim.hook_env.update(FAIL_PRE_STOP="1", FAIL_POST_STOP="1")
    sim.add_guest(123, hookscript=_recording_hook(tmp_path, log))
    assert sim.stop_guest(123) is True
    assert sim.guest(123)["status"] == "stopped"
    assert [r["argv"][1] for r in _recorded(log)] == ["pre-stop", "post-stop"]


def test_destroy_runs_no_hook_of_its_own(sim, tmp_path):
    log = tmp_path / "hook.log"
    hook = _recording_hook(tmp_path, log)
    sim.add_guest(124, status="running", hookscript=hook)
    sim.add_guest(125, status="stopped", hookscript=hook)
    sim.destroy_guest(124)  # running container: like pct destroy --force
    sim.destroy_guest(125)  # already stopped: no hook at all
    assert [r["argv"] for r in _recorded(log)] == [["124", "pre-stop"], ["124", "post-stop"]]
    assert {124, 125}.isdisjoint(sim.vmids())


def test_hook_runs_while_the_api_keeps_answering(pve, sim, tmp_path):
    """A hook that calls back into the API (as ours reports to the receiver) must not deadlock."""
    seen = tmp_path / "seen.json"
    body = (
        "import json, ssl, sys, urllib.request\n"
        "ctx = ssl.create_default_context(cafile=%r)\n"
        "req = urllib.request.Request(%r, headers={'Authorization': %r})\n"
        "data = json.load(urllib.request.urlopen(req, context=ctx, timeout=5))['data']\n"
        "mine = [e['status'] for e in data if e['vmid'] == 126]\n"
        "open(%r, 'a').write(json.dumps([sys.argv[2], mine]) + '\\n')\n"
    ) % (
        sim.ca_path,
        sim.url + "/cluster/resources?type=vm",
        "PVEAPIToken=%s=%s" % (sim.token_id, sim.token_value),
        str(seen),
    )
    sim.add_guest(126, hookscript=_hookscript(tmp_path, body))
    sim.stop_guest(126)
    observed = [json.loads(line) for line in seen.read_text().splitlines()]
    assert observed == [["pre-stop", ["running"]], ["post-stop", ["stopped"]]]


# --------------------------------------------------------------------------- standalone


def test_run_standalone_prints_env_and_stops(monkeypatch):
    loaded = []

    def load_into(sim, scene):
        loaded.append(scene)
        sim.add_guest(200)

    fake_scene = types.ModuleType("receiver.simulator.scene")
    monkeypatch.setattr(fake_scene, "load_into", load_into, raising=False)
    monkeypatch.setitem(sys.modules, "receiver.simulator.scene", fake_scene)
    lines: list[str] = []
    stop = threading.Event()
    runner = threading.Thread(
        target=run_standalone, kwargs=dict(port=0, scene="demo", print_fn=lines.append, stop_event=stop)
    )
    runner.start()
    try:
        deadline = time.monotonic() + 5
        while not any(ln.startswith("# Ctrl-C") for ln in lines) and time.monotonic() < deadline:
            time.sleep(0.02)
        exports = dict(line[len("export ") :].split("=", 1) for line in lines if line.startswith("export "))
        assert loaded == ["demo"]
        assert set(exports) == {"PVE_HOST", "PVE_USER", "PVE_TOKEN_NAME", "PVE_TOKEN_VALUE", "PVE_VERIFY_SSL"}
        assert any("throwaway" in line for line in lines)
        answer = requests.get(
            "https://%s/api2/json/cluster/resources" % exports["PVE_HOST"],
            timeout=5,
            verify=exports["PVE_VERIFY_SSL"],
            headers={"Authorization": "PVEAPIToken=janitor@pve!sweep=" + exports["PVE_TOKEN_VALUE"]},
        )
        assert [e["vmid"] for e in answer.json()["data"] if "vmid" in e] == [200]
    finally:
        stop.set()
        runner.join(5)
    assert not runner.is_alive()
    assert not os.path.exists(exports["PVE_VERIFY_SSL"])
