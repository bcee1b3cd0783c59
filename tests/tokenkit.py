"""Running test tokens without the daemon: an Apple-shaped PKI, a local signer standing in for the
signing service, and tokens served on real sockets with a registry record, as `signbridge start`
leaves them.

    runtime = use_runtime_dir(tmp_path, monkeypatch)     # SIGNBRIDGE_RUNTIME_DIR for this test
    pki = apple_pki()
    with serve_token("alpha", pki.identities, pki.authorities) as token:
        identity = select_identity("TEAM123456", usage=Usage.CODE)

The PKI: a self-signed RSA root, a Developer ID-style intermediate (marker 1.2.840.113635.100.6.2.6)
and three leaves: "Developer ID Application: <org> (<team>)" (codeSigning), "Developer ID
Installer: <org> (<team>)" (EKU 1.2.840.113635.100.4.13) and a P-256 document-signing leaf that
is for neither. Keys are RSA-2048 as Apple issues them, except the P-256 leaf.

Run as a program (``python tests/tokenkit.py serve NAME``) it serves such a token in the
environment's runtime directory, optionally registers it with p11-kit through a module file, prints
``ready`` and serves until its standard input closes: for tests that need the token in another
process, e.g. under another user.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

if __name__ == "__main__":  # run as a program: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from signbridge.apple.certificates import (
    DEVELOPER_ID_APPLICATION,
    DEVELOPER_ID_DATE,
    DEVELOPER_ID_INSTALLER,
    DEVELOPER_ID_INTERMEDIATE,
    EKU_DEVELOPER_ID_INSTALLER,
)
from signbridge.crypto.signatures import EcdsaFormat, Scheme, SignatureRequest, ecdsa_der_to_ieee, pss_padding
from signbridge.pkcs11 import (
    CKO,
    CallerInfo,
    Pkcs11Server,
    Token,
    TokenObject,
    authority_object,
    objects_for_identity,
    serve,
)
from signbridge.provider import registry

TEAM = "TEAM123456"
ORGANIZATION = "Test Corp"
PIN = "CONFIG"
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class KeyedCertificate:
    """A certificate with its private key and the CKA_ID/CKA_LABEL it gets on a token."""

    certificate: x509.Certificate
    key: PrivateKey = field(repr=False)
    key_id: str = ""
    label: str = ""

    @property
    def common_name(self) -> str:
        return str(self.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)

    @property
    def sha1(self) -> str:
        return self.certificate.fingerprint(hashes.SHA1()).hex().upper()  # noqa: S324 - Apple's identifier

    @property
    def sha256(self) -> str:
        return self.certificate.fingerprint(hashes.SHA256()).hex().upper()

    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class ApplePki:
    root: KeyedCertificate
    intermediate: KeyedCertificate
    application: KeyedCertificate
    installer: KeyedCertificate
    document: KeyedCertificate  # P-256, neither code nor installer signing

    @property
    def identities(self) -> tuple[KeyedCertificate, ...]:
        return (self.application, self.installer, self.document)

    @property
    def authorities(self) -> tuple[x509.Certificate, ...]:
        return (self.intermediate.certificate, self.root.certificate)

    def write(self, directory: Path) -> None:
        """``root.pem``, ``intermediate.pem``, ``application.pem``, ... and their ``.pub`` keys."""
        for name in ("root", "intermediate", "application", "installer", "document"):
            item: KeyedCertificate = getattr(self, name)
            (directory / f"{name}.pem").write_bytes(item.pem())
            (directory / f"{name}.pub").write_bytes(
                item.certificate.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )


def apple_name(common_name: str, organization: str | None = None, team: str | None = None) -> x509.Name:
    """A subject as Apple writes it: UID=<team>, CN, OU=<team>, O, C."""
    attributes = []
    if team:
        attributes.append(x509.NameAttribute(NameOID.USER_ID, team))
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    if team:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, team))
    if organization:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    attributes.append(x509.NameAttribute(NameOID.COUNTRY_NAME, "US"))
    return x509.Name(attributes)


def _marker(oid: str, critical: bool = True, value: bytes = b"\x05\x00") -> tuple[x509.ExtensionType, bool]:
    return x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value), critical


def _developer_id_date() -> tuple[x509.ExtensionType, bool]:
    """Marker 6.1.33 "Developer ID Date" as Apple's leaves carry it: UTCTime 2021-04-22."""
    return _marker(DEVELOPER_ID_DATE, critical=False, value=b"\x17\x0d210422000000Z")


