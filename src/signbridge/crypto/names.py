"""Names of certificates: what the tools print (the subject's common name), and whether a stored
name is a certificate's."""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.oid import NameOID

from .der import ASN1_ERRORS


def common_name(cert: x509.Certificate) -> str:
    """The subject's first common name, else the whole subject (RFC 4514)."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()


def same_name(issued: bytes, der: bytes) -> bool:
    """Whether the DER Name ``der`` is the name a certificate holds as ``issued`` (its DER, see
    :func:`signbridge.crypto.der.tbs_fields`): the same bytes, or else equal as RFC 5280 compares
    names (string preparation: case and spaces do not count)."""
    if issued == der:
        return True
    # Rare (a signer that re-encoded the name), and only asn1crypto prepares strings as RFC 5280 says.
    from asn1crypto import x509 as asn1_x509

    try:
        return asn1_x509.Name.load(issued) == asn1_x509.Name.load(der, strict=True)
    except ASN1_ERRORS:
        return False
