"""Proxmox's parameter verification for the routes the simulator serves.

Every PVE API method declares its parameters (pve-manager, pve-access-control, qemu-server,
pve-container), and pve-common ``PVE/JSONSchema.pm`` ``validate`` checks a request against
them before the method runs: a bad or unknown parameter is HTTP 400 "Parameter verification
failed." with ``{"data": null, "errors": {"<param>": "<message>"}}``, every bad parameter
named at once.  The rules below are written by hand from those declarations (the facts:
name, type, enum, pattern, bounds); ``tests/test_contract.py`` checks them against the PVE
API schema.  A route's own errors (``VM N already exists``) stay in the route.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MESSAGE = "Parameter verification failed."
NOT_IN_SCHEMA = "property is not defined in schema and the schema does not allow additional properties"


class ParameterError(Exception):
    """A request's parameters failed verification: HTTP 400 with ``errors`` ({name: message})."""

    def __init__(self, errors: dict):
        super().__init__(MESSAGE)
        self.errors = errors


# JSONSchema.pm ``register_format``: each format's check and the message it dies with (the
# trailing newline is Proxmox's: ``die "...\n"`` becomes the error text as is).
_FORMATS = {
    "pve-vmid": (re.compile(r"[1-9][0-9]{2,8}"), "value does not look like a valid VM ID\n"),
    "pve-node": (
        re.compile(r"[a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?"),
        "value does not look like a valid node name\n",
    ),
    "pve-configid": (re.compile(r"[a-z][a-z0-9_-]+", re.IGNORECASE), "invalid configuration ID '%s'\n"),
}
# ``pve-task-status-type-list``: a list (split on space, comma, semicolon) of these, any case.
_TASK_STATUS = re.compile(r"ok|error|warning|unknown", re.IGNORECASE)


@dataclass(frozen=True)
class Param:
    """One declared parameter, as JSONSchema.pm ``check_prop`` checks it."""

    type: str  # string | integer | boolean
    optional: bool = True
    format: str | None = None
    pattern: str | None = None
    minimum: int | None = None
    maximum: int | None = None
    max_length: int | None = None
    enum: tuple = ()

    def error(self, value: str) -> str | None:
        """The message Proxmox gives for ``value`` (a query string's text), or None when valid.
        Checks in ``check_prop``'s order: type, format, pattern, length, bounds, enum."""
        if self.type == "integer" and not re.fullmatch(r"[+-]?\d+", value):
            return "type check ('integer') failed - got '%s'" % value
        if self.type == "boolean" and value not in ("0", "1"):  # check_type: '1' or '0' only
            return "type check ('boolean') failed - got '%s'" % value
        if self.format == "pve-task-status-type-list":
            for item in (v for v in re.split(r"[\s,;]+", value) if v):
                if not _TASK_STATUS.fullmatch(item):
                    return "invalid format - invalid status '%s'\n" % item
        elif self.format in _FORMATS:
            regex, message = _FORMATS[self.format]
            if not regex.fullmatch(value):
                return "invalid format - " + (message % value if "%s" in message else message)
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            return "value does not match the regex pattern"
        if self.max_length is not None and len(value) > self.max_length:
            return "value may only be %d characters long" % self.max_length
        if re.fullmatch(r"[+-]?\d+", value):
            if self.maximum is not None and int(value) > self.maximum:
                return "value must have a maximum value of %d" % self.maximum
            if self.minimum is not None and int(value) < self.minimum:
                return "value must have a minimum value of %d" % self.minimum
        if self.enum and value not in self.enum:
            return "value '%s' does not have a value in the enumeration '%s'" % (value, ", ".join(self.enum))
        return None


VMID = Param("integer", optional=False, format="pve-vmid", minimum=100, maximum=999_999_999)
NODE = Param("string", optional=False, format="pve-node")
# pve-access-control ``PVE/Auth/Plugin.pm``: user ``name@realm``, a token ``name@realm!tokenid``.
_REALM_ID = r"[A-Za-z][A-Za-z0-9\.\-_]+"
USERID_OR_TOKEN = r"[^\s:/]+@%s(?:!%s)?" % (_REALM_ID, _REALM_ID)

# For each route (the ``ApiRoutes`` method that answers it), the parameters its PVE method
# declares, path fields included.  Every method here has ``additionalProperties => 0``.
PARAMETERS: dict = {
    # pve-manager API2/Cluster.pm, API2/Nodes.pm, PVE/API2.pm
    "_api_version": {},
    "_api_resources": {"type": Param("string", enum=("vm", "storage", "node", "sdn"))},
    "_api_tasks": {},
    "_api_nextid": {"vmid": Param("integer", format="pve-vmid", minimum=100, maximum=999_999_999)},
    "_api_cluster_status": {},
    "_api_nodes": {},
    # pve-manager API2/Tasks.pm ``node_tasks``
    "_api_node_tasks": {
        "node": NODE,
        "start": Param("integer", minimum=0),
        "limit": Param("integer", minimum=0),
        "userfilter": Param("string"),
        "typefilter": Param("string"),
        "vmid": Param("integer", format="pve-vmid", minimum=100, maximum=999_999_999),
        "errors": Param("boolean"),
        "source": Param("string", enum=("archive", "active", "all")),
        "since": Param("integer"),
        "until": Param("integer"),
        "statusfilter": Param("string", format="pve-task-status-type-list"),
    },
    # pve-container API2/LXC.pm ``vmlist`` (no ``full``), qemu-server API2/Qemu.pm ``vmlist``
    "_api_guest_list": {"node": NODE, "full": Param("boolean")},
    "_api_status": {"node": NODE, "vmid": VMID},
    "_api_config": {
        "node": NODE,
        "vmid": VMID,
        "current": Param("boolean"),
        "snapshot": Param("string", format="pve-configid", max_length=40),
    },
    # pve-access-control API2/AccessControl.pm ``permissions``, API2/ACL.pm ``read_acl``
    "_api_permissions": {"path": Param("string"), "userid": Param("string", pattern=USERID_OR_TOKEN)},
    "_api_acl": {},
}


def declared(route: str, fields: dict) -> dict:
    """The parameters ``route`` declares for a request with these path ``fields`` (``kind``
    picks lxc or qemu: only qemu's guest list takes ``full``)."""
    params = PARAMETERS.get(route, {})
    if route == "_api_guest_list" and fields.get("kind") == "lxc":
        params = {k: v for k, v in params.items() if k != "full"}
    return params


def verify(route: str, query: dict, fields: dict) -> None:
    """Raise ParameterError naming every bad parameter of one request, as ``validate`` does.

    ``query`` is a parsed query string (``{name: [value, ...]}``, the first value counts),
    ``fields`` the path's named parts (``node``, ``vmid``; ``kind`` is the path, not a
    parameter).  A route without declared parameters here is not checked.
    """
    if route not in PARAMETERS:
        return
    params = declared(route, fields)
    values = {name: values[0] for name, values in query.items() if values}
    values.update((name, value) for name, value in fields.items() if name in params)
    errors = {}
    for name, param in params.items():
        if name not in values:
            if not param.optional:
                errors[name] = "property is missing and it is not optional"
            continue
        message = param.error(values[name])
        if message is not None:
            errors[name] = message
    errors.update((name, NOT_IN_SCHEMA) for name in values if name not in params)
    if errors:
        raise ParameterError(errors)
