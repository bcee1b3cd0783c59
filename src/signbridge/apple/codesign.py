"""Signing code as Apple's ``codesign -s`` does: Mach-O files (thin or universal) and bundles.

:func:`sign_code` signs a path with an :class:`~signbridge.crypto.identity.Identity` (or ad hoc when the
identity is None) and replaces it atomically: the signed file is written beside the input and
swapped in (:class:`StagedFile`), and a bundle is signed in a staged copy that replaces it only
when every nested piece is signed, so on any failure the input is unchanged.

What it builds, as Apple's tools do:

- Per Mach-O slice, the CodeDirectories (SHA-256; SHA-1 first, as the primary, when the
  deployment target predates macOS 10.11.4 or ``--digest-algorithm`` asks), the requirement set,
  the XML and DER entitlements, and a CMS signature (see :func:`cms_signer`): only the SHA-256 of
  its DER signed attributes goes to ``identity.sign``, and the returned signature is verified
  against the certificate before anything is written.
- The requirement set holds the designated requirement (:func:`designated_requirement`) when
  signing with an identity, as Apple's signer adds it; ad-hoc signatures carry the empty set and
  their designated requirement is implicit (the cdhash).
- The team identifier is the leaf's subject OU when the chain carries Apple's developer
  intermediate markers (Developer ID or WWDR), as codesign only trusts Apple-issued team ids.
- Bundles and ``.ipa`` archives are signed by bundle_signing.py on top of this module: nested
  code innermost first, then ``_CodeSignature/CodeResources``, then the main executable with
  Info.plist in slot 1 and CodeResources in slot 3 (or a detached signature when there is none).

Messages do not name the path; the command line prefixes it, as Apple's does.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol

from ..crypto.hashes import HashAlgorithm
from ..crypto.identity import Identity
from ..crypto.signatures import EcdsaFormat
from ..errors import SignbridgeError, UsageError
from . import cms
from .blobs import (
    CodeSignatureFormatError,
    Magic,
    Slot,
    decode_superblob,
)
from .bundle import exchange_paths
from .codedirectory import (
    CodeDirectory,
    CodeDirectoryFlags,
    HashType,
    default_hash_types,
)
from .ipa import is_ipa
from .macho import (
    MachO,
    MachOFile,
    parse_file,
)
from .macho_signing import (
    DEFAULT_CMS_RESERVE,
    CmsSigner,
    SignedSlice,
    SigningOptions,
    sign_into,
)
from .plist import plist_dict
from .requirements import (
    EMPTY_REQUIREMENT_SET,
    RequirementType,
    encode_requirement_set,
    render,
)
from .signed_code import (
    FLAG_NAMES,
    designated_requirement,
    macho_format,
    preferred_directory,
    preferred_slice,
    stored_designated_requirement,
)
from .trust import CertificateKind, classify_certificate

CMS_DIGEST = HashAlgorithm.SHA256

_SETTABLE_FLAGS = frozenset(name for name, _ in FLAG_NAMES if name not in ("adhoc", "linker-signed"))

_CODE_DIRECTORY_ALGORITHMS = {
    HashType.SHA1: HashAlgorithm.SHA1,
    HashType.SHA256: HashAlgorithm.SHA256,
    HashType.SHA256_TRUNCATED: HashAlgorithm.SHA256,
    HashType.SHA384: HashAlgorithm.SHA384,
    HashType.SHA512: HashAlgorithm.SHA512,
}


# --- errors ---------------------------------------------------------------------------------------


class CodesignError(SignbridgeError):
    """Signing could not be done; the input is unchanged."""


class AlreadySignedError(CodesignError):
    """The code carries a signature and ``--force`` was not given."""

    def __init__(self) -> None:
        super().__init__("is already signed")


class UnsignedNestedCodeError(CodesignError):
    """Nested code is not signed, and ``--deep`` was not given to sign it."""

    def __init__(self, subcomponent: Path) -> None:
        super().__init__("code object is not signed at all")
        self.subcomponent = str(subcomponent)


class FlagsError(UsageError):
    """``--options`` names a flag codesign does not know."""


class UnreadableCodeError(CodesignError):
    """The code (or part of a bundle) cannot be read or written."""


# --- options --------------------------------------------------------------------------------------


def parse_flags(text: str) -> int:
    """The CodeDirectory flags of an ``-o`` value: names (unique prefixes allowed) or a number."""
    value = text.strip()
    if not value:
        raise FlagsError("--options needs a comma-separated list of flags, e.g. runtime")
    try:
        return int(value, 0)
    except ValueError:
        pass
    flags = 0
    for raw in value.split(","):
        word = raw.strip().lower()
        exact = [(name, bit) for name, bit in FLAG_NAMES if name == word]
        matches = exact or [(name, bit) for name, bit in FLAG_NAMES if name.startswith(word) and word]
        if len(matches) != 1 or matches[0][0] not in _SETTABLE_FLAGS:
            known = ", ".join(name for name, _ in FLAG_NAMES if name in _SETTABLE_FLAGS)
            reason = "is ambiguous" if len(matches) > 1 else "is not a flag codesign can set"
            raise FlagsError(f'--options: "{raw.strip()}" {reason}; the flags are {known}')
        flags |= matches[0][1]
    return flags


def parse_digest_algorithms(text: str) -> tuple[HashType, ...]:
    """``--digest-algorithm sha1,sha256``: the CodeDirectory hash types, SHA-1 first when present."""
    types = []
    for name in text.split(","):
        try:
            types.append(HashType.from_name(name.strip()))
        except CodeSignatureFormatError as exc:
            raise UsageError(f"--digest-algorithm: {exc}") from None
    ordered = tuple(dict.fromkeys(types))
    if HashType.SHA1 in ordered:
        ordered = (HashType.SHA1, *(t for t in ordered if t != HashType.SHA1))
    return ordered


@dataclass(frozen=True)
class CodesignOptions:
    """What ``codesign -s`` was asked for. ``flags`` are CodeDirectoryFlags (``-o``).

    ``timestamp_url`` is the TSA to ask (None: no timestamp); ``timestamp`` overrides it with a
    ready :data:`signbridge.apple.cms.Timestamper`. ``entitlements`` are the bytes of the file
    given with ``--entitlements`` (XML or binary plist).
    """

    identifier: str | None = None
    prefix: str | None = None
    force: bool = False
    flags: int = 0
    runtime_version: int | None = None
    entitlements: bytes | None = None
    hash_types: tuple[HashType, ...] | None = None
    timestamp_url: str | None = None
    timestamp: cms.Timestamper | None = None
    deep: bool = False
    signing_time: datetime | None = None


def notarization_warnings(identity: Identity | None, options: CodesignOptions, *, executable: bool = True) -> list[str]:
    """What a Developer ID signature made with ``options`` lacks for notarization (one line each);
    the hardened runtime concerns code (``executable``), not disk images."""
    if identity is None or classify_certificate(identity.certificate) is not CertificateKind.DEVELOPER_ID_APPLICATION:
        return []
    found = []
    if options.timestamp_url is None and options.timestamp is None:
        found.append("signing with a Developer ID identity without --timestamp: the notary service will reject it "
                     "(The signature does not include a secure timestamp.)")
    if executable and not options.flags & CodeDirectoryFlags.RUNTIME:
        found.append("signing with a Developer ID identity without --options runtime: the notary service will reject "
                     "executables (The executable does not have the hardened runtime enabled.)")
    return found


Progress = Callable[[int, int], None]
"""Called with (work done, total work): bytes for a Mach-O file, files for a resource seal."""


class Reporter(Protocol):
    """Where the engine tells the user what it does (the command line prefixes the path)."""

    def note(self, path: Path, message: str) -> None: ...

    def progress(self, description: str) -> contextlib.AbstractContextManager[Progress]:
        """A context whose value is called with (done, total) as the work advances."""
        ...


class QuietReporter:
    """A reporter that keeps notes in a list and shows no progress."""

    def __init__(self) -> None:
        self.notes: list[tuple[Path, str]] = []

    def note(self, path: Path, message: str) -> None:
        self.notes.append((path, message))

    @contextlib.contextmanager
    def progress(self, description: str) -> Iterator[Progress]:
        yield lambda done, total: None


# --- results --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignedCode:
    """What :func:`sign_code` did to one piece of code."""

    path: Path
    identifier: str
    format: str  # as ``codesign -d`` names it: "Mach-O thin (arm64)", "app bundle with ..."
    cdhash: bytes  # of the preferred slice's preferred CodeDirectory
    requirement: str | None  # the designated requirement's text
    nested: tuple[SignedCode, ...] = field(default=(), repr=False)


# --- identifiers ----------------------------------------------------------------------------------


def canonical_identifier(name: str) -> str:
    """Apple's default identifier for a file: the base name without its final (non-numeric)
    extension, and without numeric suffixes after the first (``libfrotz7.3.5.dylib`` -> ``libfrotz7``,
    ``mumble.77.plugin`` -> ``mumble.77``)."""
    text = name.rsplit("/", 1)[-1]
    dot = text.rfind(".")
    if dot >= 0 and dot + 1 < len(text) and not text[dot + 1].isdigit():
        text = text[:dot]
    if not text or text[0] in "0123456789.":
        return text
    position = len(text) - 1
    while position >= 0 and text[position] in "0123456789.":
        position -= 1
    position += 1
    if position < len(text) and text[position] == ".":
        position += 1
    while position < len(text) and text[position].isdigit():
        position += 1
    return text[:position]


def default_identifier(path: Path, info_plist: bytes | None, prefix: str | None) -> str:
    """The identifier codesign uses when ``-i`` is not given: CFBundleIdentifier, else the
    canonical file name, with ``--prefix`` prepended when that has no dot."""
    bundle_id = bundle_identifier(info_plist)
    if bundle_id:
        return bundle_id
    name = canonical_identifier(path.name)
    if prefix and "." not in name:
        return prefix + name
    return name


def bundle_identifier(info_plist: bytes | None) -> str | None:
    if not info_plist:
        return None
    info = plist_dict(info_plist)
    value = info.get("CFBundleIdentifier") if info is not None else None
    return value if isinstance(value, str) and value else None


# --- reading existing signatures ------------------------------------------------------------------


def _code_directory_flags(macho: MachO) -> int | None:
    """The flags of the slice's primary CodeDirectory; None when unsigned. Raises
    CodeSignatureFormatError when the signature cannot be read."""
    raw = macho.signature_data
    if raw is None:
        return None
    superblob = decode_superblob(raw, Magic.EMBEDDED_SIGNATURE)
    directory = superblob.get(Slot.CODE_DIRECTORY)
    if directory is None or len(directory) < 16:
        raise CodeSignatureFormatError("the embedded signature has no CodeDirectory")
    return int.from_bytes(directory[12:16], "big")


def existing_signature_state(parsed: MachOFile) -> str | None:
    """``"signed"``, ``"invalid"`` (a signature that cannot be read) or None (unsigned or only
    linker-signed, which codesign replaces without ``-f``)."""
    state = None
    for macho in parsed.slices:
        try:
            flags = _code_directory_flags(macho)
        except CodeSignatureFormatError:
            state = "invalid"
            continue
        if flags is not None and not flags & CodeDirectoryFlags.LINKER_SIGNED:
            return "signed"
    return state


def replacing_note(state: str) -> str:
    return "replacing existing signature" if state == "signed" else "replacing invalid existing signature"


# --- the CMS --------------------------------------------------------------------------------------


def cms_signer(
    identity: Identity,
    *,
    timestamp: cms.Timestamper | None = None,
    signing_time: datetime | None = None,
) -> CmsSigner:
    """The ``cms_signer`` for :func:`~signbridge.apple.macho_signing.sign_file`: a detached CMS over
    the primary CodeDirectory with Apple's CDHashes attributes, the whole chain, and a timestamp
    when asked. ``identity.sign`` sees one SHA-256 digest of the signed attributes."""
    chain = identity.certificates[1:]

    def sign(directories: Sequence[CodeDirectory]) -> bytes:
        primary = directories[0]
        cdhashes = [directory.cdhash() for directory in directories]
        agile = [(_CODE_DIRECTORY_ALGORITHMS[d.hash_type], d.full_hash()) for d in directories]
        return cms.sign_detached(
            CMS_DIGEST.digest(primary.blob),
            identity.sign,
            identity.certificate,
            chain,
            hash_algorithm=CMS_DIGEST,
            timestamp=timestamp,
            signing_time=signing_time,
            cdhashes_plist=cms.build_cdhashes_plist(cdhashes),
            cdhashes2=agile,
            ecdsa_format=EcdsaFormat.ASN1,
            signer_name=identity.source,
        )

    return sign


def cms_reserve(identity: Identity, hash_types: Sequence[HashType], with_timestamp: bool) -> int:
    """Room for the CMS: an upper bound for this chain, CodeDirectory count and timestamp."""
    return cms.estimate_size(
        identity.certificates,
        with_timestamp=with_timestamp,
        code_directories=[_CODE_DIRECTORY_ALGORITHMS[t] for t in hash_types],
        hash_algorithm=CMS_DIGEST,
    )


def timestamper(options: CodesignOptions) -> cms.Timestamper | None:
    if options.timestamp is not None:
        return options.timestamp
    if options.timestamp_url:
        return cms.timestamper(options.timestamp_url, hash_algorithm=CMS_DIGEST)
    return None


# --- Mach-O ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MachOJob:
    """One Mach-O file to sign, with what its container binds into it."""

    path: Path
    identifier: str | None = None  # None: the default for the file
    info_plist: bytes | None = None  # a bundle's Info.plist (slot 1)
    code_resources: bytes | None = None  # a bundle's CodeResources (slot 3)
    entitlements: bool = True  # whether the options' entitlements apply to this file
    nested: bool = False  # signed because of --deep or as bundle content (no "already signed" stop)


def requirements_and_signer(
    identity: Identity | None, options: CodesignOptions, identifier: str
) -> tuple[bytes, CmsSigner | None]:
    """The requirement set (with the designated requirement when signing with an identity) and
    the CMS signer (None: ad hoc)."""
    if identity is None:
        return EMPTY_REQUIREMENT_SET, None
    requirements = EMPTY_REQUIREMENT_SET
    requirement = designated_requirement(identifier, identity.certificates)
    if requirement is not None:
        requirements = encode_requirement_set({RequirementType.DESIGNATED: requirement})
    return requirements, cms_signer(identity, timestamp=timestamper(options), signing_time=options.signing_time)


@dataclass(frozen=True)
class SlicePlan:
    """What every slice's signature holds besides its code, and who signs it (None: ad hoc)."""

    options: SigningOptions
    signer: CmsSigner | None


