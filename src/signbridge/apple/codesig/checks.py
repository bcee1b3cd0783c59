"""The checks every embedded signature passes, whatever it signs (a Mach-O slice, a bundle's
detached signature, a disk image): the special slots against what they bind, blobs outside the
CodeDirectory, page hashes, the CMS over the CodeDirectories, the timestamp and the chain."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from ...crypto.cms import verify_detached
from ...errors import SignbridgeError
from ..trust import Purpose, TrustResult, evaluate_chain
from . import cms
from .blobs import Slot
from .codedirectory import CodeDirectory, CodeDirectoryFlags, HashType, hash_code
from .embedded_signature import EmbeddedSignature
from .verdicts import BoundFiles, VerifyOptions
from .verification import (
    CERT_EXPIRED,
    CERT_NOT_VALID_YET,
    INFO_PLIST_FAILED,
    MODIFIED,
    NOT_TRUSTED,
    RESOURCE_DIRECTORY_FAILED,
    RESOURCES_NOT_FOUND,
    RESOURCES_NOT_SEALED,
    CodeVerificationError,
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


