"""Signing a flat package (product archive or component package) as Apple's ``productsign`` does.

Only digests reach the signer (:attr:`Identity.sign`, i.e. the token):

1. The package's new table of contents is built with room for both signatures and its checksum
   computed (:func:`signbridge.apple.pkg.xar.signing.prepare_signed`). That TOC checksum is what is signed.
2. The classic ``<signature style="RSA">``: RSASSA-PKCS1-v1_5 where the checksum *is* the message
   hash, i.e. one :class:`SignatureRequest` with ``digest=checksum`` and the checksum's algorithm.
3. The ``<x-signature style="CMS">``: a detached CMS SignedData over the checksum bytes (content
   type id-data; signed attributes contentType, signingTime and messageDigest of the checksum),
   built by :mod:`signbridge.apple.codesig.cms`, which sends the signer the digest of the signed
   attributes; the optional RFC 3161 timestamp covers the CMS signature value.
4. Before anything is signed, the file data is copied into a temporary file beside the output and
   every file's stored bytes are checked against the archived checksum the TOC gives (one read of
   each byte; ``check_files=False`` lets the kernel copy them unread instead). A mismatch refuses
   the package. The signatures are then written before the data and the file renamed over the
   output. The input is never written to.

The TOC checksum is SHA-1 by default, as Apple's productsign writes it today (see
docs/productsign.md); SHA-256 may be chosen, at the cost of macOS 10.11 and older reporting the
package as damaged. The CMS uses SHA-256 whatever the TOC checksum.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ...crypto.chains import unique_certificates
from ...crypto.hashes import HashAlgorithm
from ...crypto.identity import Identity
from ...crypto.signatures import EcdsaFormat, Scheme, SignatureRequest, verify_digest_signature
from ...errors import SignatureError
from ..certificates import Usage, usage
from ..codesig import cms, cms_signing
from .xar.archive import XarArchive
from .xar.header import HEADER_SIZE
from .xar.signing import PreparedPackage, Signatures, prepare_signed, write_signed

DEFAULT_TOC_CHECKSUM = HashAlgorithm.SHA1
TOC_CHECKSUMS = (HashAlgorithm.SHA1, HashAlgorithm.SHA256)
CMS_DIGEST = HashAlgorithm.SHA256

_MAX_TOC_BUILDS = 48  # TOCs built, at most, to find the padding
_GUESSES_PER_WINDOW = 6  # lengths tried before moving the padding on by one alignment unit
_WINDOWS = 8
_SMALL_TOC = 256 * 1024  # larger TOCs take long to compress: two guesses only
_LARGE_COPY = 64 * 1024 * 1024
_LARGE_COPY_ALIGNMENT = 64 * 1024

INSTALLER_IDENTITY_REQUIRED = (
    "An installer signing identity (not an application signing identity) is required for signing "
    "flat-style products."
)


class InstallerIdentityError(SignatureError):
    """The identity's certificate is not an installer signing certificate."""


@dataclass(frozen=True)
class SignedPackage:
    """What :func:`sign_package` wrote."""

    path: Path
    certificates: tuple[x509.Certificate, ...] = field(repr=False)  # embedded, signer first
    checksum_algorithm: HashAlgorithm
    toc_checksum: bytes
    signatures: tuple[str, ...]  # "RSA", "CMS"
    timestamp: datetime | None  # the time the timestamp authority vouched for
    replaced_signatures: tuple[str, ...]  # styles of the signatures the input carried
    dropped_ticket: bool  # the input's stapled notarization ticket was left out