def slice_plan(
    parsed: MachOFile,
    identity: Identity | None,
    options: CodesignOptions,
    *,
    identifier: str,
    info_plist: bytes | None = None,
    code_resources: bytes | None = None,
    entitlements: bytes | None = None,
) -> SlicePlan:
    """The signer's part: team id, requirement set, CMS signer and its reserved size."""
    requirements, signer = requirements_and_signer(identity, options, identifier)
    reserve = DEFAULT_CMS_RESERVE
    if identity is not None:
        with_timestamp = options.timestamp is not None or bool(options.timestamp_url)
        reserve = cms_reserve(identity, options.hash_types or widest_default_hash_types(parsed), with_timestamp)
    signing = SigningOptions(
        identifier=identifier,
        team_id=identity.team_id if identity is not None else None,
        hash_types=options.hash_types,
        flags=options.flags,
        runtime_version=options.runtime_version,
        entitlements=entitlements,
        requirements=requirements,
        info_plist=info_plist,
        code_resources=code_resources,
        cms_reserve=reserve,
    )
    return SlicePlan(signing, signer)


def widest_default_hash_types(parsed: MachOFile) -> tuple[HashType, ...]:
    widest: tuple[HashType, ...] = (HashType.SHA256,)
    for macho in parsed.slices:
        if macho.build_version is not None:
            types = default_hash_types(macho.build_version.platform, macho.build_version.minos)
            if len(types) > len(widest):
                widest = types
    return widest


