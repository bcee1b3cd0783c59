"""Notarization tickets: the ``s8ch`` documents Apple's notary service issues.

Layout (little-endian), as found in every ticket Apple stapled to the corpus's packages and disk
images::

    "s8ch" | u32 version (1) | u32 chain length C | u32 content length N
    chain:   C bytes, DER SEQUENCE OF Certificate (leaf "Software Ticket Signing", then its CA)
    content: N bytes: "g8tk" | u16 version (2) | u16 hash length L (20) | u32 count | u32 0
                      | u64 issue time (Unix seconds) | count x (u8 hash type, L-byte digest)
    signature: DER ECDSA-Sig-Value, zero-padded; ECDSA P-256 with SHA-256 over every byte before it

Hash type 1 is SHA-1 and 2 is SHA-256, as in a CodeDirectory; SHA-256 digests are truncated to
L bytes. A ticket lists the CodeDirectory hashes of all the code it covers, and a package's TOC
checksum.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime

from asn1crypto.core import Any, SequenceOf
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from .errors import TicketError

TICKET_MAGIC = b"s8ch"
CONTENT_MAGIC = b"g8tk"
MAX_TICKET_SIZE = 1024 * 1024
_HEADER = struct.Struct("<4sIII")
_CONTENT = struct.Struct("<4sHHIIQ")
HASH_SHA1, HASH_SHA256 = 1, 2


class _Chain(SequenceOf):
    _child_spec = Any


@dataclass(frozen=True)
class TicketEntry:
    hash_type: int
    digest: bytes  # truncated to the ticket's hash length

    def __str__(self) -> str:
        return f"{self.hash_type}/{self.digest.hex()}"


@dataclass(frozen=True)
class Ticket:
    raw: bytes = field(repr=False)
    certificates: tuple[x509.Certificate, ...] = field(repr=False)
    issued: datetime
    hash_length: int
    entries: tuple[TicketEntry, ...]
    signature: bytes = field(repr=False)
    signed_length: int

    def covers(self, hash_type: int, digest: bytes) -> bool:
        wanted = TicketEntry(hash_type, digest[: self.hash_length])
        return wanted in self.entries

    def verify_signature(self, anchors: tuple[x509.Certificate, ...] = ()) -> bool:
        """Check the ticket's own signature and its certificate chain as far as it goes.

        The chain a ticket carries ends at "Apple System Integration CA 4", issued by Apple Root
        CA - G3, which the ticket does not carry. Returns True when the last certificate is issued
        by one of ``anchors`` (checked), False when no anchor issued it (the chain is unanchored).
        """
        if len(self.certificates) < 1:
            raise TicketError("the ticket carries no certificate to check its signature with")
        leaf = self.certificates[0]
        key = leaf.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise TicketError("the ticket's signing certificate does not hold an EC key")
        try:
            key.verify(self.signature, self.raw[: self.signed_length], ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise TicketError("the ticket's signature does not verify: it was altered") from None
        for child, parent in zip(self.certificates, self.certificates[1:], strict=False):
            _check_issued_by(child, parent)
        last = self.certificates[-1]
        for anchor in anchors:
            if anchor.subject == last.issuer:
                _check_issued_by(last, anchor)
                return True
        return False


def _check_issued_by(child: x509.Certificate, parent: x509.Certificate) -> None:
    key = parent.public_key()
    algorithm = child.signature_hash_algorithm
    try:
        if isinstance(key, ec.EllipticCurvePublicKey) and algorithm is not None:
            key.verify(child.signature, child.tbs_certificate_bytes, ec.ECDSA(algorithm))
        elif isinstance(key, rsa.RSAPublicKey) and algorithm is not None:
            key.verify(child.signature, child.tbs_certificate_bytes, padding.PKCS1v15(), algorithm)
        else:
            raise TicketError("the ticket's certificate chain uses an unsupported key type")
    except InvalidSignature:
        raise TicketError(
            f"the ticket's certificate {child.subject.rfc4514_string()} is not issued by "
            f"{parent.subject.rfc4514_string()}"
        ) from None


def record_name(hash_type: int, digest: bytes, hash_length: int = 20) -> str:
    """The ticket delivery service's record for a digest: ``2/<hash type>/<hex digest>``."""
    return f"2/{hash_type}/{digest[:hash_length].hex()}"


def parse_ticket(data: bytes) -> Ticket:
    """Parse a ticket; :class:`TicketError` names what is wrong with a damaged one."""
    if len(data) > MAX_TICKET_SIZE:
        raise TicketError(f"the ticket is {len(data)} bytes, more than the {MAX_TICKET_SIZE} a ticket can be")
    if len(data) < _HEADER.size or data[:4] != TICKET_MAGIC:
        raise TicketError("this is not a notarization ticket (no 's8ch' header)")
    _magic, version, chain_length, content_length = _HEADER.unpack_from(data)
    if version != 1:
        raise TicketError(f"the ticket has version {version}; signbridge reads version 1")
    signed_length = _HEADER.size + chain_length + content_length
    if signed_length > len(data):
        raise TicketError(
            f"the ticket is truncated: its header declares {signed_length} bytes before the signature, "
            f"it has {len(data)}"
        )
    certificates = _certificates(data[_HEADER.size : _HEADER.size + chain_length])
    content = data[_HEADER.size + chain_length : signed_length]
    if len(content) < _CONTENT.size or content[:4] != CONTENT_MAGIC:
        raise TicketError("the ticket's content does not start with 'g8tk'")
    _magic, content_version, hash_length, count, _reserved, issued = _CONTENT.unpack_from(content)
    if not 0 < hash_length <= 64:
        raise TicketError(f"the ticket declares {hash_length}-byte hashes")
    if _CONTENT.size + count * (1 + hash_length) != len(content):
        raise TicketError(
            f"the ticket's content is {len(content)} bytes, which does not hold the {count} hashes it declares"
        )
    entries = []
    offset = _CONTENT.size
    for _ in range(count):
        entries.append(TicketEntry(content[offset], bytes(content[offset + 1 : offset + 1 + hash_length])))
        offset += 1 + hash_length
    signature = _signature(data[signed_length:])
    try:
        when = datetime.fromtimestamp(issued, UTC)
    except (OverflowError, OSError, ValueError):
        raise TicketError("the ticket's issue time is out of range") from None
    del content_version
    return Ticket(bytes(data), certificates, when, hash_length, tuple(entries), signature, signed_length)


def _certificates(chain: bytes) -> tuple[x509.Certificate, ...]:
    try:
        sequence = _Chain.load(chain, strict=True)
        certificates = tuple(x509.load_der_x509_certificate(item.dump()) for item in sequence)
    except (ValueError, TypeError) as exc:
        raise TicketError(f"the ticket's certificate chain cannot be read: {exc}") from None
    if not certificates:
        raise TicketError("the ticket carries no certificate")
    return certificates


def _signature(tail: bytes) -> bytes:
    if len(tail) < 8 or tail[0] != 0x30 or tail[1] >= 0x80:
        raise TicketError("the ticket's signature is missing or malformed")
    length = 2 + tail[1]
    if length > len(tail) or any(tail[length:]):
        raise TicketError("the ticket's signature is malformed (bytes follow it)")
    return tail[:length]
