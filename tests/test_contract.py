"""Contract tests: the simulator against Proxmox's own API schema, so it cannot drift again.

The schema (every path's parameters and ``returns``, from Proxmox's API viewer) ships in
the PyPI package ``fakepve`` (``fakepve/data/pve-api.json.gz``, AGPL-3.0): it is read from
the installed package here, in the tests only, never copied.  For every endpoint the
product reads (and the guest endpoints the simulator also serves):

(a) every parameter the product really sends (recorded while it reads) is declared and valid;
(b) the simulator's answer over HTTPS has the shape ``returns`` declares;
(c) the simulator answers 400 for values the schema rejects, naming the parameter with
    Proxmox's message, and accepts the values it allows; its hand-written rules
    (``receiver/simulator/params.py``) state the schema's facts.

The coverage table is in docs/simulator.md.
"""

from __future__ import annotations

import gzip
import json
import re
from importlib import resources

import pytest
import requests
from conftest import janitor_env

from receiver.config import load_settings
from receiver.inventory import ProxmoxInventory
from receiver.simulator import ProxmoxSimulator, params


def _load_schema() -> dict:
    try:
        data = (resources.files("fakepve") / "data" / "pve-api.json.gz").read_bytes()
    except ModuleNotFoundError:
        pytest.skip("the PVE API schema comes with fakepve (test-only): pip install fakepve", allow_module_level=True)
    return json.loads(gzip.decompress(data))["paths"]


SCHEMA = _load_schema()

# What the product reads (receiver/inventory.py, receiver/tasktail.py via ProxmoxInventory,
# receiver/guestconfig.py for hook coverage).
PRODUCT_ENDPOINTS = {
    "/nodes/{node}/lxc/{vmid}/config",
    "/nodes/{node}/qemu/{vmid}/config",
    "/version",
    "/access/permissions",
    "/access/acl",
    "/cluster/resources",
    "/cluster/status",
    "/cluster/tasks",
    "/cluster/nextid",
    "/nodes/{node}/tasks",
}
# Served by the simulator for tests and the demo, not read by the product.
SIMULATOR_ONLY = {
    "/nodes",
    "/nodes/{node}/lxc",
    "/nodes/{node}/qemu",
    "/nodes/{node}/lxc/{vmid}/status/current",
    "/nodes/{node}/qemu/{vmid}/status/current",
}
# The simulator's route for each schema path (kind = lxc|qemu is part of the path).
ROUTE_OF = {
    "/version": "_api_version",
    "/cluster/resources": "_api_resources",
    "/cluster/tasks": "_api_tasks",
    "/cluster/nextid": "_api_nextid",
    "/cluster/status": "_api_cluster_status",
    "/nodes": "_api_nodes",
    "/access/permissions": "_api_permissions",
    "/access/acl": "_api_acl",
    "/nodes/{node}/tasks": "_api_node_tasks",
    "/nodes/{node}/lxc": "_api_guest_list",
    "/nodes/{node}/qemu": "_api_guest_list",
    "/nodes/{node}/lxc/{vmid}/status/current": "_api_status",
    "/nodes/{node}/qemu/{vmid}/status/current": "_api_status",
    "/nodes/{node}/lxc/{vmid}/config": "_api_config",
    "/nodes/{node}/qemu/{vmid}/config": "_api_config",
}
# Where real Proxmox encodes a value differently from what ``returns`` declares (PROXMOX.md:
# /cluster/nextid answers the VMID as a string, e.g. {"data": "102"}).
PROXMOX_ENCODING = {("/cluster/nextid", ""): "string"}


# --------------------------------------------------------------------------- the schema's rules


def _regex(perl: str) -> str:
    """A Perl pattern from the schema (``qr`` stringified as ``(?^:...)``) for Python's re."""
    return perl.replace("(?^:", "(?:")


def _method(path: str) -> dict:
    return SCHEMA[path]["GET"]


def _query_params(path: str) -> dict:
    """The declared parameters that travel in the query string (not the path's)."""
    declared = _method(path)["parameters"].get("properties", {})
    return {k: v for k, v in declared.items() if "{%s}" % k not in path}


# JSONSchema.pm ``register_format``, for the formats these endpoints use.
_FORMAT_CHECKS = {
    "pve-vmid": r"[1-9][0-9]{2,8}",
    "pve-node": r"[a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?",
    "pve-configid": r"(?i:[a-z][a-z0-9_-]+)",
    "pve-task-status-type-list": r"(?i:[\s,;]*((ok|error|warning|unknown)[\s,;]*)*)",
}


