"""Mach-O parsing, rewriting and the ad-hoc signing pipeline.

Checked against llvm-objdump, llvm-lipo and LIEF, and against hashes computed here with hashlib.
"""

from __future__ import annotations

import hashlib
import os
import plistlib
import shutil
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lief
import pytest

import machofixtures
from conftest import require_tool, run
from machofixtures import (
    LINKER_SIGNED,
    THIN,
    UNIVERSAL,
    MachOFixtures,
    build_universal,
    embed_signature,
    prepare_signature_layout,
    sign_file,
    sign_path,
    strip_signature,
)
from signbridge.apple.codesig.blobs import Magic, Slot
from signbridge.apple.codesig.codedirectory import CodeDirectoryFlags, ExecSegmentFlags, HashType, hash_code
from signbridge.apple.codesig.embedded_signature import read_signature
from signbridge.apple.codesig.entitlements import decode_der
from signbridge.apple.codesig.requirements.binary import EMPTY_REQUIREMENT_SET
from signbridge.apple.macho import constants as mc
from signbridge.apple.macho import parse as mo
from signbridge.apple.macho.sign import SigningOptions
from signbridge.apple.macho.writer import HeaderPaddingError, SignatureSpaceError, signature_offset
from signbridge.errors import SignbridgeError

LLVM_LIPO = str(machofixtures.LLVM / "llvm-lipo")


@pytest.fixture(scope="session")
def fx(tmp_path_factory: pytest.TempPathFactory) -> MachOFixtures:
    return machofixtures.get_fixtures(tmp_path_factory)


# --- independent views: llvm-objdump / LIEF ----------------------------------------------------------


def objdump_headers(path: Path, arch: str | None = None) -> tuple[dict[str, str], list[dict]]:
    """(mach header fields, load commands) as llvm-objdump prints them; sections nest in their segment."""
    args = [require_tool("llvm-objdump"), "--macho", "--private-headers", str(path)]
    if arch:
        args.append(f"--arch={arch}")
    lines = run(args).stdout.decode().splitlines()
    header: dict[str, str] = {}
    commands: list[dict] = []
    current: dict | None = None
    for number, line in enumerate(lines):
        text = line.strip()
        if text == "Mach header":
            keys, values = lines[number + 1].split(), lines[number + 2].split()
            header = dict(zip(keys[:7], values[:7], strict=True))
        elif text.startswith("Load command"):
            current = {"sections": []}
            commands.append(current)
        elif text == "Section" and current is not None:
            current["sections"].append({})
        elif current is not None and text:
            key, _, value = text.partition(" ")
            target = current["sections"][-1] if current["sections"] else current
            target[key] = value.strip()
    return header, commands


def objdump_universal(path: Path) -> tuple[str, list[dict[str, str]]]:
    lines = run([require_tool("llvm-objdump"), "--macho", "--universal-headers", str(path)]).stdout.decode()
    magic = ""
    arches: list[dict[str, str]] = []
    for line in lines.splitlines():
        key, _, value = line.strip().partition(" ")
        if key == "fat_magic":
            magic = value
        elif key == "architecture":
            arches.append({"arch": value})
        elif arches and key in ("offset", "size", "align"):
            arches[-1][key] = value
    return magic, arches


def command(commands: list[dict], name: str) -> dict | None:
    found = [entry for entry in commands if entry.get("cmd") == name]
    assert len(found) <= 1
    return found[0] if found else None


def segment(commands: list[dict], name: str) -> dict:
    return next(entry for entry in commands if entry.get("segname") == name and "cmd" in entry)


def page_hashes(data: bytes, limit: int) -> list[bytes]:
    """Plain SHA-256 of every 4 KiB page up to ``limit``: the oracle for our hashing."""
    return [
        hashlib.sha256(data[start : min(start + 4096, limit)]).digest() for start in range(0, limit, 4096)
    ]


