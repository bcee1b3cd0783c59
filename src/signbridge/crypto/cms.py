"""CMS SignedData (RFC 5652) with one signer: read from its stored bytes, and verified.

Reading accepts what real signers emit: BER indefinite lengths, zero padding after the
ContentInfo, signed attributes stored out of DER order (the signature is checked over the stored
bytes, never over a re-encoding), SHA-1 or SHA-2, RSA (PKCS#1 v1.5 or PSS) or ECDSA, with or without
signed attributes. :func:`read_signed_data` reads a blob, :func:`verify_detached` checks it against
the content, :func:`check_unsigned_fields` checks what no signature covers. Apple's signatures
(:mod:`signbridge.apple.codesig.cms`) and timestamp tokens (:mod:`signbridge.crypto.timestamps`) are both
read and checked here; :mod:`signbridge.crypto.cms_builder` builds them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import padding

from ..errors import SignatureError
from .ber import BerError, Tlv, children, definite, read_tlv
from .der import read_certificates, tbs_fields
from .der_decoding import (
    INTEGER,
    SEQUENCE,
    SET,
    AlgorithmIdentifier,
    algorithm_identifier,
    expect,
    fields,
    integer,
    object_identifier,
    octet_string,
    single_value,
    time_value,
)
from .hashes import HashAlgorithm
from .names import same_name
from .signatures import EcdsaFormat, Scheme, SignatureRequest, verify_digest_signature

ID_DATA = "1.2.840.113549.1.7.1"
ID_SIGNED_DATA = "1.2.840.113549.1.7.2"
ATTR_CONTENT_TYPE = "1.2.840.113549.1.9.3"
ATTR_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
ATTR_SIGNING_TIME = "1.2.840.113549.1.9.5"
ATTR_TIMESTAMP_TOKEN = "1.2.840.113549.1.9.16.2.14"

_CONTENT_TYPE_NAMES = {
    ID_DATA: "data",
    ID_SIGNED_DATA: "signed_data",
    "1.2.840.113549.1.7.3": "enveloped_data",
    "1.2.840.113549.1.7.5": "digested_data",
    "1.2.840.113549.1.7.6": "encrypted_data",
}
ID_RSA_ENCRYPTION = "1.2.840.113549.1.1.1"
ECDSA_WITH = {
    HashAlgorithm.SHA1: "1.2.840.10045.4.1",
    HashAlgorithm.SHA224: "1.2.840.10045.4.3.1",
    HashAlgorithm.SHA256: "1.2.840.10045.4.3.2",
    HashAlgorithm.SHA384: "1.2.840.10045.4.3.3",
    HashAlgorithm.SHA512: "1.2.840.10045.4.3.4",
}
_RSA_WITH = {
    "1.2.840.113549.1.1.2": "md2",
    "1.2.840.113549.1.1.4": "md5",
    "1.3.14.3.2.3": "md5",
    "1.2.840.113549.1.1.5": "sha1",
    "1.3.14.3.2.29": "sha1",
    "1.2.840.113549.1.1.14": "sha224",
    "1.2.840.113549.1.1.11": "sha256",
    "1.2.840.113549.1.1.12": "sha384",
    "1.2.840.113549.1.1.13": "sha512",
}
_ECDSA_WITH_SHA3 = {f"2.16.840.1.101.3.4.3.{9 + index}": f"sha3_{size}" for index, size in enumerate((224, 256, 384, 512))}
# A signature algorithm: its name in messages, its scheme and the hash it names, if any.
_SIGNATURE_ALGORITHMS: dict[str, tuple[str, Scheme, str | None]] = {
    ID_RSA_ENCRYPTION: ("rsassa_pkcs1v15", Scheme.RSA_PKCS1, None),
    "1.2.840.113549.1.1.10": ("rsassa_pss", Scheme.RSA_PSS, None),
    "1.2.840.10045.4": ("ecdsa", Scheme.ECDSA, None),
    **{oid: (f"{name}_rsa", Scheme.RSA_PKCS1, name) for oid, name in _RSA_WITH.items()},
    **{oid: (f"{hash.hashlib_name}_ecdsa", Scheme.ECDSA, hash.hashlib_name) for hash, oid in ECDSA_WITH.items()},
    **{oid: (f"{name}_ecdsa", Scheme.ECDSA, name) for oid, name in _ECDSA_WITH_SHA3.items()},
}
_TIMESTAMP_TOKEN_TYPE = bytes.fromhex("060b2a864886f70d010910020e")  # ATTR_TIMESTAMP_TOKEN's DER
# CertificateChoices: an X.509 certificate, or one of the older kinds, [0] to [3], passed over.
_CERTIFICATE_CHOICES = (SEQUENCE, b"\xa0", b"\xa1", b"\xa2", b"\xa3")

T = TypeVar("T")


class CmsFormatError(SignatureError):
    """The bytes are not a CMS signature signbridge can read."""


class CmsVerificationError(SignatureError):
    """A CMS signature was read, but one of its checks failed."""


class ContentDigestMismatch(CmsVerificationError):
    """The signature's message digest is not the digest of the content being checked."""


