"""The p11-kit RPC wire format: frames, message bodies and every argument type.

All integers are big-endian; every CK_ULONG travels as a u64. A frame is
``u32 call_code, u32 options_len, u32 body_len, options, body``; a body is
``u32 call_id, u32 signature_len, signature, arguments``. :class:`Writer` and :class:`Reader`
check each argument against the call's signature string, as p11-kit does.
"""

from __future__ import annotations

import enum
import functools
import struct
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .calls import SIGNATURES, Call
from .constants import CKA, CKM
from .errors import MechanismUnsupported, Pkcs11Error, ProtocolError

FRAME_HEADER = struct.Struct(">III")
NULL_LENGTH = 0xFFFF_FFFF  # a u32 length meaning "NULL pointer"
NULL_MECHANISM = 0xFFFF_FFFF  # a mechanism type meaning "no mechanism" (cancel the operation)
MAX_NESTING = 8  # p11-kit's recursion limit for attribute templates (CVE fix in 0.26.3)
SIZEOF_CK_ATTRIBUTE = 24  # on the LP64 platforms p11-kit-client runs on
ULONG_SIZE = 8

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


def encode_frame(call_code: int, body: bytes, options: bytes = b"") -> bytes:
    return FRAME_HEADER.pack(call_code, len(options), len(body)) + options + body


# --- attribute values -------------------------------------------------------------------------


class Kind(enum.Enum):
    """How p11-kit serializes an attribute's value (rpc-message.c ``map_attribute_to_value_type``)."""

    BYTE = "byte"
    ULONG = "ulong"
    ATTRIBUTE_ARRAY = "attribute array"
    MECHANISM_ARRAY = "mechanism array"
    DATE = "date"
    BYTE_ARRAY = "byte array"


_BYTE_KIND = {
    CKA.TOKEN, CKA.PRIVATE, CKA.TRUSTED, CKA.SENSITIVE, CKA.ENCRYPT, CKA.DECRYPT, CKA.WRAP,
    CKA.UNWRAP, CKA.SIGN, CKA.SIGN_RECOVER, CKA.VERIFY, CKA.VERIFY_RECOVER, CKA.DERIVE,
    CKA.EXTRACTABLE, CKA.LOCAL, CKA.NEVER_EXTRACTABLE, CKA.ALWAYS_SENSITIVE, CKA.MODIFIABLE,
    CKA.COPYABLE, CKA.SECONDARY_AUTH, CKA.ALWAYS_AUTHENTICATE, CKA.WRAP_WITH_TRUSTED,
    CKA.RESET_ON_INIT, CKA.HAS_RESET, CKA.COLOR,
}  # fmt: skip
_ULONG_KIND = {
    CKA.CLASS, CKA.CERTIFICATE_TYPE, CKA.CERTIFICATE_CATEGORY, CKA.JAVA_MIDP_SECURITY_DOMAIN,
    CKA.KEY_TYPE, CKA.MODULUS_BITS, CKA.PRIME_BITS, CKA.SUBPRIME_BITS, CKA.VALUE_BITS, CKA.VALUE_LEN,
    CKA.KEY_GEN_MECHANISM, CKA.AUTH_PIN_FLAGS, CKA.HW_FEATURE_TYPE, CKA.PIXEL_X, CKA.PIXEL_Y,
    CKA.RESOLUTION, CKA.CHAR_ROWS, CKA.CHAR_COLUMNS, CKA.BITS_PER_PIXEL, CKA.MECHANISM_TYPE,
}  # fmt: skip
# CKA_DERIVE_TEMPLATE is a byte array for p11-kit <= 0.24 and a template since; we never serve it.
_TEMPLATE_KIND = {CKA.WRAP_TEMPLATE, CKA.UNWRAP_TEMPLATE, CKA.DERIVE_TEMPLATE}


@functools.cache
def attribute_kind(attribute_type: int) -> Kind:
    if attribute_type in _BYTE_KIND:
        return Kind.BYTE
    if attribute_type in _ULONG_KIND:
        return Kind.ULONG
    if attribute_type in _TEMPLATE_KIND:
        return Kind.ATTRIBUTE_ARRAY
    if attribute_type == CKA.ALLOWED_MECHANISMS:
        return Kind.MECHANISM_ARRAY
    if attribute_type in (CKA.START_DATE, CKA.END_DATE):
        return Kind.DATE
    return Kind.BYTE_ARRAY


