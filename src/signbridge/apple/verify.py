"""Verifying code signatures as ``codesign --verify`` does, and code requirements.

:func:`verify_code` checks a Mach-O file or a bundle and returns a :class:`Verdict`, or raises a
:class:`CodeVerificationError` whose ``status`` is Apple's sentence ("invalid signature (code or
signature have been modified)", "a sealed resource is missing or invalid", ...) and whose
``detail`` names exactly what failed (which page of which architecture, which slot, which file).

Per Mach-O slice it checks every CodeDirectory (primary and alternates): each page hash over the
slice up to the code limit, each special slot (Info.plist, requirements, CodeResources,
entitlements), that no embedded blob is unsealed; then the CMS signature over the signed
attributes' stored bytes and its message digest against the primary CodeDirectory, Apple's CDHash
attributes against every CodeDirectory, the chain from the signer to a trust anchor
(``SIGNBRIDGE_ANCHORS`` / ``TrustAnchors``), certificate validity (an expired certificate passes
only with a timestamp within its validity), and the timestamp itself. It accepts what Apple's
tools write: BER indefinite-length CMS, zero padding, attributes out of DER order, SHA-1 primary
with SHA-256 alternates, stapled tickets.

Code requirements: :func:`parse_requirement_text` compiles Apple's requirement language (as
``-R`` takes it) and :func:`evaluate` checks an expression against a :class:`RequirementContext`.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from ..crypto.cms import verify_detached
from ..errors import SignbridgeError, UsageError
from . import cms
from .blobs import CodeSignatureFormatError, Slot, decode_blob
from .codedirectory import CodeDirectory, CodeDirectoryFlags, HashType, hash_code, page_count
from .embedded_signature import EmbeddedSignature, read_signature
from .entitlements import EntitlementsError, load_entitlements, parse_der_entitlements_blob
from .ipa import is_ipa
from .macho import MachO, MachOError, MachOFile, parse_file
from .plist import plist_dict
from .requirements import (
    ANCHOR_CERT,
    LEAF_CERT,
    MAX_EXPRESSION_DEPTH,
    OPCODE_FLAG_DEFAULT_FALSE,
    OPCODE_FLAG_MASK,
    Expr,
    Match,
    MatchOp,
    Op,
    RequirementType,
    oid_from_der,
    oid_to_der,
    parse_requirement,
    parse_requirement_set,
    render,
)
from .signed_code import (
    designated_requirement,
    macho_format,
    preferred_directory,
    preferred_slice,
)
from .trust import APPLE_ROOT_FINGERPRINTS, Purpose, TrustResult, evaluate_chain

if TYPE_CHECKING:
    from concurrent.futures import Executor

# Apple's sentences (Security framework error strings), as codesign prints them after the path.
UNSIGNED = "code object is not signed at all"
MODIFIED = "invalid signature (code or signature have been modified)"
BAD_RESOURCE = "a sealed resource is missing or invalid"
INFO_PLIST_FAILED = "invalid Info.plist (plist or signature have been modified)"
RESOURCE_DIRECTORY_FAILED = "invalid resource directory (directory or signature have been modified)"
RESOURCES_NOT_FOUND = "code has no resources but signature indicates they must be present"
RESOURCES_NOT_SEALED = "resources are present but not sealed by signature"
NOT_TRUSTED = "CSSMERR_TP_NOT_TRUSTED"
CERT_EXPIRED = "CSSMERR_TP_CERT_EXPIRED"
CERT_NOT_VALID_YET = "CSSMERR_TP_CERT_NOT_VALID_YET"
REQUIREMENT_FAILED = "code failed to satisfy specified code requirement(s)"
BAD_REQUIREMENT = "invalid or corrupted code requirement(s)"
INVALID_SYMLINK = "invalid destination for symbolic link in bundle"
BAD_BUNDLE = "bundle format unrecognized, invalid, or unsuitable"

_EMBEDDED_SLOTS = (
    Slot.REQUIREMENTS,
    Slot.ENTITLEMENTS,
    Slot.DER_ENTITLEMENTS,
    Slot.LAUNCH_CONSTRAINT_SELF,
    Slot.LAUNCH_CONSTRAINT_PARENT,
    Slot.LAUNCH_CONSTRAINT_RESPONSIBLE,
    Slot.LIBRARY_CONSTRAINT,
)
_COMPARISONS = (
    ("<=", MatchOp.LESS_EQUAL),
    (">=", MatchOp.GREATER_EQUAL),
    ("<", MatchOp.LESS_THAN),
    (">", MatchOp.GREATER_THAN),
    ("~", MatchOp.CONTAINS),
)
_CERT_FIELDS = {
    "CN": NameOID.COMMON_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "C": NameOID.COUNTRY_NAME,
    "L": NameOID.LOCALITY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "STREET": NameOID.STREET_ADDRESS,
    "UID": NameOID.USER_ID,
    "DC": NameOID.DOMAIN_COMPONENT,
    "EMAIL": NameOID.EMAIL_ADDRESS,
    "SERIALNUMBER": NameOID.SERIAL_NUMBER,
}


# --- errors ---------------------------------------------------------------------------------------


class CodeVerificationError(SignbridgeError):
    """The code failed verification. ``str()`` is Apple's sentence; ``detail`` says what failed.

    ``architecture`` and ``subcomponent`` locate the failure like Apple's "In architecture:" and
    "In subcomponent:" lines; ``added``/``modified``/``missing`` list resource paths.
    """

    def __init__(
        self,
        status: str,
        detail: str = "",
        *,
        architecture: str | None = None,
        subcomponent: str | None = None,
        added: Sequence[str] = (),
        modified: Sequence[str] = (),
        missing: Sequence[str] = (),
    ) -> None:
        super().__init__(status)
        self.status = status
        self.detail = detail
        self.architecture = architecture
        self.subcomponent = subcomponent
        self.added = tuple(added)
        self.modified = tuple(modified)
        self.missing = tuple(missing)

    def lines(self) -> list[str]:
        """The lines after ``<path>: <status>``: location, resource lists, then the detail."""
        out = []
        if self.subcomponent:
            out.append(f"In subcomponent: {self.subcomponent}")
        if self.architecture:
            out.append(f"In architecture: {self.architecture}")
        out += [f"file added: {path}" for path in self.added]
        out += [f"file modified: {path}" for path in self.modified]
        out += [f"file missing: {path}" for path in self.missing]
        if self.detail:
            out.append(self.detail)
        return out

    def within(
        self, *, architecture: str | None = None, subcomponent: str | None = None
    ) -> CodeVerificationError:
        """The same failure located in a slice or nested piece of code (outermost location kept)."""
        return self.replaced(
            architecture=self.architecture or architecture, subcomponent=self.subcomponent or subcomponent
        )

    def replaced(self, **changes: Any) -> CodeVerificationError:
        """A copy of this error (of the same class) with some of its fields changed."""
        error = copy.copy(self)
        for name, value in changes.items():
            if name not in ("status", "detail", "architecture", "subcomponent", "added", "modified", "missing"):
                raise TypeError(f"CodeVerificationError has no field {name!r}")
            setattr(error, name, tuple(value) if name in ("added", "modified", "missing") else value)
        error.args = (error.status,)
        error.message = error.status
        return error


class NotSignedError(CodeVerificationError):
    def __init__(self, detail: str = "", **location: Any) -> None:
        super().__init__(UNSIGNED, detail, **location)


class RequirementSyntaxError(UsageError):
    """A requirement given with ``-R`` cannot be compiled."""


# --- requirements: context and evaluation ---------------------------------------------------------


@dataclass(frozen=True)
class RequirementContext:
    """What a code requirement is evaluated against."""

    identifier: str
    certificates: tuple[x509.Certificate, ...] = ()  # leaf first, up to the anchor
    trusted: bool = False  # the chain ends at a configured anchor
    anchors: tuple[x509.Certificate, ...] = ()
    info: Mapping[str, Any] | None = None
    entitlements: Mapping[str, Any] | None = None
    cdhashes: frozenset[bytes] = frozenset()  # 20-byte cdhashes of every CodeDirectory
    platform: int = 0
    apple_roots: frozenset[bytes] = APPLE_ROOT_FINGERPRINTS

    def certificate(self, slot: int) -> x509.Certificate | None:
        if not self.certificates:
            return None
        index = slot if slot >= 0 else len(self.certificates) + slot
        if 0 <= index < len(self.certificates):
            return self.certificates[index]
        return None

    @property
    def apple_anchored(self) -> bool:
        anchor = self.certificate(ANCHOR_CERT)
        return (
            self.trusted
            and anchor is not None
            and anchor.fingerprint(hashes.SHA256()) in self.apple_roots
        )


def evaluate(expr: Expr, context: RequirementContext) -> bool:
    """Whether ``context`` satisfies the requirement ``expr``."""
    op, args = expr.op, expr.args
    if op == Op.AND:
        return evaluate(args[0], context) and evaluate(args[1], context)
    if op == Op.OR:
        return evaluate(args[0], context) or evaluate(args[1], context)
    if op == Op.NOT:
        return not evaluate(args[0], context)
    if op == Op.TRUE:
        return True
    if op == Op.FALSE:
        return False
    if op == Op.IDENT:
        return args[0] == context.identifier.encode()
    if op in (Op.APPLE_ANCHOR, Op.APPLE_GENERIC_ANCHOR):
        return context.apple_anchored
    if op == Op.ANCHOR_HASH:
        certificate = context.certificate(args[0])
        return certificate is not None and _sha1(certificate) == args[1]
    if op == Op.TRUSTED_CERT:
        certificate = context.certificate(args[0])
        return certificate is not None and certificate in context.anchors
    if op == Op.TRUSTED_CERTS:
        return context.trusted
    if op == Op.CDHASH:
        return bytes(args[0]) in context.cdhashes
    if op == Op.INFO_KEY_VALUE:
        value = (context.info or {}).get(args[0].decode(errors="replace"))
        return isinstance(value, str) and value.encode() == args[1]
    if op == Op.INFO_KEY_FIELD:
        return _match_value((context.info or {}).get(args[0].decode(errors="replace")), args[1])
    if op == Op.ENTITLEMENT_FIELD:
        return _match_value((context.entitlements or {}).get(args[0].decode(errors="replace")), args[1])
    if op == Op.CERT_FIELD:
        return _certificate_field(context.certificate(args[0]), args[1].decode(errors="replace"), args[2])
    if op == Op.CERT_GENERIC:
        return _certificate_extension(context.certificate(args[0]), oid_from_der(args[1]), args[2])
    if op == Op.CERT_POLICY:
        return _certificate_policy(context.certificate(args[0]), oid_from_der(args[1]), args[2])
    if op == Op.PLATFORM:
        return context.platform == args[0]
    # notarized, legacy, named anchors and code, certificate dates: nothing here can vouch for them.
    if op & OPCODE_FLAG_DEFAULT_FALSE:
        return False
    return bool(op & OPCODE_FLAG_MASK)  # an unknown opcode Apple marks skippable


def _sha1(certificate: x509.Certificate) -> bytes:
    return certificate.fingerprint(hashes.SHA1())  # noqa: S303 - the requirement language's hash


def _match_value(value: Any, match: Match) -> bool:
    if match.op == MatchOp.EXISTS:
        return value is not None
    if match.op == MatchOp.ABSENT:
        return value is None
    if value is None:
        return False
    if isinstance(value, list | tuple):
        return any(_match_value(item, match) for item in value)
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, bytes):
        text = value.decode(errors="replace")
    else:
        text = str(value)
    wanted = bytes(match.value or b"").decode(errors="replace") if not isinstance(match.value, int) else ""
    if match.op == MatchOp.EQUAL:
        return text == wanted
    if match.op == MatchOp.CONTAINS:
        return wanted in text
    if match.op == MatchOp.BEGINS_WITH:
        return text.startswith(wanted)
    if match.op == MatchOp.ENDS_WITH:
        return text.endswith(wanted)
    comparisons = {
        MatchOp.LESS_THAN: text < wanted,
        MatchOp.GREATER_THAN: text > wanted,
        MatchOp.LESS_EQUAL: text <= wanted,
        MatchOp.GREATER_EQUAL: text >= wanted,
    }
    return comparisons.get(match.op, False)


def _certificate_field(certificate: x509.Certificate | None, name: str, match: Match) -> bool:
    if certificate is None:
        return False
    part, _, attribute = name.partition(".")
    if part not in ("subject", "issuer") or attribute.upper() not in _CERT_FIELDS:
        return False
    subject = certificate.subject if part == "subject" else certificate.issuer
    values = [str(item.value) for item in subject.get_attributes_for_oid(_CERT_FIELDS[attribute.upper()])]
    if match.op == MatchOp.ABSENT:
        return not values
    if not values:
        return False
    return any(_match_value(value, match) for value in values)


def _certificate_extension(certificate: x509.Certificate | None, oid: str, match: Match) -> bool:
    if certificate is None:
        return False
    present = any(extension.oid.dotted_string == oid for extension in certificate.extensions)
    if match.op == MatchOp.ABSENT:
        return not present
    return present and match.op == MatchOp.EXISTS


def _certificate_policy(certificate: x509.Certificate | None, oid: str, match: Match) -> bool:
    if certificate is None:
        return False
    try:
        policies = certificate.extensions.get_extension_for_class(x509.CertificatePolicies).value
    except x509.ExtensionNotFound:
        return match.op == MatchOp.ABSENT
    present = any(policy.policy_identifier.dotted_string == oid for policy in policies)
    return present if match.op != MatchOp.ABSENT else not present


# --- requirements: the text language --------------------------------------------------------------


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


@dataclass
class _Token:
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


# --- Mach-O ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyOptions:
    """How to verify: the trust anchors, the time, ``--strict``, ``--deep``, ``-R``, ``-a``, and
    ``--check-expiry`` (expired certificates fail unless a timestamp falls within their validity;
    without it, as in Apple's codesign, expiry alone fails nothing)."""

    anchors: tuple[x509.Certificate, ...] = ()
    at: datetime | None = None
    strict: bool = False
    deep: bool = False
    requirement: Expr | None = None
    architecture: str | None = None
    apple_roots: frozenset[bytes] = APPLE_ROOT_FINGERPRINTS
    check_expiry: bool = False


@dataclass(frozen=True)
class SliceVerdict:
    """One slice that passed: its signature, the CMS and the trust verdict."""

    macho: MachO | None  # None for a detached signature
    signature: EmbeddedSignature
    cms: cms.ParsedSignature | None
    trust: TrustResult | None
    timestamp: datetime | None

    @property
    def directory(self) -> CodeDirectory:
        return preferred_directory(self.signature.code_directories)


@dataclass(frozen=True)
class Verdict:
    """The result of verifying one piece of code that is valid on disk."""

    path: Path
    identifier: str
    format: str
    designated: Expr
    satisfies_designated: bool
    satisfies_requirement: bool | None  # None when no -R requirement was given
    cdhash: bytes  # of the preferred slice's preferred CodeDirectory (what a parent's seal records)
    slices: tuple[SliceVerdict, ...] = field(repr=False)
    nested: tuple[Verdict, ...] = field(default=(), repr=False)

    @property
    def designated_text(self) -> str:
        return render(self.designated)


@dataclass(frozen=True)
class BoundFiles:
    """What a bundle binds into its main executable's signature (slots 1 and 3)."""

    info_plist: bytes | None = None
    code_resources: bytes | None = None
    is_bundle: bool = False


def verify_macho_bytes(
    data: bytes,
    options: VerifyOptions,
    *,
    bound: BoundFiles = BoundFiles(),
    executor: Executor | None = None,
) -> tuple[MachOFile, list[SliceVerdict]]:
    """Check every slice of a Mach-O file; raise :class:`CodeVerificationError` on the first failure."""
    try:
        parsed = parse_file(data)
    except MachOError as exc:
        raise CodeVerificationError(MODIFIED, f"the Mach-O file is malformed: {exc}") from None
    signatures: list[tuple[MachO, EmbeddedSignature | None]] = []
    for macho in parsed.slices:
        try:
            signatures.append((macho, read_signature(macho)))
        except (CodeSignatureFormatError, ValueError) as exc:
            raise CodeVerificationError(
                MODIFIED, f"the embedded signature cannot be read: {exc}", architecture=_arch(parsed, macho)
            ) from None
    if all(signature is None for _, signature in signatures):
        raise NotSignedError()
    _check_fat_padding(data, parsed)
    verdicts = []
    for macho, signature in signatures:
        where = _arch(parsed, macho)
        if signature is None:
            raise NotSignedError(f"the {macho.arch} slice has no signature", architecture=where)
        try:
            verdicts.append(_verify_slice(macho, signature, options, bound, executor))
        except CodeVerificationError as error:
            raise error.within(architecture=where) from None
    identifiers = {verdict.directory.identifier for verdict in verdicts}
    if len(identifiers) > 1:
        raise CodeVerificationError(
            MODIFIED, f"the slices are signed with different identifiers: {', '.join(sorted(identifiers))}"
        )
    return parsed, verdicts


def _check_fat_padding(data: bytes, parsed: MachOFile) -> None:
    """Bytes of a universal file outside its slices are zero (nothing else could vouch for them)."""
    if parsed.fat_arches is None:
        return
    entry_size = 32 if parsed.fat64 else 20
    position = 8 + entry_size * len(parsed.fat_arches)
    for arch in sorted(parsed.fat_arches, key=lambda item: item.offset):
        if any(data[position : arch.offset]):
            raise CodeVerificationError(
                MODIFIED,
                f"the padding before the {arch.arch} slice (bytes {position}-{arch.offset - 1}) is not zero",
            )
        position = arch.end
    if any(data[position:]):
        raise CodeVerificationError(MODIFIED, f"{len(data) - position} bytes follow the last slice")


def _arch(parsed: MachOFile, macho: MachO) -> str | None:
    return macho.arch if parsed.is_universal else None


def _verify_slice(
    macho: MachO,
    signature: EmbeddedSignature,
    options: VerifyOptions,
    bound: BoundFiles,
    executor: Executor | None,
) -> SliceVerdict:
    directories = signature.code_directories
    primary = directories[0]
    assert macho.code_signature is not None
    signature_start = macho.code_signature.dataoff
    _check_signature_space(macho, signature)
    trust = None
    timestamp = None
    # The CMS first: when a CodeDirectory was altered, that is what the user should hear.
    parsed_cms = check_signer(signature)
    for directory in directories:
        _check_directory_fields(directory, primary, signature_start)
        check_special_slots(directory, signature, macho.info_plist, bound)
    check_unsealed_blobs(signature, directories)
    if parsed_cms is not None:
        timestamp = check_timestamp(parsed_cms, options)
        trust = check_trust(parsed_cms, options, timestamp)

    code = memoryview(macho.data)[:signature_start]
    for directory in directories:
        check_pages(code, directory, executor)
    return SliceVerdict(macho, signature, parsed_cms, trust, timestamp)


def _check_signature_space(macho: MachO, signature: EmbeddedSignature) -> None:
    """Every byte of the space LC_CODE_SIGNATURE reserves is a blob, the SuperBlob's header and
    index, or zero (alignment between blobs, padding after the SuperBlob); nothing follows it."""
    assert macho.code_signature is not None
    raw = macho.signature_data or b""
    length = int.from_bytes(raw[4:8], "big")
    ranges = [(0, 12 + 8 * len(signature.superblob.entries))]
    for number, (_, blob) in enumerate(signature.superblob.entries):
        offset = int.from_bytes(raw[12 + 8 * number + 4 : 12 + 8 * number + 8], "big")
        ranges.append((offset, offset + len(blob)))
    position = 0
    for start, end in [*sorted(ranges), (len(raw), len(raw))]:
        if start > position and any(raw[position:start]):
            stray = position + next(i for i, byte in enumerate(raw[position:start]) if byte)
            where = "after the embedded signature" if stray >= length else "between its blobs"
            raise CodeVerificationError(
                MODIFIED, f"byte {stray} of the signature space ({where}) is not zero padding"
            )
        position = max(position, end)
    if len(macho.data) > macho.code_signature.end:
        extra = len(macho.data) - macho.code_signature.end
        raise CodeVerificationError(MODIFIED, f"{extra} bytes follow the code signature")


def _check_directory_fields(directory: CodeDirectory, primary: CodeDirectory, signature_start: int) -> None:
    name = directory.hash_type.name.lower()
    if directory.code_limit != signature_start:
        raise CodeVerificationError(
            MODIFIED,
            f"the {name} CodeDirectory covers {directory.code_limit} bytes of code, but the signature "
            f"starts at {signature_start}",
        )
    if directory.page_size and directory.page_size & (directory.page_size - 1):
        raise CodeVerificationError(
            MODIFIED, f"the {name} CodeDirectory's page size {directory.page_size} is invalid"
        )
    expected_pages = page_count(directory.code_limit, directory.page_size)
    if len(directory.code_hashes) != expected_pages:
        raise CodeVerificationError(
            MODIFIED,
            f"the {name} CodeDirectory holds {len(directory.code_hashes)} page hashes "
            f"for {expected_pages} pages",
        )
    if directory is not primary and (
        directory.identifier != primary.identifier
        or directory.team_id != primary.team_id
        or directory.flags != primary.flags
        or directory.code_limit != primary.code_limit
    ):
        raise CodeVerificationError(
            MODIFIED, f"the alternate {name} CodeDirectory disagrees with the primary one"
        )


def check_special_slots(
    directory: CodeDirectory, signature: EmbeddedSignature, embedded_info_plist: bytes | None, bound: BoundFiles
) -> None:
    """Slots 1 (Info.plist), 3 (CodeResources) and the blob slots against what they bind."""
    hash_type = directory.hash_type
    name = hash_type.name.lower()
    slots = directory.special_slots

    info_plist = bound.info_plist if bound.is_bundle else embedded_info_plist
    if Slot.INFO_PLIST in slots:
        if info_plist is None:
            raise CodeVerificationError(
                INFO_PLIST_FAILED, "the signature binds an Info.plist, but the code has none"
            )
        if hash_type.digest(info_plist) != slots[Slot.INFO_PLIST]:
            raise CodeVerificationError(
                INFO_PLIST_FAILED,
                f"the Info.plist does not match its hash in the {name} CodeDirectory (slot 1)",
            )
    elif bound.is_bundle and info_plist is not None:
        raise CodeVerificationError(
            INFO_PLIST_FAILED, "the bundle's Info.plist is not bound by the signature"
        )

    if Slot.RESOURCE_DIR in slots:
        if bound.code_resources is None:
            raise CodeVerificationError(
                RESOURCES_NOT_FOUND,
                "the signature seals resources (slot 3), but _CodeSignature/CodeResources is missing",
            )
        if hash_type.digest(bound.code_resources) != slots[Slot.RESOURCE_DIR]:
            raise CodeVerificationError(
                RESOURCE_DIRECTORY_FAILED,
                f"_CodeSignature/CodeResources does not match its hash in the {name} CodeDirectory (slot 3)",
            )
    elif bound.is_bundle and bound.code_resources is not None:
        raise CodeVerificationError(
            RESOURCES_NOT_SEALED, "_CodeSignature/CodeResources is not bound by the signature"
        )

    for slot in _EMBEDDED_SLOTS:
        blob = signature.superblob.get(slot)
        wanted = slots.get(slot)
        if wanted is None:
            continue
        label = Slot(slot).name.lower().replace("_", " ")
        if blob is None:
            raise CodeVerificationError(
                MODIFIED,
                f"the {name} CodeDirectory seals the {label} (slot {int(slot)}), but the blob is missing",
            )
        if hash_type.digest(blob) != wanted:
            raise CodeVerificationError(
                MODIFIED,
                f"the {label} blob does not match its hash in the {name} CodeDirectory (slot {int(slot)})",
            )


def check_unsealed_blobs(signature: EmbeddedSignature, directories: Sequence[CodeDirectory]) -> None:
    for slot in _EMBEDDED_SLOTS:
        if signature.superblob.get(slot) is None:
            continue
        for directory in directories:
            if slot not in directory.special_slots:
                label = Slot(slot).name.lower().replace("_", " ")
                raise CodeVerificationError(
                    MODIFIED,
                    f"the signature holds a {label} blob that the {directory.hash_type.name.lower()} "
                    "CodeDirectory does not seal",
                )


def check_pages(code: memoryview, directory: CodeDirectory, executor: Executor | None) -> None:
    actual = hash_code(code, directory.hash_type, directory.page_size, executor)
    if actual == list(directory.code_hashes):
        return
    pairs = enumerate(zip(actual, directory.code_hashes, strict=True))
    page = next(index for index, (ours, stored) in pairs if ours != stored)
    size = directory.page_size or len(code)
    start = page * size
    end = min(start + size, len(code)) - 1
    raise CodeVerificationError(
        MODIFIED,
        f"code page {page} (bytes {start}-{end}) does not match its hash in the "
        f"{directory.hash_type.name.lower()} CodeDirectory",
    )


_HASH_TYPE_ALGORITHMS = {
    HashType.SHA1: "sha1",
    HashType.SHA256: "sha256",
    HashType.SHA256_TRUNCATED: "sha256",
    HashType.SHA384: "sha384",
    HashType.SHA512: "sha512",
}


def check_signer(signature: EmbeddedSignature) -> cms.ParsedSignature | None:
    """Ad hoc (no CMS) or signed (a CMS over the CodeDirectories that checks out). It comes first:
    when a CodeDirectory was altered, that is what the user should hear."""
    directories = signature.code_directories
    if directories[0].flags & CodeDirectoryFlags.ADHOC:
        if signature.cms:
            raise CodeVerificationError(MODIFIED, "the signature is marked ad hoc but carries a CMS signature")
        return None
    if not signature.cms:
        raise CodeVerificationError(
            MODIFIED, "the CodeDirectory is not marked ad hoc, but the signature carries no CMS signature"
        )
    return check_cms(signature.cms, directories)


def check_cms(der: bytes, directories: Sequence[CodeDirectory]) -> cms.ParsedSignature:
    primary = directories[0]
    try:
        parsed = cms.parse_signed_data(der)
        verify_detached(parsed, content=primary.blob, content_name="the CodeDirectory")
    except SignbridgeError as exc:
        raise CodeVerificationError(MODIFIED, f"the CMS signature does not check out: {exc}") from None
    if parsed.cdhashes is not None:
        expected = [directory.cdhash() for directory in directories]
        if list(parsed.cdhashes) != expected:
            raise CodeVerificationError(
                MODIFIED,
                "the CDHashes attribute of the CMS signature does not list this signature's CodeDirectories",
            )
    if parsed.cdhashes2 is not None:
        expected2 = sorted((_HASH_TYPE_ALGORITHMS[d.hash_type], d.full_hash()) for d in directories)
        listed = sorted((algorithm.hashlib_name, digest) for algorithm, digest in parsed.cdhashes2)
        if listed != expected2:
            raise CodeVerificationError(
                MODIFIED,
                "the CDHashes2 attribute of the CMS signature does not match the CodeDirectories",
            )
    if len(directories) > 1 and parsed.cdhashes is None and parsed.cdhashes2 is None:
        raise CodeVerificationError(
            MODIFIED, "the CMS signature covers only the primary CodeDirectory; the alternates are unsigned"
        )
    return parsed


def check_timestamp(parsed: cms.ParsedSignature, options: VerifyOptions) -> datetime | None:
    if parsed.timestamp is None:
        return None
    try:
        return cms.check_timestamp(parsed, list(options.anchors) or None)
    except cms.TimestampMismatch as exc:
        if "not valid" in str(exc) and "imprint" not in str(exc):
            raise CodeVerificationError(NOT_TRUSTED, f"the timestamp is not trusted: {exc}") from None
        raise CodeVerificationError(MODIFIED, str(exc)) from None
    except SignbridgeError as exc:
        raise CodeVerificationError(MODIFIED, f"the timestamp does not check out: {exc}") from None


def check_trust(
    parsed: cms.ParsedSignature, options: VerifyOptions, timestamp: datetime | None
) -> TrustResult:
    result = evaluate_chain(
        parsed.signer_certificate,
        parsed.chain,
        options.anchors,
        at=options.at,
        purpose=Purpose.CODE,
        timestamp_time=timestamp,
        apple_roots=options.apple_roots,
        allow_expired=not options.check_expiry,
    )
    if result.ok:
        return result
    problems = "; ".join(result.problems)
    if any(" expired on " in problem for problem in result.problems):
        raise CodeVerificationError(CERT_EXPIRED, problems)
    if any(" is not valid until " in problem for problem in result.problems):
        raise CodeVerificationError(CERT_NOT_VALID_YET, problems)
    raise CodeVerificationError(NOT_TRUSTED, problems)


# --- contexts, designated requirements, verdicts --------------------------------------------------


def requirement_context(
    slice_verdict: SliceVerdict,
    options: VerifyOptions,
    *,
    info_plist: bytes | None,
) -> RequirementContext:
    """What requirements about this slice are evaluated against."""
    signature = slice_verdict.signature
    directory = slice_verdict.directory
    certificates: tuple[x509.Certificate, ...] = ()
    trusted = False
    if slice_verdict.trust is not None:
        certificates = slice_verdict.trust.chain
        trusted = slice_verdict.trust.ok
    elif slice_verdict.cms is not None:
        certificates = (slice_verdict.cms.signer_certificate, *slice_verdict.cms.chain)
    return RequirementContext(
        identifier=directory.identifier,
        certificates=certificates,
        trusted=trusted,
        anchors=tuple(options.anchors),
        info=plist_dict(info_plist),
        entitlements=entitlements_of(signature),
        cdhashes=frozenset(d.cdhash() for d in signature.code_directories),
        platform=directory.platform,
        apple_roots=options.apple_roots,
    )


def entitlements_of(signature: EmbeddedSignature) -> dict[str, Any] | None:
    """The entitlements dictionary (XML blob preferred, else the DER one)."""
    try:
        if signature.entitlements is not None:
            return load_entitlements(decode_blob(signature.entitlements)[1])
        if signature.der_entitlements is not None:
            return parse_der_entitlements_blob(signature.der_entitlements)
    except (EntitlementsError, CodeSignatureFormatError):
        return None
    return None


def designated_of(slice_verdict: SliceVerdict, options: VerifyOptions) -> Expr:
    """The designated requirement: explicit in the requirement set, else the one Apple derives
    (``cdhash H"..."`` for ad-hoc code)."""
    requirements = slice_verdict.signature.requirements
    if requirements:
        try:
            explicit = parse_requirement_set(requirements).get(RequirementType.DESIGNATED)
        except CodeSignatureFormatError as exc:
            raise CodeVerificationError(
                BAD_REQUIREMENT, f"the internal requirements cannot be read: {exc}"
            ) from None
        if explicit is not None:
            return explicit
    directory = slice_verdict.directory
    certificates: tuple[x509.Certificate, ...] = ()
    if slice_verdict.trust is not None:
        certificates = slice_verdict.trust.chain
    derived = designated_requirement(directory.identifier, certificates, apple_roots=options.apple_roots)
    if derived is None:
        return Expr(Op.CDHASH, (directory.cdhash(),))
    return derived


def verify_macho_path(
    path: Path,
    options: VerifyOptions,
    *,
    bound: BoundFiles = BoundFiles(),
    executor: Executor | None = None,
    format_prefix: str = "",
) -> Verdict:
    """Verify a Mach-O file and evaluate its designated requirement (and ``-R``)."""
    data = read_code_file(path)
    parsed, verdicts = verify_macho_bytes(data, options, bound=bound, executor=executor)
    chosen = preferred_slice(parsed, options.architecture)
    slice_verdict = next(verdict for verdict in verdicts if verdict.macho is chosen)
    info_plist = bound.info_plist if bound.is_bundle else chosen.info_plist
    context = requirement_context(slice_verdict, options, info_plist=info_plist)
    designated = designated_of(slice_verdict, options)
    satisfied = evaluate(designated, context)
    explicit = evaluate(options.requirement, context) if options.requirement is not None else None
    return Verdict(
        path=path,
        identifier=slice_verdict.directory.identifier,
        format=format_prefix + macho_format(parsed),
        designated=designated,
        satisfies_designated=satisfied,
        satisfies_requirement=explicit,
        cdhash=slice_verdict.directory.cdhash(),
        slices=tuple(verdicts),
    )


def read_code_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CodeVerificationError(MODIFIED, f"{path} cannot be read: {exc.strerror or exc}") from None


# --- the entry point ------------------------------------------------------------------------------


def verify_code(
    path: str | os.PathLike[str],
    options: VerifyOptions = VerifyOptions(),
    *,
    executor: Executor | None = None,
) -> Verdict:
    """Verify the Mach-O file, bundle or ``.ipa`` at ``path``.

    Returns the :class:`Verdict` for valid code (whose designated and ``-R`` requirements may
    still be unsatisfied); raises :class:`CodeVerificationError` (:class:`NotSignedError` for
    unsigned code), an :class:`~signbridge.apple.ipa.IpaError` or ``FileNotFoundError``.
    """
    target = Path(path)
    if not target.exists() and not target.is_symlink():
        raise FileNotFoundError(2, "No such file or directory", str(target))
    if executor is None:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            return verify_code(target, options, executor=pool)
    if target.is_dir() or is_ipa(target):
        # Bundles and archives are checked in verify_bundle.py, which builds on this module (a
        # Mach-O file needs none of the bundle readers it imports).
        from .verify_bundle import verify_bundle, verify_ipa

        verify = verify_bundle if target.is_dir() else verify_ipa
        return verify(target, options, executor=executor)
    return verify_macho_path(target, options, executor=executor)
