"""Apple's certificate kinds: the OIDs that mark them and how to tell them apart.

Facts from Apple's Security framework policies: the leaf marker
extensions and extended key usages of each kind, and the intermediate markers.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..crypto.chains import extended_key_usages

# SHA-256 fingerprints of Apple's root certificates (Apple Root CA, Apple Root CA - G2 and - G3,
# and the expired Apple Computer root), computed from the certificates Apple publishes.
APPLE_ROOT_FINGERPRINTS = frozenset(
    bytes.fromhex(fingerprint)
    for fingerprint in (
        "b0b1730ecbc7ff4505142c49f1295e6eda6bcaed7e2c68c5be91b5a11001f024",
        "c2b9b042dd57830e7d117dac55ac8ae19407d38e41d88f3215bc3a890444a050",
        "63343abfb89a6a03ebb57e9b3f5fa7be7c4f5c756f3017b3a8c488c3653e9179",
        "0d83b611b648a1a75eb8558400795375cad92e264ed8e9d7a757c1f5ee2bb22d",
    )
)

APPLE_OID = "1.2.840.113635.100"

# Leaf markers (1.2.840.113635.100.6.1.x)
DEVELOPER_ID_APPLICATION = f"{APPLE_OID}.6.1.13"
DEVELOPER_ID_INSTALLER = f"{APPLE_OID}.6.1.14"
DEVELOPER_ID_KERNEL = f"{APPLE_OID}.6.1.18"
DEVELOPER_ID_DATE = f"{APPLE_OID}.6.1.33"
IPHONE_DEVELOPER = f"{APPLE_OID}.6.1.2"
IPHONE_DISTRIBUTION = f"{APPLE_OID}.6.1.4"
APPLE_DISTRIBUTION = f"{APPLE_OID}.6.1.7"
MAC_INSTALLER_DISTRIBUTION = f"{APPLE_OID}.6.1.8"
MAC_DEVELOPER = f"{APPLE_OID}.6.1.12"

# Intermediate markers (1.2.840.113635.100.6.2.x)
WWDR_INTERMEDIATE = f"{APPLE_OID}.6.2.1"
DEVELOPER_ID_INTERMEDIATE = f"{APPLE_OID}.6.2.6"

# Extended key usages
EKU_CODE_SIGNING = ExtendedKeyUsageOID.CODE_SIGNING.dotted_string
EKU_MAC_INSTALLER = f"{APPLE_OID}.4.9"
EKU_DEVELOPER_ID_INSTALLER = f"{APPLE_OID}.4.13"

CERTIFICATE_POLICY = f"{APPLE_OID}.5.1"


class Usage(enum.Enum):
    """What an identity can sign."""

    CODE = "code signing"
    INSTALLER = "installer signing"
    OTHER = "other"


def extension_oids(cert: x509.Certificate) -> set[str]:
    return {ext.oid.dotted_string for ext in cert.extensions}


def usage(cert: x509.Certificate) -> Usage:
    """Installer certificates carry an installer EKU; code-signing ones carry codeSigning."""
    ekus = extended_key_usages(cert)
    if ekus & {EKU_DEVELOPER_ID_INSTALLER, EKU_MAC_INSTALLER}:
        return Usage.INSTALLER
    if EKU_CODE_SIGNING in ekus:
        return Usage.CODE
    return Usage.OTHER


def team_identifier(cert: x509.Certificate, issuers: Iterable[x509.Certificate]) -> str | None:
    """The team id: Apple puts it in the subject's OU of the certificates it issues under its developer
    intermediates (Developer ID, WWDR); a certificate from any other issuer has none."""
    units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    developer = {DEVELOPER_ID_INTERMEDIATE, WWDR_INTERMEDIATE}
    if not units or not any(extension_oids(issuer) & developer for issuer in issuers):
        return None
    return str(units[0].value)


def certificate_sha1(certificate: x509.Certificate) -> bytes:
    """The hash by which the requirement language names a certificate (``certificate leaf = H"..."``)."""
    return certificate.fingerprint(hashes.SHA1())  # noqa: S303 - the requirement language's hash


def is_apple_root(certificate: x509.Certificate, roots: frozenset[bytes] = APPLE_ROOT_FINGERPRINTS) -> bool:
    """Whether ``certificate`` is one of Apple's roots (``roots``: their SHA-256 fingerprints)."""
    return certificate.fingerprint(hashes.SHA256()) in roots
