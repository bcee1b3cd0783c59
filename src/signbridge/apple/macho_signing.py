"""Signing Mach-O files end to end: lay out, hash, assemble the embedded signature, write back.

The embedded signature is a SuperBlob (0xfade0cc0) of, in slot order: the primary CodeDirectory
(0), the requirement set (2), XML and DER entitlements (5, 7) when given, alternate
CodeDirectories (0x1000...), and the CMS BlobWrapper (0x10000). Ad-hoc signing (no CMS signer)
sets CS_ADHOC and stores an empty BlobWrapper, as codesign does; the requirement set is the empty
one unless the caller gives another. The CMS itself is produced by the caller's ``cms_signer``,
which receives the finished CodeDirectories (primary first) and returns DER ``ContentInfo`` bytes.

A slice is never joined into a new buffer while it is signed: :func:`lay_out_slice` computes the
new header and the signature's size before any hashing, :func:`finish_slice` hashes the code where
it lies (the new header, the input's pages, a zero tail) and builds the signature, and the result
is a list of parts: the new header, a view of the unchanged code, the signature. :func:`sign_into`
writes them into an output file, copying the unchanged code from the input file in the kernel
while it is hashed; :func:`sign_file` joins them in memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from .blobs import (
    SUPERBLOB_HEADER_SIZE,
    SUPERBLOB_INDEX_ENTRY_SIZE,
    Magic,
    Slot,
    decode_superblob,
    encode_blob,
    encode_superblob,
)
from .bundle import atomic_write
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
    hash_code,
)
from .embedded_signature import EmbeddedSignature, embedded_signature
from .entitlements import der_entitlements_blob, entitlements_blob, exec_segment_flags, load_entitlements
from .macho import MH_EXECUTE, MachO, MachOFile, parse_file
from .macho_writer import (
    SIGNATURE_ALIGNMENT,
    SignatureSpaceError,
    linkedit_data_end,
    round_up,
    signature_header,
    signature_offset,
    universal_layout,
)
from .requirements import EMPTY_REQUIREMENT_SET

DEFAULT_CMS_RESERVE = 18000  # codesign's default room for the CMS blob

CmsSigner = Callable[[Sequence[CodeDirectory]], bytes]
Progress = Callable[[int, int], None]

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


# --- laying out and signing one slice -----------------------------------------------------------


@dataclass(frozen=True)
class SliceLayout:
    """Everything about a slice's signature that is known before its code is hashed."""

    macho: MachO = field(repr=False)
    header: bytes = field(repr=False)  # the new header region
    body: memoryview = field(repr=False)  # the unchanged code after it, up to the old __LINKEDIT end
    code_limit: int
    reserve: int
    special: dict[int, bytes] = field(repr=False)
    flags: int
    runtime: int
    exec_segment: ExecSegment | None
    hash_types: tuple[HashType, ...]
    version: int

    @property
    def size(self) -> int:
        return self.code_limit + self.reserve

    @property
    def zeros(self) -> int:
        """Zero bytes between the old data and the signature (its 16-byte alignment)."""
        return self.code_limit - len(self.header) - len(self.body)


@dataclass(frozen=True)
class SignedSlice:
    """A signed slice as the parts to write, in order, and its CodeDirectories (primary first)."""

    parts: tuple[bytes | memoryview, ...] = field(repr=False)
    size: int
    directories: tuple[CodeDirectory, ...] = field(repr=False)
    superblob: bytes = field(repr=False)
    signature: bytes = field(default=b"", repr=False)  # the SuperBlob zero-padded to its reserved size

    def embedded_signature(self) -> EmbeddedSignature:
        """The signature as :func:`read_signature` would read it back."""
        return embedded_signature(decode_superblob(self.superblob, Magic.EMBEDDED_SIGNATURE), self.directories)


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


