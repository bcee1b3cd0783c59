"""RFC 3161 timestamps: building requests, reading replies and tokens, and checking that a token is genuine.

A timestamp token is a CMS SignedData whose content is a TSTInfo: the timestamp authority (TSA)
signs "this digest existed at this time". Signatures carry the token as an unsigned attribute, so
it outlives the signing certificate. :func:`request_timestamp` asks a TSA over HTTP;
:func:`parse_token` reads a token found in a signature; :meth:`TimestampToken.verify` checks it.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from asn1crypto import algos, cms, core, tsp
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..errors import SignatureError, TimestampError
from .chains import Purpose, describe, validate_path
from .cms import (
    ContentDigestMismatch,
    SignatureMismatch,
    find_signer_certificate,
    read_signed_data,
    verify_detached,
)
from .der import ASN1_ERRORS, read_certificates
from .hashes import HashAlgorithm

if TYPE_CHECKING:
    import httpx

QUERY_CONTENT_TYPE = "application/timestamp-query"
REPLY_CONTENT_TYPE = "application/timestamp-reply"
# Some older TSAs still answer with the draft's name for the reply type.
_LEGACY_REPLY_CONTENT_TYPE = "application/timestamp-response"

ID_CT_TST_INFO = "1.2.840.113549.1.9.16.1.4"


class PKIStatus(enum.Enum):
    """The status a TSA gives a request (RFC 3161 §2.4.2); values are asn1crypto's names."""

    GRANTED = "granted"
    GRANTED_WITH_MODS = "granted_with_mods"
    REJECTION = "rejection"
    WAITING = "waiting"
    REVOCATION_WARNING = "revocation_warning"
    REVOCATION_NOTIFICATION = "revocation_notification"


class FailureInfo(enum.Enum):
    """Why a TSA rejected a request (RFC 3161 §2.4.2 PKIFailureInfo); values are asn1crypto's names."""

    BAD_ALG = "bad_alg"
    BAD_REQUEST = "bad_request"
    BAD_DATA_FORMAT = "bad_data_format"
    TIME_NOT_AVAILABLE = "time_not_available"
    UNACCEPTED_POLICY = "unaccepted_policy"
    UNACCEPTED_EXTENSION = "unaccepted_extensions"
    ADD_INFO_NOT_AVAILABLE = "add_info_not_available"
    SYSTEM_FAILURE = "system_failure"

    @property
    def rfc_name(self) -> str:
        """The name RFC 3161 (and ``openssl ts -reply -text``) uses: ``badAlg``."""
        return _RFC_NAMES[self]


_RFC_NAMES = {
    FailureInfo.BAD_ALG: "badAlg",
    FailureInfo.BAD_REQUEST: "badRequest",
    FailureInfo.BAD_DATA_FORMAT: "badDataFormat",
    FailureInfo.TIME_NOT_AVAILABLE: "timeNotAvailable",
    FailureInfo.UNACCEPTED_POLICY: "unacceptedPolicy",
    FailureInfo.UNACCEPTED_EXTENSION: "unacceptedExtension",
    FailureInfo.ADD_INFO_NOT_AVAILABLE: "addInfoNotAvailable",
    FailureInfo.SYSTEM_FAILURE: "systemFailure",
}


class TimeStampResp(core.Sequence):
    """RFC 3161 TimeStampResp. asn1crypto's own class makes the token mandatory; a rejection has none."""

    _fields = [
        ("status", tsp.PKIStatusInfo),
        ("time_stamp_token", cms.ContentInfo, {"optional": True}),
    ]


class TimestampRejected(TimestampError):
    """The TSA answered, but did not grant a timestamp."""

    def __init__(
        self,
        status: PKIStatus,
        failures: frozenset[FailureInfo],
        status_text: str,
        source: str = "the timestamp authority",
    ) -> None:
        self.status = status
        self.failures = failures
        self.status_text = status_text
        self.source = source
        reasons = ", ".join(sorted(failure.rfc_name for failure in failures)) or "no reason code"
        message = f"{source} refused the request ({status.value}, {reasons})"
        if status_text:
            message += f": {status_text}"
        super().__init__(message)


# ---------------------------------------------------------------------------------------------
# Requests


def build_request(
    digest: bytes, hash_algorithm: HashAlgorithm, *, nonce: int | None = None, cert_req: bool = True
) -> bytes:
    """The DER TimeStampReq asking for a timestamp over ``digest`` (no policy, no extensions)."""
    try:
        hash_algorithm.check_digest(digest)
    except SignatureError as exc:
        raise TimestampError(f"cannot ask for a timestamp: {exc}") from None
    fields: dict[str, object] = {
        "version": "v1",
        "message_imprint": _message_imprint(digest, hash_algorithm),
        "cert_req": cert_req,
    }
    if nonce is not None:
        fields["nonce"] = nonce
    return tsp.TimeStampReq(fields).dump()


def _message_imprint(digest: bytes, hash_algorithm: HashAlgorithm) -> tsp.MessageImprint:
    return tsp.MessageImprint(
        {"hash_algorithm": algos.DigestAlgorithm({"algorithm": hash_algorithm.oid}), "hashed_message": digest}
    )


