"""Errors that carry a message written for the person at the terminal.

Every error signbridge raises on purpose derives from :class:`SignbridgeError`; the command line
prints its message (never a traceback) and exits with its ``exit_code``.
"""

from __future__ import annotations


class SignbridgeError(Exception):
    """Base class: ``str(error)`` is the one line shown to the user."""

    exit_code: int = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(SignbridgeError):
    """A setting is missing, malformed or contradictory."""

    exit_code = 2


class UsageError(SignbridgeError):
    """The command line asks for something that cannot be done."""

    exit_code = 2


class NotFoundError(SignbridgeError):
    """A named object (organization, project, policy, user, token, key) does not exist."""


class AlreadyExistsError(SignbridgeError):
    """An object with that name already exists."""


class KeystoreError(SignbridgeError):
    """The keystore could not be opened, or refused an operation."""


class SignatureError(SignbridgeError):
    """A signature could not be produced, or did not verify."""


class AuditError(SignbridgeError):
    """The audit log could not be written, or failed verification."""


class TimestampError(SignbridgeError):
    """A timestamp could not be requested, issued or verified."""