def lay_out_slice(macho: MachO, options: SigningOptions, *, with_cms: bool) -> SliceLayout:
    """The slice's new header and signature size, its special slots and CodeDirectory fields;
    ``with_cms`` is whether a CMS signer will sign it (else it is ad hoc)."""
    special: dict[int, bytes] = {Slot.REQUIREMENTS: options.requirements}
    info_plist = options.info_plist if options.info_plist is not None else macho.info_plist
    if info_plist is not None:
        special[Slot.INFO_PLIST] = bytes(info_plist)
    if options.code_resources is not None:
        special[Slot.RESOURCE_DIR] = options.code_resources
    entitlements = None
    if options.entitlements is not None:
        entitlements = load_entitlements(options.entitlements)
        special[Slot.ENTITLEMENTS] = entitlements_blob(options.entitlements)
        if options.der_entitlements:
            special[Slot.DER_ENTITLEMENTS] = der_entitlements_blob(entitlements)

    flags = options.flags & ~(CodeDirectoryFlags.LINKER_SIGNED | CodeDirectoryFlags.ADHOC)
    if not with_cms:
        flags |= CodeDirectoryFlags.ADHOC
    runtime = 0
    if flags & CodeDirectoryFlags.RUNTIME:
        runtime = options.runtime_version or (macho.build_version.sdk if macho.build_version else 0)
    exec_segment = _exec_segment(macho, entitlements)
    hash_types = _hash_types(macho, options)

    data_end = linkedit_data_end(macho)
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
    embedded = [blob for slot, blob in special.items() if slot in _EMBEDDED_SPECIAL_SLOTS]
    cms_room = 8 + (options.cms_reserve if with_cms else 0)
    reserve = round_up(
        SUPERBLOB_HEADER_SIZE
        + SUPERBLOB_INDEX_ENTRY_SIZE * (len(hash_types) + len(embedded) + 1)
        + directory_sizes
        + sum(len(blob) for blob in embedded)
        + cms_room,
        SIGNATURE_ALIGNMENT,
    )
    header = signature_header(macho, reserve)
    return SliceLayout(
        macho=macho,
        header=header,
        body=memoryview(macho.data)[len(header) : data_end],
        code_limit=code_limit,
        reserve=reserve,
        special=special,
        flags=int(flags),
        runtime=runtime,
        exec_segment=exec_segment,
        hash_types=hash_types,
        version=version,
    )


def _code_parts(header: bytes, body: memoryview, zeros: int, page_size: int) -> list[bytes | memoryview]:
    """The code as pieces that each start on a page boundary: the header with the body up to the
    next page, the body's whole pages (a view, not a copy), the last partial page with the zeros."""
    if not page_size:
        return [b"".join((header, body, bytes(zeros)))]
    head_end = min(round_up(len(header), page_size), len(header) + len(body) + zeros)
    in_head = min(head_end - len(header), len(body))
    zeros_in_head = head_end - len(header) - in_head
    head = header + bytes(body[:in_head]) + bytes(zeros_in_head)
    rest = body[in_head:]
    whole = len(rest) - len(rest) % page_size
    tail = bytes(rest[whole:]) + bytes(zeros - zeros_in_head)
    return [head, rest[:whole], tail]


def finish_slice(
    layout: SliceLayout,
    options: SigningOptions,
    cms_signer: CmsSigner | None = None,
    *,
    executor: Executor | None = None,
) -> SignedSlice:
    """Hash the slice's code and build its signature: CodeDirectories, CMS, SuperBlob."""
    parts = _code_parts(layout.header, layout.body, layout.zeros, options.page_size)
    directories = []
    for hash_type in layout.hash_types:
        code_hashes = [
            page for part in parts for page in hash_code(part, hash_type, options.page_size, executor)
        ]
        directory = build_code_directory(
            None,
            code_hashes=code_hashes,
            code_limit=layout.code_limit,
            identifier=options.identifier,
            hash_type=hash_type,
            flags=layout.flags,
            team_id=options.team_id,
            special_slot_data=layout.special,
            exec_segment=layout.exec_segment,
            runtime=layout.runtime,
            page_size=options.page_size,
        )
        # Keep the encoding: the cdhash, the CMS and the SuperBlob all need the same bytes.
        directories.append(replace(directory, source=directory.encode()))
    cms = cms_signer(directories) if cms_signer is not None else b""
    entries = [(int(Slot.CODE_DIRECTORY), directories[0].blob)]
    entries += [(int(Slot.ALTERNATE_CODE_DIRECTORY) + n, cd.blob) for n, cd in enumerate(directories[1:])]
    entries += [(int(slot), blob) for slot, blob in layout.special.items() if slot in _EMBEDDED_SPECIAL_SLOTS]
    entries.append((int(Slot.SIGNATURE), encode_blob(Magic.BLOB_WRAPPER, cms)))
    superblob = encode_superblob(Magic.EMBEDDED_SIGNATURE, entries)
    if len(superblob) > layout.reserve:
        raise SignatureSpaceError(
            f"the signature is {len(superblob)} bytes but only {layout.reserve} were reserved for it"
        )
    signature = superblob + bytes(layout.reserve - len(superblob))
    written: list[bytes | memoryview] = [layout.header]
    if len(layout.body):
        written.append(layout.body)
    written += [part for part in (bytes(layout.zeros), signature) if len(part)]
    return SignedSlice(
        parts=tuple(written),
        size=layout.size,
        directories=tuple(directories),
        superblob=superblob,
        signature=signature,
    )


