"""What the simulator's routes show of a guest or a node, built from the cluster's state."""

from __future__ import annotations

import os

from .guests import Guest, is_volume_id


def config_path(node: str, kind: str, vmid: int) -> str:
    directory = "lxc" if kind == "lxc" else "qemu-server"
    return "nodes/%s/%s/%d.conf" % (node, directory, vmid)


def resource_entry(guest: Guest, now: float, online: bool, pool: str | None) -> dict:
    """A guest's ``/cluster/resources`` entry (PROXMOX.md facts, API)."""
    entry = {
        "id": "%s/%d" % (guest.type, guest.vmid),
        "vmid": guest.vmid,
        "node": guest.node,
        "type": guest.type,
        "template": int(guest.template),
        "maxmem": guest.maxmem,
        "maxdisk": guest.maxdisk,
        "maxcpu": guest.cpus,
    }
    if online:
        running = guest.status != "stopped"
        entry.update(
            status=guest.status,
            name=guest.name,
            uptime=guest.uptime(now),
            cpu=0.01 if running else 0,
            mem=guest.maxmem // 4 if running else 0,
            disk=guest.maxdisk // 8,
            netin=0,
            netout=0,
            diskread=0,
            diskwrite=0,
        )
    else:  # an offline node's guest: status "unknown", no name
        entry["status"] = "unknown"
    if guest.lock:
        entry["lock"] = guest.lock
    if guest.tags:
        entry["tags"] = guest.tags
    if pool:
        entry["pool"] = pool
    return entry


def node_entry(node: str, online: bool, uptime: int) -> dict:
    """A node's ``/cluster/resources`` (and ``/nodes``) entry."""
    entry: dict = {"id": "node/%s" % node, "node": node, "type": "node"}
    if online:
        entry.update(
            status="online",
            level="",
            maxcpu=8,
            cpu=0.02,
            maxmem=32 * 1024**3,
            mem=8 * 1024**3,
            maxdisk=100 * 1024**3,
            disk=20 * 1024**3,
            uptime=uptime,
        )
    else:
        entry["status"] = "offline"
    return entry


def list_entry(guest: Guest, now: float) -> dict:
    """A guest's entry in ``/nodes/<node>/lxc|qemu`` (and its ``status/current``)."""
    entry = {
        "vmid": guest.vmid,
        "status": guest.status,
        "name": guest.name,
        "uptime": guest.uptime(now),
        "maxmem": guest.maxmem,
        "maxdisk": guest.maxdisk,
        "cpus": guest.cpus,
    }
    if guest.type == "lxc":
        entry["type"] = "lxc"
    if guest.template:
        entry["template"] = 1
    if guest.lock:
        entry["lock"] = guest.lock
    if guest.tags:
        entry["tags"] = guest.tags
    return entry


def guest_config(guest: Guest) -> dict:
    if guest.lock == "destroyed":  # a guest being destroyed: its config is {lock: destroyed}
        return {"lock": "destroyed"}
    memory_mb = guest.maxmem // (1024 * 1024)
    if guest.type == "lxc":
        config = {
            "hostname": guest.name,
            "arch": "amd64",
            "ostype": "debian",
            "cores": guest.cpus,
            "memory": memory_mb,
            "swap": 512,
            "rootfs": "local-lvm:vm-%d-disk-0,size=8G" % guest.vmid,
            "net0": "name=eth0,bridge=vmbr0,ip=dhcp,type=veth",
        }
    else:
        # qemu-server: ``memory`` is a property string (``[current=]<MiB>``), so a string.
        config = {
            "name": guest.name,
            "cores": guest.cpus,
            "memory": str(memory_mb),
            "scsi0": "local-lvm:vm-%d-disk-0,size=8G" % guest.vmid,
            "boot": "order=scsi0",
            "net0": "virtio,bridge=vmbr0",
        }
    if guest.hookscript:  # a volume id as set; a path as if copied to local:snippets/<file>
        hook = guest.hookscript
        config["hookscript"] = hook if is_volume_id(hook) else "local:snippets/%s" % os.path.basename(hook)
    if guest.template:
        config["template"] = 1
    if guest.tags:
        config["tags"] = guest.tags
    if guest.lock:
        config["lock"] = guest.lock
    return config
