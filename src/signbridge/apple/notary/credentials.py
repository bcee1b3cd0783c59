"""App Store Connect API keys: where they come from, and the ES256 JSON Web Token made from them.

A key is the ``AuthKey_<ID>.p8`` file (a PKCS#8 P-256 private key), its key ID and the issuer
(the team's UUID). They come from the command line, else from the environment
(``SIGNBRIDGE_NOTARY_KEY``, ``SIGNBRIDGE_NOTARY_KEY_ID``, ``SIGNBRIDGE_NOTARY_ISSUER``), else from a
profile saved by ``notarytool store-credentials`` (a 0600 JSON file, the counterpart of
notarytool's keychain profile). Neither the key nor a token is ever printed.
"""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ...atomic import write_atomically
from ...crypto.signatures import ecdsa_der_to_ieee
from .errors import CredentialsError

AUDIENCE = "appstoreconnect-v1"
MAX_LIFETIME = 20 * 60
ENV_KEY, ENV_KEY_ID, ENV_ISSUER = "SIGNBRIDGE_NOTARY_KEY", "SIGNBRIDGE_NOTARY_KEY_ID", "SIGNBRIDGE_NOTARY_ISSUER"
ENV_PROFILES = "SIGNBRIDGE_NOTARY_PROFILES"
_PROFILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    issuer: str
    private_key: ec.EllipticCurvePrivateKey = field(repr=False)

    def __repr__(self) -> str:
        return f"ApiKey(key_id={self.key_id!r}, issuer={self.issuer!r}, private_key=<redacted>)"

    def token(self, lifetime: int = MAX_LIFETIME, *, now: float | None = None) -> str:
        """An ES256 JWT for the App Store Connect API, valid for ``lifetime`` seconds (at most 20 minutes)."""
        if not 0 < lifetime <= MAX_LIFETIME:
            raise CredentialsError(f"a token may live at most {MAX_LIFETIME} seconds, not {lifetime}")
        issued = int(time.time() if now is None else now)
        header = {"alg": "ES256", "kid": self.key_id, "typ": "JWT"}
        claims = {"iss": self.issuer, "iat": issued, "exp": issued + lifetime, "aud": AUDIENCE}
        signing_input = f"{_b64(json.dumps(header, separators=(',', ':')).encode())}.{_b64(json.dumps(claims, separators=(',', ':')).encode())}"
        der = self.private_key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        return f"{signing_input}.{_b64(ecdsa_der_to_ieee(der, self.private_key.curve))}"  # JWS: r || s


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def load_private_key(pem: bytes, where: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CredentialsError(f"{where} is not an unencrypted PKCS#8 private key (an AuthKey_<ID>.p8 file): {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise CredentialsError(f"{where} is not a P-256 key; App Store Connect API keys are ES256 keys")
    return key


def read_key_file(path: str | os.PathLike[str]) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CredentialsError(f"cannot read the API key {path}: {exc.strerror or exc}") from None


def profiles_dir() -> Path:
    return Path(os.environ.get(ENV_PROFILES) or Path(platformdirs.user_config_dir("signbridge")) / "notary-profiles")


def _profile_path(name: str) -> Path:
    if not _PROFILE_NAME.match(name):
        raise CredentialsError(f"{name!r} is not a usable profile name (letters, digits, '.', '_' and '-')")
    return profiles_dir() / f"{name}.json"


def store_profile(name: str, key_path: str | os.PathLike[str], key_id: str, issuer: str) -> Path:
    """Save a key under ``name`` in a file only its owner can read; returns the file's path."""
    pem = read_key_file(key_path)
    load_private_key(pem, str(key_path))
    path = _profile_path(name)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    document = {"keyId": key_id, "issuer": issuer, "privateKey": pem.decode("ascii")}
    write_atomically(path, json.dumps(document, indent=2).encode(), mode=0o600, fsync=True, make_parents=True)
    return path


def load_profile(name: str) -> ApiKey:
    path = _profile_path(name)
    try:
        st = path.stat()
        text = path.read_text()
    except FileNotFoundError:
        raise CredentialsError(
            f'No Keychain password item found for profile: {name} (no file {path}; save one with '
            f"`signbridge notarytool store-credentials {name} --key ... --key-id ... --issuer ...`)"
        ) from None
    except OSError as exc:
        raise CredentialsError(f"cannot read the profile {path}: {exc.strerror or exc}") from None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise CredentialsError(f"{path} can be read by others (mode {stat.S_IMODE(st.st_mode):o}); run chmod 600 on it")
    try:
        document = json.loads(text)
        return ApiKey(
            str(document["keyId"]),
            str(document["issuer"]),
            load_private_key(document["privateKey"].encode(), f"the key in profile {name}"),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CredentialsError(f"{path} is not a signbridge notary profile") from None


def resolve_api_key(
    *,
    key: str | None = None,
    key_id: str | None = None,
    issuer: str | None = None,
    profile: str | None = None,
    environ: dict[str, str] | None = None,
) -> ApiKey:
    """The API key from the command line, else the environment, else the named profile."""
    env = os.environ if environ is None else environ
    if profile and not (key or key_id or issuer):
        return load_profile(profile)
    key = key or env.get(ENV_KEY)
    key_id = key_id or env.get(ENV_KEY_ID)
    issuer = issuer or env.get(ENV_ISSUER)
    if not (key or key_id or issuer):
        raise CredentialsError(
            "no credentials: give --key, --key-id and --issuer, or --keychain-profile, "
            f"or set {ENV_KEY}, {ENV_KEY_ID} and {ENV_ISSUER}"
        )
    missing = [name for name, value in (("--key", key), ("--key-id", key_id), ("--issuer", issuer)) if not value]
    if missing:
        raise CredentialsError(f"incomplete API key credentials: {', '.join(missing)} missing")
    assert key and key_id and issuer
    return ApiKey(key_id, issuer, load_private_key(read_key_file(key), key))
