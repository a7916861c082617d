"""The simulator's privilege model computes what Proxmox computes (pve-access-control
``AccessControl::roles``, ``RPCEnvironment::compile_acl_path``, ``API2/ACL.pm``), checked
over real HTTPS through proxmoxer; and the README's set-up works on it, the old one does not.
"""

from __future__ import annotations

import re

import pytest
from conftest import ROOT, janitor_env, run_cli
from conftest import proxmox_client as client
from proxmoxer.core import ResourceException

from receiver.simulator import ProxmoxSimulator
from receiver.simulator.roles import AccessError

AUDITOR = ("Datastore.Audit", "Mapping.Audit", "Pool.Audit", "SDN.Audit", "Sys.Audit", "VM.Audit")
VM_USER = ("VM.Audit", "VM.Backup", "VM.Config.CDROM", "VM.Config.Cloudinit", "VM.Console", "VM.PowerMgmt")
USER, TOKEN = "janitor@pve", "janitor@pve!sweep"


def privs(names, flag=1) -> dict:
    return dict.fromkeys(names, flag)


@pytest.fixture
def bare():
    """Guests 100-102 (100 and 101 in pool ``p`` when a case says so), and no one but root@pam."""
    simulator = ProxmoxSimulator(nodes=("pve1", "pve2"))
    for vmid in (100, 101, 102):
        simulator.add_guest(vmid)
    simulator.clear_access()
    with simulator.start() as started:
        yield started


def set_up(sim: ProxmoxSimulator, lines: list[str], privsep: int = 1) -> None:
    sim.pveum(f"user add {USER}")
    sim.pveum(f"user token add {USER} sweep --privsep {privsep}")
    for line in lines:
        sim.pveum(line)


def user_acl(path: str, roles: str, propagate: int = 1) -> str:
    return f"acl modify {path} --users {USER} --roles {roles} --propagate {propagate}"


