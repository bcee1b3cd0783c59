"""Certificate hierarchies for tests, shaped like Apple's.

A root, a Developer ID-style intermediate carrying the 6.2.6 marker, and leaves with Apple's
critical marker extensions and code-signing or installer EKUs; plus the pieces to build others.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from signbridge.apple import certificates as apple

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
DAY = dt.timedelta(days=1)
NULL = b"\x05\x00"  # the value Apple's marker extensions carry

EKU_CODE = ExtendedKeyUsageOID.CODE_SIGNING
EKU_DEVID_INSTALLER = x509.ObjectIdentifier(apple.EKU_DEVELOPER_ID_INSTALLER)
EKU_MAC_INSTALLER = x509.ObjectIdentifier(apple.EKU_MAC_INSTALLER)


def name(common_name: str, team: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if team:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, team))
    attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, "signbridge tests"))
    return x509.Name(attributes)


def key_usage(**usages: bool) -> x509.KeyUsage:
    fields = [
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
        "encipher_only",
        "decipher_only",
    ]
    return x509.KeyUsage(**{field: usages.get(field, False) for field in fields})


def marker(oid: str, critical: bool = True) -> tuple[x509.ExtensionType, bool]:
    return x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), NULL), critical


def new_key(kind: str = "rsa"):
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key({"p256": ec.SECP256R1(), "p384": ec.SECP384R1()}[kind])


def certificate(
    subject: x509.Name,
    key,
    issuer: x509.Certificate | None = None,
    issuer_key=None,
    *,
    ca: bool | None = False,
    path_length: int | None = None,
    usage: x509.KeyUsage | None = None,
    eku: list[x509.ObjectIdentifier] | None = None,
    extensions: list[tuple[x509.ExtensionType, bool]] = (),
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> x509.Certificate:
    """A certificate; self-signed when ``issuer`` is None. ``ca=None`` leaves out basic constraints."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer is not None else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - 30 * DAY)
        .not_valid_after(not_after or NOW + 365 * DAY)
    )
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
    if usage is None:
        usage = key_usage(key_cert_sign=True, crl_sign=True) if ca else key_usage(digital_signature=True)
    builder = builder.add_extension(usage, critical=True)
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=True)
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key if issuer_key is not None else key, hashes.SHA256())


@dataclass
class Pki:
    """Apple-shaped: root -> Developer ID-style intermediate (6.2.6) -> leaves with Apple markers."""

    root: x509.Certificate
    root_key: object
    intermediate: x509.Certificate
    intermediate_key: object
    code: x509.Certificate  # Developer ID Application-style, RSA
    code_key: object
    installer: x509.Certificate  # Developer ID Installer-style, RSA
    installer_key: object
    ec_code: x509.Certificate  # codeSigning, P-256
    ec_code_key: object

    @property
    def chain(self) -> list[x509.Certificate]:
        """What a signature carries after the leaf: intermediate and root, as Apple's do."""
        return [self.intermediate, self.root]

    def leaf(self, key=None, **options) -> x509.Certificate:
        """Another leaf under the intermediate."""
        options.setdefault("eku", [EKU_CODE])
        subject = options.pop("subject", name("Developer ID Application: Test (TEAM123456)", "TEAM123456"))
        return certificate(subject, key or self.code_key, self.intermediate, self.intermediate_key, **options)


