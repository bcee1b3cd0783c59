"""Mach-O parsing: thin slices (32/64-bit, either byte order) and universal (fat, fat64) files.

Parsing validates what signing relies on and raises a specific :class:`MachOError` subclass
otherwise: truncated files, wrong magic numbers, absurd load-command counts or sizes, overlapping
universal slices, content inside the header and load commands, and a code signature that is not
the last thing in ``__LINKEDIT`` (:func:`check_layout`, the one layout check for readers and signers).
Messages do not name the file; the command line prefixes the path.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from ...errors import SignbridgeError
from .constants import (
    CPU_SUBTYPE_MASK,
    FAT_ARCH_64_SIZE,
    FAT_ARCH_SIZE,
    FAT_HEADER_SIZE,
    FAT_MAGIC,
    FAT_MAGIC_64,
    FILE_TYPE_NAMES,
    LC_BUILD_VERSION,
    LC_CODE_SIGNATURE,
    LC_DYLD_INFO,
    LC_DYLD_INFO_ONLY,
    LC_DYSYMTAB,
    LC_SEGMENT,
    LC_SEGMENT_64,
    LC_SYMTAB,
    LINKEDIT_DATA_COMMAND_SIZE,
    LINKEDIT_DATA_COMMANDS,
    MACH_HEADER_64_SIZE,
    MACH_HEADER_SIZE,
    MAX_FAT_ARCHES,
    MAX_LOAD_COMMANDS,
    MAX_SECTIONS,
    MH_CIGAM,
    MH_CIGAM_64,
    MH_MAGIC,
    MH_MAGIC_64,
    PLATFORM_NAMES,
    S_GB_ZEROFILL,
    S_THREAD_LOCAL_ZEROFILL,
    S_ZEROFILL,
    SECTION_TYPE,
    VERSION_MIN_PLATFORMS,
    arch_name,
    format_version,
)


class MachOError(SignbridgeError):
    """The file is not a Mach-O file signbridge can sign."""


class NotMachOError(MachOError):
    """The file does not start with a Mach-O or universal magic number."""


class TruncatedMachOError(MachOError):
    """The file ends before something its headers say is there."""


class LoadCommandError(MachOError):
    """The load commands are inconsistent: absurd counts or sizes, commands that overrun their table."""


class FatLayoutError(MachOError):
    """The universal header is inconsistent: no slices, too many, overlapping or duplicated slices."""


class SignatureLayoutError(MachOError):
    """The code signature is not the last data of ``__LINKEDIT``, or ``__LINKEDIT`` is not last."""


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")


class LoadCommand(NamedTuple):
    cmd: int
    size: int
    offset: int  # from the start of the slice


class Section(NamedTuple):
    segment_name: str
    name: str
    addr: int
    size: int
    offset: int
    align: int
    flags: int

    @property
    def is_zerofill(self) -> bool:
        return (self.flags & SECTION_TYPE) in (S_ZEROFILL, S_GB_ZEROFILL, S_THREAD_LOCAL_ZEROFILL)


class Segment(NamedTuple):
    name: str
    vmaddr: int
    vmsize: int
    fileoff: int
    filesize: int
    maxprot: int
    initprot: int
    flags: int
    sections: tuple[Section, ...]
    command_offset: int  # of its load command, from the start of the slice

    @property
    def file_end(self) -> int:
        return self.fileoff + self.filesize


class LinkeditData(NamedTuple):
    """A ``linkedit_data_command`` such as LC_CODE_SIGNATURE."""

    cmd: int
    dataoff: int
    datasize: int
    command_offset: int

    @property
    def end(self) -> int:
        return self.dataoff + self.datasize


class BuildVersion(NamedTuple):
    """The platform and versions from LC_BUILD_VERSION or LC_VERSION_MIN_*; versions nibble-packed."""

    platform: int
    minos: int
    sdk: int
    cmd: int

    @property
    def platform_name(self) -> str:
        return PLATFORM_NAMES.get(self.platform, f"platform {self.platform}")

    def __str__(self) -> str:
        return f"{self.platform_name} {format_version(self.minos)} (SDK {format_version(self.sdk)})"


@dataclass(frozen=True, eq=False)
class MachO:
    """One thin Mach-O image; offsets are relative to its own start."""

    data: bytes = field(repr=False)
    byteorder: str  # struct prefix: "<" or ">"
    is_64: bool
    cputype: int
    cpusubtype: int
    filetype: int
    ncmds: int
    sizeofcmds: int
    flags: int
    load_commands: tuple[LoadCommand, ...] = field(repr=False)
    segments: tuple[Segment, ...] = field(repr=False)
    linkedit_data: tuple[LinkeditData, ...] = field(repr=False)
    code_signature: LinkeditData | None
    build_version: BuildVersion | None

    @property
    def arch(self) -> str:
        return arch_name(self.cputype, self.cpusubtype)

    @property
    def file_type_name(self) -> str:
        return FILE_TYPE_NAMES.get(self.filetype, f"file type {self.filetype}")

    @property
    def header_size(self) -> int:
        return MACH_HEADER_64_SIZE if self.is_64 else MACH_HEADER_SIZE

    @property
    def load_commands_end(self) -> int:
        return self.header_size + self.sizeofcmds

    def segment(self, name: str) -> Segment | None:
        for segment in self.segments:
            if segment.name == name:
                return segment
        return None

    def section(self, segment_name: str, section_name: str) -> Section | None:
        segment = self.segment(segment_name)
        if segment is None:
            return None
        for section in segment.sections:
            if section.name == section_name:
                return section
        return None

    @property
    def text(self) -> Segment | None:
        return self.segment("__TEXT")

    @property
    def linkedit(self) -> Segment | None:
        return self.segment("__LINKEDIT")

    @property
    def signature_data(self) -> bytes | None:
        """The raw bytes LC_CODE_SIGNATURE points at (a SuperBlob, possibly zero-padded)."""
        if self.code_signature is None:
            return None
        return self.data[self.code_signature.dataoff : self.code_signature.end]

    @property
    def info_plist(self) -> bytes | None:
        """The embedded Info.plist (section ``__TEXT,__info_plist``) of a bare executable."""
        section = self.section("__TEXT", "__info_plist")
        if section is None or section.is_zerofill:
            return None
        return self.data[section.offset : section.offset + section.size]

    def contents(self) -> Iterator[tuple[str, int]]:
        """(what, file offset) of every section, and section-less segment, with bytes in the file. A
        section-less segment at offset 0 maps the header itself (``__TEXT``) and is left out."""
        for segment in self.segments:
            if not segment.filesize:
                continue  # not in the file (__PAGEZERO, a dSYM's __TEXT): neither are its sections
            if not segment.sections:
                if segment.fileoff:
                    yield f"segment {segment.name}", segment.fileoff
                continue
            for section in segment.sections:
                if section.size and not section.is_zerofill:
                    yield f"section {section.segment_name},{section.name}", section.offset

    @property
    def first_content_offset(self) -> int:
        """Where the first section (or section-less segment) content starts: load commands end before."""
        return min((offset for _, offset in self.contents()), default=len(self.data))

    @property
    def header_padding(self) -> int:
        """Free bytes between the end of the load commands and the first section content."""
        return self.first_content_offset - self.load_commands_end

    def fmt(self, code: str) -> str:
        return self.byteorder + code


class FatArch(NamedTuple):
    cputype: int
    cpusubtype: int
    offset: int
    size: int
    align: int  # power of two exponent

    @property
    def arch(self) -> str:
        return arch_name(self.cputype, self.cpusubtype)

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True, eq=False)
class MachOFile:
    """A Mach-O file: one thin slice, or a universal file with its fat header."""

    slices: tuple[MachO, ...]
    fat_arches: tuple[FatArch, ...] | None = None
    fat64: bool = False

    @property
    def is_universal(self) -> bool:
        return self.fat_arches is not None


def _describe_magic(data: bytes) -> str:
    head = data[:4]
    if head == b"\x7fELF":
        return "an ELF file"
    if head[:2] == b"MZ":
        return "a Windows PE file"
    if head[:2] == b"#!":
        return "a script"
    if head == b"!<ar":
        return "an archive"
    if head == b"xar!":
        return "a xar archive (flat package)"
    return f"magic number 0x{head.hex()}"


def parse_file(data: bytes) -> MachOFile:
    """Parse a thin or universal Mach-O file."""
    if len(data) < 4:
        raise TruncatedMachOError(f"the file is {len(data)} bytes long, too short to be a Mach-O file")
    (magic,) = struct.unpack_from(">I", data)
    if magic in (FAT_MAGIC, FAT_MAGIC_64):
        return _parse_universal(data, fat64=magic == FAT_MAGIC_64)
    return MachOFile(slices=(parse_macho(data),))


def _parse_universal(data: bytes, *, fat64: bool) -> MachOFile:
    if len(data) < FAT_HEADER_SIZE:
        raise TruncatedMachOError("the file ends inside its universal header")
    (count,) = struct.unpack_from(">I", data, 4)
    if count == 0:
        raise FatLayoutError("the universal header lists no architectures")
    if count > MAX_FAT_ARCHES:
        raise FatLayoutError(
            f"the universal header claims {count} architectures; this is not a Mach-O universal file "
            "(Java class files share its magic number)"
        )
    entry_size = FAT_ARCH_64_SIZE if fat64 else FAT_ARCH_SIZE
    header_end = FAT_HEADER_SIZE + count * entry_size
    if header_end > len(data):
        raise TruncatedMachOError(
            f"the universal header lists {count} architectures but the file ends after {len(data)} bytes"
        )
    arches = []
    for number in range(count):
        position = FAT_HEADER_SIZE + number * entry_size
        if fat64:
            fields = struct.unpack_from(">iiQQII", data, position)
            cputype, cpusubtype, offset, size, align = fields[:5]
        else:
            cputype, cpusubtype, offset, size, align = struct.unpack_from(">iiIII", data, position)
        arches.append(FatArch(cputype & 0xFFFFFFFF, cpusubtype & 0xFFFFFFFF, offset, size, align))
    _check_fat_layout(arches, header_end, len(data))
    slices = []
    for arch in arches:
        try:
            macho = parse_macho(data[arch.offset : arch.end])
        except MachOError as error:
            raise type(error)(f"{arch.arch} slice: {error}") from error
        if macho.cputype != arch.cputype:
            raise FatLayoutError(
                f"the universal header says the slice at offset {arch.offset} is {arch.arch}, "
                f"but it holds {macho.arch} code"
            )
        slices.append(macho)
    return MachOFile(slices=tuple(slices), fat_arches=tuple(arches), fat64=fat64)


def _check_fat_layout(arches: list[FatArch], header_end: int, file_size: int) -> None:
    seen: set[tuple[int, int]] = set()
    for arch in arches:
        key = (arch.cputype, arch.cpusubtype & ~CPU_SUBTYPE_MASK)
        if key in seen:
            raise FatLayoutError(f"the universal header lists {arch.arch} twice")
        seen.add(key)
        if arch.size == 0:
            raise FatLayoutError(f"the {arch.arch} slice is empty")
        if arch.align > 31:
            raise FatLayoutError(f"the {arch.arch} slice claims an alignment of 2^{arch.align}")
        if arch.offset < header_end:
            raise FatLayoutError(
                f"the {arch.arch} slice starts at offset {arch.offset}, inside the universal header "
                f"(which ends at {header_end})"
            )
        if arch.end > file_size:
            raise TruncatedMachOError(
                f"the {arch.arch} slice ends at offset {arch.end}, but the file is {file_size} bytes long"
            )
    ordered = sorted(arches, key=lambda arch: arch.offset)
    for first, second in zip(ordered, ordered[1:], strict=False):
        if second.offset < first.end:
            raise FatLayoutError(
                f"the {first.arch} slice (bytes {first.offset}-{first.end}) and the {second.arch} slice "
                f"(bytes {second.offset}-{second.end}) overlap"
            )


def parse_macho(data: bytes) -> MachO:
    """Parse one thin Mach-O image (a whole thin file or one slice of a universal file)."""
    if len(data) < 4:
        raise TruncatedMachOError(f"the file is {len(data)} bytes long, too short to be a Mach-O file")
    (magic,) = struct.unpack_from("<I", data)
    if magic in (MH_MAGIC, MH_MAGIC_64):
        byteorder = "<"
    elif magic in (MH_CIGAM, MH_CIGAM_64):
        byteorder = ">"
    elif struct.unpack_from(">I", data)[0] in (FAT_MAGIC, FAT_MAGIC_64):
        raise NotMachOError("a universal file was given where a single-architecture Mach-O was expected")
    else:
        raise NotMachOError(f"not a Mach-O file: it starts with {_describe_magic(data)}")
    is_64 = magic in (MH_MAGIC_64, MH_CIGAM_64)
    header_size = MACH_HEADER_64_SIZE if is_64 else MACH_HEADER_SIZE
    if len(data) < header_size:
        raise TruncatedMachOError(f"the file ends inside its Mach-O header ({len(data)} bytes)")
    _, cputype, cpusubtype, filetype, ncmds, sizeofcmds, flags = struct.unpack_from(byteorder + "7I", data)

    if sizeofcmds > len(data) - header_size:
        raise TruncatedMachOError(
            f"the load commands claim {sizeofcmds} bytes, but the file ends {len(data) - header_size} bytes "
            "after the header"
        )
    if ncmds > MAX_LOAD_COMMANDS:
        raise LoadCommandError(
            f"the header claims {ncmds} load commands; signbridge reads at most {MAX_LOAD_COMMANDS}"
        )
    if ncmds * 8 > sizeofcmds:
        raise LoadCommandError(
            f"the header claims {ncmds} load commands, which cannot fit in {sizeofcmds} bytes of "
            "load commands"
        )
    parser = _LoadCommandParser(data, byteorder, is_64, header_size, ncmds, sizeofcmds)
    parser.parse()
    macho = MachO(
        data=data,
        byteorder=byteorder,
        is_64=is_64,
        cputype=cputype,
        cpusubtype=cpusubtype,
        filetype=filetype,
        ncmds=ncmds,
        sizeofcmds=sizeofcmds,
        flags=flags,
        load_commands=tuple(parser.commands),
        segments=tuple(parser.segments),
        linkedit_data=tuple(parser.linkedit_data),
        code_signature=parser.code_signature,
        build_version=parser.build_version,
    )
    check_layout(macho)
    return macho


_FIXED_SIZES = {LC_SYMTAB: 24, LC_DYSYMTAB: 80, LC_DYLD_INFO: 48, LC_DYLD_INFO_ONLY: 48}


class _LoadCommandParser:
    def __init__(
        self, data: bytes, byteorder: str, is_64: bool, header_size: int, ncmds: int, sizeofcmds: int
    ) -> None:
        self.data = data
        self.byteorder = byteorder
        self.is_64 = is_64
        self.header_size = header_size
        self.ncmds = ncmds
        self.sizeofcmds = sizeofcmds
        self.commands: list[LoadCommand] = []
        self.segments: list[Segment] = []
        self.linkedit_data: list[LinkeditData] = []
        self.code_signature: LinkeditData | None = None
        self.build_version: BuildVersion | None = None
        self.sections = 0  # in all segments so far

    def unpack(self, code: str, offset: int) -> tuple:
        return struct.unpack_from(self.byteorder + code, self.data, offset)

    def parse(self) -> None:
        offset = self.header_size
        end = self.header_size + self.sizeofcmds
        alignment = 8 if self.is_64 else 4
        for number in range(self.ncmds):
            if offset + 8 > end:
                raise LoadCommandError(
                    f"load command {number} of {self.ncmds} starts past the {self.sizeofcmds} bytes of "
                    "load commands"
                )
            cmd, cmdsize = self.unpack("II", offset)
            if cmdsize < 8 or cmdsize % 4:
                raise LoadCommandError(
                    f"load command {number} (cmd {cmd:#x}) has an impossible size {cmdsize}"
                )
            if offset + cmdsize > end:
                raise LoadCommandError(
                    f"load command {number} (cmd {cmd:#x}, {cmdsize} bytes) runs past the end of the "
                    f"load commands ({self.sizeofcmds} bytes)"
                )
            if cmdsize % alignment and cmd in (LC_SEGMENT_64, LC_CODE_SIGNATURE):
                raise LoadCommandError(f"load command {number} (cmd {cmd:#x}) size {cmdsize} is misaligned")
            self.commands.append(LoadCommand(cmd, cmdsize, offset))
            self.parse_command(number, cmd, cmdsize, offset)
            offset += cmdsize
        if offset != end:
            raise LoadCommandError(
                f"the {self.ncmds} load commands take {offset - self.header_size} bytes, but the header "
                f"says {self.sizeofcmds}"
            )

    def parse_command(self, number: int, cmd: int, cmdsize: int, offset: int) -> None:
        if cmd in (LC_SEGMENT, LC_SEGMENT_64):
            self.segments.append(self.parse_segment(number, cmd, cmdsize, offset))
        elif cmd in LINKEDIT_DATA_COMMANDS:
            if cmdsize != LINKEDIT_DATA_COMMAND_SIZE:
                raise LoadCommandError(
                    f"load command {number} (cmd {cmd:#x}) should be 16 bytes, not {cmdsize}"
                )
            dataoff, datasize = self.unpack("II", offset + 8)
            entry = LinkeditData(cmd, dataoff, datasize, offset)
            self.check_in_file(f"the data of load command {number} (cmd {cmd:#x})", dataoff, datasize)
            self.linkedit_data.append(entry)
            if cmd == LC_CODE_SIGNATURE:
                if self.code_signature is not None:
                    raise LoadCommandError("the file has two LC_CODE_SIGNATURE load commands")
                self.code_signature = entry
        elif cmd in _FIXED_SIZES and cmdsize != _FIXED_SIZES[cmd]:
            raise LoadCommandError(
                f"load command {number} (cmd {cmd:#x}) should be {_FIXED_SIZES[cmd]} bytes, not {cmdsize}"
            )
        elif cmd == LC_BUILD_VERSION:
            if cmdsize < 24:
                raise LoadCommandError(f"LC_BUILD_VERSION is {cmdsize} bytes, too short")
            platform, minos, sdk = self.unpack("III", offset + 8)
            self.set_build_version(BuildVersion(platform, minos, sdk, cmd))
        elif cmd in VERSION_MIN_PLATFORMS:
            if cmdsize < 16:
                raise LoadCommandError(f"load command {number} (cmd {cmd:#x}) is {cmdsize} bytes, too short")
            version, sdk = self.unpack("II", offset + 8)
            self.set_build_version(BuildVersion(VERSION_MIN_PLATFORMS[cmd], version, sdk, cmd))

    def set_build_version(self, version: BuildVersion) -> None:
        # LC_BUILD_VERSION wins over the older LC_VERSION_MIN_* when a file carries both.
        if self.build_version is None or version.cmd == LC_BUILD_VERSION:
            self.build_version = version

    def check_in_file(self, what: str, offset: int, size: int) -> None:
        if offset + size > len(self.data):
            raise TruncatedMachOError(
                f"{what} ends at offset {offset + size}, past the end of the file ({len(self.data)} bytes)"
            )

    def parse_segment(self, number: int, cmd: int, cmdsize: int, offset: int) -> Segment:
        if cmd == LC_SEGMENT_64:
            header_code, header_size, section_code, section_size = "16sQQQQiiII", 72, "16s16sQQIIIIIIII", 80
        else:
            header_code, header_size, section_code, section_size = "16sIIIIiiII", 56, "16s16sIIIIIIIII", 68
        if cmdsize < header_size:
            raise LoadCommandError(f"segment load command {number} is {cmdsize} bytes, too short")
        raw_name, vmaddr, vmsize, fileoff, filesize, maxprot, initprot, nsects, flags = self.unpack(
            header_code, offset + 8
        )
        name = _text(raw_name)
        self.sections += nsects
        if self.sections > MAX_SECTIONS:
            raise LoadCommandError(f"the segments claim more than {MAX_SECTIONS} sections in all")
        if cmdsize != header_size + nsects * section_size:
            raise LoadCommandError(
                f"segment {name} claims {nsects} sections, which do not fit its {cmdsize}-byte load command"
            )
        self.check_in_file(f"segment {name}", fileoff, filesize)
        sections = []
        for index in range(nsects):
            position = offset + header_size + index * section_size
            raw_sect, raw_seg, addr, size, sect_offset, align, _reloff, _nreloc, sect_flags, *_ = self.unpack(
                section_code, position
            )
            section = Section(_text(raw_seg), _text(raw_sect), addr, size, sect_offset, align, sect_flags)
            if not section.is_zerofill and section.size:
                self.check_in_file(f"section {section.segment_name},{section.name}", sect_offset, size)
            sections.append(section)
        return Segment(
            name, vmaddr, vmsize, fileoff, filesize, maxprot, initprot, flags, tuple(sections), offset
        )


def linkedit_ranges(macho: MachO) -> Iterator[tuple[str, int, int]]:
    """(what, start, end) of every ``__LINKEDIT`` table the load commands point at, signature excluded."""
    for entry in macho.linkedit_data:
        if entry.cmd != LC_CODE_SIGNATURE and entry.datasize:
            yield f"load command {entry.cmd:#x}", entry.dataoff, entry.end
    nlist_size = 16 if macho.is_64 else 12
    for command in macho.load_commands:
        at = command.offset
        if command.cmd == LC_SYMTAB:
            symoff, nsyms, stroff, strsize = struct.unpack_from(macho.fmt("IIII"), macho.data, at + 8)
            if nsyms:
                yield "the symbol table", symoff, symoff + nsyms * nlist_size
            if strsize:
                yield "the string table", stroff, stroff + strsize
        elif command.cmd == LC_DYSYMTAB:
            fields = struct.unpack_from(macho.fmt("18I"), macho.data, at + 8)
            tables = (  # (offset field, count field, entry size) of the dysymtab_command
                ("the table of contents", 6, 7, 8),
                ("the module table", 8, 9, 56 if macho.is_64 else 52),
                ("the external reference table", 10, 11, 4),
                ("the indirect symbol table", 12, 13, 4),
                ("the external relocations", 14, 15, 8),
                ("the local relocations", 16, 17, 8),
            )
            for what, offset_index, count_index, entry_size in tables:
                if fields[count_index]:
                    start = fields[offset_index]
                    yield what, start, start + fields[count_index] * entry_size
        elif command.cmd in (LC_DYLD_INFO, LC_DYLD_INFO_ONLY):
            fields = struct.unpack_from(macho.fmt("10I"), macho.data, at + 8)
            names = ("rebase", "bind", "weak bind", "lazy bind", "export")
            for position, what in enumerate(names):
                start, size = fields[2 * position], fields[2 * position + 1]
                if size:
                    yield f"the dyld {what} info", start, start + size


def check_layout(macho: MachO) -> None:
    """The one check of a slice's file layout, for readers and signers alike: no section or
    segment content and no code signature overlaps the header and load commands (the signer
    rewrites that region), and a code signature is the last data of ``__LINKEDIT``, which ends the
    slice's segments. Raises a :class:`MachOError` subclass naming what is wrong."""
    end = macho.load_commands_end
    for what, offset in macho.contents():
        if offset < end:
            raise LoadCommandError(
                f"{what} starts at offset {offset}, inside the header and load commands (which end at {end})"
            )
    signature = macho.code_signature
    if signature is not None:
        if signature.dataoff < end:
            raise SignatureLayoutError(
                f"the code signature starts at offset {signature.dataoff}, inside the header and load "
                f"commands (which end at {end})"
            )
        check_signature_is_last(macho)


