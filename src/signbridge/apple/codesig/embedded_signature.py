"""A slice's embedded code signature, read back: the SuperBlob and its parsed parts.

Readers (the verifiers, display) and signers (:mod:`..macho.sign`) both use it; it writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..macho.parse import MachO
from .blobs import (
    ALTERNATE_CODE_DIRECTORY_MAX,
    CodeSignatureFormatError,
    Magic,
    Slot,
    SuperBlob,
    decode_blob,
    decode_superblob,
)
from .codedirectory import CodeDirectory, CodeDirectoryFlags


@dataclass(frozen=True)
class EmbeddedSignature:
    """An embedded signature read back from a slice."""

    superblob: SuperBlob
    code_directories: tuple[CodeDirectory, ...]  # primary first
    requirements: bytes | None
    entitlements: bytes | None
    der_entitlements: bytes | None
    cms: bytes | None  # DER ContentInfo; b"" for an ad-hoc signature's empty wrapper

    @property
    def code_directory(self) -> CodeDirectory:
        return self.code_directories[0]

    @property
    def is_adhoc(self) -> bool:
        return bool(self.code_directory.flags & CodeDirectoryFlags.ADHOC)


def read_signature(macho: MachO) -> EmbeddedSignature | None:
    """The slice's embedded signature, parsed; None when it is unsigned."""
    raw = macho.signature_data
    if raw is None:
        return None
    signature = signature_of(decode_superblob(raw, Magic.EMBEDDED_SIGNATURE))
    if signature is None:
        raise CodeSignatureFormatError("the embedded signature has no CodeDirectory")
    return signature


def signature_of(superblob: SuperBlob) -> EmbeddedSignature | None:
    """The signature a SuperBlob holds (a slice's, a disk image's), its blobs found by slot, never by
    magic; None when it has no CodeDirectory."""
    first = Slot.ALTERNATE_CODE_DIRECTORY
    slots = [Slot.CODE_DIRECTORY, *range(first, first + ALTERNATE_CODE_DIRECTORY_MAX)]
    directories = tuple(CodeDirectory.parse(blob) for slot in slots if (blob := superblob.get(slot)))
    return embedded_signature(superblob, directories) if directories else None


def embedded_signature(superblob: SuperBlob, directories: tuple[CodeDirectory, ...]) -> EmbeddedSignature:
    wrapper = superblob.get(Slot.SIGNATURE)
    return EmbeddedSignature(
        superblob=superblob,
        code_directories=directories,
        requirements=superblob.get(Slot.REQUIREMENTS),
        entitlements=superblob.get(Slot.ENTITLEMENTS),
        der_entitlements=superblob.get(Slot.DER_ENTITLEMENTS),
        cms=decode_blob(wrapper, Magic.BLOB_WRAPPER)[1] if wrapper is not None else None,
    )
