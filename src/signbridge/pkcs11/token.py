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

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ..crypto.signatures import SignatureRequest
from ..errors import ConfigError
from .constants import CKA, CKO
from .peer import CallerInfo
from .signing import MechanismInfo, mechanisms_for
from .wire import AttributeValue, Kind, attribute_kind

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


class Signer(Protocol):
    """Signs one digest with the key behind a private-key object.

    Return the signature: RSA as the modulus-sized block; ECDSA as ``request.ecdsa_format``
    (r||s) or DER, which the server converts. Raise :class:`~signbridge.pkcs11.errors.Pkcs11Error`
    to choose the CK_RV the consumer sees; any other exception becomes CKR_GENERAL_ERROR.
    """

    def __call__(self, key: TokenObject, request: SignatureRequest, caller: CallerInfo) -> bytes: ...


class TokenObject:
    """One PKCS#11 object: its attributes, and for keys the public key they belong to.

    Attribute values are Python values of the attribute's kind: ``bool`` for CK_BBOOL attributes,
    ``int`` for CK_ULONG ones, ``bytes`` for byte strings and dates, a tuple of ints for
    CKA_ALLOWED_MECHANISMS. Template attributes (CKA_WRAP_TEMPLATE ...) are not supported.
    """

    __slots__ = ("attributes", "public_key")

    def __init__(self, attributes: Mapping[int, AttributeValue], public_key: PublicKey | None = None) -> None:
        for attribute_type, value in attributes.items():
            # Most values are byte strings and flags, checked here without a call: a token of a
            # thousand identities has some 70,000 of them.
            value_type = type(value)
            kind = attribute_kind(attribute_type)
            if not ((value_type is bytes and kind is Kind.BYTE_ARRAY) or (value_type is bool and kind is Kind.BYTE)):
                _check_value(attribute_type, value)
        if CKA.CLASS not in attributes:
            raise ConfigError("a token object needs a CKA_CLASS")
        self.attributes: Mapping[int, AttributeValue] = types.MappingProxyType(dict(attributes))
        self.public_key = public_key

    def get(self, attribute_type: int, default: AttributeValue | None = None) -> AttributeValue | None:
        return self.attributes.get(attribute_type, default)

    @property
    def object_class(self) -> int:
        return int(self.attributes[CKA.CLASS])  # type: ignore[arg-type]

    @property
    def label(self) -> str:
        label = self.attributes.get(CKA.LABEL, b"")
        return bytes(label).decode("utf-8", errors="replace")  # type: ignore[arg-type]

    @property
    def id(self) -> bytes:
        return bytes(self.attributes.get(CKA.ID, b""))  # type: ignore[arg-type]

    @property
    def private(self) -> bool:
        """CKA_PRIVATE: only visible to a logged-in user."""
        return bool(self.attributes.get(CKA.PRIVATE, False))

    @property
    def key_type(self) -> int | None:
        value = self.attributes.get(CKA.KEY_TYPE)
        return None if value is None else int(value)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"TokenObject(class={self.object_class}, label={self.label!r}, id={self.id.hex()})"


def _check_value(attribute_type: int, value: object) -> None:
    kind = attribute_kind(attribute_type)
    if kind is Kind.BYTE:
        ok = isinstance(value, bool)
    elif kind is Kind.ULONG:
        ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64
    elif kind is Kind.MECHANISM_ARRAY:
        ok = isinstance(value, tuple) and all(isinstance(item, int) for item in value)
    elif kind is Kind.DATE:
        ok = isinstance(value, bytes) and len(value) in (0, 8)
    elif kind is Kind.ATTRIBUTE_ARRAY:
        ok = False
    else:
        ok = isinstance(value, bytes | bool) or (isinstance(value, int) and 0 <= value < 2**64)
    if not ok:
        raise ConfigError(f"attribute {attribute_type:#x} cannot hold {value!r} (it is a {kind.value})")


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
