"""Code requirements in Apple's text language: parsing what ``-R`` takes, rendering what ``-r-`` prints.

Rendering follows Apple's ``codesign -d -r-`` output: ``and`` binds tighter than ``or``, strings
print bare when they are simple words, quoted otherwise, and as hex when binary.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from ....errors import UsageError
from ..blobs import CodeSignatureFormatError
from .binary import (
    ANCHOR_CERT,
    DATE_MATCHES,
    LEAF_CERT,
    MAX_EXPRESSION_DEPTH,
    OPCODE_FLAG_DEFAULT_FALSE,
    OPCODE_FLAG_MASK,
    OPCODE_FLAG_SKIP,
    Expr,
    Match,
    MatchOp,
    Op,
    RequirementType,
    oid_from_der,
    oid_to_der,
    parse_requirement,
)

_COMPARISONS = (
    ("<=", MatchOp.LESS_EQUAL),
    (">=", MatchOp.GREATER_EQUAL),
    ("<", MatchOp.LESS_THAN),
    (">", MatchOp.GREATER_THAN),
    ("~", MatchOp.CONTAINS),
)


class RequirementSyntaxError(UsageError):
    """A requirement given with ``-R`` cannot be compiled."""


# --- parsing --------------------------------------------------------------------------------------


_TOKEN = re.compile(
    r"""\s*(?:
        (?P<comment>/\*.*?\*/)
      | (?P<hash>H"(?P<hex>[0-9A-Fa-f]*)")
      | (?P<string>"(?P<text>(?:[^"\\]|\\.)*)")
      | (?P<op><=|>=|[()\[\]=~<>!*])
      | (?P<word>[A-Za-z0-9_.\-/$@:+]+)
    )""",
    re.VERBOSE | re.DOTALL,
)


class _Token(NamedTuple):
    kind: str  # "hash", "string", "op", "word", "end"
    value: Any


def _tokens(text: str) -> list[_Token]:
    tokens = []
    position = 0
    while True:
        while position < len(text) and text[position].isspace():
            position += 1
        if position >= len(text):
            break
        found = _TOKEN.match(text, position)
        if found is None or found.end() == position:
            raise RequirementSyntaxError(f"unexpected character {text[position]!r} in the requirement")
        position = found.end()
        if found.group("comment"):
            continue
        if found.group("hash") is not None:
            tokens.append(_Token("hash", _hex(found.group("hex"))))
        elif found.group("string") is not None:
            tokens.append(_Token("string", re.sub(r"\\(.)", r"\1", found.group("text"))))
        elif found.group("op"):
            tokens.append(_Token("op", found.group("op")))
        else:
            tokens.append(_Token("word", found.group("word")))
    tokens.append(_Token("end", None))
    return tokens


def _hex(text: str) -> bytes:
    if len(text) % 2:
        raise RequirementSyntaxError(f"the hash {text[:16]}... has an odd number of hex digits")
    return bytes.fromhex(text)


# Parentheses and negations nest the parser's own calls; the expression it builds may be deeper
# (a chain of "and"s), up to what a compiled requirement may hold.
_MAX_TEXT_NESTING = 64


def _depth(expr: Expr) -> int:
    deepest, pending = 0, [(expr, 1)]
    while pending:
        node, depth = pending.pop()
        deepest = max(deepest, depth)
        if node.op in (Op.AND, Op.OR, Op.NOT):
            pending.extend((child, depth + 1) for child in node.args)
    return deepest


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokens(text)
        self.position = 0
        self.nesting = 0

    @property
    def current(self) -> _Token:
        return self.tokens[self.position]

    def take(self) -> _Token:
        token = self.tokens[self.position]
        self.position += 1
        return token

    def accept(self, kind: str, value: str | None = None) -> _Token | None:
        token = self.current
        if token.kind == kind and (value is None or token.value == value):
            return self.take()
        return None

    def expect(self, kind: str, value: str | None = None) -> _Token:
        token = self.accept(kind, value)
        if token is None:
            wanted = value or kind
            raise RequirementSyntaxError(f"expected {wanted!r} but found {self._describe(self.current)}")
        return token

    @staticmethod
    def _describe(token: _Token) -> str:
        return "the end of the requirement" if token.kind == "end" else repr(token.value)

    def keyword(self, *words: str) -> str | None:
        token = self.current
        if token.kind == "word" and token.value in words:
            self.take()
            return token.value
        return None

    def parse(self) -> Expr:
        # Apple's requirement source may start with "designated =>" (the form -r- prints).
        if self.current.kind == "word" and self.current.value in ("designated", "host", "guest", "library"):
            following = self.tokens[self.position + 1]
            if following.kind == "op" and following.value == "=":
                marker = self.tokens[self.position + 2]
                if marker.kind == "op" and marker.value == ">":
                    self.position += 3
        expr = self.expression()
        if self.current.kind != "end":
            raise RequirementSyntaxError(f"unexpected {self._describe(self.current)} in the requirement")
        return expr

    def expression(self) -> Expr:
        terms = [self.term()]
        while self.keyword("or"):
            terms.append(self.term())
        return _left(Op.OR, terms)

    def term(self) -> Expr:
        terms = [self.primary()]
        while self.keyword("and"):
            terms.append(self.primary())
        return _left(Op.AND, terms)

    def primary(self) -> Expr:
        if self.accept("op", "!") or self.keyword("not"):
            with self.nested():
                return Expr(Op.NOT, (self.primary(),))
        if self.accept("op", "("):
            with self.nested():
                inner = self.expression()
            self.expect("op", ")")
            return inner
        word = self.keyword(
            "always", "true", "never", "false", "identifier", "anchor", "certificate", "cert",
            "info", "entitlement", "cdhash", "platform", "notarized", "legacy",
        )  # fmt: skip
        if word in ("always", "true"):
            return Expr(Op.TRUE)
        if word in ("never", "false"):
            return Expr(Op.FALSE)
        if word == "identifier":
            self.accept("op", "=")
            return Expr(Op.IDENT, (self.value(),))
        if word == "anchor":
            return self.anchor()
        if word in ("certificate", "cert"):
            return self.certificate(self.slot())
        if word in ("info", "entitlement"):
            self.expect("op", "[")
            key = self.value()
            self.expect("op", "]")
            op = Op.INFO_KEY_FIELD if word == "info" else Op.ENTITLEMENT_FIELD
            return Expr(op, (key, self.match()))
        if word == "cdhash":
            return Expr(Op.CDHASH, (self.hash(),))
        if word == "platform":
            self.expect("op", "=")
            return Expr(Op.PLATFORM, (self.integer(),))
        if word == "notarized":
            return Expr(Op.NOTARIZED)
        if word == "legacy":
            return Expr(Op.LEGACY_DEVELOPER_ID)
        raise RequirementSyntaxError(f"unexpected {self._describe(self.current)} in the requirement")

    @contextmanager
    def nested(self) -> Iterator[None]:
        self.nesting += 1
        if self.nesting > _MAX_TEXT_NESTING:
            raise RequirementSyntaxError(f"the requirement nests more than {_MAX_TEXT_NESTING} parentheses or negations")
        yield
        self.nesting -= 1

    def anchor(self) -> Expr:
        if self.keyword("apple"):
            if self.keyword("generic"):
                return Expr(Op.APPLE_GENERIC_ANCHOR)
            if self.current.kind in ("word", "string") and self.current.value not in ("and", "or"):
                return Expr(Op.NAMED_ANCHOR, (self.value(),))
            return Expr(Op.APPLE_ANCHOR)
        if self.keyword("trusted"):
            return Expr(Op.TRUSTED_CERTS)
        return self.certificate(ANCHOR_CERT)

    def slot(self) -> int:
        word = self.keyword("leaf", "root", "anchor")
        if word == "leaf":
            return LEAF_CERT
        if word in ("root", "anchor"):
            return ANCHOR_CERT
        return self.integer()

    def certificate(self, slot: int) -> Expr:
        if self.keyword("trusted"):
            return Expr(Op.TRUSTED_CERT, (slot,))
        if self.accept("op", "="):
            return Expr(Op.ANCHOR_HASH, (slot, self.hash()))
        self.expect("op", "[")
        name = self.text()
        self.expect("op", "]")
        match = self.match()
        prefix, _, rest = name.partition(".")
        if prefix in ("field", "policy", "timestamp") and rest:
            op = {"field": Op.CERT_GENERIC, "policy": Op.CERT_POLICY, "timestamp": Op.CERT_FIELD_DATE}[prefix]
            try:
                return Expr(op, (slot, oid_to_der(rest), match))
            except (ValueError, CodeSignatureFormatError):
                raise RequirementSyntaxError(f"{rest!r} is not an object identifier") from None
        return Expr(Op.CERT_FIELD, (slot, name.encode(), match))

    def match(self) -> Match:
        if self.keyword("exists"):
            return Match(MatchOp.EXISTS)
        if self.keyword("absent"):
            return Match(MatchOp.ABSENT)
        for symbol, op in _COMPARISONS:
            if self.accept("op", symbol):
                return Match(op, self.value())
        if self.accept("op", "="):
            leading = self.accept("op", "*") is not None
            value = self.value()
            trailing = self.accept("op", "*") is not None
            if leading and trailing:
                return Match(MatchOp.CONTAINS, value)
            if leading:
                return Match(MatchOp.ENDS_WITH, value)
            if trailing:
                return Match(MatchOp.BEGINS_WITH, value)
            return Match(MatchOp.EQUAL, value)
        # "certificate 1[field.x] /* exists */": the comment is gone, so no operator means exists.
        return Match(MatchOp.EXISTS)

    def value(self) -> bytes:
        token = self.current
        if token.kind in ("string", "word"):
            self.take()
            return str(token.value).encode()
        if token.kind == "hash":
            self.take()
            return token.value
        raise RequirementSyntaxError(f"expected a value but found {self._describe(token)}")

    def text(self) -> str:
        token = self.current
        if token.kind in ("string", "word"):
            self.take()
            return str(token.value)
        raise RequirementSyntaxError(f"expected a name but found {self._describe(token)}")

    def hash(self) -> bytes:
        token = self.current
        if token.kind == "hash":
            self.take()
            return token.value
        if token.kind in ("word", "string") and re.fullmatch(r"(0x)?[0-9A-Fa-f]+", str(token.value)):
            self.take()
            return _hex(str(token.value).removeprefix("0x"))
        raise RequirementSyntaxError(f'expected a hash such as H"..." but found {self._describe(token)}')

    def integer(self) -> int:
        token = self.current
        if token.kind == "word":
            try:
                number = int(token.value, 0)
            except ValueError:
                pass
            else:
                if not -(1 << 31) <= number < 1 << 32:
                    raise RequirementSyntaxError(f"the number {token.value} does not fit in 32 bits")
                self.take()
                return number
        raise RequirementSyntaxError(f"expected a number but found {self._describe(token)}")


def _left(op: int, terms: list[Expr]) -> Expr:
    result = terms[0]
    for term in terms[1:]:
        result = Expr(op, (result, term))
    return result


def parse_requirement_text(text: str) -> Expr:
    """Compile a requirement in Apple's language (``identifier "x" and anchor apple generic``)."""
    if not text.strip():
        raise RequirementSyntaxError("the requirement is empty")
    expr = _Parser(text).parse()
    if _depth(expr) > MAX_EXPRESSION_DEPTH:
        raise RequirementSyntaxError(f"the requirement nests more than {MAX_EXPRESSION_DEPTH} terms deep")
    return expr


