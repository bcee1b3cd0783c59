"""Checking a flat package's signature, as ``pkgutil --check-signature`` does.

The checks, in order; the first that fails decides the verdict:

1. The package can be read (header, table of contents, heap ranges): else *package is invalid*.
2. The stored TOC checksum is the hash of the compressed TOC, and, with ``check_files``, every
   file's stored and decoded bytes match their archived and extracted checksums (streamed, never
   held in memory): else *package is invalid (checksum did not verify)*. Apple's pkgutil reads no
   file data (libxar checks the TOC checksum when it opens a package, and a file's archived
   checksum only when the file is extracted); ``pkgutil --check-signature`` does the same unless
   asked to check the files.
3. There is a signature: else *no signature*.
4. Each signature verifies over the TOC checksum: the classic RSA signature as PKCS#1 v1.5 over
   the checksum as the message hash, or over the SHA-1 or SHA-256 of the checksum (older tools
   hashed it once more); the CMS, detached over the checksum bytes, with or without signed
   attributes, in BER or DER, zero-padded to its slot. Both name the same signer, the CMS's
   certificates are among those the table of contents lists, and a timestamp, if any, must
   cover the CMS signature: else *invalid signature*.
5. A stapled notarization ticket, if any, is whole: its structure parses, its signature verifies
   with the certificate it carries, and it lists the package's TOC checksum: else *package is
   invalid*, naming what is wrong with the ticket. (Whether the ticket's certificate chains to
   Apple's notary root is not checked here; see docs/productsign.md.)
6. The signer's chain leads to a trust anchor (``SIGNBRIDGE_ANCHORS`` / ``TrustAnchors``) for
   installer signing, valid now or when a trusted timestamp says the package was signed: the
   verdict then words the anchor as Apple does; else *signed by a certificate that has since
   expired* when only time is wrong, and *signed by untrusted certificate* otherwise.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from ...crypto.chains import unique_certificates
from ...crypto.cms import verify_detached
from ...crypto.der import CertificateFormatError, read_certificates
from ...crypto.hashes import HashAlgorithm
from ...errors import SignatureError
from ..certificates import APPLE_ROOT_FINGERPRINTS
from ..codesig import cms
from ..notary.ticket import TicketError, parse_ticket
from ..trust import Purpose, TrustResult, evaluate_chain
from .xar.archive import XarArchive, signature_data
from .xar.errors import ChecksumMismatchError, XarError
from .xar.toc import SignatureSlot


class PackageStatus(enum.Enum):
    """The verdicts, each with the words ``pkgutil --check-signature`` prints for it."""

    TRUSTED = "trusted"  # worded from the anchor: see TrustResult.status
    UNTRUSTED = "signed by untrusted certificate"
    EXPIRED = "signed by a certificate that has since expired"
    NO_SIGNATURE = "no signature"
    INVALID_SIGNATURE = "invalid signature"
    INVALID_CHECKSUM = "package is invalid (checksum did not verify)"
    INVALID_PACKAGE = "package is invalid"


class _Invalid(Exception):
    """A check failed: the verdict, and why."""

    def __init__(self, status: PackageStatus, problem: str) -> None:
        super().__init__(problem)
        self.status = status
        self.problem = problem


@dataclass(frozen=True)
class PackageVerdict:
    """What :func:`verify_package` found. ``status_text`` is the ``Status:`` line's text."""

    path: Path
    status: PackageStatus
    status_text: str
    checksum_algorithm: HashAlgorithm | None = None
    signatures: tuple[str, ...] = ()  # "RSA", "CMS": the signatures that verified
    rsa_form: str | None = None  # what the RSA signature signs: "checksum", "sha1(checksum)", ...
    cms_signed_attributes: bool | None = None
    signing_time: datetime | None = None  # the CMS signingTime attribute (the signer's clock)
    timestamp: datetime | None = None  # set only for a timestamp that verified and is trusted
    chain: tuple[x509.Certificate, ...] = field(default=(), repr=False)  # signer first
    trust: TrustResult | None = field(default=None, repr=False)
    stapled_ticket: bool = False
    ticket_issued: datetime | None = None  # when the notary service issued the stapled ticket (it checked out)
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status is PackageStatus.TRUSTED

    @property
    def exit_code(self) -> int:
        """0 for a valid signature from a trusted certificate, else 1 (pkgutil exits 1 when unsigned)."""
        return 0 if self.ok else 1


