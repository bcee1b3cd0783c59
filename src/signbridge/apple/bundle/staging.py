"""A bundle replaced safely: :func:`staged_bundle` rebuilds the bundle's tree in a hidden directory
beside it (directories and symbolic links made anew, each file a hard link to the original's),
lets the caller sign it there, and on success swaps it into place with one atomic
``renameat2(RENAME_EXCHANGE)`` on Linux (two renames elsewhere); on failure the staged tree is
discarded. Signing never writes into a file: every file it changes (signed Mach-O,
``CodeResources``, detached signature files) is written anew and renamed over its staged name
(:mod:`signbridge.atomic`), which replaces the staged
link and leaves the original's file as it was. So no file data is copied to stage a bundle, and
removing the replaced tree afterwards frees only the files that signing replaced: for 5,000 files
/ 500 MB on the 2-core build machine, copying the files took 1.9-2.4 s and deleting the old copy up
to seconds more on a busy disk; linking them takes a few hundredths of a second. Where the file
system refuses a hard link, that file is copied.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ...atomic import replace_directory
from .layout import Bundle, BundleError

log = logging.getLogger(__name__)


@contextmanager
def staged_bundle(path: Bundle | str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a staged copy of the bundle; replace the original with it if the body succeeds.

    The staged files are hard links to the original's: the body must replace a file it changes
    (write a new one and rename it over the staged name), never write into it. The bundle is
    validated first (:meth:`Bundle.open`; a :class:`Bundle` given is validated already), so bad
    input fails before anything is staged. Stage once, at the outermost bundle, and sign nested
    code inside the staged copy.
    """
    original = (path if isinstance(path, Bundle) else Bundle.open(path)).root
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{original.name}.", suffix=".signing", dir=original.parent))
    except OSError as error:
        raise BundleError(f"cannot make a working copy beside {original.name}: {error.strerror}") from error
    try:
        staged = work / original.name
        try:
            shutil.copytree(original, staged, symlinks=True, copy_function=_link_or_copy)
        except OSError as error:
            raise BundleError(f"cannot make a working copy of {original.name}: {error}") from error
        yield staged
        replace_directory(staged, original, work / f"{original.name}.original")
    finally:
        _remove_quietly(work)


# Why os.link may refuse: a file system without hard links, the file's link count at its maximum,
# or fs.protected_hardlinks for a file the caller does not own.
_NO_LINK_ERRORS = frozenset({errno.EPERM, errno.EACCES, errno.EMLINK, errno.EXDEV, errno.EOPNOTSUPP, errno.ENOTSUP})


def _link_or_copy(source: str, destination: str) -> None:
    """Stage one file: a hard link to the original's data, or a copy where no link can be made."""
    try:
        os.link(source, destination, follow_symlinks=False)
    except OSError as error:
        if error.errno not in _NO_LINK_ERRORS:
            raise
        shutil.copy2(source, destination, follow_symlinks=False)


def _remove_quietly(path: Path) -> None:
    """Remove the staging directory; a failure here must not undo or mask the signing result."""
    if not path.exists():
        return
    try:
        shutil.rmtree(path)
    except OSError as error:
        log.warning("could not remove the staging directory %s: %s", path, error)
