"""CMS SignedData (RFC 5652) with one signer: built around a signature made elsewhere, parsed from its
stored bytes, and verified.

Signing is digest-only: :func:`encode_signed_attributes` encodes the signed attributes,
:func:`signed_attributes_digest` hashes them (that digest is all a signer sees), and
:func:`assemble_signed_data` checks the returned signature, asks for an RFC 3161 timestamp over it
and wraps it, the certificates and the timestamp into a detached ContentInfo. This is the one place
a new signature is verified.

Reading accepts what real signers emit: BER indefinite lengths, zero padding after the
ContentInfo, signed attributes stored out of DER order (the signature is checked over the stored
bytes, never over a re-encoding), SHA-1 or SHA-2, RSA (PKCS#1 v1.5 or PSS) or ECDSA, with or without
signed attributes. :func:`read_signed_data` reads a blob, :func:`verify_detached` checks it against
the content, :func:`check_unsigned_fields` checks what no signature covers. Apple's signatures
(:mod:`signbridge.apple.codesig.cms`) and timestamp tokens (:mod:`signbridge.crypto.timestamps`) are both
read and checked here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

from asn1crypto import (
    algos,
    cms,
    core,
    tsp,  # noqa: F401 - registers the TSTInfo content type before cms builds its reverse map
)
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from ..errors import SignatureError
from .ber import BerError, Tlv, children, definite, encode_tlv, raw_signer_info, read_tlv
from .chains import unique_certificates
from .der import ASN1_ERRORS, read_certificates, tbs_fields
from .der_encoding import (
    NULL,
    encode_integer,
    encode_octet_string,
    encode_oid,
    encode_sequence,
    encode_set_of,
    encode_time,
)
from .hashes import HashAlgorithm
from .signatures import EcdsaFormat, Scheme, SignatureRequest, ecdsa_ieee_to_der, verify_digest_signature

ID_DATA = "1.2.840.113549.1.7.1"
ID_SIGNED_DATA = "1.2.840.113549.1.7.2"
ATTR_CONTENT_TYPE = "1.2.840.113549.1.9.3"
ATTR_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
ATTR_SIGNING_TIME = "1.2.840.113549.1.9.5"
ATTR_TIMESTAMP_TOKEN = "1.2.840.113549.1.9.16.2.14"
ID_RSA_ENCRYPTION = "1.2.840.113549.1.1.1"
_ECDSA_WITH = {
    HashAlgorithm.SHA1: "1.2.840.10045.4.1",
    HashAlgorithm.SHA224: "1.2.840.10045.4.3.1",
    HashAlgorithm.SHA256: "1.2.840.10045.4.3.2",
    HashAlgorithm.SHA384: "1.2.840.10045.4.3.3",
    HashAlgorithm.SHA512: "1.2.840.10045.4.3.4",
}

T = TypeVar("T")

_BAD_NEW_SIGNATURE = "the signature the signer returned does not verify against the signing certificate's key"


class CmsFormatError(SignatureError):
    """The bytes are not a CMS signature signbridge can read."""


class CmsVerificationError(SignatureError):
    """A CMS signature was read, but one of its checks failed."""


class ContentDigestMismatch(CmsVerificationError):
    """The signature's message digest is not the digest of the content being checked."""


class SignatureMismatch(CmsVerificationError):
    """The signature value does not verify with the signer's public key."""


# ---------------------------------------------------------------------------------------------
# Building


def encode_signed_attributes(
    content_digest: bytes,
    *,
    hash_algorithm: HashAlgorithm = HashAlgorithm.SHA256,
    signing_time: datetime | None = None,
    include_signing_time: bool = True,
    content_type: str = ID_DATA,
    extra: Sequence[bytes] = (),
) -> bytes:
    """The DER SET OF signed attributes (tag 0x31, DER-sorted) for a signature over content whose
    ``hash_algorithm`` digest is ``content_digest``: contentType, messageDigest, signingTime (now
    unless given) unless ``include_signing_time`` is false, and the ``extra`` attributes (each
    encoded by :func:`encode_attribute`)."""
    hash_algorithm.check_digest(content_digest)
    attributes = [
        encode_attribute(ATTR_CONTENT_TYPE, [encode_oid(content_type)]),
        encode_attribute(ATTR_MESSAGE_DIGEST, [encode_octet_string(content_digest)]),
    ]
    if include_signing_time:
        attributes.append(encode_attribute(ATTR_SIGNING_TIME, [encode_time(signing_time or datetime.now(UTC))]))
    return encode_set_of([*attributes, *extra])


