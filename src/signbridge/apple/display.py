"""What ``codesign -d`` prints: the signing information of a Mach-O file or bundle, in Apple's format.

:func:`signing_information` reads a signature without judging it (display never verifies, as
Apple's does not); :func:`display_lines` renders it at a verbosity level, line for line as
Apple's ``codesign -d -v...`` writes it::

    Executable=/path/MyApp.app/Contents/MacOS/MyApp
    Identifier=com.example.MyApp
    Format=app bundle with Mach-O universal (x86_64 arm64)
    CodeDirectory v=20500 size=1234 flags=0x10000(runtime) hashes=27+7 location=embedded
    Hash type=sha256 size=32                               (-vvv and up)
    CandidateCDHash sha256=...   CandidateCDHashFull sha256=...   Hash choices=sha256
    CMSDigest=...   CMSDigestType=2   CDHash=...
    Signature size=8950
    Authority=Developer ID Application: ... (TEAMID)       (-vv and up; leaf to root)
    Timestamp=Mar 11, 2021 at 12:44:53 PM
    Notarization Ticket=stapled                            (a bundle with a stapled ticket)
    Info.plist entries=12
    TeamIdentifier=TEAMID
    Runtime Version=11.0.0
    Sealed Resources version=2 rules=13 files=3
    Internal requirements count=1 size=180

Every line goes to standard error except what ``-r-`` and ``--entitlements -`` ask for, which
goes to standard output, as in Apple's tool. Dates are local time in Apple's en_US medium style.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..crypto.cms import CmsFormatError
from ..crypto.names import common_name
from ..errors import SignbridgeError
from .bundle.detached import read_detached_signature
from .bundle.ipa import extracted_app, is_ipa
from .codesig import cms
from .codesig.blobs import CodeSignatureFormatError
from .codesig.codedirectory import CodeDirectory, HashType
from .codesig.embedded_signature import EmbeddedSignature, read_signature
from .codesig.requirements.binary import Expr, RequirementType, parse_requirement_set
from .codesig.requirements.text import render, requirement_set_lines
from .codesig.signed_code import (
    flag_names,
    issuer_chain,
    macho_format,
    preferred_directory,
    preferred_slice,
    stored_designated_requirement,
)
from .codesig.verification import NotSignedError
from .macho.parse import MachO, MachOFile, parse_file
from .notary.stapled import read_stapled_ticket
from .plist import plist_dict

if TYPE_CHECKING:
    from .bundle.layout import Bundle

STDERR = "stderr"
STDOUT = "stdout"

HASH_NAMES = {
    HashType.SHA1: "sha1",
    HashType.SHA256: "sha256",
    HashType.SHA256_TRUNCATED: "sha256T",
    HashType.SHA384: "sha384",
    HashType.SHA512: "sha512",
}
CMS_DIGEST_TYPE = HashType.SHA256


@dataclass(frozen=True)
class ResourceSeal:
    """What ``_CodeSignature/CodeResources`` holds, for the "Sealed Resources" line."""

    version: int
    rules: int
    files: int
    nested: tuple[str, ...] = ()  # files2 entries that are nested code (have a requirement)


@dataclass(frozen=True)
class SigningInformation:
    """One piece of code's signature, read for display."""

    executable: Path  # the Info.plist for a detached signature (it is the code)
    format: str
    signature: EmbeddedSignature = field(repr=False)
    parsed: MachOFile | None = field(default=None, repr=False)  # None for a disk image or a detached signature
    macho: MachO | None = field(default=None, repr=False)
    info_plist: bytes | None = field(default=None, repr=False)
    seal: ResourceSeal | None = None
    stapled_ticket: bool = False  # a notarization ticket is stapled to the code

    @property
    def directory(self) -> CodeDirectory:
        return preferred_directory(self.signature.code_directories)

    @property
    def cms(self) -> cms.ParsedSignature | None:
        return _parsed_cms(self.signature)


def _parsed_cms(signature: EmbeddedSignature) -> cms.ParsedSignature | None:
    if not signature.cms:
        return None
    try:
        return cms.parse_signed_data(signature.cms)
    except CmsFormatError:
        return None


