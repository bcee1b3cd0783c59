"""The identities the running tokens hold, with their chains, and whether Apple would list them.

Each running token (see :mod:`signbridge.provider.registry`) is asked over its socket, with the
pure-Python PKCS#11 client, for its certificates and private keys. A certificate with a private
key of the same CKA_ID is an identity; its chain is built from the token's other certificates
(the authority objects), and its :attr:`~signbridge.identity.Identity.sign` is a
:class:`~signbridge.keychain.key.TokenKey`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from ..identity import Identity
from ..pkcs11 import CKA, CKO, Pkcs11Client, Pkcs11Error, Pkcs11Object
from ..pkcs11.constants import CATEGORY_AUTHORITY
from ..provider.registry import TokenRecord
from ..signatures import CertificateSignatureError, verify_certificate_signature
from .key import DEFAULT_PIN, TokenAccessError, TokenKey, log_in
from .tokens import find_tokens

log = logging.getLogger("signbridge.keychain")

LIST_TIMEOUT = 30.0  # seconds for one answer while listing
MAX_CHAIN = 8

_FINGERPRINT = hashes.SHA256()


@dataclass(frozen=True)
class Discovery:
    """What the tokens hold: their identities, and one line per token that could not be read."""

    identities: tuple[Identity, ...]
    problems: tuple[str, ...] = ()


def discover(*, tokens: Sequence[TokenRecord] | None = None, pin: str = DEFAULT_PIN) -> Discovery:
    """The identities of ``tokens`` (default: every running token, :class:`NoTokenError` if none).

    A token that cannot be read is reported in ``problems`` and the others are still listed.
    """
    records = find_tokens() if tokens is None else list(tokens)
    identities: list[Identity] = []
    problems: list[str] = []
    for record in records:
        try:
            identities.extend(_token_identities(record, pin))
        except (Pkcs11Error, TokenAccessError) as exc:
            log.warning("token %s could not be read: %s", record.name, exc)
            problems.append(f"token {record.name} could not be read: {exc}")
    return Discovery(tuple(identities), tuple(problems))


def _token_identities(record: TokenRecord, pin: str) -> list[Identity]:
    with Pkcs11Client.connect(record.socket, timeout=LIST_TIMEOUT) as client:
        identities = []
        for slot in client.slots():
            label = client.token_info(slot).label
            log_in(client, slot, record.name, pin)
            identities.extend(_slot_identities(client, slot, record, label, pin))
        return identities


def _slot_identities(
    client: Pkcs11Client, slot: int, record: TokenRecord, label: str, pin: str
) -> list[Identity]:
    keys = {key.id for key in client.objects(slot, object_class=CKO.PRIVATE_KEY) if key.id}
    leaves: list[tuple[Pkcs11Object, x509.Certificate]] = []
    pool: list[x509.Certificate] = []
    for obj in client.certificates(slot):
        der = obj.attributes.get(CKA.VALUE)
        try:
            certificate = x509.load_der_x509_certificate(bytes(der or b""))  # type: ignore[arg-type]
        except ValueError:
            log.warning("token %s: certificate object %r is not X.509 DER; skipped", record.name, obj.label)
            continue
        category = obj.attributes.get(CKA.CERTIFICATE_CATEGORY)
        if category != CATEGORY_AUTHORITY and obj.id in keys:
            leaves.append((obj, certificate))
        else:
            pool.append(certificate)
    identities = []
    for obj, certificate in leaves:
        signer = TokenKey(record.name, record.socket, label, obj.id, certificate, pin)
        chain = build_chain(certificate, pool)
        identities.append(Identity(certificate, chain, signer, record.name))
    return identities


# --- chains and validity ------------------------------------------------------------------------


def build_chain(leaf: x509.Certificate, pool: Iterable[x509.Certificate]) -> tuple[x509.Certificate, ...]:
    """The issuers of ``leaf`` found in ``pool``, nearest first, up to a self-signed root.

    An issuer is taken only when its subject is the certificate's issuer and its key verifies the
    certificate's signature. The chain stops where no issuer is found.
    """
    candidates = list(pool)
    chain: list[x509.Certificate] = []
    seen = {leaf.fingerprint(_FINGERPRINT)}
    current = leaf
    while len(chain) < MAX_CHAIN and not _self_signed(current):
        issuer = next(
            (
                candidate
                for candidate in candidates
                if candidate.fingerprint(_FINGERPRINT) not in seen and _issued_by(current, candidate)
            ),
            None,
        )
        if issuer is None:
            break
        chain.append(issuer)
        seen.add(issuer.fingerprint(_FINGERPRINT))
        current = issuer
    return tuple(chain)


def _issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        verify_certificate_signature(certificate, issuer)
    except CertificateSignatureError:
        return False
    return True


def _self_signed(certificate: x509.Certificate) -> bool:
    return certificate.subject == certificate.issuer and _issued_by(certificate, certificate)


def validity_problem(identity: Identity, *, now: datetime | None = None) -> str | None:
    """Why ``security find-identity -v`` would leave the identity out, in Apple's words, or None.

    ``CSSMERR_TP_CERT_EXPIRED`` / ``CSSMERR_TP_CERT_NOT_VALID_YET`` when a certificate of the chain
    is outside its validity period; ``CSSMERR_TP_NOT_TRUSTED`` when the chain does not end at a
    self-signed root the token serves.
    """
    when = now or datetime.now(UTC)
    for certificate in (identity.certificate, *identity.chain):
        problem = time_problem(certificate, when)
        if problem:
            return problem
    if not identity.chain or not _self_signed(identity.chain[-1]):
        return "CSSMERR_TP_NOT_TRUSTED"  # a self-signed leaf is not trusted either, as on macOS
    return None


def time_problem(certificate: x509.Certificate, when: datetime) -> str | None:
    if when < certificate.not_valid_before_utc:
        return "CSSMERR_TP_CERT_NOT_VALID_YET"
    if when > certificate.not_valid_after_utc:
        return "CSSMERR_TP_CERT_EXPIRED"
    return None