def param_error(text: str, rule: dict) -> str | None:
    """Whether a query string's ``text`` passes ``rule`` (pve-common JSONSchema.pm ``check_prop``)."""
    kind = rule.get("type")
    if kind == "integer" and not re.fullmatch(r"[+-]?\d+", text):
        return "type"
    if kind == "boolean" and text not in ("0", "1"):
        return "type"
    if rule.get("format") in _FORMAT_CHECKS and not re.fullmatch(_FORMAT_CHECKS[rule["format"]], text):
        return "format"
    if "pattern" in rule and not re.fullmatch(_regex(rule["pattern"]), text):
        return "pattern"
    if "maxLength" in rule and len(text) > rule["maxLength"]:
        return "maxLength"
    if re.fullmatch(r"[+-]?\d+", text):
        if "maximum" in rule and int(text) > rule["maximum"]:
            return "maximum"
        if "minimum" in rule and int(text) < rule["minimum"]:
            return "minimum"
    if "enum" in rule and text not in rule["enum"]:
        return "enum"
    return None


def shape_errors(value, rule: dict, where: str = "") -> list:
    """Where ``value`` (decoded JSON) breaks ``rule``: the JSON-schema subset the PVE schema
    uses (type, enum, pattern, min/max, properties with ``optional``, additionalProperties,
    items).  Types are the JSON types a client sees; booleans are 0/1 or true/false, as
    Proxmox encodes them."""
    kind = rule.get("type")
    checks = {
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool) or (isinstance(v, int) and v in (0, 1)),
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "null": lambda v: v is None,
    }
    if kind in checks and not checks[kind](value):
        return ["%s: %r is not of type %s" % (where or "data", value, kind)]
    errors = []
    if "enum" in rule and str(value) not in rule["enum"]:
        errors.append("%s: %r not in %s" % (where, value, rule["enum"]))
    if "pattern" in rule and isinstance(value, str) and not re.fullmatch(_regex(rule["pattern"]), value):
        errors.append("%s: %r does not match %s" % (where, value, rule["pattern"]))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in rule and value < rule["minimum"]:
            errors.append("%s: %r < %s" % (where, value, rule["minimum"]))
        if "maximum" in rule and value > rule["maximum"]:
            errors.append("%s: %r > %s" % (where, value, rule["maximum"]))
    if isinstance(value, dict) and "properties" in rule:
        for name, sub in rule["properties"].items():
            if value.get(name) is None:
                if not sub.get("optional"):
                    errors.append("%s.%s: required, missing" % (where, name))
            else:
                errors.extend(shape_errors(value[name], sub, "%s.%s" % (where, name)))
        if rule.get("additionalProperties") == 0:
            errors.extend("%s.%s: not declared" % (where, k) for k in value if k not in rule["properties"])
    if isinstance(value, list) and "items" in rule:
        for i, item in enumerate(value):
            errors.extend(shape_errors(item, rule["items"], "%s[%d]" % (where, i)))
    return errors


def test_the_schema_declares_every_endpoint_with_get():
    for path in PRODUCT_ENDPOINTS | SIMULATOR_ONLY:
        assert "GET" in SCHEMA[path], path
        assert _method(path)["parameters"].get("additionalProperties") == 0, path


def test_shape_validator_catches_what_it_must():
    rule = _method("/cluster/resources")["returns"]
    assert shape_errors([{"id": "lxc/101", "type": "lxc", "vmid": 101}], rule) == []
    assert shape_errors([{"id": "lxc/101", "type": "lxc", "vmid": "101"}], rule)  # wrong type
    assert shape_errors([{"type": "lxc"}], rule)  # id is required
    assert shape_errors([{"id": "x", "type": "vm"}], rule)  # not in the enum
    assert shape_errors([{"id": "x", "type": "lxc", "vmid": 99}], rule)  # below the minimum
    assert shape_errors(
        [{"path": "/", "roleid": "R", "type": "user", "ugid": "u", "x": 1}], _method("/access/acl")["returns"]
    )  # additionalProperties 0


# --------------------------------------------------------------------------- the simulator's rules = the schema's facts


