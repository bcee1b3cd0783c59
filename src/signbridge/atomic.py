"""Writing files whole or not at all, and the kernel copies that fill them.

Every file signbridge writes is written here the same way: a temporary file in the target's
directory (``mkstemp``: a new name, created private), filled, given its final mode, and renamed
over the target in one step (or exchanged with it); on any failure the temporary file is removed
and the target is as it was. No reader ever sees a half-written file.

- :func:`write_atomically`: bytes at once (settings, keys, records, seals, exports).
- :func:`atomic_output`: a buffered binary stream (packages, archives).
- :func:`atomic_path`: a name for a tool that creates the file itself (``keytool``, ``zipfile``).
- :class:`StagedFile`: positioned writes and kernel copies from an open input (a signed Mach-O
  file, a disk image, a stapled ticket), swapped in by :meth:`StagedFile.commit`.
- :func:`copy_file_data`: a copy in the kernel (``copy_file_range``, whose reflinks share the
  blocks on XFS and btrfs, then ``sendfile``), through Python's memory only where the kernel cannot.
- :func:`exchange_paths` and :func:`replace_directory`: a staged directory swapped into place.
- :func:`release_in_background`: a large replaced file freed by a helper process, not while the
  command waits.

Errors are :class:`OSError` (:class:`StagingError` when no temporary file can be made); callers
say what could not be written in their own terms.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

_BLOCK = 8 * 1024 * 1024
# Why the kernel may refuse a copy: another file system, no support, a descriptor it cannot use.
_NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.ETXTBSY})

StrPath = str | os.PathLike[str]
_log = logging.getLogger(__name__)


class SourceEndedError(OSError):
    """The input file ended before the bytes to copy (it shrank while it was read)."""

    def __init__(self) -> None:
        super().__init__(errno.EIO, "the input file ended early")


class StagingError(OSError):
    """No temporary file can be made beside the target (say, its directory is not writable)."""


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the umask."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _temporary(target: Path, suffix: str, directory: Path | None) -> tuple[int, Path]:
    try:
        descriptor, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=directory or target.parent)
    except OSError as exc:
        raise StagingError(exc.errno, exc.strerror, exc.filename) from None
    return descriptor, Path(name)


def _sync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _put_in_place(temporary: Path, target: Path, *, exclusive: bool) -> bool:
    if not exclusive:
        os.replace(temporary, target)
        return True
    try:
        os.link(temporary, target)
    except FileExistsError:
        return False
    finally:
        temporary.unlink()
    return True


def write_atomically(
    path: StrPath,
    data: bytes,
    *,
    mode: int | None = 0o644,
    fsync: bool = False,
    fsync_directory: bool = False,
    exclusive: bool = False,
    make_parents: bool = False,
    directory: Path | None = None,
    suffix: str = ".tmp",
) -> bool:
    """Write ``data`` to ``path`` whole or not at all.

    ``mode`` is the file's mode whatever the umask (None: a new file's, 0o666 less the umask);
    ``fsync`` flushes the data to disk before the rename, ``fsync_directory`` the rename itself.
    ``exclusive`` links the file into place only where ``path`` does not exist yet (False when it
    did: nothing is written). ``directory`` holds the temporary file when it must not be the
    target's (on the same file system). ``make_parents`` creates the target's directory first.
    """
    target = Path(path)
    content = memoryview(data)
    if make_parents:
        target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = _temporary(target, suffix, directory)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(content)
            stream.flush()
            if fsync:
                os.fsync(stream.fileno())
            os.fchmod(stream.fileno(), new_file_mode() if mode is None else mode)
        written = _put_in_place(temporary, target, exclusive=exclusive)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise
    if fsync_directory:
        _sync_directory(target.parent)
    return written


@contextlib.contextmanager
def atomic_output(path: StrPath, mode: int | None = 0o644, *, suffix: str = ".partial") -> Iterator[BinaryIO]:
    """A buffered binary file that becomes ``path`` when the block ends without error, and
    vanishes otherwise (``mode`` as for :func:`write_atomically`)."""
    target = Path(path)
    descriptor, temporary = _temporary(target, suffix, None)
    try:
        with os.fdopen(descriptor, "wb", buffering=_BLOCK) as out:
            yield out
            out.flush()
            os.fchmod(out.fileno(), new_file_mode() if mode is None else mode)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise


@contextlib.contextmanager
def atomic_path(path: StrPath, mode: int | None = None, *, suffix: str = ".tmp") -> Iterator[Path]:
    """A name beside ``path``, not yet taken, for a tool to create the file under; it becomes
    ``path`` when the block ends without error (given ``mode`` unless None) and is removed otherwise."""
    target = Path(path)
    temporary = target.with_name(f".{target.name}.{os.urandom(8).hex()}{suffix}")
    try:
        yield temporary
        if mode is not None:
            os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise


def copy_file_data(source: int, destination: int, source_offset: int, length: int, offset: int | None = None) -> None:
    """Copy ``length`` bytes of the open file ``source`` from ``source_offset`` into ``destination``
    at ``offset`` (None: at its position, which advances), in the kernel where it can. Raises
    :class:`SourceEndedError` when the input ends first."""
    done = _in_kernel(source, destination, source_offset, length, offset)
    while done < length:
        chunk = os.pread(source, min(2 * _BLOCK, length - done), source_offset + done)
        if not chunk:
            raise SourceEndedError()
        _write_all(destination, memoryview(chunk), None if offset is None else offset + done)
        done += len(chunk)


def _in_kernel(source: int, destination: int, source_offset: int, length: int, offset: int | None) -> int:
    """What the kernel copied (``copy_file_range``, then ``sendfile`` for a positionless copy)."""
    done = 0
    try:
        if not hasattr(os, "copy_file_range"):
            raise OSError(errno.ENOSYS, "no copy_file_range")
        while done < length:
            at = None if offset is None else offset + done
            copied = os.copy_file_range(source, destination, min(length - done, 1 << 30), source_offset + done, at)
            if not copied:
                raise SourceEndedError()
            done += copied
    except OSError as exc:
        if exc.errno not in _NO_KERNEL_COPY or isinstance(exc, SourceEndedError):
            raise
        if offset is not None:
            return done
        try:
            while done < length:
                copied = os.sendfile(destination, source, source_offset + done, min(length - done, 1 << 30))
                if not copied:
                    raise SourceEndedError() from None
                done += copied
        except OSError as error:
            if error.errno not in _NO_KERNEL_COPY or isinstance(error, SourceEndedError):
                raise
    return done


def _write_all(descriptor: int, view: memoryview, offset: int | None) -> None:
    while len(view):
        written = os.write(descriptor, view) if offset is None else os.pwrite(descriptor, view, offset)
        view = view[written:]
        if offset is not None:
            offset += written


class StagedFile:
    """The output, written beside the target and swapped in by :meth:`commit`; what was never
    written reads as zeros. Removed unless committed.

    Why a whole new file, when signing changes only a few KiB (a Mach-O's header and signature, a
    disk image's signature and trailer): the path must name a complete file at every instant,
    the old one or the new one, whenever this process errs or dies. Written into the input in
    place, the changed bytes take several writes (a write that spans pages can be cut short by a
    SIGKILL between them), and nothing can stand in for the old file meanwhile without a second
    copy of its data. So the new file gets every byte and one rename swaps it in. The unchanged
    bytes are moved by :meth:`copy` (``copy_file_range``): on a file system with reflinks (XFS,
    btrfs) the new file shares the input's blocks and nothing is copied (1 GiB in 50 us); on one
    without (ext4) the kernel copies them while the caller hashes, for about as much CPU time as
    SHA-256 of the same bytes takes or more (0.4-1.5 s per GiB on the build machine, against
    0.6-0.75 s). A large replaced file is freed by :func:`release_in_background`, after the
    command has gone on. In place would also rewrite every other hard link to the file, and on macOS a signed binary
    modified in place is killed at launch (the kernel caches its signature by vnode). The new file
    is not fsynced: as for any rename-over, durability across a power loss is the file system's.

    The mode is the target's (0o755 for a new file).
    """

    def __init__(self, target: Path) -> None:
        try:
            status = target.stat()
        except FileNotFoundError:
            self.mode, self.replaces_large_file = 0o755, False
        else:
            self.mode = stat.S_IMODE(status.st_mode)
            self.replaces_large_file = status.st_size >= RELEASE_IN_BACKGROUND
        self.target = target
        self.descriptor, self.path = _temporary(target, ".sb-signing", None)
        self.open = True
        self.committed = False

    def write(self, data: bytes | memoryview, offset: int) -> None:
        _write_all(self.descriptor, memoryview(data), offset)

    def copy(self, source: int, source_offset: int, length: int, offset: int) -> None:
        """Copy ``length`` bytes of the open file ``source`` (in the kernel where it can)."""
        copy_file_data(source, self.descriptor, source_offset, length, offset)

    def commit(self, size: int) -> None:
        """Give the file its final size and mode and put it in the target's place."""
        os.ftruncate(self.descriptor, size)
        os.close(self.descriptor)
        self.open = False
        os.chmod(self.path, self.mode)
        replaced = _hold(self.target) if self.replaces_large_file else None
        try:
            if exchange_paths(self.path, self.target):
                os.unlink(self.path)  # now the old file
            else:
                os.replace(self.path, self.target)
            self.committed = True
        finally:
            if replaced is not None:
                release_in_background(replaced)

    def __enter__(self) -> StagedFile:
        return self

    def __exit__(self, kind: object, error: object, traceback: object) -> None:
        if self.open:
            os.close(self.descriptor)
            self.open = False
        if not self.committed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


# A replaced file at least this large is freed after the command has gone on (see release_in_background).
RELEASE_IN_BACKGROUND = 64 * 1024 * 1024
_releasers: list[int] = []  # helpers not yet reaped
_holding: int | None = None  # our end of the pipe of the helper that holds the last file released


def _hold(path: Path) -> int | None:
    """A descriptor that keeps the file at ``path`` alive once it is replaced (None if it is gone)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None


def release_in_background(descriptor: int) -> None:
    """Close ``descriptor``, a reference to a replaced (unlinked) file, so that the file system
    frees its blocks after this process has gone on, not while it waits.

    Freeing a large file's blocks is slow on some file systems (ext4 mounted with ``discard``:
    0.2-0.3 s per GiB), and it happens in whichever process closes the last descriptor. So a
    helper (``cat``, spawned holding the descriptor, with a pipe on its standard input) keeps a
    reference until this process exits or releases the next file, when the pipe's end closes:
    the helper reads end-of-file, exits, and the kernel frees the blocks in its exit. The file
    has no name by then, so nothing of it is visible meanwhile, and at most one is held at a
    time. Where no helper can be spawned, the descriptor is closed here and the blocks are freed
    as without this function.
    """
    global _holding
    _let_go()
    read_end, write_end = os.pipe()
    try:
        _releasers.append(_spawn_releaser(read_end, descriptor))
        _holding = write_end
    except OSError as exc:  # no helper: the close below frees the blocks here
        _log.debug("freeing a replaced file in this process: %s", exc)
        os.close(write_end)
    finally:
        os.close(read_end)
        os.close(descriptor)


def _spawn_releaser(read_end: int, descriptor: int) -> int:
    os.set_inheritable(descriptor, True)  # the helper keeps it under its own number
    # The helper holds nothing else of this process's: no pipe a caller waits on stays open in it.
    inherited = [
        number
        for number in _open_descriptors()
        if number > 2 and number not in (descriptor, read_end) and _inheritable(number)
    ]
    return os.posix_spawnp(
        "cat",
        ["cat"],
        {"PATH": os.environ.get("PATH", os.defpath)},
        file_actions=[
            (os.POSIX_SPAWN_DUP2, read_end, 0),
            (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
            (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
            *((os.POSIX_SPAWN_CLOSE, number) for number in inherited),
        ],
        setsid=True,
    )


def _open_descriptors() -> list[int]:
    for listing in ("/proc/self/fd", "/dev/fd"):
        with contextlib.suppress(OSError):
            return [int(name) for name in os.listdir(listing)]
    return []


def _inheritable(number: int) -> bool:
    try:
        return os.get_inheritable(number)
    except OSError:  # the listing's own descriptor, closed by now
        return False


def _let_go() -> None:
    """Let the helper of the last file released exit, and reap the helpers that have."""
    global _holding
    if _holding is not None:
        os.close(_holding)
        _holding = None
    for pid in list(_releasers):
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == 0:
                continue
        _releasers.remove(pid)


def replace_directory(staged: Path, original: Path, aside: Path) -> None:
    """Put the directory ``staged`` in ``original``'s place: one exchange where the system has
    it, else ``original`` renamed to ``aside`` (and back if the second rename fails)."""
    if exchange_paths(staged, original):
        return
    os.rename(original, aside)
    try:
        os.rename(staged, original)
    except BaseException:
        os.rename(aside, original)
        raise


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange_paths(first: StrPath, second: StrPath) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); False where the system cannot or ``second``
    does not exist (the caller then renames)."""
    if not sys.platform.startswith("linux") or not os.path.lexists(second):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))