# (lines, privsep, path, what the token holds there)
WALK = {
    "inherited from / with propagate": ([user_acl("/", "PVEAuditor")], 0, "/vms/100", privs(AUDITOR)),
    "propagate=0 counts on its own path": ([user_acl("/", "PVEAuditor", 0)], 0, "/", privs(AUDITOR, 0)),
    "propagate=0 reaches no deeper path": ([user_acl("/", "PVEAuditor", 0)], 0, "/vms", {}),
    "a deeper entry replaces what was inherited": (
        [user_acl("/", "PVEAuditor"), user_acl("/vms", "PVEVMUser")],
        0,
        "/vms/100",
        privs(VM_USER),
    ),
    "a deeper propagate=0 entry replaces only on its path": (
        [user_acl("/", "PVEAuditor"), user_acl("/vms", "PVEVMUser", 0)],
        0,
        "/vms/100",
        privs(AUDITOR),
    ),
    "the user's own entry wins over its group's": (
        [
            "group add ops",
            f"user modify {USER} --groups ops",
            user_acl("/vms", "PVEAuditor"),
            "acl modify /vms --groups ops --roles PVEVMAdmin",
        ],
        0,
        "/vms/100",
        privs(AUDITOR),
    ),
    "a group entry on a deeper path replaces the user's inherited one": (
        [
            "group add ops",
            f"user modify {USER} --groups ops",
            user_acl("/", "PVEAuditor"),
            "acl modify /vms/100 --groups ops --roles PVEVMUser",
        ],
        0,
        "/vms/100",
        privs(VM_USER),
    ),
    "a group the user is not in gives nothing": (
        ["group add ops", "acl modify / --groups ops --roles PVEAuditor"],
        0,
        "/vms/100",
        {},
    ),
    "NoAccess on the guest": ([user_acl("/", "PVEAuditor"), user_acl("/vms/100", "NoAccess")], 0, "/vms/100", {}),
    "NoAccess wins beside another role": ([user_acl("/vms", "PVEAuditor,NoAccess")], 0, "/vms/101", {}),
    "NoAccess elsewhere leaves a guest alone": (
        [user_acl("/", "PVEAuditor"), user_acl("/vms/100", "NoAccess")],
        0,
        "/vms/101",
        privs(AUDITOR),
    ),
    "a pool's roles reach its guests, never propagated": (
        ["pool add p", "pool modify p --vms 100,101", user_acl("/pool/p", "PVEVMUser")],
        0,
        "/vms/100",
        privs(VM_USER, 0),
    ),
    "a pool's roles reach no other guest": (
        ["pool add p", "pool modify p --vms 100,101", user_acl("/pool/p", "PVEVMUser")],
        0,
        "/vms/102",
        {},
    ),
    "a pool role never overrides a direct one": (
        ["pool add p", "pool modify p --vms 100", user_acl("/", "PVEAuditor"), user_acl("/pool/p", "PVEAuditor")],
        0,
        "/vms/100",
        privs(AUDITOR),
    ),
    "a pool role adds to the direct ones": (
        ["pool add p", "pool modify p --vms 100", user_acl("/", "PVEAuditor"), user_acl("/pool/p", "PVETemplateUser")],
        0,
        "/vms/100",
        {**privs(AUDITOR), "VM.Clone": 0},
    ),
    "NoAccess on the pool trumps a direct role": (
        ["pool add p", "pool modify p --vms 100", user_acl("/", "PVEAuditor"), user_acl("/pool/p", "NoAccess")],
        0,
        "/vms/100",
        {},
    ),
    "a direct NoAccess is not lifted by the pool": (
        [
            "pool add p",
            "pool modify p --vms 100",
            user_acl("/vms/100", "NoAccess"),
            user_acl("/pool/p", "Administrator"),
        ],
        0,
        "/vms/100",
        {},
    ),
    "privsep: the intersection of token and user": (
        [user_acl("/", "PVEAuditor"), f"acl modify / --tokens '{TOKEN}' --roles PVEVMUser"],
        1,
        "/",
        privs(["VM.Audit"]),
    ),
    "privsep: each propagate flag is the AND of both": (
        [user_acl("/", "PVEAuditor", 0), f"acl modify / --tokens '{TOKEN}' --roles PVEAuditor"],
        1,
        "/",
        privs(AUDITOR, 0),
    ),
    "privsep: the token's own NoAccess": (
        [
            user_acl("/", "PVEAuditor"),
            f"acl modify / --tokens '{TOKEN}' --roles PVEAuditor",
            f"acl modify /vms/100 --tokens '{TOKEN}' --roles NoAccess",
        ],
        1,
        "/vms/100",
        {},
    ),
    "privsep: a token is in none of its user's groups": (
        ["group add ops", f"user modify {USER} --groups ops", "acl modify / --groups ops --roles PVEAuditor"],
        1,
        "/vms/100",
        {},
    ),
    "privsep: a user without any ACL leaves the token nothing": (
        [f"acl modify / --tokens '{TOKEN}' --roles PVEAuditor"],
        1,
        "/vms",
        {},
    ),
    "not separated: the token holds its user's": ([user_acl("/", "PVEAuditor")], 0, "/vms", privs(AUDITOR)),
    "not separated: the token's own entries do not count": (
        [user_acl("/", "PVEAuditor"), f"acl modify /vms --tokens '{TOKEN}' --roles NoAccess"],
        0,
        "/vms",
        privs(AUDITOR),
    ),
}


@pytest.mark.parametrize("lines, privsep, path, expected", WALK.values(), ids=WALK.keys())
def test_the_acl_walk(bare, lines, privsep, path, expected):
    set_up(bare, lines, privsep)
    assert client(bare).access.permissions.get(path=path) == {path: expected}


def test_root_at_pam_holds_everything():
    with ProxmoxSimulator(user="root@pam", token_name="all").start() as sim:
        sim.clear_access()
        sim.pveum("user token add root@pam all --privsep 0")
        held = client(sim).access.permissions.get(path="/vms/123")["/vms/123"]
        assert {"VM.Audit", "Sys.Audit", "Permissions.Modify", "VM.Allocate"} <= set(held)
        assert set(held.values()) == {1}