class StagedFile:
    """The output, written beside the target and swapped in by :meth:`commit`; what was never
    written reads as zeros. Removed unless committed.

    Why a whole new file, when signing changes only a few KiB (a Mach-O's header and signature, a
    disk image's signature and trailer): the path must name a complete file at every instant,
    the old one or the new one, whenever this process errs or dies. Written into the input in
    place, the changed bytes take several writes (a write that spans pages can be cut short by a
    SIGKILL between them), and nothing can stand in for the old file meanwhile without a second
    copy of its data. So the new file gets every byte and one rename swaps it in. The unchanged
    bytes are moved by :meth:`copy` (``copy_file_range``): on a file system with reflinks (XFS,
    btrfs) the new file shares the input's blocks and nothing is copied (1 GiB in 50 us); on one
    without (ext4) the kernel copies them while the caller hashes, for about as much CPU time as
    SHA-256 of the same bytes takes or more (0.4-1.5 s per GiB on the build machine, against
    0.6-0.75 s), and the replaced file's blocks are freed when its last descriptor closes. In place would also rewrite every other hard link to the file, and on
    macOS a signed binary modified in place is killed at launch (the kernel caches its
    signature by vnode). The new file is not fsynced: as for any rename-over, durability across
    a power loss is the file system's.
    """

    def __init__(self, target: Path, *, mode_from: Path | None = None) -> None:
        source = mode_from or target
        try:
            self.mode = stat.S_IMODE(source.stat().st_mode)
        except FileNotFoundError:
            self.mode = 0o755
        self.target = target
        try:
            self.descriptor, self.path = tempfile.mkstemp(
                prefix=f".{target.name}.", suffix=".sb-signing", dir=target.parent
            )
        except OSError as exc:
            raise UnreadableCodeError(
                f"cannot write beside {target.name} in {target.parent}: {exc.strerror or exc}"
            ) from None
        self.open = True

    def write(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data)
        while len(view):
            written = os.pwrite(self.descriptor, view, offset)
            view, offset = view[written:], offset + written

    def copy(self, source: int, source_offset: int, length: int, offset: int) -> None:
        """Copy ``length`` bytes of the open file ``source`` (in the kernel where it can)."""
        done = 0
        try:
            while done < length:
                copied = os.copy_file_range(
                    source, self.descriptor, length - done, source_offset + done, offset + done
                )
                if not copied:
                    raise OSError(errno.EIO, "the input file ended early")
                done += copied
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            while done < length:
                chunk = os.pread(source, min(1 << 24, length - done), source_offset + done)
                if not chunk:
                    raise OSError(errno.EIO, "the input file ended early") from None
                self.write(chunk, offset + done)
                done += len(chunk)

    def commit(self, size: int) -> None:
        """Give the file its final size and mode and put it in the target's place."""
        os.ftruncate(self.descriptor, size)
        os.close(self.descriptor)
        self.open = False
        os.chmod(self.path, self.mode)
        if exchange_paths(self.path, self.target):
            os.unlink(self.path)  # now the old file
        else:
            os.replace(self.path, self.target)
        self.committed = True

    def __enter__(self) -> StagedFile:
        self.committed = False
        return self

    def __exit__(self, kind: object, error: object, traceback: object) -> None:
        if self.open:
            os.close(self.descriptor)
            self.open = False
        if not self.committed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        if isinstance(error, OSError) and not isinstance(error, FileNotFoundError | SignbridgeError):
            raise UnreadableCodeError(f"cannot be written: {error.strerror or error}") from error


