"""Notarization tickets stapled to bundles.

Apple's stapler copies the ticket the notary service issued for a bundle into
``Contents/CodeResources``: a file at the content root, beside ``_CodeSignature/`` and not inside
it. Apple's resource rules always exclude that path, so stapling leaves the signature intact; and
a new signature makes the ticket stale, since the ticket names the cdhash of the signature it was
issued for.

A ticket starts with the magic ``s8ch`` followed by a little-endian format version.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

TICKET_MAGIC = b"s8ch"
STAPLED_TICKET_NAME = "CodeResources"


def stapled_ticket_path(content_root: Path) -> Path:
    """Where a bundle's stapled ticket lives: ``CodeResources`` in its content root."""
    return content_root / STAPLED_TICKET_NAME


def read_stapled_ticket(content_root: Path) -> bytes | None:
    """The ticket stapled to the bundle whose content root is ``content_root``, or None.

    Only a regular file that starts with the ticket magic counts: old bundles may hold a symbolic
    link called ``CodeResources`` into ``_CodeSignature/``, which is no ticket.
    """
    path = stapled_ticket_path(content_root)
    try:
        if not stat.S_ISREG(path.lstat().st_mode):
            return None
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return data if data.startswith(TICKET_MAGIC) else None


def remove_stapled_ticket(content_root: Path) -> bool:
    """Remove the bundle's stapled ticket; whether there was one."""
    if read_stapled_ticket(content_root) is None:
        return False
    os.unlink(stapled_ticket_path(content_root))
    return True
