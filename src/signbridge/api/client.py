"""HTTP client of the signing service: the routes a crypto provider uses.

Transient failures (timeouts, connection errors, 5xx, 429) are retried with exponential backoff
and jitter, honouring ``Retry-After``, until ``service_unavailable_timeout`` is spent; any other
4xx fails at once with the problem's own message.
"""

from __future__ import annotations

import base64
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from cryptography import x509

from .. import __version__
from ..errors import SignbridgeError
from ..signatures import Scheme, SignatureRequest

USER_AGENT = f"signbridge/{__version__}"
_TRANSIENT_STATUS = {429, 500, 502, 503, 504}


class ApiError(SignbridgeError):
    """The service answered with an error that retrying will not fix (4xx), or another failure."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ServiceUnavailable(ApiError):
    """The service stayed unreachable, or kept failing, until the retry budget was spent."""


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
    """The person-readable part of an error response (problem+json or plain text)."""
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
        return text[:300] or response.reason_phrase
    if isinstance(body, dict):
        detail = body.get("detail")
        errors = body.get("errors")
        if not detail and isinstance(errors, dict):
            detail = "; ".join(str(m) for messages in errors.values() for m in (messages if isinstance(messages, list) else [messages]))
        return str(detail or body.get("title") or response.reason_phrase)
    return response.reason_phrase


@dataclass
class ServiceClient:
    api_url: str
    organization_id: str
    api_token: str
    http_timeout: float = 30.0
    service_unavailable_timeout: float = 600.0
    proxy: str | None = None
    ca_bundle: str | None = None
    on_retry: Callable[[str, float], None] | None = None
    _client: httpx.Client | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.api_url = self.api_url.rstrip("/")
        self._client = httpx.Client(
            timeout=self.http_timeout,
            proxy=self.proxy,
            verify=self.ca_bundle or True,
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
        deadline = time.monotonic() + self.service_unavailable_timeout
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self._client.request(method, url, headers=headers, **kwargs)
            except httpx.TransportError as exc:
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                retry_after = None
            else:
                if response.status_code < 400:
                    return response
                if response.status_code not in _TRANSIENT_STATUS:
                    raise ApiError(
                        f"{method} {url} failed with HTTP {response.status_code}: {problem_message(response)}",
                        response.status_code,
                    )
                reason = f"HTTP {response.status_code}: {problem_message(response)}"
                retry_after = _retry_after(response)
            delay = retry_after if retry_after is not None else min(30.0, 0.25 * 2 ** (attempt - 1)) * random.uniform(0.8, 1.2)
            if time.monotonic() + delay > deadline:
                raise ServiceUnavailable(
                    f"the signing service at {self.api_url} is unavailable ({reason}); gave up after "
                    f"{attempt} attempt{'s' if attempt > 1 else ''} in {self.service_unavailable_timeout:g} s"
                )
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
            return [_policy_info(item) for item in items]
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


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value and value.strip().isdigit():
        return float(value.strip())
    return None


def _policy_info(item: dict[str, Any]) -> SigningPolicyInfo:
    certificate = x509.load_der_x509_certificate(base64.b64decode(item["certificateBytes"]))
    chain = tuple(x509.load_der_x509_certificate(base64.b64decode(der)) for der in item.get("certificateChain") or [])
    return SigningPolicyInfo(
        project_slug=item["projectSlug"],
        signing_policy_slug=item["signingPolicySlug"],
        signing_policy_id=item["signingPolicyId"],
        certificate=certificate,
        chain=chain,
        key_type=item.get("keyType", ""),
        key_size=int(item.get("keySizeInBits") or 0),
    )