# --- parsing -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", THIN)
def test_thin_parse_matches_objdump(fx: MachOFixtures, name: str) -> None:
    parsed = mo.parse_file(fx.read(name))
    assert not parsed.is_universal
    macho = parsed.slices[0]
    header, commands = objdump_headers(fx.path(name))
    assert macho.ncmds == int(header["ncmds"]) == len(commands)
    assert macho.sizeofcmds == int(header["sizeofcmds"])
    assert macho.is_64 == (header["magic"] == "MH_MAGIC_64")
    assert [mo_cmd.cmd for mo_cmd in macho.load_commands]  # non-empty
    for seg in macho.segments:
        theirs = segment(commands, seg.name)
        assert seg.fileoff == int(theirs["fileoff"], 0)
        assert seg.filesize == int(theirs["filesize"], 0)
        assert seg.vmsize == int(theirs["vmsize"], 0)
        assert [s.name for s in seg.sections] == [s["sectname"] for s in theirs["sections"]]
        for ours, their_section in zip(seg.sections, theirs["sections"], strict=True):
            assert ours.offset == int(their_section["offset"], 0)
            assert ours.size == int(their_section["size"], 0)
    signature = command(commands, "LC_CODE_SIGNATURE")
    assert (signature is not None) == (name in LINKER_SIGNED) == (macho.code_signature is not None)
    if signature is not None:
        assert macho.code_signature.dataoff == int(signature["dataoff"])
        assert macho.code_signature.datasize == int(signature["datasize"])


def test_build_version_and_version_min(fx: MachOFixtures) -> None:
    arm = mo.parse_macho(fx.read("exe.arm64"))
    expected = mo.BuildVersion(mc.PLATFORM_MACOS, 0x000B0000, 0x000B0000, mc.LC_BUILD_VERSION)
    assert arm.build_version == expected
    assert command(objdump_headers(fx.path("exe.arm64"))[1], "LC_BUILD_VERSION")["minos"] == "11.0"

    old = mo.parse_macho(fx.read("old.x86_64"))
    assert old.build_version is not None
    assert old.build_version.cmd == mc.LC_VERSION_MIN_MACOSX
    assert (old.build_version.platform, old.build_version.minos) == (mc.PLATFORM_MACOS, 0x000A0900)
    assert command(objdump_headers(fx.path("old.x86_64"))[1], "LC_VERSION_MIN_MACOSX")["version"] == "10.9"

    armv7 = mo.parse_macho(fx.read("exe.armv7"))
    assert not armv7.is_64 and armv7.arch == "armv7"
    assert armv7.build_version is not None
    assert (armv7.build_version.platform_name, str(armv7.build_version)) == ("ios", "ios 9.0 (SDK 9.0)")


def test_embedded_info_plist(fx: MachOFixtures) -> None:
    assert mo.parse_macho(fx.read("exe_plist.arm64")).info_plist == fx.info_plist.read_bytes()
    assert mo.parse_macho(fx.read("exe.arm64")).info_plist is None


@pytest.mark.parametrize("name", UNIVERSAL)
def test_universal_parse_matches_objdump_and_lipo(fx: MachOFixtures, name: str, tmp_path: Path) -> None:
    data = fx.read(name)
    parsed = mo.parse_file(data)
    magic, arches = objdump_universal(fx.path(name))
    assert parsed.fat64 == (magic == "FAT_MAGIC_64") == name.endswith("64")
    assert [arch.arch for arch in parsed.fat_arches] == [entry["arch"] for entry in arches]
    for arch, theirs, macho in zip(parsed.fat_arches, arches, parsed.slices, strict=True):
        assert arch.offset == int(theirs["offset"])
        assert arch.size == int(theirs["size"])
        assert theirs["align"].startswith(f"2^{arch.align} ")
        thin = tmp_path / arch.arch
        run([LLVM_LIPO, str(fx.path(name)), "-thin", arch.arch, "-output", str(thin)])
        assert thin.read_bytes() == macho.data


