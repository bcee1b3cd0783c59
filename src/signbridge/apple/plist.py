"""Reading property lists from signed code: the one reader for Info.plist, CodeResources,
entitlements and every other plist that comes from a file or a signature.

Both forms Apple writes are read: XML (``<plist version="1.0">``) and binary (``bplist00``). The
input is untrusted, so the reader is bounded and strict:

- at most :data:`MAX_PLIST_SIZE` bytes, :data:`MAX_DEPTH` nested containers and
  :data:`MAX_ELEMENTS` values (a binary plist's shared objects count each time they are used, so
  references cannot fan out into an exponential value);
- XML is parsed by expat with defusedxml's protections (entity declarations and external
  references are refused; the document type declaration Apple writes is allowed), and values are
  built as expat streams the elements: no tree, no recursion. defusedxml's own parsers are pure
  Python around expat and three times slower on a large CodeResources;
- integers must fit in 64 bits, dictionary keys must be strings, and anything that is not one of
  the plist types (dict, array, string, integer, real, boolean, date, data) is an error.

Every failure is a :class:`PlistError` (or the subclass the caller names) whose message says which
document is broken and how. The typed accessors (:func:`require`, :func:`optional_key`) turn "this key
holds the wrong type" into the same kind of error.
"""

from __future__ import annotations

import binascii
import math
import re
import struct
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from xml.parsers import expat

from ..errors import SignbridgeError

MAX_PLIST_SIZE = 32 << 20
MAX_DEPTH = 64
MAX_ELEMENTS = 1_000_000
_MAX_INTEGER_DIGITS = 24
_INTEGER_RANGE = (-(1 << 63), 1 << 64)

T = TypeVar("T")


class PlistError(SignbridgeError):
    """A property list is malformed, too large, or holds a value of the wrong type."""


def load_plist(data: bytes, what: str, error: type[SignbridgeError] = PlistError) -> Any:
    """The value of the XML or binary property list ``data``; ``what`` names it in messages
    (``"Contents/Info.plist"``), ``error`` is the exception raised when it cannot be read."""
    if len(data) > MAX_PLIST_SIZE:
        raise error(f"{what} is too large to be a property list ({len(data)} bytes; the limit is {MAX_PLIST_SIZE})")
    try:
        value = _BinaryReader(data).read() if data.startswith(b"bplist00") else _read_xml(data)
    except _Invalid as exc:
        raise error(f"{what} is not a valid property list: {exc}") from None
    return value


def load_plist_dict(data: bytes, what: str, error: type[SignbridgeError] = PlistError) -> dict[str, Any]:
    """A property list whose top level must be a dictionary."""
    return require(load_plist(data, what, error), dict, what, error)


def plist_dict(data: bytes | None) -> dict[str, Any] | None:
    """A property list's top-level dictionary, or None when the data is absent, unreadable or not a
    dictionary: for documents whose absence is not an error (an embedded or bound Info.plist read
    for display or for requirements)."""
    if not data:
        return None
    try:
        value = load_plist(data, "the property list")
    except PlistError:
        return None
    return value if isinstance(value, dict) else None


def require(value: object, kind: type[T], what: str, error: type[SignbridgeError] = PlistError) -> T:
    """``value`` when it is a ``kind`` (a bool is never an int here), else ``error`` naming ``what``."""
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise error(f"{what} is {_describe(value)}, not {_describe_kind(kind)}")


def optional_key(mapping: dict[str, Any], key: str, kind: type[T], what: str, error: type[SignbridgeError] = PlistError) -> T | None:
    """``mapping[key]`` when present (it must then be a ``kind``), else None."""
    if key not in mapping:
        return None
    return require(mapping[key], kind, f"{what}: {key}", error)


_KIND_NAMES = {
    dict: "a dictionary", list: "an array", str: "a string", int: "an integer", float: "a real number",
    bool: "a boolean", bytes: "data", datetime: "a date",
}  # fmt: skip


def _describe_kind(kind: type) -> str:
    return _KIND_NAMES.get(kind, kind.__name__)


def _describe(value: object) -> str:
    return "missing" if value is None else _describe_kind(type(value))


class _Invalid(Exception):
    """Raised inside the readers; load_plist turns it into the caller's error."""


# --- XML --------------------------------------------------------------------------------------------

_LEAVES = frozenset({"key", "string", "integer", "real", "date", "data", "true", "false"})
_DATE = re.compile(r"(\d{4})(?:-(\d\d)(?:-(\d\d)(?:T(\d\d)(?::(\d\d)(?::(\d\d))?)?)?)?)?Z")


def _refuse_entities(*_: object) -> None:
    raise _Invalid("it declares XML entities or external references")


