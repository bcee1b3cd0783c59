"""CMS SignedData for Apple signatures: built from a digest, parsed and verified as Apple writes it.

One implementation serves ``codesign`` (the content is the primary CodeDirectory) and
``productsign`` (the content is the package's TOC checksum). Signing is digest-only:
:func:`build_signed_attributes` encodes the signed attributes, :func:`signed_attributes_digest`
hashes them (that digest is all a signer sees), :func:`assemble_signed_data` wraps the returned
signature, the certificates and an optional RFC 3161 timestamp into a detached ContentInfo.
:func:`sign_detached` runs those steps in order.

Reading accepts what Apple's tools emit: BER indefinite lengths, zero padding after the
ContentInfo, signed attributes stored out of DER order (the signature is checked over the stored
bytes, never over a re-encoding), SHA-1 or SHA-256, RSA or ECDSA, with or without signed
attributes. :func:`parse_signed_data` reads a blob, :func:`verify_detached` checks it against the
content, :func:`check_timestamp` checks its timestamp.
"""

from __future__ import annotations

import os
import plistlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from asn1crypto import algos, cms, core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from ..crypto.chains import unique_certificates
from ..crypto.der import read_certificates
from ..crypto.hashes import HashAlgorithm
from ..crypto.signatures import (
    DigestSigner,
    EcdsaFormat,
    Scheme,
    SignatureRequest,
    curve_size,
    ecdsa_ieee_to_der,
    verify_digest_signature,
)
from ..crypto.timestamps import (
    ASN1_ERRORS,
    TimestampToken,
    find_signer_certificate,
    parse_token,
    request_timestamp,
)
from ..errors import SignatureError, TimestampError
from .plist import load_plist

if TYPE_CHECKING:
    import httpx

ID_DATA = "1.2.840.113549.1.7.1"
ID_SIGNED_DATA = "1.2.840.113549.1.7.2"
ATTR_CONTENT_TYPE = "1.2.840.113549.1.9.3"
ATTR_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
ATTR_SIGNING_TIME = "1.2.840.113549.1.9.5"
ATTR_TIMESTAMP_TOKEN = "1.2.840.113549.1.9.16.2.14"
ATTR_APPLE_CDHASHES = "1.2.840.113635.100.9.1"  # XML plist {"cdhashes": [20-byte cdhash, ...]}
ATTR_APPLE_CDHASHES2 = "1.2.840.113635.100.9.2"  # one SEQUENCE {hash OID, full cdhash} per CodeDirectory

CDHASH_SIZE = 20  # CS_CDHASH_LEN: every cdhash in the plist attribute is truncated to this
TIMESTAMP_RESERVE = 8192  # room kept for a timestamp token; Apple's are about 4200 bytes

_MAX_NESTING = 64

_BAD_NEW_SIGNATURE = "the signature the signer returned does not verify against the signing certificate's key"


class CmsFormatError(SignatureError):
    """The bytes are not a CMS signature signbridge can read."""


class CmsVerificationError(SignatureError):
    """A CMS signature was read, but one of its checks failed."""


class ContentDigestMismatch(CmsVerificationError):
    """The signature's message digest is not the digest of the content being checked."""


class SignatureMismatch(CmsVerificationError):
    """The signature value does not verify with the signer's public key."""


class TimestampMismatch(CmsVerificationError):
    """The timestamp token does not belong to this signature."""


# ---------------------------------------------------------------------------------------------
# Building


Timestamper = Callable[[bytes], TimestampToken]


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
    hash_algorithm.check_digest(content_digest)
    attributes = [
        _attribute(ATTR_CONTENT_TYPE, [core.ObjectIdentifier(content_type).dump()]),
        _attribute(ATTR_MESSAGE_DIGEST, [core.OctetString(content_digest).dump()]),
    ]
    if include_signing_time:
        attributes.append(_attribute(ATTR_SIGNING_TIME, [_encode_time(signing_time or datetime.now(UTC))]))
    if cdhashes_plist is not None:
        attributes.append(_attribute(ATTR_APPLE_CDHASHES, [core.OctetString(cdhashes_plist).dump()]))
    if cdhashes2 is not None:
        if not cdhashes2:
            raise SignatureError("the CDHashes2 attribute needs at least one code directory hash")
        values = []
        for algorithm, cdhash in cdhashes2:
            algorithm.check_digest(cdhash)
            values.append(_AgileHash({"hash_algorithm": algorithm.oid, "digest": cdhash}).dump())
        attributes.append(_attribute(ATTR_APPLE_CDHASHES2, values))
    return _der_set_of(attributes)


