"""Evaluating a code requirement against signed code: its identifier, certificate chain and anchors,
cdhashes, Info.plist and entitlement keys, certificate fields, extensions and policies, platform.

What nothing here can vouch for (notarization, named anchors and code, certificate dates, legacy
Developer ID) is false, as are unknown opcodes unless Apple marks them skippable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from ...certificates import APPLE_ROOT_FINGERPRINTS, certificate_sha1, is_apple_root
from .binary import (
    ANCHOR_CERT,
    OPCODE_FLAG_DEFAULT_FALSE,
    OPCODE_FLAG_MASK,
    Expr,
    Match,
    MatchOp,
    Op,
    oid_from_der,
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
            and is_apple_root(anchor, self.apple_roots)
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
        return certificate is not None and certificate_sha1(certificate) == args[1]
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
