"""HTTP client of the signing service: the routes a crypto provider uses.

Transient failures (timeouts, connection errors, 5xx, 429) are retried with exponential backoff
and jitter, honouring ``Retry-After``, until ``service_unavailable_timeout`` is spent; any other
4xx fails at once with the problem's own message, and so does a TLS certificate that does not
verify (retrying cannot fix it).

TLS verification is always on. The trusted roots are the system's (OpenSSL's default paths, which
``SSL_CERT_FILE``/``SSL_CERT_DIR`` can move) plus, when given, an extra CA bundle for a service
whose certificate comes from a private CA. ``proxy`` is SignPath's ``HttpProxy``; without it the
usual ``HTTPS_PROXY``/``NO_PROXY`` variables apply.
"""

from __future__ import annotations

import base64
import email.utils
import enum
import platform
import random
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from .. import __version__
from .._httpx import httpx
from ..crypto.signatures import Scheme, SignatureRequest
from ..errors import ConfigError, SignbridgeError

USER_AGENT = (
    f"signbridge/{__version__} (crypto provider; {platform.system() or sys.platform}; "
    f"Python {platform.python_version()})"
)
_TRANSIENT_STATUS = {429, 500, 502, 503, 504}
_MAX_BACKOFF = 30.0


class ApiError(SignbridgeError):
    """The service answered with an error that retrying will not fix (4xx), or another failure."""

    def __init__(self, message: str, status: int | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail or message  # the service's own words (problem+json detail), when it answered


class ServiceUnavailable(ApiError):
    """The service stayed unreachable, or kept failing, until the retry budget was spent.

    ``status`` is the HTTP status of the last attempt, or None when it got no answer at all.
    """


class TlsVerificationError(ApiError):
    """The service's TLS certificate did not verify against the trusted roots."""


class Failure(enum.Enum):
    """What kind of failure an exception from this client is; see :func:`classify`."""

    TRANSIENT = "transient"  # timeouts, no connection, 503/429/504 after every retry
    SERVER = "server"  # the service kept failing with another 5xx (500, 502)
    CLIENT = "client"  # a 4xx: the request or its credentials are wrong
    OTHER = "other"  # anything else: a malformed answer, TLS, a bug


def classify(error: BaseException) -> Failure:
    """The kind of failure behind ``error``, as SignPath's providers tell them apart."""
    if isinstance(error, ServiceUnavailable):
        if error.status in (500, 502):
            return Failure.SERVER
        return Failure.TRANSIENT
    if isinstance(error, ApiError) and error.status is not None:
        if 400 <= error.status < 500:
            return Failure.CLIENT
        if error.status >= 500:
            return Failure.SERVER
    return Failure.OTHER


@dataclass(frozen=True)
class SigningPolicyInfo:
    project_slug: str
    signing_policy_slug: str
    signing_policy_id: str
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    key_type: str
    key_size: int

    @property
    def key_id(self) -> str:
        """SignPath's key id: ``$ProjectSlug/$SigningPolicySlug``."""
        return f"{self.project_slug}/{self.signing_policy_slug}"


def problem_message(response: httpx.Response) -> str:
    """The person-readable part of an error response (problem+json or plain text), on one line."""
    try:
        body = response.json()
    except ValueError:
        return _one_line(response.text)[:300] or response.reason_phrase
    if isinstance(body, dict):
        detail = body.get("detail")
        errors = body.get("errors")
        if not detail and isinstance(errors, dict):
            detail = "; ".join(
                str(message)
                for messages in errors.values()
                for message in (messages if isinstance(messages, list) else [messages])
            )
        return _one_line(str(detail or body.get("title") or response.reason_phrase))
    return response.reason_phrase


def _one_line(text: str) -> str:
    return " ".join(text.split())


def tls_context(ca_bundle: str | Path | None = None) -> ssl.SSLContext:
    """The system's trusted roots, plus those in ``ca_bundle`` (a PEM file) when given."""
    context = ssl.create_default_context()
    if ca_bundle is not None:
        try:
            context.load_verify_locations(cafile=str(ca_bundle))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"the CA bundle {ca_bundle} holds no usable PEM certificates: {exc}") from None
    return context


