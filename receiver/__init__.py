"""pve-janitor: keeps an app platform's database true to a Proxmox VE cluster."""

__version__ = "0.1.0"