def sign_slice(
    macho: MachO,
    options: SigningOptions,
    cms_signer: CmsSigner | None = None,
    *,
    executor: Executor | None = None,
) -> bytes:
    """One signed thin slice."""
    layout = lay_out_slice(macho, options, with_cms=cms_signer is not None)
    return b"".join(finish_slice(layout, options, cms_signer, executor=executor).parts)


# --- whole files ---------------------------------------------------------------------------------


def file_layout(parsed: MachOFile, sizes: Sequence[int]) -> tuple[bytes, list[int]]:
    """The fat header (empty for a thin file) and where each signed slice of ``sizes`` starts."""
    if parsed.fat_arches is None:
        return b"", [0]
    return universal_layout(parsed.fat_arches, sizes, fat64=parsed.fat64)


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
            return sign_file(data, options, cms_signer, executor=pool)
    layouts = [lay_out_slice(macho, options, with_cms=cms_signer is not None) for macho in parsed.slices]
    signed = [finish_slice(layout, options, cms_signer, executor=executor) for layout in layouts]
    fat_header, offsets = file_layout(parsed, [item.size for item in signed])
    parts: list[bytes | memoryview] = [fat_header]
    position = len(fat_header)
    for offset, item in zip(offsets, signed, strict=True):
        parts.append(bytes(offset - position))
        parts.extend(item.parts)
        position = offset + item.size
    return b"".join(parts)


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
    signed = sign_file(source.read_bytes(), options, cms_signer, executor=executor)
    mode = source.stat().st_mode & 0o7777
    atomic_write(Path(output) if output is not None else source, signed, mode=mode)
    return signed


class SignedOutput(Protocol):
    """Where :func:`sign_into` writes: positioned writes, and copies from an open input file."""

    def write(self, data: bytes | memoryview, offset: int) -> None: ...

    def copy(self, source: int, source_offset: int, length: int, offset: int) -> None: ...


def sign_into(
    output: SignedOutput,
    parsed: MachOFile,
    source: int,
    options: SigningOptions,
    cms_signer: CmsSigner | None = None,
    *,
    executor: Executor,
    progress: Progress | None = None,
) -> tuple[list[SignedSlice], int]:
    """Sign ``parsed`` (read from the open file ``source``) into ``output``; the signed slices and
    the output's size. The output is laid out before any hashing; ``executor`` copies each
    slice's code (from its first byte, so that a file system with reflinks shares the blocks
    instead) into it while the pages are hashed, then the new headers are written over the old
    ones and the signatures after them. ``progress`` is called with (bytes done, bytes in all). The views of ``parsed`` the
    slices' ``parts`` hold are released on return (the caller may unmap the input)."""
    total = os.fstat(source).st_size
    layouts = [lay_out_slice(macho, options, with_cms=cms_signer is not None) for macho in parsed.slices]
    try:
        fat_header, offsets = file_layout(parsed, [layout.size for layout in layouts])
        sources = [arch.offset for arch in parsed.fat_arches] if parsed.fat_arches is not None else [0]
        copies = []
        for layout, start, offset in zip(layouts, sources, offsets, strict=True):
            # From the slice's start, old header included (the new one is written over it): a
            # file system with reflinks shares only whole blocks, so the copy must start on one.
            length = len(layout.header) + len(layout.body)
            if len(layout.body):
                copies.append(executor.submit(output.copy, source, start, length, offset))
        try:
            signed: list[SignedSlice] = []
            for layout in layouts:
                if progress is not None:
                    progress(sum(item.size for item in signed), total)
                signed.append(finish_slice(layout, options, cms_signer, executor=executor))
            if progress is not None:
                progress(total, total)
        finally:
            # The copies write into the output: they must be over before it is closed.
            wait(copies)
        for copy in copies:
            copy.result()
        if fat_header:
            output.write(fat_header, 0)
        for layout, item, offset in zip(layouts, signed, offsets, strict=True):
            output.write(layout.header, offset)
            output.write(item.signature, offset + layout.code_limit)
        return signed, offsets[-1] + layouts[-1].size
    finally:
        for layout in layouts:
            layout.body.release()