def encode_attribute(oid: str, values: list[bytes]) -> bytes:
    """A DER Attribute: the type and the SET OF its (already encoded) values."""
    return encode_sequence(encode_oid(oid), encode_set_of(values))


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
    timestamp: Callable[[bytes], bytes] | None = None,
    content_digest: bytes | None = None,
    signer_name: str = "",
) -> bytes:
    """A detached ContentInfo(SignedData) around a signature made elsewhere.

    ``signed_attrs_der`` are the exact bytes that were signed (as built by
    :func:`encode_signed_attributes`), or None for the form whose signature is directly over
    ``content_digest``. The signature (ECDSA in ``ecdsa_format``) is checked against the
    certificate's public key first: a signature that does not verify is never timestamped nor
    returned (``signer_name``, the token that made it, names it in the message). ``timestamp``,
    given the signature value, returns a DER TimeStampToken over it, stored as the
    id-aa-timeStampToken unsigned attribute. The certificates are the signer's followed by
    ``chain``; the signer is named by issuer and serial number.
    """
    scheme = scheme_for(signer_certificate, signature_algorithm)
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
    request = SignatureRequest(signed_digest, hash_algorithm, scheme, EcdsaFormat.ASN1)
    message = _BAD_NEW_SIGNATURE
    if signer_name:
        message = f"the token {signer_name} returned a signature that does not verify against the certificate"
    _verify(public_key, request, signature, None, message)
    timestamp_token = timestamp(signature) if timestamp is not None else None

    der = encode_signed_data(
        signed_attrs_der=signed_attrs_der,
        signature=signature,
        certificates=unique_certificates([signer_certificate, *chain]),
        signer_certificate=signer_certificate,
        hash_algorithm=hash_algorithm,
        scheme=scheme,
        timestamp_token=timestamp_token,
    )
    parsed = read_signed_data(der)
    if parsed.signed_attributes != signed_attrs_der or parsed.signature != signature:
        raise SignatureError("the CMS encoder changed the signed bytes; this is a bug in signbridge")
    return der


def scheme_for(certificate: x509.Certificate, requested: Scheme | None) -> Scheme:
    """The signature scheme of the certificate's key in a CMS (RSA PKCS#1 v1.5 or ECDSA), which must
    be ``requested`` when one is."""
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


def _signature_algorithm(scheme: Scheme, hash_algorithm: HashAlgorithm) -> bytes:
    if scheme is Scheme.RSA_PKCS1:
        return encode_sequence(encode_oid(ID_RSA_ENCRYPTION), NULL)  # NULL parameters, as Apple writes
    oid = _ECDSA_WITH.get(hash_algorithm)
    if oid is None:
        raise SignatureError(f"ECDSA with {hash_algorithm.title} is not used in CMS signatures")
    return encode_sequence(encode_oid(oid))


def encode_signed_data(
    *,
    signed_attrs_der: bytes | None,
    signature: bytes,
    certificates: Sequence[x509.Certificate],
    signer_certificate: x509.Certificate,
    hash_algorithm: HashAlgorithm,
    scheme: Scheme,
    timestamp_token: bytes | None,
    content_type: str = ID_DATA,
    content: bytes | None = None,
) -> bytes:
    """The DER ContentInfo(SignedData) of one signer named by issuer and serial number: detached
    unless ``content`` (of ``content_type``) is given, and without certificates when none are."""
    if signed_attrs_der is not None and signed_attrs_der[:1] != b"\x31":
        raise SignatureError("signed attributes are stored from their DER SET OF (tag 0x31)")
    digest_algorithm = encode_sequence(encode_oid(hash_algorithm.oid), NULL)  # NULL parameters, as Apple's
    signer = tbs_fields(signer_certificate)
    signer_info = [encode_integer(1), encode_sequence(signer.issuer, signer.serial_number), digest_algorithm]
    if signed_attrs_der is not None:
        signer_info.append(b"\xa0" + signed_attrs_der[1:])  # [0] IMPLICIT: the SET's length and contents
    signer_info += [_signature_algorithm(scheme, hash_algorithm), encode_octet_string(signature)]
    if timestamp_token is not None:
        signer_info.append(encode_tlv(0xA1, encode_attribute(ATTR_TIMESTAMP_TOKEN, [timestamp_token])))
    encapsulated = [encode_oid(content_type)]
    if content is not None:
        encapsulated.append(encode_tlv(0xA0, encode_octet_string(content)))
    fields = [
        encode_integer(1 if content_type == ID_DATA else 3),  # RFC 5652 §5.1
        encode_set_of([digest_algorithm]),
        encode_sequence(*encapsulated),
    ]
    if certificates:  # [0] IMPLICIT SET OF Certificate, in DER order
        encodings = [certificate.public_bytes(serialization.Encoding.DER) for certificate in certificates]
        fields.append(b"\xa0" + encode_set_of(encodings)[1:])
    fields.append(encode_set_of([encode_sequence(*signer_info)]))
    return encode_sequence(encode_oid(ID_SIGNED_DATA), encode_tlv(0xA0, encode_sequence(*fields)))


