"""Signing Mach-O files end to end: lay out, hash, assemble the embedded signature, write back.

The embedded signature is a SuperBlob (0xfade0cc0) of, in slot order: the primary CodeDirectory
(0), the requirement set (2), XML and DER entitlements (5, 7) when given, alternate
CodeDirectories (0x1000...), and the CMS BlobWrapper (0x10000). Ad-hoc signing (no CMS signer)
sets CS_ADHOC and stores an empty BlobWrapper, as codesign does; the requirement set is the empty
one unless the caller gives another. The CMS itself is produced by the caller's ``cms_signer``,
which receives the finished CodeDirectories (primary first) and returns DER ``ContentInfo`` bytes.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .blobs import (
    ALTERNATE_CODE_DIRECTORY_MAX,
    SUPERBLOB_HEADER_SIZE,
    SUPERBLOB_INDEX_ENTRY_SIZE,
    CodeSignatureFormatError,
    Magic,
    Slot,
    SuperBlob,
    decode_blob,
    decode_superblob,
    encode_blob,
    encode_superblob,
)
from .codedirectory import (
    PAGE_SIZE,
    CodeDirectory,
    CodeDirectoryFlags,
    ExecSegment,
    ExecSegmentFlags,
    HashType,
    build_code_directory,
    choose_version,
    code_directory_size,
    default_hash_types,
)
from .entitlements import der_entitlements_blob, entitlements_blob, exec_segment_flags, load_entitlements
from .macho import MH_EXECUTE, MachO, MachOFile, parse_file
from .macho_writer import build_universal, embed_signature, prepare_signature_layout, signature_offset
from .requirements import EMPTY_REQUIREMENT_SET

DEFAULT_CMS_RESERVE = 18000  # codesign's default room for the CMS blob

CmsSigner = Callable[[Sequence[CodeDirectory]], bytes]

# Special slots whose content is itself stored in the SuperBlob (Info.plist and CodeResources live
# outside the binary and are only hashed).
_EMBEDDED_SPECIAL_SLOTS = frozenset({Slot.REQUIREMENTS, Slot.ENTITLEMENTS, Slot.DER_ENTITLEMENTS})


@dataclass(frozen=True)
class SigningOptions:
    """What goes into each slice's signature. ``flags`` are CodeDirectoryFlags such as RUNTIME.

    ``hash_types`` defaults to codesign's choice for the slice's deployment target. The first
    CodeDirectory is the primary one (slot 0) and SHA-1, when present, is always primary.
    """

    identifier: str
    team_id: str | None = None
    hash_types: tuple[HashType, ...] | None = None
    flags: int = 0
    runtime_version: int | None = None
    entitlements: bytes | None = None
    der_entitlements: bool = True
    requirements: bytes = EMPTY_REQUIREMENT_SET
    info_plist: bytes | None = None
    code_resources: bytes | None = None
    cms_reserve: int = DEFAULT_CMS_RESERVE
    page_size: int = PAGE_SIZE


@dataclass(frozen=True)
class EmbeddedSignature:
    """An embedded signature read back from a slice."""

    superblob: SuperBlob
    code_directories: tuple[CodeDirectory, ...]  # primary first
    requirements: bytes | None
    entitlements: bytes | None
    der_entitlements: bytes | None
    cms: bytes | None  # DER ContentInfo; b"" for an ad-hoc signature's empty wrapper

    @property
    def code_directory(self) -> CodeDirectory:
        return self.code_directories[0]

    @property
    def is_adhoc(self) -> bool:
        return bool(self.code_directory.flags & CodeDirectoryFlags.ADHOC)


def read_signature(macho: MachO) -> EmbeddedSignature | None:
    """The slice's embedded signature, parsed; None when it is unsigned."""
    raw = macho.signature_data
    if raw is None:
        return None
    superblob = decode_superblob(raw, Magic.EMBEDDED_SIGNATURE)
    first = Slot.ALTERNATE_CODE_DIRECTORY
    slots = [Slot.CODE_DIRECTORY, *range(first, first + ALTERNATE_CODE_DIRECTORY_MAX)]
    directories = tuple(CodeDirectory.parse(blob) for slot in slots if (blob := superblob.get(slot)))
    if not directories:
        raise CodeSignatureFormatError("the embedded signature has no CodeDirectory")
    wrapper = superblob.get(Slot.SIGNATURE)
    return EmbeddedSignature(
        superblob=superblob,
        code_directories=directories,
        requirements=superblob.get(Slot.REQUIREMENTS),
        entitlements=superblob.get(Slot.ENTITLEMENTS),
        der_entitlements=superblob.get(Slot.DER_ENTITLEMENTS),
        cms=decode_blob(wrapper, Magic.BLOB_WRAPPER)[1] if wrapper is not None else None,
    )


def sign_file(
    data: bytes,
    options: SigningOptions,
    cms_signer: CmsSigner | None = None,
    *,
    executor: Executor | None = None,
) -> bytes:
    """Sign every slice of a thin or universal Mach-O file; ad hoc when ``cms_signer`` is None."""
    parsed = parse_file(data)
    if executor is None:
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            return _sign_parsed(parsed, options, cms_signer, pool)
    return _sign_parsed(parsed, options, cms_signer, executor)