@pytest.mark.parametrize("path", sorted(ROUTE_OF))
def test_simulator_rules_state_the_schema_facts(path):
    """params.py is written by hand; each parameter's name, type, optional flag, enum, bounds,
    format and pattern must be the schema's."""
    kind = "qemu" if "/qemu" in path else "lxc"
    ours = params.declared(ROUTE_OF[path], {"kind": kind})
    theirs = _method(path)["parameters"].get("properties", {})
    assert set(ours) == set(theirs), path
    for name, rule in theirs.items():
        mine = ours[name]
        assert mine.type == rule["type"], (path, name)
        assert mine.optional == bool(rule.get("optional")), (path, name)
        assert mine.enum == tuple(rule.get("enum", ())), (path, name)
        assert mine.minimum == rule.get("minimum") and mine.maximum == rule.get("maximum"), (path, name)
        assert mine.format == rule.get("format"), (path, name)
        assert mine.max_length == rule.get("maxLength"), (path, name)
        if "pattern" in rule:
            for sample in (
                "janitor@pve",
                "janitor@pve!sweep",
                "root@pam",
                "a b@pve",
                "x@1realm",
                "u@pve!",
                "bad",
                "u:x@pve",
            ):
                theirs_ok = re.fullmatch(_regex(rule["pattern"]), sample) is not None
                assert (mine.error(sample) is None) == theirs_ok, (path, name, sample)


# --------------------------------------------------------------------------- the scene


@pytest.fixture(scope="module")
def scene():
    """Both node kinds of guest, templates, tags, a pool, ACL entries, finished and running tasks."""
    sim = ProxmoxSimulator(nodes=("pve1", "pve2"))
    sim.add_guest(100, node="pve1", type="qemu", status="running", name="vm-app", tags="app")
    sim.add_guest(101, node="pve1", type="lxc", status="running", name="web")
    sim.add_guest(102, node="pve2", type="lxc", status="stopped", template=True)
    sim.add_guest(103, node="pve2", type="qemu", status="stopped")
    sim.add_guest(104, node="pve2", type="lxc", status="stopped")
    with sim.start():
        sim.pveum("pveum pool add apps")
        sim.pveum("pveum pool modify apps --vms 101")
        sim.pveum("pveum acl modify /vms/101 --users janitor@pve --roles PVEVMUser")
        sim.stop_guest(101)
        sim.start_guest(101)
        sim.destroy_guest(104)
        yield sim


def _get(sim, path: str, query=None) -> requests.Response:
    return requests.get(
        sim.url + path,
        params=query,
        timeout=5,
        verify=sim.ca_path,
        headers={"Authorization": "PVEAPIToken=%s=%s" % (sim.token_id, sim.token_value)},
    )


def _template_of(path: str) -> str:
    for template in PRODUCT_ENDPOINTS | SIMULATOR_ONLY:
        if re.fullmatch(re.sub(r"\{[a-z]+\}", "[^/]+", template), path):
            return template
    raise AssertionError("no schema path for %s" % path)


# --------------------------------------------------------------------------- (a) what the product sends


def test_every_parameter_the_product_sends_is_declared_and_valid(scene, sqlite_db):
    """Every request of the product's read paths, recorded as the simulator receives it."""
    seen = []
    route = scene._route

    def recording(path, query):
        seen.append((path, {k: v[0] for k, v in query.items()}))
        return route(path, query)

    scene._route = recording
    try:
        inventory = ProxmoxInventory(load_settings(env=janitor_env(scene, sqlite_db)))
        inventory.read()
        inventory.permissions()
        inventory.acl_proof()
        inventory.vmid_in_use(101)
        inventory.vmid_in_use(150)
        inventory.tasks()
        inventory.node_tasks("pve2", ("vzdestroy", "qmdestroy"), 1_700_000_000)
        inventory.version()
        inventory.guest_config("pve1", "lxc", 101)
        inventory.guest_config("pve1", "qemu", 100)
    finally:
        del scene._route
    sent: dict[str, set[str]] = {}
    for path, query in seen:
        template = _template_of(path)
        sent.setdefault(template, set()).update(query)
        declared = _query_params(template)
        for name, text in query.items():
            assert name in declared, "%s sends %s, which Proxmox does not declare" % (template, name)
            assert param_error(text, declared[name]) is None, (template, name, text)
    assert set(sent) == PRODUCT_ENDPOINTS
    assert sent["/cluster/nextid"] == {"vmid"} and sent["/cluster/resources"] == {"type"}
    assert sent["/access/permissions"] == {"path"}
    assert ("/access/permissions", {}) in seen  # and once without: every path the token holds
    assert sent["/nodes/{node}/tasks"] == {"typefilter", "since", "source", "limit"}


