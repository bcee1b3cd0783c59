"""Client of Apple's Notary API v2 (``/notary/v2/submissions``).

Every request carries a fresh ES256 token; transient failures (no connection, timeouts, 429, 5xx)
are retried with exponential backoff. ``SIGNBRIDGE_NOTARY_API_URL`` points the client elsewhere
(the tests' local server); the code path is the same.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..._httpx import httpx
from .credentials import ApiKey
from .errors import NotaryError

DEFAULT_API_URL = "https://appstoreconnect.apple.com/notary/v2"
ENV_API_URL = "SIGNBRIDGE_NOTARY_API_URL"
FINAL_STATUSES = frozenset({"Accepted", "Invalid", "Rejected"})
_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class UploadTarget:
    """Where a new submission's file goes: temporary object-store credentials, bucket and key."""

    submission_id: str
    access_key_id: str
    secret_access_key: str
    session_token: str
    bucket: str
    object: str

    def __repr__(self) -> str:
        return f"UploadTarget(submission_id={self.submission_id!r}, bucket={self.bucket!r}, object={self.object!r})"


@dataclass(frozen=True)
class Submission:
    id: str
    status: str | None
    name: str | None
    created_date: str | None

    @classmethod
    def from_resource(cls, resource: dict[str, Any]) -> Submission:
        attributes = resource.get("attributes") or {}
        return cls(str(resource.get("id")), attributes.get("status"), attributes.get("name"), attributes.get("createdDate"))

    def fields(self) -> dict[str, str]:
        """The submission as notarytool prints it: createdDate, id, name, status."""
        values = {"createdDate": self.created_date, "id": self.id, "name": self.name, "status": self.status}
        return {key: value for key, value in values.items() if value is not None}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


class NotaryClient:
    """The Notary API for one App Store Connect key."""

    def __init__(
        self,
        api_key: ApiKey,
        *,
        base_url: str | None = None,
        timeout: float = 60.0,
        attempts: int = 5,
        backoff: float = 1.0,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.api_key = api_key
        self.base_url = (base_url or os.environ.get(ENV_API_URL) or DEFAULT_API_URL).rstrip("/")
        self.attempts = attempts
        self.backoff = backoff
        self._sleep = sleep
        self._http = httpx.Client(timeout=timeout, transport=transport, headers={"User-Agent": "signbridge-notarytool"})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> NotaryClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        url = f"{self.base_url}/{path.lstrip('/')}"
        failure = ""
        for attempt in range(self.attempts):
            headers = {"Authorization": f"Bearer {self.api_key.token()}", "Accept": "application/json"}
            try:
                response = self._http.request(method, url, headers=headers, **kwargs)
            except httpx.TransportError as exc:
                failure = f"cannot reach the notary service at {self.base_url}: {type(exc).__name__}"
            else:
                if response.status_code not in _TRANSIENT_STATUS:
                    return self._decode(response)
                failure = f"the notary service answered HTTP {response.status_code}"
            if attempt + 1 < self.attempts:
                self._sleep(self.backoff * 2**attempt)
        raise NotaryError(f"{failure} (after {self.attempts} attempts)")

    @staticmethod
    def _decode(response: httpx.Response) -> dict[str, Any]:
        try:
            document = response.json()
        except ValueError:
            document = None
        if response.status_code == 401:
            raise NotaryError(
                "the notary service refused the credentials (HTTP 401): check the key ID, the issuer and the .p8 key"
            )
        if response.is_error or not isinstance(document, dict):
            detail = ""
            if isinstance(document, dict):
                errors = document.get("errors") or []
                detail = "; ".join(str(e.get("detail") or e.get("title") or "") for e in errors if isinstance(e, dict))
            raise NotaryError(f"the notary service answered HTTP {response.status_code}{': ' + detail if detail else ''}")
        return document

    def create_submission(self, name: str, sha256: str, webhook: str | None = None) -> UploadTarget:
        body: dict[str, Any] = {"submissionName": name, "sha256": sha256}
        if webhook:
            body["notifications"] = [{"channel": "webhook", "target": webhook}]
        data = self._request("POST", "submissions", json=body).get("data") or {}
        attributes = data.get("attributes") or {}
        try:
            return UploadTarget(
                str(data["id"]),
                attributes["awsAccessKeyId"],
                attributes["awsSecretAccessKey"],
                attributes["awsSessionToken"],
                attributes["bucket"],
                attributes["object"],
            )
        except KeyError as exc:
            raise NotaryError(f"the notary service's answer to a new submission lacks {exc.args[0]}") from None

    def submission(self, submission_id: str) -> Submission:
        data = self._request("GET", f"submissions/{_safe_id(submission_id)}").get("data")
        if not isinstance(data, dict):
            raise NotaryError(f"the notary service sent no data for submission {submission_id}")
        return Submission.from_resource(data)

    def history(self) -> list[Submission]:
        data = self._request("GET", "submissions").get("data") or []
        return [Submission.from_resource(item) for item in data if isinstance(item, dict)]

    def log_url(self, submission_id: str) -> str:
        data = self._request("GET", f"submissions/{_safe_id(submission_id)}/logs").get("data") or {}
        url = (data.get("attributes") or {}).get("developerLogUrl")
        if not url:
            raise NotaryError(f"Submission log is not available for submission {submission_id}")
        return str(url)

    def log(self, submission_id: str) -> bytes:
        url = self.log_url(submission_id)
        try:
            response = self._http.get(url)
        except httpx.TransportError as exc:
            raise NotaryError(f"cannot download the submission log: {type(exc).__name__}") from None
        if response.is_error:
            raise NotaryError(f"cannot download the submission log: HTTP {response.status_code}")
        return response.content

    def wait(
        self,
        submission_id: str,
        *,
        timeout: float | None = None,
        interval: float = 5.0,
        on_status: Callable[[Submission], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> Submission:
        """Poll until the submission is Accepted, Invalid or Rejected; :class:`NotaryError` on timeout."""
        deadline = None if timeout is None else clock() + timeout
        while True:
            current = self.submission(submission_id)
            if on_status is not None:
                on_status(current)
            if current.status in FINAL_STATUSES:
                return current
            if deadline is not None and clock() >= deadline:
                raise NotaryError(f"Timeout of {timeout:g} seconds reached waiting for submission {submission_id}")
            self._sleep(interval)


def _safe_id(submission_id: str) -> str:
    if not submission_id or any(not (c.isalnum() or c == "-") for c in submission_id):
        raise NotaryError(f"{submission_id!r} is not a submission ID")
    return submission_id