def macho_information(
    executable: Path,
    data: bytes,
    *,
    architecture: str | None = None,
    format_prefix: str = "",
    info_plist: bytes | None = None,
    seal: ResourceSeal | None = None,
    bundle: bool = False,
) -> SigningInformation:
    """The signing information of a Mach-O file (``bundle``: its Info.plist is the bundle's)."""
    parsed = parse_file(data)
    macho = preferred_slice(parsed, architecture)
    try:
        signature = read_signature(macho)
    except CodeSignatureFormatError:
        signature = None
    if signature is None:
        raise NotSignedError()
    return SigningInformation(
        executable=executable,
        format=format_prefix + macho_format(parsed),
        parsed=parsed,
        macho=macho,
        signature=signature,
        info_plist=info_plist if bundle else macho.info_plist,
        seal=seal,
    )


def resource_seal(code_resources: bytes | None) -> ResourceSeal | None:
    """Count the rules and files of a CodeResources plist (version 2 when it has files2);
    :class:`~signbridge.apple.bundle.resources.rules.ResourceSealError` when it is not a valid seal."""
    if code_resources is None:
        return None
    from .bundle.resources.seal import read_code_resources  # bundles only: a Mach-O file has no seal to read

    seal = read_code_resources(code_resources)
    return ResourceSeal(seal.version, len(seal.rules), len(seal.files), seal.nested if seal.version == 2 else ())


def signing_information(
    path: str | os.PathLike[str], *, architecture: str | None = None
) -> SigningInformation:
    """Read the signature of the Mach-O file or bundle at ``path``; :class:`NotSignedError` when
    there is none, ``FileNotFoundError`` when there is no such file."""
    target = Path(path)
    if not target.exists():
        raise FileNotFoundError(2, "No such file or directory", str(target))
    if target.is_dir():
        return bundle_information(target, architecture=architecture)
    if is_ipa(target):
        return ipa_information(target, architecture=architecture)
    return macho_information(target.resolve(), target.read_bytes(), architecture=architecture)


def ipa_information(path: Path, *, architecture: str | None = None) -> SigningInformation:
    """The signing information of the app in an ``.ipa`` (read from a private temporary copy);
    ``Executable=`` names the file inside the archive."""
    with extracted_app(path) as app:
        info = bundle_information(app, architecture=architecture)
        inside = info.executable.relative_to(app.parent.parent)
    return replace(info, executable=path.resolve() / inside)


def bundle_information(path: Path, *, architecture: str | None = None) -> SigningInformation:
    """The signing information of a bundle: its main executable's signature (or its detached
    signature), its Info.plist and seal."""
    from .bundle.layout import Bundle, bundle_format  # not needed for a single Mach-O file

    bundle = Bundle.open(path)
    executable = bundle.executable_path
    seal_bytes = bundle.code_resources_path.read_bytes() if bundle.code_resources_path.is_file() else None
    if executable is None:
        return _detached_information(bundle, seal_bytes)
    data = executable.read_bytes()
    info = macho_information(
        executable,
        data,
        architecture=architecture,
        info_plist=bundle.info_plist_path.read_bytes(),
        seal=resource_seal(seal_bytes),
        bundle=True,
    )
    return SigningInformation(
        executable=info.executable,
        format=bundle_format(bundle, info.format),
        parsed=info.parsed,
        macho=info.macho,
        signature=info.signature,
        info_plist=info.info_plist,
        seal=info.seal,
        stapled_ticket=read_stapled_ticket(bundle.content_root) is not None,
    )


def _detached_information(bundle: Bundle, seal_bytes: bytes | None) -> SigningInformation:
    from .bundle.layout import bundle_format

    try:
        detached = read_detached_signature(bundle.signature_dir)
    except CodeSignatureFormatError:
        detached = None
    if detached is None:
        raise NotSignedError()
    return SigningInformation(
        executable=bundle.info_plist_path,
        format=bundle_format(bundle, None),
        parsed=None,
        macho=None,
        signature=detached.signature,
        info_plist=bundle.info_plist_path.read_bytes(),
        seal=resource_seal(seal_bytes),
    )


