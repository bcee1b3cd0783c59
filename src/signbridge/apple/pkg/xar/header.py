"""The xar header: 28 big-endian bytes at the start of every flat package.

Layout (Apple's ``xar.h``, ``#pragma pack(4)``)::

    0  magic                    u32  'xar!'
    4  size                     u16  header size, 28
    6  version                  u16  1
    8  toc_length_compressed    u64
    16 toc_length_uncompressed  u64
    24 cksum_alg                u32  TOC checksum algorithm

Algorithm numbers are Apple's: 0 none, 1 SHA-1, 2 MD5, 3 SHA-256, 4 SHA-512. The open-source
xar 1.6 line (mackyle/xar) instead uses 3 for "other" and stores the algorithm's name,
NUL-terminated, in bytes 28..63 of a longer header; both readings are accepted. signbridge writes
Apple's 28-byte form.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import (
    InvalidNumberError,
    NotXarError,
    TruncatedXarError,
    UnsupportedChecksumError,
    XarFormatError,
)

MAGIC = b"xar!"
HEADER_SIZE = 28
VERSION = 1
MAX_INT = 2**63 - 1  # larger lengths cannot be file offsets (off_t)

_STRUCT = struct.Struct(">4sHHQQI")

# Apple's numbering (xar-503 xar.h.in).
CHECKSUM_NUMBERS = {"none": 0, "sha1": 1, "md5": 2, "sha256": 3, "sha512": 4}
_CHECKSUM_NAMES = {number: name for name, number in CHECKSUM_NUMBERS.items()}
_OTHER = 3
_NAME_FIELD = 36  # mackyle/xar xar_header_ex: char toc_cksum_name[36]


@dataclass(frozen=True)
class XarHeader:
    size: int
    version: int
    toc_length_compressed: int
    toc_length_uncompressed: int
    checksum_number: int
    checksum_name: str  # "none", "sha1", "md5", "sha256", "sha512"

    def pack(self) -> bytes:
        return pack_header(self.toc_length_compressed, self.toc_length_uncompressed, self.checksum_name)


def pack_header(toc_length_compressed: int, toc_length_uncompressed: int, checksum_name: str) -> bytes:
    """Apple's 28-byte header for a TOC of these lengths and checksum algorithm."""
    number = CHECKSUM_NUMBERS.get(checksum_name)
    if number is None:
        raise UnsupportedChecksumError(f"xar has no header value for the TOC checksum {checksum_name!r}")
    return _STRUCT.pack(MAGIC, HEADER_SIZE, VERSION, toc_length_compressed, toc_length_uncompressed, number)


def declared_header_size(start: bytes) -> int:
    """The header size a file's first bytes declare (0 if they are not a xar header)."""
    if start[:4] != MAGIC or len(start) < 6:
        return 0
    return struct.unpack_from(">H", start, 4)[0]


def parse_header(data: bytes, name: str) -> XarHeader:
    """Decode the header from the first bytes of a file (all of them up to the header's size).

    ``name`` is how the file is called in error messages.
    """
    if data[:4] != MAGIC:
        raise NotXarError(f"{name} is not a flat package (xar archive): it does not start with 'xar!'")
    if len(data) < HEADER_SIZE:
        raise TruncatedXarError(f"{name} ends inside its xar header ({len(data)} of {HEADER_SIZE} bytes)")
    _, size, version, compressed, uncompressed, number = _STRUCT.unpack_from(data)
    if size < HEADER_SIZE:
        raise XarFormatError(f"{name}: the xar header claims to be {size} bytes long; it is at least {HEADER_SIZE}")
    if version != VERSION:
        raise XarFormatError(f"{name}: xar version {version} is not supported (only version {VERSION} exists)")
    for what, value in (("compressed", compressed), ("uncompressed", uncompressed)):
        if value > MAX_INT:
            raise InvalidNumberError(f"{name}: the header's {what} TOC length {value} is impossibly large")
    if compressed == 0:
        raise XarFormatError(f"{name}: the xar header gives an empty table of contents")
    if len(data) < size:
        raise TruncatedXarError(f"{name} ends inside its xar header ({len(data)} of {size} bytes)")
    return XarHeader(size, version, compressed, uncompressed, number, _checksum_name(data, size, number, name))


def _checksum_name(data: bytes, size: int, number: int, name: str) -> str:
    if number == _OTHER and size > HEADER_SIZE:
        field = data[HEADER_SIZE : min(size, HEADER_SIZE + _NAME_FIELD)]
        text, nul, _ = field.partition(b"\0")
        if not nul or not text or size % 4:
            raise XarFormatError(f"{name}: the extended xar header does not hold a checksum algorithm name")
        algorithm = text.decode("ascii", errors="replace").lower()
        if algorithm not in CHECKSUM_NUMBERS or algorithm == "none":
            raise UnsupportedChecksumError(f"{name} uses the TOC checksum {algorithm!r}, which signbridge cannot check")
        return algorithm
    algorithm = _CHECKSUM_NAMES.get(number)
    if algorithm is None:
        raise UnsupportedChecksumError(f"{name}: unknown TOC checksum algorithm number {number} in the xar header")
    return algorithm
