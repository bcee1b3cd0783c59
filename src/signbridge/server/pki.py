"""Certificates and CSRs for keys that never leave the keystore.

cryptography's builders want a private key; ours live in a keystore (possibly an HSM). So the
to-be-signed part is built by cryptography with a stand-in key of the issuer's type (which fixes the
signature algorithm identifier), and the real signature over those exact bytes comes from the
keystore. CSRs are assembled with asn1crypto the same way.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Sequence
from dataclasses import dataclass

from asn1crypto import algos, core, csr, keys
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import NameOID

from ..crypto.hashes import HashAlgorithm
from ..crypto.signatures import (
    DigestSigner,
    EcdsaFormat,
    Scheme,
    SignatureRequest,
    verify_digest_signature,
)
from ..errors import SignatureError

"""Signs a digest with the issuer's key; ECDSA signatures come back DER-encoded."""


@dataclass(frozen=True)
class Extension:
    value: x509.ExtensionType
    critical: bool = False


def signing_hash(public_key: PublicKeyTypes) -> HashAlgorithm:
    if isinstance(public_key, ec.EllipticCurvePublicKey) and public_key.curve.key_size >= 384:
        return HashAlgorithm.SHA384
    return HashAlgorithm.SHA256


def scheme_for(public_key: PublicKeyTypes) -> Scheme:
    if isinstance(public_key, rsa.RSAPublicKey):
        return Scheme.RSA_PKCS1
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return Scheme.ECDSA
    raise SignatureError(f"unsupported key type {type(public_key).__name__}")


@functools.cache
def _stand_in_key(kind: str) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=1024)
    return ec.generate_private_key({"p256": ec.SECP256R1(), "p384": ec.SECP384R1()}[kind])


def _stand_in_for(public_key: PublicKeyTypes) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    if isinstance(public_key, rsa.RSAPublicKey):
        return _stand_in_key("rsa")
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return _stand_in_key("p384" if public_key.curve.key_size >= 384 else "p256")
    raise SignatureError(f"unsupported key type {type(public_key).__name__}")


def _sign_tbs(tbs: bytes, issuer_public_key: PublicKeyTypes, sign: DigestSigner) -> bytes:
    algorithm = signing_hash(issuer_public_key)
    request = SignatureRequest(algorithm.digest(tbs), algorithm, scheme_for(issuer_public_key))
    signature = sign(request)
    der_request = SignatureRequest(request.digest, algorithm, request.scheme, ecdsa_format=EcdsaFormat.ASN1)
    verify_digest_signature(issuer_public_key, der_request, signature)
    return signature


def _assemble(tbs: bytes, algorithm: bytes, signature: bytes) -> bytes:
    body = tbs + algorithm + core.OctetBitString(signature).dump()
    return core.Sequence(contents=body).dump()


def issue_certificate(
    *,
    subject: x509.Name,
    subject_public_key: PublicKeyTypes,
    issuer: x509.Certificate | None,
    issuer_public_key: PublicKeyTypes,
    sign: DigestSigner,
    extensions: Sequence[Extension],
    days: int,
    serial_number: int | None = None,
    not_before: dt.datetime | None = None,
) -> x509.Certificate:
    """Build and sign a certificate. ``issuer=None`` makes it self-signed (the issuer is the subject)."""
    start = not_before or (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)).replace(microsecond=0)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer is not None else subject)
        .public_key(subject_public_key)
        .serial_number(serial_number or x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public_key), critical=False)
    )
    for extension in extensions:
        builder = builder.add_extension(extension.value, critical=extension.critical)
    stand_in = builder.sign(_stand_in_for(issuer_public_key), signing_hash(issuer_public_key).cryptography_hash())
    tbs = stand_in.tbs_certificate_bytes
    algorithm = _signature_algorithm_der(stand_in)
    return x509.load_der_x509_certificate(_assemble(tbs, algorithm, _sign_tbs(tbs, issuer_public_key, sign)))


def _signature_algorithm_der(certificate: x509.Certificate) -> bytes:
    parsed = asn1_x509.Certificate.load(certificate.public_bytes(serialization.Encoding.DER))
    return parsed["signature_algorithm"].dump()


def build_csr(subject: x509.Name, public_key: PublicKeyTypes, sign: DigestSigner) -> x509.CertificateSigningRequest:
    """A PKCS#10 request for ``public_key``, signed by the keystore key that holds its private half."""
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    info = csr.CertificationRequestInfo(
        {
            "version": "v1",
            "subject": _asn1_name(subject),
            "subject_pk_info": keys.PublicKeyInfo.load(spki),
            "attributes": [],
        }
    )
    tbs = info.dump()
    algorithm = signing_hash(public_key)
    if isinstance(public_key, rsa.RSAPublicKey):
        algorithm_name = f"{algorithm.hashlib_name}_rsa"
    else:
        algorithm_name = f"{algorithm.hashlib_name}_ecdsa"
    signature = _sign_tbs(tbs, public_key, sign)
    request = csr.CertificationRequest(
        {
            "certification_request_info": info,
            "signature_algorithm": algos.SignedDigestAlgorithm({"algorithm": algorithm_name}),
            "signature": signature,
        }
    )
    loaded = x509.load_der_x509_csr(request.dump())
    if not loaded.is_signature_valid:
        raise SignatureError("the keystore produced an invalid CSR signature")
    return loaded


def _asn1_name(name: x509.Name) -> asn1_x509.Name:
    return asn1_x509.Name.load(name.public_bytes())


def name(
    common_name: str,
    *,
    organization: str | None = None,
    unit: str | None = None,
    country: str | None = None,
    uid: str | None = None,
) -> x509.Name:
    """A subject in Apple's order: UID, CN, OU, O, C."""
    attributes = []
    if uid:
        attributes.append(x509.NameAttribute(NameOID.USER_ID, uid))
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    if unit:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    if organization:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    if country:
        attributes.append(x509.NameAttribute(NameOID.COUNTRY_NAME, country))
    return x509.Name(attributes)


def fingerprint(certificate: x509.Certificate, algorithm: hashes.HashAlgorithm | None = None) -> str:
    return certificate.fingerprint(algorithm or hashes.SHA256()).hex()
