"""Real Mach-O test fixtures, built with Debian's clang + ld64.lld + llvm-lipo (reference/toolchain.md).

Built once per test session into a temporary directory. arm64 macOS outputs carry the linker's
ad-hoc signature, an independent reference for CodeDirectory code. The fat64 file is assembled
here with struct (llvm-lipo 14 cannot write fat64); tests check it with llvm-objdump.

Signed fixtures are made by the engine's writer (``sign_into``), into memory (:func:`sign_file`) or
through the staged file the engine uses (:func:`sign_path`); the slice rewrites only tests need
(prepare, embed, strip a signature, join slices into a universal file) are at the end.
"""

from __future__ import annotations

import os
import random
import stat
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import require_file, run
from signbridge.apple.codesig.code_files import mapped, staged_code
from signbridge.apple.codesig.codedirectory import CodeDirectory
from signbridge.apple.codesig.signer import CmsSigner
from signbridge.apple.macho import writer as macho_writer
from signbridge.apple.macho.constants import LINKEDIT_DATA_COMMAND_SIZE
from signbridge.apple.macho.parse import FatArch, MachO, parse_file, parse_macho
from signbridge.apple.macho.sign import SigningOptions, sign_into

LLVM = Path("/usr/lib/llvm-14/bin")

A64 = ["-arch", "arm64", "-platform_version", "macos", "11.0", "11.0"]
X64 = ["-arch", "x86_64", "-platform_version", "macos", "10.15", "10.15"]
X64_OLD = ["-arch", "x86_64", "-platform_version", "macos", "10.9", "10.9"]
ARMV7 = ["-arch", "armv7", "-platform_version", "ios", "9.0", "9.0"]

MAIN_C = "int data_val = 42;\nint start(void){ volatile int x = data_val; for(;;) x++; }\n"
MAIN32_C = "int start(void){ volatile int x = 42; for(;;) x++; }\n"
LIB_C = "int add(int a,int b){return a+b;}\nint counter = 7;\n"
HELLO_C = (
    "extern long write(int,const void*,unsigned long); extern void exit(int);\n"
    'int main(void){ write(1,"hello\\n",6); exit(0); }\n'
)
INFO_PLIST = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<plist version="1.0"><dict>'
    b"<key>CFBundleIdentifier</key><string>com.example.hello</string></dict></plist>\n"
)
LIBSYSTEM_TBD = """--- !tapi-tbd
tbd-version:     4
targets:         [ x86_64-macos, arm64-macos ]
install-name:    '/usr/lib/libSystem.B.dylib'
current-version: 1311
exports:
  - targets:         [ x86_64-macos, arm64-macos ]
    symbols:         [ _write, _exit, dyld_stub_binder ]
...
"""
BIG_BLOB_SIZE = 4 * 1024 * 1024

LINKER_SIGNED = (
    "exe.arm64",
    "exe_plist.arm64",
    "exe_signed.x86_64",
    "hello.arm64",
    "libdemo.arm64.dylib",
    "plugin.arm64.bundle",
    "big.arm64",
)
UNSIGNED = (
    "exe_unsigned.arm64",
    "exe.x86_64",
    "old.x86_64",
    "exe.armv7",
    "hello.x86_64",
    "libdemo.x86_64.dylib",
)
THIN = LINKER_SIGNED + UNSIGNED
UNIVERSAL = ("exe.universal", "hello.universal", "libdemo.universal.dylib", "exe.universal64")


@dataclass(frozen=True)
class MachOFixtures:
    root: Path

    def path(self, name: str) -> Path:
        return self.root / name

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    @property
    def info_plist(self) -> Path:
        return self.root / "src" / "Info.plist"


def _tool(name: str, package: str) -> str:
    return require_file(str(LLVM / name), package)