def signed_attributes_digest(signed_attrs_der: bytes, hash_algorithm: HashAlgorithm) -> bytes:
    """The digest a signer signs: the hash of the signed attributes encoded as a SET (tag 0x31)."""
    if not signed_attrs_der or signed_attrs_der[0] != 0x31:
        raise SignatureError("signed attributes are hashed as a DER SET OF (tag 0x31)")
    return hash_algorithm.digest(signed_attrs_der)


def assemble_signed_data(
    *,
    signed_attrs_der: bytes | None,
    signature: bytes,
    signer_certificate: x509.Certificate,
    chain: Sequence[x509.Certificate] = (),
    hash_algorithm: HashAlgorithm = HashAlgorithm.SHA256,
    signature_algorithm: Scheme | None = None,
    ecdsa_format: EcdsaFormat = EcdsaFormat.ASN1,
    timestamp_token: bytes | None = None,
    content_digest: bytes | None = None,
) -> bytes:
    """A detached ContentInfo(SignedData) around a signature made elsewhere.

    ``signed_attrs_der`` are the exact bytes that were signed (as built by
    :func:`build_signed_attributes`), or None for the form whose signature is directly over
    ``content_digest``. The certificates are the signer's followed by ``chain``; the signer is
    named by issuer and serial number; ``timestamp_token`` (a DER TimeStampToken over the
    signature value) becomes the id-aa-timeStampToken unsigned attribute. The signature is checked
    against the certificate's public key before anything is returned.
    """
    scheme = _scheme_for(signer_certificate, signature_algorithm)
    public_key = signer_certificate.public_key()
    if scheme is Scheme.ECDSA and ecdsa_format is EcdsaFormat.IEEE:
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        signature = ecdsa_ieee_to_der(signature, public_key.curve)
    if signed_attrs_der is not None:
        signed_digest = signed_attributes_digest(signed_attrs_der, hash_algorithm)
    elif content_digest is None:
        raise SignatureError("a signature without signed attributes needs the content digest it signs")
    else:
        hash_algorithm.check_digest(content_digest)
        signed_digest = content_digest
    _verify_value(public_key, scheme, hash_algorithm, signed_digest, signature, None, _BAD_NEW_SIGNATURE)
    if timestamp_token is not None:
        _check_imprint(parse_token(timestamp_token), signature)

    der = _encode_signed_data(
        signed_attrs_der=signed_attrs_der,
        signature=signature,
        certificates=unique_certificates([signer_certificate, *chain]),
        signer_certificate=signer_certificate,
        hash_algorithm=hash_algorithm,
        scheme=scheme,
        timestamp_token=timestamp_token,
    )
    parsed = parse_signed_data(der)
    if parsed.signed_attributes != signed_attrs_der or parsed.signature != signature:
        raise SignatureError("the CMS encoder changed the signed bytes; this is a bug in signbridge")
    return der


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
) -> bytes:
    """Sign content known only by its digest and return the detached CMS (DER ContentInfo).

    The signed attributes are built and hashed here; ``signer`` receives one
    :class:`SignatureRequest` for that hash (RSA PKCS#1 v1.5, or ECDSA returned in
    ``ecdsa_format``) and returns the signature, which is verified against ``certificate`` before
    use. ``timestamp``, given the signature value, returns an RFC 3161 token whose imprint is the
    hash of that value (see :func:`timestamper`). With ``signed_attributes=False`` the signature
    is directly over ``content_digest`` and no attributes are stored.
    """
    hash_algorithm.check_digest(content_digest)
    scheme = _scheme_for(certificate, None)
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

    signature = signer(SignatureRequest(digest, hash_algorithm, scheme, ecdsa_format))
    public_key = certificate.public_key()
    if scheme is Scheme.ECDSA and ecdsa_format is EcdsaFormat.IEEE:
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        signature = ecdsa_ieee_to_der(signature, public_key.curve)
    _verify_value(public_key, scheme, hash_algorithm, digest, signature, None, _BAD_NEW_SIGNATURE)

    token = timestamp(signature).der if timestamp is not None else None
    return assemble_signed_data(
        signed_attrs_der=attrs,
        signature=signature,
        signer_certificate=certificate,
        chain=chain,
        hash_algorithm=hash_algorithm,
        signature_algorithm=scheme,
        timestamp_token=token,
        content_digest=content_digest,
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
    der = _encode_signed_data(
        signed_attrs_der=attrs,
        signature=b"\xff" * signature_size,
        certificates=unique_certificates(certificates),
        signer_certificate=leaf,
        hash_algorithm=hash_algorithm,
        scheme=_scheme_for(leaf, None),
        timestamp_token=None,
    )
    # The timestamp attribute adds its token plus at most 32 bytes of headers and OID.
    return len(der) + (timestamp_reserve + 32 if with_timestamp else 0)


class _AgileHash(core.Sequence):
    """One value of Apple's CDHashes2 attribute."""

    _fields = [("hash_algorithm", core.ObjectIdentifier), ("digest", core.OctetString)]


def _attribute(oid: str, values: list[bytes]) -> bytes:
    return _der(0x30, core.ObjectIdentifier(oid).dump() + _der_set_of(values))


def _encode_time(when: datetime) -> bytes:
    """RFC 5652 §11.3: UTCTime through 2049, GeneralizedTime from 2050; whole seconds."""
    when = (when if when.tzinfo else when.replace(tzinfo=UTC)).astimezone(UTC).replace(microsecond=0)
    if 1950 <= when.year < 2050:
        return core.UTCTime(when).dump()
    return core.GeneralizedTime(when).dump()


def _der(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def _der_set_of(encodings: list[bytes]) -> bytes:
    """X.690 §11.6: the elements of a DER SET OF are in ascending order of their encodings."""
    return _der(0x31, b"".join(sorted(encodings)))


def _scheme_for(certificate: x509.Certificate, requested: Scheme | None) -> Scheme:
    public_key = certificate.public_key()
    if isinstance(public_key, rsa.RSAPublicKey):
        scheme = Scheme.RSA_PKCS1
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        scheme = Scheme.ECDSA
    else:
        raise SignatureError(
            f"the certificate has a {type(public_key).__name__}; Apple signatures need an RSA or ECDSA key"
        )
    if requested is not None and requested is not scheme:
        raise SignatureError(
            f"{requested.value} signatures are not used for Apple CMS; this key signs {scheme.value}"
        )
    return scheme


def _signature_algorithm(scheme: Scheme, hash_algorithm: HashAlgorithm) -> algos.SignedDigestAlgorithm:
    if scheme is Scheme.RSA_PKCS1:
        # rsaEncryption with NULL parameters, as Apple writes it.
        return algos.SignedDigestAlgorithm({"algorithm": "rsassa_pkcs1v15", "parameters": core.Null()})
    if hash_algorithm is HashAlgorithm.MD5:
        raise SignatureError("ECDSA with MD5 does not exist")
    return algos.SignedDigestAlgorithm({"algorithm": f"{hash_algorithm.hashlib_name}_ecdsa"})


def _encode_signed_data(
    *,
    signed_attrs_der: bytes | None,
    signature: bytes,
    certificates: Sequence[x509.Certificate],
    signer_certificate: x509.Certificate,
    hash_algorithm: HashAlgorithm,
    scheme: Scheme,
    timestamp_token: bytes | None,
) -> bytes:
    # Apple writes the digest algorithms with explicit NULL parameters.
    digest_algorithm = algos.DigestAlgorithm(
        {"algorithm": hash_algorithm.hashlib_name, "parameters": core.Null()}
    )
    signer = _asn1_certificate(signer_certificate)
    signer_info: dict[str, object] = {
        "version": "v1",
        "sid": cms.SignerIdentifier(
            {"issuer_and_serial_number": {"issuer": signer.issuer, "serial_number": signer.serial_number}}
        ),
        "digest_algorithm": digest_algorithm,
        "signature_algorithm": _signature_algorithm(scheme, hash_algorithm),
        "signature": signature,
    }
    if signed_attrs_der is not None:
        signer_info["signed_attrs"] = cms.CMSAttributes.load(signed_attrs_der)
    if timestamp_token is not None:
        signer_info["unsigned_attrs"] = cms.CMSAttributes(
            [{"type": "signature_time_stamp_token", "values": [cms.ContentInfo.load(timestamp_token)]}]
        )
    signed_data = cms.SignedData(
        {
            "version": "v1",
            "digest_algorithms": [digest_algorithm],
            "encap_content_info": {"content_type": "data"},
            "certificates": [_asn1_certificate(certificate) for certificate in certificates],
            "signer_infos": [cms.SignerInfo(signer_info)],
        }
    )
    return cms.ContentInfo({"content_type": "signed_data", "content": signed_data}).dump()


def _asn1_certificate(certificate: x509.Certificate) -> asn1_x509.Certificate:
    return asn1_x509.Certificate.load(certificate.public_bytes(serialization.Encoding.DER))


# ---------------------------------------------------------------------------------------------
# Parsing


@dataclass(frozen=True)
class ParsedSignature:
    """What a CMS signature says, read from its stored bytes.

    ``signed_attributes`` are the bytes the signature covers (the stored attributes re-tagged as a
    SET, tag 0x31), or None when the signature is directly over the content digest.
    ``signature`` is the SignerInfo's signature value (ECDSA in DER), the bytes a timestamp covers.
    When the attribute values cannot be read, ``attribute_problem`` says why and they are None;
    :func:`verify_detached` then fails, after checking whether the signature covers them.
    """

    der: bytes = field(repr=False)
    certificates: tuple[x509.Certificate, ...] = field(repr=False)
    signer_certificate: x509.Certificate
    digest_algorithm: HashAlgorithm
    scheme: Scheme
    signature: bytes = field(repr=False)
    signed_attributes: bytes | None = field(repr=False)
    encapsulated_content_type: str
    content: bytes | None = field(repr=False)  # the encapsulated content when the CMS is not detached
    content_type: str | None
    message_digest: bytes | None
    signing_time: datetime | None
    cdhashes: tuple[bytes, ...] | None
    cdhashes2: tuple[tuple[HashAlgorithm, bytes], ...] | None
    timestamp: TimestampToken | None
    pss_salt_length: int | None = None
    attribute_problem: str | None = None  # why the signed attribute values could not be read

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """The certificates other than the signer's, in stored order."""
        signer = self.signer_certificate
        return tuple(certificate for certificate in self.certificates if certificate != signer)

    @property
    def has_signed_attributes(self) -> bool:
        return self.signed_attributes is not None


def parse_signed_data(data: bytes) -> ParsedSignature:
    """Read a CMS ContentInfo(SignedData) with one signer, as stored in a Mach-O BlobWrapper or a
    package's ``x-signature``: BER or DER, optionally followed by zero padding."""
    data = bytes(data)
    if not data.strip(b"\0"):
        raise CmsFormatError("the CMS signature is empty (an ad-hoc signature carries none)")
    top = _read_tlv(data, 0, len(data), 0)
    if top.identifier != b"\x30":
        raise CmsFormatError("the data is not a CMS signature (it does not start with a SEQUENCE)")
    trailing = data[top.end :]
    if trailing.strip(b"\0"):
        raise CmsFormatError(
            f"{len(trailing)} bytes follow the CMS signature and they are not zero padding"
        )
    der = data[: top.end]
    try:
        return _parse(der, top)
    except ASN1_ERRORS as exc:
        raise CmsFormatError(f"the CMS signature is malformed ({exc})") from None


def _parse(der: bytes, top: _Tlv) -> ParsedSignature:
    content_info = cms.ContentInfo.load(der)
    if content_info["content_type"].dotted != ID_SIGNED_DATA:
        raise CmsFormatError(f"the CMS structure is {content_info['content_type'].native}, not SignedData")
    signed_data = content_info["content"]
    signer_infos = signed_data["signer_infos"]
    if len(signer_infos) != 1:
        raise CmsFormatError(f"the CMS signature has {len(signer_infos)} signers; Apple signatures have one")
    signer_info = signer_infos[0]
    raw_signer_info = _raw_signer_info(der, top)

    certificates = _certificates(signed_data)
    signer = find_signer_certificate(signer_info["sid"], certificates)
    if signer is None:
        raise CmsFormatError("the CMS signature does not include the signer's certificate")

    digest_algorithm = _hash_algorithm(signer_info["digest_algorithm"]["algorithm"].dotted, "digest")
    scheme, salt_length = _scheme_of(signer_info["signature_algorithm"], digest_algorithm)

    encap = signed_data["encap_content_info"]
    encapsulated_type = encap["content_type"].dotted
    content = None if isinstance(encap["content"], core.Void) else bytes(encap["content"])

    signed_attrs = None
    values = _AttributeValues()
    if not isinstance(signer_info["signed_attrs"], core.Void):
        raw_attrs = next(child for child in raw_signer_info[3:] if child.identifier == b"\xa0")
        signed_attrs = b"\x31" + _definite(der, raw_attrs)[0][1:]
        values = _attribute_values(signer_info["signed_attrs"])

    return ParsedSignature(
        der=der,
        certificates=certificates,
        signer_certificate=signer,
        digest_algorithm=digest_algorithm,
        scheme=scheme,
        signature=signer_info["signature"].native,
        signed_attributes=signed_attrs,
        encapsulated_content_type=encapsulated_type,
        content=content,
        content_type=values.content_type,
        message_digest=values.message_digest,
        signing_time=values.signing_time,
        cdhashes=values.cdhashes,
        cdhashes2=values.cdhashes2,
        attribute_problem=values.problem,
        timestamp=_timestamp(der, raw_signer_info),
        pss_salt_length=salt_length,
    )


@dataclass(frozen=True)
class _AttributeValues:
    content_type: str | None = None
    message_digest: bytes | None = None
    signing_time: datetime | None = None
    cdhashes: tuple[bytes, ...] | None = None
    cdhashes2: tuple[tuple[HashAlgorithm, bytes], ...] | None = None
    problem: str | None = None


def _attribute_values(signed_attrs: cms.CMSAttributes) -> _AttributeValues:
    """The values of the signed attributes. A value that cannot be read is reported as ``problem``
    rather than raised, so that altered attributes are reported as what they are: bytes the
    signature does not cover (:func:`verify_detached` checks the signature first)."""
    try:
        attributes = _attributes(signed_attrs)
        if not attributes:
            raise CmsFormatError("the CMS signature has an empty set of signed attributes")
        return _AttributeValues(
            content_type=_single(attributes, ATTR_CONTENT_TYPE, "contentType", lambda v: v.dotted),
            message_digest=_single(attributes, ATTR_MESSAGE_DIGEST, "messageDigest", lambda v: v.native),
            signing_time=_single(attributes, ATTR_SIGNING_TIME, "signingTime", lambda v: v.chosen.native),
            cdhashes=_single(attributes, ATTR_APPLE_CDHASHES, "CDHashes", _cdhashes_from_plist),
            cdhashes2=_cdhashes2(attributes.get(ATTR_APPLE_CDHASHES2)),
        )
    except CmsFormatError as exc:
        return _AttributeValues(problem=str(exc))
    except ASN1_ERRORS as exc:
        return _AttributeValues(problem=f"the CMS signature's signed attributes are malformed ({exc})")


def _certificates(signed_data: cms.SignedData) -> tuple[x509.Certificate, ...]:
    if isinstance(signed_data["certificates"], core.Void):
        return ()
    ders = [choice.chosen.dump() for choice in signed_data["certificates"] if choice.name == "certificate"]
    return read_certificates(ders, "the CMS signature", CmsFormatError)


def _hash_algorithm(oid: str, what: str) -> HashAlgorithm:
    try:
        return HashAlgorithm.from_oid(oid)
    except SignatureError:
        raise CmsFormatError(f"the CMS signature's {what} algorithm {oid} is not supported") from None


def _scheme_of(
    algorithm: algos.SignedDigestAlgorithm, digest_algorithm: HashAlgorithm
) -> tuple[Scheme, int | None]:
    oid = algorithm["algorithm"].dotted
    try:
        kind = algorithm.signature_algo
    except ValueError:
        raise CmsFormatError(f"the CMS signature algorithm {oid} is not supported") from None
    if kind == "rsassa_pkcs1v15":
        return Scheme.RSA_PKCS1, None
    if kind == "ecdsa":
        return Scheme.ECDSA, None
    if kind == "rsassa_pss":
        params = algorithm["parameters"]
        pss_hash = params["hash_algorithm"]["algorithm"].native
        mgf_hash = params["mask_gen_algorithm"]["parameters"]["algorithm"].native
        if pss_hash != digest_algorithm.hashlib_name or mgf_hash != digest_algorithm.hashlib_name:
            raise CmsFormatError("the CMS signature uses RSA-PSS with a hash other than its digest algorithm")
        return Scheme.RSA_PSS, params["salt_length"].native
    raise CmsFormatError(f"the CMS signature algorithm {oid} ({kind}) is not supported")


def _attributes(signed_attrs: cms.CMSAttributes) -> dict[str, list[core.Asn1Value]]:
    attributes: dict[str, list[core.Asn1Value]] = {}
    for attribute in signed_attrs:
        oid = attribute["type"].dotted
        if oid in attributes:
            raise CmsFormatError(f"the signed attribute {oid} appears more than once")
        attributes[oid] = list(attribute["values"])
    return attributes


def _single(attributes: dict[str, list[core.Asn1Value]], oid: str, name: str, read: Callable):
    values = attributes.get(oid)
    if values is None:
        return None
    if len(values) != 1:
        raise CmsFormatError(f"the signed attribute {name} must hold exactly one value, not {len(values)}")
    return read(values[0])


def _cdhashes_from_plist(value: core.Asn1Value) -> tuple[bytes, ...]:
    try:
        octets = core.OctetString.load(value.dump()).native
    except ASN1_ERRORS as exc:
        raise CmsFormatError(f"the CDHashes attribute is not an OCTET STRING ({exc})") from None
    document = load_plist(octets or b"", "the CDHashes attribute", CmsFormatError)
    cdhashes = document.get("cdhashes") if isinstance(document, dict) else None
    if not isinstance(cdhashes, list) or not all(isinstance(item, bytes) for item in cdhashes):
        raise CmsFormatError('the CDHashes attribute has no "cdhashes" array of data')
    return tuple(cdhashes)


def _cdhashes2(values: list[core.Asn1Value] | None) -> tuple[tuple[HashAlgorithm, bytes], ...] | None:
    if values is None:
        return None
    result = []
    for value in values:
        item = _AgileHash.load(value.dump())
        algorithm = _hash_algorithm(item["hash_algorithm"].dotted, "CDHashes2 hash")
        digest = item["digest"].native
        if len(digest) != algorithm.digest_size:
            raise CmsFormatError(
                f"a {algorithm.title} hash in the CDHashes2 attribute is {len(digest)} bytes long"
            )
        result.append((algorithm, digest))
    return tuple(result)


def _timestamp(der: bytes, raw_signer_info: list[_Tlv]) -> TimestampToken | None:
    unsigned = next((child for child in raw_signer_info if child.identifier == b"\xa1"), None)
    if unsigned is None:
        return None
    token_oid = core.ObjectIdentifier(ATTR_TIMESTAMP_TOKEN).dump()
    for attribute in _children(der, unsigned):
        parts = _children(der, attribute)
        if len(parts) != 2 or der[parts[0].start : parts[0].end] != token_oid:
            continue
        values = _children(der, parts[1])
        if len(values) != 1:
            raise CmsFormatError("the timestamp attribute must hold exactly one token")
        try:
            return parse_token(_definite(der, values[0])[0])
        except TimestampError as exc:
            raise CmsFormatError(f"the signature's timestamp cannot be read: {exc}") from None
    return None


# ---------------------------------------------------------------------------------------------
# Verifying


def verify_detached(
    parsed: ParsedSignature,
    content: bytes | None = None,
    content_digest: bytes | None = None,
    *,
    content_name: str = "the signed content",
) -> None:
    """Raise a :class:`CmsVerificationError` unless ``parsed`` is a valid signature of the content.

    Give the content, or its digest with the signature's digest algorithm; an attached CMS may be
    checked against its own content. ``content_name`` names the content in messages ("the code
    directory", "the package's table of contents"). With signed attributes, the signature must
    verify over the attributes' stored bytes and their message digest must match the content;
    without, the signature must verify over the content digest. Whether the certificate is trusted is for
    :mod:`signbridge.apple.trust` to say.
    """
    algorithm = parsed.digest_algorithm
    if content is not None and content_digest is not None:
        raise SignatureError("give the content or its digest, not both")
    if content is None and content_digest is None:
        if parsed.content is None:
            raise SignatureError("the CMS signature is detached: the signed content or its digest is needed")
        content = parsed.content
    if content is not None:
        content_digest = algorithm.digest(content)
    assert content_digest is not None
    if len(content_digest) != algorithm.digest_size:
        raise SignatureError(
            f"the CMS signature uses {algorithm.title}, but a {len(content_digest)}-byte digest was given"
        )
    if parsed.content is not None and algorithm.digest(parsed.content) != content_digest:
        raise ContentDigestMismatch(f"the content embedded in the signature does not match {content_name}")

    if parsed.signed_attributes is None:
        _verify_parsed(parsed, content_digest, f"the CMS signature does not match {content_name}")
        return
    # The signature first: if the attributes were altered, that is what the user should hear.
    _verify_parsed(
        parsed,
        algorithm.digest(parsed.signed_attributes),
        "the CMS signature does not match the signed attributes",
    )
    if parsed.attribute_problem is not None:
        raise CmsFormatError(parsed.attribute_problem)
    if parsed.message_digest is None:
        raise CmsVerificationError("the CMS signature's signed attributes have no message digest")
    if parsed.content_type is None:
        raise CmsVerificationError("the CMS signature's signed attributes have no content type")
    if parsed.content_type != parsed.encapsulated_content_type:
        raise CmsVerificationError(
            f"the CMS signature's content type attribute ({parsed.content_type}) differs from the "
            f"type of its content ({parsed.encapsulated_content_type})"
        )
    if parsed.message_digest != content_digest:
        raise ContentDigestMismatch(f"the message digest in the signature does not match {content_name}")


def check_timestamp(
    parsed: ParsedSignature,
    anchors: Sequence[x509.Certificate] | None = None,
    *,
    intermediates: Sequence[x509.Certificate] = (),
) -> datetime:
    """Check the signature's timestamp and return the time it vouches for.

    The token's imprint must be the hash of the signer's signature value, and its own CMS signature
    must verify; with ``anchors``, the timestamp authority must also chain to one of them.
    """
    token = parsed.timestamp
    if token is None:
        raise CmsVerificationError("the signature has no timestamp")
    _check_imprint(token, parsed.signature)
    try:
        if anchors is None:
            token.verify_signature(intermediates)
        else:
            token.verify(token.digest, token.hash_algorithm, anchors, intermediates=intermediates)
    except TimestampError as exc:
        raise TimestampMismatch(f"the signature's timestamp is not valid: {exc}") from None
    return token.gen_time


def _check_imprint(token: TimestampToken, signature: bytes) -> None:
    if token.digest != token.hash_algorithm.digest(signature):
        raise TimestampMismatch(
            "the timestamp does not cover this signature (its imprint is not the hash of the signature value)"
        )


def check_unsigned_fields(parsed: ParsedSignature) -> None:
    """Raise :class:`CmsFormatError` unless the parts of the CMS, and of its timestamp token, that no
    signature covers hold what RFC 5652 requires of them.

    A signature covers the signed attributes (or the content digest) only. Without this check, the
    SignedData and SignerInfo versions, the list of digest algorithms, the algorithms' parameters
    and the framing of the unsigned attributes could be altered unnoticed. Checked, for the
    signature and for its timestamp token: both versions match the signer identifier and content
    type (RFC 5652 §5.1, §5.3); the digest algorithms listed are the signer's; digest, PKCS#1 v1.5
    and ECDSA algorithm identifiers carry no parameters other than NULL; a signature algorithm that
    names a hash names the signer's; the only unsigned attribute is one timestamp token.
    """
    _check_unsigned_fields(parsed.der, "the CMS signature")
    if parsed.timestamp is not None:
        _check_unsigned_fields(parsed.timestamp.der, "the signature's timestamp")


def _check_unsigned_fields(der: bytes, what: str) -> None:
    try:
        top = _read_tlv(der, 0, len(der), 0)
        fields = _children(der, _children(der, _children(der, top)[1])[0])
        if fields[1].identifier != b"\x31":
            raise CmsFormatError(f"{what}'s list of digest algorithms is not a SET")
        unsigned = next((child for child in _raw_signer_info(der, top) if child.identifier == b"\xa1"), None)
        token_type = core.ObjectIdentifier(ATTR_TIMESTAMP_TOKEN).dump()
        attributes = _children(der, unsigned) if unsigned is not None else []
        for attribute in attributes:
            parts = _children(der, attribute)
            if attribute.identifier != b"\x30" or [part.identifier for part in parts] != [b"\x06", b"\x31"]:
                raise CmsFormatError(f"an unsigned attribute of {what} is malformed")
            if der[parts[0].start : parts[0].end] != token_type or len(attributes) > 1:
                raise CmsFormatError(f"{what} has unsigned attributes other than one timestamp")
        signed_data = cms.ContentInfo.load(der)["content"]
        signer_info = signed_data["signer_infos"][0]
        digest = signer_info["digest_algorithm"]["algorithm"].dotted
        by_key_identifier = signer_info["sid"].name == "subject_key_identifier"
        wanted = "v3" if by_key_identifier else "v1"
        if signer_info["version"].native != wanted:
            raise CmsFormatError(f"{what}'s signer version is {signer_info['version'].native}, not {wanted}")
        data_content = signed_data["encap_content_info"]["content_type"].dotted == ID_DATA
        wanted = "v1" if data_content and not by_key_identifier else "v3"
        if signed_data["version"].native != wanted:
            raise CmsFormatError(f"{what}'s SignedData version is {signed_data['version'].native}, not {wanted}")
        listed = list(signed_data["digest_algorithms"])
        if not listed:
            raise CmsFormatError(f"{what} lists no digest algorithm")
        for algorithm in [*listed, signer_info["digest_algorithm"]]:
            if algorithm["algorithm"].dotted != digest:
                raise CmsFormatError(
                    f"{what} lists the digest algorithm {algorithm['algorithm'].dotted}, but its signer uses {digest}"
                )
            if algorithm["parameters"].native is not None:
                raise CmsFormatError(f"a digest algorithm in {what} has parameters")
        signature_algorithm = signer_info["signature_algorithm"]
        if signature_algorithm.signature_algo != "rsassa_pss":
            if signature_algorithm["parameters"].native is not None:
                raise CmsFormatError(f"the signature algorithm of {what} has parameters")
            try:
                named = HashAlgorithm.from_name(signature_algorithm.hash_algo).oid
            except ValueError:  # rsaEncryption names no hash
                named = digest
            if named != digest:
                raise CmsFormatError(f"the signature algorithm of {what} names another hash than its signer's")
    except ASN1_ERRORS as exc:
        raise CmsFormatError(f"{what} is malformed ({exc})") from None


def _verify_parsed(parsed: ParsedSignature, digest: bytes, message: str) -> None:
    _verify_value(
        parsed.signer_certificate.public_key(),
        parsed.scheme,
        parsed.digest_algorithm,
        digest,
        parsed.signature,
        parsed.pss_salt_length,
        message,
    )


def _verify_value(
    public_key: object,
    scheme: Scheme,
    hash_algorithm: HashAlgorithm,
    digest: bytes,
    signature: bytes,
    salt_length: int | None,
    message: str,
) -> None:
    """Check a signature over a prehashed ``digest``; ECDSA signatures are DER."""
    fits = isinstance(public_key, ec.EllipticCurvePublicKey if scheme is Scheme.ECDSA else rsa.RSAPublicKey)
    if not fits:
        raise CmsVerificationError(
            f"the CMS signature's algorithm ({scheme.value}) does not fit the signer's {type(public_key).__name__}"
        )
    assert isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
    pss = None
    if salt_length is not None:
        pss = padding.PSS(mgf=padding.MGF1(hash_algorithm.cryptography_hash()), salt_length=salt_length)
    try:
        request = SignatureRequest(digest, hash_algorithm, scheme, EcdsaFormat.ASN1)
        verify_digest_signature(public_key, request, signature, pss=pss)
    except SignatureError:
        raise SignatureMismatch(message) from None


# ---------------------------------------------------------------------------------------------
# Raw BER: finding exact stored bytes, which asn1crypto re-encodes when lengths are indefinite


@dataclass(frozen=True)
class _Tlv:
    identifier: bytes
    start: int
    content_start: int
    content_end: int
    end: int
    constructed: bool
    indefinite: bool


def _read_tlv(data: bytes, offset: int, limit: int, depth: int) -> _Tlv:
    if depth > _MAX_NESTING:
        raise CmsFormatError("the CMS signature is nested too deeply")
    position = offset
    if position >= limit:
        raise CmsFormatError("the CMS signature is truncated")
    first = data[position]
    position += 1
    if first & 0x1F == 0x1F:  # high tag number: base-128 continuation bytes
        while True:
            if position >= limit:
                raise CmsFormatError("the CMS signature is truncated")
            position += 1
            if not data[position - 1] & 0x80:
                break
    identifier = data[offset:position]
    constructed = bool(first & 0x20)
    if position >= limit:
        raise CmsFormatError("the CMS signature is truncated")
    length_byte = data[position]
    position += 1
    if length_byte == 0x80:
        if not constructed:
            raise CmsFormatError("a primitive value in the CMS signature has an indefinite length")
        cursor = position
        while True:
            if cursor + 2 <= limit and data[cursor : cursor + 2] == b"\0\0":
                return _Tlv(identifier, offset, position, cursor, cursor + 2, constructed, True)
            cursor = _read_tlv(data, cursor, limit, depth + 1).end
    if length_byte & 0x80:
        count = length_byte & 0x7F
        if count > 8 or position + count > limit:
            raise CmsFormatError("the CMS signature has an invalid length field")
        length = int.from_bytes(data[position : position + count], "big")
        position += count
    else:
        length = length_byte
    if position + length > limit:
        raise CmsFormatError("the CMS signature is truncated")
    return _Tlv(identifier, offset, position, position + length, position + length, constructed, False)


def _children(data: bytes, tlv: _Tlv) -> list[_Tlv]:
    if not tlv.constructed:
        raise CmsFormatError("the CMS signature has a primitive value where a structure belongs")
    children = []
    cursor = tlv.content_start
    while cursor < tlv.content_end:
        child = _read_tlv(data, cursor, tlv.content_end, 1)
        children.append(child)
        cursor = child.end
    return children


def _definite(data: bytes, tlv: _Tlv, depth: int = 0) -> tuple[bytes, bool]:
    """The value's bytes with indefinite lengths made definite, contents and order unchanged, and
    whether anything had to change (if not, the bytes are exactly the stored ones)."""
    if depth > _MAX_NESTING:
        raise CmsFormatError("the CMS signature is nested too deeply")
    raw = data[tlv.start : tlv.end]
    if not tlv.constructed:
        return raw, False
    parts = [_definite(data, child, depth + 1) for child in _children(data, tlv)]
    if not tlv.indefinite and not any(changed for _, changed in parts):
        return raw, False
    return tlv.identifier + _der(0, b"".join(part for part, _ in parts))[1:], True


def _raw_signer_info(der: bytes, top: _Tlv) -> list[_Tlv]:
    """The fields of the first SignerInfo, located in the stored bytes."""
    content_info = _children(der, top)
    if len(content_info) != 2:
        raise CmsFormatError("the CMS ContentInfo does not have a content type and a content")
    signed_data = _children(der, content_info[1])
    if len(signed_data) != 1:
        raise CmsFormatError("the CMS ContentInfo's content is not a single SignedData")
    fields = _children(der, signed_data[0])
    signer_infos = _children(der, fields[-1])
    if not signer_infos:
        raise CmsFormatError("the CMS signature has no signer")
    return _children(der, signer_infos[0])
