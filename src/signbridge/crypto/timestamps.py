"""RFC 3161 timestamp tokens: reading one and checking that it is genuine.

A timestamp token is a CMS SignedData whose content is a TSTInfo: the timestamp authority (TSA)
signs "this digest existed at this time". Signatures carry the token as an unsigned attribute, so
it outlives the signing certificate. :func:`parse_token` reads a token found in a signature (with
:mod:`signbridge.crypto.cms`, as any CMS); :meth:`TimestampToken.verify` checks it.
:mod:`signbridge.crypto.timestamp_requests` asks a TSA for one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..errors import SignatureError, TimestampError
from .ber import BerError, Tlv, children
from .chains import Purpose, describe, validate_path
from .cms import (
    CmsFormatError,
    ContentDigestMismatch,
    NotSignedData,
    SignatureMismatch,
    StoredSignedData,
    StoredSigner,
    find_signer_certificate,
    read_signed_data,
    signed_attribute_values,
    single_attribute,
    stored_signed_data,
    stored_signer,
    verify_detached,
)
from .der import read_certificates, tbs_fields
from .der_decoding import (
    BOOLEAN,
    GENERALIZED_TIME,
    INTEGER,
    SEQUENCE,
    algorithm_identifier,
    boolean,
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

ID_CT_TST_INFO = "1.2.840.113549.1.9.16.1.4"
ATTR_SIGNING_CERTIFICATE = "1.2.840.113549.1.9.16.2.12"
ATTR_SIGNING_CERTIFICATE_V2 = "1.2.840.113549.1.9.16.2.47"


@dataclass(frozen=True)
class TimestampToken:
    """An RFC 3161 TimeStampToken and what it says.

    ``der`` is the ContentInfo as received: the bytes to embed in a signature's unsigned
    attributes, and the bytes every check runs on.
    """

    der: bytes = field(repr=False)
    gen_time: datetime
    serial: int
    policy: str
    hash_algorithm: HashAlgorithm
    digest: bytes
    nonce: int | None
    accuracy: timedelta | None
    certificates: tuple[x509.Certificate, ...] = field(repr=False)

    @property
    def signer_certificate(self) -> x509.Certificate | None:
        """The TSA's certificate, if the token carries it."""
        return find_signer_certificate(_single_signer(_stored(self.der)).sid, self.certificates)

    def verify_signature(self, certificates: Iterable[x509.Certificate] = ()) -> x509.Certificate:
        """Check the token's CMS signature, its signed attributes and the signer's certificate
        (ESS binding, EKU timeStamping), without judging trust. Returns the signer's certificate,
        found among the token's own certificates and ``certificates``."""
        signer = self._verified_signer(certificates)
        check_timestamping_certificate(signer)
        return signer

    def _verified_signer(self, certificates: Iterable[x509.Certificate]) -> x509.Certificate:
        """The signer's certificate, once the token's signature, signed attributes and ESS binding check out."""
        stored = _stored(self.der)
        signer_info = _single_signer(stored)
        signer = find_signer_certificate(signer_info.sid, (*self.certificates, *certificates))
        if signer is None:
            raise TimestampError(
                "the token does not carry the timestamp authority's certificate, and none was supplied"
            )
        if signer_info.signed_attributes is None:
            raise TimestampError("the timestamp token's signer has no signed attributes")
        try:
            _check_ess_binding(signed_attribute_values(signer_info.signed_attributes), signer)
        except (BerError, CmsFormatError) as exc:
            raise TimestampError(f"the timestamp token's signer information is malformed ({exc})") from None
        try:
            verify_detached(read_signed_data(self.der, certificates=(signer,)), content_name="its TSTInfo")
        except SignatureMismatch:
            raise TimestampError("the timestamp token's signature does not verify: it was altered or forged") from None
        except ContentDigestMismatch:
            raise TimestampError(
                "the timestamp token's TSTInfo does not match its messageDigest: it was altered"
            ) from None
        except SignatureError as exc:
            raise TimestampError(f"the timestamp token's signature cannot be checked ({exc})") from None
        return signer

    def verify(
        self,
        digest: bytes,
        hash_algorithm: HashAlgorithm,
        anchors: Sequence[x509.Certificate],
        *,
        intermediates: Iterable[x509.Certificate] = (),
        at: datetime | None = None,
    ) -> None:
        """Raise :class:`TimestampError` unless this token is a genuine timestamp of ``digest``.

        Checks the imprint, the CMS signature over the stored signed-attribute bytes, the
        messageDigest and contentType attributes, the ESS signing-certificate binding, the signer's
        EKU (timeStamping, critical, alone), and a certificate chain from the signer to one of
        ``anchors`` whose certificates were all valid at ``at`` (default: the token's genTime; a naive
        ``at`` is taken as UTC).
        """
        if hash_algorithm is not self.hash_algorithm:
            raise TimestampError(
                f"the timestamp covers a {self.hash_algorithm.title} digest, not a {hash_algorithm.title} one"
            )
        if digest != self.digest:
            raise TimestampError("the timestamp covers a different digest than the one being checked")
        if not anchors:
            raise TimestampError("no trusted root certificates were given to check the timestamp against")
        extra = tuple(intermediates)
        signer = self._verified_signer(extra)
        when = self.gen_time if at is None else at if at.tzinfo else at.replace(tzinfo=UTC)
        path = validate_path(signer, (*self.certificates, *extra), anchors, purpose=_TIMESTAMPING, at=when)
        if path.ok:
            return
        if path.purpose_problems:
            raise TimestampError(path.purpose_problems[0])
        if path.not_valid:
            certificate = path.not_valid[0]
            start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
            raise TimestampError(
                f"the certificate {describe(certificate)} was not valid at {when:%Y-%m-%d %H:%M:%S} UTC "
                f"(valid {start:%Y-%m-%d} to {end:%Y-%m-%d})"
            )
        raise TimestampError(
            f"the timestamp authority's certificate {describe(signer)} does not chain to a trusted root "
            f"({path.problems[0]})"
        )


