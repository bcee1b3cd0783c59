"""The token the server serves: its identity, its objects, how it checks a PIN and how it signs.

A :class:`Token` is read-only for its consumers; whoever builds it supplies the objects (see
:mod:`signbridge.pkcs11.identity`), a ``check_pin`` callback and a :class:`Signer`. Do not change
a token while it is served: build a new one and hand it to ``Pkcs11Server.set_tokens``. The
server calls ``signer`` and ``check_pin`` from one thread per connection: they must be thread-safe.
"""

from __future__ import annotations

import hashlib
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..crypto.signatures import SignatureRequest
from ..errors import ConfigError
from .constants import CKO
from .objects import PublicKey, TokenObject
from .peer import CallerInfo
from .signing import MechanismInfo, mechanisms_for


class Signer(Protocol):
    """Signs one digest with the key behind a private-key object.

    Return the signature: RSA as the modulus-sized block; ECDSA as ``request.ecdsa_format``
    (r||s) or DER, which the server converts. Raise :class:`~signbridge.pkcs11.errors.Pkcs11Error`
    to choose the CK_RV the consumer sees; any other exception becomes CKR_GENERAL_ERROR.
    """

    def __call__(self, key: TokenObject, request: SignatureRequest, caller: CallerInfo) -> bytes: ...


@dataclass(eq=False)
class Token:
    """A read-only token. ``check_pin`` decides C_Login; ``signer`` does C_Sign.

    With ``require_login`` the token sets CKF_LOGIN_REQUIRED and refuses to sign before C_Login.
    Objects with CKA_PRIVATE=true are visible only after C_Login either way.
    """

    label: str
    objects: Sequence[TokenObject]
    signer: Signer
    check_pin: Callable[[bytes], bool]
    serial: str = ""
    manufacturer: str = "signbridge"
    model: str = "signbridge"
    require_login: bool = True
    slot_description: str = ""
    mechanisms: Mapping[int, MechanismInfo] = field(init=False)

    def __post_init__(self) -> None:
        self.objects = tuple(self.objects)
        if not self.serial:
            self.serial = hashlib.sha256(self.label.encode()).hexdigest()[:16]
        if not self.slot_description:
            self.slot_description = f"signbridge: {self.label}"
        for what, text, width in (
            ("label", self.label, 32),
            ("manufacturer", self.manufacturer, 32),
            ("model", self.model, 16),
            ("serial", self.serial, 16),
        ):
            if len(text.encode("utf-8")) > width:
                raise ConfigError(f"the token {what} {text!r} is longer than PKCS#11's {width} bytes")
        for obj in self.objects:
            if obj.object_class == CKO.PRIVATE_KEY and not isinstance(obj.public_key, PublicKey):
                raise ConfigError(f"private key {obj.label!r} needs its RSA or EC public key")
        self.mechanisms = types.MappingProxyType(mechanisms_for(self.objects))

    def private_keys(self) -> list[TokenObject]:
        return [obj for obj in self.objects if obj.object_class == CKO.PRIVATE_KEY]
