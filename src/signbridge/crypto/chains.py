"""Certificate chains: ordering a certificate's issuers, and validating a path to a trust anchor.

:func:`build_chain` orders the issuers of a certificate found among others (a token's certificates,
a signature's, an uploaded chain). :func:`validate_path` is the one path validation in signbridge:
it walks from a leaf through intermediates to an anchor, checks the signature of each certificate,
that every issuer is a CA allowed to sign certificates, that no certificate carries a critical
extension nobody evaluates, that each was valid at the time asked, and what the leaf is allowed to
sign (its :class:`Purpose`). It reports every rule a path breaks instead of stopping at the first.
Callers bring what is theirs: Apple's anchors and installer usages (:mod:`signbridge.apple.trust`),
the timestamping rules (:mod:`signbridge.crypto.timestamps`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID

from .names import common_name
from .signatures import CertificateSignatureError, verify_certificate_signature

MAX_CHAIN_LENGTH = 8

# Critical extensions the validator evaluates, or that constrain nothing a signature check needs.
_UNDERSTOOD_CRITICAL = frozenset(
    {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        ExtensionOID.CERTIFICATE_POLICIES,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    }
)


def unique_certificates(certificates: Iterable[x509.Certificate]) -> list[x509.Certificate]:
    """The certificates without repeats, in the order they first appear."""
    unique: list[x509.Certificate] = []
    for certificate in certificates:
        if certificate not in unique:
            unique.append(certificate)
    return unique


def describe(certificate: x509.Certificate) -> str:
    """A certificate as messages name it: its common name (else its subject), quoted."""
    return f'"{common_name(certificate) or "(no subject)"}"'


def _issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether ``issuer`` signed ``certificate`` (and is named as its issuer)."""
    try:
        verify_certificate_signature(certificate, issuer)
    except CertificateSignatureError:
        return False
    return True


def self_signed(certificate: x509.Certificate) -> bool:
    return certificate.subject == certificate.issuer and _issued_by(certificate, certificate)


# ---------------------------------------------------------------------------------------------
# Ordering


def build_chain(leaf: x509.Certificate, pool: Iterable[x509.Certificate]) -> tuple[x509.Certificate, ...]:
    """The issuers of ``leaf`` found in ``pool``, nearest first, up to a self-signed root.

    An issuer is taken only when its subject is the certificate's issuer and its key verifies the
    certificate's signature. The chain stops where no issuer is found.
    """
    candidates = [certificate for certificate in unique_certificates(pool) if certificate != leaf]
    chain: list[x509.Certificate] = []
    current = leaf
    while len(chain) < MAX_CHAIN_LENGTH and not self_signed(current):
        issuer = next((c for c in candidates if c not in chain and _issued_by(current, c)), None)
        if issuer is None:
            break
        chain.append(issuer)
        current = issuer
    return tuple(chain)


# ---------------------------------------------------------------------------------------------
# Validation


@dataclass(frozen=True)
class Purpose:
    """What the leaf must be allowed to sign: ``leaf_problems`` says why a certificate is not."""

    name: str
    leaf_problems: Callable[[x509.Certificate], list[str]]


def signing_key_usage_problems(leaf: x509.Certificate) -> list[str]:
    """A key usage, when present, must allow digital signatures."""
    try:
        key_usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return []
    if key_usage.digital_signature:
        return []
    return [f"the key usage of {describe(leaf)} does not allow digital signatures"]


def _code_signing_problems(leaf: x509.Certificate) -> list[str]:
    problems = signing_key_usage_problems(leaf)
    if ExtendedKeyUsageOID.CODE_SIGNING.dotted_string not in extended_key_usages(leaf):
        problems.append(
            f"{describe(leaf)} is not a code signing certificate (no codeSigning extended key usage)"
        )
    return problems


ANY_SIGNATURE = Purpose("any", signing_key_usage_problems)
CODE_SIGNING = Purpose("code", _code_signing_problems)


def extended_key_usages(certificate: x509.Certificate) -> set[str]:
    try:
        eku = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return set()
    return {oid.dotted_string for oid in eku}


