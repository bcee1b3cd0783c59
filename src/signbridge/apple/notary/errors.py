"""Errors of notarization, each with a message for the person at the terminal."""

from __future__ import annotations

from ...errors import ConfigError, SignbridgeError
from .ticket import TicketError


class NotaryError(SignbridgeError):
    """The Notary API refused a request or could not be reached."""


class CredentialsError(ConfigError):
    """The App Store Connect API key, its ID or the issuer is missing or unusable."""


class UploadError(NotaryError):
    """The file could not be uploaded to the notary service's object store."""


__all__ = [
    "CredentialsError", "NotaryError", "PayloadError", "StapleError", "TicketError", "TicketNotFoundError", "UploadError",
]


class TicketNotFoundError(TicketError):
    """The ticket delivery service has no ticket (yet) for this code."""


class StapleError(SignbridgeError):
    """A ticket cannot be stapled to, or validated in, this file."""


class PayloadError(SignbridgeError):
    """A package's payload cannot be read safely (too large, too many entries, a path escaping)."""