def load_requirement(argument: str) -> Expr:
    """What ``-R`` names: ``=<text>`` is requirement text, anything else a file holding requirement
    text or a compiled requirement blob."""
    if argument.startswith("="):
        return parse_requirement_text(argument[1:])
    try:
        data = Path(argument).read_bytes()
    except OSError as exc:
        raise RequirementSyntaxError(
            f"{argument}: cannot read the requirement file ({exc.strerror or exc}); "
            "give requirement text as -R='<requirement>'"
        ) from None
    if data[:4] == b"\xfa\xde\x0c\x00":
        try:
            return parse_requirement(data)
        except CodeSignatureFormatError as exc:
            raise RequirementSyntaxError(f"{argument}: {exc}") from None
    return parse_requirement_text(data.decode(errors="replace"))


# --- rendering ------------------------------------------------------------------------------------

_PRIMARY, _AND, _OR, _TOP = range(4)


def _is_graph(byte: int) -> bool:
    return 0x21 <= byte <= 0x7E


def _render_data(value: bytes, *, dot_okay: bool = False) -> str:
    simple = bool(value)
    for position, byte in enumerate(value):
        char = chr(byte)
        if char.isascii() and (char.isalnum() or (char == "." and dot_okay)):
            if position == 0 and char.isdigit():
                simple = False
        elif _is_graph(byte) or char in " \t\n\r\f\v":
            simple = False
        else:
            return "0x" + value.hex()
    text = value.decode("ascii")
    if simple:
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _render_slot(slot: int) -> str:
    if slot == ANCHOR_CERT:
        return "root"
    if slot == LEAF_CERT:
        return "leaf"
    return str(slot)