def issue(
    subject: x509.Name,
    key: PrivateKey,
    issuer: KeyedCertificate | None,
    *,
    ca: bool = False,
    ekus: Sequence[x509.ObjectIdentifier] = (),
    markers: Sequence[tuple[x509.ExtensionType, bool]] = (),
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    key_id: str = "",
    label: str = "",
) -> KeyedCertificate:
    """A certificate for ``key`` signed by ``issuer`` (self-signed when None), SHA-256."""
    now = datetime.datetime.now(datetime.UTC)
    issuer_name = subject if issuer is None else issuer.certificate.subject
    signing_key = key if issuer is None else issuer.key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - datetime.timedelta(days=1))
        .not_valid_after(not_after or now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca and issuer else None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False
        )
    if ekus:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(ekus)), critical=True)
    for extension, critical in markers:
        builder = builder.add_extension(extension, critical=critical)
    certificate = builder.sign(signing_key, hashes.SHA256())
    return KeyedCertificate(certificate, key, key_id, label)


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


def developer_id_application(
    intermediate: KeyedCertificate,
    organization: str = ORGANIZATION,
    team: str = TEAM,
    *,
    key_id: str = "project/release-signing",
    **options,
) -> KeyedCertificate:
    """A "Developer ID Application: <org> (<team>)" leaf (codeSigning + marker 6.1.13)."""
    return issue(
        apple_name(f"Developer ID Application: {organization} ({team})", organization, team),
        rsa_key(),
        intermediate,
        ekus=[ExtendedKeyUsageOID.CODE_SIGNING],
        markers=[_marker(DEVELOPER_ID_APPLICATION), _developer_id_date()],
        key_id=key_id,
        label=key_id,
        **options,
    )


def developer_id_installer(
    intermediate: KeyedCertificate,
    organization: str = ORGANIZATION,
    team: str = TEAM,
    *,
    key_id: str = "project/installer-signing",
    **options,
) -> KeyedCertificate:
    """A "Developer ID Installer: <org> (<team>)" leaf (EKU 100.4.13 + marker 6.1.14)."""
    return issue(
        apple_name(f"Developer ID Installer: {organization} ({team})", organization, team),
        rsa_key(),
        intermediate,
        ekus=[x509.ObjectIdentifier(EKU_DEVELOPER_ID_INSTALLER)],
        markers=[_marker(DEVELOPER_ID_INSTALLER), _developer_id_date()],
        key_id=key_id,
        label=key_id,
        **options,
    )


def apple_pki(
    organization: str = ORGANIZATION, team: str = TEAM, *, issuer: ApplePki | None = None
) -> ApplePki:
    """Root, Developer ID-style intermediate and the three leaves; ``issuer`` reuses its root and
    intermediate (another organization under the same CA)."""
    if issuer is None:
        root = issue(apple_name("Test Apple Root CA", "Test Apple"), rsa_key(), None, ca=True)
        intermediate = issue(
            apple_name("Test Developer ID Certification Authority", "Test Apple"),
            rsa_key(),
            root,
            ca=True,
            markers=[_marker(DEVELOPER_ID_INTERMEDIATE, critical=False)],
        )
    else:
        root, intermediate = issuer.root, issuer.intermediate
    slug = organization.lower().replace(" ", "-")
    application = developer_id_application(intermediate, organization, team, key_id=f"{slug}/release-signing")
    installer = developer_id_installer(intermediate, organization, team, key_id=f"{slug}/installer-signing")
    document = issue(
        apple_name(f"{organization} Document Signing ({team})", organization, team),
        ec.generate_private_key(ec.SECP256R1()),
        intermediate,
        ekus=[ExtendedKeyUsageOID.EMAIL_PROTECTION],
        key_id=f"{slug}/documents",
        label=f"{slug}/documents",
    )
    return ApplePki(root, intermediate, application, installer, document)


