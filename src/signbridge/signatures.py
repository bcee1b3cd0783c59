"""Signature schemes, their encodings, and verification of a signature over a digest."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from .errors import SignatureError
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


def curve_size(curve: ec.EllipticCurve) -> int:
    return (curve.key_size + 7) // 8


def ecdsa_der_to_ieee(signature: bytes, curve: ec.EllipticCurve) -> bytes:
    r, s = utils.decode_dss_signature(signature)
    size = curve_size(curve)
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def ecdsa_ieee_to_der(signature: bytes, curve: ec.EllipticCurve) -> bytes:
    size = curve_size(curve)
    if len(signature) != 2 * size:
        raise SignatureError(f"an IEEE P1363 signature on {curve.name} is {2 * size} bytes, not {len(signature)}")
    return utils.encode_dss_signature(int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big"))


def pss_padding(hash_algorithm: HashAlgorithm) -> padding.PSS:
    """PSS as SignPath and Apple use it: MGF1 with the message hash, salt as long as the hash."""
    return padding.PSS(mgf=padding.MGF1(hash_algorithm.cryptography_hash()), salt_length=hash_algorithm.digest_size)


def verify_digest_signature(public_key: PublicKeyTypes, request: SignatureRequest, signature: bytes) -> None:
    """Raise :class:`SignatureError` unless ``signature`` is a valid signature of ``request`` by ``public_key``.

    ECDSA signatures are expected in ``request.ecdsa_format``.
    """
    prehashed = utils.Prehashed(request.hash_algorithm.cryptography_hash())
    try:
        if isinstance(public_key, rsa.RSAPublicKey):
            if request.scheme is Scheme.RSA_PKCS1:
                public_key.verify(signature, request.digest, padding.PKCS1v15(), prehashed)
            elif request.scheme is Scheme.RSA_PSS:
                public_key.verify(signature, request.digest, pss_padding(request.hash_algorithm), prehashed)
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
