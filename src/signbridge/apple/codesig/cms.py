"""Apple's CMS signatures as they are read: code signatures (over the primary CodeDirectory, with
Apple's CDHashes attributes) and package signatures (over the table of contents' checksum).

:func:`parse_signed_data` reads a signature as Apple writes it (:class:`ParsedSignature`: the
generic SignedData with Apple's attributes and the timestamp token read), :func:`check_timestamp`
checks its timestamp. :mod:`signbridge.apple.codesig.cms_signing` makes them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from cryptography import x509

from ...crypto.ber import BerError, Tlv
from ...crypto.cms import (
    CmsFormatError,
    CmsVerificationError,
    SignedData,
    hash_algorithm_from_oid,
    read_signed_data,
    single_attribute,
)
from ...crypto.cms import (
    check_unsigned_fields as check_cms_unsigned_fields,
)
from ...crypto.der_decoding import fields, object_identifier, octet_string, single_value
from ...crypto.hashes import HashAlgorithm
from ...errors import TimestampError
from ..plist import load_plist

if TYPE_CHECKING:
    from ...crypto.timestamps import TimestampToken

ATTR_APPLE_CDHASHES = "1.2.840.113635.100.9.1"  # XML plist {"cdhashes": [20-byte cdhash, ...]}
ATTR_APPLE_CDHASHES2 = "1.2.840.113635.100.9.2"  # one SEQUENCE {hash OID, full cdhash} per CodeDirectory


class TimestampMismatch(CmsVerificationError):
    """The timestamp token does not belong to this signature."""


# ---------------------------------------------------------------------------------------------
# Parsing


@dataclass(frozen=True)
class ParsedSignature(SignedData):
    """An Apple CMS signature: the SignedData with Apple's CDHashes attributes and its RFC 3161
    timestamp token read."""

    cdhashes: tuple[bytes, ...] | None = None
    cdhashes2: tuple[tuple[HashAlgorithm, bytes], ...] | None = None
    timestamp: TimestampToken | None = None


def parse_signed_data(data: bytes) -> ParsedSignature:
    """Read a CMS ContentInfo(SignedData) with one signer, as stored in a Mach-O BlobWrapper or a
    package's ``x-signature``: BER or DER, optionally followed by zero padding."""
    signed = read_signed_data(data)
    values = {field.name: getattr(signed, field.name) for field in dataclasses.fields(SignedData)}
    cdhashes = cdhashes2 = problem = None
    if signed.attributes is not None:
        try:
            cdhashes = single_attribute(signed.attributes, ATTR_APPLE_CDHASHES, "CDHashes", _cdhashes_from_plist)
            cdhashes2 = _cdhashes2(signed.attributes.get(ATTR_APPLE_CDHASHES2))
        except CmsFormatError as exc:
            problem = str(exc)
        except BerError as exc:
            problem = f"the CMS signature's signed attributes are malformed ({exc})"
    if problem is not None:  # as for the generic attributes: none of the values is reported
        cdhashes = cdhashes2 = None
        values |= {"content_type": None, "message_digest": None, "signing_time": None, "attribute_problem": problem}
    timestamp = None
    if signed.timestamp_token is not None:
        try:
            from ...crypto.timestamps import parse_token  # only a timestamped signature needs the reader

            timestamp = parse_token(signed.timestamp_token)
        except TimestampError as exc:
            raise CmsFormatError(f"the signature's timestamp cannot be read: {exc}") from None
    return ParsedSignature(**values, cdhashes=cdhashes, cdhashes2=cdhashes2, timestamp=timestamp)


def _cdhashes_from_plist(der: bytes, value: Tlv) -> tuple[bytes, ...]:
    try:
        octets = octet_string(der, value)
    except BerError as exc:
        raise CmsFormatError(f"the CDHashes attribute is not an OCTET STRING ({exc})") from None
    document = load_plist(octets, "the CDHashes attribute", CmsFormatError)
    cdhashes = document.get("cdhashes") if isinstance(document, dict) else None
    if not isinstance(cdhashes, list) or not all(isinstance(item, bytes) for item in cdhashes):
        raise CmsFormatError('the CDHashes attribute has no "cdhashes" array of data')
    return tuple(cdhashes)


def _cdhashes2(values: list[bytes] | None) -> tuple[tuple[HashAlgorithm, bytes], ...] | None:
    if values is None:
        return None
    result = []
    for value in values:
        parts = fields(value, single_value(value), "a CDHashes2 value")
        if len(parts) != 2:
            raise CmsFormatError("a CDHashes2 value is not a hash algorithm and a digest")
        algorithm = hash_algorithm_from_oid(object_identifier(value, parts[0]), "CDHashes2 hash")
        digest = octet_string(value, parts[1])
        if len(digest) != algorithm.digest_size:
            raise CmsFormatError(
                f"a {algorithm.title} hash in the CDHashes2 attribute is {len(digest)} bytes long"
            )
        result.append((algorithm, digest))
    return tuple(result)


# ---------------------------------------------------------------------------------------------
# Checking


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
    check_imprint(token, parsed.signature)
    try:
        if anchors is None:
            token.verify_signature(intermediates)
        else:
            token.verify(token.digest, token.hash_algorithm, anchors, intermediates=intermediates)
    except TimestampError as exc:
        raise TimestampMismatch(f"the signature's timestamp is not valid: {exc}") from None
    return token.gen_time


def check_imprint(token: TimestampToken, signature: bytes) -> None:
    """Raise :class:`TimestampMismatch` unless ``token`` timestamps ``signature`` (its imprint is
    the hash of the signature value)."""
    if token.digest != token.hash_algorithm.digest(signature):
        raise TimestampMismatch(
            "the timestamp does not cover this signature (its imprint is not the hash of the signature value)"
        )


def check_unsigned_fields(parsed: ParsedSignature) -> None:
    """Raise :class:`CmsFormatError` unless what no signature covers, in the CMS and in its timestamp
    token, holds what RFC 5652 requires (see :func:`signbridge.crypto.cms.check_unsigned_fields`)."""
    check_cms_unsigned_fields(parsed.der, "the CMS signature")
    if parsed.timestamp is not None:
        check_cms_unsigned_fields(parsed.timestamp.der, "the signature's timestamp")
