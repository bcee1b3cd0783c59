"""The PKCS#11 keystore: keys generated on a token (an HSM, or SoftHSM2 in tests) and never extractable.

Keys are named by their CKA_ID in hex. Signing sends the token only what the mechanism needs: the
DigestInfo for RSA PKCS#1 v1.5 (CKM_RSA_PKCS), the digest for RSA-PSS (CKM_RSA_PKCS_PSS) and ECDSA
(CKM_ECDSA).

Two facts about PKCS#11 shape this module. Login belongs to the whole process, not to a session:
a second login is refused and a logout ends every session. So every keystore that opens the same
token in this process shares one logged-in session. And python-pkcs11 initialises a module without
OS locking, which tells the module that no two threads will call it at once; every call into a
module therefore holds that module's lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pkcs11
from asn1crypto.core import OctetString
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11

from ...crypto.hashes import HashAlgorithm
from ...crypto.signatures import Scheme, SignatureRequest, curve_size, ecdsa_ieee_to_der
from ...errors import KeystoreError, SignatureError
from . import KeyRef, KeySpec

if TYPE_CHECKING:
    from pkcs11._pkcs11 import lib as Pkcs11Library

# DER of the named-curve OIDs that go in CKA_EC_PARAMS.
_EC_PARAMS = {256: bytes.fromhex("06082a8648ce3d030107"), 384: bytes.fromhex("06052b81040022")}
_CURVES: dict[bytes, ec.EllipticCurve] = {
    _EC_PARAMS[256]: ec.SECP256R1(),
    _EC_PARAMS[384]: ec.SECP384R1(),
}

_PSS_PARAMS = {
    HashAlgorithm.SHA1: (Mechanism.SHA_1, pkcs11.MGF.SHA1),
    HashAlgorithm.SHA224: (Mechanism.SHA224, pkcs11.MGF.SHA224),
    HashAlgorithm.SHA256: (Mechanism.SHA256, pkcs11.MGF.SHA256),
    HashAlgorithm.SHA384: (Mechanism.SHA384, pkcs11.MGF.SHA384),
    HashAlgorithm.SHA512: (Mechanism.SHA512, pkcs11.MGF.SHA512),
}

# Errors after which a cached object handle may simply be stale (the key was deleted elsewhere).
_STALE_HANDLE = (p11.ObjectHandleInvalid, p11.KeyHandleInvalid)
# Errors that mean a session is already gone, so closing it has nothing left to do.
_SESSION_GONE = (p11.SessionHandleInvalid, p11.SessionClosed, p11.DeviceRemoved, p11.TokenNotPresent)

_MAX_KEY_ID_BYTES = 64


@dataclass(eq=False)
class _CachedKey:
    handle: pkcs11.PrivateKey
    key_type: KeyType
    curve: ec.EllipticCurve | None = None  # an EC key's curve

    @property
    def ec_size(self) -> int:
        """Bytes in the curve order, for truncating ECDSA input."""
        return curve_size(self.curve) if self.curve is not None else 0


@dataclass(eq=False)
class _Connection:
    """One logged-in read/write session on one token, shared by the keystores that opened it."""

    module: str
    token_label: str
    session: pkcs11.Session
    lock: threading.RLock
    pin_tag: bytes
    users: int = 1
    private_keys: dict[bytes, _CachedKey] = field(default_factory=dict)
    public_keys: dict[bytes, PublicKeyTypes] = field(default_factory=dict)


_registry_lock = threading.Lock()
_module_locks: dict[str, threading.RLock] = {}
_connections: dict[tuple[str, str], _Connection] = {}
# Keystores opening an already logged-in token compare PINs through this keyed hash, so that no
# PIN is kept in memory after login.
_pin_tag_key = secrets.token_bytes(32)


class Pkcs11Keystore:
    """Keys on a PKCS#11 token, generated there as sensitive and non-extractable."""

    backend = "pkcs11"
    signs_in_process = False

    def __init__(self, module: str, token_label: str, pin: str) -> None:
        if not pin:
            raise KeystoreError(f"no PIN was given for the PKCS#11 token {token_label!r}")
        self.module = module
        self.token_label = token_label
        self._connection: _Connection | None = _connect(os.path.realpath(module), module, token_label, pin)

    def __repr__(self) -> str:
        return f"Pkcs11Keystore(module={self.module!r}, token_label={self.token_label!r})"

    def generate(self, spec: KeySpec, label: str) -> KeyRef:
        connection = self._open_connection()
        key_id = secrets.token_bytes(16)
        capabilities = MechanismFlag.SIGN | MechanismFlag.VERIFY
        private_template = {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
        }
        public_template: dict[Attribute, object] = {Attribute.TOKEN: True, Attribute.PRIVATE: False}
        if spec.family == "rsa":
            key_type, key_length = KeyType.RSA, spec.bits
        else:
            key_type, key_length = KeyType.EC, None
            public_template[Attribute.EC_PARAMS] = _EC_PARAMS[spec.bits]
        try:
            with connection.lock:
                connection.session.generate_keypair(
                    key_type,
                    key_length,
                    id=key_id,
                    label=label,
                    store=True,
                    capabilities=capabilities,
                    public_template=public_template,
                    private_template=private_template,
                )
        except p11.PKCS11Error as exc:
            raise KeystoreError(
                f"the PKCS#11 token {self.token_label!r} could not generate a {spec.label} key: "
                f"{_describe(exc)}"
            ) from None
        return KeyRef(self.backend, key_id.hex())

    def public_key(self, ref: KeyRef) -> PublicKeyTypes:
        connection = self._open_connection()
        key_id = self._key_id(ref)
        cached = connection.public_keys.get(key_id)
        if cached is not None:
            return cached
        try:
            with connection.lock:
                public = _find(connection, ObjectClass.PUBLIC_KEY, key_id)
                if public is None:
                    # RSA private keys carry their public half; EC private keys do not.
                    public = _find(connection, ObjectClass.PRIVATE_KEY, key_id)
                if public is None:
                    raise self._not_found(ref)
                key = _public_key_from(public)
        except p11.PKCS11Error as exc:
            raise KeystoreError(
                f"cannot read the public key of {ref} from the token: {_describe(exc)}"
            ) from None
        connection.public_keys[key_id] = key
        return key

    def check(self, ref: KeyRef) -> None:
        connection = self._open_connection()
        key_id = self._key_id(ref)
        try:
            with connection.lock:
                found = _find(connection, ObjectClass.PRIVATE_KEY, key_id)
        except p11.PKCS11Error as exc:
            raise KeystoreError(f"the PKCS#11 token {self.token_label!r} does not answer: {_describe(exc)}") from None
        if found is None:
            raise self._not_found(ref)

    def sign(self, ref: KeyRef, request: SignatureRequest) -> bytes:
        connection = self._open_connection()
        key_id = self._key_id(ref)
        for attempt in (1, 2):
            key = self._private_key(connection, ref, key_id)
            mechanism, parameter, data = _mechanism_for(key, request)
            try:
                with connection.lock:
                    raw = key.handle.sign(data, mechanism=mechanism, mechanism_param=parameter)
                break
            except _STALE_HANDLE:
                connection.private_keys.pop(key_id, None)
                if attempt == 2:
                    raise self._not_found(ref) from None
            except p11.PKCS11Error as exc:
                raise KeystoreError(
                    f"the PKCS#11 token refused to sign with {ref}: {_describe(exc)}"
                ) from None
        if key.curve is not None:
            return ecdsa_ieee_to_der(raw, key.curve)  # the token's r || s
        return raw

    def delete(self, ref: KeyRef) -> None:
        connection = self._open_connection()
        key_id = self._key_id(ref)
        try:
            with connection.lock:
                objects = list(connection.session.get_objects({Attribute.ID: key_id}))
                keys = [obj for obj in objects if isinstance(obj, pkcs11.PrivateKey | pkcs11.PublicKey)]
                if not keys:
                    raise self._not_found(ref)
                for obj in keys:
                    obj.destroy()
        except p11.PKCS11Error as exc:
            raise KeystoreError(f"the PKCS#11 token could not delete {ref}: {_describe(exc)}") from None
        finally:
            connection.private_keys.pop(key_id, None)
            connection.public_keys.pop(key_id, None)

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            _release(connection)

    def _private_key(self, connection: _Connection, ref: KeyRef, key_id: bytes) -> _CachedKey:
        cached = connection.private_keys.get(key_id)
        if cached is not None:
            return cached
        try:
            with connection.lock:
                handle = _find(connection, ObjectClass.PRIVATE_KEY, key_id)
                if handle is None:
                    raise self._not_found(ref)
                key_type = handle.key_type
                curve = _curve(handle[Attribute.EC_PARAMS]) if key_type is KeyType.EC else None
        except p11.PKCS11Error as exc:
            raise KeystoreError(f"cannot find {ref} on the token: {_describe(exc)}") from None
        cached = _CachedKey(handle, key_type, curve)
        connection.private_keys[key_id] = cached
        return cached

    def _key_id(self, ref: KeyRef) -> bytes:
        if ref.backend != self.backend:
            raise KeystoreError(
                f"the key {ref} belongs to the {ref.backend} keystore, not the pkcs11 keystore"
            )
        try:
            key_id = bytes.fromhex(ref.key_id)
        except ValueError:
            key_id = b""
        if not key_id or len(key_id) > _MAX_KEY_ID_BYTES:
            raise KeystoreError(f"malformed PKCS#11 key id {ref.key_id!r}: expected the CKA_ID in hex")
        return key_id

    def _not_found(self, ref: KeyRef) -> KeystoreError:
        return KeystoreError(f"there is no key {ref} on the PKCS#11 token {self.token_label!r}")

    def _open_connection(self) -> _Connection:
        if self._connection is None:
            raise KeystoreError("the PKCS#11 keystore has been closed")
        return self._connection