def request_timestamp(
    url: str,
    digest: bytes,
    hash_algorithm: HashAlgorithm,
    *,
    timeout: float = 30.0,
    client: httpx.Client | None = None,
) -> TimestampToken:
    """Ask the TSA at ``url`` for a timestamp over ``digest`` and return the token it issued.

    The reply is checked against the request (status, nonce, imprint) and the token's signature
    against the certificate it carries; whether that certificate is trusted is for
    :meth:`TimestampToken.verify` to say.
    """
    from .._httpx import httpx  # only timestamping needs an HTTP client

    nonce = secrets.randbits(63) | 1 << 62  # a full-width positive 64-bit INTEGER
    query = build_request(digest, hash_algorithm, nonce=nonce, cert_req=True)
    where = f"the timestamp authority at {url}"
    try:
        if client is None:
            with httpx.Client(timeout=timeout) as own_client:
                response = _post(own_client, url, query, timeout)
        else:
            response = _post(client, url, query, timeout)
    except httpx.TimeoutException:
        raise TimestampError(f"{where} did not answer within {timeout:g} seconds") from None
    except httpx.HTTPError as exc:
        raise TimestampError(f"could not reach {where}: {exc}") from None

    if response.status_code != 200:
        raise TimestampError(f"{where} answered HTTP {response.status_code} {response.reason_phrase}")
    content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in (REPLY_CONTENT_TYPE, _LEGACY_REPLY_CONTENT_TYPE):
        shown = content_type or "no content type"
        raise TimestampError(f"{where} answered with {shown}, not {REPLY_CONTENT_TYPE}")

    try:
        token = parse_response(response.content)
    except TimestampRejected as exc:
        raise TimestampRejected(exc.status, exc.failures, exc.status_text, source=where) from None
    except TimestampError as exc:
        raise TimestampError(f"{where} sent an unusable reply: {exc}") from None

    if token.nonce != nonce:
        raise TimestampError(f"{where} did not return the nonce it was sent; the reply may be a replay")
    if token.hash_algorithm is not hash_algorithm or token.digest != digest:
        raise TimestampError(f"{where} timestamped a different digest than the one it was sent")
    try:
        token.verify_signature()
    except TimestampError as exc:
        raise TimestampError(f"{where} returned a token that does not check out: {exc}") from None
    return token


