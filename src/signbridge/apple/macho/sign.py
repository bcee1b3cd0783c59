"""Signing Mach-O files end to end: lay out, hash, assemble the embedded signature, write back.

The embedded signature is a SuperBlob (0xfade0cc0) of, in slot order: the primary CodeDirectory
(0), the requirement set (2), XML and DER entitlements (5, 7) when given, alternate
CodeDirectories (0x1000...), and the CMS BlobWrapper (0x10000). Ad-hoc signing (no CMS signer)
sets CS_ADHOC and stores an empty BlobWrapper, as codesign does; the requirement set is the empty
one unless the caller gives another. The CMS itself is made by the
:class:`~signbridge.apple.codesig.signer.CmsSigner` handed down by the engine, from the finished
CodeDirectories (primary first).

A slice is never joined into a new buffer while it is signed: :func:`lay_out_slice` computes the
new header and the signature's size before any hashing, :func:`finish_slice` hashes the code where
it lies (the new header, the input's pages, a zero tail) and builds the signature, and the result
is a list of parts: the new header, a view of the unchanged code, the signature. :func:`sign_into`
writes them into an output file, copying the unchanged code from the input file in the kernel
while it is hashed.

:func:`sign_macho_file` is what the engine runs for one file: it reads the file's state (already
signed?), chooses the identifier, plans each slice's signature (:func:`slice_plan`), and writes the
signed file into a staged output swapped in at the end, so on any failure the input is unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import Executor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from ..codesig.blobs import (
    SUPERBLOB_HEADER_SIZE,
    SUPERBLOB_INDEX_ENTRY_SIZE,
    CodeSignatureFormatError,
    Magic,
    Slot,
    decode_superblob,
    encode_blob,
    encode_superblob,
)
from ..codesig.code_files import mapped, staged_code
from ..codesig.codedirectory import (
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
from ..codesig.embedded_signature import EmbeddedSignature, embedded_signature
from ..codesig.entitlements import (
    der_entitlements_blob,
    entitlements_blob,
    exec_segment_flags,
    load_entitlements,
)
from ..codesig.options import (
    AlreadySignedError,
    CodesignOptions,
    Progress,
    Reporter,
    SignedCode,
    default_identifier,
    replacing_note,
)
from ..codesig.requirements.binary import EMPTY_REQUIREMENT_SET
from ..codesig.requirements.text import render
from ..codesig.signed_code import (
    macho_format,
    preferred_directory,
    preferred_slice,
    stored_designated_requirement,
)
from ..codesig.signer import CmsSigner, requirement_set
from .constants import MH_EXECUTE
from .parse import MachO, MachOFile, parse_file
from .writer import (
    SIGNATURE_ALIGNMENT,
    SignatureSpaceError,
    linkedit_data_end,
    round_up,
    signature_header,
    signature_offset,
    universal_layout,
)

DEFAULT_CMS_RESERVE = 18000  # codesign's default room for the CMS blob


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
    requirements: bytes = EMPTY_REQUIREMENT_SET
    info_plist: bytes | None = None
    code_resources: bytes | None = None
    cms_reserve: int = DEFAULT_CMS_RESERVE


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
            page_size=PAGE_SIZE,
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


def _code_parts(header: bytes, body: memoryview, zeros: int) -> list[bytes | memoryview]:
    """The code as pieces that each start on a page boundary: the header with the body up to the
    next page, the body's whole pages (a view, not a copy), the last partial page with the zeros."""
    head_end = min(round_up(len(header), PAGE_SIZE), len(header) + len(body) + zeros)
    in_head = min(head_end - len(header), len(body))
    zeros_in_head = head_end - len(header) - in_head
    head = header + bytes(body[:in_head]) + bytes(zeros_in_head)
    rest = body[in_head:]
    whole = len(rest) - len(rest) % PAGE_SIZE
    tail = bytes(rest[whole:]) + bytes(zeros - zeros_in_head)
    return [head, rest[:whole], tail]


def finish_slice(
    layout: SliceLayout,
    options: SigningOptions,
    signer: CmsSigner | None = None,
    *,
    executor: Executor | None = None,
) -> SignedSlice:
    """Hash the slice's code and build its signature: CodeDirectories, CMS, SuperBlob."""
    parts = _code_parts(layout.header, layout.body, layout.zeros)
    directories = []
    for hash_type in layout.hash_types:
        code_hashes = [
            page for part in parts for page in hash_code(part, hash_type, PAGE_SIZE, executor)
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
            page_size=PAGE_SIZE,
        )
        # Keep the encoding: the cdhash, the CMS and the SuperBlob all need the same bytes.
        directories.append(replace(directory, source=directory.encode()))
    cms = signer.sign(directories) if signer is not None else b""
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


# --- whole files ---------------------------------------------------------------------------------


def file_layout(parsed: MachOFile, sizes: Sequence[int]) -> tuple[bytes, list[int]]:
    """The fat header (empty for a thin file) and where each signed slice of ``sizes`` starts."""
    if parsed.fat_arches is None:
        return b"", [0]
    return universal_layout(parsed.fat_arches, sizes, fat64=parsed.fat64)


class SignedOutput(Protocol):
    """Where :func:`sign_into` writes: positioned writes, and copies from an open input file."""

    def write(self, data: bytes | memoryview, offset: int) -> None: ...

    def copy(self, source: int, source_offset: int, length: int, offset: int) -> None: ...


def sign_into(
    output: SignedOutput,
    parsed: MachOFile,
    source: int,
    options: SigningOptions,
    signer: CmsSigner | None = None,
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
    layouts = [lay_out_slice(macho, options, with_cms=signer is not None) for macho in parsed.slices]
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
                signed.append(finish_slice(layout, options, signer, executor=executor))
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


@dataclass(frozen=True)
class SlicePlan:
    """What every slice's signature holds besides its code, and who signs it (None: ad hoc)."""

    options: SigningOptions
    signer: CmsSigner | None


def slice_plan(
    parsed: MachOFile,
    signer: CmsSigner | None,
    options: CodesignOptions,
    *,
    identifier: str,
    info_plist: bytes | None = None,
    code_resources: bytes | None = None,
    entitlements: bytes | None = None,
) -> SlicePlan:
    """The signer's part: team id, requirement set, CMS signer and its reserved size."""
    reserve = DEFAULT_CMS_RESERVE
    if signer is not None:
        reserve = signer.reserve(options.hash_types or widest_default_hash_types(parsed))
    signing = SigningOptions(
        identifier=identifier,
        team_id=signer.team_id if signer is not None else None,
        hash_types=options.hash_types,
        flags=options.flags,
        runtime_version=options.runtime_version,
        entitlements=entitlements,
        requirements=requirement_set(signer, identifier),
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


def sign_macho_file(
    job: MachOJob,
    signer: CmsSigner | None,
    options: CodesignOptions,
    reporter: Reporter,
    *,
    executor: Executor,
) -> SignedCode:
    """Sign one Mach-O file in place, atomically.

    The output is written by :func:`sign_into` without copying the code through Python, into a
    staged file swapped in at the end (:func:`~signbridge.apple.codesig.code_files.staged_code`).
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
            signer,
            options,
            identifier=identifier,
            info_plist=job.info_plist,
            code_resources=job.code_resources,
            entitlements=options.entitlements if job.entitlements else None,
        )
        with staged_code(job.path) as staged:
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