class SignatureMismatch(CmsVerificationError):
    """The signature value does not verify with the signer's public key."""


# ---------------------------------------------------------------------------------------------
# Parsing


class NotSignedData(CmsFormatError):
    """The ContentInfo holds something other than SignedData (``kind`` names it)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        super().__init__(f"the CMS structure is {kind}, not SignedData")


class SignerIdentifier(NamedTuple):
    """How a SignerInfo names its certificate: by issuer (a DER Name) and serial number, or by
    subject key identifier."""

    issuer: bytes | None = None
    serial_number: int | None = None
    key_identifier: bytes | None = None


class StoredSigner(NamedTuple):
    """A SignerInfo's fields, located in the stored bytes and read no further than that needs.
    ``signed_attributes`` are the bytes the signature covers (see :class:`SignedData`)."""

    version: Tlv
    sid: SignerIdentifier
    digest_algorithm: AlgorithmIdentifier
    signed_attributes: bytes | None
    signature_algorithm: AlgorithmIdentifier
    signature: bytes
    unsigned_attributes: Tlv | None


class StoredSignedData(NamedTuple):
    """A ContentInfo(SignedData) as stored in ``der``, before any of it is checked: the content,
    each X.509 certificate's bytes in stored order, and where each SignerInfo is (read by
    :func:`stored_signer` when it is needed)."""

    der: bytes
    version: Tlv
    digest_algorithms: Tlv
    content_type: str
    content: bytes | None
    certificates: tuple[bytes, ...]
    signers: tuple[Tlv, ...]


def stored_signed_data(der: bytes, top: Tlv) -> StoredSignedData:
    """The parts of the ContentInfo(SignedData) ``top`` in ``der``. Raises :class:`NotSignedData`
    for another kind of content, :class:`~signbridge.crypto.ber.BerError` when a part is malformed."""
    content_info = children(der, expect(top, SEQUENCE, "the CMS ContentInfo"))
    if len(content_info) != 2 or content_info[1].identifier != b"\xa0":
        raise BerError("the CMS ContentInfo does not have a content type and a content")
    content_type = object_identifier(der, content_info[0])
    if content_type != ID_SIGNED_DATA:
        raise NotSignedData(_CONTENT_TYPE_NAMES.get(content_type, content_type))
    signed_data = children(der, content_info[1])
    if len(signed_data) != 1:
        raise BerError("the CMS ContentInfo's content is not a single SignedData")
    version, digest_algorithms, encapsulated, *optional, signer_infos = fields(der, signed_data[0], "the SignedData", 4)
    expect(version, INTEGER, "the SignedData's version")
    encapsulated_fields = fields(der, encapsulated, "the encapsulated content", 1)
    content = None
    if len(encapsulated_fields) > 2:
        raise BerError("the encapsulated content has more than a type and a content")
    if len(encapsulated_fields) == 2:
        explicit = children(der, expect(encapsulated_fields[1], b"\xa0", "the encapsulated content"))
        if len(explicit) != 1:
            raise BerError("the encapsulated content is not one OCTET STRING")
        content = octet_string(der, explicit[0])
    if [part.identifier for part in optional] not in ([], [b"\xa0"], [b"\xa1"], [b"\xa0", b"\xa1"]):
        raise BerError("the SignedData has fields other than certificates and CRLs")
    certificates = ()
    if optional and optional[0].identifier == b"\xa0":
        choices = children(der, optional[0])
        if any(choice.identifier not in _CERTIFICATE_CHOICES for choice in choices):
            raise BerError("the SignedData holds something other than certificates among its certificates")
        certificates = tuple(der[choice.start : choice.end] for choice in choices if choice.identifier == SEQUENCE)
    return StoredSignedData(
        der=der,
        version=version,
        digest_algorithms=digest_algorithms,
        content_type=object_identifier(der, encapsulated_fields[0]),
        content=content,
        certificates=certificates,
        signers=tuple(children(der, expect(signer_infos, SET, "the SignerInfos"))),
    )


def stored_signer(der: bytes, value: Tlv) -> StoredSigner:
    """The fields of the SignerInfo ``value`` in ``der``; :class:`~signbridge.crypto.ber.BerError`
    when one is malformed."""
    version, sid, digest_algorithm, *rest = fields(der, value, "a SignerInfo", 5)
    expect(version, INTEGER, "a SignerInfo's version")
    signed = rest.pop(0) if rest[0].identifier == b"\xa0" else None
    if len(rest) < 2:
        raise BerError("a SignerInfo has no signature")
    signature_algorithm, signature, *rest = rest
    unsigned = rest.pop(0) if rest and rest[0].identifier == b"\xa1" else None
    if rest:
        raise BerError("a SignerInfo has fields after its unsigned attributes")
    return StoredSigner(
        version=version,
        sid=_signer_identifier(der, sid),
        digest_algorithm=algorithm_identifier(der, digest_algorithm, "a SignerInfo's digest algorithm"),
        signed_attributes=None if signed is None else b"\x31" + definite(der, signed)[0][1:],
        signature_algorithm=algorithm_identifier(der, signature_algorithm, "a SignerInfo's signature algorithm"),
        signature=octet_string(der, signature),
        unsigned_attributes=unsigned,
    )


def _signer_identifier(der: bytes, value: Tlv) -> SignerIdentifier:
    if value.identifier == b"\x80":  # [0] IMPLICIT SubjectKeyIdentifier
        return SignerIdentifier(key_identifier=der[value.content_start : value.content_end])
    parts = fields(der, value, "the signer's issuer and serial number")
    if len(parts) != 2:
        raise BerError("the signer's issuer and serial number are not two fields")
    issuer = expect(parts[0], SEQUENCE, "the signer's issuer")
    return SignerIdentifier(issuer=der[issuer.start : issuer.end], serial_number=integer(der, parts[1]))


@dataclass(frozen=True)
class SignedData:
    """What a CMS signature says, read from its stored bytes.

    ``signed_attributes`` are the bytes the signature covers (the stored attributes re-tagged as a
    SET, tag 0x31), or None when the signature is directly over the content digest;
    ``attributes`` their values by OID, each value's DER. ``signature`` is the SignerInfo's
    signature value (ECDSA in DER), the bytes a timestamp covers; ``timestamp_token`` the DER
    TimeStampToken stored over it, if any. When the attribute values cannot be read,
    ``attribute_problem`` says why and they are None; :func:`verify_detached` then fails, after
    checking whether the signature covers them.
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
    attributes: dict[str, list[bytes]] | None = field(default=None, repr=False, compare=False)
    timestamp_token: bytes | None = field(default=None, repr=False)
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


