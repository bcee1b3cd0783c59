"""The UDIF trailer (``koly``, the file's last 512 bytes, big-endian) and the code signature it points at.

Trailer fields this module uses (offsets in the trailer)::

      0  magic "koly"          4  version (4)           8  header size (512)
     24  data fork offset     32  data fork length
     40  resource fork offset 48  resource fork length
    216  plist offset        224  plist length
    296  code signature offset (u64)    304  code signature length (u64)

The code signature covers every byte before it as one hash, and its RepSpecific special slot (6)
binds the trailer as it reads with the signature length zeroed (the offset kept). An unsigned
image has length 0; what it would be signed over ends where the trailer starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import SignbridgeError
from ..codesig.blobs import (
    Magic,
    Slot,
    decode_blob,
    decode_superblob,
)
from ..codesig.codedirectory import HashType
from ..codesig.embedded_signature import EmbeddedSignature, signature_of
from .detect import TRAILER_MAGIC, TRAILER_SIZE

FORMAT = "disk image"
_SIGNATURE_OFFSET_FIELD = 296
_HASH_CHUNK = 64 << 20  # bytes per hashlib call: progress steps, each one GIL-free pass


class DiskImageError(SignbridgeError):
    """The file is not a well-formed UDIF image (no trailer, or fields pointing outside the file)."""


@dataclass(frozen=True)
class Trailer:
    """The ``koly`` trailer: its bytes and the fields that locate the image's parts."""

    raw: bytes = field(repr=False)
    version: int
    data_fork_offset: int
    data_fork_length: int
    resource_fork_offset: int
    resource_fork_length: int
    plist_offset: int
    plist_length: int
    signature_offset: int
    signature_length: int

    @classmethod
    def parse(cls, raw: bytes) -> Trailer:
        if len(raw) != TRAILER_SIZE or raw[:4] != TRAILER_MAGIC:
            raise DiskImageError("the file does not end with a UDIF trailer (koly)")
        version, header_size = struct.unpack_from(">II", raw, 4)
        if header_size != TRAILER_SIZE:
            raise DiskImageError(f"the UDIF trailer gives its size as {header_size} bytes, not {TRAILER_SIZE}")
        data_offset, data_length, resource_offset, resource_length = struct.unpack_from(">QQQQ", raw, 24)
        plist_offset, plist_length = struct.unpack_from(">QQ", raw, 216)
        signature_offset, signature_length = struct.unpack_from(
            ">QQ", raw, _SIGNATURE_OFFSET_FIELD
        )
        return cls(
            raw, version, data_offset, data_length, resource_offset, resource_length,
            plist_offset, plist_length, signature_offset, signature_length,
        )  # fmt: skip

    @property
    def data_end(self) -> int:
        """Where the image's own parts (data fork, resource fork, plist) end."""
        return max(
            self.data_fork_offset + self.data_fork_length,
            self.resource_fork_offset + self.resource_fork_length,
            self.plist_offset + self.plist_length,
        )

    def with_signature(self, offset: int, length: int) -> bytes:
        """The trailer's bytes with its code-signature fields set to ``offset`` and ``length``."""
        raw = bytearray(self.raw)
        struct.pack_into(">QQ", raw, _SIGNATURE_OFFSET_FIELD, offset, length)
        return bytes(raw)


@dataclass(frozen=True)
class DiskImage:
    """A UDIF image's layout: its size, trailer, and where its code signature lies."""

    path: Path
    size: int
    trailer: Trailer

    @property
    def trailer_offset(self) -> int:
        return self.size - TRAILER_SIZE

    @property
    def has_signature(self) -> bool:
        return self.trailer.signature_length > 0

    @property
    def code_limit(self) -> int:
        """The bytes a signature covers: everything before the existing signature, or before the
        trailer when there is none. Re-signing keeps exactly these bytes."""
        return self.trailer.signature_offset if self.has_signature else self.trailer_offset

    def rep_specific(self) -> bytes:
        """What special slot 6 hashes: the trailer with the signature length zeroed, the offset at
        the signature (where a new one goes)."""
        return self.trailer.with_signature(self.code_limit, 0)

    def unique_name(self) -> str:
        """The hex codesign appends to an ad-hoc image's identifier: the SHA-1 of :meth:`rep_specific`."""
        return hashlib.sha1(self.rep_specific()).hexdigest()  # noqa: S324 - Apple's naming, not security


