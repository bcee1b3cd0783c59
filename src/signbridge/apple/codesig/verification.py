"""What verifying code concludes, for every verifier (Mach-O, bundle, disk image) and its callers.

Apple's sentences (Security framework error strings, as codesign prints them after the path),
:class:`CodeVerificationError` whose ``status`` is one of them and whose ``detail`` names exactly
what failed, :class:`VerifyOptions`, the verdicts of a slice and of a piece of code, and what a
verified signature's requirements are evaluated against: its :class:`RequirementContext` and its
designated requirement.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509

from ...errors import SignbridgeError
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

if TYPE_CHECKING:
    from ..trust import TrustResult

# Apple's sentences (Security framework error strings), as codesign prints them after the path.
UNSIGNED = "code object is not signed at all"
MODIFIED = "invalid signature (code or signature have been modified)"
BAD_RESOURCE = "a sealed resource is missing or invalid"
INFO_PLIST_FAILED = "invalid Info.plist (plist or signature have been modified)"
RESOURCE_DIRECTORY_FAILED = "invalid resource directory (directory or signature have been modified)"
RESOURCES_NOT_FOUND = "code has no resources but signature indicates they must be present"
RESOURCES_NOT_SEALED = "resources are present but not sealed by signature"
NOT_TRUSTED = "CSSMERR_TP_NOT_TRUSTED"
CERT_EXPIRED = "CSSMERR_TP_CERT_EXPIRED"
CERT_NOT_VALID_YET = "CSSMERR_TP_CERT_NOT_VALID_YET"
REQUIREMENT_FAILED = "code failed to satisfy specified code requirement(s)"
BAD_REQUIREMENT = "invalid or corrupted code requirement(s)"
INVALID_SYMLINK = "invalid destination for symbolic link in bundle"
BAD_BUNDLE = "bundle format unrecognized, invalid, or unsuitable"


# --- errors ---------------------------------------------------------------------------------------


class CodeVerificationError(SignbridgeError):
    """The code failed verification. ``str()`` is Apple's sentence; ``detail`` says what failed.

    ``architecture`` and ``subcomponent`` locate the failure like Apple's "In architecture:" and
    "In subcomponent:" lines; ``added``/``modified``/``missing`` list resource paths.
    """

    def __init__(
        self,
        status: str,
        detail: str = "",
        *,
        architecture: str | None = None,
        subcomponent: str | None = None,
        added: Sequence[str] = (),
        modified: Sequence[str] = (),
        missing: Sequence[str] = (),
    ) -> None:
        super().__init__(status)
        self.status = status
        self.detail = detail
        self.architecture = architecture
        self.subcomponent = subcomponent
        self.added = tuple(added)
        self.modified = tuple(modified)
        self.missing = tuple(missing)

    def lines(self) -> list[str]:
        """The lines after ``<path>: <status>``: location, resource lists, then the detail."""
        out = []
        if self.subcomponent:
            out.append(f"In subcomponent: {self.subcomponent}")
        if self.architecture:
            out.append(f"In architecture: {self.architecture}")
        out += [f"file added: {path}" for path in self.added]
        out += [f"file modified: {path}" for path in self.modified]
        out += [f"file missing: {path}" for path in self.missing]
        if self.detail:
            out.append(self.detail)
        return out

    def within(
        self, *, architecture: str | None = None, subcomponent: str | None = None
    ) -> CodeVerificationError:
        """The same failure located in a slice or nested piece of code (outermost location kept)."""
        return self.replaced(
            architecture=self.architecture or architecture, subcomponent=self.subcomponent or subcomponent
        )

    def replaced(self, **changes: Any) -> CodeVerificationError:
        """A copy of this error (of the same class) with some of its fields changed."""
        error = copy.copy(self)
        for name, value in changes.items():
            if name not in ("status", "detail", "architecture", "subcomponent", "added", "modified", "missing"):
                raise TypeError(f"CodeVerificationError has no field {name!r}")
            setattr(error, name, tuple(value) if name in ("added", "modified", "missing") else value)
        error.args = (error.status,)
        error.message = error.status
        return error


class NotSignedError(CodeVerificationError):
    def __init__(self, detail: str = "", **location: Any) -> None:
        super().__init__(UNSIGNED, detail, **location)


def read_code_file(path: Path) -> bytes:
    """The file's bytes; a file that exists but cannot be read fails verification."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CodeVerificationError(MODIFIED, f"{path} cannot be read: {exc.strerror or exc}") from None


# --- options and verdicts -------------------------------------------------------------------------


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