def read_signed_data(data: bytes, *, certificates: Iterable[x509.Certificate] = ()) -> SignedData:
    """Read a CMS ContentInfo(SignedData) with one signer, BER or DER, optionally followed by zero
    padding. The signer's certificate is looked for among the CMS's own and ``certificates``."""
    data = bytes(data)
    if not data.strip(b"\0"):
        raise CmsFormatError("the CMS signature is empty (an ad-hoc signature carries none)")
    try:
        top = read_tlv(data, 0, len(data), 0)
    except BerError as exc:
        raise CmsFormatError(str(exc)) from None
    if top.identifier != b"\x30":
        raise CmsFormatError("the data is not a CMS signature (it does not start with a SEQUENCE)")
    trailing = data[top.end :]
    if trailing.strip(b"\0"):
        raise CmsFormatError(
            f"{len(trailing)} bytes follow the CMS signature and they are not zero padding"
        )
    der = data[: top.end]
    try:
        return _parse(stored_signed_data(der, top), tuple(certificates))
    except BerError as exc:
        raise CmsFormatError(str(exc)) from None


def _parse(stored: StoredSignedData, extra_certificates: tuple[x509.Certificate, ...]) -> SignedData:
    der = stored.der
    if len(stored.signers) != 1:
        raise CmsFormatError(f"the CMS signature has {len(stored.signers)} signers; Apple signatures have one")
    signer_info = stored_signer(der, stored.signers[0])
    certificates = read_certificates(stored.certificates, "the CMS signature", CmsFormatError)
    signer = find_signer_certificate(signer_info.sid, (*certificates, *extra_certificates))
    if signer is None:
        raise CmsFormatError("the CMS signature does not include the signer's certificate")

    digest_algorithm = hash_algorithm_from_oid(signer_info.digest_algorithm.oid, "digest")
    scheme, salt_length = _scheme_of(der, signer_info.signature_algorithm, digest_algorithm)

    signed_attrs = signer_info.signed_attributes
    values = _AttributeValues() if signed_attrs is None else _attribute_values(signed_attrs)

    return SignedData(
        der=der,
        certificates=certificates,
        signer_certificate=signer,
        digest_algorithm=digest_algorithm,
        scheme=scheme,
        signature=signer_info.signature,
        signed_attributes=signed_attrs,
        encapsulated_content_type=stored.content_type,
        content=stored.content,
        content_type=values.content_type,
        message_digest=values.message_digest,
        signing_time=values.signing_time,
        attributes=values.attributes,
        timestamp_token=_timestamp_token(der, signer_info.unsigned_attributes),
        pss_salt_length=salt_length,
        attribute_problem=values.problem,
    )