# ---------------------------------------------------------------------------------------------
# Parsing


@dataclass(frozen=True)
class SignedData:
    """What a CMS signature says, read from its stored bytes.

    ``signed_attributes`` are the bytes the signature covers (the stored attributes re-tagged as a
    SET, tag 0x31), or None when the signature is directly over the content digest;
    ``attributes`` their values by OID. ``signature`` is the SignerInfo's signature value (ECDSA in
    DER), the bytes a timestamp covers; ``timestamp_token`` the DER TimeStampToken stored over it,
    if any. When the attribute values cannot be read, ``attribute_problem`` says why and they are
    None; :func:`verify_detached` then fails, after checking whether the signature covers them.
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
    attributes: dict[str, list[core.Asn1Value]] | None = field(default=None, repr=False, compare=False)
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
        return _parse(der, top, tuple(certificates))
    except BerError as exc:
        raise CmsFormatError(str(exc)) from None
    except ASN1_ERRORS as exc:
        raise CmsFormatError(f"the CMS signature is malformed ({exc})") from None


def _parse(der: bytes, top: Tlv, extra_certificates: tuple[x509.Certificate, ...]) -> SignedData:
    content_info = cms.ContentInfo.load(der)
    if content_info["content_type"].dotted != ID_SIGNED_DATA:
        raise CmsFormatError(f"the CMS structure is {content_info['content_type'].native}, not SignedData")
    signed_data = content_info["content"]
    signer_infos = signed_data["signer_infos"]
    if len(signer_infos) != 1:
        raise CmsFormatError(f"the CMS signature has {len(signer_infos)} signers; Apple signatures have one")
    signer_info = signer_infos[0]
    raw_fields = raw_signer_info(der, top)

    certificates = _certificates(signed_data)
    signer = find_signer_certificate(signer_info["sid"], (*certificates, *extra_certificates))
    if signer is None:
        raise CmsFormatError("the CMS signature does not include the signer's certificate")

    digest_algorithm = hash_algorithm_from_oid(signer_info["digest_algorithm"]["algorithm"].dotted, "digest")
    scheme, salt_length = _scheme_of(signer_info["signature_algorithm"], digest_algorithm)

    encap = signed_data["encap_content_info"]
    encapsulated_type = encap["content_type"].dotted
    content = None if isinstance(encap["content"], core.Void) else bytes(encap["content"])

    signed_attrs = None
    values = _AttributeValues()
    if not isinstance(signer_info["signed_attrs"], core.Void):
        raw_attrs = next(child for child in raw_fields[3:] if child.identifier == b"\xa0")
        signed_attrs = b"\x31" + definite(der, raw_attrs)[0][1:]
        values = _attribute_values(signer_info["signed_attrs"])

    return SignedData(
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
        attributes=values.attributes,
        timestamp_token=_timestamp_token(der, raw_fields),
        pss_salt_length=salt_length,
        attribute_problem=values.problem,
    )


@dataclass(frozen=True)
class _AttributeValues:
    content_type: str | None = None
    message_digest: bytes | None = None
    signing_time: datetime | None = None
    attributes: dict[str, list[core.Asn1Value]] | None = None
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
            content_type=single_attribute(attributes, ATTR_CONTENT_TYPE, "contentType", lambda v: v.dotted),
            message_digest=single_attribute(attributes, ATTR_MESSAGE_DIGEST, "messageDigest", lambda v: v.native),
            signing_time=single_attribute(attributes, ATTR_SIGNING_TIME, "signingTime", lambda v: v.chosen.native),
            attributes=attributes,
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


def hash_algorithm_from_oid(oid: str, what: str) -> HashAlgorithm:
    """The hash algorithm ``oid`` names in a CMS signature; ``what`` names its role in the message."""
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
    if kind in ("rsassa_pkcs1v15", "ecdsa"):
        try:
            named = algorithm.hash_algo
        except ValueError:  # rsaEncryption names no hash
            named = digest_algorithm.hashlib_name
        if named != digest_algorithm.hashlib_name:
            raise CmsFormatError(
                f"the CMS signature algorithm {algorithm['algorithm'].native} names {named}, "
                f"but the signer's digest algorithm is {digest_algorithm.hashlib_name}"
            )
        return (Scheme.RSA_PKCS1 if kind == "rsassa_pkcs1v15" else Scheme.ECDSA), None
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


def single_attribute(
    attributes: dict[str, list[core.Asn1Value]], oid: str, name: str, read: Callable[[core.Asn1Value], T]
) -> T | None:
    """The value of the signed attribute ``oid`` (called ``name`` in messages) as ``read`` reads it,
    None when absent; an attribute holds exactly one value."""
    values = attributes.get(oid)
    if values is None:
        return None
    if len(values) != 1:
        raise CmsFormatError(f"the signed attribute {name} must hold exactly one value, not {len(values)}")
    return read(values[0])


def find_signer_certificate(sid: cms.SignerIdentifier, pool: Iterable[x509.Certificate]) -> x509.Certificate | None:
    """The certificate a CMS SignerIdentifier names (issuer and serial number, or subject key identifier)."""
    for certificate in pool:
        if sid.name == "issuer_and_serial_number":
            wanted = sid.chosen
            if certificate.serial_number != wanted["serial_number"].native:
                continue
            # The same bytes first: comparing as RFC 5280 does (string preparation) is much slower.
            if certificate.issuer.public_bytes() == wanted["issuer"].dump():
                return certificate
            if _asn1_name(certificate.issuer) == wanted["issuer"]:
                return certificate
        else:
            try:
                ski = certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            except x509.ExtensionNotFound:
                continue
            if ski.digest == sid.chosen.native:
                return certificate
    return None


def _asn1_name(name: x509.Name) -> asn1_x509.Name:
    return asn1_x509.Name.load(name.public_bytes())


def _timestamp_token(der: bytes, raw_fields: list[Tlv]) -> bytes | None:
    """The DER of the id-aa-timeStampToken unsigned attribute's token, if there is one."""
    unsigned = next((child for child in raw_fields if child.identifier == b"\xa1"), None)
    if unsigned is None:
        return None
    token_oid = core.ObjectIdentifier(ATTR_TIMESTAMP_TOKEN).dump()
    for attribute in children(der, unsigned):
        parts = children(der, attribute)
        if len(parts) != 2 or der[parts[0].start : parts[0].end] != token_oid:
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
    _verify(parsed.signer_certificate.public_key(), request, parsed.signature, pss, message)


def _verify(public_key: object, request: SignatureRequest, signature: bytes, pss: padding.PSS | None, message: str) -> None:
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
        top = read_tlv(der, 0, len(der), 0)
        fields = children(der, children(der, children(der, top)[1])[0])
        if fields[1].identifier != b"\x31":
            raise CmsFormatError(f"{what}'s list of digest algorithms is not a SET")
        unsigned = next((child for child in raw_signer_info(der, top) if child.identifier == b"\xa1"), None)
        token_type = core.ObjectIdentifier(ATTR_TIMESTAMP_TOKEN).dump()
        attributes = children(der, unsigned) if unsigned is not None else []
        for attribute in attributes:
            parts = children(der, attribute)
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
    except BerError as exc:
        raise CmsFormatError(str(exc)) from None
    except ASN1_ERRORS as exc:
        raise CmsFormatError(f"{what} is malformed ({exc})") from None
