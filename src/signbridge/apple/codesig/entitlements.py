"""Entitlements: the XML plist blob (0xfade7171, slot 5) and the DER blob (0xfade7172, slot 7).

DER form (CoreEntitlements): ``[APPLICATION 16] { INTEGER 1, value }`` where a dictionary is
``[CONTEXT 16] { SEQUENCE { UTF8String key, value } ... }`` sorted by key, an array is a
SEQUENCE, and booleans, integers and strings use their universal types. Other plist types
(real, date, data) have no DER form and are refused.
"""

from __future__ import annotations

import plistlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ...crypto.ber import encode_tlv
from ...errors import SignbridgeError
from ..plist import MAX_DEPTH, MAX_ELEMENTS, load_plist
from .blobs import CodeSignatureFormatError, Magic, decode_blob, encode_blob
from .codedirectory import ExecSegmentFlags

if TYPE_CHECKING:
    from .embedded_signature import EmbeddedSignature

_TAG_BOOLEAN = 0x01
_TAG_INTEGER = 0x02
_TAG_UTF8_STRING = 0x0C
_TAG_SEQUENCE = 0x30
_TAG_SET = 0x31
_TAG_DICTIONARY = 0xB0  # [CONTEXT 16], constructed
_TAG_PLIST = 0x70  # [APPLICATION 16], constructed

_EXEC_SEGMENT_ENTITLEMENTS = (
    ("get-task-allow", ExecSegmentFlags.ALLOW_UNSIGNED),
    ("run-unsigned-code", ExecSegmentFlags.ALLOW_UNSIGNED),
    ("com.apple.private.cs.debugger", ExecSegmentFlags.DEBUGGER),
    ("dynamic-codesigning", ExecSegmentFlags.JIT),
    ("com.apple.private.skip-library-validation", ExecSegmentFlags.SKIP_LIBRARY_VALIDATION),
    ("com.apple.private.amfi.can-load-cdhash", ExecSegmentFlags.CAN_LOAD_CDHASH),
    ("com.apple.private.amfi.can-execute-cdhash", ExecSegmentFlags.CAN_EXEC_CDHASH),
)


class EntitlementsError(SignbridgeError):
    """The entitlements are not a property-list dictionary, or cannot be encoded."""


def load_entitlements(data: bytes) -> dict[str, Any]:
    """Parse an entitlements file (XML or binary plist) whose root must be a dictionary."""
    value = load_plist(data, "the entitlements", EntitlementsError)
    if not isinstance(value, dict):
        raise EntitlementsError(f"the entitlements must be a dictionary, not a {type(value).__name__}")
    return value


def entitlements_xml(data: bytes | Mapping[str, Any]) -> bytes:
    """The XML plist to embed: an XML file is kept byte for byte, anything else is re-serialized."""
    if isinstance(data, bytes):
        value = load_entitlements(data)
        if data.lstrip().startswith(b"<"):
            return data
    else:
        value = dict(data)
    try:
        return plistlib.dumps(value, fmt=plistlib.FMT_XML)
    except (ValueError, OverflowError, TypeError) as error:  # control characters, integers beyond 64 bits
        raise EntitlementsError(f"the entitlements cannot be written as an XML property list: {error}") from None


def entitlements_blob(data: bytes | Mapping[str, Any]) -> bytes:
    """The 0xfade7171 blob (slot 5) holding the XML form."""
    return encode_blob(Magic.EMBEDDED_ENTITLEMENTS, entitlements_xml(data))


def der_entitlements_blob(entitlements: Mapping[str, Any]) -> bytes:
    """The 0xfade7172 blob (slot 7) holding the DER form."""
    return encode_blob(Magic.EMBEDDED_DER_ENTITLEMENTS, encode_der(entitlements))


def signature_entitlements(
    signature: EmbeddedSignature,
) -> tuple[dict[str, Any] | None, bytes | None, bytes | None]:
    """(dictionary, XML plist bytes, DER bytes) of a signature's entitlements, as far as they can be
    read: the dictionary from the XML blob, else from the DER one; blobs are found by slot."""
    xml = der = None
    value = None
    try:
        if signature.entitlements is not None:
            xml = decode_blob(signature.entitlements)[1]
            value = load_entitlements(xml)
        if signature.der_entitlements is not None:
            der = decode_blob(signature.der_entitlements)[1]
            if value is None:
                value = decode_der(der)
    except (EntitlementsError, CodeSignatureFormatError):
        pass
    return value, xml, der


def exec_segment_flags(entitlements: Mapping[str, Any]) -> ExecSegmentFlags:
    """The exec-segment flags codesign derives from entitlements set to true."""
    flags = ExecSegmentFlags(0)
    for key, flag in _EXEC_SEGMENT_ENTITLEMENTS:
        if entitlements.get(key) is True:
            flags |= flag
    return flags


# --- DER encoding -----------------------------------------------------------------------------------


