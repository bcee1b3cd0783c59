"""Fetching tickets from Apple's ticket delivery service (a public CloudKit database).

Request: ``POST .../records/lookup`` with ``{"records": [{"recordName": "2/<type>/<hex>"}]}``.
Answer: each record either has ``fields.signedTicket`` (``{"type": "BYTES", "value": base64}``)
or ``serverErrorCode``/``reason`` (``NOT_FOUND``, "Record not found"). A ticket appears some
minutes after the notary accepts a submission, so "not found" is retried until ``wait`` runs out.
``SIGNBRIDGE_TICKET_LOOKUP_URL`` points the client elsewhere (the tests' local service).
"""

from __future__ import annotations

import base64
import binascii
import os
import time
from collections.abc import Callable

from ..._httpx import httpx
from .errors import TicketError, TicketNotFoundError

LOOKUP_URL = (
    "https://api.apple-cloudkit.com/database/1/com.apple.gk.ticket-delivery/production/public/records/lookup"
)
ENV_LOOKUP_URL = "SIGNBRIDGE_TICKET_LOOKUP_URL"
HASH_SHA1, HASH_SHA256 = 1, 2  # hash types, numbered as in a CodeDirectory
RECORD_DIGEST_SIZE = 20


def record_name(hash_type: int, digest: bytes) -> str:
    """The delivery service's record for a digest: ``2/<hash type>/<first 20 bytes, hex>``."""
    return f"2/{hash_type}/{digest[:RECORD_DIGEST_SIZE].hex()}"


def fetch_ticket(
    record: str,
    *,
    wait: float = 0.0,
    interval: float = 15.0,
    url: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> bytes:
    """The ticket's bytes for ``record``; retries "record not found" for ``wait`` seconds."""
    endpoint = url or os.environ.get(ENV_LOOKUP_URL) or LOOKUP_URL
    deadline = clock() + wait
    while True:
        try:
            return _lookup_once(endpoint, record)
        except TicketNotFoundError:
            if clock() + interval > deadline:
                raise
        sleep(interval)


def _lookup_once(endpoint: str, record: str) -> bytes:
    try:
        response = httpx.post(
            endpoint,
            json={"records": [{"recordName": record}]},
            headers={"Accept": "application/json"},
            timeout=30.0,
        )
    except httpx.TransportError as exc:
        raise TicketError(f"cannot reach the ticket delivery service: {type(exc).__name__}") from None
    if response.is_error:
        raise TicketError(f"the ticket delivery service answered HTTP {response.status_code}")
    try:
        records = response.json()["records"]
        answer = next(item for item in records if item.get("recordName") == record)
    except (ValueError, KeyError, TypeError, StopIteration, AttributeError):
        raise TicketError(f"the ticket delivery service's answer has no record {record}") from None
    field = (answer.get("fields") or {}).get("signedTicket")
    if field is None:
        reason = answer.get("reason") or answer.get("serverErrorCode") or "no ticket"
        raise TicketNotFoundError(f'CloudKit query for {record} failed due to "{reason}".')
    if field.get("type") != "BYTES":
        raise TicketError(f"the ticket for {record} is not of type BYTES")
    try:
        return base64.b64decode(field.get("value", ""), validate=True)
    except (binascii.Error, ValueError):
        raise TicketError(f"the ticket for {record} is not valid base64") from None