AttributeValue = bool | int | bytes | tuple[int, ...] | tuple["WireAttribute", ...]


def raw_bytes(value: bool | int | bytes | Sequence[int]) -> bytes:
    """The bytes a C caller would find behind ``pValue`` (CK_ULONG in host byte order)."""
    if isinstance(value, bool):
        return bytes([value])
    if isinstance(value, int):
        return value.to_bytes(ULONG_SIZE, sys.byteorder)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return b"".join(item.to_bytes(ULONG_SIZE, sys.byteorder) for item in value)


def value_length(attribute_type: int, value: AttributeValue) -> int:
    """The PKCS#11 ``ulValueLen`` of a value (never the encoded size, see p11-kit issue #679)."""
    kind = attribute_kind(attribute_type)
    if kind is Kind.BYTE:
        return 1
    if kind is Kind.ULONG:
        return ULONG_SIZE
    if kind is Kind.MECHANISM_ARRAY:
        return ULONG_SIZE * len(value)  # type: ignore[arg-type]
    if kind is Kind.ATTRIBUTE_ARRAY:
        return SIZEOF_CK_ATTRIBUTE * len(value)  # type: ignore[arg-type]
    return len(raw_bytes(value))  # type: ignore[arg-type]


@dataclass(frozen=True)
class WireAttribute:
    """One CK_ATTRIBUTE as it travels.

    ``length is None``: unavailable (``ulValueLen = CK_UNAVAILABLE_INFORMATION``, nothing follows).
    ``value is None`` with a length: the answer to a size query (a placeholder value follows).
    Decoded values: BYTE and ULONG kinds as int, DATE and BYTE_ARRAY kinds as bytes (None for a
    NULL pointer), mechanism arrays as a tuple of ints, templates as a tuple of WireAttribute.
    """

    type: int
    value: AttributeValue | None = None
    length: int | None = None

    @classmethod
    def of(cls, attribute_type: int, value: AttributeValue) -> WireAttribute:
        return cls(attribute_type, value, value_length(attribute_type, value))


@dataclass(frozen=True)
class AttributeRequest:
    """One entry of an ``fA`` template: the attribute type and the caller's buffer size.

    ``capacity == 0`` means ``pValue == NULL`` (a size query). ``template`` holds the nested
    request p11-kit >= 0.25.4 sends for template attributes with a buffer.
    """

    type: int
    capacity: int
    template: tuple[AttributeRequest, ...] | None = None


# --- mechanisms -------------------------------------------------------------------------------


class MechanismLayout(enum.Enum):
    """How ``M`` carries parameters: ``V0`` for protocol 0/1 clients, ``V2`` (a has-parameter byte
    and nothing at all for parameterless mechanisms) for protocol 2 clients (p11-kit >= 0.25.6)."""

    V0 = 0
    V2 = 2

    @classmethod
    def for_version(cls, version: int) -> MechanismLayout:
        return cls.V2 if version >= 2 else cls.V0

    def other(self) -> MechanismLayout:
        return MechanismLayout.V0 if self is MechanismLayout.V2 else MechanismLayout.V2


@dataclass(frozen=True)
class PssParams:
    """CK_RSA_PKCS_PSS_PARAMS."""

    hash_alg: int
    mgf: int
    salt_length: int


@dataclass(frozen=True)
class OaepParams:
    """CK_RSA_PKCS_OAEP_PARAMS."""

    hash_alg: int
    mgf: int
    source: int
    source_data: bytes | None


MechanismParameter = PssParams | OaepParams | bytes | None


@dataclass(frozen=True)
class Mechanism:
    type: int
    parameter: MechanismParameter = None


