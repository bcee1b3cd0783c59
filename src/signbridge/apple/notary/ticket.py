"""A notarization ticket, as ``stapler`` attaches it: its structure, its signature, what it covers.

Apple's notary service issues a ticket per notarized item; ``stapler staple`` appends it to a flat
package (between two ``t8lr`` records, see :mod:`signbridge.apple.pkg.xar.archive`), puts it in a
DMG's code signature (slot 0x10002) or in a bundle's ``Contents/CodeResources``. Layout, all
numbers little-endian, as found in every stapled package of the test corpus::

    0   's8ch'  u32 version (1)  u32 certificates_length  u32 content_length
    16  certificates   DER SEQUENCE OF Certificate, the ticket signer first
                       ("Software Ticket Signing", issued by "Apple System Integration CA 4")
    ..  content        'g8tk' u16 version (2) u16 hash_size (20) u32 count u32 flags u64 issued (Unix time)
                       then count × (u8 hash type, hash_size bytes): the hashes the ticket vouches for
                       — for a package its TOC checksum (type 1, SHA-1; type 2 is a SHA-256 cut to
                       hash_size), then the cdhashes of the code inside
    ..  signature      ECDSA (SHA-256) over bytes 0 .. end of content by the ticket signer's key,
                       DER, zero-padded to the end of the ticket

:func:`parse_ticket` checks the structure; :meth:`Ticket.verify_signature` checks the signature
with the certificate the ticket carries, which detects any changed byte. Whether that certificate
chains to Apple's notary root and what Gatekeeper makes of the ticket's flags is a deeper check
that this module does not make.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from asn1crypto import core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from ...crypto.der import ASN1_ERRORS, CertificateFormatError, read_certificates
from ...crypto.hashes import HashAlgorithm
from ...crypto.signatures import EcdsaFormat, Scheme, SignatureRequest, verify_digest_signature
from ...errors import SignatureError, SignbridgeError
from .stapled import TICKET_MAGIC

CONTENT_MAGIC = b"g8tk"
_HEADER = struct.Struct("<4sIII")
_CONTENT_HEADER = struct.Struct("<4sHHIIQ")
MAX_TICKET_SIZE = 1024 * 1024  # real tickets are under 2 KiB


class TicketError(SignbridgeError):
    """A notarization ticket is damaged, altered, or not for the item it is attached to."""


_Fail = Callable[[str], "TicketError"]  # makes the error for one problem with one ticket


class _Certificates(core.SequenceOf):
    _child_spec = asn1_x509.Certificate


@dataclass(frozen=True)
class TicketEntry:
    hash_type: int  # 1 SHA-1, 2 SHA-256 (truncated to the ticket's hash size)
    digest: bytes


@dataclass(frozen=True)
class Ticket:
    version: int
    certificates: tuple[x509.Certificate, ...] = field(repr=False)  # the ticket signer first
    issued: datetime
    flags: int
    entries: tuple[TicketEntry, ...]
    signed: bytes = field(repr=False)  # the bytes the signature covers
    signature: bytes = field(repr=False)  # DER ECDSA-Sig-Value
    name: str = ""  # what the ticket is attached to, for messages

    def covers(self, digest: bytes) -> bool:
        """Whether the ticket vouches for this hash (a package's TOC checksum, a cdhash)."""
        return any(entry.digest == digest[: len(entry.digest)] for entry in self.entries)

    def verify_signature(self) -> None:
        """Raise :class:`TicketError` unless the signature verifies with the ticket signer's key."""
        key = self.certificates[0].public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise TicketError(f"{self.name}: the notarization ticket's signing certificate has no ECDSA key")
        request = SignatureRequest(
            HashAlgorithm.SHA256.digest(self.signed), HashAlgorithm.SHA256, Scheme.ECDSA, EcdsaFormat.ASN1
        )
        try:
            verify_digest_signature(key, request, self.signature)
        except SignatureError:
            raise TicketError(
                f"{self.name}: the signature of the stapled notarization ticket does not verify; the ticket was "
                "altered or damaged"
            ) from None


def parse_ticket(data: bytes, name: str) -> Ticket:
    """Read a ticket; ``name`` is what it is attached to, for messages. Raises :class:`TicketError`."""

    def fail(problem: str) -> TicketError:
        return TicketError(f"{name}: the stapled notarization ticket {problem}")

    if len(data) > MAX_TICKET_SIZE:
        raise fail(f"is {len(data)} bytes long; tickets are a few kilobytes")
    if len(data) < _HEADER.size or data[:4] != TICKET_MAGIC:
        raise fail("does not start with 's8ch'")
    _, version, certificates_length, content_length = _HEADER.unpack_from(data)
    if version != 1:
        raise fail(f"has version {version}; signbridge reads version 1")
    content_start = _HEADER.size + certificates_length
    signature_start = content_start + content_length
    if signature_start > len(data):
        raise fail(f"declares {certificates_length + content_length} bytes of certificates and content, more than it holds")
    certificates = _certificates(data[_HEADER.size : content_start], fail)
    issued, flags, entries = _content(data[content_start:signature_start], fail)
    return Ticket(
        version, certificates, issued, flags, entries, data[:signature_start], _signature(data[signature_start:], fail),
        name,
    )


def _certificates(der: bytes, fail: _Fail) -> tuple[x509.Certificate, ...]:
    try:
        items = [item.dump() for item in _Certificates.load(der, strict=True)]
        certificates = read_certificates(items, "the ticket")
    except (CertificateFormatError, *ASN1_ERRORS):
        raise fail("holds certificates that cannot be read") from None
    if not certificates:
        raise fail("holds no signing certificate")
    return certificates


def _content(content: bytes, fail: _Fail) -> tuple[datetime, int, tuple[TicketEntry, ...]]:
    if len(content) < _CONTENT_HEADER.size or content[:4] != CONTENT_MAGIC:
        raise fail("content does not start with 'g8tk'")
    _, _version, hash_size, count, flags, issued = _CONTENT_HEADER.unpack_from(content)
    if not 0 < hash_size <= 64 or _CONTENT_HEADER.size + count * (hash_size + 1) != len(content):
        raise fail(f"content lists {count} hashes of {hash_size} bytes, which do not fill its {len(content)} bytes")
    entries = []
    for index in range(count):
        start = _CONTENT_HEADER.size + index * (hash_size + 1)
        entries.append(TicketEntry(content[start], content[start + 1 : start + 1 + hash_size]))
    try:
        when = datetime.fromtimestamp(issued, UTC)
    except (OverflowError, OSError, ValueError):
        raise fail(f"content gives an impossible issue time ({issued})") from None
    return when, flags, tuple(entries)


def _signature(stored: bytes, fail: _Fail) -> bytes:
    if len(stored) < 2 or stored[0] != 0x30 or stored[1] & 0x80:
        raise fail("has no signature after its content")
    signature, padding = stored[: 2 + stored[1]], stored[2 + stored[1] :]
    if len(signature) != 2 + stored[1] or padding.strip(b"\0"):
        raise fail("signature is cut short or followed by stray bytes")
    try:
        decode_dss_signature(signature)
    except ValueError:
        raise fail("signature is not an ECDSA signature") from None
    return signature