def parse_token(der: bytes) -> TimestampToken:
    """Read a DER TimeStampToken (a CMS ContentInfo), such as one embedded in a signature."""
    stored = _stored(der)
    try:
        if stored.content is None:
            raise BerError("the token holds no TSTInfo")
        tst_info = _tst_info(stored.content)
    except BerError as exc:
        raise TimestampError(f"the timestamp token is malformed ({exc})") from None
    certificates = read_certificates(stored.certificates, "the timestamp token", TimestampError)

    if tst_info.version != 1:
        raise TimestampError(f"unsupported TSTInfo version {tst_info.version}")
    try:
        hash_algorithm = HashAlgorithm.from_oid(tst_info.hash_oid)
    except SignatureError as exc:
        raise TimestampError(f"the timestamp token's imprint uses an {exc}") from None
    digest = tst_info.digest
    if len(digest) != hash_algorithm.digest_size:
        raise TimestampError(
            f"the timestamp token's {hash_algorithm.title} imprint is {len(digest)} bytes long, "
            f"not {hash_algorithm.digest_size}"
        )
    return TimestampToken(
        der=der,
        gen_time=tst_info.gen_time,
        serial=tst_info.serial,
        policy=tst_info.policy,
        hash_algorithm=hash_algorithm,
        digest=digest,
        nonce=tst_info.nonce,
        accuracy=tst_info.accuracy,
        certificates=certificates,
    )


class _TstInfo(NamedTuple):
    version: int
    policy: str
    hash_oid: str
    digest: bytes
    serial: int
    gen_time: datetime
    accuracy: timedelta | None
    nonce: int | None


# The optional fields of a TSTInfo, in the order they come: accuracy, ordering, nonce, tsa, extensions.
_TST_INFO_OPTIONAL = (SEQUENCE, BOOLEAN, INTEGER, b"\xa0", b"\xa1")


