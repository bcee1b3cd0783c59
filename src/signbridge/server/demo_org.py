"""The demo organization: a local CA hierarchy shaped like Apple's, three policies, a CI user.

Certificates follow Apple's Developer ID profiles: the leaf marker
extensions, the installer EKU, the intermediate marker, the subject layout.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from sqlalchemy.orm import Session

from ..apple import certificates as apple
from . import directory, pki
from .keystores import KeyRef, KeySpec, Keystore
from .models import Certificate

ORGANIZATION = "Demo Corp"
TEAM_ID = "DEMOTEAM01"
PROJECT = "demo"
CI_USER = "demo-ci"
POLICIES = {
    "release-signing": ("developer-id-application", KeySpec.RSA_2048),
    "installer-signing": ("developer-id-installer", KeySpec.RSA_2048),
    "ecdsa-signing": ("ecdsa-signing", KeySpec.EC_P256),
}


@dataclass(frozen=True)
class DemoOrganization:
    organization_id: str
    api_token: str
    project_slug: str
    policy_slugs: tuple[str, ...]
    root_pem: str
    ci_user: str


def _marker(oid: str) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), b"\x05\x00")  # DER NULL, as Apple's


def _ca_extensions(path_length: int | None) -> list[pki.Extension]:
    return [
        pki.Extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True),
        pki.Extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True),
    ]


def _leaf_extensions(eku: str, marker: str | None) -> list[pki.Extension]:
    extensions = [
        pki.Extension(x509.BasicConstraints(ca=False, path_length=None), critical=True),
        pki.Extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True),
        pki.Extension(x509.ExtendedKeyUsage([x509.ObjectIdentifier(eku)]), critical=True),
        pki.Extension(
            x509.CertificatePolicies([x509.PolicyInformation(x509.ObjectIdentifier(apple.CERTIFICATE_POLICY), None)])
        ),
    ]
    if marker:
        # Apple marks these critical. Java refuses a jar signer whose certificate has a critical
        # extension it does not know, so the demo's are not: the same keys then sign jars too.
        extensions.append(pki.Extension(_marker(marker), critical=False))
    return extensions


class _Issuer:
    def __init__(self, keystore: Keystore, ref: KeyRef, certificate: x509.Certificate | None) -> None:
        self.keystore, self.ref, self.certificate = keystore, ref, certificate
        self.public_key = keystore.public_key(ref)

    def sign(self, request):  # noqa: ANN001, ANN201
        return self.keystore.sign(self.ref, request)

    def issue(self, subject: x509.Name, public_key, extensions: list[pki.Extension], days: int) -> x509.Certificate:  # noqa: ANN001
        return pki.issue_certificate(
            subject=subject,
            subject_public_key=public_key,
            issuer=self.certificate,
            issuer_public_key=self.public_key,
            sign=self.sign,
            extensions=extensions,
            days=days,
        )


def _new_key(
    session: Session, keystore: Keystore, organization, slug: str, spec: KeySpec, purpose: str  # noqa: ANN001
) -> tuple[KeyRef, Certificate]:
    ref = keystore.generate(spec, f"{ORGANIZATION}/{slug}")
    row = directory.add_certificate(
        session, organization=organization, slug=slug, key_ref=ref, key_spec=spec, certificate=None, purpose=purpose
    )
    return ref, row


def _store(row: Certificate, certificate: x509.Certificate, chain: list[x509.Certificate]) -> None:
    for column, value in directory.certificate_columns(certificate, chain).items():
        setattr(row, column, value)


def create_demo(session: Session, keystore: Keystore) -> DemoOrganization:
    organization = directory.create_organization(session, ORGANIZATION)

    root_ref, root_row = _new_key(session, keystore, organization, "demo-root-ca", KeySpec.RSA_2048, "ca")
    root = _Issuer(keystore, root_ref, None)
    root_cert = root.issue(
        pki.name("Demo Corp Root CA", organization=ORGANIZATION, unit="Demo Corp Certification Authority", country="US"),
        root.public_key,
        _ca_extensions(None),
        days=365 * 20,
    )
    _store(root_row, root_cert, [])
    root.certificate = root_cert

    inter_ref, inter_row = _new_key(session, keystore, organization, "demo-developer-id-ca", KeySpec.RSA_2048, "ca")
    inter_cert = root.issue(
        pki.name(
            "Demo Corp Developer ID Certification Authority",
            organization=ORGANIZATION,
            unit="Demo Corp Certification Authority",
            country="US",
        ),
        keystore.public_key(inter_ref),
        [*_ca_extensions(0), pki.Extension(_marker(apple.DEVELOPER_ID_INTERMEDIATE))],
        days=365 * 10,
    )
    _store(inter_row, inter_cert, [root_cert])
    intermediate = _Issuer(keystore, inter_ref, inter_cert)

    profiles = {
        "developer-id-application": (
            pki.name(f"Developer ID Application: {ORGANIZATION} ({TEAM_ID})", organization=ORGANIZATION,
                     unit=TEAM_ID, country="US", uid=TEAM_ID),
            _leaf_extensions(apple.EKU_CODE_SIGNING, apple.DEVELOPER_ID_APPLICATION),
        ),
        "developer-id-installer": (
            pki.name(f"Developer ID Installer: {ORGANIZATION} ({TEAM_ID})", organization=ORGANIZATION,
                     unit=TEAM_ID, country="US", uid=TEAM_ID),
            _leaf_extensions(apple.EKU_DEVELOPER_ID_INSTALLER, apple.DEVELOPER_ID_INSTALLER),
        ),
        # A general-purpose ECDSA key: no code-signing EKU, so Apple-style identity searches for
        # "Demo Corp" or the team id stay unambiguous.
        "ecdsa-signing": (
            pki.name(f"{ORGANIZATION} ECDSA Signing", organization=ORGANIZATION, country="US"),
            [
                pki.Extension(x509.BasicConstraints(ca=False, path_length=None), critical=True),
                pki.Extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True),
            ],
        ),
    }
    project = directory.create_project(session, organization, PROJECT, "Demo project")
    user = directory.create_user(session, organization, CI_USER, "ci")
    for policy_slug, (profile, spec) in POLICIES.items():
        ref, row = _new_key(session, keystore, organization, profile, spec, "signing")
        subject, extensions = profiles[profile]
        _store(row, intermediate.issue(subject, keystore.public_key(ref), extensions, days=365 * 5), [inter_cert, root_cert])
        session.flush()
        policy = directory.create_policy(session, project, policy_slug, row)
        directory.add_submitter(session, policy, user=user)

    tsa_ref, tsa_row = _new_key(session, keystore, None, "demo-timestamp-authority", KeySpec.RSA_2048, "timestamping")
    tsa_cert = root.issue(
        pki.name("Demo Corp Timestamp Authority", organization=ORGANIZATION, country="US"),
        keystore.public_key(tsa_ref),
        [
            pki.Extension(x509.BasicConstraints(ca=False, path_length=None), critical=True),
            pki.Extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True),
            pki.Extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.TIME_STAMPING]), critical=True),
        ],
        days=365 * 10,
    )
    _store(tsa_row, tsa_cert, [root_cert])

    token = directory.create_token(session, user, description="demo CI token")
    session.flush()
    return DemoOrganization(
        organization_id=organization.id,
        api_token=token.value,
        project_slug=PROJECT,
        policy_slugs=tuple(POLICIES),
        root_pem=root_cert.public_bytes(serialization.Encoding.PEM).decode(),
        ci_user=CI_USER,
    )
