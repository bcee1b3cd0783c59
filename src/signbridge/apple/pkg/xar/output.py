"""Writing a package: the project's atomic output with the package's errors, and its heap copies.

Heap data is copied in one of two ways. Unchecked, through the kernel
(:func:`signbridge.atomic.copy_file_data`), so that a large payload costs about what ``cp`` costs
and never passes through Python's memory. Checked (:func:`copy_checked`), in one pass: each chunk
is read once into a buffer, written out, and hashed by a second thread meanwhile (hashlib and the
system calls release the GIL, so the hash of one chunk overlaps the reading and writing of the next).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from ....atomic import SourceEndedError, StagingError, atomic_output, copy_file_data
from .errors import TruncatedXarError, XarError
from .filedata import StoredChecksum

_CHECKED_CHUNK = 1024 * 1024  # read, hashed and written while it is still in the processor's cache
_CHECKED_BUFFERS = 4  # chunks in flight: one being read and written while the others are hashed


@contextlib.contextmanager
def package_output(path: Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """A binary file that becomes ``path`` when the block ends without error, and vanishes otherwise."""
    try:
        with atomic_output(path, mode) as out:
            yield out
    except StagingError as e:
        raise XarError(f"cannot write to {path.parent}: {e.strerror}") from None


def copy_range(source: BinaryIO, out: BinaryIO, offset: int, count: int, name: str) -> None:
    """Append ``count`` bytes of ``source`` starting at ``offset`` to ``out`` (flushed first)."""
    out.flush()
    try:
        copy_file_data(source.fileno(), out.fileno(), offset, count)
    except SourceEndedError:
        raise TruncatedXarError(f"{name} became shorter while it was being copied") from None
    except OSError as e:
        raise XarError(f"cannot copy the data of {name}: {e.strerror}") from None
    # os-level writes moved the file position; keep the buffered object in step
    out.seek(0, os.SEEK_END)


def copy_checked(
    source: BinaryIO, out: BinaryIO, offset: int, count: int, checks: Sequence[StoredChecksum], name: str
) -> None:
    """:func:`copy_range`, reading every byte once and feeding it to the ``checks`` it belongs to
    (ordered by ``start``, all inside the copied range); each check is verified as soon as its data
    has passed, so a mismatch stops the copy there. Raises the check's
    :class:`~.errors.ChecksumMismatchError`.

    The hashing runs in a second thread, a chunk behind the reading and writing; a chunk's buffer is
    reused only once it has been hashed. (A thread of its own fed through a queue: handing each chunk
    to a ``concurrent.futures`` pool cost more than the overlap gained on a busy machine.)
    """
    out.flush()
    src, dst = source.fileno(), out.fileno()
    hashing = _Hashing(checks)
    buffers = [memoryview(bytearray(_CHECKED_CHUNK)) for _ in range(_CHECKED_BUFFERS)]
    position, end = offset, offset + count
    hashing.start()
    try:
        for number in range(-(-count // _CHECKED_CHUNK)):
            hashing.wait_for_buffer()  # raises what the hashing found
            buffer = buffers[number % _CHECKED_BUFFERS][: min(_CHECKED_CHUNK, end - position)]
            chunk = buffer[: _read_into(src, buffer, position, name)]
            hashing.feed(chunk, position)
            _write_all(dst, chunk, name)
            position += len(chunk)
    finally:
        hashing.finish()
    unchecked = hashing.unfinished()  # data past the copied bytes: a caller's mistake, never let pass
    if unchecked:
        raise XarError(f"{name}: the data of {unchecked[0].path!r} lies outside the bytes copied; it was not checked")
    out.seek(0, os.SEEK_END)


class _Hashing(threading.Thread):
    """The thread that feeds each chunk to the checks it belongs to, in order (hashlib releases the
    GIL while it hashes, so this runs beside the reading and writing)."""

    def __init__(self, checks: Sequence[StoredChecksum]) -> None:
        super().__init__(name="xar-checksums", daemon=True)
        self._waiting = deque(checks)
        self._active: list[StoredChecksum] = []
        self._chunks: queue.SimpleQueue[tuple[memoryview, int] | None] = queue.SimpleQueue()
        self._free = threading.Semaphore(_CHECKED_BUFFERS)
        self._error: BaseException | None = None

    def wait_for_buffer(self) -> None:
        self._free.acquire()
        if self._error is not None:
            raise self._error

    def feed(self, chunk: memoryview, position: int) -> None:
        self._chunks.put((chunk, position))

    def finish(self) -> None:
        """Wait for the chunks fed so far; raise what the hashing found."""
        self._chunks.put(None)
        self.join()
        if self._error is not None:
            raise self._error

    def unfinished(self) -> list[StoredChecksum]:
        return [*self._active, *self._waiting]

    def run(self) -> None:
        while (item := self._chunks.get()) is not None:
            try:
                if self._error is None:
                    self._check(*item)
            except BaseException as error:  # noqa: BLE001 - handed to the copying thread, which raises it
                self._error = error
            finally:
                self._free.release()

    def _check(self, chunk: memoryview, position: int) -> None:
        end = position + len(chunk)
        while self._waiting and self._waiting[0].start < end:
            self._active.append(self._waiting.popleft())
        for check in self._active:
            check.update(chunk, position)
        for check in sorted((check for check in self._active if check.end <= end), key=lambda check: check.end):
            check.verify()  # of files sharing bytes, the one whose data ends first is named
            self._active.remove(check)


def _read_into(src: int, buffer: memoryview, offset: int, name: str) -> int:
    """Fill ``buffer`` from ``offset`` (short reads are retried); the package ending first is an error."""
    done = 0
    while done < len(buffer):
        try:
            n = os.preadv(src, [buffer[done:]], offset + done)
        except OSError as e:
            raise XarError(f"cannot read {name}: {e.strerror}") from None
        if n == 0:
            raise TruncatedXarError(f"{name} became shorter while it was being copied")
        done += n
    return done


def _write_all(dst: int, data: memoryview, name: str) -> None:
    try:
        while data:
            data = data[os.write(dst, data) :]
    except OSError as e:
        raise XarError(f"cannot copy the data of {name}: {e.strerror}") from None