# --------------------------------------------------------------------------- (b) answers have the declared shape

ANSWERS = [
    ("/version", None),
    ("/access/permissions", None),
    ("/access/permissions", {"path": "/vms"}),
    ("/access/permissions", {"path": "/access", "userid": "janitor@pve!sweep"}),
    ("/access/acl", None),
    ("/cluster/resources", None),
    ("/cluster/resources", {"type": "vm"}),
    ("/cluster/resources", {"type": "node"}),
    ("/cluster/status", None),
    ("/cluster/tasks", None),
    ("/cluster/nextid", None),
    ("/cluster/nextid", {"vmid": "150"}),
    ("/nodes/pve2/tasks", None),
    ("/nodes/pve2/tasks", {"typefilter": "vzdestroy", "since": "0", "source": "archive", "limit": "1000"}),
    ("/nodes/pve1/tasks", {"source": "all", "vmid": "101", "errors": "0", "statusfilter": "ok,error"}),
    ("/nodes", None),
    ("/nodes/pve1/lxc", None),
    ("/nodes/pve1/qemu", None),
    ("/nodes/pve1/qemu", {"full": "1"}),
    ("/nodes/pve1/lxc/101/status/current", None),
    ("/nodes/pve1/qemu/100/status/current", None),
    ("/nodes/pve2/lxc/102/config", None),
    ("/nodes/pve2/qemu/103/config", None),
]


@pytest.mark.parametrize("path,query", ANSWERS, ids=lambda v: v if isinstance(v, str) else json.dumps(v))
def test_answer_has_the_shape_returns_declares(scene, path, query):
    template = _template_of(path)
    reply = _get(scene, path, query)
    assert reply.status_code == 200, reply.text
    data = reply.json()["data"]
    rule = dict(_method(template)["returns"])
    if (template, "") in PROXMOX_ENCODING:
        rule["type"] = PROXMOX_ENCODING[(template, "")]
    assert shape_errors(data, rule) == []
    assert data or data == {} and template == "/access/permissions", "an empty answer proves little"


def test_permission_maps_are_path_privilege_propagate(scene):
    """``returns`` says only "object": Map of path => (Map of privilege => propagate 0|1)."""
    for query in (None, {"path": "/vms"}):
        data = _get(scene, "/access/permissions", query).json()["data"]
        assert data and all(p.startswith("/") and isinstance(privs, dict) for p, privs in data.items())
        assert all(flag in (0, 1) for privs in data.values() for flag in privs.values())


def test_cluster_task_entries_have_the_node_task_shape(scene):
    """/cluster/tasks declares only ``upid``; Proxmox fills its entries as the node's task list."""
    data = _get(scene, "/cluster/tasks").json()["data"]
    assert data and shape_errors(data, _method("/nodes/{node}/tasks")["returns"]) == []


def test_nextid_is_the_next_free_vmid_as_proxmox_encodes_it(scene):
    assert _get(scene, "/cluster/nextid").json() == {"data": "104"}  # 104 was destroyed: reused
    assert _get(scene, "/cluster/nextid", {"vmid": "150"}).json() == {"data": "150"}


# --------------------------------------------------------------------------- (c) 400 for what the schema rejects


def _bad_values(rule: dict) -> list:
    """Values the schema rejects, one per kind of check it makes."""
    kind, bad = rule.get("type"), []
    if kind == "integer":
        bad += ["abc", "1.5"]
    if kind == "boolean":
        bad += ["2", "maybe"]
    if "minimum" in rule:
        bad.append(str(rule["minimum"] - 1))
    if "maximum" in rule:
        bad.append(str(rule["maximum"] + 1))
    if "enum" in rule:
        bad.append("no-such-value")
    if "pattern" in rule:
        bad += ["no-realm", "a b@pve"]
    if rule.get("format") == "pve-vmid":
        bad += ["5", "099"]
    if rule.get("format") == "pve-task-status-type-list":
        bad.append("ok,bogus")
    if rule.get("format") == "pve-configid":
        bad += ["x", "1snap"]
    if "maxLength" in rule:
        bad.append("a" * (rule["maxLength"] + 1))
    return bad