def sign_package(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    identity: Identity,
    *,
    extra_certificates: Sequence[x509.Certificate] = (),
    toc_checksum: HashAlgorithm | str = DEFAULT_TOC_CHECKSUM,
    timestamp: cms_signing.Timestamper | None = None,
    signing_time: datetime | None = None,
    check_files: bool = True,
) -> SignedPackage:
    """Sign the package at ``input_path`` with ``identity`` and write the result to ``output_path``.

    ``extra_certificates`` are embedded after the identity's own chain (``productsign --cert``);
    ``timestamp`` (see :func:`signbridge.apple.codesig.cms_signing.timestamper`) timestamps the CMS signature.
    With ``check_files`` (the default) every file's stored data is checked against its archived
    checksum while it is copied, before the signer is asked for anything.
    Raises a :class:`signbridge.apple.pkg.xar.XarError` for a package that cannot be read or written
    (:class:`signbridge.apple.pkg.xar.ChecksumMismatchError` for data that does not match its checksum),
    :class:`InstallerIdentityError` for a certificate that is not for installers, and a
    :class:`SignatureError` when the signer fails or returns a signature that does not verify.
    """
    algorithm = toc_checksum if isinstance(toc_checksum, HashAlgorithm) else HashAlgorithm.from_name(toc_checksum)
    if algorithm not in TOC_CHECKSUMS:
        names = " or ".join(choice.hashlib_name for choice in TOC_CHECKSUMS)
        raise SignatureError(f"productsign writes a {names} table-of-contents checksum, not {algorithm.hashlib_name}")
    leaf = identity.certificate
    if usage(identity.certificate) is not Usage.INSTALLER:
        raise InstallerIdentityError(f'"{identity.common_name}" cannot sign packages. {INSTALLER_IDENTITY_REQUIRED}')
    certificates = unique_certificates([leaf, *identity.chain, *extra_certificates])
    public_key = leaf.public_key()
    if isinstance(public_key, rsa.RSAPublicKey):
        rsa_size: int | None = (public_key.key_size + 7) // 8
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        rsa_size = None  # the classic signature is RSA only; the CMS alone signs the package
    else:
        raise SignatureError(f'the key of "{identity.common_name}" is neither RSA nor ECDSA; packages cannot be signed')

    archive = XarArchive.open(input_path)
    cms_size = cms_signing.estimate_size(certificates, with_timestamp=timestamp is not None, hash_algorithm=CMS_DIGEST)
    signed_at = signing_time or datetime.now(UTC)
    prepared = _prepare_in_phase(
        archive, algorithm, rsa_size, cms_size, [_der(cert) for cert in certificates], signed_at
    )
    stamped: list[datetime | None] = []  # when the timestamp authority says the CMS was signed

    def sign(prepared: PreparedPackage) -> Signatures:
        checksum = prepared.toc_checksum
        rsa_signature = None
        if rsa_size is not None:
            request = SignatureRequest(checksum, algorithm, Scheme.RSA_PKCS1)
            rsa_signature = identity.sign(request)
            try:
                verify_digest_signature(public_key, request, rsa_signature)
            except SignatureError as exc:
                raise SignatureError(
                    f"the RSA signature of the package from {_source(identity)} is wrong: {exc}"
                ) from None
        chain = [certificate for certificate in certificates if certificate != leaf]
        cms_der = cms_signing.sign_detached(
            CMS_DIGEST.digest(checksum),
            identity.sign,
            leaf,
            chain,
            hash_algorithm=CMS_DIGEST,
            timestamp=timestamp,
            signing_time=signed_at,
            ecdsa_format=EcdsaFormat.ASN1,  # as the CMS stores it
            signer_name=identity.source,
        )
        token = cms.parse_signed_data(cms_der).timestamp
        stamped.append(token.gen_time if token is not None else None)
        return rsa_signature, cms_der

    written = write_signed(prepared, output_path, sign, check_files=check_files)
    return SignedPackage(
        path=written,
        certificates=tuple(certificates),
        checksum_algorithm=algorithm,
        toc_checksum=prepared.toc_checksum,
        signatures=(("RSA",) if rsa_size is not None else ()) + ("CMS",),
        timestamp=stamped[0],
        replaced_signatures=prepared.replaced_signatures,
        dropped_ticket=prepared.dropped_ticket,
    )


def _prepare_in_phase(
    archive: XarArchive,
    algorithm: HashAlgorithm,
    rsa_size: int | None,
    cms_size: int,
    certificates: list[bytes],
    signed_at: datetime,
) -> PreparedPackage:
    """:func:`prepare_signed`, with the CMS slot padded so that the file data lands at the same offset
    within a memory page (64 KiB for large packages) as in the input.

    The kernel then copies the page cache's pages (Linux's large folios, 64 KiB and more) whole, as
    fast as ``cp``; shifted by part of a page, every page of the output mixes two of the input and
    the copy of a 1 GiB package took half as long again (measured on ext4, Linux 6.18). The padding
    is zeros like the rest of the CMS slot, usually less than one alignment unit (a page below 64 MiB
    of data, else 64 KiB), at most eight.

    The data starts after the header, the compressed TOC, the checksum and the signatures; the TOC
    holds the padded offsets, so its compressed length depends on the padding, a little and not
    monotonically. For a guessed length the padding follows; it is right when the TOC built with it
    has that length. Lengths near the ones seen are tried, then the padding moves on by a unit.
    Building a TOC is cheap for the usual few files (a few TOCs are built on average); large TOCs get
    two tries. Alignment only saves time: when no guess fits, the package is written unaligned.
    """
    first = prepare_signed(archive, algorithm, rsa_size, cms_size, certificates, signed_at=signed_at)
    alignment = _LARGE_COPY_ALIGNMENT if first.copy_length >= _LARGE_COPY else mmap.PAGESIZE
    fixed = HEADER_SIZE + first.signature_area_size - cms_size  # header, checksum and RSA signature
    budget = _MAX_TOC_BUILDS if len(first.toc_xml) <= _SMALL_TOC else 2

    def reserve(length: int, window: int) -> int:
        return cms_size + (first.copy_offset - fixed - length - cms_size) % alignment + window * alignment

    center = len(first.toc_compressed)
    built = 0
    for window in range(_WINDOWS):
        tried: set[int] = set()
        queue = [center]
        while queue and len(tried) < _GUESSES_PER_WINDOW and built < budget:
            guess = queue.pop(0)
            if guess in tried:
                continue
            tried.add(guess)
            prepared = prepare_signed(
                archive, algorithm, rsa_size, reserve(guess, window), certificates, signed_at=signed_at
            )
            built += 1
            length = len(prepared.toc_compressed)
            if length == guess:
                return prepared
            # next, the lengths the TOC takes near this padding, nearest first
            queue = [length + step for step in (0, 1, -1, 2, -2) if length + step not in tried] + queue
            center = length
    return first


def _der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)


def _source(identity: Identity) -> str:
    return f"the token {identity.source}" if identity.source else "the signer"