def _render_match(match: Match) -> str:
    op, value = match.op, match.value
    if op == MatchOp.EXISTS:
        return " /* exists */"
    if op == MatchOp.ABSENT:
        return " absent "
    if op in DATE_MATCHES:
        symbol = {MatchOp.ON: "=", MatchOp.BEFORE: "<", MatchOp.AFTER: ">", MatchOp.ON_OR_BEFORE: "<=",
                  MatchOp.ON_OR_AFTER: ">="}[op]
        return f" {symbol} timestamp {value}"
    text = _render_data(bytes(value or b""))
    return {
        MatchOp.EQUAL: f" = {text}",
        MatchOp.CONTAINS: f" ~ {text}",
        MatchOp.BEGINS_WITH: f" = {text}*",
        MatchOp.ENDS_WITH: f" = *{text}",
        MatchOp.LESS_THAN: f" < {text}",
        MatchOp.GREATER_THAN: f" > {text}",
        MatchOp.LESS_EQUAL: f" <= {text}",
        MatchOp.GREATER_EQUAL: f" >= {text}",
    }[op]


def render(expr: Expr, level: int = _TOP) -> str:
    """The requirement in Apple's text syntax."""
    op, args = expr.op, expr.args
    if op == Op.AND or op == Op.OR:
        own = _AND if op == Op.AND else _OR
        word = " and " if op == Op.AND else " or "
        text = render(args[0], own) + word + render(args[1], own)
        return f"({text})" if level < own else text
    if op == Op.NOT:
        return "! " + render(args[0], _PRIMARY)
    if op == Op.FALSE:
        return "never"
    if op == Op.TRUE:
        return "always"
    if op == Op.IDENT:
        return "identifier " + _render_data(args[0])
    if op == Op.APPLE_ANCHOR:
        return "anchor apple"
    if op == Op.APPLE_GENERIC_ANCHOR:
        return "anchor apple generic"
    if op == Op.ANCHOR_HASH:
        return f'certificate {_render_slot(args[0])} = H"{args[1].hex()}"'
    if op == Op.INFO_KEY_VALUE:
        return f"info[{_render_data(args[0], dot_okay=True)}] = {_render_data(args[1])}"
    if op == Op.CDHASH:
        return f'cdhash H"{args[0].hex()}"'
    if op == Op.INFO_KEY_FIELD:
        return f"info[{_render_data(args[0], dot_okay=True)}]" + _render_match(args[1])
    if op == Op.ENTITLEMENT_FIELD:
        return f"entitlement[{_render_data(args[0], dot_okay=True)}]" + _render_match(args[1])
    if op == Op.CERT_FIELD:
        return f"certificate {_render_slot(args[0])}[{_render_data(args[1], dot_okay=True)}]" + _render_match(
            args[2]
        )
    if op in (Op.CERT_GENERIC, Op.CERT_POLICY, Op.CERT_FIELD_DATE):
        prefix = {Op.CERT_GENERIC: "field", Op.CERT_POLICY: "policy", Op.CERT_FIELD_DATE: "timestamp"}[op]
        field_name = f"{prefix}.{oid_from_der(args[1])}"
        return f"certificate {_render_slot(args[0])}[{field_name}]" + _render_match(args[2])
    if op == Op.TRUSTED_CERT:
        return f"certificate {_render_slot(args[0])} trusted"
    if op == Op.TRUSTED_CERTS:
        return "anchor trusted"
    if op == Op.NAMED_ANCHOR:
        return "anchor apple " + _render_data(args[0])
    if op == Op.NAMED_CODE:
        return "(" + _render_data(args[0]) + ")"
    if op == Op.PLATFORM:
        return f"platform = {args[0]}"
    if op == Op.NOTARIZED:
        return "notarized"
    if op == Op.LEGACY_DEVELOPER_ID:
        return "legacy"
    if op & OPCODE_FLAG_DEFAULT_FALSE:
        return f"false /* opcode {op & ~OPCODE_FLAG_MASK} */"
    if op & OPCODE_FLAG_SKIP:
        return f"/* opcode {op & ~OPCODE_FLAG_MASK} */"
    raise CodeSignatureFormatError(f"cannot render requirement opcode {op}")


def requirement_set_lines(requirements: Mapping[int, Expr]) -> list[str]:
    """``designated => ...``, one line per requirement, as ``codesign -d -r-`` prints a requirement set."""
    lines = []
    for kind, expr in requirements.items():
        try:
            name = RequirementType(kind).name.lower()
        except ValueError:
            name = f"type {kind}"
        lines.append(f"{name} => {render(expr)}")
    return lines
