"""A signing identity: a certificate, its issuer chain, and a way to sign digests with its key.

Identities come from running tokens (see :mod:`signbridge.keychain.discovery`); tests may build them from
local keys. The Apple tools only ever see this interface.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from .chains import unique_certificates
from .names import common_name
from .signatures import DigestSigner


@dataclass(frozen=True)
class Identity:
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]  # the leaf's issuer first
    sign: DigestSigner = field(compare=False, repr=False)  # ECDSA signatures in DER, whatever the request says
    source: str = ""  # where it lives, for messages: the token's name

    @property
    def sha1(self) -> str:
        return self.certificate.fingerprint(hashes.SHA1()).hex().upper()  # noqa: S324 - an identifier, as Apple's

    @property
    def sha256(self) -> str:
        return self.certificate.fingerprint(hashes.SHA256()).hex().upper()

    @property
    def certificates(self) -> tuple[x509.Certificate, ...]:
        """The certificate followed by its issuers, without repeats: what a signature carries."""
        return tuple(unique_certificates((self.certificate, *self.chain)))

    @property
    def common_name(self) -> str:
        return common_name(self.certificate)
