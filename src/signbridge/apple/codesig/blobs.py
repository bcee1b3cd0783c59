"""Code-signature blobs: the generic {magic, length, payload} blob and the SuperBlob index.

Every field of a code signature is big-endian, whatever the byte order of the Mach-O around it.
A SuperBlob is {magic, length, count, index[count] of {slot, offset}} followed by its blobs; Apple
writes the index sorted by slot and packs the blobs with no padding.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from ...errors import SignbridgeError

BLOB_HEADER_SIZE = 8
SUPERBLOB_HEADER_SIZE = 12
SUPERBLOB_INDEX_ENTRY_SIZE = 8


class CodeSignatureFormatError(SignbridgeError):
    """A code-signature blob is malformed (bad magic, impossible length, index out of bounds)."""


class Magic(enum.IntEnum):
    REQUIREMENT = 0xFADE0C00
    REQUIREMENT_SET = 0xFADE0C01
    CODE_DIRECTORY = 0xFADE0C02
    EMBEDDED_SIGNATURE = 0xFADE0CC0
    EMBEDDED_SIGNATURE_OLD = 0xFADE0B02
    EMBEDDED_ENTITLEMENTS = 0xFADE7171
    EMBEDDED_DER_ENTITLEMENTS = 0xFADE7172
    DETACHED_SIGNATURE = 0xFADE0CC1
    BLOB_WRAPPER = 0xFADE0B01
    EMBEDDED_LAUNCH_CONSTRAINT = 0xFADE8181
    LIBRARY_DEPENDENCY = 0xFADE0C05


class Slot(enum.IntEnum):
    """Slots of the embedded-signature SuperBlob; 1-11 are also the CodeDirectory's special slots."""

    CODE_DIRECTORY = 0
    INFO_PLIST = 1
    REQUIREMENTS = 2
    RESOURCE_DIR = 3
    APPLICATION = 4
    ENTITLEMENTS = 5
    REP_SPECIFIC = 6
    DER_ENTITLEMENTS = 7
    LAUNCH_CONSTRAINT_SELF = 8
    LAUNCH_CONSTRAINT_PARENT = 9
    LAUNCH_CONSTRAINT_RESPONSIBLE = 10
    LIBRARY_CONSTRAINT = 11
    ALTERNATE_CODE_DIRECTORY = 0x1000
    SIGNATURE = 0x10000
    IDENTIFICATION = 0x10001
    TICKET = 0x10002


ALTERNATE_CODE_DIRECTORY_MAX = 5
# Apple's signatures hold a dozen blobs at most (CodeDirectories, requirements, entitlements, launch
# constraints, the CMS, a ticket); a detached signature one per architecture.
MAX_SUPERBLOB_ENTRIES = 64


def magic_name(magic: int) -> str:
    try:
        return Magic(magic).name
    except ValueError:
        return f"0x{magic:08x}"


def slot_name(slot: int) -> str:
    if Slot.ALTERNATE_CODE_DIRECTORY <= slot < Slot.ALTERNATE_CODE_DIRECTORY + ALTERNATE_CODE_DIRECTORY_MAX:
        return f"ALTERNATE_CODE_DIRECTORY_{slot - Slot.ALTERNATE_CODE_DIRECTORY}"
    try:
        return Slot(slot).name
    except ValueError:
        return f"0x{slot:x}"


def encode_blob(magic: int, payload: bytes) -> bytes:
    return struct.pack(">II", magic, BLOB_HEADER_SIZE + len(payload)) + payload


def blob_header(data: bytes | memoryview, offset: int = 0) -> tuple[int, int]:
    """The (magic, length) of the blob at ``offset``, checked to fit in ``data``."""
    if offset < 0 or offset + BLOB_HEADER_SIZE > len(data):
        raise CodeSignatureFormatError(
            f"a code-signature blob at offset {offset} is cut short: {len(data)} bytes are available"
        )
    magic, length = struct.unpack_from(">II", data, offset)
    if length < BLOB_HEADER_SIZE or offset + length > len(data):
        raise CodeSignatureFormatError(
            f"the {magic_name(magic)} blob at offset {offset} claims {length} bytes, "
            f"but {len(data) - offset} are available"
        )
    return magic, length