# --- rendering ------------------------------------------------------------------------------------


def disk_image_information(path: str | os.PathLike[str]) -> SigningInformation:
    """The image's signature for ``codesign -d`` (read, not judged); :class:`NotSignedError` when it
    holds no CodeDirectory, a :class:`~signbridge.errors.SignbridgeError` when it is malformed."""
    from .dmg.udif import FORMAT, read_layout
    from .dmg.udif import read_signature as read_image_signature

    target = Path(path)
    descriptor = os.open(target, os.O_RDONLY)
    try:
        image = read_layout(target, descriptor)
        try:
            read = read_image_signature(image, descriptor)
        except (CodeSignatureFormatError, ValueError) as exc:
            raise SignbridgeError(f"the code signature cannot be read: {exc}") from None
    finally:
        os.close(descriptor)
    if read is None or read.signature is None:
        raise NotSignedError()
    return SigningInformation(
        executable=target.resolve(),
        format=FORMAT,
        signature=read.signature,
        stapled_ticket=read.ticket is not None,
    )


def format_date(when: datetime) -> str:
    """CFDateFormatter's medium date and time style in en_US, local time: ``Mar 11, 2021 at 12:44:53 PM``."""
    local = (when if when.tzinfo else when.replace(tzinfo=UTC)).astimezone()
    hour = local.hour % 12 or 12
    return f"{local:%b} {local.day}, {local.year} at {hour}:{local:%M:%S} {'AM' if local.hour < 12 else 'PM'}"


def runtime_version(packed: int) -> str:
    """``Runtime Version=`` shows all three components: ``11.0.0``."""
    return f"{packed >> 16}.{(packed >> 8) & 0xFF}.{packed & 0xFF}"


def display_lines(info: SigningInformation, verbose: int, *, nested: bool = False) -> list[tuple[str, str]]:
    """(stream, line) pairs for ``codesign -d`` with ``verbose`` ``-v`` flags after ``-d``."""
    lines: list[tuple[str, str]] = []

    def note(level: int, text: str) -> None:
        if verbose >= level:
            lines.append((STDERR, text))

    directory = info.directory
    directories = info.signature.code_directories
    note(0, f"Executable={info.executable}")
    note(1, f"Identifier={directory.identifier}")
    note(1, f"Format={info.format}")
    note(
        1,
        f"CodeDirectory v={directory.version:x} size={len(directory.blob)} "
        f"flags={flag_names(directory.flags)} "
        f"hashes={len(directory.code_hashes)}+{directory.special_slot_count} location=embedded",
    )
    if directory.platform:
        note(1, f"Platform identifier={directory.platform}")
    build = info.macho.build_version if info.macho is not None else None
    if build is not None:
        note(4, f"VersionPlatform={build.platform}")
        note(4, f"VersionMin={build.minos}")
        note(4, f"VersionSDK={build.sdk}")
    note(3, f"Hash type={HASH_NAMES.get(directory.hash_type, 'UNKNOWN')} size={directory.hash_type.size}")
    for candidate in directories:
        name = HASH_NAMES.get(candidate.hash_type, f"UNKNOWN({int(candidate.hash_type)})")
        note(3, f"CandidateCDHash {name}={candidate.cdhash().hex()}")
        note(3, f"CandidateCDHashFull {name}={candidate.full_hash().hex()}")
    note(3, "Hash choices=" + ",".join(HASH_NAMES.get(d.hash_type, "UNKNOWN") for d in directories))
    note(3, f"CMSDigest={CMS_DIGEST_TYPE.digest(directories[0].blob).hex()}")
    note(3, f"CMSDigestType={int(CMS_DIGEST_TYPE)}")
    if directory.exec_segment_limit:
        note(4, f"Executable Segment base={directory.exec_segment_base}")
        note(4, f"Executable Segment limit={directory.exec_segment_limit}")
        note(4, f"Executable Segment flags={directory.exec_segment_flags:#x}")
    note(4, f"Page size={directory.page_size}")
    if verbose >= 5:
        last = len(directory.code_hashes) if verbose > 5 else 0
        for slot in range(-directory.special_slot_count, last):
            digest = directory.code_hashes[slot] if slot >= 0 else directory.special_slots.get(-slot)
            lines.append((STDERR, f"{slot:6d}={(digest or bytes(directory.hash_type.size)).hex()}"))
    note(3, f"CDHash={directory.cdhash().hex()}")

    if directory.flags & 0x2:  # CS_ADHOC
        note(1, "Signature=adhoc")
    elif info.signature.cms:
        parsed = info.cms
        note(1, f"Signature size={len(info.signature.cms)}")
        if parsed is not None:
            for certificate in issuer_chain(parsed):
                note(2, f"Authority={common_name(certificate)}")
            if parsed.timestamp is not None:
                note(1, f"Timestamp={format_date(parsed.timestamp.gen_time)}")
            elif parsed.signing_time is not None:
                note(1, f"Signed Time={format_date(parsed.signing_time)}")
    else:
        lines.append((STDERR, f"{info.executable}: no signature"))
    if info.stapled_ticket:
        note(1, "Notarization Ticket=stapled")

    plist = plist_dict(info.info_plist) if directory.special_slots.get(1) else None
    note(1, f"Info.plist entries={len(plist)}" if plist is not None else "Info.plist=not bound")
    note(1, f"TeamIdentifier={directory.team_id or 'not set'}")
    if directory.flags & 0x10000 and directory.runtime:
        note(1, f"Runtime Version={runtime_version(directory.runtime)}")
    if info.seal is not None:
        seal = info.seal
        note(1, f"Sealed Resources version={seal.version} rules={seal.rules} files={seal.files}")
        if nested:
            for path in info.seal.nested:
                lines.append((STDERR, f"Nested={path}"))
    else:
        note(1, "Sealed Resources=none")
    requirements = info.signature.requirements
    if requirements is not None:
        try:
            count = len(parse_requirement_set(requirements))
        except CodeSignatureFormatError:
            count = 0
        note(1, f"Internal requirements count={count} size={len(requirements)}")
    else:
        note(1, "Internal requirements=none")
    return lines


