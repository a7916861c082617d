"""The files the package carries besides its code, in ``receiver/data/``.

The hookscript (for the Proxmox nodes), the receiver's systemd unit and example settings
(the env file, the TOML file, the hookscript's ``hook.conf``) travel in the wheel, so
that an installed package holds the whole product: install.sh and configuration-management
tools find them through ``pve-janitor hookscript --path``.  In a checkout
``data/pve-janitor-hook`` is a link to ``hookscript/pve-janitor-hook``, the one copy that
is edited; the wheel holds the file itself.
"""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
HOOKSCRIPT = DATA_DIR / "pve-janitor-hook"
UNIT = DATA_DIR / "pve-janitor.service"
EXAMPLES = (
    DATA_DIR / "janitor.env.example",
    DATA_DIR / "janitor.toml.example",
    DATA_DIR / "hook.conf.example",
)
