"""``pve-janitor hookscript``: hands the hookscript the package carries to whoever installs it.

install.sh (``node`` mode, run from an installed package) and configuration-management
tools ask for the path and copy the file to each Proxmox node's snippets; ``--print``
writes the script itself, for a tool that takes content rather than a path.  The unit and
the example settings lie in the same directory (docs/install-script.md).
"""

from __future__ import annotations

import os
import sys

import click

from .shipped import HOOKSCRIPT


@click.command()
@click.option("--path", "show", flag_value="path", default=True, help="Print the hookscript's path (the default).")
@click.option("--print", "show", flag_value="print", help="Write the hookscript itself to standard output.")
def hookscript(show: str) -> None:
    """The Proxmox hookscript this package carries: its path, or its text.

    The unit (pve-janitor.service) and example settings lie beside it. Exit codes: 0 ok;
    1 the file is missing from the installed package (reinstall it).
    """
    if not HOOKSCRIPT.is_file() or not os.access(HOOKSCRIPT, os.X_OK):
        raise click.ClickException(
            f"the hookscript is missing or not executable at {HOOKSCRIPT}: reinstall pve-janitor"
        )
    if show == "print":
        sys.stdout.buffer.write(HOOKSCRIPT.read_bytes())
        sys.stdout.buffer.flush()
    else:
        click.echo(str(HOOKSCRIPT))