def verify_package(
    path: str | os.PathLike[str],
    anchors: Sequence[x509.Certificate],
    *,
    at: datetime | None = None,
    check_files: bool = True,
    apple_roots: frozenset[bytes] = APPLE_ROOT_FINGERPRINTS,
) -> PackageVerdict:
    """Check the package at ``path`` against ``anchors`` (see the module documentation).

    ``at`` is the time to check certificates at (default now). With ``check_files`` (the
    default) every file's data is read and checked against its checksums. ``apple_roots`` are the
    SHA-256 fingerprints of the anchors worded as Apple's in the verdict. Raises
    :class:`XarError` only when the file cannot be opened; every other finding is a verdict.
    """
    path = Path(path)
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise XarError(f"cannot open {path}: {exc.strerror or exc}") from None
    try:
        archive = XarArchive.open(path, verify_checksum=False)
    except ChecksumMismatchError as exc:
        return _verdict(path, PackageStatus.INVALID_CHECKSUM, problems=(str(exc),))
    except XarError as exc:
        return _verdict(path, PackageStatus.INVALID_PACKAGE, problems=(str(exc),))
    base = {"checksum_algorithm": archive.checksum_algorithm, "stapled_ticket": archive.stapled_ticket is not None}
    try:
        _check_contents(archive, check_files)
        if not archive.toc.signatures:
            return _verdict(path, PackageStatus.NO_SIGNATURE, **base)
        found = _check_signatures(archive)
        base["ticket_issued"] = _check_ticket(archive)
        timestamp, problems = _trusted_timestamp(found.parsed_cms, anchors)
    except _Invalid as invalid:
        return _verdict(path, invalid.status, problems=(invalid.problem,), **base)
    return _trust_verdict(path, found, timestamp, problems, anchors, at, apple_roots, base)


# ---------------------------------------------------------------------------------------------
# Contents


def _check_contents(archive: XarArchive, check_files: bool) -> None:
    try:
        archive.verify_toc_checksum()
        if check_files:
            sink = _Sink()
            for entry in archive.toc.files:
                if entry.data is not None:
                    archive.copy_data(entry, sink)
    except ChecksumMismatchError as exc:
        raise _Invalid(PackageStatus.INVALID_CHECKSUM, str(exc)) from None
    except XarError as exc:
        raise _Invalid(PackageStatus.INVALID_PACKAGE, str(exc)) from None


class _Sink:
    """A file-like object that keeps nothing: file data is checked as it streams past."""

    def write(self, data: bytes) -> int:
        return len(data)


# ---------------------------------------------------------------------------------------------
# Signatures


@dataclass(frozen=True)
class _Signed:
    signer: x509.Certificate
    certificates: tuple[x509.Certificate, ...]  # everything the package offers for the chain
    signatures: tuple[str, ...]
    rsa_form: str | None
    parsed_cms: cms.ParsedSignature | None


def _check_signatures(archive: XarArchive) -> _Signed:
    data = signature_data(archive)
    checksum = data.checksum
    if checksum is None:
        raise _Invalid(PackageStatus.INVALID_SIGNATURE, f"{archive.name} is signed but has no TOC checksum to sign")
    toc = archive.toc
    rsa_slot, cms_slot = toc.signature, toc.x_signature
    rsa_certificates = _key_info(rsa_slot) if rsa_slot else ()
    cms_certificates = _key_info(cms_slot) if cms_slot else ()

    signers: list[x509.Certificate] = []
    rsa_form = None
    parsed = None
    if cms_slot is not None:
        parsed = _check_cms(cms_slot, data.cms or b"", checksum, cms_certificates)
        signers.append(parsed.signer_certificate)
    if rsa_slot is not None:
        signer = rsa_certificates[0] if rsa_certificates else (signers[0] if signers else None)
        if signer is None:
            raise _Invalid(PackageStatus.INVALID_SIGNATURE, "the RSA signature lists no signing certificate")
        rsa_form = _check_rsa(rsa_slot, data.rsa_signature or b"", checksum, archive.checksum_algorithm, signer)
        signers.append(signer)
    if any(signer != signers[0] for signer in signers):
        raise _Invalid(PackageStatus.INVALID_SIGNATURE, "the RSA and CMS signatures name different signers")
    pool = unique_certificates([*cms_certificates, *rsa_certificates, *(parsed.certificates if parsed else ())])
    return _Signed(
        signer=signers[0],
        certificates=tuple(pool),
        signatures=tuple(name for name, slot in (("RSA", rsa_slot), ("CMS", cms_slot)) if slot is not None),
        rsa_form=rsa_form,
        parsed_cms=parsed,
    )


