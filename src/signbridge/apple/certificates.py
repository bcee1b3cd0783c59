"""Apple's certificate kinds: the OIDs that mark them and how to tell them apart.

Facts from Apple's Security framework policies: the leaf marker
extensions and extended key usages of each kind, and the intermediate markers.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..crypto.chains import extended_key_usages

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
TIMESTAMP_INTERMEDIATE = f"{APPLE_OID}.6.2.9"

# Extended key usages
EKU_CODE_SIGNING = ExtendedKeyUsageOID.CODE_SIGNING.dotted_string
EKU_SAFARI_DEVELOPER = f"{APPLE_OID}.4.8"
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
