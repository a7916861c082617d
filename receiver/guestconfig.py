"""A guest's config as the Proxmox API gives it: its digest and the hookscript it names.

``GET /nodes/{node}/{lxc|qemu}/{vmid}/config`` (VM.Audit on ``/vms/N``, proxied to the
guest's node) is the only answer that shows a guest's hookscript, and its ``digest`` (a hash
of the config file) the only sign that the config changed: ``/cluster/resources`` and the
per-node guest lists carry neither (PROXMOX.md; the API schema).  So knowing whether a config
changed costs one read of it, whatever :mod:`receiver.coverage` caches.

The hookscript is pve-janitor's when its volume names the file docs/hookscript.md and
install.sh install, ``pve-janitor-hook`` in a ``snippets`` directory, on any storage (the
docs use ``local``, a shared storage serves as well).  Every answer other than a config
says nothing about the hookscript and is read as what it is (:class:`receiver.probe.Result`).
Parsing is pure; :func:`read_config` makes the one request.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .probe import Result

if TYPE_CHECKING:
    from .inventory import ProxmoxInventory

HOOK_FILE = "pve-janitor-hook"  # the file docs/hookscript.md installs into the snippets directory
HOOK_VOLUME = f"local:snippets/{HOOK_FILE}"  # where docs/hookscript.md and install.sh put it
_MISSING_CONFIG = re.compile(r"Configuration file '[^']*/(\d+)\.conf' does not exist")
_NOT_READ = {595: Result.OFFLINE, 403: Result.PRIVILEGE, 401: Result.AUTH}


@dataclass(frozen=True)
class GuestConfig:
    """What one config read said; ``digest`` and ``hookscript`` only when ``result`` is PRESENT."""

    vmid: int
    node: str
    type: str
    result: Result
    digest: str | None = None
    hookscript: str | None = None
    detail: str = ""

    @property
    def has_hook(self) -> bool:
        return is_janitor_hook(self.hookscript)


def is_janitor_hook(volume: str | None) -> bool:
    """Whether a config's ``hookscript`` (a volume id) is pve-janitor's: ``<storage>:snippets/pve-janitor-hook``."""
    if not volume:
        return False
    storage, colon, name = volume.partition(":")
    return bool(storage) and bool(colon) and name == f"snippets/{HOOK_FILE}"


def attach_command(kind: str, vmid: int) -> str:
    """The line that attaches pve-janitor's hookscript, as root on a node (only root@pam may)."""
    return f"{'qm' if kind == 'qemu' else 'pct'} set {vmid} --hookscript {HOOK_VOLUME}"


def parse_config(vmid: int, node: str, kind: str, code: int, reason: str, body: bytes) -> GuestConfig:
    """What ``GET /nodes/{node}/{kind}/{vmid}/config`` answered.

    A config is a JSON object with a string ``digest``; ``hookscript``, when present, a
    string.  HTTP 500 with Proxmox's "Configuration file ... does not exist": the guest is
    not (or no longer) there.  595: its node is offline; 403: the token lacks VM.Audit on it;
    401: the token was refused.
    """
    if code == 200:
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        data = answer.get("data") if isinstance(answer, dict) else None
        digest = data.get("digest") if isinstance(data, dict) else None
        hook = data.get("hookscript") if isinstance(data, dict) else None
        if not isinstance(digest, str) or not (hook is None or isinstance(hook, str)):
            return GuestConfig(vmid, node, kind, Result.MALFORMED, detail="config answer without a digest")
        return GuestConfig(vmid, node, kind, Result.PRESENT, digest, hook or None)
    if code == 500:
        match = _MISSING_CONFIG.search(reason + " " + body[:500].decode("utf-8", "replace"))
        if match and int(match.group(1)) == vmid:
            return GuestConfig(vmid, node, kind, Result.GONE, detail=f"not a {kind} guest on {node}")
    result = _NOT_READ.get(code, Result.HTTP)
    return GuestConfig(vmid, node, kind, result, detail=f"HTTP {code} {' '.join(reason.split())[:160]}")


def read_config(inventory: ProxmoxInventory, node: str, kind: str, vmid: int) -> GuestConfig:
    """One config read; InventoryError only when no PVE_HOST answered at all."""
    reply = inventory.guest_config(node, kind, vmid)
    return parse_config(vmid, node, kind, reply.status, reply.reason, reply.body)
