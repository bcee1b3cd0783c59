"""Asking an RFC 3161 timestamp authority (TSA) for a timestamp: the request, the HTTP exchange
and the reply.

:func:`request_timestamp` asks a TSA over HTTP and returns the token it issued, read and checked
by :mod:`signbridge.crypto.timestamps`; only signing with a timestamp loads this module.
"""

from __future__ import annotations

import enum
import secrets
from typing import TYPE_CHECKING

from asn1crypto import algos, cms, core, tsp

from ..errors import SignatureError, TimestampError
from .der import ASN1_ERRORS
from .hashes import HashAlgorithm
from .timestamps import TimestampToken, parse_token

if TYPE_CHECKING:
    import httpx

QUERY_CONTENT_TYPE = "application/timestamp-query"
REPLY_CONTENT_TYPE = "application/timestamp-reply"
# Some older TSAs still answer with the draft's name for the reply type.
_LEGACY_REPLY_CONTENT_TYPE = "application/timestamp-response"


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
# Replies


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