def _encode_value(value: Any, path: str) -> bytes:
    if isinstance(value, bool):
        return encode_tlv(_TAG_BOOLEAN, b"\xff" if value else b"\x00")
    if isinstance(value, int):
        size = (value + (value < 0)).bit_length() // 8 + 1
        return encode_tlv(_TAG_INTEGER, value.to_bytes(size, "big", signed=True))
    if isinstance(value, str):
        return encode_tlv(_TAG_UTF8_STRING, value.encode())
    if isinstance(value, list | tuple):
        items = (_encode_value(item, f"{path}[{n}]") for n, item in enumerate(value))
        return encode_tlv(_TAG_SEQUENCE, b"".join(items))
    if isinstance(value, Mapping):
        entries = []
        for key in sorted(value, key=lambda k: str(k).encode()):
            if not isinstance(key, str):
                raise EntitlementsError(
                    f"entitlement key {key!r} at {path or 'the top level'} is not a string"
                )
            entry = encode_tlv(_TAG_UTF8_STRING, key.encode()) + _encode_value(value[key], f"{path}/{key}")
            entries.append(encode_tlv(_TAG_SEQUENCE, entry))
        return encode_tlv(_TAG_DICTIONARY, b"".join(entries))
    raise EntitlementsError(
        f"entitlement {path or '/'} is a {type(value).__name__}; the DER entitlements format only holds "
        "dictionaries, arrays, strings, integers and booleans"
    )


def encode_der(entitlements: Mapping[str, Any]) -> bytes:
    """The DER form of an entitlements dictionary."""
    return encode_tlv(_TAG_PLIST, encode_tlv(_TAG_INTEGER, b"\x01") + _encode_value(entitlements, ""))


# --- DER decoding -----------------------------------------------------------------------------------


def _read_tlv(data: bytes, pos: int) -> tuple[int, bytes, int]:
    if pos + 2 > len(data):
        raise EntitlementsError("the DER entitlements are cut short")
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first & 0x80:
        count = first & 0x7F
        if count == 0 or count > 4 or pos + count > len(data):
            raise EntitlementsError("the DER entitlements have an invalid length field")
        size = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    else:
        size = first
    if pos + size > len(data):
        raise EntitlementsError("a DER entitlements value runs past the end of its container")
    return tag, data[pos : pos + size], pos + size


def _items(content: bytes) -> list[tuple[int, bytes]]:
    items, pos = [], 0
    while pos < len(content):
        if len(items) >= MAX_ELEMENTS:
            raise EntitlementsError(f"a DER entitlements container holds more than {MAX_ELEMENTS} values")
        tag, value, pos = _read_tlv(content, pos)
        items.append((tag, value))
    return items


def _utf8(content: bytes) -> str:
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError:
        raise EntitlementsError("a DER entitlements string is not valid UTF-8") from None


def _decode_value(tag: int, content: bytes, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise EntitlementsError("the DER entitlements are nested too deeply")
    if tag == _TAG_BOOLEAN:
        if len(content) != 1:
            raise EntitlementsError("a DER entitlements boolean is not one byte")
        return content != b"\x00"
    if tag == _TAG_INTEGER:
        return int.from_bytes(content, "big", signed=True)
    if tag == _TAG_UTF8_STRING:
        return _utf8(content)
    if tag == _TAG_SEQUENCE:
        return [_decode_value(item_tag, item, depth + 1) for item_tag, item in _items(content)]
    if tag in (_TAG_DICTIONARY, _TAG_SET):
        result = {}
        for entry_tag, entry in _items(content):
            parts = _items(entry)
            if entry_tag != _TAG_SEQUENCE or len(parts) != 2 or parts[0][0] != _TAG_UTF8_STRING:
                raise EntitlementsError("a DER entitlements dictionary entry is not a (key, value) pair")
            result[_utf8(parts[0][1])] = _decode_value(parts[1][0], parts[1][1], depth + 1)
        return result
    raise EntitlementsError(f"the DER entitlements contain an unsupported tag 0x{tag:02x}")


def decode_der(der: bytes) -> dict[str, Any]:
    """The dictionary from DER entitlements (``[APPLICATION 16]`` form, or a bare SET of entries)."""
    tag, content, end = _read_tlv(der, 0)
    if end != len(der):
        raise EntitlementsError("bytes follow the DER entitlements")
    if tag == _TAG_SET:
        return _decode_value(tag, content, 0)
    if tag != _TAG_PLIST:
        raise EntitlementsError(f"the DER entitlements start with tag 0x{tag:02x}, expected 0x70")
    items = _items(content)
    if len(items) != 2 or items[0] != (_TAG_INTEGER, b"\x01"):
        raise EntitlementsError("the DER entitlements do not start with version 1")
    value = _decode_value(items[1][0], items[1][1], 0)
    if not isinstance(value, dict):
        raise EntitlementsError("the DER entitlements do not hold a dictionary")
    return value