def _read_xml(data: bytes) -> Any:
    builder = _XmlBuilder()
    parser = expat.ParserCreate()
    # defusedxml's settings for expat: no entity declarations, no external references.
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.EntityDeclHandler = _refuse_entities
    parser.UnparsedEntityDeclHandler = _refuse_entities
    parser.ExternalEntityRefHandler = _refuse_entities
    parser.buffer_text = True
    parser.StartElementHandler = builder.start
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.data
    try:
        parser.Parse(data, True)
    except expat.ExpatError as exc:
        raise _Invalid(f"it is not well-formed XML ({exc})") from None
    except LookupError as exc:  # an encoding Python does not know, from the XML declaration
        raise _Invalid(f"its XML declaration names an unknown encoding ({exc})") from None
    return builder.close()


class _XmlBuilder:
    """Builds the value as expat streams elements: no tree, no recursion, bounded depth and count."""

    def __init__(self) -> None:
        self.stack: list[list[Any]] = []  # [container, key awaiting its value]
        self.root: list[Any] = []
        self.values = 0
        self.plist = 0  # <plist> elements seen
        self.leaf: str | None = None  # the leaf element being read
        self.text: list[str] = []

    def start(self, tag: str, attributes: dict[str, str]) -> None:
        if self.leaf is not None:
            raise _Invalid(f"<{tag}> inside a <{self.leaf}> element")
        if tag == "plist":
            self.plist += 1
            if self.plist > 1 or self.stack or self.root:
                raise _Invalid("<plist> appears inside the document")
            return
        if tag != "key":
            self.values += 1
            if self.values > MAX_ELEMENTS:
                raise _Invalid(f"it holds more than {MAX_ELEMENTS} values")
            if self.stack and isinstance(self.stack[-1][0], dict) and self.stack[-1][1] is None:
                raise _Invalid(f"a <{tag}> in a dictionary has no <key>")
        if tag in ("dict", "array"):
            if len(self.stack) >= MAX_DEPTH:
                raise _Invalid(f"it nests containers more than {MAX_DEPTH} deep")
            self.stack.append([{} if tag == "dict" else [], None])
        elif tag in _LEAVES:
            self.leaf = tag
            self.text = []
        else:
            raise _Invalid(f"unknown element <{tag}>")

    def data(self, text: str) -> None:
        if self.leaf is not None:
            self.text.append(text)

    def end(self, tag: str) -> None:
        if tag == "plist":
            return
        if tag in ("dict", "array"):
            container, key = self.stack.pop()
            if key is not None:
                raise _Invalid(f"the key {key!r} has no value")
            self.add(container)
            return
        text = "".join(self.text)
        self.leaf = None
        if tag == "key":
            if not self.stack or not isinstance(self.stack[-1][0], dict) or self.stack[-1][1] is not None:
                raise _Invalid("a <key> outside a dictionary, or two keys in a row")
            self.stack[-1][1] = text
        elif tag in ("true", "false"):
            self.add(tag == "true")
        else:
            self.add(_scalar(tag, text))

    def add(self, value: Any) -> None:
        if not self.stack:
            if self.root:
                raise _Invalid("it holds more than one top-level value")
            self.root.append(value)
            return
        frame = self.stack[-1]
        if isinstance(frame[0], list):
            frame[0].append(value)
        else:
            frame[0][frame[1]] = value
            frame[1] = None

    def close(self) -> Any:
        if not self.root:
            raise _Invalid("it holds no value")
        return self.root[0]


def _scalar(tag: str, text: str) -> Any:
    if tag == "string":
        return text
    if tag == "integer":
        stripped = text.strip()
        if len(stripped) > _MAX_INTEGER_DIGITS:
            raise _Invalid(f"the integer {stripped[:_MAX_INTEGER_DIGITS]}... is too long")
        try:
            number = int(stripped, 16) if stripped[:2].lower() == "0x" else int(stripped, 10)
        except ValueError:
            raise _Invalid(f"{stripped!r} is not an integer") from None
        if not _INTEGER_RANGE[0] <= number < _INTEGER_RANGE[1]:
            raise _Invalid(f"the integer {number} does not fit in 64 bits")
        return number
    if tag == "real":
        try:
            return float(text.strip())
        except ValueError:
            raise _Invalid(f"{text.strip()[:40]!r} is not a real number") from None
    if tag == "data":
        try:
            return binascii.a2b_base64(text.encode())
        except (binascii.Error, UnicodeEncodeError):
            raise _Invalid("a <data> element is not valid base64") from None
    return _date(text)


def _date(text: str) -> datetime:
    found = _DATE.fullmatch(text.strip())
    if found is None:
        raise _Invalid(f"{text.strip()[:40]!r} is not a date")
    parts = [int(part) if part else default for part, default in zip(found.groups(), (0, 1, 1, 0, 0, 0), strict=True)]
    try:
        return datetime(*parts)  # noqa: DTZ001 - plistlib's naive UTC dates
    except ValueError:
        raise _Invalid(f"{text.strip()!r} is not a valid date") from None


