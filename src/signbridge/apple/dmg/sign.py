"""Signing a disk image as ``codesign -s`` does: one hash over the image, a SuperBlob, a new trailer.

The output is the input's bytes up to its code limit (everything before an existing signature, or
before the trailer), copied in the kernel into a :class:`~signbridge.atomic.StagedFile`
while the same bytes are hashed once, then the SuperBlob (CodeDirectory, requirements, CMS) and the
trailer with its signature fields set; the staged file replaces the input only when it is whole
(why not write the new tail into the input: :class:`~signbridge.atomic.StagedFile`).
A stapled notarization ticket is dropped: it names the old cdhash.
"""

from __future__ import annotations

import os
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ...crypto.identity import Identity
from ..codesig.blobs import CodeSignatureFormatError, Magic, Slot, encode_blob, encode_superblob
from ..codesig.code_files import staged_code
from ..codesig.codedirectory import CodeDirectoryFlags, HashType, build_code_directory
from ..codesig.options import (
    AlreadySignedError,
    CodesignOptions,
    QuietReporter,
    Reporter,
    SignedCode,
    UnreadableCodeError,
    canonical_identifier,
    replacing_note,
)
from ..codesig.requirements.text import render
from ..codesig.signer import CmsSigner, requirement_set
from .udif import FORMAT, DiskImage, hash_code, read_layout, read_signature

TICKET_DROPPED = (
    "warning: the stapled notarization ticket was removed: it does not match the new signature. "
    "Notarize and staple the disk image again."
)


@dataclass(frozen=True)
class SignedDiskImage(SignedCode):
    dropped_ticket: bool = False


def default_identifier(image: DiskImage, options: CodesignOptions, *, adhoc: bool) -> str:
    """``-i``, else the file's canonical name (``--prefix`` before an undotted one); an ad-hoc
    signature appends ``-<SHA-1 of the trailer>`` to an undotted default, as codesign does."""
    if options.identifier:
        return options.identifier
    identifier = canonical_identifier(image.path.name)
    if options.prefix and "." not in identifier:
        identifier = options.prefix + identifier
    if adhoc and "." not in identifier:
        identifier = f"{identifier}-{image.unique_name()}"
    return identifier


def sign_disk_image(
    path: str | os.PathLike[str],
    identity: Identity | None,
    options: CodesignOptions,
    reporter: Reporter | None = None,
    *,
    executor: Executor | None = None,
) -> SignedDiskImage:
    """Sign the disk image at ``path`` in place with ``identity`` (None: ad hoc), atomically.

    Raises :class:`~signbridge.apple.codesig.options.AlreadySignedError` when it carries a signature and
    ``options.force`` is false, :class:`~signbridge.apple.dmg.udif.DiskImageError` when it is not
    a well-formed image, ``FileNotFoundError``, and the token's and TSA's errors; the input is then
    unchanged.
    """
    target = Path(path)
    reporter = reporter or QuietReporter()
    try:
        descriptor = os.open(target, os.O_RDONLY)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise UnreadableCodeError(f"cannot be read: {exc.strerror or exc}") from None
    own_executor = executor is None
    pool = executor or ThreadPoolExecutor(max_workers=1)
    try:
        image = read_layout(target, descriptor)
        try:
            existing = read_signature(image, descriptor)
            state = "signed" if existing is not None and existing.signature is not None else None
            ticket = existing is not None and existing.ticket is not None
        except (CodeSignatureFormatError, ValueError):
            state, ticket = "invalid", False
        if state is not None:
            if not options.force:
                raise AlreadySignedError()
            reporter.note(target, replacing_note(state))
        if ticket:
            reporter.note(target, TICKET_DROPPED)
        signer = CmsSigner.for_options(identity, options) if identity is not None else None
        return _sign(target, descriptor, image, signer, options, reporter, pool, dropped_ticket=ticket)
    finally:
        os.close(descriptor)
        if own_executor:
            pool.shutdown(wait=True)


def _sign(
    target: Path,
    descriptor: int,
    image: DiskImage,
    signer: CmsSigner | None,
    options: CodesignOptions,
    reporter: Reporter,
    executor: Executor,
    *,
    dropped_ticket: bool,
) -> SignedDiskImage:
    identifier = default_identifier(image, options, adhoc=signer is None)
    designated = signer.designated_requirement(identifier) if signer is not None else None
    requirements = requirement_set(signer, identifier)
    flags = options.flags & ~(CodeDirectoryFlags.LINKER_SIGNED | CodeDirectoryFlags.ADHOC)
    if signer is None:
        flags |= CodeDirectoryFlags.ADHOC
    hash_types = options.hash_types or (HashType.SHA256,)
    limit = image.code_limit
    special = {Slot.REQUIREMENTS: requirements, Slot.REP_SPECIFIC: image.rep_specific()}

    with staged_code(target) as staged:
        copy = executor.submit(staged.copy, descriptor, 0, limit, 0) if limit else None
        try:
            with reporter.progress(f"signing {target.name}") as advance:
                digests = hash_code(descriptor, limit, hash_types, advance)
        finally:
            if copy is not None:
                copy.exception()  # the copy writes into the staged file: it must end before that closes
        if copy is not None:
            copy.result()
        directories = [
            build_code_directory(
                None,
                code_hashes=[digest],
                code_limit=limit,
                identifier=identifier,
                hash_type=hash_type,
                flags=int(flags),
                team_id=signer.team_id if signer is not None else None,
                special_slot_data=special,
                page_size=0,
            )
            for hash_type, digest in zip(hash_types, digests, strict=True)
        ]
        cms = signer.sign(directories) if signer is not None else b""
        entries = [(int(Slot.CODE_DIRECTORY), directories[0].encode())]
        entries += [(int(Slot.ALTERNATE_CODE_DIRECTORY) + n, d.encode()) for n, d in enumerate(directories[1:])]
        entries += [(int(Slot.REQUIREMENTS), requirements), (int(Slot.SIGNATURE), encode_blob(Magic.BLOB_WRAPPER, cms))]
        superblob = encode_superblob(Magic.EMBEDDED_SIGNATURE, entries)
        staged.write(superblob, limit)
        staged.write(image.trailer.with_signature(limit, len(superblob)), limit + len(superblob))
        staged.commit(limit + len(superblob) + len(image.trailer.raw))

    primary = directories[0]
    return SignedDiskImage(
        path=target,
        identifier=identifier,
        format=FORMAT,
        cdhash=primary.cdhash(),
        requirement=render(designated) if designated is not None else None,
        dropped_ticket=dropped_ticket,
    )