def make_pki(root_name: str = "Test Root CA") -> Pki:
    root_key = new_key("p384")
    root = certificate(name(root_name), root_key, ca=True)
    intermediate_key = new_key("p256")
    intermediate = certificate(
        name("Test Developer ID Certification Authority"),
        intermediate_key,
        root,
        root_key,
        ca=True,
        path_length=0,
        usage=key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True),
        extensions=[marker(apple.DEVELOPER_ID_INTERMEDIATE, critical=False)],
    )
    code_key, installer_key, ec_code_key = new_key("rsa"), new_key("rsa"), new_key("p256")
    code = certificate(
        name("Developer ID Application: Test (TEAM123456)", "TEAM123456"),
        code_key,
        intermediate,
        intermediate_key,
        eku=[EKU_CODE],
        extensions=[marker(apple.DEVELOPER_ID_APPLICATION), marker(apple.DEVELOPER_ID_DATE, critical=False)],
    )
    installer = certificate(
        name("Developer ID Installer: Test (TEAM123456)", "TEAM123456"),
        installer_key,
        intermediate,
        intermediate_key,
        eku=[EKU_DEVID_INSTALLER],
        extensions=[marker(apple.DEVELOPER_ID_INSTALLER)],
    )
    ec_code = certificate(
        name("EC Code Signer"), ec_code_key, intermediate, intermediate_key, eku=[EKU_CODE]
    )
    return Pki(root, root_key, intermediate, intermediate_key, code, code_key, installer, installer_key,
               ec_code, ec_code_key)  # fmt: skip


def write_pem(path: Path, *certificates: x509.Certificate) -> Path:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates))
    return path


def resign(cert: x509.Certificate, issuer_key, digest: hashes.HashAlgorithm) -> x509.Certificate:
    """``cert`` signed again by ``issuer_key`` with ``digest``, everything else kept.

    For digests cryptography no longer signs certificates with (SHA-1, as in Apple's older chains):
    the TBSCertificate is rewritten with asn1crypto and signed with the raw key.
    """
    is_rsa = isinstance(issuer_key, rsa.RSAPrivateKey)
    algorithm = asn1_x509.SignedDigestAlgorithm(
        {"algorithm": f"{digest.name}_{'rsa' if is_rsa else 'ecdsa'}", **({"parameters": None} if is_rsa else {})}
    )
    parsed = asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))
    tbs = parsed["tbs_certificate"].copy()
    tbs["signature"] = algorithm
    signed = tbs.dump(force=True)
    if is_rsa:
        signature = issuer_key.sign(signed, padding.PKCS1v15(), digest)
    else:
        signature = issuer_key.sign(signed, ec.ECDSA(digest))
    der = asn1_x509.Certificate(
        {"tbs_certificate": tbs, "signature_algorithm": algorithm, "signature_value": signature}
    ).dump()
    return x509.load_der_x509_certificate(der)


@dataclass
class Sha1Chain:
    """Shaped like Apple's older WWDR hierarchy: an RSA root and a WWDR-style intermediate (6.2.1),
    both signed with SHA-1, a "Mac Developer" leaf signed with SHA-256 and an "Apple Development"
    leaf signed with SHA-1."""

    root: x509.Certificate
    root_key: object
    intermediate: x509.Certificate
    intermediate_key: object
    mac_developer: x509.Certificate
    apple_development: x509.Certificate
    leaf_key: object


def make_sha1_chain() -> Sha1Chain:
    sha1 = hashes.SHA1()  # noqa: S303 - the point: Apple's older chains are signed with it
    root_key, intermediate_key, leaf_key = new_key("rsa"), new_key("rsa"), new_key("rsa")
    root = resign(certificate(name("Test Apple Root CA"), root_key, ca=True), root_key, sha1)
    wwdr = certificate(
        name("Test Worldwide Developer Relations Certification Authority"),
        intermediate_key,
        root,
        root_key,
        ca=True,
        extensions=[marker(apple.WWDR_INTERMEDIATE, critical=False)],
    )
    wwdr = resign(wwdr, root_key, sha1)
    mac_developer = certificate(
        name("Mac Developer: Test (TEAM123456)", "TEAM123456"),
        leaf_key,
        wwdr,
        intermediate_key,
        eku=[EKU_CODE],
        extensions=[marker(apple.MAC_DEVELOPER)],
    )
    apple_development = certificate(
        name("Apple Development: Test (TEAM123456)", "TEAM123456"),
        leaf_key,
        wwdr,
        intermediate_key,
        eku=[EKU_CODE],
        extensions=[marker(apple.IPHONE_DEVELOPER), marker(apple.MAC_DEVELOPER)],
    )
    apple_development = resign(apple_development, intermediate_key, sha1)
    return Sha1Chain(root, root_key, wwdr, intermediate_key, mac_developer, apple_development, leaf_key)
