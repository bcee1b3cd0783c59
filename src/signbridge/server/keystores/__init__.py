"""Key custody: where private keys live and how they sign.

A keystore generates keys, hands out their public halves, and signs digests. Private key material
never leaves it: there is no method that returns it. Keys are named by a :class:`KeyRef`, whose
string form is what the database stores next to a certificate.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from ...crypto.signatures import SignatureRequest
from ...errors import KeystoreError


class KeySpec(enum.Enum):
    """The key types signbridge generates."""

    RSA_2048 = ("rsa", 2048)
    RSA_3072 = ("rsa", 3072)
    RSA_4096 = ("rsa", 4096)
    EC_P256 = ("ec", 256)
    EC_P384 = ("ec", 384)

    def __init__(self, family: str, bits: int) -> None:
        self.family = family
        self.bits = bits

    @property
    def label(self) -> str:
        return f"rsa-{self.bits}" if self.family == "rsa" else f"ecdsa-p{self.bits}"

    @classmethod
    def parse(cls, text: str) -> KeySpec:
        """``rsa-2048``, ``rsa3072``, ``ecdsa-p256``, ``p384``, ``ec-p256`` ..."""
        key = text.lower().replace("_", "-")
        for spec in cls:
            names = {spec.label, spec.label.replace("-", "")}
            if spec.family == "ec":
                names |= {f"p-{spec.bits}", f"p{spec.bits}", f"ec-p{spec.bits}", f"secp{spec.bits}r1"}
                if spec.bits == 256:
                    names.add("prime256v1")
            if key in names:
                return spec
        choices = ", ".join(spec.label for spec in cls)
        raise KeystoreError(f"unknown key type {text!r}; choose one of {choices}")


@dataclass(frozen=True)
class KeyRef:
    """Names one key in one keystore: ``software:<id>`` or ``pkcs11:<id>``."""

    backend: str
    key_id: str

    def __str__(self) -> str:
        return f"{self.backend}:{self.key_id}"

    @classmethod
    def parse(cls, text: str) -> KeyRef:
        backend, sep, key_id = text.partition(":")
        if not sep or not backend or not key_id:
            raise KeystoreError(f"malformed key reference {text!r}")
        return cls(backend, key_id)


class Keystore(Protocol):
    """What every key backend provides."""

    backend: str
    # True when signing is quick CPU work in this process (no device to wait for), so the service
    # may sign on its event loop instead of handing the call to a thread.
    signs_in_process: bool

    def generate(self, spec: KeySpec, label: str) -> KeyRef:
        """Create a key that can never be exported, and return its reference."""
        ...

    def public_key(self, ref: KeyRef) -> PublicKeyTypes:
        ...

    def sign(self, ref: KeyRef, request: SignatureRequest) -> bytes:
        """Sign ``request.digest``. RSA: PKCS#1 v1.5 over its DigestInfo, or PSS with salt = hash
        length and MGF1 of the same hash. ECDSA: DER ``SEQUENCE {r, s}`` whatever
        ``request.ecdsa_format`` says; converting the encoding is the caller's job."""
        ...

    def check(self, ref: KeyRef) -> None:
        """Reach the key where it is kept, past any cache (readiness); raises KeystoreError."""
        ...

    def delete(self, ref: KeyRef) -> None:
        ...

    def close(self) -> None:
        ...