def read_code(path: Path) -> bytes:
    with mapped(path) as (data, _):
        return bytes(data)


@contextlib.contextmanager
def mapped(path: Path) -> Iterator[tuple[bytes | mmap.mmap, int]]:
    """The file's bytes (memory-mapped, read-only, when it is not empty) and its descriptor."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise
    except IsADirectoryError:
        raise CodesignError("is a directory but not a bundle signbridge can sign") from None
    except OSError as exc:
        raise UnreadableCodeError(f"cannot be read: {exc.strerror or exc}") from None
    try:
        size = os.fstat(descriptor).st_size
        if not size:
            yield b"", descriptor
            return
        try:
            view = mmap.mmap(descriptor, size, prot=mmap.PROT_READ)
        except OSError as exc:
            raise UnreadableCodeError(f"cannot be read: {exc.strerror or exc}") from None
        try:
            yield view, descriptor
        finally:
            # Views into the map may outlive this block (a traceback holds them); the mapping then
            # goes away with the last of them instead of now.
            with contextlib.suppress(BufferError):
                view.close()
    finally:
        os.close(descriptor)


def sign_macho_file(
    job: MachOJob,
    identity: Identity | None,
    options: CodesignOptions,
    reporter: Reporter,
    *,
    executor: Executor,
    output: Path | None = None,
) -> SignedCode:
    """Sign one Mach-O file in place (or into ``output``), atomically.

    The output is written by :func:`~signbridge.apple.macho_signing.sign_into` without copying the
    code through Python, into a :class:`StagedFile` swapped in at the end.
    """
    with mapped(job.path) as (data, descriptor):
        parsed = parse_file(data)
        state = existing_signature_state(parsed)
        if state is not None and not job.nested:
            if not options.force:
                raise AlreadySignedError()
            reporter.note(job.path, replacing_note(state))
        embedded_plist = job.info_plist
        if embedded_plist is None:
            plists = (bytes(m.info_plist) for m in parsed.slices if m.info_plist is not None)
            embedded_plist = next(plists, None)
        identifier = job.identifier or options.identifier
        identifier = identifier or default_identifier(job.path, embedded_plist, options.prefix)
        plan = slice_plan(
            parsed,
            identity,
            options,
            identifier=identifier,
            info_plist=job.info_plist,
            code_resources=job.code_resources,
            entitlements=options.entitlements if job.entitlements else None,
        )
        with StagedFile(output or job.path, mode_from=job.path) as staged:
            with reporter.progress(f"signing {job.path.name}") as advance:
                signed, size = sign_into(
                    staged, parsed, descriptor, plan.options, plan.signer, executor=executor, progress=advance
                )
            result = describe_signed(parsed, signed, job.path)
            staged.commit(size)
    return result


def describe_signed(parsed: MachOFile, signed: Sequence[SignedSlice], path: Path) -> SignedCode:
    """What was just signed: identifier, the preferred cdhash and the designated requirement."""
    chosen = preferred_slice(parsed)
    item = signed[parsed.slices.index(chosen)]
    signature = item.embedded_signature()
    directory = preferred_directory(item.directories)
    requirement = render(stored_designated_requirement(signature, directory))
    return SignedCode(path, directory.identifier, macho_format(parsed), directory.cdhash(), requirement)


# --- the entry point ------------------------------------------------------------------------------


def sign_code(
    path: str | os.PathLike[str],
    identity: Identity | None,
    options: CodesignOptions,
    reporter: Reporter | None = None,
    *,
    executor: Executor | None = None,
) -> SignedCode:
    """Sign the Mach-O file, bundle or ``.ipa`` at ``path`` in place with ``identity`` (None: ad hoc).

    Raises :class:`AlreadySignedError` when it is signed and ``options.force`` is false,
    ``FileNotFoundError`` when it does not exist, a :class:`~signbridge.apple.macho.MachOError` for
    malformed Mach-O, and other :class:`~signbridge.errors.SignbridgeError` subclasses (token,
    timestamp, bundle layout) with the input unchanged.
    """
    # Bundles and archives are signed in bundle_signing.py, which builds on this module.
    from .bundle_signing import sign_bundle, sign_ipa

    target = Path(path)
    reporter = reporter or QuietReporter()
    if not target.exists() and not target.is_symlink():
        raise FileNotFoundError(2, "No such file or directory", str(target))
    own_executor = executor is None
    pool = executor or ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
    try:
        if target.is_dir():
            return sign_bundle(target, identity, options, reporter, executor=pool)
        if is_ipa(target):
            return sign_ipa(target, identity, options, reporter, executor=pool)
        return sign_macho_file(MachOJob(target), identity, options, reporter, executor=pool)
    finally:
        if own_executor:
            pool.shutdown(wait=True)
