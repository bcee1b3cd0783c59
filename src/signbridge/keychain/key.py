"""Signing through a running token: the ``sign`` of an identity the keychain found.

One connection per token (socket, label and PIN) serves every signature of the process: it is
opened, logged in on first use, and keys are found by CKA_ID once; a bundle's many signatures
then cost one C_SignInit + C_Sign each. Calls on it are serialised, so an identity can be used
from any number of threads. When the token went away in between (stopped, restarted or reloaded:
the connection or the session is gone), the next signature connects again, once. The connections
are closed when the process exits.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import threading
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ..crypto.signatures import (
    Scheme,
    SignatureRequest,
    ecdsa_ieee_to_der,
)
from ..errors import SignatureError, SignbridgeError
from ..pkcs11 import CKA, CKO, ConnectionLostError, Pkcs11Client, Pkcs11Error, Pkcs11Object, pss_params
from ..pkcs11.constants import CKM, CKR

log = logging.getLogger("signbridge.keychain")

DEFAULT_PIN = "CONFIG"  # the provider then uses the credentials it was started with
SIGN_TIMEOUT = 900.0  # a sign may wait for the service's own retries (ServiceUnavailableTimeout 600 s)
# What a token that restarted or reloaded answers on an old connection: nothing was signed yet.
_GONE = {CKR.SESSION_HANDLE_INVALID, CKR.SESSION_CLOSED, CKR.KEY_HANDLE_INVALID, CKR.USER_NOT_LOGGED_IN}


class TokenAccessError(SignbridgeError):
    """A running token could not be read: it refused the PIN or broke the protocol."""


def log_in(client: Pkcs11Client, slot: int, token_name: str, pin: str) -> None:
    """C_Login with ``pin``; a PIN the token refuses is a :class:`TokenAccessError`."""
    try:
        client.login(pin, slot)
    except Pkcs11Error as exc:
        if exc.ckr == CKR.PIN_INCORRECT:
            raise TokenAccessError(f"the token {token_name} did not accept the PIN") from None
        raise


@dataclass(frozen=True)
class TokenKey:
    """Signs digests with one private key of a running token: the ``sign`` of an :class:`Identity`.

    Each call signs with C_Sign in this process's session on the token (see the module
    documentation). RSA PKCS#1 v1.5 sends the DigestInfo (CKM_RSA_PKCS), PSS the digest with MGF1
    and a hash-sized salt (CKM_RSA_PKCS_PSS), ECDSA the digest (CKM_ECDSA); ECDSA signatures are
    returned as DER. Whoever uses a signature verifies it against the certificate, once.
    """

    token_name: str
    socket: str
    token_label: str
    key_id: bytes
    certificate: x509.Certificate = dataclasses.field(repr=False)
    pin: str = dataclasses.field(default=DEFAULT_PIN, repr=False)

    def __call__(self, request: SignatureRequest) -> bytes:
        public_key = self.certificate.public_key()
        mechanism, data, params = _mechanism(public_key, request)
        try:
            signature = self._sign(mechanism, data, params)
        except (Pkcs11Error, TokenAccessError) as exc:
            raise SignatureError(f"the token {self.token_name} could not sign: {exc}") from None
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            return ecdsa_ieee_to_der(signature, public_key.curve)  # a token's r || s, as DER
        return signature

    def _sign(self, mechanism: int, data: bytes, params: object) -> bytes:
        with _SESSIONS_LOCK:
            place = (self.socket, self.token_label, self.pin)
            session = _SESSIONS.get(place)
            if session is not None:
                try:
                    return session.sign(self.key_id, mechanism, data, params)
                except Pkcs11Error as exc:
                    if not _token_went_away(exc):
                        raise
                    log.info("token %s: its session is gone (%s); connecting again", self.token_name, exc)
                    _close(place)
            session = _Session.open(self)
            _SESSIONS[place] = session
            return session.sign(self.key_id, mechanism, data, params)


def _mechanism(public_key: object, request: SignatureRequest) -> tuple[int, bytes, object]:
    if isinstance(public_key, rsa.RSAPublicKey):
        if request.scheme is Scheme.RSA_PKCS1:
            return CKM.RSA_PKCS, request.hash_algorithm.digest_info(request.digest), None
        if request.scheme is Scheme.RSA_PSS:
            return CKM.RSA_PKCS_PSS, request.digest, pss_params(request.hash_algorithm)
        raise SignatureError(f"an RSA key cannot make {request.scheme.value} signatures")
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if request.scheme is not Scheme.ECDSA:
            raise SignatureError(f"an ECDSA key cannot make {request.scheme.value} signatures")
        return CKM.ECDSA, request.digest, None
    raise SignatureError(f"the token cannot sign with a {type(public_key).__name__}")


@dataclass
class _Session:
    """A connection to one token, logged in on the slot with its label, and the keys found on it."""

    client: Pkcs11Client
    slot: int
    keys: dict[bytes, Pkcs11Object] = dataclasses.field(default_factory=dict)

    @classmethod
    def open(cls, key: TokenKey) -> _Session:
        client = Pkcs11Client.connect(key.socket, timeout=SIGN_TIMEOUT)
        try:
            slot = _slot(client, key.token_label)
            log_in(client, slot, key.token_name, key.pin)
        except BaseException:
            client.close()
            raise
        return cls(client, slot)

    def sign(self, key_id: bytes, mechanism: int, data: bytes, params: object) -> bytes:
        if key_id not in self.keys:
            found = self.client.objects(self.slot, object_class=CKO.PRIVATE_KEY, id=key_id, attributes=(CKA.CLASS,))
            if not found:
                raise TokenAccessError(f"it no longer has the private key {key_id!r}")
            self.keys[key_id] = found[0]
        return self.client.sign(self.keys[key_id], mechanism, data, params)  # type: ignore[arg-type]


def _slot(client: Pkcs11Client, label: str) -> int:
    for slot in client.slots():
        if client.token_info(slot).label == label:
            return slot
    raise TokenAccessError(f"it no longer serves the token {label!r}")


def _token_went_away(exc: Pkcs11Error) -> bool:
    return isinstance(exc, ConnectionLostError) or exc.ckr in _GONE


_SESSIONS: dict[tuple[str, str, str], _Session] = {}
_SESSIONS_LOCK = threading.RLock()


def _close(place: tuple[str, str, str]) -> None:
    session = _SESSIONS.pop(place, None)
    if session is not None:
        session.client.close()


@atexit.register
def _close_all() -> None:
    with _SESSIONS_LOCK:
        for place in list(_SESSIONS):
            _close(place)