def requirement_lines(info: SigningInformation, designated: str | None) -> list[str]:
    """What ``-r-`` prints on standard output: each internal requirement as ``type => text``, and
    ``# designated => ...`` for an implicit designated requirement (``designated``)."""
    explicit: dict[int, Expr] = {}
    if info.signature.requirements:
        try:
            explicit = parse_requirement_set(info.signature.requirements)
        except CodeSignatureFormatError:
            explicit = {}
    lines = requirement_set_lines(explicit)
    if RequirementType.DESIGNATED not in explicit and designated is not None:
        lines.append(f"# designated => {designated}")
    return lines


def implicit_designated(info: SigningInformation) -> str:
    """The designated requirement Apple derives when the signature carries none: from the CMS
    certificates, or ``cdhash H"..."`` for ad-hoc code."""
    return render(stored_designated_requirement(info.signature, info.directory))


# --- entitlements ---------------------------------------------------------------------------------


def entitlements_text(entitlements: dict[str, Any]) -> str:
    """Apple's ``[Dict]`` rendering (``codesign -d --entitlements -``)."""
    lines: list[str] = []
    _render_value(entitlements, 0, lines)
    return "\n".join(lines) + "\n"


def _render_value(value: Any, depth: int, lines: list[str]) -> None:
    indent = "\t" * depth
    if isinstance(value, dict):
        lines.append(f"{indent}[Dict]")
        for key, item in value.items():
            lines.append(f"{indent}\t[Key] {key}")
            lines.append(f"{indent}\t[Value]")
            _render_value(item, depth + 2, lines)
    elif isinstance(value, list | tuple):
        lines.append(f"{indent}[Array]")
        for item in value:
            _render_value(item, depth + 1, lines)
    elif isinstance(value, bool):
        lines.append(f"{indent}[Bool] {'true' if value else 'false'}")
    elif isinstance(value, int):
        lines.append(f"{indent}[Integer] {value}")
    elif isinstance(value, bytes):
        lines.append(f"{indent}[Data] {value.hex()}")
    else:
        lines.append(f"{indent}[String] {value}")
