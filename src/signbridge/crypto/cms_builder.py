"""CMS SignedData (RFC 5652) with one signer, built around a signature made elsewhere.

Signing is digest-only: :func:`encode_signed_attributes` encodes the signed attributes,
:func:`signed_attributes_digest` hashes them (that digest is all a signer sees), and
:func:`assemble_signed_data` checks the returned signature, asks for an RFC 3161 timestamp over it
and wraps it, the certificates and the timestamp into a detached ContentInfo. This is the one place
a new signature is verified; :mod:`signbridge.crypto.cms` reads what is built here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ..errors import SignatureError
from .ber import NULL, encode_tlv
from .chains import unique_certificates
from .cms import (
    ATTR_CONTENT_TYPE,
    ATTR_MESSAGE_DIGEST,
    ATTR_SIGNING_TIME,
    ATTR_TIMESTAMP_TOKEN,
    ECDSA_WITH,
    ID_DATA,
    ID_RSA_ENCRYPTION,
    ID_SIGNED_DATA,
    check_signature,
    read_signed_data,
)
from .der import tbs_fields
from .der_encoding import (
    encode_integer,
    encode_octet_string,
    encode_oid,
    encode_sequence,
    encode_set_of,
    encode_time,
)
from .hashes import HashAlgorithm
from .signatures import EcdsaFormat, Scheme, SignatureRequest, ecdsa_ieee_to_der

_BAD_NEW_SIGNATURE = "the signature the signer returned does not verify against the signing certificate's key"


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
    check_signature(public_key, request, signature, message)
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
    oid = ECDSA_WITH.get(hash_algorithm)
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
