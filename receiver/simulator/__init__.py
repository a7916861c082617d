"""A Proxmox VE API simulator for the tests, ``pve-janitor demo`` and ``pve-janitor simulator``.

Why it exists: pve-janitor's whole job is to believe Proxmox and nothing else, so the
code that matters most (inventory reads, the watcher, the fail-closed guards) can only
be exercised against something that answers like Proxmox does, including the awkward
parts.  This package serves the read-only slice of the PVE API that pve-janitor uses
and fakes the guest life cycle around it, so the product runs on a laptop.  It is
tooling, not the product: nothing in ``receiver``'s core imports it, and its extra
dependency (``trustme``) comes with the ``simulator`` extra.

Each behaviour follows the Proxmox facts the project keeps in PROXMOX.md (hookscripts,
the API, quorum, proxmoxer) or the Proxmox source file named where it is coded:

* ``cluster``: guests (``guests``), nodes, quorum and the stale list of a node without
  it, the guest life cycle (no hook for a destroy, the ``lock: destroyed`` window), hooks run
  as Proxmox runs them (``hooks``);
* ``tasks``: task records with real UPIDs and the ``/cluster/tasks`` list;
* ``userconfig``: users, groups, API tokens, roles, pools and ACL entries (user.cfg);
  ``access``: what Proxmox computes from them, each rule naming the pve-access-control
  function it follows; ``roles``: the built-in roles and ACL paths; ``pveum``: the
  ``pveum`` lines users paste, applied to the configuration;
* ``api``: the routes (``/cluster/resources``, ``/nodes/<n>/lxc|qemu``, per-guest
  status/config, ``/cluster/tasks``, ``/cluster/nextid``, ``/cluster/status``,
  ``/access/permissions``, ``/access/acl``);
* ``endpoint``: start/stop, token auth, faults, request counts; ``server``: the TLS
  server with a certificate made at run time; ``proxmox``: ``ProxmoxSimulator``;
* ``standalone``: ``pve-janitor simulator``; ``scene``: the seed platform's scene;
  ``demo``: ``pve-janitor demo``.

It is not an emulator: it answers only the routes in ``api.ROUTES``, and it is
read-only over HTTP, like the PVEAuditor token pve-janitor uses.
"""

from .guests import GUEST_TYPES, SimulatorError, lowest_free_vmid
from .hooks import HOOK_PHASES
from .proxmox import ProxmoxSimulator
from .standalone import export_lines, run_standalone
from .tasks import parse_upid

__all__ = [
    "GUEST_TYPES",
    "HOOK_PHASES",
    "ProxmoxSimulator",
    "SimulatorError",
    "export_lines",
    "lowest_free_vmid",
    "parse_upid",
    "run_standalone",
]