class _AttributeValues(NamedTuple):
    content_type: str | None = None
    message_digest: bytes | None = None
    signing_time: datetime | None = None
    attributes: dict[str, list[bytes]] | None = None
    problem: str | None = None


def _attribute_values(signed_attrs: bytes) -> _AttributeValues:
    """The values of the signed attributes. A value that cannot be read is reported as ``problem``
    rather than raised, so that altered attributes are reported as what they are: bytes the
    signature does not cover (:func:`verify_detached` checks the signature first)."""
    try:
        attributes = signed_attribute_values(signed_attrs)
        if not attributes:
            raise CmsFormatError("the CMS signature has an empty set of signed attributes")
        return _AttributeValues(
            content_type=single_attribute(attributes, ATTR_CONTENT_TYPE, "contentType", object_identifier),
            message_digest=single_attribute(attributes, ATTR_MESSAGE_DIGEST, "messageDigest", octet_string),
            signing_time=single_attribute(attributes, ATTR_SIGNING_TIME, "signingTime", time_value),
            attributes=attributes,
        )
    except CmsFormatError as exc:
        return _AttributeValues(problem=str(exc))
    except BerError as exc:
        return _AttributeValues(problem=f"the CMS signature's signed attributes are malformed ({exc})")


def hash_algorithm_from_oid(oid: str, what: str) -> HashAlgorithm:
    """The hash algorithm ``oid`` names in a CMS signature; ``what`` names its role in the message."""
    try:
        return HashAlgorithm.from_oid(oid)
    except SignatureError:
        raise CmsFormatError(f"the CMS signature's {what} algorithm {oid} is not supported") from None


def _scheme_of(
    der: bytes, algorithm: AlgorithmIdentifier, digest_algorithm: HashAlgorithm
) -> tuple[Scheme, int | None]:
    known = _SIGNATURE_ALGORITHMS.get(algorithm.oid)
    if known is None:
        raise CmsFormatError(f"the CMS signature algorithm {algorithm.oid} is not supported")
    name, scheme, named = known
    if scheme is not Scheme.RSA_PSS:
        if named not in (None, digest_algorithm.hashlib_name):
            raise CmsFormatError(
                f"the CMS signature algorithm {name} names {named}, "
                f"but the signer's digest algorithm is {digest_algorithm.hashlib_name}"
            )
        return scheme, None
    pss_hash, mgf_hash, salt_length = _pss_parameters(der, algorithm.parameters)
    if pss_hash != digest_algorithm.oid or mgf_hash != digest_algorithm.oid:
        raise CmsFormatError("the CMS signature uses RSA-PSS with a hash other than its digest algorithm")
    return Scheme.RSA_PSS, salt_length