@dataclass
class ServiceClient:
    api_url: str
    organization_id: str
    api_token: str
    http_timeout: float = 30.0
    service_unavailable_timeout: float = 600.0
    proxy: str | None = None
    ca_bundle: str | Path | None = None
    on_retry: Callable[[str, float], None] | None = None
    _client: httpx.Client | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.api_url = self.api_url.rstrip("/")
        # Loading the system's trusted roots takes tens of milliseconds: not for a plain-HTTP
        # service reached without a proxy (a local one), which makes no TLS connection at all.
        # A CaBundle given is still read, so that a broken one is reported as before.
        plain = self.api_url.startswith("http://") and not self.proxy and self.ca_bundle is None
        self._client = httpx.Client(
            timeout=self.http_timeout,
            proxy=self.proxy,
            verify=False if plain else tls_context(self.ca_bundle),
            headers={"User-Agent": USER_AGENT},
            limits=httpx.Limits(max_keepalive_connections=32, max_connections=64),
        )

    def __repr__(self) -> str:
        return f"ServiceClient({self.api_url!r}, organization {self.organization_id})"

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def _org_url(self) -> str:
        return f"{self.api_url}/v1/{self.organization_id}"

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        assert self._client is not None
        headers = {"Authorization": f"Bearer {self.api_token}", **kwargs.pop("headers", {})}
        started = time.monotonic()
        deadline = started + self.service_unavailable_timeout
        attempt = 0
        while True:
            attempt += 1
            status: int | None = None
            try:
                response = self._client.request(method, url, headers=headers, **kwargs)
            except httpx.TransportError as exc:
                _raise_if_tls_failure(exc, self.api_url)
                reason = f"{type(exc).__name__}: {_one_line(str(exc))}" if str(exc) else type(exc).__name__
                retry_after = None
            else:
                if response.status_code < 400:
                    return response
                status = response.status_code
                if status not in _TRANSIENT_STATUS:
                    detail = problem_message(response)
                    raise ApiError(f"HTTP {status} from {method} {url}: {detail}", status, detail)
                reason = f"HTTP {status}: {problem_message(response)}"
                retry_after = _retry_after(response)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                spent = time.monotonic() - started
                raise ServiceUnavailable(
                    f"the signing service at {self.api_url} is unavailable ({reason}); gave up after "
                    f"{attempt} attempt{'s' if attempt > 1 else ''} in {spent:.0f} s "
                    f"(ServiceUnavailableTimeoutInSeconds is {self.service_unavailable_timeout:g})",
                    status,
                )
            if retry_after is not None:
                delay = retry_after
            else:
                delay = min(_MAX_BACKOFF, 0.25 * 2 ** (attempt - 1)) * random.uniform(0.8, 1.2)
            delay = min(delay, remaining)  # one last attempt at the deadline
            if self.on_retry is not None:
                self.on_retry(reason, delay)
            time.sleep(delay)

    def healthy(self) -> bool:
        assert self._client is not None
        try:
            return self._client.get(f"{self.api_url}/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def my_signing_policies(
        self, project_slug: str | None = None, signing_policy_slug: str | None = None
    ) -> list[SigningPolicyInfo]:
        params = {}
        if project_slug:
            params["projectSlug"] = project_slug
        if signing_policy_slug:
            params["signingPolicySlug"] = signing_policy_slug
        response = self._request("GET", f"{self._org_url}/Cryptoki/MySigningPolicies", params=params)
        try:
            items = response.json()["signingPolicies"]
            parsed: dict[str, x509.Certificate] = {}  # one issuer serves many policies: parsed once
            return [_policy_info(item, parsed) for item in items]
        except (ValueError, KeyError, TypeError) as exc:
            raise ApiError(f"the service's list of signing policies is malformed: {exc}") from None

    def sign_hash(
        self,
        project_slug: str,
        signing_policy_slug: str,
        request: SignatureRequest,
        metadata: dict[str, Any] | None = None,
    ) -> bytes:
        """One ``SignHash`` call: only the digest is sent. ECDSA signatures come back in ``request.ecdsa_format``."""
        data: dict[str, Any] = {"hash": base64.b64encode(request.digest).decode()}
        if request.scheme is Scheme.ECDSA:
            data["signatureAlgorithm"] = "Ecdsa"
            data["ecdsaOptions"] = {"signatureFormat": request.ecdsa_format.value}
        else:
            data["signatureAlgorithm"] = "Rsa"
            data["rsaOptions"] = {
                "hashAlgorithmName": request.hash_algorithm.title,
                "paddingMode": "Pss" if request.scheme is Scheme.RSA_PSS else "Pkcs1",
            }
        if metadata:
            data["metadata"] = metadata
        body = {"projectSlug": project_slug, "signingPolicySlug": signing_policy_slug, "hashSigningData": data}
        response = self._request("POST", f"{self._org_url}/SigningRequests/SignHash", json=body)
        try:
            return base64.b64decode(response.json()["hashSigningResult"]["signature"], validate=True)
        except (ValueError, KeyError, TypeError) as exc:
            raise ApiError(f"the service's SignHash answer is malformed: {exc}") from None


def _raise_if_tls_failure(exc: httpx.TransportError, api_url: str) -> None:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            reason = cause.verify_message or cause.reason or str(cause)
            raise TlsVerificationError(
                f"the TLS certificate of {api_url} did not verify ({reason}); if the service uses a "
                "private CA, add its certificate with CaBundle (SIGNBRIDGE_CA_BUNDLE)"
            ) from None
        cause = cause.__cause__ or cause.__context__


def _retry_after(response: httpx.Response) -> float | None:
    value = (response.headers.get("retry-after") or "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _policy_info(item: dict[str, Any], parsed: dict[str, x509.Certificate]) -> SigningPolicyInfo:
    certificate = _certificate(item["certificateBytes"], parsed)
    chain = tuple(_certificate(encoded, parsed) for encoded in item.get("certificateChain") or [])
    return SigningPolicyInfo(
        project_slug=item["projectSlug"],
        signing_policy_slug=item["signingPolicySlug"],
        signing_policy_id=item["signingPolicyId"],
        certificate=certificate,
        chain=chain,
        key_type=item.get("keyType", ""),
        key_size=int(item.get("keySizeInBits") or 0),
    )


def _certificate(encoded: str, parsed: dict[str, x509.Certificate]) -> x509.Certificate:
    certificate = parsed.get(encoded)
    if certificate is None:
        certificate = parsed[encoded] = x509.load_der_x509_certificate(base64.b64decode(encoded))
    return certificate
