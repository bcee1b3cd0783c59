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

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from ..crypto.cms import verify_detached
from ..errors import SignbridgeError
from . import cms
from .blobs import CodeSignatureFormatError, Slot
from .codedirectory import CodeDirectory, CodeDirectoryFlags, HashType, hash_code, page_count
from .embedded_signature import EmbeddedSignature, read_signature
from .macho import MachO, MachOError, MachOFile, parse_file
from .requirements import evaluate
from .signed_code import macho_format, preferred_slice
from .trust import Purpose, TrustResult, evaluate_chain
from .verification import (
    CERT_EXPIRED,
    CERT_NOT_VALID_YET,
    INFO_PLIST_FAILED,
    LONE_FILE,
    MODIFIED,
    NOT_TRUSTED,
    RESOURCE_DIRECTORY_FAILED,
    RESOURCES_NOT_FOUND,
    RESOURCES_NOT_SEALED,
    BoundFiles,
    CodeVerificationError,
    NotSignedError,
    SliceVerdict,
    Verdict,
    VerifyOptions,
    designated_of,
    read_code_file,
    requirement_context,
)

if TYPE_CHECKING:
    from concurrent.futures import Executor

EMBEDDED_SLOTS = (
    Slot.REQUIREMENTS,
    Slot.ENTITLEMENTS,
    Slot.DER_ENTITLEMENTS,
    Slot.LAUNCH_CONSTRAINT_SELF,
    Slot.LAUNCH_CONSTRAINT_PARENT,
    Slot.LAUNCH_CONSTRAINT_RESPONSIBLE,
    Slot.LIBRARY_CONSTRAINT,
)


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


def check_special_slots(
    directory: CodeDirectory, signature: EmbeddedSignature, embedded_info_plist: bytes | None, bound: BoundFiles
) -> None:
    """Slots 1 (Info.plist), 3 (CodeResources) and the blob slots against what they bind."""
    hash_type = directory.hash_type
    name = hash_type.name.lower()
    slots = directory.special_slots

    info_plist = bound.info_plist if bound.is_bundle else embedded_info_plist
    if Slot.INFO_PLIST in slots:
        if info_plist is None:
            raise CodeVerificationError(
                INFO_PLIST_FAILED, "the signature binds an Info.plist, but the code has none"
            )
        if hash_type.digest(info_plist) != slots[Slot.INFO_PLIST]:
            raise CodeVerificationError(
                INFO_PLIST_FAILED,
                f"the Info.plist does not match its hash in the {name} CodeDirectory (slot 1)",
            )
    elif bound.is_bundle and info_plist is not None:
        raise CodeVerificationError(
            INFO_PLIST_FAILED, "the bundle's Info.plist is not bound by the signature"
        )

    if Slot.RESOURCE_DIR in slots:
        if bound.code_resources is None:
            raise CodeVerificationError(
                RESOURCES_NOT_FOUND,
                "the signature seals resources (slot 3), but _CodeSignature/CodeResources is missing",
            )
        if hash_type.digest(bound.code_resources) != slots[Slot.RESOURCE_DIR]:
            raise CodeVerificationError(
                RESOURCE_DIRECTORY_FAILED,
                f"_CodeSignature/CodeResources does not match its hash in the {name} CodeDirectory (slot 3)",
            )
    elif bound.is_bundle and bound.code_resources is not None:
        raise CodeVerificationError(
            RESOURCES_NOT_SEALED, "_CodeSignature/CodeResources is not bound by the signature"
        )

    for slot in EMBEDDED_SLOTS:
        blob = signature.superblob.get(slot)
        wanted = slots.get(slot)
        if wanted is None:
            continue
        label = Slot(slot).name.lower().replace("_", " ")
        if blob is None:
            raise CodeVerificationError(
                MODIFIED,
                f"the {name} CodeDirectory seals the {label} (slot {int(slot)}), but the blob is missing",
            )
        if hash_type.digest(blob) != wanted:
            raise CodeVerificationError(
                MODIFIED,
                f"the {label} blob does not match its hash in the {name} CodeDirectory (slot {int(slot)})",
            )


def check_unsealed_blobs(signature: EmbeddedSignature, directories: Sequence[CodeDirectory]) -> None:
    for slot in EMBEDDED_SLOTS:
        if signature.superblob.get(slot) is None:
            continue
        for directory in directories:
            if slot not in directory.special_slots:
                label = Slot(slot).name.lower().replace("_", " ")
                raise CodeVerificationError(
                    MODIFIED,
                    f"the signature holds a {label} blob that the {directory.hash_type.name.lower()} "
                    "CodeDirectory does not seal",
                )


