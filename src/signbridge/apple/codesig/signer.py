"""The CMS signer of code: given a signature's CodeDirectories (primary first), the CMS blob that
goes into its slot 0x10000, made with an identity as Apple's ``codesign`` makes it.

A :class:`CmsSigner` holds the identity with its chain, the timestamp settings and the signing
time; it is built once per signing run and handed to Mach-O, bundle, detached and disk-image
signing (None stands for ad hoc). It also knows what follows from the identity: the requirement
set with the designated requirement (:func:`requirement_set`), the team identifier, and the room
the CMS needs. The CMS is a detached signature over the primary CodeDirectory with Apple's
CDHashes attributes (the hash agility plist and its DER form), the whole chain, and a timestamp
when asked; only the SHA-256 of its DER signed attributes goes to ``identity.sign``, and the
returned signature is verified against the certificate before anything is written.

The team identifier is the identity's (:func:`signbridge.apple.certificates.team_identifier`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from ...crypto.hashes import HashAlgorithm
from ...crypto.identity import Identity
from ...crypto.signatures import EcdsaFormat
from ..certificates import team_identifier
from . import cms_signing
from .codedirectory import CodeDirectory, HashType
from .options import CodesignOptions
from .requirements.binary import EMPTY_REQUIREMENT_SET, Expr, RequirementType, encode_requirement_set
from .signed_code import designated_requirement

CMS_DIGEST = HashAlgorithm.SHA256

_CODE_DIRECTORY_ALGORITHMS = {
    HashType.SHA1: HashAlgorithm.SHA1,
    HashType.SHA256: HashAlgorithm.SHA256,
    HashType.SHA256_TRUNCATED: HashAlgorithm.SHA256,
    HashType.SHA384: HashAlgorithm.SHA384,
    HashType.SHA512: HashAlgorithm.SHA512,
}


class CmsSigner:
    """Signs code with ``identity``: :meth:`sign` turns the CodeDirectories into the CMS blob."""

    def __init__(
        self,
        identity: Identity,
        *,
        timestamp: cms_signing.Timestamper | None = None,
        signing_time: datetime | None = None,
    ) -> None:
        self.identity = identity
        self.timestamp = timestamp
        self.signing_time = signing_time
        self.chain = identity.certificates
        self.team_id = team_identifier(identity.certificate, identity.chain)

    @classmethod
    def for_options(cls, identity: Identity, options: CodesignOptions) -> CmsSigner:
        """The signer ``options`` ask for: their timestamp (a ready one, else their TSA's) and time."""
        return cls(identity, timestamp=timestamper(options), signing_time=options.signing_time)

    def sign(self, directories: Sequence[CodeDirectory]) -> bytes:
        """A detached CMS over the primary CodeDirectory (the first) with Apple's CDHashes
        attributes, the whole chain, and a timestamp when asked. ``identity.sign`` sees one
        SHA-256 digest of the signed attributes."""
        primary = directories[0]
        cdhashes = [directory.cdhash() for directory in directories]
        agile = [(_CODE_DIRECTORY_ALGORITHMS[d.hash_type], d.full_hash()) for d in directories]
        return cms_signing.sign_detached(
            CMS_DIGEST.digest(primary.blob),
            self.identity.sign,
            self.identity.certificate,
            self.chain[1:],
            hash_algorithm=CMS_DIGEST,
            timestamp=self.timestamp,
            signing_time=self.signing_time,
            cdhashes_plist=cms_signing.build_cdhashes_plist(cdhashes),
            cdhashes2=agile,
            ecdsa_format=EcdsaFormat.ASN1,
            signer_name=self.identity.source,
        )

    def reserve(self, hash_types: Sequence[HashType]) -> int:
        """Room for the CMS: an upper bound for this chain, CodeDirectory count and timestamp."""
        return cms_signing.estimate_size(
            self.chain,
            with_timestamp=self.timestamp is not None,
            code_directories=[_CODE_DIRECTORY_ALGORITHMS[t] for t in hash_types],
            hash_algorithm=CMS_DIGEST,
        )

    def designated_requirement(self, identifier: str) -> Expr | None:
        """The designated requirement Apple's signer adds for ``identifier`` and this chain."""
        return designated_requirement(identifier, self.chain)


def requirement_set(signer: CmsSigner | None, identifier: str) -> bytes:
    """The requirement set to sign: the designated requirement when signing with an identity; ad-hoc
    signatures carry the empty set (their designated requirement is implicit, the cdhash)."""
    if signer is None:
        return EMPTY_REQUIREMENT_SET
    requirement = signer.designated_requirement(identifier)
    if requirement is None:
        return EMPTY_REQUIREMENT_SET
    return encode_requirement_set({RequirementType.DESIGNATED: requirement})


def timestamper(options: CodesignOptions) -> cms_signing.Timestamper | None:
    if options.timestamp is not None:
        return options.timestamp
    if options.timestamp_url:
        return cms_signing.timestamper(options.timestamp_url, hash_algorithm=CMS_DIGEST)
    return None
