"""Reading DER from untrusted input: X.509 certificates, in one place, and what asn1crypto raises.

Certificates arrive inside signatures, packages, notarization tickets and timestamps that anyone
can write. cryptography reads a certificate lazily: loading it checks the outer structure, and a
damaged name, extension or key raises ``ValueError`` or ``UnsupportedAlgorithm`` later, out of
whichever code reads that field first (a chain check, ``codesign -d``'s ``Authority=`` lines, a
designated requirement). :func:`read_certificate` reads every field once, up front, and turns any
failure into the caller's :class:`~signbridge.errors.SignbridgeError`: a certificate it returns can
be read anywhere without raising. :func:`tbs_fields` gives the fields a signature or a token names
a certificate by, as issued.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm

from ..errors import SignatureError, SignbridgeError
from .ber import BerError, children, read_tlv

# What asn1crypto raises, lazily, on malformed input (the list comes from fuzzing it).
ASN1_ERRORS = (ValueError, TypeError, KeyError, IndexError, OverflowError, AttributeError)
# What cryptography raises on a malformed certificate, when it is loaded or when a field is read.
CERTIFICATE_ERRORS = (ValueError, TypeError, x509.InvalidVersion, x509.DuplicateExtension, UnsupportedAlgorithm)


class CertificateFormatError(SignatureError):
    """A certificate from a file, signature, package or ticket cannot be read."""


def read_certificate(
    der: bytes, what: str = "a certificate", error: type[SignbridgeError] = CertificateFormatError
) -> x509.Certificate:
    """The X.509 certificate ``der``, every field parsed; ``error`` (naming ``what``) when it cannot be."""
    try:
        certificate = x509.load_der_x509_certificate(bytes(der))
        certificate.subject.rfc4514_string()
        certificate.issuer.rfc4514_string()
        certificate.extensions  # noqa: B018 - parses (and caches) every extension
        certificate.not_valid_before_utc, certificate.not_valid_after_utc  # noqa: B018
        certificate.serial_number, certificate.signature_algorithm_oid  # noqa: B018
        certificate.public_key()
    except CERTIFICATE_ERRORS as exc:
        raise error(f"{what} is not a readable X.509 certificate ({exc})") from None
    return certificate


def read_certificates(
    ders: Iterable[bytes], what: str = "the signature", error: type[SignbridgeError] = CertificateFormatError
) -> tuple[x509.Certificate, ...]:
    """Each of ``ders`` read by :func:`read_certificate`; messages name "certificate N of ``what``"."""
    return tuple(
        read_certificate(der, f"certificate {number} of {what}", error) for number, der in enumerate(ders, 1)
    )


class TbsFields(NamedTuple):
    """Fields of a certificate's TBSCertificate (RFC 5280 §4.1), each its DER as issued: what a
    signature or a token names the certificate by must be byte-exact, never a re-encoding."""

    serial_number: bytes  # the INTEGER
    issuer: bytes  # the Name
    subject: bytes  # the Name
    public_key_info: bytes  # the SubjectPublicKeyInfo


def tbs_fields(certificate: x509.Certificate) -> TbsFields:
    """The serial number, issuer, subject and public key info of ``certificate``, as issued."""
    tbs = certificate.tbs_certificate_bytes
    try:
        fields = children(tbs, read_tlv(tbs, 0, len(tbs), 0))
    except BerError as exc:
        raise CertificateFormatError(f"the certificate's TBSCertificate cannot be read ({exc})") from None
    if fields and fields[0].identifier == b"\xa0":  # [0] version, absent in version 1
        fields = fields[1:]
    if len(fields) < 6:
        raise CertificateFormatError("the certificate's TBSCertificate has too few fields")
    serial_number, _signature, issuer, _validity, subject, public_key_info = (
        tbs[field.start : field.end] for field in fields[:6]
    )
    return TbsFields(serial_number, issuer, subject, public_key_info)
