"""RFC 9457 problem details: the one shape of every error the API returns."""

from __future__ import annotations

import uuid
from typing import Any

PROBLEM_TYPES = {
    400: ("https://tools.ietf.org/html/rfc9110#section-15.5.1", "One or more validation errors occurred."),
    401: ("https://tools.ietf.org/html/rfc9110#section-15.5.2", "Unauthorized"),
    403: ("https://tools.ietf.org/html/rfc9110#section-15.5.4", "Forbidden"),
    404: ("https://tools.ietf.org/html/rfc9110#section-15.5.5", "Not Found"),
    405: ("https://tools.ietf.org/html/rfc9110#section-15.5.6", "Method Not Allowed"),
    413: ("https://tools.ietf.org/html/rfc9110#section-15.5.14", "Content Too Large"),
    415: ("https://tools.ietf.org/html/rfc9110#section-15.5.16", "Unsupported Media Type"),
    429: ("https://tools.ietf.org/html/rfc6585#section-4", "Too Many Requests"),
    500: ("https://tools.ietf.org/html/rfc9110#section-15.6.1", "Internal Server Error"),
    503: ("https://tools.ietf.org/html/rfc9110#section-15.6.4", "Service Unavailable"),
}

PROBLEM_CONTENT_TYPE = "application/problem+json"


class Problem(Exception):
    """An API error. ``detail`` is written for the person who will read the client's error output."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        audit_outcome: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.field = field
        self.headers = headers or {}
        self.audit_outcome = audit_outcome or ("rejected" if status in (400, 413, 415) else "denied")

    def body(self, trace_id: str | None = None) -> dict[str, Any]:
        problem_type, title = PROBLEM_TYPES.get(self.status, PROBLEM_TYPES[500])
        body: dict[str, Any] = {"type": problem_type, "title": title, "status": self.status, "detail": self.detail}
        if self.status == 400:
            # ASP.NET's validation shape, which SignPath clients (jsign) print.
            body["errors"] = {self.field or "": [self.detail]}
        body["traceId"] = trace_id or f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-00"
        return body


def bad_request(detail: str, field: str | None = None) -> Problem:
    return Problem(400, detail, field=field)