def check_signature_is_last(macho: MachO) -> None:
    """Raise :class:`SignatureLayoutError` unless the signature ends ``__LINKEDIT`` and that ends the file."""
    signature = macho.code_signature
    if signature is None:
        return
    linkedit = macho.linkedit
    if linkedit is None:
        raise SignatureLayoutError("the file has a code signature but no __LINKEDIT segment")
    for segment in macho.segments:
        if segment is not linkedit and segment.filesize and segment.fileoff >= linkedit.fileoff:
            raise SignatureLayoutError(
                f"segment {segment.name} follows __LINKEDIT in the file; __LINKEDIT must be the last segment"
            )
    if signature.dataoff < linkedit.fileoff or signature.end > linkedit.file_end:
        raise SignatureLayoutError(
            f"the code signature (bytes {signature.dataoff}-{signature.end}) lies outside __LINKEDIT "
            f"(bytes {linkedit.fileoff}-{linkedit.file_end})"
        )
    if signature.end != linkedit.file_end:
        raise SignatureLayoutError(
            f"{linkedit.file_end - signature.end} bytes of __LINKEDIT follow the code signature; "
            "the signature must be the last data in __LINKEDIT"
        )
    for what, start, end in linkedit_ranges(macho):
        if end > signature.dataoff:
            raise SignatureLayoutError(
                f"{what} (bytes {start}-{end}) overlaps or follows the code signature at "
                f"{signature.dataoff}; "
                "the signature must be the last data in __LINKEDIT"
            )
