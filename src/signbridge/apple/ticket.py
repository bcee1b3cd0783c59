"""Notarization tickets as ``stapler`` attaches them (to disk images in SuperBlob slot 0x10002).

A ticket is little-endian::

    "s8ch" | version (1) | certificates length | content length     (16 bytes)
    certificates: a DER SEQUENCE of X.509 certificates, the ticket-signing leaf first
    content: "g8tk" | version u16 | hash size u16 | count u32 | flags u32 | time u64 |
             count x (hash type u8, cdhash[hash size])
    signature: ECDSA with SHA-256 by the leaf over everything before it (DER, zero-padded)

:func:`parse_ticket` reads one and :meth:`NotarizationTicket.check` verifies its signature, so a
changed byte anywhere in a stapled ticket is found. Whether Apple's notary service issued it (its
chain to Apple's roots) is Gatekeeper's question, not codesign's.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime

from asn1crypto import core
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from ..errors import SignbridgeError

TICKET_MAGIC = b"s8ch"
CONTENT_MAGIC = b"g8tk"
_HEADER = struct.Struct("<4sIII")
_CONTENT_HEADER = struct.Struct("<4sHHIIQ")


class TicketError(SignbridgeError):
    """A stapled notarization ticket is malformed or its signature does not verify."""


@dataclass(frozen=True)
class NotarizationTicket:
    raw: bytes = field(repr=False)
    certificates: tuple[x509.Certificate, ...]
    issued: datetime
    cdhashes: tuple[tuple[int, bytes], ...]  # (hash type, cdhash)
    signed_length: int  # the bytes the signature covers
    signature: bytes = field(repr=False)

    def covers(self, cdhash: bytes) -> bool:
        return any(listed == cdhash for _, listed in self.cdhashes)

    def check(self) -> None:
        """Verify the ticket's signature with its signing certificate; :class:`TicketError` if not."""
        key = self.certificates[0].public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise TicketError("the notarization ticket's signing certificate does not hold an EC key")
        try:
            key.verify(self.signature, self.raw[: self.signed_length], ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise TicketError("the notarization ticket's signature does not match its content") from None


def parse_ticket(data: bytes) -> NotarizationTicket:
    """Read a ticket; :class:`TicketError` says what is malformed."""
    if len(data) < _HEADER.size:
        raise TicketError(f"the notarization ticket is {len(data)} bytes, shorter than its header")
    magic, version, certificates_length, content_length = _HEADER.unpack_from(data)
    if magic != TICKET_MAGIC or version != 1:
        raise TicketError(f"not a notarization ticket (magic {magic!r}, version {version})")
    content_start = _HEADER.size + certificates_length
    signed_length = content_start + content_length
    if signed_length + 8 > len(data):
        raise TicketError("the notarization ticket's certificates and content run past its end")
    certificates = _certificates(data[_HEADER.size : content_start])
    content = data[content_start:signed_length]
    if len(content) < _CONTENT_HEADER.size:
        raise TicketError("the notarization ticket's content is cut short")
    content_magic, _, hash_size, count, _, issued = _CONTENT_HEADER.unpack_from(content)
    if content_magic != CONTENT_MAGIC or _CONTENT_HEADER.size + count * (1 + hash_size) > len(content):
        raise TicketError("the notarization ticket's list of cdhashes is malformed")
    entries = []
    for number in range(count):
        start = _CONTENT_HEADER.size + number * (1 + hash_size)
        entries.append((content[start], content[start + 1 : start + 1 + hash_size]))
    signature = data[signed_length:]
    if signature[:1] != b"\x30" or len(signature) < 2 or signature[1] + 2 > len(signature):
        raise TicketError("the notarization ticket's signature is malformed")
    if any(signature[signature[1] + 2 :]):
        raise TicketError("the notarization ticket has data after its signature")
    return NotarizationTicket(
        raw=data,
        certificates=certificates,
        issued=datetime.fromtimestamp(issued, UTC),
        cdhashes=tuple(entries),
        signed_length=signed_length,
        signature=signature[: signature[1] + 2],
    )


def _certificates(der: bytes) -> tuple[x509.Certificate, ...]:
    try:
        sequence = core.Sequence.load(der, strict=True)
        contents = sequence.contents or b""
        found = []
        position = 0
        while position < len(contents):
            item = core.Any.load(contents[position:])
            length = len(item.dump())
            found.append(x509.load_der_x509_certificate(contents[position : position + length]))
            position += length
    except ValueError as exc:
        raise TicketError(f"the notarization ticket's certificates cannot be read: {exc}") from None
    if not found:
        raise TicketError("the notarization ticket carries no signing certificate")
    return tuple(found)
