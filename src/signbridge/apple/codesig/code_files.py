"""The code's files as the signing engine reads and writes them: the input memory-mapped
(:func:`mapped`), and the output staged beside the target (:func:`staged_code`, a
:class:`~signbridge.atomic.StagedFile`), with the engine's errors.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

from ...atomic import StagedFile, StagingError
from ...errors import SignbridgeError
from .options import CodesignError, UnreadableCodeError


@contextlib.contextmanager
def staged_code(target: Path) -> Iterator[StagedFile]:
    """A :class:`~signbridge.atomic.StagedFile` for ``target`` (see there why a whole new file);
    what cannot be written is an :class:`UnreadableCodeError`."""
    try:
        staged = StagedFile(target)
    except StagingError as exc:
        raise UnreadableCodeError(
            f"cannot write beside {target.name} in {target.parent}: {exc.strerror or exc}"
        ) from None
    with staged:
        try:
            yield staged
        except OSError as error:
            if isinstance(error, FileNotFoundError | SignbridgeError):
                raise
            raise UnreadableCodeError(f"cannot be written: {error.strerror or error}") from error


def read_code(path: Path) -> bytes:
    with mapped(path) as (data, _):
        return bytes(data)


@contextlib.contextmanager
def mapped(path: Path) -> Iterator[tuple[bytes | mmap.mmap, int]]:
    """The file's bytes (memory-mapped, read-only, when it is not empty) and its descriptor."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise
    except IsADirectoryError:
        raise CodesignError("is a directory but not a bundle signbridge can sign") from None
    except OSError as exc:
        raise UnreadableCodeError(f"cannot be read: {exc.strerror or exc}") from None
    try:
        size = os.fstat(descriptor).st_size
        if not size:
            yield b"", descriptor
            return
        try:
            view = mmap.mmap(descriptor, size, prot=mmap.PROT_READ)
        except OSError as exc:
            raise UnreadableCodeError(f"cannot be read: {exc.strerror or exc}") from None
        try:
            yield view, descriptor
        finally:
            # Views into the map may outlive this block (a traceback holds them); the mapping then
            # goes away with the last of them instead of now.
            with contextlib.suppress(BufferError):
                view.close()
    finally:
        os.close(descriptor)