def test_without_path_every_path_where_the_token_holds_something(bare):
    set_up(
        bare,
        [
            user_acl("/", "PVEAuditor"),
            f"acl modify / --tokens '{TOKEN}' --roles PVEAuditor",
            f"acl modify /vms/101 --tokens '{TOKEN}' --roles NoAccess",
            "pool add p",
            "pool modify p --vms 102",
        ],
    )
    everything = client(bare).access.permissions.get()
    # RPCEnvironment::get_effective_permissions: the top-level paths, the ACL tree's paths, the
    # pool members' paths; where the token holds nothing (/vms/101) the path is left out
    assert set(everything) == {
        "/",
        "/access",
        "/access/groups",
        "/nodes",
        "/pool",
        "/sdn",
        "/storage",
        "/vms",
        "/vms/102",
    }
    assert all(held == privs(AUDITOR) for held in everything.values())


def test_a_token_that_holds_nothing_gets_no_path_at_all(bare):
    set_up(bare, [f"acl modify / --tokens '{TOKEN}' --roles PVEAuditor"])
    assert client(bare).access.permissions.get() == {}


def test_lists_and_guests_follow_vm_audit_on_each_guest(bare):
    set_up(
        bare,
        [
            user_acl("/", "PVEAuditor"),
            f"acl modify / --tokens '{TOKEN}' --roles PVEAuditor",
            f"acl modify /vms/101 --tokens '{TOKEN}' --roles NoAccess",
        ],
    )
    pve = client(bare)
    assert [g["vmid"] for g in pve.cluster.resources.get(type="vm")] == [100, 102]
    assert [g["vmid"] for g in pve.nodes("pve1").lxc.get()] == [100, 102]
    assert pve.nodes("pve1").lxc(100).status.current.get()["vmid"] == 100
    with pytest.raises(ResourceException) as refused:
        pve.nodes("pve1").lxc(101).status.current.get()
    assert refused.value.status_code == 403
    assert pve.cluster.status.get()  # Sys.Audit on /
    assert pve.cluster.nextid.get() == "103"


def test_a_token_that_holds_nothing_sees_empty_lists_and_only_nextid(bare):
    set_up(bare, [f"acl modify / --tokens '{TOKEN}' --roles PVEAuditor"])
    pve = client(bare)
    assert pve.cluster.resources.get(type="vm") == []
    assert pve.nodes("pve1").lxc.get() == []
    assert pve.access.acl.get() == []  # 200, with the entries it may modify: none
    for call in (lambda: pve.cluster.status.get(), lambda: pve.nodes("pve1").lxc(100).config.get()):
        with pytest.raises(ResourceException) as refused:
            call()
        assert refused.value.status_code == 403
    assert pve.cluster.nextid.get() == "103"  # any authenticated caller


def test_the_acl_list_is_whole_with_sys_audit_on_access_else_what_the_caller_may_modify(bare):
    set_up(
        bare,
        [
            "group add ops",
            user_acl("/", "PVEAuditor"),
            user_acl("/vms/102", "PVEVMAdmin"),
            f"acl modify / --tokens '{TOKEN}' --roles PVEAuditor",
            f"acl modify /vms/102 --tokens '{TOKEN}' --roles PVEVMAdmin",
            "acl modify /vms/100 --groups ops --roles NoAccess",
        ],
    )
    pve = client(bare)
    entries = pve.access.acl.get()
    assert [(e["path"], e["type"], e["ugid"], e["roleid"]) for e in entries] == [
        ("/", "user", USER, "PVEAuditor"),
        ("/", "token", TOKEN, "PVEAuditor"),
        ("/vms/100", "group", "ops", "NoAccess"),
        ("/vms/102", "user", USER, "PVEVMAdmin"),
        ("/vms/102", "token", TOKEN, "PVEVMAdmin"),
    ]
    bare.pveum(user_acl("/access", "PVEVMAdmin"))  # no Sys.Audit on /access any more
    # VM.Allocate on /vms/102 lets it modify that path's entries (RPCEnvironment::check_perm_modify)
    assert {e["path"] for e in pve.access.acl.get()} == {"/vms/102"}


def test_a_destroyed_guest_takes_its_entries_and_pool_membership_along(bare):
    set_up(
        bare,
        [user_acl("/", "PVEAuditor"), user_acl("/vms/100", "NoAccess"), "pool add p", "pool modify p --vms 101"],
        privsep=0,
    )
    bare.destroy_guest(100)
    bare.destroy_guest(101)
    bare.add_guest(100)
    assert client(bare).access.permissions.get(path="/vms/100") == {"/vms/100": privs(AUDITOR)}
    assert bare.access.pools == {"p": set()}