def decode_blob(data: bytes | memoryview, expected_magic: int | None = None) -> tuple[int, bytes]:
    """(magic, payload) of a blob that starts at the beginning of ``data`` (trailing bytes are ignored)."""
    magic, length = blob_header(data)
    if expected_magic is not None and magic != expected_magic:
        raise CodeSignatureFormatError(
            f"expected a {magic_name(expected_magic)} blob, found magic {magic_name(magic)}"
        )
    return magic, bytes(data[BLOB_HEADER_SIZE:length])


@dataclass(frozen=True)
class SuperBlob:
    """A SuperBlob: its magic and its (slot, blob bytes) entries in index order."""

    magic: int
    entries: tuple[tuple[int, bytes], ...]

    def get(self, slot: int) -> bytes | None:
        for entry_slot, blob in self.entries:
            if entry_slot == slot:
                return blob
        return None

    def slots(self) -> list[int]:
        return [slot for slot, _ in self.entries]

    def encode(self) -> bytes:
        return encode_superblob(self.magic, self.entries)


def encode_superblob(magic: int, entries: Iterable[tuple[int, bytes]]) -> bytes:
    """A SuperBlob with its index sorted by slot and its blobs packed in the same order."""
    ordered = sorted(entries, key=lambda entry: entry[0])
    slots = [slot for slot, _ in ordered]
    if len(set(slots)) != len(slots):
        raise CodeSignatureFormatError(f"a SuperBlob cannot hold two blobs in one slot: {slots}")
    offset = SUPERBLOB_HEADER_SIZE + SUPERBLOB_INDEX_ENTRY_SIZE * len(ordered)
    index = bytearray()
    for slot, blob in ordered:
        index += struct.pack(">II", slot, offset)
        offset += len(blob)
    header = struct.pack(">III", magic, offset, len(ordered))
    return header + bytes(index) + b"".join(blob for _, blob in ordered)


def decode_superblob(data: bytes | memoryview, expected_magic: int | None = None) -> SuperBlob:
    """Parse a SuperBlob that starts at the beginning of ``data``; zero padding after it is ignored."""
    if len(data) < SUPERBLOB_HEADER_SIZE:
        raise CodeSignatureFormatError(
            f"a SuperBlob needs at least {SUPERBLOB_HEADER_SIZE} bytes, {len(data)} are available"
        )
    magic, length = blob_header(data)
    if expected_magic is not None and magic != expected_magic:
        raise CodeSignatureFormatError(
            f"expected a {magic_name(expected_magic)} SuperBlob, found magic {magic_name(magic)}"
        )
    (count,) = struct.unpack_from(">I", data, 8)
    index_end = SUPERBLOB_HEADER_SIZE + SUPERBLOB_INDEX_ENTRY_SIZE * count
    if index_end > length:
        raise CodeSignatureFormatError(
            f"the {magic_name(magic)} SuperBlob lists {count} blobs, more than its {length} bytes can index"
        )
    if count > MAX_SUPERBLOB_ENTRIES:
        raise CodeSignatureFormatError(
            f"the {magic_name(magic)} SuperBlob lists {count} blobs; signatures hold at most {MAX_SUPERBLOB_ENTRIES}"
        )
    view = memoryview(data)[:length]
    located = []
    for number in range(count):
        position = SUPERBLOB_HEADER_SIZE + SUPERBLOB_INDEX_ENTRY_SIZE * number
        slot, offset = struct.unpack_from(">II", view, position)
        if offset < index_end:
            raise CodeSignatureFormatError(
                f"blob {number} ({slot_name(slot)}) of the SuperBlob starts at {offset}, inside the index"
            )
        _, blob_length = blob_header(view, offset)
        located.append((offset, offset + blob_length, number, slot))
    # Each byte belongs to one blob: an index that points twice into the same bytes is not a signature
    # any tool writes (and would make one blob count, and be copied, many times).
    ordered = sorted(located)
    for (_, end, first, _), (start, _, second, _) in zip(ordered, ordered[1:], strict=False):
        if start < end:
            raise CodeSignatureFormatError(f"blobs {first} and {second} of the SuperBlob overlap")
    entries = tuple((slot, bytes(view[start:end])) for start, end, _, slot in located)
    return SuperBlob(magic, entries)