def build_fixtures(root: Path) -> MachOFixtures:
    clang = _tool("clang", "clang-14")
    ld = _tool("ld64.lld", "lld-14")
    lipo = _tool("llvm-lipo", "llvm-14")
    src = root / "src"
    sdk = root / "sdk"
    (sdk / "usr" / "lib").mkdir(parents=True)
    src.mkdir()
    (src / "main.c").write_text(MAIN_C)
    (src / "main32.c").write_text(MAIN32_C)
    (src / "lib.c").write_text(LIB_C)
    (src / "hello.c").write_text(HELLO_C)
    (src / "Info.plist").write_bytes(INFO_PLIST)
    (src / "blob.bin").write_bytes(random.Random(20240611).randbytes(BIG_BLOB_SIZE))
    (sdk / "usr" / "lib" / "libSystem.tbd").write_text(LIBSYSTEM_TBD)

    def compile_(source: str, target: str, output: str) -> str:
        run([clang, f"--target={target}", "-O1", "-c", str(src / source), "-o", str(src / output)])
        return str(src / output)

    def link(output: str, *args: str) -> None:
        run([ld, *args, "-o", str(root / output)])

    main_a64 = compile_("main.c", "arm64-apple-macos11", "main.arm64.o")
    main_x64 = compile_("main.c", "x86_64-apple-macos10.15", "main.x86_64.o")
    main_old = compile_("main.c", "x86_64-apple-macos10.9", "main.old.o")
    main_v7 = compile_("main32.c", "armv7-apple-ios9", "main.armv7.o")
    lib_a64 = compile_("lib.c", "arm64-apple-macos11", "lib.arm64.o")
    lib_x64 = compile_("lib.c", "x86_64-apple-macos10.15", "lib.x86_64.o")
    hello_a64 = compile_("hello.c", "arm64-apple-macos11", "hello.arm64.o")
    hello_x64 = compile_("hello.c", "x86_64-apple-macos10.15", "hello.x86_64.o")
    entry = ["-e", "_start"]
    system = ["-syslibroot", str(sdk), "-lSystem"]

    link("exe.arm64", *A64, *entry, main_a64)
    link("exe_unsigned.arm64", *A64, *entry, "-no_adhoc_codesign", main_a64)
    link("nopad.arm64", *A64, *entry, "-no_adhoc_codesign", "-headerpad", "0", main_a64)
    link("exe.x86_64", *X64, *entry, main_x64)
    link("exe_signed.x86_64", *X64, *entry, "-adhoc_codesign", main_x64)
    link("old.x86_64", *X64_OLD, *entry, main_old)
    link("exe.armv7", *ARMV7, *entry, main_v7)
    plist = ["-sectcreate", "__TEXT", "__info_plist", str(src / "Info.plist")]
    link("exe_plist.arm64", *A64, *entry, *plist, main_a64)
    link("hello.arm64", *A64, *system, hello_a64)
    link("hello.x86_64", *X64, *system, hello_x64)
    dylib = ["-dylib", "-install_name", "@rpath/libdemo.dylib"]
    link("libdemo.arm64.dylib", *A64, *dylib, lib_a64)
    link("libdemo.x86_64.dylib", *X64, *dylib, lib_x64)
    link("plugin.arm64.bundle", *A64, "-bundle", lib_a64)
    link("big.arm64", *A64, *entry, "-sectcreate", "__TEXT", "__blob", str(src / "blob.bin"), main_a64)

    for output, inputs in (
        ("exe.universal", ("exe.x86_64", "exe.arm64")),
        ("hello.universal", ("hello.x86_64", "hello.arm64")),
        ("libdemo.universal.dylib", ("libdemo.x86_64.dylib", "libdemo.arm64.dylib")),
    ):
        run([lipo, "-create", *(str(root / name) for name in inputs), "-output", str(root / output)])
    write_fat64(root / "exe.universal64", [root / "exe.x86_64", root / "exe.arm64"])
    return MachOFixtures(root)