PSS_MECHANISMS = frozenset({
    CKM.RSA_PKCS_PSS, CKM.SHA1_RSA_PKCS_PSS, CKM.SHA224_RSA_PKCS_PSS, CKM.SHA256_RSA_PKCS_PSS,
    CKM.SHA384_RSA_PKCS_PSS, CKM.SHA512_RSA_PKCS_PSS,
})  # fmt: skip
# The part of p11-kit's "mechanism_has_no_parameters" list this codec knows.
NO_PARAMETER_MECHANISMS = frozenset({
    CKM.RSA_PKCS_KEY_PAIR_GEN, CKM.RSA_PKCS, CKM.RSA_9796, CKM.RSA_X_509, CKM.MD5_RSA_PKCS,
    CKM.SHA1_RSA_PKCS, CKM.SHA224_RSA_PKCS, CKM.SHA256_RSA_PKCS, CKM.SHA384_RSA_PKCS,
    CKM.SHA512_RSA_PKCS, CKM.EC_KEY_PAIR_GEN, CKM.ECDSA, CKM.ECDSA_SHA1, CKM.ECDSA_SHA224,
    CKM.ECDSA_SHA256, CKM.ECDSA_SHA384, CKM.ECDSA_SHA512, CKM.MD5, CKM.SHA_1, CKM.SHA224,
    CKM.SHA256, CKM.SHA384, CKM.SHA512, CKM.GENERIC_SECRET_KEY_GEN, CKM.AES_KEY_GEN, CKM.AES_ECB,
})  # fmt: skip


# --- writing ----------------------------------------------------------------------------------