# --- rewriting ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["exe.x86_64", "exe_unsigned.arm64", "exe.armv7", "libdemo.x86_64.dylib"])
def test_prepare_inserts_code_signature(fx: MachOFixtures, name: str) -> None:
    original = mo.parse_macho(fx.read(name))
    linkedit = original.linkedit
    old_end = linkedit.file_end
    prepared = prepare_signature_layout(original, 1000)
    new = prepared.macho
    assert prepared.reserve == 1008  # rounded up to 16
    assert (new.ncmds, new.sizeofcmds) == (original.ncmds + 1, original.sizeofcmds + 16)
    assert new.load_commands[-1].cmd == mc.LC_CODE_SIGNATURE
    assert new.code_signature.dataoff == prepared.code_limit == -(-old_end // 16) * 16
    assert new.code_signature.datasize == 1008
    assert len(prepared.data) == prepared.code_limit + 1008
    assert new.linkedit.file_end == len(prepared.data)
    page = mc.segment_alignment(original.cputype)
    expected_vmsize = max(linkedit.vmsize, -(-new.linkedit.filesize // page) * page)
    assert new.linkedit.vmsize == expected_vmsize
    # Only the header changes; code and data are copied as they were.
    start = original.first_content_offset
    assert prepared.data[start:old_end] == original.data[start:]


def test_prepare_reuses_existing_signature_slot(fx: MachOFixtures) -> None:
    original = mo.parse_macho(fx.read("exe.arm64"))
    prepared = prepare_signature_layout(original, 5000)
    assert prepared.macho.ncmds == original.ncmds
    assert prepared.macho.code_signature.command_offset == original.code_signature.command_offset
    assert prepared.code_limit == original.code_signature.dataoff == signature_offset(original)
    assert len(prepared.data) == original.code_signature.dataoff + 5008


def test_arm64_linkedit_vmsize_rounds_to_16k(fx: MachOFixtures) -> None:
    original = mo.parse_macho(fx.read("exe.arm64"))
    prepared = prepare_signature_layout(original, 0x4000)
    assert prepared.macho.linkedit.filesize > original.linkedit.vmsize
    assert prepared.macho.linkedit.vmsize % 0x4000 == 0
    assert prepared.macho.linkedit.vmsize >= prepared.macho.linkedit.filesize


def test_strip_signature(fx: MachOFixtures, tmp_path: Path) -> None:
    original = mo.parse_macho(fx.read("exe.arm64"))
    stripped = strip_signature(original)
    path = tmp_path / "stripped"
    path.write_bytes(stripped)
    header, commands = objdump_headers(path)
    assert command(commands, "LC_CODE_SIGNATURE") is None
    assert int(header["ncmds"]) == original.ncmds - 1
    assert len(stripped) == original.code_signature.dataoff
    assert segment(commands, "__LINKEDIT")["filesize"] == str(original.code_signature.dataoff - 32768)
    # LC_CODE_SIGNATURE was the last command, so stripping then signing equals signing directly.
    options = SigningOptions(identifier="exe")
    assert sign_file(stripped, options) == sign_file(original.data, options)


def test_embed_refuses_oversized_signature(fx: MachOFixtures) -> None:
    prepared = prepare_signature_layout(mo.parse_macho(fx.read("exe.x86_64")), 64)
    with pytest.raises(SignatureSpaceError, match="only 64 were reserved"):
        embed_signature(prepared, bytes(65))


def test_build_universal_aligns_slices(fx: MachOFixtures, tmp_path: Path) -> None:
    parsed = mo.parse_file(fx.read("exe.universal"))
    out = build_universal(parsed.fat_arches, [m.data for m in parsed.slices])
    again = mo.parse_file(out)
    for arch in again.fat_arches:
        assert arch.offset % (1 << arch.align) == 0
    assert [m.data for m in again.slices] == [m.data for m in parsed.slices]
    path = tmp_path / "u"
    path.write_bytes(out)
    magic, arches = objdump_universal(path)
    assert magic == "FAT_MAGIC" and [int(a["offset"]) for a in arches] == [a.offset for a in again.fat_arches]
    fat64 = build_universal(parsed.fat_arches, [m.data for m in parsed.slices], fat64=True)
    path.write_bytes(fat64)
    assert objdump_universal(path)[0] == "FAT_MAGIC_64"
    assert mo.parse_file(fat64).fat64


# --- bad inputs --------------------------------------------------------------------------------------


def _patch(data: bytes, offset: int, code: str, *values: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(code, out, offset, *values)
    return bytes(out)


def _bad_inputs(fx: MachOFixtures) -> dict[str, tuple[bytes, type[SignbridgeError], str]]:
    exe = fx.read("exe.arm64")
    macho = mo.parse_macho(exe)
    linkedit = macho.linkedit
    universal = fx.read("exe.universal")
    fat = mo.parse_file(universal)
    x86, arm = fat.fat_arches
    function_starts = next(c for c in macho.linkedit_data if c.cmd == mc.LC_FUNCTION_STARTS)
    return {
        "empty": (b"", mo.TruncatedMachOError, "too short"),
        "truncated-half": (exe[: len(exe) // 2], mo.TruncatedMachOError, "past the end of the file"),
        "truncated-in-load-commands": (exe[:100], mo.TruncatedMachOError, "load commands claim"),
        "corrupt-magic": (b"\0\0\0\0" + exe[4:], mo.NotMachOError, "not a Mach-O file"),
        "elf": (Path("/bin/true").read_bytes(), mo.NotMachOError, "ELF"),
        "absurd-ncmds": (_patch(exe, 16, "<I", 0x7FFFFFFF), mo.LoadCommandError, "load commands"),
        "absurd-sizeofcmds": (
            _patch(exe, 20, "<I", 0xFFFFFF00),
            mo.TruncatedMachOError,
            "load commands claim",
        ),
        "absurd-cmdsize": (_patch(exe, 36, "<I", 0x10000000), mo.LoadCommandError, "runs past the end"),
        "tiny-cmdsize": (_patch(exe, 36, "<I", 4), mo.LoadCommandError, "impossible size"),
        "overlapping-fat-slices": (
            _patch(universal, 8 + 20 + 8, ">I", x86.offset + 16),
            mo.FatLayoutError,
            "overlap",
        ),
        "duplicate-fat-arch": (
            _patch(universal, 8 + 20, ">II", x86.cputype, x86.cpusubtype),
            mo.FatLayoutError,
            "twice",
        ),
        "fat-slice-past-eof": (
            _patch(universal, 8 + 20 + 12, ">I", arm.size + 4096),
            mo.TruncatedMachOError,
            "arm64 slice ends",
        ),
        "java-class": (b"\xca\xfe\xba\xbe\x00\x00\x00\x34" + bytes(64), mo.FatLayoutError, "Java"),
        "data-after-signature": (
            _patch(exe, linkedit.command_offset + 48, "<Q", linkedit.filesize + 16) + bytes(16),
            mo.SignatureLayoutError,
            "follow the code signature",
        ),
        "table-after-signature": (
            _patch(exe, function_starts.command_offset + 8, "<I", macho.code_signature.dataoff + 16),
            mo.SignatureLayoutError,
            "overlaps or follows the code signature",
        ),
        "junk-after-linkedit": (
            fx.read("exe.x86_64") + bytes(32),
            mo.SignatureLayoutError,
            "follow __LINKEDIT",
        ),
        "no-header-padding": (fx.read("nopad.arm64"), HeaderPaddingError, "headerpad"),
    }


BAD_INPUT_NAMES = [
    "empty",
    "truncated-half",
    "truncated-in-load-commands",
    "corrupt-magic",
    "elf",
    "absurd-ncmds",
    "absurd-sizeofcmds",
    "absurd-cmdsize",
    "tiny-cmdsize",
    "overlapping-fat-slices",
    "duplicate-fat-arch",
    "fat-slice-past-eof",
    "java-class",
    "data-after-signature",
    "table-after-signature",
    "junk-after-linkedit",
    "no-header-padding",
]


@pytest.mark.parametrize("case", BAD_INPUT_NAMES)
def test_bad_input_raises_specific_error_and_leaves_file_untouched(
    fx: MachOFixtures, tmp_path: Path, case: str
) -> None:
    data, error, message = _bad_inputs(fx)[case]
    path = tmp_path / "input"
    path.write_bytes(data)
    os.utime(path, (1_000_000_000, 1_000_000_000))
    with pytest.raises(error, match=message) as raised:
        sign_path(path, SigningOptions(identifier="bad"))
    assert isinstance(raised.value, mo.MachOError)
    assert str(raised.value)  # a sentence for the terminal, never empty
    assert path.read_bytes() == data
    assert path.stat().st_mtime == 1_000_000_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input"]


def test_fat_slice_errors_name_the_slice(fx: MachOFixtures) -> None:
    universal = fx.read("exe.universal")
    arm = mo.parse_file(universal).fat_arches[1]
    broken = _patch(universal, arm.offset + 16, "<I", 0x7FFFFFFF)
    with pytest.raises(mo.LoadCommandError, match="^arm64 slice: "):
        mo.parse_file(broken)


# --- ad-hoc signing pipeline -------------------------------------------------------------------------


def _check_signed_slice(data: bytes, identifier: str) -> mo.MachO:
    """Our parser re-reads the signature and every hash in it matches the bytes independently hashed."""
    macho = mo.parse_macho(data)
    signature = read_signature(macho)
    assert signature is not None and signature.is_adhoc
    cd = signature.code_directory
    dataoff = macho.code_signature.dataoff
    assert cd.identifier == identifier
    assert cd.code_limit == dataoff
    assert not cd.flags & CodeDirectoryFlags.LINKER_SIGNED
    for directory in signature.code_directories:
        assert directory.code_hashes == tuple(
            hashlib.new(directory.hash_type.hashlib_name, data[start : min(start + 4096, dataoff)])
            .digest()[: directory.hash_type.size]
            for start in range(0, dataoff, 4096)
        )
        assert directory.special_slots[Slot.REQUIREMENTS] == hashlib.new(
            directory.hash_type.hashlib_name, EMPTY_REQUIREMENT_SET
        ).digest()[: directory.hash_type.size]
    assert signature.requirements == EMPTY_REQUIREMENT_SET
    assert signature.cms == b""
    assert signature.superblob.slots()[:2] == [Slot.CODE_DIRECTORY, Slot.REQUIREMENTS]
    assert signature.superblob.slots()[-1] == Slot.SIGNATURE
    text = macho.text
    assert (cd.exec_segment_base, cd.exec_segment_limit) == (text.fileoff, text.filesize)
    main = ExecSegmentFlags.MAIN_BINARY if macho.filetype == mc.MH_EXECUTE else 0
    assert cd.exec_segment_flags == main
    return macho


@pytest.mark.parametrize("name", THIN)
def test_adhoc_sign_thin(fx: MachOFixtures, tmp_path: Path, name: str) -> None:
    original = mo.parse_macho(fx.read(name))
    output = tmp_path / name
    signed = sign_path(fx.path(name), SigningOptions(identifier=name), output=output)
    assert output.read_bytes() == signed
    assert os.access(output, os.X_OK)

    # (1) our parser, every hash re-derived from the bytes
    macho = _check_signed_slice(signed, name)
    signature = macho.code_signature

    # (2) llvm-objdump still parses it and shows the new LC_CODE_SIGNATURE
    header, commands = objdump_headers(output)
    theirs = command(commands, "LC_CODE_SIGNATURE")
    assert (int(theirs["dataoff"]), int(theirs["datasize"])) == (signature.dataoff, signature.datasize)
    assert signature.end == len(signed)
    linkedit = segment(commands, "__LINKEDIT")
    assert int(linkedit["fileoff"], 0) + int(linkedit["filesize"], 0) == len(signed)
    assert int(header["ncmds"]) == original.ncmds + (original.code_signature is None)

    # (3) LIEF sees the signature, byte for byte
    binary = lief.MachO.parse(str(output)).at(0)
    assert binary.has_code_signature
    assert (binary.code_signature.data_offset, binary.code_signature.data_size) == (
        signature.dataoff,
        signature.datasize,
    )
    assert bytes(binary.code_signature.content) == signed[signature.dataoff : signature.end]

    # (4) re-signing a linker-signed file keeps its layout: only page 0 (the header) changes
    if name in LINKER_SIGNED:
        linker = read_signature(original).code_directory
        ours = read_signature(macho).code_directory
        assert ours.code_limit == linker.code_limit
        assert ours.code_hashes[1:] == linker.code_hashes[1:]
        assert ours.code_hashes[0] != linker.code_hashes[0]

    # signing is deterministic and idempotent
    assert sign_file(signed, SigningOptions(identifier=name)) == signed


@pytest.mark.parametrize("name", UNIVERSAL)
def test_adhoc_sign_universal(fx: MachOFixtures, tmp_path: Path, name: str) -> None:
    original = mo.parse_file(fx.read(name))
    output = tmp_path / name
    signed = sign_path(fx.path(name), SigningOptions(identifier="com.example.tool"), output=output)
    parsed = mo.parse_file(signed)
    assert parsed.fat64 == original.fat64
    assert [a.arch for a in parsed.fat_arches] == [a.arch for a in original.fat_arches]
    for arch, macho in zip(parsed.fat_arches, parsed.slices, strict=True):
        assert arch.offset % (1 << arch.align) == 0
        assert arch.align == next(a.align for a in original.fat_arches if a.arch == arch.arch)
        _check_signed_slice(macho.data, "com.example.tool")
        thin = tmp_path / f"thin.{arch.arch}"
        run([LLVM_LIPO, str(output), "-thin", arch.arch, "-output", str(thin)])
        assert thin.read_bytes() == macho.data
        binary = lief.MachO.parse(str(thin)).at(0)
        assert bytes(binary.code_signature.content) == macho.signature_data

    magic, arches = objdump_universal(output)
    assert magic == ("FAT_MAGIC_64" if original.fat64 else "FAT_MAGIC")
    assert [int(a["offset"]) for a in arches] == [a.offset for a in parsed.fat_arches]
    for arch, macho in zip(parsed.fat_arches, parsed.slices, strict=True):
        theirs = command(objdump_headers(output, arch.arch)[1], "LC_CODE_SIGNATURE")
        assert int(theirs["datasize"]) == macho.code_signature.datasize

    if original.fat64:
        return  # LIEF 1.0 does not read FAT_MAGIC_64 files; the thin slices were checked above
    fat = lief.MachO.parse(str(output))
    assert fat.size == 2
    for index, macho in enumerate(parsed.slices):
        binary = fat.at(index)
        assert binary.has_code_signature
        assert bytes(binary.code_signature.content) == macho.signature_data


def test_adhoc_sign_with_entitlements_and_runtime(fx: MachOFixtures, tmp_path: Path) -> None:
    entitlements = plistlib.dumps({"com.apple.security.app-sandbox": True, "get-task-allow": True})
    options = SigningOptions(
        identifier="com.example.exe", entitlements=entitlements, flags=CodeDirectoryFlags.RUNTIME
    )
    output = tmp_path / "exe"
    signed = sign_path(fx.path("exe.arm64"), options, output=output)
    macho = mo.parse_macho(signed)
    signature = read_signature(macho)
    cd = signature.code_directory
    assert signature.superblob.slots() == [0, 2, 5, 7, 0x10000]
    assert cd.version == 0x20500
    assert cd.runtime == macho.build_version.sdk == 0x000B0000
    assert cd.flags == CodeDirectoryFlags.ADHOC | CodeDirectoryFlags.RUNTIME
    assert cd.exec_segment_flags == ExecSegmentFlags.MAIN_BINARY | ExecSegmentFlags.ALLOW_UNSIGNED
    assert signature.entitlements[8:] == entitlements
    assert cd.special_slots[5] == hashlib.sha256(signature.entitlements).digest()
    assert cd.special_slots[7] == hashlib.sha256(signature.der_entitlements).digest()
    assert signature.der_entitlements[:4] == struct.pack(">I", Magic.EMBEDDED_DER_ENTITLEMENTS)
    assert decode_der(signature.der_entitlements[8:]) == plistlib.loads(entitlements)
    assert signature.superblob.get(Slot.ENTITLEMENTS)[:4] == struct.pack(">I", Magic.EMBEDDED_ENTITLEMENTS)
    binary = lief.MachO.parse(str(output)).at(0)
    assert bytes(binary.code_signature.content) == macho.signature_data


def test_dual_digest_for_old_deployment_target(fx: MachOFixtures) -> None:
    signed = sign_file(fx.read("old.x86_64"), SigningOptions(identifier="old"))
    signature = read_signature(mo.parse_macho(signed))
    assert [cd.hash_type for cd in signature.code_directories] == [HashType.SHA1, HashType.SHA256]
    assert signature.superblob.slots() == [0, 2, 0x1000, 0x10000]
    _check_signed_slice(signed, "old")


def test_parallel_page_hashing_matches_serial_and_linker(fx: MachOFixtures) -> None:
    macho = mo.parse_macho(fx.read("big.arm64"))
    linker = read_signature(macho).code_directory
    code = memoryview(macho.data)[: linker.code_limit]
    with ThreadPoolExecutor(max_workers=2) as pool:
        parallel = hash_code(code, HashType.SHA256, executor=pool)
    assert len(parallel) == len(linker.code_hashes) > 1024
    assert tuple(parallel) == linker.code_hashes == tuple(hash_code(code, HashType.SHA256))
    assert parallel == page_hashes(macho.data, linker.code_limit)


def test_sign_path_in_place_keeps_mode(fx: MachOFixtures, tmp_path: Path) -> None:
    path = tmp_path / "tool"
    shutil.copy(fx.path("exe.x86_64"), path)
    path.chmod(0o751)
    signed = sign_path(path, SigningOptions(identifier="tool"))
    assert path.read_bytes() == signed
    assert path.stat().st_mode & 0o777 == 0o751
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tool"]


def test_cms_signer_contract(fx: MachOFixtures) -> None:
    """With a CMS signer: no CS_ADHOC, its bytes land in the BlobWrapper, room is reserved for them."""
    received = []
    cms = b"\x30\x80" + bytes(100)

    def signer(directories):
        received.append(tuple(directories))
        return cms

    options = SigningOptions(
        identifier="com.example.exe",
        team_id="ABCDE12345",
        hash_types=(HashType.SHA256, HashType.SHA1),
        code_resources=b"<plist/>",
        cms_reserve=2000,
    )
    signed = sign_file(fx.read("exe.arm64"), options, signer)
    macho = mo.parse_macho(signed)
    signature = read_signature(macho)
    assert len(received) == 1
    assert [cd.hash_type for cd in received[0]] == [HashType.SHA1, HashType.SHA256]  # SHA-1 is primary
    assert [cd.blob for cd in signature.code_directories] == [cd.blob for cd in received[0]]
    assert signature.superblob.slots() == [0, 2, 0x1000, 0x10000]
    assert signature.cms == cms and not signature.is_adhoc
    cd = signature.code_directory
    assert (cd.team_id, cd.version, cd.flags) == ("ABCDE12345", 0x20400, 0)
    assert signature.code_directories[1].special_slots[3] == hashlib.sha256(b"<plist/>").digest()
    used = len(signature.superblob.encode())
    assert macho.code_signature.datasize - used == -(-(used + 2000 - len(cms)) // 16) * 16 - used
    assert not any(macho.signature_data[used:])  # reserved room is zero-filled

    with pytest.raises(SignatureSpaceError, match="were reserved"):
        sign_file(fx.read("exe.arm64"), options, lambda directories: bytes(2100))
