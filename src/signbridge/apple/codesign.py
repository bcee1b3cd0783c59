"""Signing code as Apple's ``codesign -s`` does: Mach-O files (thin or universal), bundles and
``.ipa`` archives.

:func:`sign_code` signs a path with an :class:`~signbridge.crypto.identity.Identity` (or ad hoc when the
identity is None) and replaces it atomically. It builds the one
:class:`~signbridge.apple.codesig.signer.CmsSigner` of the run and hands it down:

- :mod:`.codesig.options`: what the flags mean, the errors, the reporter, the results;
- :mod:`.codesig.signer`: the CMS over the CodeDirectories, the requirement set, the team identifier;
- :mod:`.macho.sign`: a Mach-O file, written beside the input and swapped in, per slice the
  CodeDirectories (SHA-256; SHA-1 first, as the primary, when the deployment target predates
  macOS 10.11.4 or ``--digest-algorithm`` asks), the requirement set, the XML and DER
  entitlements and the CMS;
- :mod:`.bundle.sign`: bundles and ``.ipa`` archives, in a staged copy that replaces the input only
  when every nested piece is signed: nested code innermost first, then
  ``_CodeSignature/CodeResources``, then the main executable with Info.plist in slot 1 and
  CodeResources in slot 3 (or a detached signature when there is none).

On any failure the input is unchanged.
"""

from __future__ import annotations

import os
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path

from ..crypto.identity import Identity
from .bundle.ipa import is_ipa
from .codesig.options import CodesignOptions, QuietReporter, Reporter, SignedCode
from .codesig.signer import CmsSigner
from .macho.sign import MachOJob, sign_macho_file


def sign_code(
    path: str | os.PathLike[str],
    identity: Identity | None,
    options: CodesignOptions,
    reporter: Reporter | None = None,
    *,
    executor: Executor | None = None,
) -> SignedCode:
    """Sign the Mach-O file, bundle or ``.ipa`` at ``path`` in place with ``identity`` (None: ad hoc).

    Raises :class:`~signbridge.apple.codesig.options.AlreadySignedError` when it is signed and
    ``options.force`` is false, ``FileNotFoundError`` when it does not exist, a :class:`~signbridge.apple.macho.parse.MachOError` for
    malformed Mach-O, and other :class:`~signbridge.errors.SignbridgeError` subclasses (token,
    timestamp, bundle layout) with the input unchanged.
    """
    from .bundle.sign import sign_bundle, sign_ipa

    target = Path(path)
    reporter = reporter or QuietReporter()
    if not target.exists() and not target.is_symlink():
        raise FileNotFoundError(2, "No such file or directory", str(target))
    signer = CmsSigner.for_options(identity, options) if identity is not None else None
    own_executor = executor is None
    pool = executor or ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
    try:
        if target.is_dir():
            return sign_bundle(target, signer, options, reporter, executor=pool)
        if is_ipa(target):
            return sign_ipa(target, signer, options, reporter, executor=pool)
        return sign_macho_file(MachOJob(target), signer, options, reporter, executor=pool)
    finally:
        if own_executor:
            pool.shutdown(wait=True)