@dataclass
class LocalSigner:
    """The test double of the signing service: signs each digest with the local key of the CKA_ID,
    and records what it was asked."""

    keys: dict[bytes, PrivateKey]
    requests: list[tuple[str, SignatureRequest]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def of(cls, identities: Sequence[KeyedCertificate]) -> LocalSigner:
        return cls({identity.key_id.encode(): identity.key for identity in identities})

    def __call__(self, key: TokenObject, request: SignatureRequest, caller: CallerInfo) -> bytes:
        with self._lock:
            self.requests.append((key.label, request))
        private = self.keys[key.id]
        prehashed = utils.Prehashed(request.hash_algorithm.cryptography_hash())
        if isinstance(private, rsa.RSAPrivateKey):
            if request.scheme is Scheme.RSA_PSS:
                return private.sign(request.digest, pss_padding(request.hash_algorithm), prehashed)
            return private.sign(request.digest, padding.PKCS1v15(), prehashed)
        der = private.sign(request.digest, ec.ECDSA(prehashed))
        if request.ecdsa_format is EcdsaFormat.ASN1:
            return der
        return ecdsa_der_to_ieee(der, private.curve)


@dataclass
class TestToken:
    """A token served on its registry socket, with its record written: stop() or use ``with``."""

    __test__ = False  # not a pytest class

    name: str
    server: Pkcs11Server
    signer: LocalSigner
    record: registry.TokenRecord

    @property
    def socket(self) -> str:
        return self.record.socket

    def stop(self, *, keep_record: bool = False) -> None:
        """Stop serving; the record stays behind (stale) with ``keep_record``."""
        self.server.close()
        if not keep_record:
            (self.record.directory / registry.RECORD).unlink(missing_ok=True)

    def __enter__(self) -> TestToken:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def use_runtime_dir(directory: Path, monkeypatch) -> Path:
    """Point the registry at ``directory/run`` (0700) for the rest of the test."""
    runtime = directory / "run"
    runtime.mkdir(mode=0o700, exist_ok=True)
    monkeypatch.setenv("SIGNBRIDGE_RUNTIME_DIR", str(runtime))
    return runtime


def serve_token(
    name: str,
    identities: Sequence[KeyedCertificate],
    authorities: Sequence[x509.Certificate] = (),
    *,
    pin: str = PIN,
    module_file: str | None = None,
    version: str = "0.1.0",
) -> TestToken:
    """Serve ``identities`` (certificate + keys, CKA_ID = key_id) and ``authorities`` as token
    ``name`` on ``<runtime dir>/tokens/<name>/pkcs11.sock`` and write its registry record."""
    objects: list[TokenObject] = []
    for identity in identities:
        label = identity.label or identity.key_id
        objects.extend(objects_for_identity(identity.certificate, identity.key_id, label))
    objects.extend(authority_object(certificate) for certificate in authorities)
    return serve_objects(
        name, objects, LocalSigner.of(identities), pin=pin, module_file=module_file, version=version
    )


def serve_objects(
    name: str,
    objects: Sequence[TokenObject],
    signer: LocalSigner,
    *,
    pin: str = PIN,
    module_file: str | None = None,
    version: str = "0.1.0",
) -> TestToken:
    """Serve hand-built token objects as token ``name`` and write its registry record."""
    directory = registry.tokens_dir() / name
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = Token(name, objects, signer, lambda offered: offered == pin.encode())
    server = serve(directory / registry.SOCKET, token)
    record = _record(name, os.getpid(), directory, module_file=module_file, version=version)
    keys = sum(1 for obj in objects if obj.object_class == CKO.PRIVATE_KEY)
    record = dataclasses.replace(record, identities=keys)
    registry.write_record(record)
    return TestToken(name, server, signer, record)


def _record(
    name: str, pid: int, directory: Path, *, module_file: str | None = None, version: str = "0.1.0"
) -> registry.TokenRecord:
    return registry.TokenRecord(
        name=name,
        pid=pid,
        socket=str(directory / registry.SOCKET),
        api_url="http://127.0.0.1:9/Api",
        organization_id="00000000-0000-0000-0000-000000000000",
        project_slug=None,
        signing_policy_slug=None,
        version=version,
        started=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        module_file=module_file,
        identities=1,
    )


def write_stale_record(name: str) -> registry.TokenRecord:
    """The record a token leaves when it is killed: its process is gone and nothing listens."""
    directory = registry.tokens_dir() / name
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    process = subprocess.Popen(["true"])
    process.wait()
    record = _record(name, process.pid, directory)
    registry.write_record(record)
    return record


def _main(argv: Sequence[str]) -> int:
    """``serve NAME [--module-dir DIR]``: serve an Apple PKI token until stdin closes."""
    if len(argv) < 2 or argv[0] != "serve":
        print("usage: tokenkit.py serve NAME [--module-dir DIR]", file=sys.stderr)
        return 2
    name = argv[1]
    module_file = None
    if "--module-dir" in argv:
        module_dir = Path(argv[argv.index("--module-dir") + 1])
        module_dir.mkdir(parents=True, exist_ok=True)
        module_file = str(module_dir / f"signbridge-{name}.module")
    pki = apple_pki()
    token = serve_token(name, pki.identities, pki.authorities, module_file=module_file)
    if module_file:
        Path(module_file).write_text(f"remote: unix:path={token.socket}\n")
    print("ready", flush=True)
    sys.stdin.read()
    token.stop()
    if module_file:
        Path(module_file).unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
