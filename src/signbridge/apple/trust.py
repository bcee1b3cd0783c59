"""Whether a signing certificate is trusted: trust anchors, chain evaluation, Apple certificate kinds.

signbridge ships no Apple root certificates; the anchors are files the user configures
(``SIGNBRIDGE_ANCHORS`` or the ``TrustAnchors`` setting), such as Apple's roots or the demo CA.
:func:`evaluate_chain` builds a path from the signer's certificate through the intermediates to an
anchor and reports every rule it breaks instead of stopping at the first. An Apple root among the
anchors is recognised by its fingerprint, so the verdict can be worded as Apple's tools word it.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509

from ..crypto.certificate_files import read_certificates
from ..crypto.chains import (
    ANY_SIGNATURE,
    CODE_SIGNING,
    PathResult,
    describe,
    extended_key_usages,
    signing_key_usage_problems,
    unique_certificates,
    validate_path,
)
from ..crypto.chains import Purpose as ChainPurpose
from ..crypto.names import common_name
from ..errors import ConfigError
from .certificates import (
    APPLE_DISTRIBUTION,
    APPLE_ROOT_FINGERPRINTS,
    DEVELOPER_ID_APPLICATION,
    DEVELOPER_ID_INSTALLER,
    DEVELOPER_ID_INTERMEDIATE,
    DEVELOPER_ID_KERNEL,
    EKU_CODE_SIGNING,
    EKU_DEVELOPER_ID_INSTALLER,
    EKU_MAC_INSTALLER,
    IPHONE_DEVELOPER,
    IPHONE_DISTRIBUTION,
    MAC_DEVELOPER,
    MAC_INSTALLER_DISTRIBUTION,
    Usage,
    extension_oids,
    is_apple_root,
    usage,
)

ANCHORS_ENVIRONMENT_VARIABLE = "SIGNBRIDGE_ANCHORS"

# Apple's leaf and intermediate marker extensions (1.2.840.113635.100.6.*) are often critical;
# they only say what kind of certificate this is, so they never make a chain fail.
_APPLE_MARKER_ARC = "1.2.840.113635.100.6."

class TrustAnchorError(ConfigError):
    """The configured trust anchors cannot be read."""


class Purpose(enum.Enum):
    """What the signing certificate must be allowed to sign."""

    CODE = "code"  # extended key usage codeSigning
    INSTALLER = "installer"  # Apple's installer EKUs (1.2.840.113635.100.4.13 or .4.9)
    ANY = "any"


class CertificateKind(enum.Enum):
    """Apple's names for its kinds of signing certificates, as codesign and Xcode show them."""

    DEVELOPER_ID_APPLICATION = "Developer ID Application"
    DEVELOPER_ID_INSTALLER = "Developer ID Installer"
    DEVELOPER_ID_KERNEL = "Developer ID Kernel"
    APPLE_DEVELOPMENT = "Apple Development"
    APPLE_DISTRIBUTION = "Apple Distribution"
    MAC_APP_DISTRIBUTION = "Mac App Distribution"
    MAC_INSTALLER_DISTRIBUTION = "Mac Installer Distribution"
    MAC_DEVELOPER = "Mac Developer"
    IPHONE_DEVELOPER = "iPhone Developer"
    IPHONE_DISTRIBUTION = "iPhone Distribution"
    CODE_SIGNING = "code signing (not an Apple-issued kind)"
    INSTALLER_SIGNING = "installer signing (not an Apple-issued kind)"
    OTHER = "not a signing certificate"

    @property
    def label(self) -> str:
        return self.value

    @property
    def apple_issued(self) -> bool:
        return self not in _NOT_APPLE_KINDS


_NOT_APPLE_KINDS = (CertificateKind.CODE_SIGNING, CertificateKind.INSTALLER_SIGNING, CertificateKind.OTHER)


def classify_certificate(certificate: x509.Certificate) -> CertificateKind:
    """The kind of signing certificate, from Apple's leaf markers, else from its extended key usage.

    The markers say what Apple issued; whether Apple really issued it is for
    :func:`evaluate_chain` to say.
    """
    markers = extension_oids(certificate)
    if DEVELOPER_ID_APPLICATION in markers:
        return CertificateKind.DEVELOPER_ID_APPLICATION
    if DEVELOPER_ID_INSTALLER in markers:
        return CertificateKind.DEVELOPER_ID_INSTALLER
    if DEVELOPER_ID_KERNEL in markers:
        return CertificateKind.DEVELOPER_ID_KERNEL
    if MAC_INSTALLER_DISTRIBUTION in markers:
        return CertificateKind.MAC_INSTALLER_DISTRIBUTION
    if IPHONE_DEVELOPER in markers and MAC_DEVELOPER in markers:
        return CertificateKind.APPLE_DEVELOPMENT
    if APPLE_DISTRIBUTION in markers and IPHONE_DISTRIBUTION in markers:
        return CertificateKind.APPLE_DISTRIBUTION
    if APPLE_DISTRIBUTION in markers:
        return CertificateKind.MAC_APP_DISTRIBUTION
    if MAC_DEVELOPER in markers:
        return CertificateKind.MAC_DEVELOPER
    if IPHONE_DEVELOPER in markers:
        return CertificateKind.IPHONE_DEVELOPER
    if IPHONE_DISTRIBUTION in markers:
        return CertificateKind.IPHONE_DISTRIBUTION
    kind = usage(certificate)
    if kind is Usage.CODE:
        return CertificateKind.CODE_SIGNING
    if kind is Usage.INSTALLER:
        return CertificateKind.INSTALLER_SIGNING
    return CertificateKind.OTHER


