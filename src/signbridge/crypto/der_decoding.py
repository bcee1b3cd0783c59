"""Reading the universal ASN.1 values signatures and timestamps are made of (X.690).

Values are read where :mod:`signbridge.crypto.ber` located them in the stored bytes: object
identifiers, INTEGERs, OCTET STRINGs (BER's constructed form too), BOOLEANs, UTCTime and
GeneralizedTime, AlgorithmIdentifiers. Anything malformed raises :class:`~signbridge.crypto.ber.BerError`.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from typing import NamedTuple

from .ber import MAX_NESTING, NULL, BerError, Tlv, children, read_tlv

OID = b"\x06"
INTEGER = b"\x02"
OCTET_STRING = b"\x04"
BOOLEAN = b"\x01"
SEQUENCE = b"\x30"
SET = b"\x31"
UTC_TIME = b"\x17"
GENERALIZED_TIME = b"\x18"
# Bounds on what hostile input can make a reader compute or print: a 2.25.<UUID> arc has 19
# octets; serial numbers and nonces have at most 20 (RFC 5280, RFC 3161).
MAX_ARC_OCTETS = 20
MAX_INTEGER_OCTETS = 64

_UTC_TIME = re.compile(rb"(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})?(Z|[+-]\d{4})")
_GENERALIZED_TIME = re.compile(rb"(\d{4})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})(?:[.,](\d+))?(Z|[+-]\d{4})")


class AlgorithmIdentifier(NamedTuple):
    """An algorithm and, when there are any, its parameters as located in the stored bytes."""

    oid: str
    parameters: Tlv | None

    def has_parameters(self, data: bytes) -> bool:
        """Whether parameters other than an absent or NULL value are given."""
        return self.parameters is not None and data[self.parameters.start : self.parameters.end] != NULL


def single_value(der: bytes) -> Tlv:
    """The one value ``der`` holds, nothing before or after it."""
    value = read_tlv(der, 0, len(der), 0)
    if value.end != len(der):
        raise BerError(f"{len(der) - value.end} bytes follow a value")
    return value


def expect(value: Tlv, identifier: bytes, what: str) -> Tlv:
    """``value``, which must have the tag ``identifier``; ``what`` names it in the message."""
    if value.identifier != identifier:
        raise BerError(f"{what} has the tag {value.identifier.hex()}, not {identifier.hex()}")
    return value


def fields(data: bytes, value: Tlv, what: str, minimum: int = 0) -> list[Tlv]:
    """The values inside the SEQUENCE ``value``, at least ``minimum`` of them."""
    found = children(data, expect(value, SEQUENCE, what))
    if len(found) < minimum:
        raise BerError(f"{what} has {len(found)} fields, not at least {minimum}")
    return found


def _primitive(data: bytes, value: Tlv, identifier: bytes, what: str) -> bytes:
    if value.constructed:
        raise BerError(f"{what} is not a primitive value")
    expect(value, identifier, what)
    return data[value.content_start : value.content_end]


def object_identifier(data: bytes, value: Tlv) -> str:
    """The dotted form of the OBJECT IDENTIFIER ``value``."""
    return oid_from_content(_primitive(data, value, OID, "an object identifier"))


def oid_from_content(content: bytes) -> str:
    """The dotted form of an OBJECT IDENTIFIER's contents octets (as code requirements store them)."""
    if not content or content[-1] & 0x80:
        raise BerError("an object identifier is truncated")
    arcs: list[int] = []
    arc = 0
    octets = 0
    for byte in content:
        if octets == 0 and byte == 0x80:
            raise BerError("an object identifier has an arc with a leading zero octet")
        octets += 1
        if octets > MAX_ARC_OCTETS:
            raise BerError(f"an object identifier has an arc longer than {MAX_ARC_OCTETS} octets")
        arc = arc << 7 | byte & 0x7F
        if not byte & 0x80:
            arcs.append(arc)
            arc = 0
            octets = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(number) for number in (first, arcs[0] - 40 * first, *arcs[1:]))


def integer(data: bytes, value: Tlv, identifier: bytes = INTEGER) -> int:
    """The INTEGER ``value``, tagged ``identifier`` when the tag is implicit."""
    content = _primitive(data, value, identifier, "an INTEGER")
    if not content:
        raise BerError("an INTEGER has no content")
    if len(content) > MAX_INTEGER_OCTETS:
        raise BerError(f"an INTEGER is longer than {MAX_INTEGER_OCTETS} octets")
    return int.from_bytes(content, "big", signed=True)


def octet_string(data: bytes, value: Tlv, depth: int = 0) -> bytes:
    """The octets of the OCTET STRING ``value``, joined from its segments when BER splits it."""
    if depth > MAX_NESTING:
        raise BerError("an OCTET STRING is nested too deeply")
    if not value.constructed:
        return _primitive(data, value, OCTET_STRING, "an OCTET STRING")
    expect(value, b"\x24", "an OCTET STRING")
    return b"".join(octet_string(data, segment, depth + 1) for segment in children(data, value))


def boolean(data: bytes, value: Tlv) -> bool:
    content = _primitive(data, value, BOOLEAN, "a BOOLEAN")
    if len(content) != 1:
        raise BerError(f"a BOOLEAN is {len(content)} bytes long, not 1")
    return content != b"\0"


def time_value(data: bytes, value: Tlv) -> datetime:
    """The moment a UTCTime or GeneralizedTime names, in UTC."""
    if value.identifier == UTC_TIME:
        text = _primitive(data, value, UTC_TIME, "a UTCTime")
        match = _UTC_TIME.fullmatch(text)
        if match is None:
            raise BerError(f"{text!r} is not a UTCTime")
        year = int(match[1])
        year += 2000 if year < 50 else 1900
        numbers = (year, *(int(part) for part in match.groups()[1:4]), int(match[5]), int(match[6] or 0))
        fraction, zone = b"", match[7]
    else:
        text = _primitive(data, value, GENERALIZED_TIME, "a time")
        match = _GENERALIZED_TIME.fullmatch(text)
        if match is None:
            raise BerError(f"{text!r} is not a GeneralizedTime")
        numbers = tuple(int(part) for part in match.groups()[:6])
        fraction, zone = match[7] or b"", match[8]
    offset = timedelta(0)
    if zone != b"Z":
        offset = timedelta(hours=int(zone[1:3]), minutes=int(zone[3:5])) * (1 if zone[:1] == b"+" else -1)
    try:
        return datetime(*numbers, int(fraction[:6].ljust(6, b"0")), tzinfo=timezone(offset)).astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise BerError(f"{text!r} is not a valid time ({exc})") from None


def algorithm_identifier(data: bytes, value: Tlv, what: str) -> AlgorithmIdentifier:
    parts = fields(data, value, what, 1)
    if len(parts) > 2:
        raise BerError(f"{what} has {len(parts)} fields, not at most 2")
    return AlgorithmIdentifier(object_identifier(data, parts[0]), parts[1] if len(parts) == 2 else None)