def read_layout(path: Path, descriptor: int) -> DiskImage:
    """Read and check the trailer of the open image: its parts and its signature lie inside the
    file, in order, and the signature ends where the trailer starts."""
    size = os.fstat(descriptor).st_size
    if size < TRAILER_SIZE:
        raise DiskImageError(
            f"the file is {size} bytes, too short to end with a {TRAILER_SIZE}-byte UDIF trailer"
        )
    raw = os.pread(descriptor, TRAILER_SIZE, size - TRAILER_SIZE)
    if raw[:4] != TRAILER_MAGIC:
        found = os.pread(descriptor, 2 * TRAILER_SIZE, max(0, size - 2 * TRAILER_SIZE)).rfind(TRAILER_MAGIC)
        if found >= 0:
            missing = TRAILER_SIZE - (min(size, 2 * TRAILER_SIZE) - found)
            raise DiskImageError(f"the UDIF trailer is cut short: {missing} of its {TRAILER_SIZE} bytes are missing")
        raise DiskImageError("the file does not end with a UDIF trailer (koly): it is not a disk image")
    image = DiskImage(path, size, Trailer.parse(raw))
    trailer = image.trailer
    if trailer.data_end > image.trailer_offset:
        raise DiskImageError(
            f"the UDIF trailer places the image data up to byte {trailer.data_end}, "
            f"past the trailer at {image.trailer_offset}"
        )
    if image.has_signature:
        start, end = trailer.signature_offset, trailer.signature_offset + trailer.signature_length
        if end > image.trailer_offset:
            raise DiskImageError(
                f"the code signature (offset {start}, {trailer.signature_length} bytes) runs past the "
                f"trailer at {image.trailer_offset}"
            )
        if start < trailer.data_end:
            raise DiskImageError(
                f"the code signature at offset {start} overlaps the image data, which ends at {trailer.data_end}"
            )
        if end != image.trailer_offset:
            raise DiskImageError(
                f"{image.trailer_offset - end} bytes lie between the code signature and the trailer"
            )
    return image


@dataclass(frozen=True)
class DiskImageSignature:
    """The image's SuperBlob read by slot: its signature (None when it holds no CodeDirectory) and
    the stapled notarization ticket (the payload of the BlobWrapper in slot 0x10002)."""

    signature: EmbeddedSignature | None
    ticket: bytes | None
    superblob_length: int
    raw: bytes = field(repr=False)


def read_signature(image: DiskImage, descriptor: int) -> DiskImageSignature | None:
    """The image's code signature, parsed; None when it has none. Raises
    :class:`~signbridge.apple.codesig.blobs.CodeSignatureFormatError` when it cannot be read."""
    if not image.has_signature:
        return None
    raw = os.pread(descriptor, image.trailer.signature_length, image.trailer.signature_offset)
    superblob = decode_superblob(raw, Magic.EMBEDDED_SIGNATURE)
    ticket_blob = superblob.get(Slot.TICKET)
    ticket = decode_blob(ticket_blob, Magic.BLOB_WRAPPER)[1] if ticket_blob is not None else None
    signature = signature_of(superblob)
    length = int.from_bytes(raw[4:8], "big")
    return DiskImageSignature(signature, ticket, length, raw)



def hash_code(
    descriptor: int,
    limit: int,
    hash_types: Sequence[HashType],
    progress: Callable[[int, int], None] | None = None,
) -> list[bytes]:
    """One digest per hash type of the file's first ``limit`` bytes (the image's single code
    "page"), read through a memory map: the bytes go from the page cache to hashlib uncopied."""
    hashers = [hashlib.new(hash_type.hashlib_name) for hash_type in hash_types]
    if limit:
        with mmap.mmap(descriptor, limit, prot=mmap.PROT_READ) as mapping:
            view = memoryview(mapping)
            try:
                for start in range(0, limit, _HASH_CHUNK):
                    chunk = view[start : min(start + _HASH_CHUNK, limit)]
                    for hasher in hashers:
                        hasher.update(chunk)
                    chunk.release()
                    if progress is not None:
                        progress(min(start + _HASH_CHUNK, limit), limit)
            finally:
                with contextlib.suppress(BufferError):
                    view.release()
    return [hasher.digest()[: hash_type.size] for hasher, hash_type in zip(hashers, hash_types, strict=True)]
