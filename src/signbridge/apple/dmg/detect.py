"""Whether a path is a disk image: the one test, without loading the image reader (a command
that is given a Mach-O file decides this first)."""

from __future__ import annotations

import os
from pathlib import Path

TRAILER_SIZE = 512
TRAILER_MAGIC = b"koly"


def looks_like_disk_image(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a file to treat as a UDIF image: its last 512 bytes start with ``koly``,
    or (so a damaged image gets a disk-image error) its name ends in ``.dmg``."""
    target = Path(path)
    try:
        if not target.is_file():
            return False
        if target.suffix.lower() == ".dmg":
            return True
        with target.open("rb") as stream:
            size = stream.seek(0, os.SEEK_END)
            if size < TRAILER_SIZE:
                return False
            stream.seek(size - TRAILER_SIZE)
            return stream.read(4) == TRAILER_MAGIC
    except OSError:
        return False