@pytest.mark.parametrize(
    "line, message",
    [
        ("user add janitor@pve", "already exists"),
        ("acl modify / --users nobody@pve --roles PVEAuditor", "does not exist"),
        ("acl modify / --users janitor@pve --roles PVEAuditr", "role 'PVEAuditr' does not exist"),
        ("acl modify / --roles PVEAuditor", "either 'users', 'groups' or 'tokens' is required"),
        ("acl modify /nowhere --users janitor@pve --roles PVEAuditor", "invalid ACL path"),
        ("acl modify / --tokens 'janitor@pve!other' --roles PVEAuditor", "no such token"),
        ("acl modify / --users janitor@pve --roles PVEAuditor --propagate maybe", "boolean"),
        ("user modify janitor@pve --groups nope", "no such group"),
        ("pool modify nope --vms 100", "does not exist"),
        ("pool modify p --vms 999", "VM 999 does not exist"),
        ("user delete janitor@pve", "unsupported command"),
        ("role add Mine --privs VM.Audit", "unsupported command"),
        ("acl modify / --users janitor@pve --roles PVEAuditor --path /vms", "unknown option"),
    ],
)
def test_pveum_refuses_what_proxmox_refuses_and_what_it_does_not_know(bare, line, message):
    set_up(bare, ["pool add p"])
    acl_before = dict(bare.access.acl)
    with pytest.raises(AccessError, match=re.escape(message)):
        bare.pveum(line)
    assert bare.access.acl == acl_before


def test_a_failing_line_changes_nothing(bare):
    set_up(bare, [])
    with pytest.raises(AccessError):
        bare.pveum(f"acl modify / --users {USER},nobody@pve --roles PVEAuditor")  # the first would work
    assert bare.access.acl == {}


def test_a_token_that_does_not_exist_is_refused(bare):
    with pytest.raises(ResourceException) as refused:
        client(bare).version.get()
    assert refused.value.status_code == 401
    set_up(bare, [])
    assert client(bare).version.get()


# --------------------------------------------------------------------------- the documented set-up


def readme_pveum_lines() -> list[str]:
    """The ``pveum`` lines of the README's "Point it at a real cluster" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Point it at a real cluster", 1)[1].split("\n## ", 1)[0]
    lines = [line.strip() for line in section.splitlines() if line.strip().startswith("pveum ")]
    assert lines, "no pveum line in the README's install section"
    return lines


def test_the_readme_set_up_works(seed_sim, seeded):
    seed_sim.clear_access()
    env = janitor_env(seed_sim, seeded)
    assert run_cli(["check"], env).code == 3  # no such token yet
    for line in readme_pveum_lines():
        seed_sim.pveum(line)
    assert client(seed_sim).access.permissions.get(path="/vms")["/vms"]["VM.Audit"] == 1
    check = run_cli(["check"], env)
    assert check.code == 0, check.out + check.err
    sweep = run_cli(["sweep", "--json", "--force"], env)
    assert sweep.code == 0, sweep.out + sweep.err
    assert sweep.json()["outcome"] == "done" and sweep.json()["applied"] == 41, sweep.json()


def test_the_old_set_up_leaves_the_token_nothing_and_the_sweep_refused(seed_sim, seeded):
    """PVEAuditor granted to the privilege-separated token alone (what the docs said before)."""
    seed_sim.clear_access()
    for line in (
        f"user add {USER}",
        f"user token add {USER} sweep --privsep 1",
        f"acl modify / --tokens '{TOKEN}' --roles PVEAuditor",
    ):
        seed_sim.pveum(line)
    assert client(seed_sim).access.permissions.get() == {}
    env = janitor_env(seed_sim, seeded)
    sweep = run_cli(["sweep", "--json", "--force"], env)
    assert sweep.code == 3 and sweep.json()["refusal"] == "privilege", sweep.out + sweep.err
    check = run_cli(["check"], env)
    assert check.code == 3 and f"pveum acl modify / --users {USER} --roles PVEAuditor" in check.out