def _connect(module_path: str, module_name: str, token_label: str, pin: str) -> _Connection:
    pin_tag = hmac.new(_pin_tag_key, pin.encode(), hashlib.sha256).digest()
    with _registry_lock:
        existing = _connections.get((module_path, token_label))
        if existing is not None:
            if not hmac.compare_digest(existing.pin_tag, pin_tag):
                raise KeystoreError(f"wrong PIN for the PKCS#11 token {token_label!r}")
            existing.users += 1
            return existing
        lock = _module_locks.setdefault(module_path, threading.RLock())
        with lock:
            library = _load_module(module_path, module_name)
            token = _find_token(library, module_name, token_label)
            session = _log_in(token, token_label, pin)
        connection = _Connection(module_path, token_label, session, lock, pin_tag)
        _connections[(module_path, token_label)] = connection
        return connection


def _release(connection: _Connection) -> None:
    with _registry_lock:
        connection.users -= 1
        if connection.users > 0:
            return
        del _connections[(connection.module, connection.token_label)]
        connection.private_keys.clear()
        connection.public_keys.clear()
        try:
            with connection.lock, contextlib.suppress(*_SESSION_GONE):
                connection.session.close()
        except p11.PKCS11Error as exc:
            raise KeystoreError(
                f"cannot close the session on the PKCS#11 token {connection.token_label!r}: {_describe(exc)}"
            ) from None


