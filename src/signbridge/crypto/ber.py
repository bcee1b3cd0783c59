"""BER as CMS signatures are stored: values located in the exact stored bytes.

A signature covers the bytes as they were stored, never a re-encoding: :func:`read_tlv` and
:func:`children` find them, :func:`definite` makes indefinite lengths definite without changing
contents or order. :mod:`signbridge.crypto.der_decoding` reads the values found.
"""

from __future__ import annotations

from typing import NamedTuple

from ..errors import SignatureError

MAX_NESTING = 64
NULL = b"\x05\x00"  # the DER of NULL, as algorithm parameters hold it


class BerError(SignatureError):
    """The bytes are not well-formed BER."""


class Tlv(NamedTuple):
    """One value as stored: where its identifier, contents and end are in the data."""

    identifier: bytes
    start: int
    content_start: int
    content_end: int
    end: int
    constructed: bool
    indefinite: bool


def read_tlv(data: bytes, offset: int, limit: int, depth: int) -> Tlv:
    if depth > MAX_NESTING:
        raise BerError("the CMS signature is nested too deeply")
    position = offset
    if position >= limit:
        raise BerError("the CMS signature is truncated")
    first = data[position]
    position += 1
    if first & 0x1F == 0x1F:  # high tag number: base-128 continuation bytes
        while True:
            if position >= limit:
                raise BerError("the CMS signature is truncated")
            position += 1
            if not data[position - 1] & 0x80:
                break
    identifier = data[offset:position]
    constructed = bool(first & 0x20)
    if position >= limit:
        raise BerError("the CMS signature is truncated")
    length_byte = data[position]
    position += 1
    if length_byte == 0x80:
        if not constructed:
            raise BerError("a primitive value in the CMS signature has an indefinite length")
        cursor = position
        while True:
            if cursor + 2 <= limit and data[cursor : cursor + 2] == b"\0\0":
                return Tlv(identifier, offset, position, cursor, cursor + 2, constructed, True)
            cursor = read_tlv(data, cursor, limit, depth + 1).end
    if length_byte & 0x80:
        count = length_byte & 0x7F
        if count > 8 or position + count > limit:
            raise BerError("the CMS signature has an invalid length field")
        length = int.from_bytes(data[position : position + count], "big")
        position += count
    else:
        length = length_byte
    if position + length > limit:
        raise BerError("the CMS signature is truncated")
    return Tlv(identifier, offset, position, position + length, position + length, constructed, False)


def children(data: bytes, tlv: Tlv) -> list[Tlv]:
    if not tlv.constructed:
        raise BerError("the CMS signature has a primitive value where a structure belongs")
    children = []
    cursor = tlv.content_start
    while cursor < tlv.content_end:
        child = read_tlv(data, cursor, tlv.content_end, 1)
        children.append(child)
        cursor = child.end
    return children


def definite(data: bytes, tlv: Tlv, depth: int = 0) -> tuple[bytes, bool]:
    """The value's bytes with indefinite lengths made definite, contents and order unchanged, and
    whether anything had to change (if not, the bytes are exactly the stored ones)."""
    if depth > MAX_NESTING:
        raise BerError("the CMS signature is nested too deeply")
    raw = data[tlv.start : tlv.end]
    if not tlv.constructed:
        return raw, False
    parts = [definite(data, child, depth + 1) for child in children(data, tlv)]
    if not tlv.indefinite and not any(changed for _, changed in parts):
        return raw, False
    return tlv.identifier + encode_tlv(0, b"".join(part for part, _ in parts))[1:], True


def encode_tlv(tag: int, content: bytes) -> bytes:
    """A DER value: ``tag`` (one byte), the definite length, ``content``."""
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content