class Writer:
    """Builds one message body, checking each argument against the call's signature."""

    def __init__(self, call: Call, *, response: bool) -> None:
        signature = SIGNATURES[call]
        self.call = call
        self._remaining = signature.response if response else signature.request
        text = self._remaining.encode("ascii")
        self._buffer = bytearray(_U32.pack(call) + _U32.pack(len(text)) + text)

    def _part(self, code: str) -> None:
        if not self._remaining.startswith(code):
            raise ValueError(f"{self.call.name}: wrote {code!r} where the signature has {self._remaining!r}")
        self._remaining = self._remaining[len(code) :]

    def _u32(self, value: int) -> None:
        self._buffer += _U32.pack(value)

    def _u64(self, value: int) -> None:
        self._buffer += _U64.pack(value)

    def _bytes(self, data: bytes | None) -> None:
        if data is None:
            self._u32(NULL_LENGTH)
        else:
            self._u32(len(data))
            self._buffer += data

    def getvalue(self) -> bytes:
        if self._remaining:
            raise ValueError(f"{self.call.name}: arguments {self._remaining!r} were not written")
        return bytes(self._buffer)

    def byte(self, value: int) -> Writer:
        self._part("y")
        self._buffer.append(value & 0xFF)
        return self

    def ulong(self, value: int) -> Writer:
        self._part("u")
        self._u64(value)
        return self

    def version(self, major: int, minor: int) -> Writer:
        self._part("v")
        self._buffer += bytes([major & 0xFF, minor & 0xFF])
        return self

    def space_string(self, text: str | bytes, width: int) -> Writer:
        """A fixed-width, space-padded UTF-8 field (CK_TOKEN_INFO.label and the like)."""
        self._part("s")
        self._bytes(pad(text, width))
        return self


    def byte_array(self, data: bytes | None, length: int | None = None) -> Writer:
        """``ay``: present data, or (``data is None``) only a length: NULL pData, or in responses
        a size answer / CKR_BUFFER_TOO_SMALL."""
        self._part("ay")
        if data is None:
            self._buffer.append(0)
            self._u32(length or 0)
        else:
            self._buffer.append(1)
            self._bytes(bytes(data))
        return self

    def byte_buffer(self, capacity: int | None) -> Writer:
        """``fy``: None for a NULL output buffer (size query), else its capacity."""
        self._part("fy")
        if capacity is None:
            self._u32(0)
        else:
            self._u32(NULL_LENGTH if capacity == 0 else capacity)
        return self

    def ulong_array(self, values: Sequence[int] | None, count: int | None = None) -> Writer:
        self._part("au")
        if values is None:
            self._buffer.append(0)
            self._u32(count or 0)
        else:
            self._buffer.append(1)
            self._u32(len(values))
            for value in values:
                self._u64(value)
        return self

    def ulong_buffer(self, capacity: int) -> Writer:
        self._part("fu")
        self._u32(capacity)
        return self

    def attribute_array(self, attributes: Iterable[WireAttribute]) -> Writer:
        self._part("aA")
        self._attributes(list(attributes), 0)
        return self

    def _attributes(self, attributes: Sequence[WireAttribute], depth: int) -> None:
        if depth > MAX_NESTING:
            raise ValueError("attribute templates nest too deeply")
        self._u32(len(attributes))
        for attribute in attributes:
            self._attribute(attribute, depth)

    def _attribute(self, attribute: WireAttribute, depth: int) -> None:
        self._u32(attribute.type)
        if attribute.length is None:
            self._buffer.append(0)
            return
        self._buffer.append(1)
        self._u32(attribute.length)
        kind = attribute_kind(attribute.type)
        value = attribute.value
        if kind is Kind.BYTE:
            self._buffer.append(int(value or 0) & 0xFF)  # type: ignore[arg-type]
        elif kind is Kind.ULONG:
            self._u64(int(value or 0))  # type: ignore[arg-type]
        elif kind is Kind.MECHANISM_ARRAY:
            # A size answer carries an empty list: p11-kit's own encoder writes the count with no
            # items, which its decoder then misreads.
            items = tuple(value or ())  # type: ignore[arg-type]
            self._u32(len(items))
            for item in items:
                self._u64(item)
        elif kind is Kind.ATTRIBUTE_ARRAY:
            self._attributes(tuple(value or ()), depth + 1)  # type: ignore[arg-type]
        else:
            self._bytes(None if value is None else raw_bytes(value))  # type: ignore[arg-type]

    def attribute_buffer(self, requests: Iterable[AttributeRequest]) -> Writer:
        self._part("fA")
        self._requests(list(requests), 0)
        return self

    def _requests(self, requests: Sequence[AttributeRequest], depth: int) -> None:
        if depth > MAX_NESTING:
            raise ValueError("attribute templates nest too deeply")
        self._u32(len(requests))
        for request in requests:
            self._u32(request.type)
            self._u32(request.capacity)
            if request.capacity and attribute_kind(request.type) is Kind.ATTRIBUTE_ARRAY:
                self._requests(request.template or (), depth + 1)

    def mechanism(self, mechanism: Mechanism | None, layout: MechanismLayout) -> Writer:
        self._part("M")
        if mechanism is None:
            self._u32(NULL_MECHANISM)
            return self
        self._u32(mechanism.type)
        parameter = mechanism.parameter
        if mechanism.type in NO_PARAMETER_MECHANISMS:
            if layout is MechanismLayout.V0:
                self._u32(NULL_LENGTH)
            return self
        if layout is MechanismLayout.V2:
            if parameter is None:
                self._buffer.append(0)
                return self
            self._buffer.append(1)
        if mechanism.type in PSS_MECHANISMS:
            if not isinstance(parameter, PssParams):
                raise ValueError(f"{mechanism.type:#x} needs PssParams")
            self._u64(parameter.hash_alg)
            self._u64(parameter.mgf)
            self._u64(parameter.salt_length)
        elif mechanism.type == CKM.RSA_PKCS_OAEP:
            if not isinstance(parameter, OaepParams):
                raise ValueError("CKM_RSA_PKCS_OAEP needs OaepParams")
            self._u64(parameter.hash_alg)
            self._u64(parameter.mgf)
            self._u64(parameter.source)
            self._bytes(parameter.source_data)
        elif isinstance(parameter, bytes | None):
            self._bytes(parameter)
        else:
            raise ValueError(f"mechanism {mechanism.type:#x} takes raw bytes as its parameter")
        return self