def sign_path(
    path: str | os.PathLike[str],
    options: SigningOptions,
    cms_signer: CmsSigner | None = None,
    *,
    output: str | os.PathLike[str] | None = None,
    executor: Executor | None = None,
) -> bytes:
    """Sign the file at ``path`` into ``output`` (default: in place) and return the signed bytes.

    The result is written to a temporary file beside the target and renamed over it, so a failure
    at any point leaves both the input and any existing output untouched.
    """
    source = Path(path)
    target = Path(output) if output is not None else source
    signed = sign_file(source.read_bytes(), options, cms_signer, executor=executor)
    mode = source.stat().st_mode & 0o7777
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".signing", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(signed)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        os.unlink(temporary)
        raise
    return signed


def _sign_parsed(
    parsed: MachOFile, options: SigningOptions, cms_signer: CmsSigner | None, executor: Executor
) -> bytes:
    signed = [sign_slice(macho, options, cms_signer, executor=executor) for macho in parsed.slices]
    if parsed.fat_arches is None:
        return signed[0]
    return build_universal(parsed.fat_arches, signed, fat64=parsed.fat64)


def _hash_types(macho: MachO, options: SigningOptions) -> tuple[HashType, ...]:
    if options.hash_types:
        types = tuple(dict.fromkeys(options.hash_types))
    elif macho.build_version is not None:
        types = default_hash_types(macho.build_version.platform, macho.build_version.minos)
    else:
        types = (HashType.SHA256,)
    if HashType.SHA1 in types:
        types = (HashType.SHA1, *(t for t in types if t != HashType.SHA1))
    return types


def _exec_segment(macho: MachO, entitlements: dict | None) -> ExecSegment | None:
    text = macho.text
    if macho.build_version is None or text is None:
        return None
    flags = ExecSegmentFlags(0)
    if macho.filetype == MH_EXECUTE:
        flags |= ExecSegmentFlags.MAIN_BINARY
    if entitlements:
        flags |= exec_segment_flags(entitlements)
    return ExecSegment(text.fileoff, text.filesize, int(flags))


def sign_slice(
    macho: MachO,
    options: SigningOptions,
    cms_signer: CmsSigner | None = None,
    *,
    executor: Executor | None = None,
) -> bytes:
    """One signed thin slice."""
    special: dict[int, bytes] = {Slot.REQUIREMENTS: options.requirements}
    info_plist = options.info_plist if options.info_plist is not None else macho.info_plist
    if info_plist is not None:
        special[Slot.INFO_PLIST] = info_plist
    if options.code_resources is not None:
        special[Slot.RESOURCE_DIR] = options.code_resources
    entitlements = None
    if options.entitlements is not None:
        entitlements = load_entitlements(options.entitlements)
        special[Slot.ENTITLEMENTS] = entitlements_blob(options.entitlements)
        if options.der_entitlements:
            special[Slot.DER_ENTITLEMENTS] = der_entitlements_blob(entitlements)

    flags = options.flags & ~(CodeDirectoryFlags.LINKER_SIGNED | CodeDirectoryFlags.ADHOC)
    if cms_signer is None:
        flags |= CodeDirectoryFlags.ADHOC
    runtime = 0
    if flags & CodeDirectoryFlags.RUNTIME:
        runtime = options.runtime_version or (macho.build_version.sdk if macho.build_version else 0)
    exec_segment = _exec_segment(macho, entitlements)
    hash_types = _hash_types(macho, options)

    code_limit = signature_offset(macho)
    version = choose_version(
        runtime=runtime,
        exec_segment_limit=exec_segment.limit if exec_segment else 0,
        code_limit=code_limit,
        team_id=options.team_id,
    )
    directory_sizes = sum(
        code_directory_size(
            identifier=options.identifier,
            team_id=options.team_id,
            hash_type=hash_type,
            special_slot_count=max(special),
            code_limit=code_limit,
            version=version,
            page_size=options.page_size,
        )
        for hash_type in hash_types
    )
    other_blobs = [blob for slot, blob in special.items() if slot in _EMBEDDED_SPECIAL_SLOTS]
    cms_room = 8 + (options.cms_reserve if cms_signer is not None else 0)
    blob_count = len(hash_types) + len(other_blobs) + 1
    reserve = (
        SUPERBLOB_HEADER_SIZE
        + SUPERBLOB_INDEX_ENTRY_SIZE * blob_count
        + directory_sizes
        + sum(len(blob) for blob in other_blobs)
        + cms_room
    )
    prepared = prepare_signature_layout(macho, reserve)

    directories = [
        build_code_directory(
            prepared.code,
            identifier=options.identifier,
            hash_type=hash_type,
            flags=int(flags),
            team_id=options.team_id,
            special_slot_data=special,
            exec_segment=exec_segment,
            runtime=runtime,
            page_size=options.page_size,
            executor=executor,
        )
        for hash_type in hash_types
    ]
    cms = cms_signer(directories) if cms_signer is not None else b""
    entries = [(int(Slot.CODE_DIRECTORY), directories[0].encode())]
    entries += [(int(Slot.ALTERNATE_CODE_DIRECTORY) + n, cd.encode()) for n, cd in enumerate(directories[1:])]
    entries += [(int(slot), blob) for slot, blob in special.items() if slot in _EMBEDDED_SPECIAL_SLOTS]
    entries.append((int(Slot.SIGNATURE), encode_blob(Magic.BLOB_WRAPPER, cms)))
    return embed_signature(prepared, encode_superblob(Magic.EMBEDDED_SIGNATURE, entries))

