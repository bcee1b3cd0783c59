"""Mach-O's numbers: magic numbers, header and table sizes, bounds for hostile input, CPU and file
types, load commands, platforms, and the names ``codesign`` and ``lipo`` show for them."""

from __future__ import annotations

MH_MAGIC = 0xFEEDFACE
MH_CIGAM = 0xCEFAEDFE
MH_MAGIC_64 = 0xFEEDFACF
MH_CIGAM_64 = 0xCFFAEDFE
FAT_MAGIC = 0xCAFEBABE
FAT_MAGIC_64 = 0xCAFEBABF

MACH_HEADER_SIZE = 28
MACH_HEADER_64_SIZE = 32
FAT_HEADER_SIZE = 8
FAT_ARCH_SIZE = 20
FAT_ARCH_64_SIZE = 32
# A universal file with more slices than this is something else (Java class files share 0xcafebabe).
MAX_FAT_ARCHES = 32
# Bounds on the work one slice can ask for. Linkers write tens of load commands (a few hundred for
# a program that links very many libraries); a symbol's section number is one byte, so no image
# addresses more than 255 sections.
MAX_LOAD_COMMANDS = 4096
MAX_SECTIONS = 255

CPU_ARCH_ABI64 = 0x01000000
CPU_ARCH_ABI64_32 = 0x02000000
CPU_TYPE_X86 = 7
CPU_TYPE_X86_64 = CPU_TYPE_X86 | CPU_ARCH_ABI64
CPU_TYPE_ARM = 12
CPU_TYPE_ARM64 = CPU_TYPE_ARM | CPU_ARCH_ABI64
CPU_TYPE_ARM64_32 = CPU_TYPE_ARM | CPU_ARCH_ABI64_32
CPU_TYPE_POWERPC = 18
CPU_TYPE_POWERPC64 = CPU_TYPE_POWERPC | CPU_ARCH_ABI64
CPU_SUBTYPE_MASK = 0xFF000000

MH_OBJECT = 0x1
MH_EXECUTE = 0x2
MH_DYLINKER = 0x7
MH_DYLIB = 0x6
MH_BUNDLE = 0x8
MH_KEXT_BUNDLE = 0xB

LC_REQ_DYLD = 0x80000000
LC_SEGMENT = 0x1
LC_SYMTAB = 0x2
LC_DYSYMTAB = 0xB
LC_SEGMENT_64 = 0x19
LC_CODE_SIGNATURE = 0x1D
LC_SEGMENT_SPLIT_INFO = 0x1E
LC_DYLD_INFO = 0x22
LC_DYLD_INFO_ONLY = 0x22 | LC_REQ_DYLD
LC_VERSION_MIN_MACOSX = 0x24
LC_VERSION_MIN_IPHONEOS = 0x25
LC_FUNCTION_STARTS = 0x26
LC_DATA_IN_CODE = 0x29
LC_DYLIB_CODE_SIGN_DRS = 0x2B
LC_LINKER_OPTIMIZATION_HINT = 0x2E
LC_VERSION_MIN_TVOS = 0x2F
LC_VERSION_MIN_WATCHOS = 0x30
LC_BUILD_VERSION = 0x32
LC_DYLD_EXPORTS_TRIE = 0x33 | LC_REQ_DYLD
LC_DYLD_CHAINED_FIXUPS = 0x34 | LC_REQ_DYLD
LC_ATOM_INFO = 0x36

LINKEDIT_DATA_COMMAND_SIZE = 16
LINKEDIT_DATA_COMMANDS = frozenset(
    {
        LC_CODE_SIGNATURE,
        LC_SEGMENT_SPLIT_INFO,
        LC_FUNCTION_STARTS,
        LC_DATA_IN_CODE,
        LC_DYLIB_CODE_SIGN_DRS,
        LC_LINKER_OPTIMIZATION_HINT,
        LC_DYLD_EXPORTS_TRIE,
        LC_DYLD_CHAINED_FIXUPS,
        LC_ATOM_INFO,
    }
)

SECTION_TYPE = 0x000000FF
S_ZEROFILL = 0x1
S_GB_ZEROFILL = 0xC
S_THREAD_LOCAL_ZEROFILL = 0x12

PLATFORM_MACOS = 1
PLATFORM_IOS = 2
PLATFORM_TVOS = 3
PLATFORM_WATCHOS = 4
PLATFORM_NAMES = {
    1: "macos",
    2: "ios",
    3: "tvos",
    4: "watchos",
    5: "bridgeos",
    6: "maccatalyst",
    7: "iossimulator",
    8: "tvossimulator",
    9: "watchossimulator",
    10: "driverkit",
    11: "visionos",
    12: "visionossimulator",
}
VERSION_MIN_PLATFORMS = {
    LC_VERSION_MIN_MACOSX: PLATFORM_MACOS,
    LC_VERSION_MIN_IPHONEOS: PLATFORM_IOS,
    LC_VERSION_MIN_TVOS: PLATFORM_TVOS,
    LC_VERSION_MIN_WATCHOS: PLATFORM_WATCHOS,
}

_ARCH_NAMES = {
    (CPU_TYPE_X86, 3): "i386",
    (CPU_TYPE_X86_64, 3): "x86_64",
    (CPU_TYPE_X86_64, 8): "x86_64h",
    (CPU_TYPE_ARM, 6): "armv6",
    (CPU_TYPE_ARM, 9): "armv7",
    (CPU_TYPE_ARM, 11): "armv7s",
    (CPU_TYPE_ARM, 12): "armv7k",
    (CPU_TYPE_ARM64, 0): "arm64",
    (CPU_TYPE_ARM64, 1): "arm64",
    (CPU_TYPE_ARM64, 2): "arm64e",
    (CPU_TYPE_ARM64_32, 1): "arm64_32",
    (CPU_TYPE_POWERPC, 0): "ppc",
    (CPU_TYPE_POWERPC64, 0): "ppc64",
}
FILE_TYPE_NAMES = {
    MH_OBJECT: "object file",
    MH_EXECUTE: "executable",
    MH_DYLIB: "dynamic library",
    MH_DYLINKER: "dynamic linker",
    MH_BUNDLE: "bundle",
    MH_KEXT_BUNDLE: "kernel extension",
}


def arch_name(cputype: int, cpusubtype: int) -> str:
    name = _ARCH_NAMES.get((cputype, cpusubtype & ~CPU_SUBTYPE_MASK))
    if name is not None:
        return name
    return f"cputype {cputype:#x} subtype {cpusubtype & ~CPU_SUBTYPE_MASK:#x}"


def segment_alignment(cputype: int) -> int:
    """The VM page size ``codesign_allocate`` rounds ``__LINKEDIT.vmsize`` to for this CPU."""
    if cputype in (CPU_TYPE_ARM, CPU_TYPE_ARM64, CPU_TYPE_ARM64_32):
        return 0x4000
    if cputype in (CPU_TYPE_X86, CPU_TYPE_X86_64, CPU_TYPE_POWERPC, CPU_TYPE_POWERPC64):
        return 0x1000
    return 0x2000


def format_version(packed: int) -> str:
    """``X.Y.Z`` from the nibble-packed ``xxxx.yy.zz`` form used by Mach-O version fields."""
    major, minor, patch = packed >> 16, (packed >> 8) & 0xFF, packed & 0xFF
    return f"{major}.{minor}.{patch}" if patch else f"{major}.{minor}"