def _key_info(slot: SignatureSlot) -> tuple[x509.Certificate, ...]:
    try:
        return read_certificates(slot.certificates, f"the <{slot.element}>")
    except CertificateFormatError as exc:
        raise _Invalid(PackageStatus.INVALID_SIGNATURE, str(exc)) from None


def _check_cms(
    slot: SignatureSlot, stored: bytes, checksum: bytes, listed: tuple[x509.Certificate, ...]
) -> cms.ParsedSignature:
    if slot.style != "CMS":
        raise _Invalid(PackageStatus.INVALID_SIGNATURE, f"the <x-signature> style {slot.style!r} is not CMS")
    try:
        parsed = cms.parse_signed_data(stored)
    except SignatureError as exc:
        raise _Invalid(PackageStatus.INVALID_SIGNATURE, f"the CMS signature: {exc}") from None
    # The table of contents, which the checksum covers, lists the certificates; the CMS's own
    # copies are not signed, so they must be the same ones.
    if listed:
        if parsed.signer_certificate != listed[0]:
            raise _Invalid(
                PackageStatus.INVALID_SIGNATURE,
                "the CMS signature's signer is not the first certificate the table of contents lists for it",
            )
        unlisted = [certificate for certificate in parsed.certificates if certificate not in listed]
        if unlisted:
            raise _Invalid(
                PackageStatus.INVALID_SIGNATURE,
                f"the CMS signature carries {len(unlisted)} certificate(s) the table of contents does not list",
            )
    try:
        verify_detached(parsed, content=checksum, content_name="the package's table of contents")
        cms.check_unsigned_fields(parsed)
    except SignatureError as exc:
        raise _Invalid(PackageStatus.INVALID_SIGNATURE, f"the CMS signature: {exc}") from None
    if parsed.timestamp is not None:
        try:
            cms.check_timestamp(parsed)
        except SignatureError as exc:
            raise _Invalid(PackageStatus.INVALID_SIGNATURE, f"the CMS signature's timestamp: {exc}") from None
    return parsed


def _check_rsa(
    slot: SignatureSlot,
    signature: bytes,
    checksum: bytes,
    checksum_algorithm: HashAlgorithm | None,
    signer: x509.Certificate,
) -> str:
    if slot.style != "RSA":
        raise _Invalid(PackageStatus.INVALID_SIGNATURE, f"the <signature> style {slot.style!r} is not RSA")
    public_key = signer.public_key()
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise _Invalid(PackageStatus.INVALID_SIGNATURE, "the RSA signature's certificate has no RSA key")
    try:
        digest_info = public_key.recover_data_from_signature(signature, padding.PKCS1v15(), None)
        algorithm, digest = HashAlgorithm.from_digest_info(digest_info)
    except (InvalidSignature, ValueError, SignatureError):
        raise _Invalid(
            PackageStatus.INVALID_SIGNATURE, "the RSA signature does not verify with its certificate's key"
        ) from None
    forms = {(checksum_algorithm, checksum): "checksum"}
    for extra in (HashAlgorithm.SHA1, HashAlgorithm.SHA256):
        forms.setdefault((extra, extra.digest(checksum)), f"{extra.hashlib_name}(checksum)")
    form = forms.get((algorithm, digest))
    if form is None:
        raise _Invalid(PackageStatus.INVALID_SIGNATURE, "the RSA signature does not sign this table of contents")
    return form