@dataclass(frozen=True)
class PathResult:
    """The verdict on a path.

    ``chain`` runs from the leaf to the anchor when a path was found (else as far as it got);
    ``problems`` are sentences for the user, empty when ``ok``. ``timestamp_used`` says the path was
    accepted only because it was valid at the timestamp's time; ``expired`` lists the certificates
    accepted although they had expired (only when the caller allowed that); ``not_valid`` those that
    were valid at neither time; ``purpose_problems`` those of ``problems`` that say why the leaf may
    not sign for the purpose.
    """

    chain: tuple[x509.Certificate, ...]
    anchor: x509.Certificate | None
    problems: tuple[str, ...]
    timestamp_used: bool = False
    expired: tuple[x509.Certificate, ...] = ()
    not_valid: tuple[x509.Certificate, ...] = ()
    purpose_problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


def validate_path(
    leaf: x509.Certificate,
    intermediates: Iterable[x509.Certificate],
    anchors: Sequence[x509.Certificate],
    *,
    purpose: Purpose = ANY_SIGNATURE,
    at: datetime | None = None,
    timestamp_time: datetime | None = None,
    allow_expired: bool = False,
    ignore_critical: Callable[[str], bool] = lambda oid: False,
) -> PathResult:
    """Validate the paths from ``leaf`` through ``intermediates`` to one of ``anchors``; the first
    path that breaks no rule, else the first path found, else why none was found.

    Each link must be signed by the next certificate, every issuer must be a CA (basic constraints,
    path length, key usage), and no certificate may carry a critical extension that is neither
    evaluated here nor one ``ignore_critical`` (given the dotted OID) says constrains nothing. Every
    certificate must be valid at ``at`` (default now) or, failing that, at ``timestamp_time``, or
    have expired when ``allow_expired``. ``purpose`` judges the leaf. Naive times are UTC.
    """
    at = _utc(at) if at is not None else datetime.now(UTC)
    timestamp_time = _utc(timestamp_time) if timestamp_time is not None else None
    anchors = unique_certificates(anchors)
    pool = [certificate for certificate in unique_certificates(intermediates) if certificate != leaf]

    leaf_problems = purpose.leaf_problems(leaf)
    failures: list[str] = []
    longest: list[x509.Certificate] = [leaf]
    first: PathResult | None = None
    for path in _paths(leaf, pool, anchors, [leaf], failures, longest):
        problems: list[str] = []
        for index, issuer in enumerate(path[1:], start=1):
            problems += _issuer_problems(issuer, path[index - 1], intermediates_below=index - 1)
        for certificate in path:
            problems += _critical_extension_problems(certificate, ignore_critical)
        problems += leaf_problems
        validity, timestamp_used, expired, not_valid = _validity_problems(path, at, timestamp_time, allow_expired)
        problems += validity
        result = PathResult(
            tuple(path), path[-1], tuple(problems), timestamp_used, expired, not_valid, tuple(leaf_problems)
        )
        if result.ok:
            return result
        first = first or result
    if first is not None:
        return first
    problems = list(dict.fromkeys(failures)) or [f"no path from {describe(leaf)} to a trusted anchor was found"]
    return PathResult(tuple(longest), None, tuple(problems + leaf_problems), purpose_problems=tuple(leaf_problems))


