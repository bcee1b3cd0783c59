"""Verifying a Mach-O file's code signature as ``codesign --verify`` does.

:func:`verify_macho_path` checks a Mach-O file and returns a :class:`~.verification.Verdict`, or
raises a :class:`~.verification.CodeVerificationError` with Apple's sentence and a detail naming
exactly what failed (which page of which architecture, which slot).

Per Mach-O slice it checks every CodeDirectory (primary and alternates): each page hash over the
slice up to the code limit, each special slot (Info.plist, requirements, CodeResources,
entitlements), that no embedded blob is unsealed; then the CMS signature over the signed
attributes' stored bytes and its message digest against the primary CodeDirectory, Apple's CDHash
attributes against every CodeDirectory, the chain from the signer to a trust anchor
(``SIGNBRIDGE_ANCHORS`` / ``TrustAnchors``), certificate validity (an expired certificate passes
only with a timestamp within its validity), and the timestamp itself. It accepts what Apple's
tools write: BER indefinite-length CMS, zero padding, attributes out of DER order, SHA-1 primary
with SHA-256 alternates, stapled tickets. The checks of a signature's parts serve the bundle and
disk-image verifiers too.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..codesig.blobs import CodeSignatureFormatError
from ..codesig.checks import (
    check_pages,
    check_signer,
    check_special_slots,
    check_timestamp,
    check_trust,
    check_unsealed_blobs,
)
from ..codesig.codedirectory import CodeDirectory, page_count
from ..codesig.embedded_signature import EmbeddedSignature, read_signature
from ..codesig.requirements.evaluation import evaluate
from ..codesig.signed_code import macho_format, preferred_slice
from ..codesig.verdicts import (
    LONE_FILE,
    BoundFiles,
    SliceVerdict,
    Verdict,
    VerifyOptions,
    designated_of,
    requirement_context,
)
from ..codesig.verification import MODIFIED, CodeVerificationError, NotSignedError, read_code_file
from .parse import MachO, MachOError, MachOFile, parse_file

if TYPE_CHECKING:
    from concurrent.futures import Executor

def verify_macho_bytes(
    data: bytes,
    options: VerifyOptions,
    *,
    bound: BoundFiles = LONE_FILE,
    executor: Executor | None = None,
) -> tuple[MachOFile, list[SliceVerdict]]:
    """Check every slice of a Mach-O file; raise :class:`CodeVerificationError` on the first failure."""
    try:
        parsed = parse_file(data)
    except MachOError as exc:
        raise CodeVerificationError(MODIFIED, f"the Mach-O file is malformed: {exc}") from None
    signatures: list[tuple[MachO, EmbeddedSignature | None]] = []
    for macho in parsed.slices:
        try:
            signatures.append((macho, read_signature(macho)))
        except (CodeSignatureFormatError, ValueError) as exc:
            raise CodeVerificationError(
                MODIFIED, f"the embedded signature cannot be read: {exc}", architecture=_arch(parsed, macho)
            ) from None
    if all(signature is None for _, signature in signatures):
        raise NotSignedError()
    _check_fat_padding(data, parsed)
    verdicts = []
    for macho, signature in signatures:
        where = _arch(parsed, macho)
        if signature is None:
            raise NotSignedError(f"the {macho.arch} slice has no signature", architecture=where)
        try:
            verdicts.append(_verify_slice(macho, signature, options, bound, executor))
        except CodeVerificationError as error:
            raise error.within(architecture=where) from None
    identifiers = {verdict.directory.identifier for verdict in verdicts}
    if len(identifiers) > 1:
        raise CodeVerificationError(
            MODIFIED, f"the slices are signed with different identifiers: {', '.join(sorted(identifiers))}"
        )
    return parsed, verdicts


def _check_fat_padding(data: bytes, parsed: MachOFile) -> None:
    """Bytes of a universal file outside its slices are zero (nothing else could vouch for them)."""
    if parsed.fat_arches is None:
        return
    entry_size = 32 if parsed.fat64 else 20
    position = 8 + entry_size * len(parsed.fat_arches)
    for arch in sorted(parsed.fat_arches, key=lambda item: item.offset):
        if any(data[position : arch.offset]):
            raise CodeVerificationError(
                MODIFIED,
                f"the padding before the {arch.arch} slice (bytes {position}-{arch.offset - 1}) is not zero",
            )
        position = arch.end
    if any(data[position:]):
        raise CodeVerificationError(MODIFIED, f"{len(data) - position} bytes follow the last slice")


def _arch(parsed: MachOFile, macho: MachO) -> str | None:
    return macho.arch if parsed.is_universal else None


def _verify_slice(
    macho: MachO,
    signature: EmbeddedSignature,
    options: VerifyOptions,
    bound: BoundFiles,
    executor: Executor | None,
) -> SliceVerdict:
    directories = signature.code_directories
    primary = directories[0]
    assert macho.code_signature is not None
    signature_start = macho.code_signature.dataoff
    _check_signature_space(macho, signature)
    trust = None
    timestamp = None
    # The CMS first: when a CodeDirectory was altered, that is what the user should hear.
    parsed_cms = check_signer(signature)
    for directory in directories:
        _check_directory_fields(directory, primary, signature_start)
        check_special_slots(directory, signature, macho.info_plist, bound)
    check_unsealed_blobs(signature, directories)
    if parsed_cms is not None:
        timestamp = check_timestamp(parsed_cms, options)
        trust = check_trust(parsed_cms, options, timestamp)

    code = memoryview(macho.data)[:signature_start]
    for directory in directories:
        check_pages(code, directory, executor)
    return SliceVerdict(macho, signature, parsed_cms, trust, timestamp)


def _check_signature_space(macho: MachO, signature: EmbeddedSignature) -> None:
    """Every byte of the space LC_CODE_SIGNATURE reserves is a blob, the SuperBlob's header and
    index, or zero (alignment between blobs, padding after the SuperBlob); nothing follows it."""
    assert macho.code_signature is not None
    raw = macho.signature_data or b""
    length = int.from_bytes(raw[4:8], "big")
    ranges = [(0, 12 + 8 * len(signature.superblob.entries))]
    for number, (_, blob) in enumerate(signature.superblob.entries):
        offset = int.from_bytes(raw[12 + 8 * number + 4 : 12 + 8 * number + 8], "big")
        ranges.append((offset, offset + len(blob)))
    position = 0
    for start, end in [*sorted(ranges), (len(raw), len(raw))]:
        if start > position and any(raw[position:start]):
            stray = position + next(i for i, byte in enumerate(raw[position:start]) if byte)
            where = "after the embedded signature" if stray >= length else "between its blobs"
            raise CodeVerificationError(
                MODIFIED, f"byte {stray} of the signature space ({where}) is not zero padding"
            )
        position = max(position, end)
    if len(macho.data) > macho.code_signature.end:
        extra = len(macho.data) - macho.code_signature.end
        raise CodeVerificationError(MODIFIED, f"{extra} bytes follow the code signature")


def _check_directory_fields(directory: CodeDirectory, primary: CodeDirectory, signature_start: int) -> None:
    name = directory.hash_type.name.lower()
    if directory.code_limit != signature_start:
        raise CodeVerificationError(
            MODIFIED,
            f"the {name} CodeDirectory covers {directory.code_limit} bytes of code, but the signature "
            f"starts at {signature_start}",
        )
    if directory.page_size and directory.page_size & (directory.page_size - 1):
        raise CodeVerificationError(
            MODIFIED, f"the {name} CodeDirectory's page size {directory.page_size} is invalid"
        )
    expected_pages = page_count(directory.code_limit, directory.page_size)
    if len(directory.code_hashes) != expected_pages:
        raise CodeVerificationError(
            MODIFIED,
            f"the {name} CodeDirectory holds {len(directory.code_hashes)} page hashes "
            f"for {expected_pages} pages",
        )
    if directory is not primary and (
        directory.identifier != primary.identifier
        or directory.team_id != primary.team_id
        or directory.flags != primary.flags
        or directory.code_limit != primary.code_limit
    ):
        raise CodeVerificationError(
            MODIFIED, f"the alternate {name} CodeDirectory disagrees with the primary one"
        )


def verify_macho_path(
    path: Path,
    options: VerifyOptions,
    *,
    bound: BoundFiles = LONE_FILE,
    executor: Executor | None = None,
    format_prefix: str = "",
) -> Verdict:
    """Verify a Mach-O file and evaluate its designated requirement (and ``-R``)."""
    data = read_code_file(path)
    parsed, verdicts = verify_macho_bytes(data, options, bound=bound, executor=executor)
    chosen = preferred_slice(parsed, options.architecture)
    slice_verdict = next(verdict for verdict in verdicts if verdict.macho is chosen)
    info_plist = bound.info_plist if bound.is_bundle else chosen.info_plist
    context = requirement_context(slice_verdict, options, info_plist=info_plist)
    designated = designated_of(slice_verdict.signature, slice_verdict.directory, slice_verdict.trust, options)
    satisfied = evaluate(designated, context)
    explicit = evaluate(options.requirement, context) if options.requirement is not None else None
    return Verdict(
        path=path,
        identifier=slice_verdict.directory.identifier,
        format=format_prefix + macho_format(parsed),
        designated=designated,
        satisfies_designated=satisfied,
        satisfies_requirement=explicit,
        cdhash=slice_verdict.directory.cdhash(),
        slices=tuple(verdicts),
    )
