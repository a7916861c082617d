"""A guest as the simulated cluster keeps it, and the rules every guest obeys."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .tasks import Task

GUEST_TYPES = ("lxc", "qemu")
GUEST_STATUSES = ("running", "stopped", "paused")
VMID_MIN, VMID_MAX = 100, 999_999_999


def is_volume_id(hookscript: str) -> bool:
    """``local:snippets/x`` (a storage volume, as a guest's config names it) rather than a path."""
    return ":" in hookscript and not hookscript.startswith("/")


class SimulatorError(RuntimeError):
    """A guest operation that Proxmox itself would refuse (e.g. ``qm destroy`` of a running VM)."""


@dataclass
class Guest:
    vmid: int
    node: str
    type: str
    status: str
    name: str
    template: bool
    hookscript: str | None
    tags: str | None = None
    lock: str | None = None
    started_mono: float | None = None
    gone_at_mono: float | None = None
    destroy_task: Task | None = None
    maxmem: int = 512 * 1024 * 1024
    maxdisk: int = 8 * 1024 * 1024 * 1024
    cpus: int = 1
    # (what the /cluster/resources entry depends on, that entry as JSON)
    encoded: tuple | None = field(default=None, repr=False, compare=False)

    def uptime(self, now_mono: float) -> int:
        if self.status == "stopped" or self.started_mono is None:
            return 0
        return max(0, int(now_mono - self.started_mono))

    def as_dict(self) -> dict:
        return {
            "vmid": self.vmid,
            "node": self.node,
            "type": self.type,
            "status": self.status,
            "name": self.name,
            "template": self.template,
            "hookscript": self.hookscript,
            "tags": self.tags,
            "lock": self.lock,
        }


def lowest_free_vmid(used: Iterable[int]) -> int:
    """The lowest VMID >= 100 not in ``used`` (``/cluster/nextid``: VMIDs are reused at once)."""
    taken = set(used)
    vmid = VMID_MIN
    while vmid in taken:
        vmid += 1
    return vmid
