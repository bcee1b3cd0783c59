"""Making Apple's CMS signatures: the CDHashes attributes of code signatures, signing a CodeDirectory
or a package's table of contents, and asking a TSA to timestamp them.

One implementation serves ``codesign`` (the content is the primary CodeDirectory) and
``productsign`` (the content is the package's TOC checksum). :func:`sign_detached` builds the signed
attributes (with Apple's CDHashes for code), has the signer sign their digest, and leaves checking
the signature, timestamping it and encoding the CMS to
:func:`signbridge.crypto.cms_builder.assemble_signed_data`. :mod:`signbridge.apple.codesig.cms`
reads them back.
"""

from __future__ import annotations

import os
import plistlib
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ...crypto.chains import unique_certificates
from ...crypto.cms import ID_DATA
from ...crypto.cms_builder import (
    assemble_signed_data,
    encode_attribute,
    encode_signed_attributes,
    encode_signed_data,
    scheme_for,
    signed_attributes_digest,
)
from ...crypto.der_encoding import encode_octet_string, encode_oid, encode_sequence
from ...crypto.hashes import HashAlgorithm
from ...crypto.signatures import DigestSigner, EcdsaFormat, SignatureRequest, curve_size
from ...errors import SignatureError
from .cms import ATTR_APPLE_CDHASHES, ATTR_APPLE_CDHASHES2, check_imprint

if TYPE_CHECKING:
    import httpx

    from ...crypto.timestamps import TimestampToken

CDHASH_SIZE = 20  # CS_CDHASH_LEN: every cdhash in the plist attribute is truncated to this
TIMESTAMP_RESERVE = 8192  # room kept for a timestamp token; Apple's are about 4200 bytes


Timestamper = Callable[[bytes], "TimestampToken"]


def build_cdhashes_plist(cdhashes: Sequence[bytes]) -> bytes:
    """The value of Apple's CDHashes attribute: an XML plist listing each CodeDirectory's cdhash
    (primary first), truncated to 20 bytes."""
    for cdhash in cdhashes:
        if len(cdhash) < CDHASH_SIZE:
            raise SignatureError(f"a cdhash is at least {CDHASH_SIZE} bytes long, not {len(cdhash)}")
    return plistlib.dumps({"cdhashes": [bytes(cdhash[:CDHASH_SIZE]) for cdhash in cdhashes]})


def build_signed_attributes(
    content_digest: bytes,
    *,
    hash_algorithm: HashAlgorithm = HashAlgorithm.SHA256,
    signing_time: datetime | None = None,
    include_signing_time: bool = True,
    cdhashes_plist: bytes | None = None,
    cdhashes2: Sequence[tuple[HashAlgorithm, bytes]] | None = None,
    content_type: str = ID_DATA,
) -> bytes:
    """The DER SET OF signed attributes (tag 0x31, DER-sorted) for a signature over content whose
    ``hash_algorithm`` digest is ``content_digest``.

    Always contentType and messageDigest; signingTime (now unless given) unless
    ``include_signing_time`` is false; Apple's CDHashes (``cdhashes_plist``, see
    :func:`build_cdhashes_plist`) and CDHashes2 (``cdhashes2``: each CodeDirectory's hash algorithm and
    full cdhash) for code signatures. Packages use neither Apple attribute.
    """
    extra = []
    if cdhashes_plist is not None:
        extra.append(encode_attribute(ATTR_APPLE_CDHASHES, [encode_octet_string(cdhashes_plist)]))
    if cdhashes2 is not None:
        if not cdhashes2:
            raise SignatureError("the CDHashes2 attribute needs at least one code directory hash")
        values = []
        for algorithm, cdhash in cdhashes2:
            algorithm.check_digest(cdhash)
            values.append(encode_sequence(encode_oid(algorithm.oid), encode_octet_string(cdhash)))
        extra.append(encode_attribute(ATTR_APPLE_CDHASHES2, values))
    return encode_signed_attributes(
        content_digest,
        hash_algorithm=hash_algorithm,
        signing_time=signing_time,
        include_signing_time=include_signing_time,
        content_type=content_type,
        extra=extra,
    )


