"""What Proxmox's answers say (receiver.answers): what the ACL list proves about a guest list
(parse_acl), how a /cluster/resources answer is read (parse_guests) and a task list
(parse_tasks).  Anything odd in a guest list refuses; nothing is guessed.  Pure: no I/O.
"""

from __future__ import annotations

import pytest

from receiver.answers import parse_acl, parse_guests, parse_tasks
from receiver.model import Guest, InventoryError, Task


def acl(path, roleid="PVEAuditor", kind="token", ugid="janitor@pve!sweep", propagate=1):
    return {"path": path, "type": kind, "ugid": ugid, "roleid": roleid, "propagate": propagate}


GRANT = acl("/")

CASES = {
    "only the grant on /": ([GRANT], frozenset()),
    "no entry at all (root's token)": ([], frozenset()),
    "NoAccess on a guest, for the token": ([GRANT, acl("/vms/104", "NoAccess")], frozenset({104})),
    "any role on a guest, for a user": ([GRANT, acl("/vms/250", "PVEVMUser", "user", "alice@pve")], frozenset({250})),
    "a group's entry on a guest, not propagated": ([acl("/vms/300", "NoAccess", "group", "ops", 0)], frozenset({300})),
    "entries elsewhere change nothing": (
        [
            GRANT,
            acl("/storage/local", "NoAccess"),
            acl("/vms", "PVEAuditor"),
            acl("/pool/web", "PVEVMAdmin"),
            acl("/nodes/pve1", "NoAccess"),
        ],
        frozenset(),
    ),
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


def test_parse_guests_reads_only_what_it_needs():
    answer = (
        b'{"data": [{"id": "qemu/105", "type": "qemu", "vmid": 105, "node": "pve2", "template": 1, '
        b'"status": "stopped", "maxmem": 1, "tags": "a;b", "extra": {"x": [1, 2]}}, '
        b'{"type": "lxc", "vmid": 101, "node": "pve1", "status": "running", "name": "web", "lock": "backup"}, '
        b'{"type": "lxc", "vmid": 102, "node": "pve1"}]}'
    )
    assert parse_guests(answer) == {
        105: Guest(105, "pve2", "qemu", "stopped", None, 1, None),
        101: Guest(101, "pve1", "lxc", "running", "web", 0, "backup"),
        102: Guest(102, "pve1", "lxc", "unknown"),  # an offline node's guest may come with no status
    }
    assert parse_guests(b'{"data": []}') == {}


@pytest.mark.parametrize(
    "answer, says",
    [
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
    ],
    ids=[
        "html",
        "null data",
        "a list",
        "a number",
        "vmid text",
        "vmid float",
        "vmid bool",
        "no node",
        "not a guest",
        "status null",
    ],
)
def test_an_odd_resources_answer_is_malformed_not_a_shorter_list(answer, says):
    with pytest.raises(InventoryError) as refused:
        parse_guests(answer)
    assert refused.value.kind == "malformed" and says in str(refused.value)


def test_parse_tasks_keeps_what_has_a_upid():
    entries = [
        {
            "upid": "UPID:pve1:1:2:3:vzdestroy:101:janitor@pve!sweep:",
            "node": "pve1",
            "type": "vzdestroy",
            "id": "101",
            "status": "OK",
            "starttime": 1700000000,
            "endtime": 1700000005,
        },
        {"upid": "UPID:pve2:1:2:3:vzdump::root@pam:", "node": "pve2", "type": "vzdump", "id": "", "starttime": "soon"},
        {"node": "pve1", "type": "vzstop"},  # no UPID: skipped
        "not an object",
    ]
    assert parse_tasks(entries) == [
        Task(
            "UPID:pve1:1:2:3:vzdestroy:101:janitor@pve!sweep:", "pve1", "vzdestroy", 101, "OK", 1700000005, 1700000000
        ),
        Task("UPID:pve2:1:2:3:vzdump::root@pam:", "pve2", "vzdump", None, None, None, None),
    ]
    with pytest.raises(InventoryError) as refused:
        parse_tasks({"data": []})
    assert refused.value.kind == "malformed"