def _good_values(rule: dict) -> list:
    if "enum" in rule:
        return list(rule["enum"])
    if "pattern" in rule:
        return ["janitor@pve!sweep", "janitor@pve"]
    if rule.get("format") == "pve-vmid":
        return [str(rule["minimum"] + 50), "999999999"]
    if rule.get("format") == "pve-task-status-type-list":
        return ["ok", "error,warning unknown"]
    if rule.get("format") == "pve-configid":
        return ["snap1", "a" * 40]
    samples = {"integer": [str(rule.get("minimum", 0)), "1700000000"], "boolean": ["0", "1"]}
    return samples.get(rule.get("type", ""), ["x"])


PAGES = {  # a concrete path for each schema path
    "/nodes/{node}/tasks": "/nodes/pve1/tasks",
    "/nodes/{node}/lxc": "/nodes/pve1/lxc",
    "/nodes/{node}/qemu": "/nodes/pve1/qemu",
    "/nodes/{node}/lxc/{vmid}/status/current": "/nodes/pve1/lxc/101/status/current",
    "/nodes/{node}/qemu/{vmid}/status/current": "/nodes/pve1/qemu/100/status/current",
    "/nodes/{node}/lxc/{vmid}/config": "/nodes/pve1/lxc/101/config",
    "/nodes/{node}/qemu/{vmid}/config": "/nodes/pve1/qemu/100/config",
}
BAD = [
    (t, name, text)
    for t in sorted(PRODUCT_ENDPOINTS | SIMULATOR_ONLY)
    for name, rule in sorted(_query_params(t).items())
    for text in _bad_values(rule)
]
GOOD = [
    (t, name, text)
    for t in sorted(PRODUCT_ENDPOINTS | SIMULATOR_ONLY)
    for name, rule in sorted(_query_params(t).items())
    for text in _good_values(rule)
]


@pytest.mark.parametrize("template,name,text", BAD)
def test_a_value_the_schema_rejects_is_a_400_naming_it(scene, template, name, text):
    rule = _query_params(template)[name]
    problem = param_error(text, rule)
    assert problem is not None  # the sample really is bad for the schema
    reply = _get(scene, PAGES.get(template, template), {name: text})
    assert reply.status_code == 400 and reply.reason == "Parameter verification failed."
    body = reply.json()
    assert body["data"] is None and set(body["errors"]) == {name}
    message = body["errors"][name]
    expected = {
        "type": "type check ('%s') failed - got '%s'" % (rule.get("type"), text),
        "minimum": "value must have a minimum value of %s" % rule.get("minimum"),
        "maximum": "value must have a maximum value of %s" % rule.get("maximum"),
        "enum": "value '%s' does not have a value in the enumeration '%s'" % (text, ", ".join(rule.get("enum", ()))),
        "pattern": "value does not match the regex pattern",
        "maxLength": "value may only be %s characters long" % rule.get("maxLength"),
    }.get(problem)
    if expected is not None:
        assert message == expected
    else:
        assert message.startswith("invalid format - ")


@pytest.mark.parametrize("template,name,text", GOOD)
def test_a_value_the_schema_allows_is_accepted(scene, template, name, text):
    assert param_error(text, _query_params(template)[name]) is None
    reply = _get(scene, PAGES.get(template, template), {name: text})
    assert reply.status_code != 400, reply.text


@pytest.mark.parametrize("template", sorted(PRODUCT_ENDPOINTS | SIMULATOR_ONLY))
def test_an_undeclared_parameter_is_a_400(scene, template):
    reply = _get(scene, PAGES.get(template, template), {"bogus": "1"})
    assert reply.status_code == 400
    assert reply.json()["errors"] == {"bogus": params.NOT_IN_SCHEMA}


def test_nextid_below_100_is_a_400_not_a_vmid(scene):
    reply = _get(scene, "/cluster/nextid", {"vmid": "5"})
    assert reply.status_code == 400
    assert reply.json()["errors"] == {"vmid": "invalid format - value does not look like a valid VM ID\n"}


@pytest.mark.parametrize("path", ["/nodes/pve1/lxc/5/status/current", "/nodes/pve1/qemu/99/config"])
def test_a_path_vmid_outside_the_range_is_a_400(scene, path):
    reply = _get(scene, path)
    assert reply.status_code == 400 and set(reply.json()["errors"]) == {"vmid"}


def test_every_bad_parameter_is_named_at_once(scene):
    reply = _get(scene, "/nodes/pve1/tasks", {"limit": "-1", "vmid": "5", "source": "x", "nope": "1"})
    assert reply.status_code == 400
    assert set(reply.json()["errors"]) == {"limit", "vmid", "source", "nope"}