def _paths(
    current: x509.Certificate,
    pool: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
    path: list[x509.Certificate],
    failures: list[str],
    longest: list[x509.Certificate],
) -> Iterator[list[x509.Certificate]]:
    """Every path from ``current`` up to an anchor whose signatures check out. ``failures`` collects
    why other paths ended; ``longest`` becomes the longest path tried."""
    if len(path) > len(longest):
        longest[:] = path
    if current in anchors:
        yield path
        return
    if len(path) >= MAX_CHAIN_LENGTH:
        failures.append(f"the chain is longer than {MAX_CHAIN_LENGTH} certificates")
        return
    issuers = [anchor for anchor in anchors if anchor.subject == current.issuer]
    issuers += [
        certificate
        for certificate in pool
        if certificate.subject == current.issuer and certificate not in anchors and certificate not in path
    ]
    for issuer in issuers:
        try:
            verify_certificate_signature(current, issuer)
        except CertificateSignatureError as exc:
            failures.append(f"{describe(current)} names {describe(issuer)} as its issuer, but {exc.reason}")
            continue
        yield from _paths(issuer, pool, anchors, [*path, issuer], failures, longest)
    if issuers:
        return
    if self_signed(current):
        failures.append(f"the chain ends at {describe(current)}, which is not a trusted anchor")
    else:
        failures.append(
            f"the certificate that issued {describe(current)} ({current.issuer.rfc4514_string() or '(no subject)'}) "
            "was not found among the signature's certificates or the trust anchors"
        )


def _issuer_problems(issuer: x509.Certificate, subject: x509.Certificate, intermediates_below: int) -> list[str]:
    try:
        constraints = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        return [f"{describe(issuer)} issued {describe(subject)} but is not a certification authority"]
    problems = []
    if constraints.path_length is not None and intermediates_below > constraints.path_length:
        problems.append(
            f"{describe(issuer)} allows {constraints.path_length} intermediate certificate(s) below it, "
            f"but the chain has {intermediates_below}"
        )
    try:
        key_usage = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        key_usage = None
    if key_usage is not None and not key_usage.key_cert_sign:
        problems.append(f"the key usage of {describe(issuer)} does not allow signing certificates")
    return problems


def _critical_extension_problems(certificate: x509.Certificate, ignore: Callable[[str], bool]) -> list[str]:
    problems = []
    for extension in certificate.extensions:
        oid = extension.oid
        if not extension.critical or oid in _UNDERSTOOD_CRITICAL or ignore(oid.dotted_string):
            continue
        name = getattr(oid, "_name", None)
        shown = oid.dotted_string if not name or name == "Unknown OID" else f"{name} ({oid.dotted_string})"
        problems.append(f"{describe(certificate)} has a critical extension signbridge does not evaluate: {shown}")
    return problems


def _validity_problems(
    path: list[x509.Certificate], at: datetime, timestamp_time: datetime | None, allow_expired: bool
) -> tuple[list[str], bool, tuple[x509.Certificate, ...], tuple[x509.Certificate, ...]]:
    """Each certificate must be valid at ``at`` or, failing that, at ``timestamp_time``, or have
    expired when ``allow_expired``. Returns the problems, whether any certificate needed the
    timestamp, the expired certificates that were let through and those that were not valid."""
    problems = []
    timestamp_used = False
    expired: list[x509.Certificate] = []
    not_valid: list[x509.Certificate] = []
    for certificate in path:
        if _valid_at(certificate, at):
            continue
        if timestamp_time is not None and _valid_at(certificate, timestamp_time):
            timestamp_used = True
            continue
        start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
        if allow_expired and at > end:
            expired.append(certificate)
            continue
        not_valid.append(certificate)
        if at > end:
            problem = f"{describe(certificate)} expired on {end:%Y-%m-%d %H:%M:%S} UTC"
        else:
            problem = f"{describe(certificate)} is not valid until {start:%Y-%m-%d %H:%M:%S} UTC"
        if timestamp_time is not None:
            problem += (
                f", and the timestamp ({timestamp_time:%Y-%m-%d %H:%M:%S} UTC) is not within its validity "
                f"({start:%Y-%m-%d} to {end:%Y-%m-%d})"
            )
        elif at > end:
            problem += "; an expired certificate is valid only with a timestamp within its validity"
        problems.append(problem)
    return problems, timestamp_used and not problems, tuple(expired), tuple(not_valid)


def _valid_at(certificate: x509.Certificate, when: datetime) -> bool:
    return certificate.not_valid_before_utc <= when <= certificate.not_valid_after_utc


def _utc(when: datetime) -> datetime:
    return when.astimezone(UTC) if when.tzinfo else when.replace(tzinfo=UTC)
