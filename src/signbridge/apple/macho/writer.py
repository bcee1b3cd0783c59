"""Mach-O rewriting for signing: make room for a signature and re-lay universal files.

Only the header, LC_CODE_SIGNATURE and ``__LINKEDIT`` change, the way ``codesign_allocate`` does
it: the signature starts at the end of the other ``__LINKEDIT`` data rounded up to 16 bytes, its
reserved size is a multiple of 16, ``__LINKEDIT.filesize`` ends with it, and ``vmsize`` grows (never
shrinks) to ``filesize`` rounded up to the CPU's segment alignment.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from .constants import (
    FAT_ARCH_64_SIZE,
    FAT_ARCH_SIZE,
    FAT_HEADER_SIZE,
    FAT_MAGIC,
    FAT_MAGIC_64,
    LC_CODE_SIGNATURE,
    LINKEDIT_DATA_COMMAND_SIZE,
    segment_alignment,
)
from .parse import FatArch, MachO, MachOError, SignatureLayoutError

SIGNATURE_ALIGNMENT = 16
_U32_MAX = 0xFFFFFFFF


class HeaderPaddingError(MachOError):
    """There is no room after the load commands for a new LC_CODE_SIGNATURE."""


class SignatureSpaceError(MachOError):
    """A finished signature is larger than the space reserved for it."""


def round_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def signature_offset(macho: MachO) -> int:
    """Where a new signature will start: after the other ``__LINKEDIT`` data, 16-byte aligned."""
    return round_up(linkedit_data_end(macho), SIGNATURE_ALIGNMENT)


def linkedit_data_end(macho: MachO) -> int:
    """Where the slice's ``__LINKEDIT`` data ends before any signature (its layout validated)."""
    linkedit = macho.linkedit
    if linkedit is None:
        raise SignatureLayoutError(
            f"the {macho.file_type_name} has no __LINKEDIT segment to hold a signature"
        )
    for segment in macho.segments:
        if segment is not linkedit and segment.filesize and segment.file_end > linkedit.fileoff:
            raise SignatureLayoutError(
                f"segment {segment.name} ends after __LINKEDIT starts; __LINKEDIT must be the last segment"
            )
    if len(macho.data) > linkedit.file_end:
        raise SignatureLayoutError(
            f"{len(macho.data) - linkedit.file_end} bytes follow __LINKEDIT at the end of the file; "
            "signing would lose them"
        )
    if macho.code_signature is not None:
        return macho.code_signature.dataoff
    return linkedit.file_end


def signature_header(macho: MachO, reserve: int) -> bytes:
    """The slice's header region laid out for a signature of ``reserve`` bytes (a multiple of 16)
    at :func:`signature_offset`: LC_CODE_SIGNATURE replaced or inserted after the last load command
    (raising :class:`HeaderPaddingError` when the header padding is too small), ``__LINKEDIT`` resized.
    """
    offset = signature_offset(macho)
    header = bytearray(macho.data[: min(macho.first_content_offset, linkedit_data_end(macho))])
    if macho.code_signature is None:
        end = macho.load_commands_end
        padding = len(header) - end
        if padding < LINKEDIT_DATA_COMMAND_SIZE or any(header[end : end + LINKEDIT_DATA_COMMAND_SIZE]):
            raise HeaderPaddingError(
                f"the {macho.arch} {macho.file_type_name} has {max(padding, 0)} free bytes after its load "
                f"commands, and an LC_CODE_SIGNATURE needs {LINKEDIT_DATA_COMMAND_SIZE}; relink it with a "
                "larger -headerpad (for example -headerpad_max_install_names)"
            )
        command_offset = end
        struct.pack_into(
            macho.fmt("II"), header, 16, macho.ncmds + 1, macho.sizeofcmds + LINKEDIT_DATA_COMMAND_SIZE
        )
    else:
        command_offset = macho.code_signature.command_offset
    struct.pack_into(
        macho.fmt("IIII"),
        header,
        command_offset,
        LC_CODE_SIGNATURE,
        LINKEDIT_DATA_COMMAND_SIZE,
        offset,
        reserve,
    )
    _resize_linkedit(macho, header, offset + reserve)
    return bytes(header)


def _resize_linkedit(macho: MachO, header: bytearray, new_end: int) -> None:
    linkedit = macho.linkedit
    assert linkedit is not None
    filesize = new_end - linkedit.fileoff
    vmsize = linkedit.vmsize
    if filesize > vmsize:
        vmsize = round_up(filesize, segment_alignment(macho.cputype))
    # vmsize and filesize follow segname[16], vmaddr; fileoff sits between them.
    if macho.is_64:
        struct.pack_into(macho.fmt("Q"), header, linkedit.command_offset + 32, vmsize)
        struct.pack_into(macho.fmt("Q"), header, linkedit.command_offset + 48, filesize)
    else:
        if filesize > _U32_MAX or vmsize > _U32_MAX:
            raise SignatureLayoutError("a 32-bit Mach-O cannot grow __LINKEDIT past 4 GiB")
        struct.pack_into(macho.fmt("I"), header, linkedit.command_offset + 28, vmsize)
        struct.pack_into(macho.fmt("I"), header, linkedit.command_offset + 36, filesize)


def universal_layout(
    arches: Sequence[FatArch], sizes: Sequence[int], *, fat64: bool = False
) -> tuple[bytes, list[int]]:
    """The fat header for slices of ``sizes`` and each slice's offset, at its ``2^align`` boundary.

    Offsets and sizes in ``arches`` are ignored (recomputed); cputype, subtype and align are kept.
    A 32-bit fat header is used unless ``fat64`` is asked for or an offset or size needs 64 bits.
    """
    if len(arches) != len(sizes) or not arches:
        raise ValueError("a universal file needs one FatArch per slice")

    def layout(entry_size: int) -> list[int]:
        offsets, position = [], FAT_HEADER_SIZE + entry_size * len(arches)
        for arch, size in zip(arches, sizes, strict=True):
            position = round_up(position, 1 << arch.align)
            offsets.append(position)
            position += size
        return offsets

    offsets = layout(FAT_ARCH_64_SIZE if fat64 else FAT_ARCH_SIZE)
    if not fat64 and any(offset + size > _U32_MAX for offset, size in zip(offsets, sizes, strict=True)):
        fat64 = True
        offsets = layout(FAT_ARCH_64_SIZE)
    parts = [struct.pack(">II", FAT_MAGIC_64 if fat64 else FAT_MAGIC, len(arches))]
    for arch, offset, size in zip(arches, offsets, sizes, strict=True):
        if fat64:
            entry = struct.pack(">IIQQII", arch.cputype, arch.cpusubtype, offset, size, arch.align, 0)
        else:
            entry = struct.pack(">IIIII", arch.cputype, arch.cpusubtype, offset, size, arch.align)
        parts.append(entry)
    return b"".join(parts), offsets