def _pss_parameters(der: bytes, parameters: Tlv | None) -> tuple[str, str, int]:
    """RSASSA-PSS-params (RFC 4055): the hash's OID, the MGF1 hash's OID and the salt length."""
    pss_hash = mgf_hash = HashAlgorithm.SHA1.oid
    salt_length = 20
    for part in fields(der, parameters, "the RSA-PSS parameters") if parameters is not None else []:
        explicit = children(der, part)
        if len(explicit) != 1:
            raise BerError("an RSA-PSS parameter is not a single value")
        if part.identifier == b"\xa0":
            pss_hash = algorithm_identifier(der, explicit[0], "the RSA-PSS hash").oid
        elif part.identifier == b"\xa1":
            mask = algorithm_identifier(der, explicit[0], "the RSA-PSS mask generation function")
            if mask.parameters is None:
                raise BerError("the RSA-PSS mask generation function names no hash")
            mgf_hash = algorithm_identifier(der, mask.parameters, "the RSA-PSS mask generation hash").oid
        elif part.identifier == b"\xa2":
            salt_length = integer(der, explicit[0])
            if salt_length < 0:
                raise BerError("the RSA-PSS salt length is negative")
    return pss_hash, mgf_hash, salt_length


def signed_attribute_values(signed_attrs: bytes) -> dict[str, list[bytes]]:
    """The values (each one's DER) of the signed attributes ``signed_attrs`` (a SET), by attribute type."""
    der = signed_attrs
    attributes: dict[str, list[bytes]] = {}
    for attribute in children(der, single_value(der)):
        parts = fields(der, attribute, "a signed attribute")
        if len(parts) != 2:
            raise BerError("a signed attribute is not a type and a set of values")
        oid = object_identifier(der, parts[0])
        if oid in attributes:
            raise CmsFormatError(f"the signed attribute {oid} appears more than once")
        attributes[oid] = [der[value.start : value.end] for value in children(der, expect(parts[1], SET, "an attribute's values"))]
    return attributes


def single_attribute(
    attributes: dict[str, list[bytes]], oid: str, name: str, read: Callable[[bytes, Tlv], T]
) -> T | None:
    """The value of the signed attribute ``oid`` (called ``name`` in messages) as ``read`` reads it
    from the value's DER, None when absent; an attribute holds exactly one value."""
    values = attributes.get(oid)
    if values is None:
        return None
    if len(values) != 1:
        raise CmsFormatError(f"the signed attribute {name} must hold exactly one value, not {len(values)}")
    return read(values[0], single_value(values[0]))


def find_signer_certificate(sid: SignerIdentifier, pool: Iterable[x509.Certificate]) -> x509.Certificate | None:
    """The certificate a CMS SignerIdentifier names (issuer and serial number, or subject key identifier)."""
    for certificate in pool:
        if sid.key_identifier is None:
            if certificate.serial_number == sid.serial_number and same_name(tbs_fields(certificate).issuer, sid.issuer or b""):
                return certificate
            continue
        try:
            ski = certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        except x509.ExtensionNotFound:
            continue
        if ski.digest == sid.key_identifier:
            return certificate
    return None


def _timestamp_token(der: bytes, unsigned: Tlv | None) -> bytes | None:
    """The DER of the id-aa-timeStampToken unsigned attribute's token, if there is one."""
    if unsigned is None:
        return None
    for attribute in children(der, unsigned):
        parts = children(der, attribute)
        if len(parts) != 2 or der[parts[0].start : parts[0].end] != _TIMESTAMP_TOKEN_TYPE:
            continue
        values = children(der, parts[1])
        if len(values) != 1:
            raise CmsFormatError("the timestamp attribute must hold exactly one token")
        return definite(der, values[0])[0]
    return None


# ---------------------------------------------------------------------------------------------
# Verifying