def sign_detached(
    content_digest: bytes,
    signer: DigestSigner,
    certificate: x509.Certificate,
    chain: Sequence[x509.Certificate] = (),
    *,
    hash_algorithm: HashAlgorithm = HashAlgorithm.SHA256,
    timestamp: Timestamper | None = None,
    signed_attributes: bool = True,
    signing_time: datetime | None = None,
    include_signing_time: bool = True,
    cdhashes_plist: bytes | None = None,
    cdhashes2: Sequence[tuple[HashAlgorithm, bytes]] | None = None,
    content_type: str = ID_DATA,
    ecdsa_format: EcdsaFormat = EcdsaFormat.IEEE,
    signer_name: str = "",
) -> bytes:
    """Sign content known only by its digest and return the detached CMS (DER ContentInfo).

    The signed attributes are built and hashed here; ``signer`` receives one
    :class:`SignatureRequest` for that hash (RSA PKCS#1 v1.5, or ECDSA returned in
    ``ecdsa_format``) and returns the signature, which is verified against ``certificate`` before
    use (``signer_name`` names the token in the message when it does not verify). ``timestamp``,
    given the signature value, returns an RFC 3161 token whose imprint is the hash of that value
    (see :func:`timestamper`). With ``signed_attributes=False`` the signature is directly over
    ``content_digest`` and no attributes are stored.
    """
    hash_algorithm.check_digest(content_digest)
    scheme = scheme_for(certificate, None)
    if signed_attributes:
        attrs: bytes | None = build_signed_attributes(
            content_digest,
            hash_algorithm=hash_algorithm,
            signing_time=signing_time,
            include_signing_time=include_signing_time,
            cdhashes_plist=cdhashes_plist,
            cdhashes2=cdhashes2,
            content_type=content_type,
        )
        digest = signed_attributes_digest(attrs, hash_algorithm)
    else:
        if cdhashes_plist is not None or cdhashes2 is not None or content_type != ID_DATA:
            raise SignatureError(
                "a signature without signed attributes cannot carry CDHashes or a content type"
            )
        attrs = None
        digest = content_digest

    def stamp(signature: bytes) -> bytes:
        assert timestamp is not None
        token = timestamp(signature)
        check_imprint(token, signature)
        return token.der

    return assemble_signed_data(
        signed_attrs_der=attrs,
        signature=signer(SignatureRequest(digest, hash_algorithm, scheme, ecdsa_format)),
        signer_certificate=certificate,
        chain=chain,
        hash_algorithm=hash_algorithm,
        signature_algorithm=scheme,
        ecdsa_format=ecdsa_format,
        timestamp=stamp if timestamp is not None else None,
        content_digest=content_digest,
        signer_name=signer_name,
    )


APPLE_TIMESTAMP_URL = "http://timestamp.apple.com/ts01"
TIMESTAMP_URL_ENVIRONMENT_VARIABLE = "SIGNBRIDGE_TIMESTAMP_URL"


def resolve_timestamp_url(
    requested: str | None, configured: str | None = None, *, environ: os._Environ | dict | None = None
) -> str | None:
    """The TSA ``--timestamp[=URL]`` asks for: None when absent or ``none``; the given URL; for
    ``--timestamp`` alone (``requested == ""``) the configured TSA (``TimestampUrl`` /
    ``SIGNBRIDGE_TIMESTAMP_URL``), else Apple's."""
    if requested is None or requested == "none":
        return None
    if requested:
        return requested
    environ = os.environ if environ is None else environ
    return configured or environ.get(TIMESTAMP_URL_ENVIRONMENT_VARIABLE) or APPLE_TIMESTAMP_URL


def timestamper(
    url: str,
    *,
    hash_algorithm: HashAlgorithm = HashAlgorithm.SHA256,
    timeout: float = 30.0,
    client: httpx.Client | None = None,
) -> Timestamper:
    """A ``timestamp`` callable for :func:`sign_detached` that asks the TSA at ``url`` to timestamp
    the hash of the signature value (RFC 3161 appendix A)."""

    def stamp(signature: bytes) -> TimestampToken:
        digest = hash_algorithm.digest(signature)
        from ...crypto.timestamp_requests import request_timestamp

        return request_timestamp(url, digest, hash_algorithm, timeout=timeout, client=client)

    return stamp


def estimate_size(
    certificates: Sequence[x509.Certificate],
    key_size: int | None = None,
    with_timestamp: bool = True,
    *,
    code_directories: Sequence[HashAlgorithm] = (),
    hash_algorithm: HashAlgorithm = HashAlgorithm.SHA256,
    timestamp_reserve: int = TIMESTAMP_RESERVE,
) -> int:
    """An upper bound on the size of the CMS :func:`sign_detached` will produce, for reserving room.

    ``certificates`` are the signer's certificate followed by the chain; ``key_size`` in bits
    defaults to the signer's key; ``code_directories`` lists the hash algorithm of each
    CodeDirectory when the Apple CDHashes attributes are included.
    """
    if not certificates:
        raise SignatureError("estimating a CMS size needs at least the signer's certificate")
    leaf = certificates[0]
    public_key = leaf.public_key()
    if isinstance(public_key, rsa.RSAPublicKey):
        signature_size = ((key_size or public_key.key_size) + 7) // 8
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        # DER SEQUENCE of two INTEGERs, each possibly one byte longer than the curve for its sign.
        signature_size = 2 * ((key_size + 7) // 8 if key_size else curve_size(public_key.curve)) + 9
    else:
        raise SignatureError(f"a {type(public_key).__name__} cannot make CMS signatures for Apple")
    cdhashes = [(algorithm, bytes(algorithm.digest_size)) for algorithm in code_directories]
    attrs = build_signed_attributes(
        bytes(hash_algorithm.digest_size),
        hash_algorithm=hash_algorithm,
        signing_time=datetime(2099, 12, 31, tzinfo=UTC),  # GeneralizedTime, the longer form
        cdhashes_plist=build_cdhashes_plist([cdhash for _, cdhash in cdhashes]) if cdhashes else None,
        cdhashes2=cdhashes or None,
    )
    der = encode_signed_data(
        signed_attrs_der=attrs,
        signature=b"\xff" * signature_size,
        certificates=unique_certificates(certificates),
        signer_certificate=leaf,
        hash_algorithm=hash_algorithm,
        scheme=scheme_for(leaf, None),
        timestamp_token=None,
    )
    # The timestamp attribute adds its token plus at most 32 bytes of headers and OID.
    return len(der) + (timestamp_reserve + 32 if with_timestamp else 0)
