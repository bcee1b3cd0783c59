"""Code requirements in binary form: the expression tree, and requirement and requirement-set blobs.

A requirement blob is {0xfade0c00, length, kind = 1 (expression form), expression}; the expression
is a prefix code of big-endian u32 opcodes with length-prefixed, 4-byte-padded data. A requirement
set is a SuperBlob (0xfade0c01) indexed by requirement type (3 = designated).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from ....crypto.ber import BerError
from ....crypto.der_decoding import oid_from_content
from ....crypto.der_encoding import oid_content
from ..blobs import CodeSignatureFormatError, Magic, decode_blob, decode_superblob, encode_blob
from ..blobs import encode_superblob as _encode_superblob

EXPRESSION_FORM = 1
LEAF_CERT = 0
ANCHOR_CERT = -1
OPCODE_FLAG_DEFAULT_FALSE = 0x80000000
OPCODE_FLAG_SKIP = 0x40000000
OPCODE_FLAG_MASK = 0xFF000000

EMPTY_REQUIREMENT_SET = _encode_superblob(Magic.REQUIREMENT_SET, [])

# Apple OIDs used by the Developer ID designated requirement.
OID_DEVELOPER_ID_CA = "1.2.840.113635.100.6.2.6"
OID_DEVELOPER_ID_LEAF = "1.2.840.113635.100.6.1.13"

MAX_EXPRESSION_DEPTH = 128  # Apple's requirements nest a handful of terms; this keeps every walk far from Python's recursion limit


class RequirementType(enum.IntEnum):
    HOST = 1
    GUEST = 2
    DESIGNATED = 3
    LIBRARY = 4
    PLUGIN = 5


class Op(enum.IntEnum):
    FALSE = 0
    TRUE = 1
    IDENT = 2
    APPLE_ANCHOR = 3
    ANCHOR_HASH = 4
    INFO_KEY_VALUE = 5
    AND = 6
    OR = 7
    CDHASH = 8
    NOT = 9
    INFO_KEY_FIELD = 10
    CERT_FIELD = 11
    TRUSTED_CERT = 12
    TRUSTED_CERTS = 13
    CERT_GENERIC = 14
    APPLE_GENERIC_ANCHOR = 15
    ENTITLEMENT_FIELD = 16
    CERT_POLICY = 17
    NAMED_ANCHOR = 18
    NAMED_CODE = 19
    PLATFORM = 20
    NOTARIZED = 21
    CERT_FIELD_DATE = 22
    LEGACY_DEVELOPER_ID = 23


class MatchOp(enum.IntEnum):
    EXISTS = 0
    EQUAL = 1
    CONTAINS = 2
    BEGINS_WITH = 3
    ENDS_WITH = 4
    LESS_THAN = 5
    GREATER_THAN = 6
    LESS_EQUAL = 7
    GREATER_EQUAL = 8
    ON = 9
    BEFORE = 10
    AFTER = 11
    ON_OR_BEFORE = 12
    ON_OR_AFTER = 13
    ABSENT = 14


_NO_ARGUMENT_OPS = frozenset(
    {
        Op.FALSE,
        Op.TRUE,
        Op.APPLE_ANCHOR,
        Op.TRUSTED_CERTS,
        Op.APPLE_GENERIC_ANCHOR,
        Op.NOTARIZED,
        Op.LEGACY_DEVELOPER_ID,
    }
)
DATE_MATCHES = {MatchOp.ON, MatchOp.BEFORE, MatchOp.AFTER, MatchOp.ON_OR_BEFORE, MatchOp.ON_OR_AFTER}


@dataclass(frozen=True)
class Match:
    """A match suffix: ``/* exists */``, ``= value``, ``~ value``, ``= value*``, dates as seconds."""

    op: MatchOp
    value: bytes | int | None = None  # bytes for string matches, int (seconds since 2001) for dates


@dataclass(frozen=True)
class Expr:
    """One node of a requirement expression.

    ``args`` by opcode: IDENT/NAMED_ANCHOR/NAMED_CODE/CDHASH (data,); ANCHOR_HASH (slot, digest);
    INFO_KEY_VALUE (key, value); AND/OR (left, right); NOT (expr,); INFO_KEY_FIELD/ENTITLEMENT_FIELD
    (key, match); CERT_FIELD (slot, field name, match); CERT_GENERIC/CERT_POLICY/CERT_FIELD_DATE
    (slot, DER OID content, match); TRUSTED_CERT/PLATFORM (int,); others ().
    """

    op: int
    args: tuple = ()


# --- building ---------------------------------------------------------------------------------------


def oid_to_der(dotted: str) -> bytes:
    """The DER content bytes (no tag/length) of a dotted object identifier."""
    try:
        return oid_content(dotted)
    except ValueError as exc:
        raise CodeSignatureFormatError(str(exc)) from None


def oid_from_der(content: bytes) -> str:
    try:
        return oid_from_content(content)
    except BerError:
        raise CodeSignatureFormatError(f"malformed object identifier {content.hex()}") from None


def identifier(value: str) -> Expr:
    return Expr(Op.IDENT, (value.encode(),))


def anchor_apple_generic() -> Expr:
    return Expr(Op.APPLE_GENERIC_ANCHOR)


def certificate_generic(slot: int, oid: str, match: Match) -> Expr:
    return Expr(Op.CERT_GENERIC, (slot, oid_to_der(oid), match))


def certificate_field(slot: int, name: str, match: Match) -> Expr:
    return Expr(Op.CERT_FIELD, (slot, name.encode(), match))


def cdhash(digest: bytes) -> Expr:
    return Expr(Op.CDHASH, (digest,))


# --- binary form ------------------------------------------------------------------------------------


def _data(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value + bytes(-len(value) % 4)


def _match_bytes(match: Match) -> bytes:
    out = struct.pack(">I", match.op)
    if match.op in (MatchOp.EXISTS, MatchOp.ABSENT):
        return out
    if match.op in DATE_MATCHES:
        return out + struct.pack(">q", int(match.value or 0))
    return out + _data(bytes(match.value or b""))


def _expression_bytes(expr: Expr) -> bytes:
    op, args = expr.op, expr.args
    out = struct.pack(">I", op)
    if op in (Op.IDENT, Op.NAMED_ANCHOR, Op.NAMED_CODE, Op.CDHASH):
        return out + _data(args[0])
    if op == Op.ANCHOR_HASH:
        return out + struct.pack(">i", args[0]) + _data(args[1])
    if op == Op.INFO_KEY_VALUE:
        return out + _data(args[0]) + _data(args[1])
    if op in (Op.AND, Op.OR):
        return out + _expression_bytes(args[0]) + _expression_bytes(args[1])
    if op == Op.NOT:
        return out + _expression_bytes(args[0])
    if op in (Op.INFO_KEY_FIELD, Op.ENTITLEMENT_FIELD):
        return out + _data(args[0]) + _match_bytes(args[1])
    if op in (Op.CERT_FIELD, Op.CERT_GENERIC, Op.CERT_POLICY, Op.CERT_FIELD_DATE):
        return out + struct.pack(">i", args[0]) + _data(args[1]) + _match_bytes(args[2])
    if op == Op.TRUSTED_CERT:
        return out + struct.pack(">i", args[0])
    if op == Op.PLATFORM:
        return out + struct.pack(">I", args[0])
    if op in _NO_ARGUMENT_OPS:
        return out
    if op & (OPCODE_FLAG_DEFAULT_FALSE | OPCODE_FLAG_SKIP):
        return out + _data(args[0])
    raise CodeSignatureFormatError(f"cannot encode requirement opcode {op}")


def encode_requirement(expr: Expr) -> bytes:
    """A requirement blob (0xfade0c00) holding ``expr``."""
    return encode_blob(Magic.REQUIREMENT, struct.pack(">I", EXPRESSION_FORM) + _expression_bytes(expr))


def encode_requirement_set(requirements: Mapping[int, Expr | bytes]) -> bytes:
    """A requirement set (0xfade0c01); values are expressions or ready requirement blobs."""
    entries = []
    for kind, requirement in requirements.items():
        blob = requirement if isinstance(requirement, bytes) else encode_requirement(requirement)
        entries.append((int(kind), blob))
    return _encode_superblob(Magic.REQUIREMENT_SET, entries)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.buffer = data
        self.pos = 0

    def u32(self) -> int:
        if self.pos + 4 > len(self.buffer):
            raise CodeSignatureFormatError("the requirement expression ends in the middle of an opcode")
        (value,) = struct.unpack_from(">I", self.buffer, self.pos)
        self.pos += 4
        return value

    def i32(self) -> int:
        value = self.u32()
        return value - (1 << 32) if value & 0x80000000 else value

    def i64(self) -> int:
        high = self.u32()
        low = self.u32()
        value = (high << 32) | low
        return value - (1 << 64) if high & 0x80000000 else value

    def data(self) -> bytes:
        length = self.u32()
        end = self.pos + length
        if end > len(self.buffer):
            raise CodeSignatureFormatError("a requirement data field runs past the end of the expression")
        value = self.buffer[self.pos : end]
        self.pos = end + (-length % 4)
        return value

    def match(self) -> Match:
        raw = self.u32()
        try:
            op = MatchOp(raw)
        except ValueError:
            raise CodeSignatureFormatError(f"unknown requirement match operation {raw}") from None
        if op in (MatchOp.EXISTS, MatchOp.ABSENT):
            return Match(op)
        if op in DATE_MATCHES:
            return Match(op, self.i64())
        return Match(op, self.data())

    def expr(self, depth: int = 0) -> Expr:
        if depth >= MAX_EXPRESSION_DEPTH:
            raise CodeSignatureFormatError(
                f"the requirement expression is nested too deeply (more than {MAX_EXPRESSION_DEPTH} terms)"
            )
        raw = self.u32()
        op = raw & ~OPCODE_FLAG_MASK
        if op in (Op.IDENT, Op.NAMED_ANCHOR, Op.NAMED_CODE, Op.CDHASH):
            return Expr(op, (self.data(),))
        if op == Op.ANCHOR_HASH:
            return Expr(op, (self.i32(), self.data()))
        if op == Op.INFO_KEY_VALUE:
            return Expr(op, (self.data(), self.data()))
        if op in (Op.AND, Op.OR):
            return Expr(op, (self.expr(depth + 1), self.expr(depth + 1)))
        if op == Op.NOT:
            return Expr(op, (self.expr(depth + 1),))
        if op in (Op.INFO_KEY_FIELD, Op.ENTITLEMENT_FIELD):
            return Expr(op, (self.data(), self.match()))
        if op in (Op.CERT_FIELD, Op.CERT_GENERIC, Op.CERT_POLICY, Op.CERT_FIELD_DATE):
            return Expr(op, (self.i32(), self.data(), self.match()))
        if op == Op.TRUSTED_CERT:
            return Expr(op, (self.i32(),))
        if op == Op.PLATFORM:
            return Expr(op, (self.u32(),))
        if op in _NO_ARGUMENT_OPS:
            return Expr(op)
        if raw & (OPCODE_FLAG_DEFAULT_FALSE | OPCODE_FLAG_SKIP):
            return Expr(raw, (self.data(),))
        raise CodeSignatureFormatError(f"unknown requirement opcode {raw:#x}")


def parse_requirement(blob: bytes) -> Expr:
    """The expression of a requirement blob (0xfade0c00)."""
    _, payload = decode_blob(blob, Magic.REQUIREMENT)
    reader = _Reader(payload)
    kind = reader.u32()
    if kind != EXPRESSION_FORM:
        raise CodeSignatureFormatError(f"unsupported requirement kind {kind}")
    expr = reader.expr()
    if reader.pos != len(payload):
        raise CodeSignatureFormatError(
            f"{len(payload) - reader.pos} bytes follow the requirement expression"
        )
    return expr


def parse_requirement_set(blob: bytes) -> dict[int, Expr]:
    """Requirement type -> expression for a requirement set (0xfade0c01)."""
    superblob = decode_superblob(blob, Magic.REQUIREMENT_SET)
    return {kind: parse_requirement(requirement) for kind, requirement in superblob.entries}