def _post(client: httpx.Client, url: str, query: bytes, timeout: float) -> httpx.Response:
    return client.post(url, content=query, headers={"Content-Type": QUERY_CONTENT_TYPE}, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# Replies and tokens


def parse_response(der: bytes) -> TimestampToken:
    """The token in a DER TimeStampResp; :class:`TimestampRejected` if the TSA did not grant one."""
    try:
        response = TimeStampResp.load(der, strict=True)
        status_info = response["status"]
        status = PKIStatus(status_info["status"].native)
        texts = status_info["status_string"].native or []
        fail_info = status_info["fail_info"].native or set()
    except ASN1_ERRORS as exc:
        raise TimestampError(f"the reply is not a DER TimeStampResp ({exc})") from None
    if status not in (PKIStatus.GRANTED, PKIStatus.GRANTED_WITH_MODS):
        failures = frozenset(FailureInfo(name) for name in fail_info if name in _FAILURE_VALUES)
        raise TimestampRejected(status, failures, "; ".join(texts))
    token = response["time_stamp_token"]
    if isinstance(token, core.Void):
        raise TimestampError("the reply grants a timestamp but holds no token")
    return parse_token(token.dump())


_FAILURE_VALUES = {failure.value for failure in FailureInfo}


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
        try:
            return find_signer_certificate(_single_signer(_signed_data(self.der))["sid"], self.certificates)
        except ASN1_ERRORS as exc:
            raise TimestampError(f"the timestamp token's signer information is malformed ({exc})") from None

    def verify_signature(self, certificates: Iterable[x509.Certificate] = ()) -> x509.Certificate:
        """Check the token's CMS signature, its signed attributes and the signer's certificate
        (ESS binding, EKU timeStamping), without judging trust. Returns the signer's certificate,
        found among the token's own certificates and ``certificates``."""
        signer = self._verified_signer(certificates)
        check_timestamping_certificate(signer)
        return signer

    def _verified_signer(self, certificates: Iterable[x509.Certificate]) -> x509.Certificate:
        """The signer's certificate, once the token's signature, signed attributes and ESS binding check out."""
        try:
            signer_info = _single_signer(_signed_data(self.der))
            signer = find_signer_certificate(signer_info["sid"], (*self.certificates, *certificates))
            if signer is None:
                raise TimestampError(
                    "the token does not carry the timestamp authority's certificate, and none was supplied"
                )
            if isinstance(signer_info["signed_attrs"], core.Void):
                raise TimestampError("the timestamp token's signer has no signed attributes")
            _check_ess_binding(signer_info, signer)
        except ASN1_ERRORS as exc:
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
    try:
        signed_data = _signed_data(der)
        content = bytes(signed_data["encap_content_info"]["content"])
        tst_info = tsp.TSTInfo.load(content, strict=True)
        tst_info.native  # noqa: B018  (parses every field now, so malformed input fails here)
        ders = [choice.chosen.dump() for choice in signed_data["certificates"] if choice.name == "certificate"]
    except ASN1_ERRORS as exc:
        raise TimestampError(f"the timestamp token is malformed ({exc})") from None
    certificates = read_certificates(ders, "the timestamp token", TimestampError)

    if tst_info["version"].native != "v1":
        raise TimestampError(f"unsupported TSTInfo version {tst_info['version'].native}")
    imprint = tst_info["message_imprint"]
    try:
        hash_algorithm = HashAlgorithm.from_oid(imprint["hash_algorithm"]["algorithm"].dotted)
    except SignatureError as exc:
        raise TimestampError(f"the timestamp token's imprint uses an {exc}") from None
    digest = imprint["hashed_message"].native
    if len(digest) != hash_algorithm.digest_size:
        raise TimestampError(
            f"the timestamp token's {hash_algorithm.title} imprint is {len(digest)} bytes long, "
            f"not {hash_algorithm.digest_size}"
        )
    return TimestampToken(
        der=der,
        gen_time=tst_info["gen_time"].native,
        serial=tst_info["serial_number"].native,
        policy=tst_info["policy"].dotted,
        hash_algorithm=hash_algorithm,
        digest=digest,
        nonce=tst_info["nonce"].native,
        accuracy=_accuracy(tst_info["accuracy"]),
        certificates=certificates,
    )


def _accuracy(value: tsp.Accuracy | core.Void) -> timedelta | None:
    if isinstance(value, core.Void):
        return None
    parts = value.native
    return timedelta(
        seconds=parts["seconds"] or 0, milliseconds=parts["millis"] or 0, microseconds=parts["micros"] or 0
    )


def _signed_data(der: bytes) -> cms.SignedData:
    try:
        content_info = cms.ContentInfo.load(der, strict=True)
        if content_info["content_type"].native != "signed_data":
            raise TimestampError(
                f"a timestamp token is CMS SignedData, not {content_info['content_type'].native}"
            )
        signed_data = content_info["content"]
        content_type = signed_data["encap_content_info"]["content_type"].dotted
    except ASN1_ERRORS as exc:
        raise TimestampError(f"the timestamp token is not a CMS SignedData ({exc})") from None
    if content_type != ID_CT_TST_INFO:
        raise TimestampError(f"the signed content is {content_type}, not a TSTInfo ({ID_CT_TST_INFO})")
    return signed_data


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


def _single_signer(signed_data: cms.SignedData) -> cms.SignerInfo:
    signer_infos = signed_data["signer_infos"]
    if len(signer_infos) != 1:
        raise TimestampError(f"a timestamp token has exactly one signer, this one has {len(signer_infos)}")
    return signer_infos[0]


def _attribute_values(signer_info: cms.SignerInfo, name: str) -> list[core.Asn1Value] | None:
    found = [attribute for attribute in signer_info["signed_attrs"] if attribute["type"].native == name]
    if not found:
        return None
    if len(found) > 1:
        raise TimestampError(f"the timestamp token's signed attribute {name} appears more than once")
    values = list(found[0]["values"])
    if len(values) != 1:
        raise TimestampError(f"the timestamp token's signed attribute {name} must hold exactly one value")
    return values


def _check_ess_binding(signer_info: cms.SignerInfo, signer: x509.Certificate) -> None:
    """RFC 5035/2634: the signed attributes name the certificate that signed them."""
    signer_der = signer.public_bytes(serialization.Encoding.DER)
    v2 = _attribute_values(signer_info, "signing_certificate_v2")
    if v2 is not None:
        cert_id = v2[0]["certs"][0]
        hash_algorithm = _hash_from_oid(cert_id["hash_algorithm"]["algorithm"].dotted, "ESS certificate hash")
    else:
        v1 = _attribute_values(signer_info, "signing_certificate")
        if v1 is None:
            raise TimestampError(
                "the timestamp token names no signing certificate (no ESS signingCertificate attribute)"
            )
        cert_id = v1[0]["certs"][0]
        hash_algorithm = HashAlgorithm.SHA1
    if cert_id["cert_hash"].native != hash_algorithm.digest(signer_der):
        raise TimestampError("the timestamp token was signed by a certificate other than the one it names")
    issuer_serial = cert_id["issuer_serial"]
    if isinstance(issuer_serial, core.Void):
        return
    if issuer_serial["serial_number"].native != signer.serial_number:
        raise TimestampError(
            "the timestamp token's signing-certificate serial number does not match its signer"
        )
    issuer = asn1_x509.Name.load(signer.issuer.public_bytes())
    names = [name.chosen for name in issuer_serial["issuer"] if name.name == "directory_name"]
    if issuer not in names:
        raise TimestampError("the timestamp token's signing-certificate issuer does not match its signer")


def _hash_from_oid(oid: str, what: str) -> HashAlgorithm:
    try:
        return HashAlgorithm.from_oid(oid)
    except SignatureError:
        raise TimestampError(f"the timestamp token's {what} algorithm {oid} is not supported") from None