def _load_module(path: str, name: str) -> Pkcs11Library:
    if not os.path.exists(path):
        raise KeystoreError(f"the PKCS#11 module {name} does not exist")
    try:
        return pkcs11.lib(path)
    except p11.PKCS11Error as exc:
        raise KeystoreError(f"cannot load the PKCS#11 module {name}: {_describe(exc)}") from None


def _find_token(library: Pkcs11Library, module_name: str, label: str) -> pkcs11.Token:
    try:
        tokens = []
        for slot in library.get_slots(token_present=True):
            with contextlib.suppress(p11.TokenNotPresent, p11.TokenNotRecognised):
                tokens.append(slot.get_token())
    except p11.PKCS11Error as exc:
        raise KeystoreError(
            f"cannot list the tokens of the PKCS#11 module {module_name}: {_describe(exc)}"
        ) from None
    matches = [token for token in tokens if token.label == label]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise KeystoreError(
            f"{len(matches)} tokens are labelled {label!r} in {module_name}; labels must be unique"
        )
    present = ", ".join(repr(token.label) for token in tokens) or "none"
    raise KeystoreError(
        f"no token labelled {label!r} in the PKCS#11 module {module_name} (tokens present: {present})"
    )


def _log_in(token: pkcs11.Token, label: str, pin: str) -> pkcs11.Session:
    try:
        return token.open(rw=True, user_pin=pin)
    except (p11.PinIncorrect, p11.PinLenRange, p11.PinInvalid):
        message = f"wrong PIN for the PKCS#11 token {label!r}"
    except p11.PinLocked:
        message = f"the PIN of the PKCS#11 token {label!r} is locked after too many wrong attempts"
    except p11.PinExpired:
        message = f"the PIN of the PKCS#11 token {label!r} has expired; set a new one"
    except p11.UserPinNotInitialized:
        message = f"the PKCS#11 token {label!r} has no user PIN yet; initialise it first"
    except (p11.UserAlreadyLoggedIn, p11.AnotherUserAlreadyLoggedIn):
        message = f"the PKCS#11 token {label!r} is already logged in by another part of this process"
    except p11.PKCS11Error as exc:
        message = f"cannot log in to the PKCS#11 token {label!r}: {_describe(exc)}"
    raise KeystoreError(message)


