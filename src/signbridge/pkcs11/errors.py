"""Errors of the PKCS#11 layer: each one carries the CK_RV a PKCS#11 caller should see."""

from __future__ import annotations

from ..errors import ConfigError, SignbridgeError
from .constants import CKR, name


class Pkcs11Error(SignbridgeError):
    """A PKCS#11 failure with its return value.

    Signers raise it to choose what the consumer sees (e.g. ``CKR_DEVICE_ERROR`` when the signing
    service fails); the client raises it when a token answers with an error.
    """

    def __init__(self, ckr: int, message: str | None = None) -> None:
        self.ckr = int(ckr)
        super().__init__(message or f"the token answered {name('CKR', self.ckr)}")

    @property
    def ckr_name(self) -> str:
        return name("CKR", self.ckr)


class ProtocolError(Pkcs11Error):
    """The other end broke the p11-kit RPC protocol (bad frame, bad signature, truncated data)."""

    def __init__(self, message: str) -> None:
        super().__init__(CKR.DEVICE_ERROR, message)


class ConnectionLostError(Pkcs11Error):
    """The connection to the token broke (the token stopped or restarted): a new one may work."""

    def __init__(self, message: str) -> None:
        super().__init__(CKR.DEVICE_ERROR, message)


class MechanismUnsupported(Pkcs11Error):
    """A mechanism whose parameters this codec cannot carry."""

    def __init__(self, mechanism: int) -> None:
        self.mechanism = mechanism
        super().__init__(CKR.MECHANISM_INVALID, f"mechanism {name('CKM', mechanism)} is not supported")


class SocketPathError(ConfigError):
    """The socket cannot be created safely where it was asked for."""
