"""Hashing the files a resource seal covers: every file is read once for all its digests, on one
pool thread per core (hashlib releases the GIL); a signer may start hashing a bundle's files on a
thread of its own before the seal is built (:class:`DigestCache`).
"""

from __future__ import annotations

import collections
import hashlib
import os
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor, wait
from pathlib import Path

from ...codesig.codedirectory import HashType
from .rules import UnreadableFileError

READ_CHUNK = 1 << 20

Progress = Callable[[int, int], None]

FileIdentity = tuple[int, int, int, int, int]
FilePath = str | Path  # a Path, or a str where thousands are made (building Paths costs more)


def hash_file(
    path: FilePath, hash_types: Sequence[HashType], buffer: bytearray | None = None
) -> dict[HashType, bytes]:
    """Digests of one file, read once, into ``buffer`` when given (a thread hashing many files
    reuses one)."""
    return _hash_identified(path, hash_types, buffer)[1]


def _identity(status: os.stat_result) -> FileIdentity:
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns


def _hash_identified(
    path: FilePath, hash_types: Sequence[HashType], buffer: bytearray | None
) -> tuple[FileIdentity, dict[HashType, bytes]]:
    """The file's digests and the identity of the file they are of, taken before it was read."""
    hashers = {hash_type: hashlib.new(hash_type.hashlib_name) for hash_type in hash_types}
    view = memoryview(buffer if buffer is not None else bytearray(READ_CHUNK))
    try:
        with open(path, "rb", buffering=0) as stream:
            identity = _identity(os.fstat(stream.fileno()))
            while count := stream.readinto(view):
                chunk = view[:count]
                for hasher in hashers.values():
                    hasher.update(chunk)
    except OSError as error:
        raise UnreadableFileError(f"cannot read {path}: {error.strerror}") from error
    return identity, {hash_type: hasher.digest()[: hash_type.size] for hash_type, hasher in hashers.items()}


class DigestCache:
    """Digests of files hashed ahead of time on a thread of their own (while this one signs
    nested code), for :func:`hash_files` to take instead of reading the files again.

    An entry is taken only while its file is the one hashed: same device, inode, size,
    modification and change time. Signing writes a changed file anew and renames it into place,
    so a file signed since it was hashed is a new inode and is hashed again.
    """

    def __init__(self) -> None:
        self._found: dict[FilePath, tuple[FileIdentity, dict[HashType, bytes]]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, paths: Sequence[FilePath], hash_types: Sequence[HashType]) -> None:
        """Hash ``paths`` in order on a new thread until all are done or :meth:`finish` is called."""

        def run() -> None:
            buffer = bytearray(READ_CHUNK)
            for path in paths:
                if self._stop.is_set():
                    return
                try:
                    self._found[path] = _hash_identified(path, hash_types, buffer)
                except UnreadableFileError:
                    continue  # not cached: hash_files reads it again and reports the error
        self._thread = threading.Thread(target=run, name="seal digests", daemon=True)
        self._thread.start()

    def finish(self, *, stop: bool = True) -> None:
        """Return when the thread has let go of the files: at once (``stop``, what is not hashed
        yet stays so) or when it has hashed all of them."""
        if stop:
            self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def take(self, path: FilePath, hash_types: Sequence[HashType]) -> dict[HashType, bytes] | None:
        """The digests of ``path`` as it is now, when they were computed ahead; else None."""
        entry = self._found.pop(path, None)
        if entry is None:
            return None
        identity, digests = entry
        try:
            current = _identity(os.lstat(path))
        except OSError:
            return None
        if current != identity or any(hash_type not in digests for hash_type in hash_types):
            return None
        return digests


def hash_files(
    paths: Sequence[FilePath],
    hash_types: Sequence[HashType],
    *,
    executor: Executor | None = None,
    progress: Progress | None = None,
    cache: DigestCache | None = None,
) -> dict[FilePath, dict[HashType, bytes]]:
    """Digests of many files, each read once for all of them, on one thread per core of the pool;
    ``progress(done, total)`` after each file. Digests ``cache`` computed ahead are taken first."""
    known: dict[FilePath, dict[HashType, bytes]] = {}
    if cache is not None:
        cache.finish()
        for path in paths:
            if (digests := cache.take(path, hash_types)) is not None:
                known[path] = digests
    if not known:
        missing, advance = paths, progress
    else:
        missing = [path for path in paths if path not in known]

        def advance(done: int, _: int) -> None:
            if progress is not None:
                progress(done + len(known), len(paths))

    if executor is None:
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            hashed = _hash_in(pool, missing, hash_types, advance)
    else:
        hashed = _hash_in(executor, missing, hash_types, advance)
    return {path: known[path] if path in known else hashed[path] for path in paths} if known else hashed


def _hash_in(
    executor: Executor, paths: Sequence[FilePath], hash_types: Sequence[HashType], progress: Progress | None
) -> dict[FilePath, dict[HashType, bytes]]:
    """One task per core takes the next file until none is left (a task per file cost more in
    the pool's bookkeeping than hashing a small file); this thread collects the results."""
    total = len(paths)
    if progress is not None:
        progress(0, total)
    pending = collections.deque(enumerate(paths))
    finished: queue.SimpleQueue[tuple[int, dict[HashType, bytes] | BaseException]] = queue.SimpleQueue()
    stop = threading.Event()

    def work() -> None:
        buffer = bytearray(READ_CHUNK)
        while not stop.is_set():
            try:
                index, path = pending.popleft()
            except IndexError:
                return
            try:
                finished.put((index, hash_file(path, hash_types, buffer)))
            except BaseException as error:
                finished.put((index, error))  # for this thread to raise
                raise

    workers = [executor.submit(work) for _ in range(min(os.cpu_count() or 1, total))]
    results: list[dict[HashType, bytes]] = [{} for _ in paths]
    try:
        for done in range(1, total + 1):
            index, outcome = finished.get()
            if isinstance(outcome, BaseException):
                raise outcome
            results[index] = outcome
            if progress is not None:
                progress(done, total)
    finally:
        stop.set()
        wait(workers)  # no thread reads the files once this returns
    return dict(zip(paths, results, strict=True))
