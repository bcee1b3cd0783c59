"""Files written whole: a staged file swapped in, and a large replaced file freed by a helper
process after the writer has gone on (checked through /proc, not through our own bookkeeping)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from signbridge import atomic
from signbridge.atomic import RELEASE_IN_BACKGROUND, StagedFile


def _holders(inode: int, device: int) -> list[int]:
    """The processes with a descriptor open on the file ``(device, inode)``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and any(_names(fd, inode, device) for fd in _descriptors(entry)):
            found.append(int(entry.name))
    return found


def _descriptors(process: Path) -> list[Path]:
    try:
        return list((process / "fd").iterdir())
    except OSError:  # the process has gone, or is not ours to read
        return []


def _names(descriptor: Path, inode: int, device: int) -> bool:
    try:
        status = descriptor.stat()
    except OSError:  # closed since it was listed
        return False
    return (status.st_ino, status.st_dev) == (inode, device)


def _stage_over(target: Path, data: bytes) -> None:
    with StagedFile(target) as staged:
        staged.write(data, 0)
        staged.commit(len(data))


def test_large_replaced_file_is_freed_by_a_helper_after_the_writer_lets_go(tmp_path: Path) -> None:
    target = tmp_path / "image.dmg"
    target.write_bytes(b"\1" * (RELEASE_IN_BACKGROUND + 4096))
    old = target.stat()
    new = os.urandom(1 << 16)

    _stage_over(target, new)

    assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(new).digest()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["image.dmg"]  # no name left for the old file
    holders = _holders(old.st_ino, old.st_dev)
    assert holders and os.getpid() not in holders  # a helper, not this process, holds the old file
    assert Path(f"/proc/{holders[0]}/cmdline").read_bytes().split(b"\0")[0] == b"cat"

    atomic._let_go()  # what the next release (or this process's exit) does
    deadline = time.monotonic() + 10
    while _holders(old.st_ino, old.st_dev) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _holders(old.st_ino, old.st_dev) == []
    while atomic._releasers and time.monotonic() < deadline:  # the helper may close the file before it exits
        atomic._let_go()
        time.sleep(0.02)
    assert atomic._releasers == []  # the helper was reaped


def test_small_replaced_file_is_freed_here(tmp_path: Path) -> None:
    target = tmp_path / "tool"
    target.write_bytes(b"\1" * 4096)
    target.chmod(0o750)
    old = target.stat()
    spawned = len(atomic._releasers)

    _stage_over(target, b"\2" * 100)

    assert target.read_bytes() == b"\2" * 100
    assert target.stat().st_mode & 0o777 == 0o750
    assert _holders(old.st_ino, old.st_dev) == []
    assert len(atomic._releasers) == spawned
