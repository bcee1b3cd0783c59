"""A signing identity: a certificate, its issuer chain, and a way to sign digests with its key.

Identities come from running tokens (see :mod:`signbridge.keychain.discovery`); tests may build them from
local keys. The Apple tools only ever see this interface.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from .apple.certificates import Usage, common_name, team_identifier, usage
from .signatures import SignatureRequest

DigestSigner = Callable[[SignatureRequest], bytes]
"""Signs ``request.digest``. RSA: PKCS#1 v1.5 or PSS per ``request.scheme``. ECDSA: DER ``SEQUENCE {r, s}``."""


@dataclass(frozen=True)
class Identity:
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]  # the leaf's issuer first
    sign: DigestSigner = field(compare=False, repr=False)
    source: str = ""  # where it lives, for messages: the token's name

    @property
    def sha1(self) -> str:
        return self.certificate.fingerprint(hashes.SHA1()).hex().upper()  # noqa: S324 - an identifier, as Apple's

    @property
    def sha256(self) -> str:
        return self.certificate.fingerprint(hashes.SHA256()).hex().upper()

    @property
    def common_name(self) -> str:
        return common_name(self.certificate)

    @property
    def team_id(self) -> str | None:
        return team_identifier(self.certificate)

    @property
    def usage(self) -> Usage:
        return usage(self.certificate)
