"""Writing a package safely: a temporary file next to the target, renamed over it only when complete.

Copies of heap data go through the kernel (``copy_file_range``, then ``sendfile``) so that a large
payload costs about what ``cp`` costs and never passes through Python's memory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import TruncatedXarError, XarError

_FALLBACK_ERRORS = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.ETXTBSY}
_BLOCK = 8 * 1024 * 1024


@contextlib.contextmanager
def atomic_output(path: Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """A binary file that becomes ``path`` when the block ends without error, and vanishes otherwise."""
    directory = path.parent
    try:
        fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=directory)
    except OSError as e:
        raise XarError(f"cannot write to {directory}: {e.strerror}") from None
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb", buffering=_BLOCK) as out:
            yield out
            out.flush()
            os.fchmod(out.fileno(), mode)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise


def copy_range(source: BinaryIO, out: BinaryIO, offset: int, count: int, name: str) -> None:
    """Append ``count`` bytes of ``source`` starting at ``offset`` to ``out`` (flushed first)."""
    out.flush()
    src, dst = source.fileno(), out.fileno()
    done = _copy_with(_copy_file_range, src, dst, offset, count, name) if hasattr(os, "copy_file_range") else 0
    if done < count:
        done += _copy_with(_sendfile, src, dst, offset + done, count - done, name)
    if done < count:
        done += _copy_with(_read_write, src, dst, offset + done, count - done, name)
    # os-level writes moved the file position; keep the buffered object in step
    out.seek(0, os.SEEK_END)


def _copy_with(copy, src: int, dst: int, offset: int, count: int, name: str) -> int:  # noqa: ANN001
    done = 0
    while done < count:
        try:
            n = copy(src, dst, offset + done, min(count - done, 1 << 30))
        except OSError as e:
            if e.errno in _FALLBACK_ERRORS and copy is not _read_write:
                return done
            raise XarError(f"cannot copy the data of {name}: {e.strerror}") from None
        if n == 0:
            raise TruncatedXarError(f"{name} became shorter while it was being copied")
        done += n
    return done


def _copy_file_range(src: int, dst: int, offset: int, count: int) -> int:
    return os.copy_file_range(src, dst, count, offset)


def _sendfile(src: int, dst: int, offset: int, count: int) -> int:
    return os.sendfile(dst, src, offset, count)


def _read_write(src: int, dst: int, offset: int, count: int) -> int:
    data = os.pread(src, min(count, _BLOCK), offset)
    if data:
        view = memoryview(data)
        while view:
            view = view[os.write(dst, view) :]
    return len(data)
