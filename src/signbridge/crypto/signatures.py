"""Signature schemes, their encodings, and verification of a signature over a digest."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa, utils
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from ..errors import SignatureError
from .hashes import HashAlgorithm


class Scheme(enum.Enum):
    RSA_PKCS1 = "RsaPkcs1"
    RSA_PSS = "RsaPss"
    ECDSA = "Ecdsa"


class EcdsaFormat(enum.Enum):
    IEEE = "Ieee"  # r || s, each the size of the curve order (IEEE P1363)
    ASN1 = "Asn1"  # DER SEQUENCE { r, s } (RFC 3279)


@dataclass(frozen=True)
class SignatureRequest:
    """What a caller asks to have signed: a digest, its algorithm, and the scheme."""

    digest: bytes
    hash_algorithm: HashAlgorithm
    scheme: Scheme
    ecdsa_format: EcdsaFormat = EcdsaFormat.IEEE

    def __post_init__(self) -> None:
        self.hash_algorithm.check_digest(self.digest)


DigestSigner = Callable[[SignatureRequest], bytes]
"""Signs ``request.digest`` with a key that may live anywhere (a token, a keystore, a test's key).

RSA: PKCS#1 v1.5 or PSS per ``request.scheme``. ECDSA: in the format the signer documents (a
token key and every identity's ``sign``: DER), which whoever uses the signature names when it
checks it (``sign_detached``'s ``ecdsa_format``)."""


def curve_size(curve: ec.EllipticCurve) -> int:
    return (curve.key_size + 7) // 8


def ecdsa_der_to_ieee(signature: bytes, curve: ec.EllipticCurve) -> bytes:
    """DER ``SEQUENCE {r, s}`` to r || s, each the curve's size (:class:`SignatureError` if it cannot be)."""
    try:
        r, s = utils.decode_dss_signature(signature)
    except ValueError:
        raise SignatureError("a malformed ECDSA signature") from None
    size = curve_size(curve)
    if r.bit_length() > 8 * size or s.bit_length() > 8 * size:
        raise SignatureError("an ECDSA signature for another curve")
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def ecdsa_ieee_to_der(signature: bytes, curve: ec.EllipticCurve) -> bytes:
    size = curve_size(curve)
    if len(signature) != 2 * size:
        raise SignatureError(f"an IEEE P1363 signature on {curve.name} is {2 * size} bytes, not {len(signature)}")
    return utils.encode_dss_signature(int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big"))


def pss_padding(hash_algorithm: HashAlgorithm) -> padding.PSS:
    """PSS as SignPath and Apple use it: MGF1 with the message hash, salt as long as the hash."""
    return padding.PSS(mgf=padding.MGF1(hash_algorithm.cryptography_hash()), salt_length=hash_algorithm.digest_size)


def verify_digest_signature(
    public_key: PublicKeyTypes, request: SignatureRequest, signature: bytes, *, pss: padding.PSS | None = None
) -> None:
    """Raise :class:`SignatureError` unless ``signature`` is a valid signature of ``request`` by ``public_key``.

    The one check of a signature over a digest: signing responses, CMS signers, timestamp tokens.
    ECDSA signatures are expected in ``request.ecdsa_format``; RSA-PSS uses ``pss`` when the
    signature names its own parameters, else :func:`pss_padding`.
    """
    prehashed = utils.Prehashed(request.hash_algorithm.cryptography_hash())
    try:
        if isinstance(public_key, rsa.RSAPublicKey):
            if request.scheme is Scheme.RSA_PKCS1:
                public_key.verify(signature, request.digest, padding.PKCS1v15(), prehashed)
            elif request.scheme is Scheme.RSA_PSS:
                public_key.verify(signature, request.digest, pss or pss_padding(request.hash_algorithm), prehashed)
            else:
                raise SignatureError(f"an RSA key cannot make {request.scheme.value} signatures")
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            if request.scheme is not Scheme.ECDSA:
                raise SignatureError(f"an ECDSA key cannot make {request.scheme.value} signatures")
            der = signature
            if request.ecdsa_format is EcdsaFormat.IEEE:
                der = ecdsa_ieee_to_der(signature, public_key.curve)
            public_key.verify(der, request.digest, ec.ECDSA(prehashed))
        else:
            raise SignatureError(f"unsupported key type {type(public_key).__name__}")
    except InvalidSignature:
        raise SignatureError("the signature does not verify against the certificate's public key") from None
    except ValueError as exc:
        raise SignatureError(f"the signature is malformed: {exc}") from None


# Digests no certificate signature may rely on: collisions can be made for them at will, and Apple's
# trust evaluation refuses certificates signed with them. SHA-1 is not among them: Apple's older
# chains (Apple Root CA, the first WWDR intermediate) are signed with it and still trusted.
_BROKEN_CERTIFICATE_DIGESTS = frozenset({"md2", "md4", "md5"})


class CertificateSignatureError(SignatureError):
    """A certificate was not signed by the certificate it names as its issuer.

    ``reason`` completes a sentence about the pair: "its signature does not verify with that
    certificate's key".
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def verify_certificate_signature(certificate: x509.Certificate, issuer: x509.Certificate) -> None:
    """Raise :class:`CertificateSignatureError` unless ``issuer`` signed ``certificate``.

    The one check of a certificate's signature that every chain in signbridge goes through:
    whatever algorithm signed the certificate (RSA PKCS#1 v1.5 or PSS, ECDSA, EdDSA, DSA; SHA-1 or
    SHA-2), except digests broken for signatures (MD2, MD4, MD5). The issuer's subject must also be
    the certificate's issuer name.
    """

    def fail(reason: str) -> CertificateSignatureError:
        return CertificateSignatureError(
            f"{_subject(certificate)} names {_subject(issuer)} as its issuer, but {reason}", reason
        )

    if certificate.issuer != issuer.subject:
        raise fail("that certificate's subject is a different name")
    try:
        digest = certificate.signature_hash_algorithm
        parameters = certificate.signature_algorithm_parameters
        public_key = issuer.public_key()
    except (UnsupportedAlgorithm, ValueError):
        oid = certificate.signature_algorithm_oid.dotted_string
        raise fail(f"its signature algorithm ({oid}) or that certificate's key is of an unsupported kind") from None
    if digest is not None and digest.name in _BROKEN_CERTIFICATE_DIGESTS:
        raise fail(f"its signature uses {digest.name.upper()}, which is too weak to trust")
    signature, signed = certificate.signature, certificate.tbs_certificate_bytes
    try:
        if isinstance(public_key, rsa.RSAPublicKey) and digest is not None:
            rsa_padding = parameters if isinstance(parameters, padding.PSS) else padding.PKCS1v15()
            public_key.verify(signature, signed, rsa_padding, digest)
        elif isinstance(public_key, ec.EllipticCurvePublicKey) and digest is not None:
            public_key.verify(signature, signed, ec.ECDSA(digest))
        elif isinstance(public_key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            public_key.verify(signature, signed)
        elif isinstance(public_key, dsa.DSAPublicKey) and digest is not None:
            public_key.verify(signature, signed, digest)
        else:
            raise fail(
                f"its signature algorithm ({certificate.signature_algorithm_oid.dotted_string}) does not fit "
                f"that certificate's {type(public_key).__name__}"
            )
    except (InvalidSignature, ValueError):
        raise fail("its signature does not verify with that certificate's key") from None


def _subject(certificate: x509.Certificate) -> str:
    return f'"{certificate.subject.rfc4514_string() or "(no subject)"}"'
