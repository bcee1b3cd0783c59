"""The software keystore: private keys in files, encrypted under a master key in the data directory.

Layout of the data directory::

    master.key          32 random bytes, mode 0600, created once and never rewritten
    keys/<id>.key       one file per key (format below), mode 0600

A key file is ``MAGIC | header length (2 bytes, big-endian) | header (JSON) | nonce (12) |
AES-256-GCM ciphertext of the PKCS#8 DER private key``. The header names the key id, its type and
its label; everything before the nonce is the associated data, so a file renamed to another key's
id, or an edited header, fails to decrypt.

Decrypted keys are cached per process: signing is a dictionary lookup and one private-key
operation, never a file read or a parse.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
import threading
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ...atomic import write_atomically
from ...crypto.signatures import Scheme, SignatureRequest, pss_padding
from ...errors import KeystoreError, SignatureError
from . import KeyRef, KeySpec

MASTER_KEY_NAME = "master.key"
KEYS_DIR_NAME = "keys"
MASTER_KEY_SIZE = 32
MAGIC = b"SBKEY1\n"
NONCE_SIZE = 12

_KEY_ID = re.compile(r"[0-9a-f]{32}")
_CURVES: dict[int, type[ec.EllipticCurve]] = {256: ec.SECP256R1, 384: ec.SECP384R1}

SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


class SoftwareKeystore:
    """Keys encrypted at rest under ``DATA_DIR/master.key``; the embedded default."""

    backend = "software"
    signs_in_process = True

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.keys_dir = self.data_dir / KEYS_DIR_NAME
        try:
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.keys_dir.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise KeystoreError(f"cannot create the key directory {self.keys_dir}: {exc.strerror}") from None
        self._aead = AESGCM(load_or_create_master_key(self.data_dir))
        self._cache: dict[str, SigningKey] = {}
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"SoftwareKeystore({str(self.data_dir)!r})"

    def generate(self, spec: KeySpec, label: str) -> KeyRef:
        self._check_open()
        key = _new_private_key(spec)
        key_id = secrets.token_hex(16)
        der = key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        header = {"id": key_id, "type": spec.label, "label": label, "created": datetime.now(UTC).isoformat()}
        _write_new_file(self._key_path(key_id), self._seal(header, der))
        with self._lock:
            self._cache[key_id] = key
        return KeyRef(self.backend, key_id)

    def public_key(self, ref: KeyRef) -> PublicKeyTypes:
        return self._private_key(ref).public_key()

    def sign(self, ref: KeyRef, request: SignatureRequest) -> bytes:
        return sign_digest(self._private_key(ref), request)

    def delete(self, ref: KeyRef) -> None:
        self._check_open()
        key_id = self._key_id(ref)
        with self._lock:
            try:
                self._key_path(key_id).unlink()
            except FileNotFoundError:
                raise KeystoreError(f"there is no key {ref} in {self.keys_dir}") from None
            self._cache.pop(key_id, None)

    def close(self) -> None:
        with self._lock:
            self._cache.clear()
            self._closed = True

    def check(self, ref: KeyRef) -> None:
        self._check_open()
        self._load(ref, self._key_id(ref))

    def _private_key(self, ref: KeyRef) -> SigningKey:
        self._check_open()
        key_id = self._key_id(ref)
        key = self._cache.get(key_id)
        if key is None:
            with self._lock:
                key = self._cache.get(key_id)
                if key is None:
                    key = self._load(ref, key_id)
                    self._cache[key_id] = key
        return key

    def _load(self, ref: KeyRef, key_id: str) -> SigningKey:
        path = self._key_path(key_id)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            raise KeystoreError(f"there is no key {ref} in {self.keys_dir}") from None
        except OSError as exc:
            raise KeystoreError(f"cannot read the key file {path}: {exc.strerror}") from None
        header, der = self._open(path, blob)
        if header.get("id") != key_id:
            raise KeystoreError(f"the key file {path} belongs to key {header.get('id')!r}, not {key_id!r}")
        key = serialization.load_der_private_key(der, password=None)
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise KeystoreError(f"the key file {path} holds an unsupported key type {type(key).__name__}")
        return key

    def _seal(self, header: dict[str, str], der: bytes) -> bytes:
        header_bytes = json.dumps(header, sort_keys=True).encode()
        associated = MAGIC + len(header_bytes).to_bytes(2, "big") + header_bytes
        nonce = secrets.token_bytes(NONCE_SIZE)
        return associated + nonce + self._aead.encrypt(nonce, der, associated)

    def _open(self, path: Path, blob: bytes) -> tuple[dict[str, str], bytes]:
        malformed = KeystoreError(f"the key file {path} is damaged or is not a signbridge key file")
        if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 2:
            raise malformed
        header_end = len(MAGIC) + 2 + int.from_bytes(blob[len(MAGIC) : len(MAGIC) + 2], "big")
        associated, nonce = blob[:header_end], blob[header_end : header_end + NONCE_SIZE]
        if len(nonce) != NONCE_SIZE:
            raise malformed
        try:
            der = self._aead.decrypt(nonce, blob[header_end + NONCE_SIZE :], associated)
        except InvalidTag:
            raise KeystoreError(
                f"cannot decrypt the key file {path}: it was encrypted under a different master key than "
                f"{self.data_dir / MASTER_KEY_NAME}, or it was altered"
            ) from None
        try:
            header = json.loads(associated[len(MAGIC) + 2 :])
        except ValueError:
            raise malformed from None
        if not isinstance(header, dict):
            raise malformed
        return header, der

    def _key_id(self, ref: KeyRef) -> str:
        if ref.backend != self.backend:
            raise KeystoreError(
                f"the key {ref} belongs to the {ref.backend} keystore, not the software keystore"
            )
        if not _KEY_ID.fullmatch(ref.key_id):
            raise KeystoreError(f"malformed software key id {ref.key_id!r}")
        return ref.key_id

    def _key_path(self, key_id: str) -> Path:
        return self.keys_dir / f"{key_id}.key"

    def _check_open(self) -> None:
        if self._closed:
            raise KeystoreError("the software keystore has been closed")


def sign_digest(key: PrivateKeyTypes, request: SignatureRequest) -> bytes:
    """Sign ``request.digest`` with a private key held in memory; ECDSA signatures come back as DER."""
    prehashed = utils.Prehashed(request.hash_algorithm.cryptography_hash())
    if isinstance(key, rsa.RSAPrivateKey):
        if request.scheme is Scheme.RSA_PKCS1:
            return key.sign(request.digest, padding.PKCS1v15(), prehashed)
        if request.scheme is Scheme.RSA_PSS:
            return key.sign(request.digest, pss_padding(request.hash_algorithm), prehashed)
        raise SignatureError(f"an RSA key cannot make {request.scheme.value} signatures")
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if request.scheme is not Scheme.ECDSA:
            raise SignatureError(f"an ECDSA key cannot make {request.scheme.value} signatures")
        return key.sign(request.digest, ec.ECDSA(prehashed))
    raise SignatureError(f"unsupported key type {type(key).__name__}")


def load_or_create_master_key(data_dir: Path) -> bytes:
    """Read ``data_dir/master.key``, creating it (mode 0600 from its first byte) if there is none."""
    path = data_dir / MASTER_KEY_NAME
    if not os.path.lexists(path):
        stranded = sorted((data_dir / KEYS_DIR_NAME).glob("*.key"))
        if stranded:
            raise KeystoreError(
                f"{path} is missing, but {len(stranded)} encrypted key(s) in {data_dir / KEYS_DIR_NAME} "
                f"need it; restore master.key from your backup (a new one could not decrypt them)"
            )
        _create_master_key(path)
    return _read_master_key(path)


def _create_master_key(path: Path) -> None:
    # Linked into place, not renamed: if another process got there first, theirs is used.
    try:
        write_atomically(
            path, secrets.token_bytes(MASTER_KEY_SIZE), mode=0o600, fsync=True, fsync_directory=True, exclusive=True
        )
    except OSError as exc:
        raise KeystoreError(f"cannot create the master key {path}: {exc.strerror}") from None


def _read_master_key(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise KeystoreError(f"cannot open the master key {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise KeystoreError(f"the master key {path} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise KeystoreError(
                f"the master key {path} is accessible to other users (mode {mode:04o}); "
                f"it must be readable by its owner only: chmod 600 {path}"
            )
        key = file.read(MASTER_KEY_SIZE + 1)
    if len(key) != MASTER_KEY_SIZE:
        raise KeystoreError(
            f"{path} is not a signbridge master key: it must hold {MASTER_KEY_SIZE} bytes, not {len(key)}"
        )
    return key


def _new_private_key(spec: KeySpec) -> SigningKey:
    if spec.family == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=spec.bits)
    return ec.generate_private_key(_CURVES[spec.bits]())


def _write_new_file(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all, durably, readable only by its owner."""
    try:
        write_atomically(path, data, mode=0o600, fsync=True, fsync_directory=True)
    except OSError as exc:
        raise KeystoreError(f"cannot write the key file {path}: {exc.strerror}") from None