def _find(connection: _Connection, object_class: ObjectClass, key_id: bytes) -> pkcs11.Object | None:
    found = list(connection.session.get_objects({Attribute.CLASS: object_class, Attribute.ID: key_id}))
    if len(found) > 1:
        raise KeystoreError(f"{len(found)} {object_class.name.lower()} objects share the id {key_id.hex()}")
    return found[0] if found else None


def _public_key_from(obj: pkcs11.Object) -> PublicKeyTypes:
    key_type = obj[Attribute.KEY_TYPE]
    if key_type is KeyType.RSA:
        modulus = int.from_bytes(obj[Attribute.MODULUS], "big")
        exponent = int.from_bytes(obj[Attribute.PUBLIC_EXPONENT], "big")
        return rsa.RSAPublicNumbers(exponent, modulus).public_key()
    if key_type is KeyType.EC:
        curve = _curve(obj[Attribute.EC_PARAMS])
        return ec.EllipticCurvePublicKey.from_encoded_point(curve, _ec_point(obj[Attribute.EC_POINT], curve))
    raise KeystoreError(f"the token holds a key of unsupported type {key_type!r}")


def _curve(params: bytes) -> ec.EllipticCurve:
    try:
        return _CURVES[bytes(params)]
    except KeyError:
        raise KeystoreError(f"unsupported elliptic curve parameters {bytes(params).hex()}") from None


def _ec_point(value: bytes, curve: ec.EllipticCurve) -> bytes:
    """CKA_EC_POINT is a DER OCTET STRING around the point; a few tokens return the bare point."""
    bare_length = 1 + 2 * ((curve.key_size + 7) // 8)
    if len(value) == bare_length and value[0] == 0x04:
        return bytes(value)
    try:
        return OctetString.load(bytes(value)).native
    except ValueError:
        raise KeystoreError("the token returned a malformed CKA_EC_POINT") from None


def _mechanism_for(key: _CachedKey, request: SignatureRequest) -> tuple[Mechanism, object, bytes]:
    if key.key_type is KeyType.RSA:
        if request.scheme is Scheme.RSA_PKCS1:
            return Mechanism.RSA_PKCS, None, request.hash_algorithm.digest_info(request.digest)
        if request.scheme is Scheme.RSA_PSS:
            try:
                hash_mechanism, mgf = _PSS_PARAMS[request.hash_algorithm]
            except KeyError:
                raise SignatureError(
                    f"RSA-PSS with {request.hash_algorithm.title} is not supported"
                ) from None
            parameter = (hash_mechanism, mgf, request.hash_algorithm.digest_size)
            return Mechanism.RSA_PKCS_PSS, parameter, request.digest
        raise SignatureError(f"an RSA key cannot make {request.scheme.value} signatures")
    if key.key_type is KeyType.EC:
        if request.scheme is not Scheme.ECDSA:
            raise SignatureError(f"an ECDSA key cannot make {request.scheme.value} signatures")
        # ECDSA uses the leftmost bits of a longer hash; some tokens refuse longer input, so cut it
        # here (both curves' orders are a whole number of bytes).
        return Mechanism.ECDSA, None, request.digest[: key.ec_size]
    raise SignatureError(f"unsupported key type {key.key_type!r}")


def _describe(exc: Exception) -> str:
    """A PKCS#11 error for a person: python-pkcs11 names the return value in the exception type."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
