"""What a certificate is called where the tools print it: its subject's common name."""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.oid import NameOID


def common_name(cert: x509.Certificate) -> str:
    """The subject's first common name, else the whole subject (RFC 4514)."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()