def write_fat64(output: Path, inputs: list[Path]) -> None:
    """A FAT_MAGIC_64 universal file; every slice aligned to 2^14 like lipo aligns arm64."""
    align = 14
    slices = [path.read_bytes() for path in inputs]
    headers = []
    position = 8 + 32 * len(slices)
    offsets = []
    for data in slices:
        position = -(-position // (1 << align)) * (1 << align)
        offsets.append(position)
        position += len(data)
    out = bytearray(struct.pack(">II", 0xCAFEBABF, len(slices)))
    for data, offset in zip(slices, offsets, strict=True):
        cputype, cpusubtype = struct.unpack_from("<II", data, 4)
        headers.append(struct.pack(">IIQQII", cputype, cpusubtype, offset, len(data), align, 0))
    out += b"".join(headers)
    for data, offset in zip(slices, offsets, strict=True):
        out += bytes(offset - len(out)) + data
    output.write_bytes(bytes(out))


_BUILT: list[MachOFixtures] = []


def get_fixtures(tmp_path_factory: pytest.TempPathFactory) -> MachOFixtures:
    """The fixture set, built on first use and shared by every test module of the session."""
    if not _BUILT:
        _BUILT.append(build_fixtures(tmp_path_factory.mktemp("macho")))
    return _BUILT[0]


# --- signing fixtures: the production writer into memory, and what only tests rewrite -------------


class _MemoryOutput:
    """A :class:`~signbridge.apple.macho.sign.SignedOutput` in memory."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes | memoryview, offset: int) -> None:
        end = offset + len(data)
        if len(self.data) < end:
            self.data.extend(bytes(end - len(self.data)))
        self.data[offset:end] = data

    def copy(self, source: int, source_offset: int, length: int, offset: int) -> None:
        self.write(os.pread(source, length, source_offset), offset)


class _CallableSigner:
    """A test's function of the CodeDirectories, as the CMS signer the engine hands down."""

    def __init__(self, function: Callable[[Sequence[CodeDirectory]], bytes]) -> None:
        self.function = function

    def sign(self, directories: Sequence[CodeDirectory]) -> bytes:
        return self.function(directories)


def _signer(signer: object) -> CmsSigner | None:
    if signer is None or hasattr(signer, "sign"):
        return signer  # type: ignore[return-value]
    return _CallableSigner(signer)  # type: ignore[arg-type,return-value]


def sign_file(data: bytes, options: SigningOptions, signer: object = None) -> bytes:
    """Every slice of a thin or universal Mach-O file signed by the engine's writer
    (:func:`~signbridge.apple.macho.sign.sign_into`), into memory; ad hoc when ``signer`` is
    None (a CMS signer, or a function of the CodeDirectories)."""
    parsed = parse_file(data)
    descriptor = os.memfd_create("macho")
    try:
        os.write(descriptor, data)
        output = _MemoryOutput()
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            _, size = sign_into(output, parsed, descriptor, options, _signer(signer), executor=pool)
    finally:
        os.close(descriptor)
    return bytes(output.data[:size]) + bytes(max(0, size - len(output.data)))


def sign_path(
    path: str | os.PathLike[str], options: SigningOptions, signer: object = None, *, output: Path | None = None
) -> bytes:
    """Sign the file at ``path`` into ``output`` (default: in place) as the engine writes it (a
    staged file swapped in), with the input's mode; the signed bytes."""
    source = Path(path)
    target = Path(output) if output is not None else source
    with mapped(source) as (data, descriptor), ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        parsed = parse_file(data)
        with staged_code(target) as staged:
            _, size = sign_into(staged, parsed, descriptor, options, _signer(signer), executor=pool)
            staged.commit(size)
    os.chmod(target, stat.S_IMODE(source.stat().st_mode))
    return target.read_bytes()


@dataclass(frozen=True, eq=False)
class PreparedSlice:
    """A slice laid out for a signature of ``reserve`` bytes at ``code_limit``; not yet signed.

    ``code`` is what the CodeDirectory hashes: the final header and load commands and everything up
    to the signature. ``macho`` parses the laid-out slice (signature space zero-filled).
    """

    macho: MachO
    code_limit: int
    reserve: int
    data: bytes = field(repr=False)

    @property
    def code(self) -> memoryview:
        return memoryview(self.data)[: self.code_limit]


def prepare_signature_layout(macho: MachO, reserve: int) -> PreparedSlice:
    """Lay out ``macho`` for a signature of up to ``reserve`` bytes (rounded up to 16), as a copy.

    Replaces an existing signature, or inserts LC_CODE_SIGNATURE (see :func:`macho_writer.signature_header`).
    """
    if reserve <= 0:
        raise ValueError("the signature reserve must be positive")
    reserve = macho_writer.round_up(reserve, macho_writer.SIGNATURE_ALIGNMENT)
    offset = macho_writer.signature_offset(macho)
    data_end = macho_writer.linkedit_data_end(macho)
    header = macho_writer.signature_header(macho, reserve)
    body = memoryview(macho.data)[len(header) : data_end]
    data = b"".join((header, body, bytes(offset - data_end + reserve)))
    return PreparedSlice(macho=parse_macho(data), code_limit=offset, reserve=reserve, data=data)


def embed_signature(prepared: PreparedSlice, signature: bytes) -> bytes:
    """The signed slice: the prepared code, then ``signature`` zero-padded to the reserved size."""
    if len(signature) > prepared.reserve:
        raise macho_writer.SignatureSpaceError(
            f"the signature is {len(signature)} bytes but only {prepared.reserve} were reserved for it"
        )
    code = memoryview(prepared.data)[: prepared.code_limit]
    return b"".join((code, signature, bytes(prepared.reserve - len(signature))))


def strip_signature(macho: MachO) -> bytes:
    """The slice without its signature: LC_CODE_SIGNATURE removed, ``__LINKEDIT`` ends where it began."""
    signature = macho.code_signature
    if signature is None:
        return macho.data
    linkedit = macho.linkedit
    assert linkedit is not None
    header = bytearray(macho.data[: macho.load_commands_end])
    start = signature.command_offset
    del header[start : start + LINKEDIT_DATA_COMMAND_SIZE]
    header += bytes(LINKEDIT_DATA_COMMAND_SIZE)
    struct.pack_into(
        macho.fmt("II"), header, 16, macho.ncmds - 1, macho.sizeofcmds - LINKEDIT_DATA_COMMAND_SIZE
    )
    linkedit_offset = linkedit.command_offset
    if linkedit_offset > start:
        linkedit_offset -= LINKEDIT_DATA_COMMAND_SIZE
    filesize = signature.dataoff - linkedit.fileoff
    if macho.is_64:
        struct.pack_into(macho.fmt("Q"), header, linkedit_offset + 48, filesize)
    else:
        struct.pack_into(macho.fmt("I"), header, linkedit_offset + 36, filesize)
    return b"".join((header, memoryview(macho.data)[len(header) : signature.dataoff]))


def build_universal(arches: Sequence[FatArch], slices: Sequence[bytes], *, fat64: bool = False) -> bytes:
    """A universal file holding ``slices`` in order, laid out by :func:`macho_writer.universal_layout`."""
    header, offsets = macho_writer.universal_layout(arches, [len(data) for data in slices], fat64=fat64)
    parts = [header]
    position = len(header)
    for offset, data in zip(offsets, slices, strict=True):
        parts += [bytes(offset - position), data]
        position = offset + len(data)
    return b"".join(parts)
