"""Verifying a disk image's code signature, as ``codesign --verify`` does (``-d``: :mod:`..display`).

:func:`verify_disk_image` checks, in this order: the trailer and where the signature lies, the
SuperBlob, a stapled notarization ticket (its own signature, and that it lists this code), the CMS
over the CodeDirectory, the CodeDirectory's fields, its special slots (the requirements and the
trailer in slot 6), the timestamp and the chain, and last the one hash over the image's data. A
failure raises :class:`~signbridge.apple.codesig.verification.CodeVerificationError` with Apple's sentence and a
detail naming what did not match. An image whose signature holds no CodeDirectory (only a ticket,
as stapler leaves an unsigned image) is "not signed at all".
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography import x509

from ..codesig.blobs import CodeSignatureFormatError, Slot
from ..codesig.checks import (
    EMBEDDED_SLOTS,
    check_signer,
    check_timestamp,
    check_trust,
    check_unsealed_blobs,
)
from ..codesig.codedirectory import CodeDirectory, page_count
from ..codesig.embedded_signature import EmbeddedSignature
from ..codesig.requirements.evaluation import RequirementContext, evaluate
from ..codesig.signed_code import preferred_directory
from ..codesig.verdicts import Verdict, VerifyOptions, designated_of
from ..codesig.verification import MODIFIED, CodeVerificationError, NotSignedError
from ..notary.ticket import Ticket, TicketError, parse_ticket
from .udif import (
    FORMAT,
    DiskImage,
    DiskImageError,
    DiskImageSignature,
    hash_code,
    read_layout,
    read_signature,
)


def _open(path: Path) -> tuple[int, DiskImage]:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CodeVerificationError(MODIFIED, f"{path} cannot be read: {exc.strerror or exc}") from None
    try:
        return descriptor, read_layout(path, descriptor)
    except DiskImageError as exc:
        os.close(descriptor)
        raise CodeVerificationError(MODIFIED, str(exc)) from None


def verify_disk_image(path: str | os.PathLike[str], options: VerifyOptions | None = None) -> Verdict:
    """Verify the disk image at ``path``; the :class:`Verdict` of a valid one, else
    :class:`CodeVerificationError` (:class:`NotSignedError` when unsigned) or ``FileNotFoundError``."""
    options = options or VerifyOptions()
    target = Path(path)
    descriptor, image = _open(target)
    try:
        try:
            read = read_signature(image, descriptor)
        except (CodeSignatureFormatError, ValueError) as exc:
            raise CodeVerificationError(MODIFIED, f"the code signature cannot be read: {exc}") from None
        if read is None or read.signature is None:
            raise NotSignedError()
        signature = read.signature
        _check_signature_space(read)
        directories = signature.code_directories
        primary = directories[0]
        if read.ticket is not None:
            _check_ticket(read.ticket, directories)
        parsed_cms = check_signer(signature)
        for directory in directories:
            _check_directory(directory, primary, image)
            _check_special_slots(directory, signature, image)
        check_unsealed_blobs(signature, directories)
        trust = None
        if parsed_cms is not None:
            timestamp = check_timestamp(parsed_cms, options)
            trust = check_trust(parsed_cms, options, timestamp)
        _check_code(descriptor, image, directories)
    finally:
        os.close(descriptor)

    directory = preferred_directory(directories)
    certificates: tuple[x509.Certificate, ...] = trust.chain if trust is not None else ()
    designated = designated_of(signature, directory, trust, options)
    context = RequirementContext(
        identifier=directory.identifier,
        certificates=certificates,
        trusted=trust.ok if trust is not None else False,
        anchors=tuple(options.anchors),
        cdhashes=frozenset(d.cdhash() for d in directories),
        apple_roots=options.apple_roots,
    )
    return Verdict(
        path=target,
        identifier=directory.identifier,
        format=FORMAT,
        designated=designated,
        satisfies_designated=evaluate(designated, context),
        satisfies_requirement=evaluate(options.requirement, context) if options.requirement is not None else None,
        cdhash=directory.cdhash(),
        slices=(),
    )


def _check_signature_space(read: DiskImageSignature) -> None:
    if any(read.raw[read.superblob_length :]):
        raise CodeVerificationError(
            MODIFIED, "the code signature space holds bytes after its SuperBlob that are not zero padding"
        )


def _check_ticket(data: bytes, directories: tuple[CodeDirectory, ...]) -> Ticket:
    try:
        ticket = parse_ticket(data, "slot 0x10002")
        ticket.verify_signature()
    except TicketError as exc:
        raise CodeVerificationError(MODIFIED, str(exc)) from None
    if not any(ticket.covers(directory.cdhash()) for directory in directories):
        raise CodeVerificationError(
            MODIFIED, "the stapled notarization ticket (slot 0x10002) does not list this image's cdhash"
        )
    return ticket


def _check_directory(directory: CodeDirectory, primary: CodeDirectory, image: DiskImage) -> None:
    name = directory.hash_type.name.lower()
    if directory.code_limit != image.code_limit:
        raise CodeVerificationError(
            MODIFIED,
            f"the {name} CodeDirectory covers {directory.code_limit} bytes, but the signature starts at "
            f"{image.code_limit}",
        )
    if directory.page_size and directory.page_size & (directory.page_size - 1):
        raise CodeVerificationError(MODIFIED, f"the {name} CodeDirectory's page size {directory.page_size} is invalid")
    expected = page_count(directory.code_limit, directory.page_size)
    if len(directory.code_hashes) != expected:
        raise CodeVerificationError(
            MODIFIED, f"the {name} CodeDirectory holds {len(directory.code_hashes)} hashes for {expected} pages"
        )
    if directory is not primary and (
        directory.identifier != primary.identifier
        or directory.team_id != primary.team_id
        or directory.flags != primary.flags
    ):
        raise CodeVerificationError(MODIFIED, f"the alternate {name} CodeDirectory disagrees with the primary one")


def _check_special_slots(directory: CodeDirectory, signature: EmbeddedSignature, image: DiskImage) -> None:
    hash_type = directory.hash_type
    name = hash_type.name.lower()
    slots = directory.special_slots
    if Slot.REP_SPECIFIC not in slots:
        raise CodeVerificationError(MODIFIED, f"the {name} CodeDirectory does not seal the UDIF trailer (slot 6)")
    if hash_type.digest(image.rep_specific()) != slots[Slot.REP_SPECIFIC]:
        raise CodeVerificationError(
            MODIFIED, f"the UDIF trailer does not match its hash in the {name} CodeDirectory (slot 6)"
        )
    for slot in EMBEDDED_SLOTS:
        wanted = slots.get(slot)
        if wanted is None:
            continue
        blob = signature.superblob.get(slot)
        label = Slot(slot).name.lower().replace("_", " ")
        if blob is None or hash_type.digest(blob) != wanted:
            state = "is missing" if blob is None else "does not match its hash"
            raise CodeVerificationError(
                MODIFIED, f"the {label} blob {state} in the {name} CodeDirectory (slot {int(slot)})"
            )


def _check_code(descriptor: int, image: DiskImage, directories: tuple[CodeDirectory, ...]) -> None:
    single = [directory for directory in directories if not directory.page_size]
    actual = hash_code(descriptor, image.code_limit, [directory.hash_type for directory in single])
    for directory, digest in zip(single, actual, strict=True):
        if directory.code_hashes != (digest,):
            raise CodeVerificationError(
                MODIFIED,
                f"the image data (bytes 0-{image.code_limit - 1}) does not match its hash in the "
                f"{directory.hash_type.name.lower()} CodeDirectory",
            )
    if len(single) != len(directories):
        raise CodeVerificationError(MODIFIED, "a disk image's CodeDirectory must hash the image as one page")