def _tst_info(content: bytes) -> _TstInfo:
    """The TSTInfo (RFC 3161 §2.4.2) that is ``content``, every field read."""
    version, policy, imprint, serial, gen_time, *optional = fields(content, single_value(content), "the TSTInfo", 5)
    imprint_parts = fields(content, imprint, "the TSTInfo's message imprint")
    if len(imprint_parts) != 2:
        raise BerError("the TSTInfo's message imprint is not a hash algorithm and a digest")
    accuracy = nonce = None
    expected = _TST_INFO_OPTIONAL
    for part in optional:
        if part.identifier not in expected:
            raise BerError(f"the TSTInfo has an unexpected field (tag {part.identifier.hex()})")
        expected = expected[expected.index(part.identifier) + 1 :]
        if part.identifier == SEQUENCE:
            accuracy = _accuracy(content, part)
        elif part.identifier == BOOLEAN:
            boolean(content, part)
        elif part.identifier == INTEGER:
            nonce = integer(content, part)
        elif part.identifier == b"\xa0":
            if len(children(content, part)) != 1:
                raise BerError("the TSTInfo's TSA name is not one GeneralName")
        else:
            children(content, part)  # the extensions: no further than their structure
    return _TstInfo(
        version=integer(content, version),
        policy=object_identifier(content, policy),
        hash_oid=algorithm_identifier(content, imprint_parts[0], "the imprint's hash algorithm").oid,
        digest=octet_string(content, imprint_parts[1]),
        serial=integer(content, serial),
        gen_time=time_value(content, expect(gen_time, GENERALIZED_TIME, "the TSTInfo's genTime")),
        accuracy=accuracy,
        nonce=nonce,
    )


def _accuracy(content: bytes, value: Tlv) -> timedelta:
    """Accuracy: optional seconds, then [0] millis and [1] micros, each at most once, in order."""
    amounts = {INTEGER: 0, b"\x80": 0, b"\x81": 0}
    expected = tuple(amounts)
    for part in children(content, value):
        if part.identifier not in expected:
            raise BerError(f"the TSTInfo's accuracy has an unexpected field (tag {part.identifier.hex()})")
        expected = expected[expected.index(part.identifier) + 1 :]
        amounts[part.identifier] = integer(content, part, part.identifier)
    try:
        return timedelta(seconds=amounts[INTEGER], milliseconds=amounts[b"\x80"], microseconds=amounts[b"\x81"])
    except OverflowError:
        raise BerError("the TSTInfo's accuracy is out of range") from None


def _stored(der: bytes) -> StoredSignedData:
    """The token's CMS SignedData as stored, which must hold a TSTInfo."""
    try:
        stored = stored_signed_data(der, single_value(der))
    except NotSignedData as exc:
        raise TimestampError(f"a timestamp token is CMS SignedData, not {exc.kind}") from None
    except BerError as exc:
        raise TimestampError(f"the timestamp token is not a CMS SignedData ({exc})") from None
    if stored.content_type != ID_CT_TST_INFO:
        raise TimestampError(f"the signed content is {stored.content_type}, not a TSTInfo ({ID_CT_TST_INFO})")
    return stored


# ---------------------------------------------------------------------------------------------
# Checking a token


def _timestamping_problems(certificate: x509.Certificate) -> list[str]:
    try:
        check_timestamping_certificate(certificate)
    except TimestampError as exc:
        return [str(exc)]
    return []


_TIMESTAMPING = Purpose("timestamping", _timestamping_problems)