def pad(text: str | bytes, width: int) -> bytes:
    """Space-pad UTF-8 to ``width`` bytes, cutting on a character boundary when it is longer."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    if len(data) > width:
        data = data[:width].decode("utf-8", errors="ignore").encode("utf-8")
    return data.ljust(width, b" ")


def error_body(ckr: int) -> bytes:
    """The ERROR response: ``u32 0, "u", u64 rv``. p11-kit writes the rv through a u32 cast."""
    return Writer(Call.ERROR, response=True).ulong(int(ckr) & 0xFFFF_FFFF).getvalue()


# --- reading ----------------------------------------------------------------------------------


class UnknownCall(ProtocolError):
    """A request with a call id this table does not know."""

    def __init__(self, call_id: int) -> None:
        self.call_id = call_id
        super().__init__(f"unknown call id {call_id}")


class Reader:
    """Reads one message body's arguments, checking them against the signature."""

    def __init__(self, data: bytes, call: Call, signature: str, offset: int) -> None:
        self._data = memoryview(data)
        self._offset = offset
        self.call = call
        self._remaining = signature
        self._start = (offset, signature)

    @classmethod
    def request(cls, body: bytes) -> Reader:
        """Parse a request's call id and signature; raises :class:`UnknownCall` or ProtocolError."""
        call_id, signature, offset = _header(body)
        try:
            call = Call(call_id)
        except ValueError:
            raise UnknownCall(call_id) from None
        if call is Call.ERROR:
            raise ProtocolError("a request cannot be an ERROR message")
        expected = SIGNATURES[call].request
        if signature != expected:
            raise ProtocolError(f"{call.name}: signature {signature!r} does not match {expected!r}")
        return cls(body, call, signature, offset)

    @classmethod
    def response(cls, body: bytes, call: Call) -> Reader:
        """Parse a response to ``call``; an ERROR response raises :class:`Pkcs11Error`."""
        call_id, signature, offset = _header(body)
        if call_id == Call.ERROR:
            if signature != "u":
                raise ProtocolError(f"ERROR response with signature {signature!r}")
            reader = cls(body, Call.ERROR, signature, offset)
            rv = reader.ulong()
            reader.done()
            if rv == 0:
                raise ProtocolError(f"{call.name}: the ERROR response carries CKR_OK")
            raise Pkcs11Error(rv)
        if call_id != call:
            raise ProtocolError(f"expected a {call.name} response, got call id {call_id}")
        expected = SIGNATURES[call].response
        if signature != expected:
            raise ProtocolError(f"{call.name}: response signature {signature!r} does not match {expected!r}")
        return cls(body, call, signature, offset)

    def rewind(self) -> None:
        """Start the arguments again (to retry with the other mechanism layout)."""
        self._offset, self._remaining = self._start

    def _part(self, code: str) -> None:
        if not self._remaining.startswith(code):
            raise ProtocolError(f"{self.call.name}: {code!r} is not next in {self._remaining!r}")
        self._remaining = self._remaining[len(code) :]

    def _take(self, size: int) -> bytes:
        end = self._offset + size
        if end > len(self._data):
            raise ProtocolError(f"{self.call.name}: message truncated")
        chunk = bytes(self._data[self._offset : end])
        self._offset = end
        return chunk

    def _u8(self) -> int:
        return self._take(1)[0]

    def _u32(self) -> int:
        return _U32.unpack(self._take(4))[0]

    def _u64(self) -> int:
        return _U64.unpack(self._take(8))[0]

    def _bytes(self) -> bytes | None:
        length = self._u32()
        if length == NULL_LENGTH:
            return None
        if length >= 0x7FFF_FFFF:
            raise ProtocolError(f"{self.call.name}: byte array length {length} is out of range")
        return self._take(length)

    def done(self) -> None:
        """Every argument was read and nothing follows."""
        if self._remaining:
            raise ProtocolError(f"{self.call.name}: arguments {self._remaining!r} are missing")
        if self._offset != len(self._data):
            extra = len(self._data) - self._offset
            raise ProtocolError(f"{self.call.name}: {extra} unexpected bytes after the arguments")

    def byte(self) -> int:
        self._part("y")
        return self._u8()

    def ulong(self) -> int:
        self._part("u")
        return self._u64()

    def version(self) -> tuple[int, int]:
        self._part("v")
        return self._u8(), self._u8()

    def space_string(self, width: int) -> bytes:
        self._part("s")
        data = self._bytes()
        if data is None or len(data) != width:
            raise ProtocolError(f"{self.call.name}: a padded string must be {width} bytes long")
        return data


    def byte_array(self) -> tuple[bytes | None, int]:
        """``(data, length)``; ``data`` is None when only a length was sent."""
        self._part("ay")
        if self._u8():
            data = self._bytes()
            return data, len(data or b"")
        return None, self._u32()

    def byte_buffer(self) -> int | None:
        """The caller's output capacity; None when it passed a NULL buffer (a size query)."""
        self._part("fy")
        capacity = self._u32()
        if capacity == 0:
            return None
        return 0 if capacity == NULL_LENGTH else capacity

    def ulong_array(self) -> tuple[list[int] | None, int]:
        self._part("au")
        present = self._u8()
        count = self._u32()
        if not present:
            return None, count
        return [self._u64() for _ in range(count)], count

    def ulong_buffer(self) -> int:
        self._part("fu")
        return self._u32()

    def attribute_array(self) -> list[WireAttribute]:
        self._part("aA")
        return self._attributes(0)

    def _attributes(self, depth: int) -> list[WireAttribute]:
        if depth > MAX_NESTING:
            raise ProtocolError(f"{self.call.name}: attribute templates nest too deeply")
        return [self._attribute(depth) for _ in range(self._u32())]

    def _attribute(self, depth: int) -> WireAttribute:
        attribute_type = self._u32()
        if not self._u8():
            return WireAttribute(attribute_type)
        length = self._u32()
        kind = attribute_kind(attribute_type)
        value: AttributeValue | None
        if kind is Kind.BYTE:
            value = self._u8()
        elif kind is Kind.ULONG:
            value = self._u64()
        elif kind is Kind.MECHANISM_ARRAY:
            value = tuple(self._u64() for _ in range(self._u32()))
        elif kind is Kind.ATTRIBUTE_ARRAY:
            value = tuple(self._attributes(depth + 1))
        else:
            value = self._bytes()
            if kind is Kind.DATE and value is not None and len(value) not in (0, 8):
                raise ProtocolError(f"{self.call.name}: a CK_DATE is 8 bytes, not {len(value)}")
        return WireAttribute(attribute_type, value, length)

    def attribute_buffer(self) -> list[AttributeRequest]:
        self._part("fA")
        return self._requests(0)

    def _requests(self, depth: int) -> list[AttributeRequest]:
        if depth > MAX_NESTING:
            raise ProtocolError(f"{self.call.name}: attribute templates nest too deeply")
        requests = []
        for _ in range(self._u32()):
            attribute_type = self._u32()
            capacity = self._u32()
            template = None
            if capacity and attribute_kind(attribute_type) is Kind.ATTRIBUTE_ARRAY:
                template = tuple(self._requests(depth + 1))
            requests.append(AttributeRequest(attribute_type, capacity, template))
        return requests

    def mechanism(self, layout: MechanismLayout, known: frozenset[int] | None = None) -> Mechanism | None:
        """A mechanism, or None for the NULL mechanism. A type outside ``known`` raises
        :class:`MechanismUnsupported` before its parameters are read."""
        self._part("M")
        mechanism_type = self._u32()
        if mechanism_type == NULL_MECHANISM:
            return None
        if known is not None and mechanism_type not in known:
            raise MechanismUnsupported(mechanism_type)
        if mechanism_type in NO_PARAMETER_MECHANISMS:
            if layout is MechanismLayout.V0:
                return Mechanism(mechanism_type, self._bytes())
            return Mechanism(mechanism_type)
        if layout is MechanismLayout.V2:
            if not self._u8():
                return Mechanism(mechanism_type)
        elif mechanism_type not in PSS_MECHANISMS and mechanism_type != CKM.RSA_PKCS_OAEP:
            return Mechanism(mechanism_type, self._bytes())
        if mechanism_type in PSS_MECHANISMS:
            return Mechanism(mechanism_type, PssParams(self._u64(), self._u64(), self._u64()))
        if mechanism_type == CKM.RSA_PKCS_OAEP:
            return Mechanism(mechanism_type, OaepParams(self._u64(), self._u64(), self._u64(), self._bytes()))
        # Protocol 2 has per-mechanism structures this codec does not carry.
        raise MechanismUnsupported(mechanism_type)


def _header(body: bytes) -> tuple[int, str, int]:
    if len(body) < 8:
        raise ProtocolError("message too short for a call id and signature")
    call_id, length = struct.unpack_from(">II", body, 0)
    if length == NULL_LENGTH or 8 + length > len(body):
        raise ProtocolError("message signature is missing or truncated")
    raw = body[8 : 8 + length]
    try:
        signature = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("message signature is not ASCII") from None
    return call_id, signature, 8 + length
