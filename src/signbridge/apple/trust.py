"""Whether a signing certificate is trusted: trust anchors, chain evaluation, Apple certificate kinds.

signbridge ships no Apple root certificates; the anchors are files the user configures
(``SIGNBRIDGE_ANCHORS`` or the ``TrustAnchors`` setting), such as Apple's roots or the demo CA.
:func:`evaluate_chain` builds a path from the signer's certificate through the intermediates to an
anchor and reports every rule it breaks instead of stopping at the first. An Apple root among the
anchors is recognised by its fingerprint, so the verdict can be worded as Apple's tools word it.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtensionOID

from ..crypto.certificate_files import read_certificates
from ..crypto.signatures import CertificateSignatureError, verify_certificate_signature
from ..errors import ConfigError
from .certificates import (
    APPLE_DISTRIBUTION,
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
    common_name,
    extended_key_usages,
    extension_oids,
    unique_certificates,
    usage,
)

ANCHORS_ENVIRONMENT_VARIABLE = "SIGNBRIDGE_ANCHORS"

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

# Apple's leaf and intermediate marker extensions (1.2.840.113635.100.6.*) are often critical;
# they only say what kind of certificate this is, so they never make a chain fail.
_APPLE_MARKER_ARC = "1.2.840.113635.100.6."

# Critical extensions this module evaluates, or that constrain nothing a signature check needs.
_UNDERSTOOD_CRITICAL = frozenset(
    {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        ExtensionOID.CERTIFICATE_POLICIES,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    }
)

_MAX_CHAIN_LENGTH = 8


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
class TrustResult:
    """The verdict on a signing certificate.

    ``chain`` runs from the leaf to the anchor when a path was found (else as far as it got);
    ``problems`` are sentences for the user, empty when ``ok``. ``timestamp_used`` says the chain
    was accepted only because it was valid at the timestamp's time; ``expired`` lists the
    certificates accepted although they had expired (only when the caller allowed that).
    """

    ok: bool
    chain: tuple[x509.Certificate, ...]
    anchor: x509.Certificate | None
    problems: tuple[str, ...]
    apple_anchor: bool
    timestamp_used: bool = False
    expired: tuple[x509.Certificate, ...] = ()

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
    """Evaluate the path from ``leaf`` through ``intermediates`` to one of ``anchors``.

    Each link must be signed by the next certificate, every issuer must be a CA (basic
    constraints, path length, key usage), and no certificate may carry a critical extension this
    module does not evaluate (Apple's marker extensions excepted). Every certificate must be valid
    at ``at`` (default now) or, failing that, at ``timestamp_time``: an expired certificate is
    valid only with a timestamp within its validity, unless ``allow_expired`` (Apple's
    ``codesign --verify`` does not fail a signature because its certificates have expired; a
    certificate not valid yet still fails). ``purpose`` asks for the leaf's extended key usage:
    codeSigning for code, Apple's installer usages for installer packages.
    """
    purpose = Purpose(purpose)
    at = _utc(at) if at is not None else datetime.now(UTC)
    timestamp_time = _utc(timestamp_time) if timestamp_time is not None else None
    anchors = unique_certificates(anchors)
    pool = [certificate for certificate in unique_certificates(intermediates) if certificate != leaf]

    failures: list[str] = []
    longest: list[x509.Certificate] = [leaf]
    first_verdict: TrustResult | None = None
    for path in _paths(leaf, pool, anchors, [leaf], failures, longest):
        problems, timestamp_used, expired = _evaluate_path(path, at, timestamp_time, purpose, allow_expired)
        anchor = path[-1]
        verdict = TrustResult(
            ok=not problems,
            chain=tuple(path),
            anchor=anchor,
            problems=tuple(problems),
            apple_anchor=_fingerprint(anchor) in apple_roots,
            timestamp_used=timestamp_used,
            expired=expired,
        )
        if verdict.ok:
            return verdict
        first_verdict = first_verdict or verdict
    if first_verdict is not None:
        return first_verdict

    problems = list(dict.fromkeys(failures))
    if not problems:
        problems.append(f"no path from {_describe(leaf)} to a trusted anchor was found")
    if not anchors:
        problems.insert(0, "no trust anchors are configured (set SIGNBRIDGE_ANCHORS or TrustAnchors)")
    leaf_problems = _leaf_problems(leaf, purpose)
    return TrustResult(
        ok=False,
        chain=tuple(longest),
        anchor=None,
        problems=tuple(problems + leaf_problems),
        apple_anchor=False,
    )


def _paths(
    current: x509.Certificate,
    pool: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
    path: list[x509.Certificate],
    failures: list[str],
    longest: list[x509.Certificate],
) -> Iterator[list[x509.Certificate]]:
    """Every path from ``current`` up to an anchor whose signatures check out. ``failures`` collects
    why other paths ended; ``longest`` becomes the longest path tried."""
    if len(path) > len(longest):
        longest[:] = path
    if current in anchors:
        yield path
        return
    if len(path) >= _MAX_CHAIN_LENGTH:
        failures.append(f"the chain is longer than {_MAX_CHAIN_LENGTH} certificates")
        return
    issuers = [anchor for anchor in anchors if anchor.subject == current.issuer]
    issuers += [
        certificate
        for certificate in pool
        if certificate.subject == current.issuer and certificate not in anchors and certificate not in path
    ]
    for issuer in issuers:
        try:
            verify_certificate_signature(current, issuer)
        except CertificateSignatureError as exc:
            failures.append(f"{_describe(current)} names {_describe(issuer)} as its issuer, but {exc.reason}")
            continue
        yield from _paths(issuer, pool, anchors, [*path, issuer], failures, longest)
    if issuers:
        return
    if _self_signed(current):
        failures.append(f"the chain ends at {_describe(current)}, which is not a trusted anchor")
    else:
        failures.append(
            f"the certificate that issued {_describe(current)} ({_name(current.issuer)}) was not found "
            "among the signature's certificates or the trust anchors"
        )


def _evaluate_path(
    path: list[x509.Certificate],
    at: datetime,
    timestamp_time: datetime | None,
    purpose: Purpose,
    allow_expired: bool,
) -> tuple[list[str], bool, tuple[x509.Certificate, ...]]:
    problems: list[str] = []
    for index, issuer in enumerate(path[1:], start=1):
        problems += _issuer_problems(issuer, path[index - 1], intermediates_below=index - 1)
    for certificate in path:
        problems += _critical_extension_problems(certificate)
    problems += _leaf_problems(path[0], purpose)
    validity, timestamp_used, expired = _validity_problems(path, at, timestamp_time, allow_expired)
    return problems + validity, timestamp_used, expired


def _issuer_problems(
    issuer: x509.Certificate, subject: x509.Certificate, intermediates_below: int
) -> list[str]:
    try:
        constraints = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        return [f"{_describe(issuer)} issued {_describe(subject)} but is not a certification authority"]
    problems = []
    if constraints.path_length is not None and intermediates_below > constraints.path_length:
        problems.append(
            f"{_describe(issuer)} allows {constraints.path_length} intermediate certificate(s) below it, "
            f"but the chain has {intermediates_below}"
        )
    try:
        key_usage = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        key_usage = None
    if key_usage is not None and not key_usage.key_cert_sign:
        problems.append(f"the key usage of {_describe(issuer)} does not allow signing certificates")
    return problems


def _critical_extension_problems(certificate: x509.Certificate) -> list[str]:
    problems = []
    for extension in certificate.extensions:
        oid = extension.oid
        if not extension.critical or oid in _UNDERSTOOD_CRITICAL:
            continue
        if oid.dotted_string.startswith(_APPLE_MARKER_ARC):
            continue
        name = getattr(oid, "_name", None)
        shown = oid.dotted_string if not name or name == "Unknown OID" else f"{name} ({oid.dotted_string})"
        problems.append(
            f"{_describe(certificate)} has a critical extension signbridge does not evaluate: {shown}"
        )
    return problems


def _leaf_problems(leaf: x509.Certificate, purpose: Purpose) -> list[str]:
    problems = []
    try:
        key_usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        key_usage = None
    if key_usage is not None and not key_usage.digital_signature:
        problems.append(f"the key usage of {_describe(leaf)} does not allow digital signatures")
    if purpose is Purpose.ANY:
        return problems
    ekus = extended_key_usages(leaf)
    if purpose is Purpose.CODE and EKU_CODE_SIGNING not in ekus:
        problems.append(
            f"{_describe(leaf)} is not a code signing certificate (no codeSigning extended key usage)"
        )
    if purpose is Purpose.INSTALLER and not ekus & {EKU_DEVELOPER_ID_INSTALLER, EKU_MAC_INSTALLER}:
        extra = " (it is a code signing certificate)" if EKU_CODE_SIGNING in ekus else ""
        problems.append(
            f"{_describe(leaf)} is not an installer signing certificate{extra}; installer packages need the "
            f"extended key usage {EKU_DEVELOPER_ID_INSTALLER} or {EKU_MAC_INSTALLER}"
        )
    return problems


def _validity_problems(
    path: list[x509.Certificate], at: datetime, timestamp_time: datetime | None, allow_expired: bool
) -> tuple[list[str], bool, tuple[x509.Certificate, ...]]:
    """Each certificate must be valid now or, failing that, when the timestamp says the signature
    was made, or have expired when ``allow_expired``. Returns the problems, whether any
    certificate needed the timestamp, and the expired certificates that were let through."""
    problems = []
    timestamp_used = False
    expired: list[x509.Certificate] = []
    for certificate in path:
        if _valid_at(certificate, at):
            continue
        if timestamp_time is not None and _valid_at(certificate, timestamp_time):
            timestamp_used = True
            continue
        start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
        if allow_expired and at > end:
            expired.append(certificate)
            continue
        if at > end:
            problem = f"{_describe(certificate)} expired on {end:%Y-%m-%d %H:%M:%S} UTC"
        else:
            problem = f"{_describe(certificate)} is not valid until {start:%Y-%m-%d %H:%M:%S} UTC"
        if timestamp_time is not None:
            problem += (
                f", and the timestamp ({timestamp_time:%Y-%m-%d %H:%M:%S} UTC) is not within its validity "
                f"({start:%Y-%m-%d} to {end:%Y-%m-%d})"
            )
        elif at > end:
            problem += "; an expired certificate is valid only with a timestamp within its validity"
        problems.append(problem)
    return problems, timestamp_used and not problems, tuple(expired)


def _valid_at(certificate: x509.Certificate, when: datetime) -> bool:
    return certificate.not_valid_before_utc <= when <= certificate.not_valid_after_utc


def _self_signed(certificate: x509.Certificate) -> bool:
    if certificate.subject != certificate.issuer:
        return False
    try:
        verify_certificate_signature(certificate, certificate)
    except CertificateSignatureError:
        return False
    return True


def _fingerprint(certificate: x509.Certificate) -> bytes:
    return certificate.fingerprint(hashes.SHA256())


def _utc(when: datetime) -> datetime:
    return when.astimezone(UTC) if when.tzinfo else when.replace(tzinfo=UTC)


def _name(name: x509.Name) -> str:
    return name.rfc4514_string() or "(no subject)"


def _describe(certificate: x509.Certificate) -> str:
    return f'"{common_name(certificate) if certificate.subject else "(no subject)"}"'


def _read_anchors(path: Path) -> list[x509.Certificate]:
    return read_certificates(path, role="trust anchors file", error=TrustAnchorError)
