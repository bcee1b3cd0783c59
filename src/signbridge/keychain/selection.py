"""Selecting the one identity a name designates, as ``codesign -s`` and ``productsign --sign`` do.

    identity = select_identity("Developer ID Application", usage=Usage.CODE)
    signature = identity.sign(SignatureRequest(digest, HashAlgorithm.SHA256, Scheme.RSA_PKCS1))

The rules:

- 40 hex digits are a SHA-1 fingerprint and 64 hex digits a SHA-256 fingerprint of the certificate
  (either case); the name is not considered then.
- Anything else is matched against the certificate's common name, case-sensitively, as Apple's
  tools do: an identity whose common name equals the text wins; otherwise every identity whose
  common name contains it matches (so a team id such as ``TEAM123456`` matches
  ``Developer ID Application: Test Corp (TEAM123456)``).
- With ``usage`` only identities of that kind are candidates, so a team id alone selects the
  installer certificate for productsign and the application certificate for codesign.
- Certificates outside their validity period are passed over (Apple's codesign reports them as
  "no identity found"), so an expired certificate never makes its renewal ambiguous.
- Several remaining matches are an :class:`AmbiguousIdentityError` listing them; the same
  certificate served by two tokens is ambiguous too (choose the token).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime

from ..apple.certificates import Usage
from ..apple.certificates import usage as usage_of
from ..crypto.identity import Identity
from ..errors import NotFoundError, SignbridgeError
from ..provider.registry import TokenRecord
from .discovery import discover, time_problem

_SHA1 = re.compile(r"[0-9A-Fa-f]{40}")
_SHA256 = re.compile(r"[0-9A-Fa-f]{64}")


class NoIdentityError(NotFoundError):
    """No identity matches the name."""

    def __init__(self, message: str, name: str) -> None:
        super().__init__(message)
        self.name = name


class UnsuitableIdentityError(NoIdentityError):
    """The name matches identities, but only of another kind than the operation needs."""

    def __init__(self, message: str, name: str, candidates: Sequence[Identity]) -> None:
        super().__init__(message, name)
        self.candidates = tuple(candidates)


class AmbiguousIdentityError(SignbridgeError):
    """The name matches several identities; ``candidates`` lists them."""

    def __init__(self, name: str, candidates: Sequence[Identity]) -> None:
        self.name = name
        self.candidates = tuple(candidates)
        super().__init__(f"{name}: ambiguous (matches {_describe_candidates(self.candidates)})")


def select_identity(
    name: str,
    *,
    usage: Usage | None,
    tokens: Sequence[TokenRecord] | None = None,
    now: datetime | None = None,
) -> Identity:
    """The one identity ``name`` designates (see the module documentation for the rules).

    The candidates are the identities of ``tokens`` (default: every running token). ``usage`` is
    what the caller will sign: :attr:`Usage.CODE` for codesign, :attr:`Usage.INSTALLER` for
    productsign, None for anything.

    Raises :class:`NoTokenError`, :class:`NoIdentityError` (:class:`UnsuitableIdentityError`
    when the name matches only identities of another kind) or :class:`AmbiguousIdentityError`.
    """
    found = discover(tokens=tokens)
    identities, problems = found.identities, found.problems
    suitable = [identity for identity in identities if usage is None or usage_of(identity.certificate) is usage]
    matched = _matching(name, suitable)
    if not matched:
        others = _matching(name, [identity for identity in identities if identity not in suitable])
        if others and usage is not None:
            raise UnsuitableIdentityError(_unsuitable_message(name, usage, others), name, others)
        raise NoIdentityError(_with_problems(f"{name}: no identity found", problems), name)
    when = now or datetime.now(UTC)
    current = [identity for identity in matched if time_problem(identity.certificate, when) is None]
    if not current:
        reasons = "; ".join(_outside_validity(identity, when) for identity in matched)
        raise NoIdentityError(f"{name}: no identity found ({reasons})", name)
    if len(current) > 1:
        raise AmbiguousIdentityError(name, current)
    return current[0]


def _matching(name: str, identities: Sequence[Identity]) -> list[Identity]:
    if _SHA1.fullmatch(name):
        return [identity for identity in identities if identity.sha1 == name.upper()]
    if _SHA256.fullmatch(name):
        return [identity for identity in identities if identity.sha256 == name.upper()]
    if not name:
        return []
    exact = [identity for identity in identities if identity.common_name == name]
    return exact or [identity for identity in identities if name in identity.common_name]


def _unsuitable_message(name: str, usage: Usage, others: Sequence[Identity]) -> str:
    kinds = {usage_of(identity.certificate) for identity in others}
    if usage is Usage.CODE:
        why = (
            "it is an installer identity"
            if kinds == {Usage.INSTALLER}
            else "its certificate is not for code signing"
        )
        return (
            f"{name}: this identity cannot be used for signing code ({why}; "
            "a code signing identity such as Developer ID Application is needed)"
        )
    if usage is Usage.INSTALLER:
        what = (
            "application signing identities"
            if kinds == {Usage.CODE}
            else "identities that are not for installer signing"
        )
        return (
            f'"{name}" matches only {what}. An installer signing identity (not an application '
            "signing identity) is required for signing flat-style products."
        )
    return f"{name}: no identity for {usage.value} found"


def _outside_validity(identity: Identity, when: datetime) -> str:
    certificate = identity.certificate
    which = f'"{identity.common_name}" in {identity.source}'
    if when < certificate.not_valid_before_utc:
        return f"{which} is not valid before {_date(certificate.not_valid_before_utc)}"
    return f"{which} expired on {_date(certificate.not_valid_after_utc)}"


def _date(when: datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")


def _with_problems(message: str, problems: Sequence[str]) -> str:
    return message if not problems else f"{message} ({'; '.join(problems)})"


def _describe_candidates(candidates: Sequence[Identity]) -> str:
    sources = list(dict.fromkeys(identity.source for identity in candidates))
    names = [f'"{identity.common_name}"' for identity in candidates]
    if len(sources) == 1:
        return f"{_and(names)} in {sources[0]}"
    return _and([f"{name} in {identity.source}" for name, identity in zip(names, candidates, strict=True)])


def _and(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"