# ---------------------------------------------------------------------------------------------
# Anchors


def load_anchors(spec: str | os.PathLike[str] | None) -> list[x509.Certificate]:
    """The certificates in a PEM file (one or several), a DER file, or a directory of such files.

    None means no anchors are configured: an empty list. A path that cannot be read, or that holds
    no certificate, is a :class:`TrustAnchorError` naming it.
    """
    if spec is None or str(spec) == "":
        return []
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(entry for entry in path.iterdir() if entry.is_file() and entry.name[:1] != ".")
        anchors = unique_certificates(certificate for file in files for certificate in _read_anchors(file))
        if not anchors:
            raise TrustAnchorError(f"the trust anchor directory {path} holds no certificate files")
        return anchors
    if not path.exists():
        raise TrustAnchorError(f"the trust anchors file {path} does not exist")
    return unique_certificates(_read_anchors(path))


def anchors_from_environment(
    settings_value: str | os.PathLike[str] | None = None, *, environ: Mapping[str, str] | None = None
) -> list[x509.Certificate]:
    """The anchors named by ``SIGNBRIDGE_ANCHORS``, else by the ``TrustAnchors`` setting's value.

    Either may list several files or directories separated by ``os.pathsep``.
    """
    environ = os.environ if environ is None else environ
    value = environ.get(ANCHORS_ENVIRONMENT_VARIABLE) or settings_value
    if value is None or str(value) == "":
        return []
    parts = [part for part in str(value).split(os.pathsep) if part]
    return unique_certificates(anchor for part in parts for anchor in load_anchors(part))



# ---------------------------------------------------------------------------------------------
# Chain evaluation


@dataclass(frozen=True)
class TrustResult(PathResult):
    """The verdict on a signing certificate: its path (see :class:`~signbridge.crypto.chains.PathResult`)
    and whether the anchor is one of Apple's roots."""

    apple_anchor: bool = False

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def anchor_subject(self) -> str | None:
        """The anchor's common name (or full subject when it has none)."""
        return common_name(self.anchor) if self.anchor is not None else None

    @property
    def developer_id(self) -> bool:
        """The chain passes through Apple's Developer ID intermediate (marker 1.2.840.113635.100.6.2.6)."""
        return any(DEVELOPER_ID_INTERMEDIATE in extension_oids(certificate) for certificate in self.chain[1:])

    @property
    def status(self) -> str:
        """The verdict in the words ``pkgutil --check-signature`` uses."""
        if not self.ok:
            return "signed by untrusted certificate"
        if self.apple_anchor and self.developer_id:
            return "signed by a developer certificate issued by Apple for distribution"
        if self.apple_anchor:
            return "signed by a certificate trusted by macOS"
        return f'signed by a certificate trusted by "{self.anchor_subject}"'


def evaluate_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
    *,
    at: datetime | None = None,
    purpose: Purpose | str = Purpose.ANY,
    timestamp_time: datetime | None = None,
    apple_roots: frozenset[bytes] = APPLE_ROOT_FINGERPRINTS,
    allow_expired: bool = False,
) -> TrustResult:
    """Evaluate the path from ``leaf`` through ``intermediates`` to one of ``anchors``
    (:func:`signbridge.crypto.chains.validate_path`), with Apple's rules: its marker extensions
    never make a chain fail, and ``purpose`` asks for codeSigning for code, Apple's installer usages
    for installer packages.

    Every certificate must be valid at ``at`` (default now) or, failing that, at ``timestamp_time``:
    an expired certificate is valid only with a timestamp within its validity, unless
    ``allow_expired`` (Apple's ``codesign --verify`` does not fail a signature because its
    certificates have expired; a certificate not valid yet still fails).
    """
    result = validate_path(
        leaf,
        intermediates,
        anchors,
        purpose=_PURPOSES[Purpose(purpose)],
        at=at,
        timestamp_time=timestamp_time,
        allow_expired=allow_expired,
        ignore_critical=_apple_marker,
    )
    path = {field.name: getattr(result, field.name) for field in dataclasses.fields(PathResult)}
    if result.anchor is None and not anchors:
        unconfigured = "no trust anchors are configured (set SIGNBRIDGE_ANCHORS or TrustAnchors)"
        path["problems"] = (unconfigured, *result.problems)
    apple_anchor = result.anchor is not None and is_apple_root(result.anchor, apple_roots)
    return TrustResult(**path, apple_anchor=apple_anchor)


def _apple_marker(oid: str) -> bool:
    return oid.startswith(_APPLE_MARKER_ARC)


def _installer_signing_problems(leaf: x509.Certificate) -> list[str]:
    problems = signing_key_usage_problems(leaf)
    ekus = extended_key_usages(leaf)
    if not ekus & {EKU_DEVELOPER_ID_INSTALLER, EKU_MAC_INSTALLER}:
        extra = " (it is a code signing certificate)" if EKU_CODE_SIGNING in ekus else ""
        problems.append(
            f"{describe(leaf)} is not an installer signing certificate{extra}; installer packages need the "
            f"extended key usage {EKU_DEVELOPER_ID_INSTALLER} or {EKU_MAC_INSTALLER}"
        )
    return problems


_PURPOSES = {
    Purpose.CODE: CODE_SIGNING,
    Purpose.INSTALLER: ChainPurpose("installer", _installer_signing_problems),
    Purpose.ANY: ANY_SIGNATURE,
}


def _read_anchors(path: Path) -> list[x509.Certificate]:
    return read_certificates(path, role="trust anchors file", error=TrustAnchorError)
