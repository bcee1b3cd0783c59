"""Verifying whatever code is at a path as ``codesign --verify`` does: a Mach-O file (:mod:`.macho.verify`), a
bundle or an ``.ipa`` (:mod:`.bundle.verify`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .bundle.ipa import is_ipa
from .codesig.verdicts import Verdict, VerifyOptions
from .macho.verify import verify_macho_path

if TYPE_CHECKING:
    from concurrent.futures import Executor


def verify_code(
    path: str | os.PathLike[str],
    options: VerifyOptions | None = None,
    *,
    executor: Executor | None = None,
) -> Verdict:
    """Verify the Mach-O file, bundle or ``.ipa`` at ``path``.

    Returns the :class:`Verdict` for valid code (whose designated and ``-R`` requirements may
    still be unsatisfied); raises :class:`CodeVerificationError` (:class:`NotSignedError` for
    unsigned code), an :class:`~signbridge.apple.bundle.ipa.IpaError` or ``FileNotFoundError``.
    """
    options = options or VerifyOptions()
    target = Path(path)
    if not target.exists() and not target.is_symlink():
        raise FileNotFoundError(2, "No such file or directory", str(target))
    if executor is None:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            return verify_code(target, options, executor=pool)
    if target.is_dir() or is_ipa(target):
        from .bundle.verify import verify_bundle, verify_ipa  # a Mach-O file needs no bundle reader

        verify = verify_bundle if target.is_dir() else verify_ipa
        return verify(target, options, executor=executor)
    return verify_macho_path(target, options, executor=executor)