def check_timestamping_certificate(certificate: x509.Certificate) -> None:
    """Raise :class:`TimestampError` unless ``certificate`` may sign timestamps (RFC 3161 §2.3):
    an extended key usage extension that is critical and names timeStamping alone, and a key
    usage, if present, limited to digitalSignature and nonRepudiation."""
    name = certificate.subject.rfc4514_string() or "(no subject)"
    try:
        eku = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    except x509.ExtensionNotFound:
        raise TimestampError(
            f'the certificate "{name}" has no extended key usage; a timestamping certificate needs a '
            "critical extended key usage of timeStamping only"
        ) from None
    usages = list(eku.value)
    if usages != [x509.ExtendedKeyUsageOID.TIME_STAMPING]:
        shown = ", ".join(getattr(oid, "_name", oid.dotted_string) for oid in usages)
        raise TimestampError(
            f'the certificate "{name}" has extended key usage {shown}; a timestamping certificate must '
            "have timeStamping only"
        )
    if not eku.critical:
        raise TimestampError(
            f'the certificate "{name}" has a non-critical extended key usage; RFC 3161 requires it critical'
        )
    try:
        key_usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    allowed = key_usage.digital_signature or key_usage.content_commitment
    others = (
        key_usage.key_encipherment,
        key_usage.data_encipherment,
        key_usage.key_agreement,
        key_usage.key_cert_sign,
        key_usage.crl_sign,
    )
    if not allowed or any(others):
        raise TimestampError(
            f'the certificate "{name}" has a key usage other than digitalSignature/nonRepudiation, '
            "which a timestamping certificate must not have"
        )


def _single_signer(stored: StoredSignedData) -> StoredSigner:
    if len(stored.signers) != 1:
        raise TimestampError(f"a timestamp token has exactly one signer, this one has {len(stored.signers)}")
    try:
        return stored_signer(stored.der, stored.signers[0])
    except BerError as exc:
        raise TimestampError(f"the timestamp token's signer information is malformed ({exc})") from None


def _check_ess_binding(attributes: dict[str, list[bytes]], signer: x509.Certificate) -> None:
    """RFC 5035/2634: the signed attributes name the certificate that signed them."""
    signer_der = signer.public_bytes(serialization.Encoding.DER)
    v2 = single_attribute(attributes, ATTR_SIGNING_CERTIFICATE_V2, "signingCertificateV2", _certificate_id)
    if v2 is not None:
        der, cert_id = v2
        hash_algorithm = HashAlgorithm.SHA256  # the default
        if cert_id[0].identifier == SEQUENCE:
            oid = algorithm_identifier(der, cert_id[0], "an ESS certificate hash algorithm").oid
            hash_algorithm = _hash_from_oid(oid, "ESS certificate hash")
            cert_id = cert_id[1:]
    else:
        v1 = single_attribute(attributes, ATTR_SIGNING_CERTIFICATE, "signingCertificate", _certificate_id)
        if v1 is None:
            raise TimestampError(
                "the timestamp token names no signing certificate (no ESS signingCertificate attribute)"
            )
        der, cert_id = v1
        hash_algorithm = HashAlgorithm.SHA1
    if not cert_id:
        raise BerError("an ESS certificate identifier has no hash")
    if octet_string(der, cert_id[0]) != hash_algorithm.digest(signer_der):
        raise TimestampError("the timestamp token was signed by a certificate other than the one it names")
    if len(cert_id) == 1:
        return
    issuer_serial = fields(der, cert_id[1], "an ESS IssuerSerial")
    if len(issuer_serial) != 2:
        raise BerError("an ESS IssuerSerial is not an issuer and a serial number")
    if integer(der, issuer_serial[1]) != signer.serial_number:
        raise TimestampError(
            "the timestamp token's signing-certificate serial number does not match its signer"
        )
    names = [children(der, name) for name in fields(der, issuer_serial[0], "an ESS issuer") if name.identifier == b"\xa4"]
    issuer = tbs_fields(signer).issuer
    if not any(len(name) == 1 and same_name(issuer, der[name[0].start : name[0].end]) for name in names):
        raise TimestampError("the timestamp token's signing-certificate issuer does not match its signer")


def _certificate_id(der: bytes, value: Tlv) -> tuple[bytes, list[Tlv]]:
    """``der`` and the fields of the first certificate identifier in the SigningCertificate or
    SigningCertificateV2 value it holds."""
    certificates = fields(der, fields(der, value, "an ESS signing certificate", 1)[0], "an ESS certificate list", 1)
    return der, fields(der, certificates[0], "an ESS certificate identifier", 1)


def _hash_from_oid(oid: str, what: str) -> HashAlgorithm:
    try:
        return HashAlgorithm.from_oid(oid)
    except SignatureError:
        raise TimestampError(f"the timestamp token's {what} algorithm {oid} is not supported") from None
