"""Token objects: attributes with values of each attribute's kind, and a key's public key.

What the token (:mod:`signbridge.pkcs11.token`) holds and what signing (:mod:`signbridge.pkcs11.signing`)
reads of a key; both build on this.
"""

from __future__ import annotations

import types
from collections.abc import Mapping

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ..errors import ConfigError
from .constants import CKA
from .wire import AttributeValue, Kind, attribute_kind

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

_ULONG_LIMIT = 2**64
# Most values are byte strings, flags and numbers, checked with one lookup (a token of a thousand
# identities has some 70,000 of them); any other value goes through _check_value.
_PLAIN_TYPES: dict[int, type] = {
    int(attribute): {Kind.BYTE: bool, Kind.ULONG: int}.get(kind, bytes)
    for attribute in CKA
    if (kind := attribute_kind(attribute)) in (Kind.BYTE, Kind.ULONG, Kind.BYTE_ARRAY)
}


class AttributeView:
    """The label and id of an object, read from its ``attributes`` (absent ones are empty)."""

    __slots__ = ()
    attributes: Mapping[int, AttributeValue]

    @property
    def label(self) -> str:
        label = self.attributes.get(CKA.LABEL, b"")
        return bytes(label).decode("utf-8", errors="replace")  # type: ignore[arg-type]

    @property
    def id(self) -> bytes:
        return bytes(self.attributes.get(CKA.ID, b""))  # type: ignore[arg-type]


class TokenObject(AttributeView):
    """One PKCS#11 object: its attributes, and for keys the public key they belong to.

    Attribute values are Python values of the attribute's kind: ``bool`` for CK_BBOOL attributes,
    ``int`` for CK_ULONG ones, ``bytes`` for byte strings and dates, a tuple of ints for
    CKA_ALLOWED_MECHANISMS. Template attributes (CKA_WRAP_TEMPLATE ...) are not supported.
    """

    __slots__ = ("attributes", "public_key")

    def __init__(self, attributes: Mapping[int, AttributeValue], public_key: PublicKey | None = None) -> None:
        for attribute_type, value in attributes.items():
            plain = _PLAIN_TYPES.get(attribute_type)
            if plain is not type(value) or (plain is int and not 0 <= value < _ULONG_LIMIT):  # type: ignore[operator]
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
        ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _ULONG_LIMIT
    elif kind is Kind.MECHANISM_ARRAY:
        ok = isinstance(value, tuple) and all(isinstance(item, int) for item in value)
    elif kind is Kind.DATE:
        ok = isinstance(value, bytes) and len(value) in (0, 8)
    elif kind is Kind.ATTRIBUTE_ARRAY:
        ok = False
    else:
        ok = isinstance(value, bytes | bool) or (isinstance(value, int) and 0 <= value < _ULONG_LIMIT)
    if not ok:
        raise ConfigError(f"attribute {attribute_type:#x} cannot hold {value!r} (it is a {kind.value})")
