"""Signing mechanisms: what each one means as a :class:`SignatureRequest`, and one sign operation.

The token never signs locally. Every mechanism becomes one request for a signature over a digest:
CKM_RSA_PKCS takes a DigestInfo, CKM_RSA_PKCS_PSS and CKM_ECDSA take the digest itself, and the
SHA*-mechanisms hash the data here (single- or multi-part) first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ..crypto.hashes import HashAlgorithm
from ..crypto.signatures import (
    EcdsaFormat,
    Scheme,
    SignatureRequest,
    curve_size,
    ecdsa_der_to_ieee,
    verify_digest_signature,
)
from ..errors import SignatureError
from .constants import CKF, CKG, CKK, CKM, CKO, CKR, name
from .errors import Pkcs11Error
from .wire import Mechanism, PssParams

if TYPE_CHECKING:
    from .objects import TokenObject

# Raw mechanisms take a digest or a DigestInfo; more than this is never legitimate input.
MAX_RAW_INPUT = 1024


@dataclass(frozen=True)
class SignMechanism:
    type: CKM
    key_type: CKK
    scheme: Scheme
    hash: HashAlgorithm | None  # None: the caller passes the digest (or DigestInfo)


SIGN_MECHANISMS: dict[int, SignMechanism] = {
    spec.type: spec
    for spec in (
        SignMechanism(CKM.RSA_PKCS, CKK.RSA, Scheme.RSA_PKCS1, None),
        SignMechanism(CKM.SHA256_RSA_PKCS, CKK.RSA, Scheme.RSA_PKCS1, HashAlgorithm.SHA256),
        SignMechanism(CKM.SHA384_RSA_PKCS, CKK.RSA, Scheme.RSA_PKCS1, HashAlgorithm.SHA384),
        SignMechanism(CKM.SHA512_RSA_PKCS, CKK.RSA, Scheme.RSA_PKCS1, HashAlgorithm.SHA512),
        SignMechanism(CKM.RSA_PKCS_PSS, CKK.RSA, Scheme.RSA_PSS, None),
        SignMechanism(CKM.SHA256_RSA_PKCS_PSS, CKK.RSA, Scheme.RSA_PSS, HashAlgorithm.SHA256),
        SignMechanism(CKM.SHA384_RSA_PKCS_PSS, CKK.RSA, Scheme.RSA_PSS, HashAlgorithm.SHA384),
        SignMechanism(CKM.SHA512_RSA_PKCS_PSS, CKK.RSA, Scheme.RSA_PSS, HashAlgorithm.SHA512),
        SignMechanism(CKM.ECDSA, CKK.EC, Scheme.ECDSA, None),
        SignMechanism(CKM.ECDSA_SHA256, CKK.EC, Scheme.ECDSA, HashAlgorithm.SHA256),
        SignMechanism(CKM.ECDSA_SHA384, CKK.EC, Scheme.ECDSA, HashAlgorithm.SHA384),
        SignMechanism(CKM.ECDSA_SHA512, CKK.EC, Scheme.ECDSA, HashAlgorithm.SHA512),
    )
}

_PSS_HASHES = {
    CKM.SHA_1: (HashAlgorithm.SHA1, CKG.MGF1_SHA1),
    CKM.SHA224: (HashAlgorithm.SHA224, CKG.MGF1_SHA224),
    CKM.SHA256: (HashAlgorithm.SHA256, CKG.MGF1_SHA256),
    CKM.SHA384: (HashAlgorithm.SHA384, CKG.MGF1_SHA384),
    CKM.SHA512: (HashAlgorithm.SHA512, CKG.MGF1_SHA512),
}
_DIGEST_MECHANISM = {algorithm: mechanism for mechanism, (algorithm, _) in _PSS_HASHES.items()}
_ECDSA_DIGEST_SIZES = {
    algorithm.digest_size: algorithm
    for algorithm in (HashAlgorithm.SHA1, HashAlgorithm.SHA224, HashAlgorithm.SHA256,
                      HashAlgorithm.SHA384, HashAlgorithm.SHA512)
}  # fmt: skip


def pss_params(hash_algorithm: HashAlgorithm) -> PssParams:
    """The only PSS parameters the signing service accepts: MGF1 of the same hash, salt = hash size."""
    mechanism = _DIGEST_MECHANISM[hash_algorithm]
    return PssParams(mechanism, _PSS_HASHES[mechanism][1], hash_algorithm.digest_size)


@dataclass(frozen=True)
class MechanismInfo:
    min_key_size: int
    max_key_size: int
    flags: int


def mechanisms_for(objects: Iterable[TokenObject]) -> dict[int, MechanismInfo]:
    """The sign mechanisms the private keys among ``objects`` support, with key size ranges."""
    sizes: dict[int, list[int]] = {}
    for obj in objects:
        if obj.object_class == CKO.PRIVATE_KEY and obj.public_key is not None and obj.key_type is not None:
            sizes.setdefault(obj.key_type, []).append(obj.public_key.key_size)
    result = {}
    for spec in SIGN_MECHANISMS.values():
        if spec.key_type in sizes:
            flags = CKF.SIGN
            if spec.key_type == CKK.EC:
                flags |= CKF.EC_F_P | CKF.EC_NAMEDCURVE | CKF.EC_UNCOMPRESS
            bits = sizes[spec.key_type]
            result[int(spec.type)] = MechanismInfo(min(bits), max(bits), int(flags))
    return result


def signature_length(key: TokenObject) -> int:
    public_key = key.public_key
    if isinstance(public_key, rsa.RSAPublicKey):
        return (public_key.key_size + 7) // 8
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return 2 * curve_size(public_key.curve)
    raise Pkcs11Error(CKR.KEY_TYPE_INCONSISTENT, "the key is neither RSA nor EC")


class SignOperation:
    """One C_SignInit .. C_Sign/C_SignFinal: checks the mechanism and collects the input."""

    def __init__(self, key: TokenObject, mechanism: Mechanism) -> None:
        spec = SIGN_MECHANISMS.get(mechanism.type)
        if spec is None:
            raise Pkcs11Error(CKR.MECHANISM_INVALID, f"{name('CKM', mechanism.type)} cannot sign here")
        if key.key_type != spec.key_type:
            raise Pkcs11Error(CKR.KEY_TYPE_INCONSISTENT, f"{spec.type.name} does not fit this key")
        self.key = key
        self.spec = spec
        self.pss_hash = _check_parameter(spec, mechanism.parameter)
        self.signature_length = signature_length(key)
        self._hasher = spec.hash.new() if spec.hash else None
        self._raw = bytearray()
        self.multipart = False

    def update(self, data: bytes) -> None:
        self.multipart = True
        if self._hasher is not None:
            self._hasher.update(data)
            return
        if len(self._raw) + len(data) > MAX_RAW_INPUT:
            size = len(self._raw) + len(data)
            raise Pkcs11Error(CKR.DATA_LEN_RANGE, f"{self.spec.type.name} signs a digest, not {size} bytes")
        self._raw += data

    def request(self, data: bytes | None = None) -> SignatureRequest:
        """The digest to sign: of ``data`` (C_Sign) or of everything given to :meth:`update`."""
        if data is not None:
            self.update(data)
        if self._hasher is not None:
            assert self.spec.hash is not None
            return self._request(self._hasher.digest(), self.spec.hash)
        raw = bytes(self._raw)
        if self.spec.scheme is Scheme.RSA_PKCS1:
            try:
                algorithm, digest = HashAlgorithm.from_digest_info(raw)
            except SignatureError as exc:
                raise Pkcs11Error(CKR.DATA_INVALID, str(exc)) from None
            return self._request(digest, algorithm)
        if self.spec.scheme is Scheme.RSA_PSS:
            assert self.pss_hash is not None
            if len(raw) != self.pss_hash.digest_size:
                size = self.pss_hash.digest_size
                message = f"RSA-PSS with {self.pss_hash.title} signs a {size}-byte hash"
                raise Pkcs11Error(CKR.DATA_LEN_RANGE, message)
            return self._request(raw, self.pss_hash)
        algorithm = _ECDSA_DIGEST_SIZES.get(len(raw))
        if algorithm is None:
            raise Pkcs11Error(CKR.DATA_LEN_RANGE, f"ECDSA signs a SHA-1/2 hash, not {len(raw)} bytes")
        return self._request(raw, algorithm)

    def _request(self, digest: bytes, algorithm: HashAlgorithm) -> SignatureRequest:
        return SignatureRequest(digest, algorithm, self.spec.scheme, EcdsaFormat.IEEE)


def _check_parameter(spec: SignMechanism, parameter: object) -> HashAlgorithm | None:
    if spec.scheme is not Scheme.RSA_PSS:
        if parameter not in (None, b""):
            raise Pkcs11Error(CKR.MECHANISM_PARAM_INVALID, f"{spec.type.name} takes no parameter")
        return None
    if not isinstance(parameter, PssParams):
        raise Pkcs11Error(CKR.MECHANISM_PARAM_INVALID, f"{spec.type.name} needs CK_RSA_PKCS_PSS_PARAMS")
    algorithm, mgf = _PSS_HASHES.get(parameter.hash_alg, (None, None))
    if algorithm is None or (spec.hash is not None and algorithm is not spec.hash):
        wrong = name("CKM", parameter.hash_alg)
        raise Pkcs11Error(CKR.MECHANISM_PARAM_INVALID, f"PSS hash {wrong} does not fit {spec.type.name}")
    if parameter.mgf != mgf or parameter.salt_length != algorithm.digest_size:
        raise Pkcs11Error(
            CKR.MECHANISM_PARAM_INVALID,
            f"PSS here means MGF1 with {algorithm.title} and a {algorithm.digest_size}-byte salt",
        )
    return algorithm


def finish_signature(key: TokenObject, request: SignatureRequest, signature: bytes) -> bytes:
    """Bring the signer's answer to PKCS#11 form and check it against the key.

    ECDSA: r||s of twice the curve size (DER answers are converted). RSA: the modulus size.
    A signature that does not verify is CKR_DEVICE_ERROR: the consumer must never get one.
    """
    public_key = key.public_key
    size = signature_length(key)
    if isinstance(public_key, ec.EllipticCurvePublicKey) and len(signature) != size:
        try:
            signature = ecdsa_der_to_ieee(signature, public_key.curve)
        except SignatureError as exc:
            raise Pkcs11Error(CKR.DEVICE_ERROR, f"the signer returned {exc}") from None
    if isinstance(public_key, rsa.RSAPublicKey) and 0 < len(signature) < size:
        signature = signature.rjust(size, b"\0")
    if len(signature) != size:
        raise Pkcs11Error(CKR.DEVICE_ERROR, f"the signer returned {len(signature)} bytes, expected {size}")
    try:
        verify_digest_signature(public_key, request, signature)  # type: ignore[arg-type]
    except (SignatureError, UnsupportedAlgorithm) as exc:
        raise Pkcs11Error(CKR.DEVICE_ERROR, f"the signer's signature is unusable: {exc}") from None
    return signature
