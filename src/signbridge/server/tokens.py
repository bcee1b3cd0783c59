"""API token values: generated once, shown once, stored only as a hash.

A value is 44 base64url characters: 9 bytes of public token id followed by 24 random bytes. The id
finds the row; the SHA-256 of the whole value is compared in constant time with the stored hash.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass

_ID_BYTES = 9
_SECRET_BYTES = 24
_VALUE_LENGTH = 44


@dataclass(frozen=True)
class NewToken:
    token_id: str
    value: str
    secret_hash: bytes


def generate() -> NewToken:
    raw = secrets.token_bytes(_ID_BYTES + _SECRET_BYTES)
    value = base64.urlsafe_b64encode(raw).decode()
    return NewToken(raw[:_ID_BYTES].hex(), value, hash_value(value))


def hash_value(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


def token_id_of(value: str) -> str | None:
    """The public id inside a token value, or None if the value is not one of ours."""
    if len(value) != _VALUE_LENGTH:
        return None
    try:
        raw = base64.urlsafe_b64decode(value)
    except (binascii.Error, ValueError):
        return None
    return raw[:_ID_BYTES].hex()


def matches(value: str, stored_hash: bytes) -> bool:
    return hmac.compare_digest(hash_value(value), stored_hash)


def redact(text: str, *secrets_: str | None) -> str:
    """``text`` with every given secret replaced by ``***``."""
    for secret in secrets_:
        if secret:
            text = text.replace(secret, "***")
    return text
