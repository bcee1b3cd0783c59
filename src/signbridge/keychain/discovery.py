"""The identities the running tokens hold, with their chains, and whether Apple would list them.

Each running token (see :mod:`signbridge.provider.registry`) is asked over its socket, with the
pure-Python PKCS#11 client, for its certificates and private keys. A certificate with a private
key of the same CKA_ID is an identity; its chain is built from the token's other certificates
(the authority objects), and its :attr:`~signbridge.crypto.identity.Identity.sign` is a
:class:`~signbridge.keychain.key.TokenKey`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509

from ..crypto.chains import build_chain, self_signed
from ..crypto.der import CertificateFormatError, read_certificate
from ..crypto.identity import Identity
from ..pkcs11 import CKA, CKO, Pkcs11Client, Pkcs11Error, Pkcs11Object
from ..pkcs11.constants import CATEGORY_AUTHORITY
from ..provider.registry import TokenRecord
from .key import DEFAULT_PIN, TokenAccessError, TokenKey, log_in
from .tokens import find_tokens

log = logging.getLogger("signbridge.keychain")

LIST_TIMEOUT = 30.0  # seconds for one answer while listing


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
            certificate = read_certificate(bytes(der or b""), f"certificate object {obj.label!r}")  # type: ignore[arg-type]
        except CertificateFormatError as exc:
            log.warning("token %s: %s; skipped", record.name, exc)
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
    if not identity.chain or not self_signed(identity.chain[-1]):
        return "CSSMERR_TP_NOT_TRUSTED"  # a self-signed leaf is not trusted either, as on macOS
    return None


def time_problem(certificate: x509.Certificate, when: datetime) -> str | None:
    if when < certificate.not_valid_before_utc:
        return "CSSMERR_TP_CERT_NOT_VALID_YET"
    if when > certificate.not_valid_after_utc:
        return "CSSMERR_TP_CERT_EXPIRED"
    return None
