"""BER as CMS signatures are stored: values located in the exact stored bytes.

asn1crypto re-encodes values whose lengths are indefinite, but a signature covers the bytes as they
were stored: :func:`read_tlv` and :func:`children` find them, :func:`definite` makes indefinite
lengths definite without changing contents or order.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SignatureError

MAX_NESTING = 64


class BerError(SignatureError):
    """The bytes are not well-formed BER."""


@dataclass(frozen=True)
class Tlv:
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


def raw_signer_info(der: bytes, top: Tlv) -> list[Tlv]:
    """The fields of the first SignerInfo, located in the stored bytes."""
    content_info = children(der, top)
    if len(content_info) != 2:
        raise BerError("the CMS ContentInfo does not have a content type and a content")
    signed_data = children(der, content_info[1])
    if len(signed_data) != 1:
        raise BerError("the CMS ContentInfo's content is not a single SignedData")
    fields = children(der, signed_data[0])
    signer_infos = children(der, fields[-1])
    if not signer_infos:
        raise BerError("the CMS signature has no signer")
    return children(der, signer_infos[0])


def encode_tlv(tag: int, content: bytes) -> bytes:
    """A DER value: ``tag`` (one byte), the definite length, ``content``."""
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content