def _check_ticket(archive: XarArchive) -> datetime | None:
    """When the stapled ticket was issued (None without one), once it has checked out."""
    try:
        data = archive.read_ticket()
        if data is None:
            return None
        ticket = parse_ticket(data, archive.name)
        ticket.verify_signature()
    except (TicketError, XarError) as exc:
        raise _Invalid(PackageStatus.INVALID_PACKAGE, str(exc)) from None
    checksum = archive.stored_toc_checksum()
    if checksum is None or not ticket.covers(checksum):
        raise _Invalid(
            PackageStatus.INVALID_PACKAGE,
            f"{archive.name}: the stapled notarization ticket does not list this package's table-of-contents "
            "checksum; it was issued for another package",
        )
    return ticket.issued


# ---------------------------------------------------------------------------------------------
# Trust


def _trusted_timestamp(
    parsed: cms.ParsedSignature | None, anchors: Sequence[x509.Certificate]
) -> tuple[datetime | None, list[str]]:
    """The time a trusted timestamp vouches for (None without one), and why a timestamp is not trusted.

    The timestamp's own signature was checked with the CMS. Here its authority must chain to an
    anchor; the certificates the token carries are not signed by anything, so each must then be on
    that chain or be an anchor, or the token was altered.
    """
    if parsed is None or parsed.timestamp is None:
        return None, []
    token = parsed.timestamp
    try:
        when = cms.check_timestamp(parsed, anchors)
    except SignatureError as exc:
        return None, [f"the timestamp is not trusted: {exc}"]
    signer = token.signer_certificate
    path = evaluate_chain(signer, token.certificates, anchors, at=when).chain if signer is not None else ()
    stray = [certificate for certificate in token.certificates if certificate not in (*path, *anchors)]
    if stray:
        raise _Invalid(
            PackageStatus.INVALID_SIGNATURE,
            f"the timestamp carries {len(stray)} certificate(s) that are not on its authority's chain",
        )
    return when, []


def _trust_verdict(
    path: Path,
    found: _Signed,
    timestamp: datetime | None,
    problems: list[str],
    anchors: Sequence[x509.Certificate],
    at: datetime | None,
    apple_roots: frozenset[bytes],
    base: dict,
) -> PackageVerdict:
    parsed = found.parsed_cms
    intermediates = [certificate for certificate in found.certificates if certificate != found.signer]
    trust = evaluate_chain(
        found.signer,
        intermediates,
        anchors,
        at=at,
        purpose=Purpose.INSTALLER,
        timestamp_time=timestamp,
        apple_roots=apple_roots,
    )
    status = PackageStatus.TRUSTED
    if not trust.ok:
        status = PackageStatus.EXPIRED if _only_time_is_wrong(trust, intermediates, anchors, at) else PackageStatus.UNTRUSTED
        problems.extend(trust.problems)
    return _verdict(
        path,
        status,
        status_text=trust.status if status is PackageStatus.TRUSTED else None,
        signatures=found.signatures,
        rsa_form=found.rsa_form,
        cms_signed_attributes=parsed.has_signed_attributes if parsed is not None else None,
        signing_time=parsed.signing_time if parsed is not None else None,
        timestamp=timestamp,
        chain=trust.chain,
        trust=trust,
        problems=tuple(problems),
        **base,
    )


def _only_time_is_wrong(
    trust: TrustResult,
    intermediates: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
    at: datetime | None,
) -> bool:
    """Whether the chain found would be trusted at a moment when all its certificates were valid,
    and the reason it is not now is that one of them has expired."""
    chain = trust.chain
    if trust.anchor is None or not chain:
        return False
    start = max(certificate.not_valid_before_utc for certificate in chain)
    end = min(certificate.not_valid_after_utc for certificate in chain)
    if start > end or (at or datetime.now(UTC)) <= end:
        return False
    then = evaluate_chain(
        chain[0], intermediates, anchors, at=at, purpose=Purpose.INSTALLER, timestamp_time=end
    )
    return then.ok


def _verdict(path: Path, status: PackageStatus, *, status_text: str | None = None, **fields) -> PackageVerdict:
    return PackageVerdict(path=path, status=status, status_text=status_text or status.value, **fields)