def verify_detached(
    parsed: SignedData,
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


def _verify_parsed(parsed: SignedData, digest: bytes, message: str) -> None:
    pss = None
    if parsed.pss_salt_length is not None:
        mgf = padding.MGF1(parsed.digest_algorithm.cryptography_hash())
        pss = padding.PSS(mgf=mgf, salt_length=parsed.pss_salt_length)
    request = SignatureRequest(digest, parsed.digest_algorithm, parsed.scheme, EcdsaFormat.ASN1)
    check_signature(parsed.signer_certificate.public_key(), request, parsed.signature, message, pss)


def check_signature(
    public_key: object, request: SignatureRequest, signature: bytes, message: str, pss: padding.PSS | None = None
) -> None:
    """Raise :class:`SignatureMismatch` (saying ``message``) unless ``signature`` verifies."""
    try:
        verify_digest_signature(public_key, request, signature, pss=pss)  # type: ignore[arg-type]
    except SignatureError:
        raise SignatureMismatch(message) from None


def check_unsigned_fields(der: bytes, what: str) -> None:
    """Raise :class:`CmsFormatError` unless the parts of the CMS ``der`` that no signature covers
    hold what RFC 5652 requires of them.

    A signature covers the signed attributes (or the content digest) only. Without this check, the
    SignedData and SignerInfo versions, the list of digest algorithms, the algorithms' parameters
    and the framing of the unsigned attributes could be altered unnoticed. Checked: both versions
    match the signer identifier and content type (RFC 5652 §5.1, §5.3); the digest algorithms
    listed are the signer's; digest, PKCS#1 v1.5 and ECDSA algorithm identifiers carry no parameters
    other than NULL; a signature algorithm that names a hash names the signer's; the only unsigned
    attribute is one timestamp token. ``what`` names the CMS in messages.
    """
    try:
        stored = stored_signed_data(der, read_tlv(der, 0, len(der), 0))
        if stored.digest_algorithms.identifier != SET:
            raise CmsFormatError(f"{what}'s list of digest algorithms is not a SET")
        if not stored.signers:
            raise CmsFormatError(f"{what} has no signer")
        signer_info = stored_signer(der, stored.signers[0])
        unsigned = signer_info.unsigned_attributes
        attributes = children(der, unsigned) if unsigned is not None else []
        for attribute in attributes:
            parts = children(der, attribute)
            if attribute.identifier != b"\x30" or [part.identifier for part in parts] != [b"\x06", b"\x31"]:
                raise CmsFormatError(f"an unsigned attribute of {what} is malformed")
            if der[parts[0].start : parts[0].end] != _TIMESTAMP_TOKEN_TYPE or len(attributes) > 1:
                raise CmsFormatError(f"{what} has unsigned attributes other than one timestamp")
        digest = signer_info.digest_algorithm.oid
        by_key_identifier = signer_info.sid.key_identifier is not None
        wanted = 3 if by_key_identifier else 1
        version = integer(der, signer_info.version)
        if version != wanted:
            raise CmsFormatError(f"{what}'s signer version is v{version}, not v{wanted}")
        wanted = 1 if stored.content_type == ID_DATA and not by_key_identifier else 3
        version = integer(der, stored.version)
        if version != wanted:
            raise CmsFormatError(f"{what}'s SignedData version is v{version}, not v{wanted}")
        listed = [
            algorithm_identifier(der, algorithm, f"a digest algorithm of {what}")
            for algorithm in children(der, stored.digest_algorithms)
        ]
        if not listed:
            raise CmsFormatError(f"{what} lists no digest algorithm")
        for algorithm in [*listed, signer_info.digest_algorithm]:
            if algorithm.oid != digest:
                raise CmsFormatError(f"{what} lists the digest algorithm {algorithm.oid}, but its signer uses {digest}")
            if algorithm.has_parameters(der):
                raise CmsFormatError(f"a digest algorithm in {what} has parameters")
        signature_algorithm = signer_info.signature_algorithm
        known = _SIGNATURE_ALGORITHMS.get(signature_algorithm.oid)
        if known is None:
            raise CmsFormatError(f"the signature algorithm {signature_algorithm.oid} of {what} is not supported")
        _name, scheme, named = known
        if scheme is not Scheme.RSA_PSS:
            if signature_algorithm.has_parameters(der):
                raise CmsFormatError(f"the signature algorithm of {what} has parameters")
            if named not in (None, hash_algorithm_from_oid(digest, "digest").hashlib_name):
                raise CmsFormatError(f"the signature algorithm of {what} names another hash than its signer's")
    except BerError as exc:
        raise CmsFormatError(f"{what} is malformed ({exc})") from None
