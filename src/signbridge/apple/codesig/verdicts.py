"""What verifying code concludes, for every verifier (Mach-O, bundle, disk image) and its callers:
:class:`VerifyOptions`, the verdicts of a slice and of a piece of code, and what a verified
signature's requirements are evaluated against: its :class:`RequirementContext` and its designated
requirement. How verification fails is in :mod:`signbridge.apple.codesig.verification`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509

from ..certificates import APPLE_ROOT_FINGERPRINTS
from ..macho.parse import MachO
from ..plist import plist_dict
from . import cms
from .blobs import CodeSignatureFormatError
from .codedirectory import CodeDirectory
from .embedded_signature import EmbeddedSignature
from .entitlements import signature_entitlements
from .requirements.binary import Expr
from .requirements.evaluation import RequirementContext
from .requirements.text import render
from .signed_code import derived_designated_requirement, explicit_designated_requirement, preferred_directory
from .verification import BAD_REQUIREMENT, CodeVerificationError

if TYPE_CHECKING:
    from ..trust import TrustResult


@dataclass(frozen=True)
class VerifyOptions:
    """How to verify: the trust anchors, the time, ``--strict``, ``--deep``, ``-R``, ``-a``, and
    ``--check-expiry`` (expired certificates fail unless a timestamp falls within their validity;
    without it, as in Apple's codesign, expiry alone fails nothing)."""

    anchors: tuple[x509.Certificate, ...] = ()
    at: datetime | None = None
    strict: bool = False
    deep: bool = False
    requirement: Expr | None = None
    architecture: str | None = None
    apple_roots: frozenset[bytes] = APPLE_ROOT_FINGERPRINTS
    check_expiry: bool = False


@dataclass(frozen=True)
class SliceVerdict:
    """One slice that passed: its signature, the CMS and the trust verdict."""

    macho: MachO | None  # None for a detached signature
    signature: EmbeddedSignature
    cms: cms.ParsedSignature | None
    trust: TrustResult | None
    timestamp: datetime | None

    @property
    def directory(self) -> CodeDirectory:
        return preferred_directory(self.signature.code_directories)


@dataclass(frozen=True)
class Verdict:
    """The result of verifying one piece of code that is valid on disk."""

    path: Path
    identifier: str
    format: str
    designated: Expr
    satisfies_designated: bool
    satisfies_requirement: bool | None  # None when no -R requirement was given
    cdhash: bytes  # of the preferred slice's preferred CodeDirectory (what a parent's seal records)
    slices: tuple[SliceVerdict, ...] = field(repr=False)
    nested: tuple[Verdict, ...] = field(default=(), repr=False)

    @property
    def designated_text(self) -> str:
        return render(self.designated)


@dataclass(frozen=True)
class BoundFiles:
    """What a bundle binds into its main executable's signature (slots 1 and 3)."""

    info_plist: bytes | None = None
    code_resources: bytes | None = None
    is_bundle: bool = False


LONE_FILE = BoundFiles()  # a Mach-O file outside a bundle binds only its embedded Info.plist


# --- what requirements are evaluated against ------------------------------------------------------


def requirement_context(
    slice_verdict: SliceVerdict,
    options: VerifyOptions,
    *,
    info_plist: bytes | None,
) -> RequirementContext:
    """What requirements about this slice are evaluated against."""
    signature = slice_verdict.signature
    directory = slice_verdict.directory
    certificates: tuple[x509.Certificate, ...] = ()
    trusted = False
    if slice_verdict.trust is not None:
        certificates = slice_verdict.trust.chain
        trusted = slice_verdict.trust.ok
    elif slice_verdict.cms is not None:
        certificates = (slice_verdict.cms.signer_certificate, *slice_verdict.cms.chain)
    return RequirementContext(
        identifier=directory.identifier,
        certificates=certificates,
        trusted=trusted,
        anchors=tuple(options.anchors),
        info=plist_dict(info_plist),
        entitlements=signature_entitlements(signature)[0],
        cdhashes=frozenset(d.cdhash() for d in signature.code_directories),
        platform=directory.platform,
        apple_roots=options.apple_roots,
    )


def designated_of(
    signature: EmbeddedSignature, directory: CodeDirectory, trust: TrustResult | None, options: VerifyOptions
) -> Expr:
    """The designated requirement: explicit in the requirement set, else the one Apple derives from
    the trusted chain (``cdhash H"..."`` for ad-hoc code)."""
    try:
        explicit = explicit_designated_requirement(signature)
    except CodeSignatureFormatError as exc:
        raise CodeVerificationError(BAD_REQUIREMENT, f"the internal requirements cannot be read: {exc}") from None
    if explicit is not None:
        return explicit
    chain = trust.chain if trust is not None else ()
    return derived_designated_requirement(directory, chain, apple_roots=options.apple_roots)