# --- binary -----------------------------------------------------------------------------------------

_EPOCH = datetime(2001, 1, 1, tzinfo=UTC)


class _BinaryReader:
    """``bplist00``: objects addressed through an offset table, read on demand with bounded depth."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.elements = 0

    def read(self) -> Any:
        data = self.data
        if len(data) < 8 + 32:
            raise _Invalid("the binary property list is cut short")
        offset_size, self.ref_size, count, top, table = struct.unpack(">6xBBQQQ", data[-32:])
        if offset_size not in (1, 2, 4, 8) or self.ref_size not in (1, 2, 4, 8):
            raise _Invalid("the binary property list has invalid offset or reference sizes")
        if top >= count or table < 8 or table + count * offset_size > len(data) - 32:
            raise _Invalid("the binary property list's offset table lies outside it")
        self.count = count
        table_bytes = data[table : table + count * offset_size]
        self.offsets = [
            int.from_bytes(table_bytes[n : n + offset_size], "big") for n in range(0, len(table_bytes), offset_size)
        ]
        self.end = table
        return self.object(top, 0)

    def _offset(self, ref: int) -> int:
        if ref >= self.count:
            raise _Invalid(f"object reference {ref} is out of range")
        offset = self.offsets[ref]
        if not 8 <= offset < self.end:
            raise _Invalid(f"object {ref} lies outside the object area")
        return offset

    def _count(self, position: int, low: int) -> tuple[int, int]:
        """The length of a variable-size object and where its content starts."""
        if low != 0xF:
            return low, position + 1
        marker = self.data[position + 1] if position + 1 < self.end else None
        if marker is None or marker >> 4 != 0x1 or (marker & 0xF) > 3:
            raise _Invalid("an object's length is not an integer")
        size = 1 << (marker & 0xF)
        start = position + 2
        if start + size > self.end:
            raise _Invalid("an object's length runs past the object area")
        return int.from_bytes(self.data[start : start + size], "big"), start + size

    def _bytes(self, start: int, size: int) -> bytes:
        if size < 0 or start + size > self.end:
            raise _Invalid("an object runs past the object area")
        return self.data[start : start + size]

    def _refs(self, start: int, count: int) -> list[int]:
        raw = self._bytes(start, count * self.ref_size)
        return [int.from_bytes(raw[n : n + self.ref_size], "big") for n in range(0, len(raw), self.ref_size)]

    def object(self, ref: int, depth: int) -> Any:
        self.elements += 1
        if self.elements > MAX_ELEMENTS:
            raise _Invalid(f"it holds more than {MAX_ELEMENTS} values")
        position = self._offset(ref)
        marker = self.data[position]
        high, low = marker >> 4, marker & 0xF
        if marker == 0x08:
            return False
        if marker == 0x09:
            return True
        if high == 0x1 and low <= 4:
            size = 1 << low
            raw = self._bytes(position + 1, size)
            number = int.from_bytes(raw, "big", signed=size >= 8)
            if size == 16:  # only the low 64 bits carry the value, as CoreFoundation writes it
                number = int.from_bytes(raw[8:], "big", signed=raw[:8] != bytes(8))
            return number
        if high == 0x2 and low in (2, 3):
            return struct.unpack(">f" if low == 2 else ">d", self._bytes(position + 1, 1 << low))[0]
        if marker == 0x33:
            seconds = struct.unpack(">d", self._bytes(position + 1, 8))[0]
            if not math.isfinite(seconds) or abs(seconds) > 1e11:
                raise _Invalid("a date is out of range")
            return (_EPOCH + timedelta(seconds=seconds)).replace(tzinfo=None)
        if high in (0x4, 0x5, 0x6):
            length, start = self._count(position, low)
            if high == 0x4:
                return self._bytes(start, length)
            if high == 0x5:
                return self._bytes(start, length).decode("ascii", errors="replace")
            try:
                return self._bytes(start, 2 * length).decode("utf-16-be")
            except UnicodeDecodeError:
                raise _Invalid("a string is not valid UTF-16") from None
        if high in (0xA, 0xD):
            if depth >= MAX_DEPTH:
                raise _Invalid(f"it nests containers more than {MAX_DEPTH} deep")
            length, start = self._count(position, low)
            if length > MAX_ELEMENTS:
                raise _Invalid(f"a container claims {length} values")
            if high == 0xA:
                return [self.object(item, depth + 1) for item in self._refs(start, length)]
            refs = self._refs(start, 2 * length)
            result: dict[str, Any] = {}
            for key_ref, value_ref in zip(refs[:length], refs[length:], strict=True):
                key = self.object(key_ref, depth + 1)
                if not isinstance(key, str):
                    raise _Invalid(f"a dictionary key is {_describe(key)}, not a string")
                result[key] = self.object(value_ref, depth + 1)
            return result
        raise _Invalid(f"unsupported object type 0x{marker:02x}")