def check_pages(code: memoryview, directory: CodeDirectory, executor: Executor | None) -> None:
    actual = hash_code(code, directory.hash_type, directory.page_size, executor)
    if actual == list(directory.code_hashes):
        return
    pairs = enumerate(zip(actual, directory.code_hashes, strict=True))
    page = next(index for index, (ours, stored) in pairs if ours != stored)
    size = directory.page_size or len(code)
    start = page * size
    end = min(start + size, len(code)) - 1
    raise CodeVerificationError(
        MODIFIED,
        f"code page {page} (bytes {start}-{end}) does not match its hash in the "
        f"{directory.hash_type.name.lower()} CodeDirectory",
    )


_HASH_TYPE_ALGORITHMS = {
    HashType.SHA1: "sha1",
    HashType.SHA256: "sha256",
    HashType.SHA256_TRUNCATED: "sha256",
    HashType.SHA384: "sha384",
    HashType.SHA512: "sha512",
}


def check_signer(signature: EmbeddedSignature) -> cms.ParsedSignature | None:
    """Ad hoc (no CMS) or signed (a CMS over the CodeDirectories that checks out). It comes first:
    when a CodeDirectory was altered, that is what the user should hear."""
    directories = signature.code_directories
    if directories[0].flags & CodeDirectoryFlags.ADHOC:
        if signature.cms:
            raise CodeVerificationError(MODIFIED, "the signature is marked ad hoc but carries a CMS signature")
        return None
    if not signature.cms:
        raise CodeVerificationError(
            MODIFIED, "the CodeDirectory is not marked ad hoc, but the signature carries no CMS signature"
        )
    return check_cms(signature.cms, directories)


def check_cms(der: bytes, directories: Sequence[CodeDirectory]) -> cms.ParsedSignature:
    primary = directories[0]
    try:
        parsed = cms.parse_signed_data(der)
        verify_detached(parsed, content=primary.blob, content_name="the CodeDirectory")
    except SignbridgeError as exc:
        raise CodeVerificationError(MODIFIED, f"the CMS signature does not check out: {exc}") from None
    if parsed.cdhashes is not None:
        expected = [directory.cdhash() for directory in directories]
        if list(parsed.cdhashes) != expected:
            raise CodeVerificationError(
                MODIFIED,
                "the CDHashes attribute of the CMS signature does not list this signature's CodeDirectories",
            )
    if parsed.cdhashes2 is not None:
        expected2 = sorted((_HASH_TYPE_ALGORITHMS[d.hash_type], d.full_hash()) for d in directories)
        listed = sorted((algorithm.hashlib_name, digest) for algorithm, digest in parsed.cdhashes2)
        if listed != expected2:
            raise CodeVerificationError(
                MODIFIED,
                "the CDHashes2 attribute of the CMS signature does not match the CodeDirectories",
            )
    if len(directories) > 1 and parsed.cdhashes is None and parsed.cdhashes2 is None:
        raise CodeVerificationError(
            MODIFIED, "the CMS signature covers only the primary CodeDirectory; the alternates are unsigned"
        )
    return parsed


def check_timestamp(parsed: cms.ParsedSignature, options: VerifyOptions) -> datetime | None:
    if parsed.timestamp is None:
        return None
    try:
        return cms.check_timestamp(parsed, list(options.anchors) or None)
    except cms.TimestampMismatch as exc:
        if "not valid" in str(exc) and "imprint" not in str(exc):
            raise CodeVerificationError(NOT_TRUSTED, f"the timestamp is not trusted: {exc}") from None
        raise CodeVerificationError(MODIFIED, str(exc)) from None
    except SignbridgeError as exc:
        raise CodeVerificationError(MODIFIED, f"the timestamp does not check out: {exc}") from None


def check_trust(
    parsed: cms.ParsedSignature, options: VerifyOptions, timestamp: datetime | None
) -> TrustResult:
    result = evaluate_chain(
        parsed.signer_certificate,
        parsed.chain,
        options.anchors,
        at=options.at,
        purpose=Purpose.CODE,
        timestamp_time=timestamp,
        apple_roots=options.apple_roots,
        allow_expired=not options.check_expiry,
    )
    if result.ok:
        return result
    problems = "; ".join(result.problems)
    if any(" expired on " in problem for problem in result.problems):
        raise CodeVerificationError(CERT_EXPIRED, problems)
    if any(" is not valid until " in problem for problem in result.problems):
        raise CodeVerificationError(CERT_NOT_VALID_YET, problems)
    raise CodeVerificationError(NOT_TRUSTED, problems)


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
