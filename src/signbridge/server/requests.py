"""Parsing the two hash-signing request shapes into one :class:`HashSigningRequest`.

``SignHash`` (JSON, camelCase) and the legacy fast signing request (multipart with a payload.json
artifact, PascalCase). Property names are matched case-insensitively, as SignPath's service does.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from ..crypto.hashes import HashAlgorithm
from ..crypto.signatures import EcdsaFormat, Scheme, SignatureRequest
from ..errors import SignatureError
from .problems import bad_request

MAX_METADATA_BYTES = 16 * 1024
_ECDSA_HASH_BY_LENGTH = {a.digest_size: a for a in (HashAlgorithm.SHA1, HashAlgorithm.SHA256, HashAlgorithm.SHA384, HashAlgorithm.SHA512)}


@dataclass(frozen=True)
class HashSigningRequest:
    project_slug: str
    policy_slug: str
    signature: SignatureRequest
    metadata: str | None  # JSON text, as sent


def get(obj: dict[str, Any], name: str) -> Any:
    """``obj[name]`` matched case-insensitively, or None."""
    if name in obj:
        return obj[name]
    lowered = name.lower()
    for key, value in obj.items():
        if key.lower() == lowered:
            return value
    return None


def _text(obj: dict[str, Any], name: str, *, required: bool = True) -> str | None:
    value = get(obj, name)
    if value is None or value == "":
        if required:
            raise bad_request(f"The {name} field is required.", name)
        return None
    if not isinstance(value, str):
        raise bad_request(f"The {name} field must be a string.", name)
    return value


def _object(obj: dict[str, Any], name: str) -> dict[str, Any]:
    value = get(obj, name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_request(f"The {name} field must be an object.", name)
    return value


def decode_hash(text: str, field: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"The {field} field is not valid base64.", field) from None


def _metadata(value: Any) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), sort_keys=True)
    if len(text.encode()) > MAX_METADATA_BYTES:
        raise bad_request(f"The metadata is larger than {MAX_METADATA_BYTES} bytes.", "metadata")
    return text


def _rsa_hash(name: str | None, oid: str | None, field: str) -> HashAlgorithm:
    try:
        if oid:
            return HashAlgorithm.from_oid(oid)
        if name:
            return HashAlgorithm.from_name(name)
    except SignatureError as exc:
        raise bad_request(f"{exc}.", field) from None
    raise bad_request("The hash algorithm is required for RSA signatures.", field)


def _signature_request(
    digest: bytes, hash_algorithm: HashAlgorithm, scheme: Scheme, ecdsa_format: EcdsaFormat, field: str
) -> SignatureRequest:
    try:
        return SignatureRequest(digest, hash_algorithm, scheme, ecdsa_format)
    except SignatureError:
        raise bad_request(
            f"The hash algorithm does not match the given hash: a {hash_algorithm.title} hash is "
            f"{hash_algorithm.digest_size} bytes, this one is {len(digest)}.",
            field,
        ) from None


def _ecdsa_format(text: str | None, field: str) -> EcdsaFormat:
    if text is None:
        return EcdsaFormat.IEEE
    for value in EcdsaFormat:
        if value.value.lower() == text.lower():
            return value
    raise bad_request(f"Unknown ECDSA signature format {text!r}; use Ieee or Asn1.", field)


def _ecdsa_hash(digest: bytes, field: str) -> HashAlgorithm:
    algorithm = _ECDSA_HASH_BY_LENGTH.get(len(digest))
    if algorithm is None:
        raise bad_request(f"A {len(digest)}-byte hash is not a SHA-1 or SHA-2 hash.", field)
    return algorithm


def parse_sign_hash(body: Any) -> HashSigningRequest:
    """The JSON body of ``POST SigningRequests/SignHash``."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    project = _text(body, "projectSlug")
    policy = _text(body, "signingPolicySlug")
    data = get(body, "hashSigningData")
    if not isinstance(data, dict):
        raise bad_request("The hashSigningData field is required.", "hashSigningData")
    digest = decode_hash(_text(data, "hash") or "", "hashSigningData.hash")
    algorithm = (_text(data, "signatureAlgorithm") or "").lower()
    rsa_options = _object(data, "rsaOptions")
    ecdsa_options = _object(data, "ecdsaOptions")
    field = "hashSigningData.signatureAlgorithm"
    if algorithm in ("rsa", "rsapkcs1", "rsapss"):
        padding = (_text(rsa_options, "paddingMode", required=False) or ("Pss" if algorithm == "rsapss" else "Pkcs1")).lower()
        if padding not in ("pkcs1", "pss"):
            raise bad_request(f"Unknown RSA padding mode {padding!r}; use Pkcs1 or Pss.", "rsaOptions.paddingMode")
        hash_algorithm = _rsa_hash(
            _text(rsa_options, "hashAlgorithmName", required=False),
            _text(rsa_options, "hashAlgorithmOid", required=False),
            "rsaOptions.hashAlgorithmName",
        )
        scheme = Scheme.RSA_PSS if padding == "pss" else Scheme.RSA_PKCS1
        request = _signature_request(digest, hash_algorithm, scheme, EcdsaFormat.IEEE, "hashSigningData.hash")
    elif algorithm in ("ecdsa", "ecdesa"):
        ecdsa_format = _ecdsa_format(_text(ecdsa_options, "signatureFormat", required=False), "ecdsaOptions.signatureFormat")
        hash_algorithm = _ecdsa_hash(digest, "hashSigningData.hash")
        request = _signature_request(digest, hash_algorithm, Scheme.ECDSA, ecdsa_format, "hashSigningData.hash")
    else:
        raise bad_request(f"Unsupported signature algorithm {algorithm!r}; use Rsa or Ecdsa.", field)
    return HashSigningRequest(project, policy, request, _metadata(get(data, "metadata")))  # type: ignore[arg-type]


def parse_fast_signing_payload(project: str, policy: str, payload: Any) -> HashSigningRequest:
    """The ``Artifact`` (payload.json) of a legacy fast signing request."""
    if not isinstance(payload, dict):
        raise bad_request("The artifact must be a JSON object.", "Artifact")
    digest = decode_hash(_text(payload, "Base64EncodedHash") or "", "Base64EncodedHash")
    algorithm = _text(payload, "SignatureAlgorithm") or ""
    if algorithm.lower() in ("rsapkcs1", "rsapss"):
        hash_algorithm = _rsa_hash(None, _text(payload, "RsaHashAlgorithm"), "RsaHashAlgorithm")
        scheme = Scheme.RSA_PSS if algorithm.lower() == "rsapss" else Scheme.RSA_PKCS1
        request = _signature_request(digest, hash_algorithm, scheme, EcdsaFormat.IEEE, "Base64EncodedHash")
    elif algorithm.lower() == "ecdsa":
        ecdsa_format = _ecdsa_format(_text(payload, "EcdsaSignatureFormat", required=False), "EcdsaSignatureFormat")
        request = _signature_request(
            digest, _ecdsa_hash(digest, "Base64EncodedHash"), Scheme.ECDSA, ecdsa_format, "Base64EncodedHash"
        )
    else:
        raise bad_request(
            f"Unsupported signature algorithm {algorithm!r}; use RsaPkcs1, RsaPss or Ecdsa.", "SignatureAlgorithm"
        )
    return HashSigningRequest(project, policy, request, _metadata(get(payload, "Metadata")))
