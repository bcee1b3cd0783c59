"""DER encodings of the ASN.1 values signbridge writes (X.690): object identifiers, integers, octet
strings, times, sequences and sets.

Signatures are built from these directly: every value signbridge signs or stores has one DER
encoding, and building it needs no schema library.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime

from .ber import encode_tlv


@functools.cache
def encode_oid(dotted: str) -> bytes:
    """An OBJECT IDENTIFIER from its dotted form, e.g. ``1.2.840.113549.1.7.2``."""
    return encode_tlv(0x06, oid_content(dotted))


def oid_content(dotted: str) -> bytes:
    """The contents octets of an OBJECT IDENTIFIER (without tag and length), as code requirements
    also store them."""
    try:
        arcs = [int(arc) for arc in dotted.split(".")]
    except ValueError:
        raise ValueError(f"{dotted!r} is not an object identifier") from None
    if len(arcs) < 2 or arcs[0] > 2 or (arcs[0] < 2 and arcs[1] >= 40) or min(arcs) < 0:
        raise ValueError(f"{dotted!r} is not an object identifier")
    content = bytearray()
    for arc in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        groups = [arc & 0x7F]
        arc >>= 7
        while arc:
            groups.append(0x80 | (arc & 0x7F))
            arc >>= 7
        content += bytes(reversed(groups))
    return bytes(content)


def encode_integer(value: int) -> bytes:
    """A non-negative INTEGER, in the fewest octets (a leading zero octet keeps it positive)."""
    if value < 0:
        raise ValueError("only non-negative integers are encoded")
    return encode_tlv(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def encode_octet_string(data: bytes) -> bytes:
    return encode_tlv(0x04, bytes(data))


def encode_time(when: datetime) -> bytes:
    """A time as RFC 5280 §4.1.2.5 and RFC 5652 §11.3 write it: UTCTime through 2049,
    GeneralizedTime from 2050, in whole seconds of UTC."""
    when = (when if when.tzinfo else when.replace(tzinfo=UTC)).astimezone(UTC)
    if 1950 <= when.year < 2050:
        return encode_tlv(0x17, when.strftime("%y%m%d%H%M%SZ").encode("ascii"))
    return encode_tlv(0x18, f"{when.year:04d}{when.strftime('%m%d%H%M%S')}Z".encode("ascii"))


def encode_sequence(*encodings: bytes) -> bytes:
    return encode_tlv(0x30, b"".join(encodings))


def encode_set_of(encodings: list[bytes]) -> bytes:
    """A SET OF, its elements in ascending order of their encodings (X.690 §11.6)."""
    return encode_tlv(0x31, b"".join(sorted(encodings)))
