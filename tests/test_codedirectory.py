"""CodeDirectory, blobs, requirements and entitlements, checked against ld64.lld's signatures and openssl.

The linker's ad-hoc signature differs from what Apple's codesign writes in one documented way:
ld64.lld pads the identifier with NULs so the hash slots start 16-byte aligned (changing
``hashOffset`` and ``length``); we write Apple's unpadded layout. Every other field, and every hash,
is identical when we build a CodeDirectory for the unmodified linker layout.
"""

from __future__ import annotations

import hashlib
import struct
import subprocess
from pathlib import Path

import pytest

import machofixtures
from conftest import require_tool, run
from machofixtures import LINKER_SIGNED, MachOFixtures, sign_file
from signbridge.apple.codesig.blobs import (
    CodeSignatureFormatError,
    Magic,
    SuperBlob,
    decode_blob,
    decode_superblob,
    encode_blob,
    encode_superblob,
)
from signbridge.apple.codesig.codedirectory import (
    CodeDirectory,
    CodeDirectoryFlags,
    ExecSegment,
    HashType,
    build_code_directory,
    choose_version,
    code_directory_size,
    default_hash_types,
    hash_code,
    hash_pages,
)
from signbridge.apple.codesig.embedded_signature import read_signature
from signbridge.apple.codesig.entitlements import (
    EntitlementsError,
    decode_der,
    der_entitlements_blob,
    encode_der,
    entitlements_blob,
    entitlements_xml,
    exec_segment_flags,
    load_entitlements,
)
from signbridge.apple.codesig.requirements import binary as rq
from signbridge.apple.codesig.requirements.binary import (
    encode_requirement,
    oid_from_der,
    oid_to_der,
    parse_requirement,
)
from signbridge.apple.codesig.requirements.text import parse_requirement_text, render, requirement_set_lines
from signbridge.apple.macho import constants as mc
from signbridge.apple.macho import parse as mo
from signbridge.apple.macho.sign import SigningOptions


@pytest.fixture(scope="session")
def fx(tmp_path_factory: pytest.TempPathFactory) -> MachOFixtures:
    return machofixtures.get_fixtures(tmp_path_factory)


def openssl_sha256(data: bytes) -> bytes:
    return run([require_tool("openssl"), "dgst", "-sha256", "-binary"], input=data).stdout


def raw_code_directory(signed: bytes) -> bytes:
    """The slot-0 CodeDirectory bytes, located with struct alone (no signbridge code)."""
    parsed = mo.parse_macho(signed)  # only for dataoff; the blob walk below is independent
    start = parsed.code_signature.dataoff
    magic, _length, count = struct.unpack_from(">III", signed, start)
    assert magic == 0xFADE0CC0
    for index in range(count):
        slot, offset = struct.unpack_from(">II", signed, start + 12 + 8 * index)
        if slot == 0:
            cd_length = struct.unpack_from(">I", signed, start + offset + 4)[0]
            return signed[start + offset : start + offset + cd_length]
    raise AssertionError("no CodeDirectory in slot 0")


def without_identifier_padding(blob: bytes) -> bytes:
    """ld64.lld's CodeDirectory with the NUL padding after the identifier removed (Apple's layout)."""
    length, _, _, hash_offset, ident_offset, special, _ = struct.unpack_from(">7I", blob, 4)
    ident_end = blob.index(b"\0", ident_offset) + 1
    hash_size = blob[36]
    first_slot = hash_offset - special * hash_size
    padding = first_slot - ident_end
    out = bytearray(blob[:ident_end] + blob[first_slot:])
    struct.pack_into(">I", out, 4, length - padding)
    struct.pack_into(">I", out, 16, hash_offset - padding)
    return bytes(out)


# --- against the linker's signatures -----------------------------------------------------------------


@pytest.mark.parametrize("name", LINKER_SIGNED)
def test_linker_signature_parity(fx: MachOFixtures, name: str) -> None:
    macho = mo.parse_macho(fx.read(name))
    signature = read_signature(macho)
    linker = signature.code_directory
    assert signature.superblob.slots() == [0]
    assert linker.flags == CodeDirectoryFlags.ADHOC | CodeDirectoryFlags.LINKER_SIGNED
    assert (linker.identifier, linker.version, linker.page_size) == (name, 0x20400, 4096)
    code = memoryview(macho.data)[: linker.code_limit]
    assert linker.code_limit == macho.code_signature.dataoff

    # our page hashes for the same bytes equal the linker's
    assert tuple(hash_code(code, HashType.SHA256)) == linker.code_hashes

    # the CodeDirectory we build for the unmodified layout is field-identical ...
    text = macho.text
    built = build_code_directory(
        code,
        identifier=name,
        flags=CodeDirectoryFlags.ADHOC | CodeDirectoryFlags.LINKER_SIGNED,
        exec_segment=ExecSegment(text.fileoff, text.filesize, 1 if macho.filetype == mc.MH_EXECUTE else 0),
    )
    assert built == linker
    # ... and byte-identical once lld's identifier padding is taken out
    assert built.encode() == without_identifier_padding(linker.blob)
    assert linker.cdhash() == openssl_sha256(linker.blob)[:20]


def test_cdhash_checked_by_openssl(fx: MachOFixtures) -> None:
    signed = sign_file(fx.read("exe_plist.arm64"), SigningOptions(identifier="com.example.hello"))
    cd = read_signature(mo.parse_macho(signed)).code_directory
    raw = raw_code_directory(signed)
    assert raw == cd.blob == cd.encode()
    assert cd.cdhash() == openssl_sha256(raw)[:20]
    assert cd.full_hash() == openssl_sha256(raw)
    # Info.plist special slot: the hash of the embedded __TEXT,__info_plist bytes
    assert cd.special_slots[1] == openssl_sha256(fx.info_plist.read_bytes())
    assert cd.special_slots[2] == openssl_sha256(rq.EMPTY_REQUIREMENT_SET)
    assert cd.special_slot_count == 2


def test_hash_pages_range_and_short_last_page() -> None:
    code = bytes(range(256)) * 41  # 10496 bytes: two full pages and a short one
    full = hash_pages(code, 0, 3, HashType.SHA256)
    assert full == [hashlib.sha256(code[i : i + 4096]).digest() for i in (0, 4096, 8192)]
    assert hash_pages(code, 1, 3, HashType.SHA256) == full[1:]
    sha1 = [hashlib.sha1(code[i : i + 4096]).digest() for i in (0, 4096, 8192)]
    assert hash_pages(code, 0, 9, HashType.SHA1) == sha1  # stops at the end of the code
    assert hash_pages(code, 0, 3, HashType.SHA256_TRUNCATED) == [h[:20] for h in full]
    assert hash_code(b"", HashType.SHA256) == []


# --- layout and versions -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "version", "ident_offset"),
    [
        ({}, 0x20100, 48),
        ({"team_id": "ABCDE12345"}, 0x20200, 52),
        ({"code_limit": 5 << 30}, 0x20300, 64),
        ({"exec_segment_limit": 0x4000}, 0x20400, 88),
        ({"runtime": 0x000E0000, "team_id": "ABCDE12345", "exec_segment_limit": 0x4000}, 0x20500, 96),
    ],
)
def test_version_choice_and_round_trip(kwargs: dict, version: int, ident_offset: int) -> None:
    choice = choose_version(
        runtime=kwargs.get("runtime", 0),
        exec_segment_limit=kwargs.get("exec_segment_limit", 0),
        code_limit=kwargs.get("code_limit", 8192),
        team_id=kwargs.get("team_id"),
    )
    assert choice == version
    cd = CodeDirectory(
        identifier="com.example.app",
        hash_type=HashType.SHA256,
        code_limit=kwargs.get("code_limit", 8192),
        code_hashes=(bytes(range(32)), bytes(range(1, 33))),
        special_slots={1: b"\x11" * 32, 5: b"\x55" * 32},
        version=version,
        flags=CodeDirectoryFlags.RUNTIME,
        team_id=kwargs.get("team_id"),
        exec_segment_limit=kwargs.get("exec_segment_limit", 0),
        runtime=kwargs.get("runtime", 0),
    )
    blob = cd.encode()
    magic, length, got_version, _flags, hash_offset, got_ident, special, count, limit32 = struct.unpack_from(
        ">9I", blob
    )
    assert (magic, length, got_version, got_ident, special, count) == (
        0xFADE0C02, len(blob), version, ident_offset, 5, 2,
    )
    assert blob[got_ident : got_ident + 16] == b"com.example.app\0"
    assert hash_offset == len(blob) - 2 * 32
    assert blob[hash_offset - 32 : hash_offset] == b"\x11" * 32  # slot 1 is nearest code slot 0
    assert blob[hash_offset - 5 * 32 : hash_offset - 4 * 32] == b"\x55" * 32
    assert blob[hash_offset - 2 * 32 : hash_offset - 32] == bytes(32)  # absent slot 2 zero-filled
    if cd.code_limit > 0xFFFFFFFF:
        assert limit32 == 0xFFFFFFFF and struct.unpack_from(">Q", blob, 56)[0] == cd.code_limit
    parsed = CodeDirectory.parse(blob + bytes(16))
    assert parsed == cd
    assert parsed.blob == blob
    size = code_directory_size(
        identifier=cd.identifier, team_id=cd.team_id, hash_type=HashType.SHA256, special_slot_count=5,
        code_limit=8192, version=version,
    )
    assert size == len(blob)


def test_encode_refuses_fields_the_version_cannot_hold() -> None:
    base = {"identifier": "x", "hash_type": HashType.SHA256, "code_limit": 0, "code_hashes": ()}
    with pytest.raises(CodeSignatureFormatError, match="team ID"):
        CodeDirectory(**base, version=0x20100, team_id="T").encode()
    with pytest.raises(CodeSignatureFormatError, match="runtime"):
        CodeDirectory(**base, version=0x20400, runtime=1).encode()
    with pytest.raises(CodeSignatureFormatError, match="32-byte hash"):
        CodeDirectory(**base, special_slots={2: b"short"}).encode()


def _damaged(blob: bytes, offset: int, code: str, value: int) -> bytes:
    out = bytearray(blob)
    struct.pack_into(code, out, offset, value)
    return bytes(out)


def test_parse_rejects_malformed_code_directories() -> None:
    blob = build_code_directory(bytes(5000), identifier="x").encode()
    short = _damaged(blob[:44], 4, ">I", 44)
    cases = [
        (_damaged(blob, 0, ">I", 0xFADE0C03), "not a CodeDirectory"),
        (_damaged(blob, 4, ">I", len(blob) + 1), "claims"),
        (_damaged(blob, 8, ">I", 0x10000), "unsupported CodeDirectory version"),
        (_damaged(blob, 36, ">B", 20), "hash size is 20"),
        (_damaged(blob, 37, ">B", 9), "unknown hash type 9"),
        (_damaged(blob, 28, ">I", 1000), "do not fit"),
        (_damaged(blob, 20, ">I", len(blob) - 1), "not a NUL-terminated string"),
        (short, "needs 48 header bytes"),
        (blob[:40], "at least 44"),
    ]
    for damaged, message in cases:
        with pytest.raises(CodeSignatureFormatError, match=message):
            CodeDirectory.parse(damaged)


def test_default_hash_types() -> None:
    assert default_hash_types(1, 0x000A0B04) == (HashType.SHA256,)
    assert default_hash_types(1, 0x000A0B03) == (HashType.SHA1, HashType.SHA256)
    assert default_hash_types(2, 0x000A0000) == (HashType.SHA1, HashType.SHA256)
    assert default_hash_types(2, 0x000B0000) == (HashType.SHA256,)
    assert HashType.from_name("SHA-256") is HashType.SHA256
    with pytest.raises(CodeSignatureFormatError, match="unknown digest algorithm"):
        HashType.from_name("md5")


# --- blobs -------------------------------------------------------------------------------------------


def test_superblob_sorted_and_packed() -> None:
    blob_a = encode_blob(0xFADE0C01, b"")
    blob_b = encode_blob(0xFADE0B01, b"xy")
    data = encode_superblob(Magic.EMBEDDED_SIGNATURE, [(0x10000, blob_b), (2, blob_a)])
    assert data == bytes.fromhex(
        "fade0cc0" "0000002e" "00000002" "00000002" "0000001c" "00010000" "00000024"
        "fade0c01" "00000008" "fade0b01" "0000000a" "7879"
    )
    parsed = decode_superblob(data + bytes(32), Magic.EMBEDDED_SIGNATURE)
    assert parsed == SuperBlob(Magic.EMBEDDED_SIGNATURE, ((2, blob_a), (0x10000, blob_b)))
    assert parsed.encode() == data
    assert decode_blob(blob_b) == (0xFADE0B01, b"xy")
    with pytest.raises(CodeSignatureFormatError, match="two blobs in one slot"):
        encode_superblob(Magic.EMBEDDED_SIGNATURE, [(2, blob_a), (2, blob_a)])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (bytes.fromhex("fade0cc0 0000000c"), "at least 12"),
        (bytes.fromhex("fade0cc0 00000010 00000005 00000000"), "lists 5 blobs"),
        (bytes.fromhex("fade0cc0 00000014 00000001 00000000 00000010"), "inside the index"),
        (bytes.fromhex("fade0cc0 00000014 00000001 00000000 00000014"), "cut short"),
        (bytes.fromhex("fade0cc0 00000100 00000000"), "claims 256 bytes"),
        (bytes.fromhex("fade0c01 0000000c 00000000"), "expected a EMBEDDED_SIGNATURE"),
    ],
)
def test_superblob_rejects_malformed(data: bytes, message: str) -> None:
    with pytest.raises(CodeSignatureFormatError, match=message):
        decode_superblob(data, Magic.EMBEDDED_SIGNATURE)


# --- requirements ------------------------------------------------------------------------------------


DEVELOPER_ID_TEXT = (
    'identifier "com.example.app" and anchor apple generic and '
    "certificate 1[field.1.2.840.113635.100.6.2.6] /* exists */ and "
    "certificate leaf[field.1.2.840.113635.100.6.1.13] /* exists */ and "
    "certificate leaf[subject.OU] = ABCDE12345"
)


def test_empty_requirement_set() -> None:
    assert bytes.fromhex("fade0c01 0000000c 00000000") == rq.EMPTY_REQUIREMENT_SET
    assert rq.parse_requirement_set(rq.EMPTY_REQUIREMENT_SET) == {}


def test_developer_id_requirement_text_and_binary() -> None:
    expr = parse_requirement_text(DEVELOPER_ID_TEXT)
    assert render(expr) == DEVELOPER_ID_TEXT
    blob = encode_requirement(expr)
    # the Developer ID CA marker is stored as raw DER OID content: 2A 86 48 86 F7 63 64 06 02 06
    assert bytes.fromhex("0000000a 2a864886f763640602060000") in blob
    assert parse_requirement(blob) == expr
    requirement_set = rq.encode_requirement_set({rq.RequirementType.DESIGNATED: expr})
    assert rq.parse_requirement_set(requirement_set) == {3: expr}
    assert requirement_set_lines(rq.parse_requirement_set(requirement_set)) == ["designated => " + DEVELOPER_ID_TEXT]


def test_requirement_binary_form_by_hand() -> None:
    expr = rq.Expr(rq.Op.AND, (rq.identifier("com.x"), rq.Expr(rq.Op.APPLE_ANCHOR)))
    assert encode_requirement(expr) == bytes.fromhex(
        "fade0c00 00000024 00000001 00000006 00000002 00000005 636f6d2e78000000 00000003"
    )
    assert render(expr) == 'identifier "com.x" and anchor apple'


def test_requirement_rendering_rules() -> None:
    def team(ou: str) -> rq.Expr:
        return rq.certificate_field(0, "subject.OU", rq.Match(rq.MatchOp.EQUAL, ou.encode()))

    assert render(team("43AQ936H96")).endswith('= "43AQ936H96"')  # leading digit: quoted
    assert render(team("UBF8T346G9")).endswith("= UBF8T346G9")  # simple word: bare
    assert render(rq.identifier("tool")) == "identifier tool"
    either = rq.Expr(rq.Op.OR, (rq.identifier("a"), rq.cdhash(bytes.fromhex("00ff"))))
    both = rq.Expr(rq.Op.AND, (either, rq.Expr(rq.Op.NOT, (rq.Expr(rq.Op.NOTARIZED),))))
    assert render(both) == '(identifier a or cdhash H"00ff") and ! notarized'
    info = rq.Expr(rq.Op.INFO_KEY_FIELD, (b"CFBundleVersion", rq.Match(rq.MatchOp.BEGINS_WITH, b"1.")))
    assert render(info) == 'info[CFBundleVersion] = "1."*'
    anchor = rq.Expr(rq.Op.ANCHOR_HASH, (-1, bytes.fromhex("abcd")))
    assert render(anchor) == 'certificate root = H"abcd"'
    assert render(rq.Expr(rq.Op.IDENT, (b"\x01\x02",))) == "identifier 0x0102"
    for sample in (both, info, anchor):
        assert parse_requirement(encode_requirement(sample)) == sample


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("00000001 000000ff", "unknown requirement opcode"),
        ("00000001 00000002 00000010 61", "runs past the end"),
        ("00000001 00000006 00000001", "ends in the middle"),
        ("00000002 00000001", "unsupported requirement kind"),
        ("00000001 00000001 00000001", "follow the requirement expression"),
    ],
)
def test_requirement_parse_errors(payload: str, message: str) -> None:
    with pytest.raises(CodeSignatureFormatError, match=message):
        parse_requirement(encode_blob(Magic.REQUIREMENT, bytes.fromhex(payload)))


def test_oid_round_trip() -> None:
    for oid in ("1.2.840.113635.100.6.2.6", "1.2.840.113635.100.6.1.13", "2.5.4.11", "2.999.3"):
        assert oid_from_der(oid_to_der(oid)) == oid
    assert oid_to_der("1.2.840.113635.100.6.1.13").hex() == "2a864886f763640601" "0d"


# --- entitlements ------------------------------------------------------------------------------------

# DER entitlements as Apple's codesign writes them (byte vectors published in rcodesign's tests).
APPLE_DER_VECTORS = [
    ({}, "7005020101b000"),
    ({"key": True}, "700f020101b00a30080c036b65790101ff"),
    ({"key": -1}, "700f020101b00a30080c036b6579020" "1ff"),
    ({"key": "value"}, "7013020101b00e300c0c036b65790c0576616c7565"),
    ({"key": [True, "foo"]}, "7016020101b011300f0c036b6579300801" "01ff0c03666f6f"),
    ({"key": {"inner": False}}, "701a020101b015301" "30c036b6579b00c300a0c05696e6e6572010100"),
    (
        {"key3": 42, "key": False, "key2": True},
        "7025020101b02030080c036b6579010100" "30090c046b6579320101ff" "30090c046b65793302012a",
    ),
]


@pytest.mark.parametrize(("value", "der"), APPLE_DER_VECTORS)
def test_der_entitlements_match_apple(value: dict, der: str) -> None:
    assert encode_der(value).hex() == der.replace(" ", "")
    assert decode_der(bytes.fromhex(der)) == value


def test_der_entitlements_parse_with_openssl(tmp_path: Path) -> None:
    value = {"com.apple.security.app-sandbox": True, "keychain-access-groups": ["T.a", "T.b"], "n": 300}
    path = tmp_path / "ent.der"
    path.write_bytes(encode_der(value))
    out = subprocess.run(
        [require_tool("openssl"), "asn1parse", "-inform", "DER", "-in", str(path)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert ":com.apple.security.app-sandbox" in out.stdout and "UTF8STRING" in out.stdout
    assert ":012C" in out.stdout  # INTEGER 300
    blob = der_entitlements_blob(value)
    assert blob[:8] == struct.pack(">II", 0xFADE7172, len(blob))


def test_entitlements_xml_blob_and_validation() -> None:
    xml = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n'
        b'<plist version="1.0"><dict><key>a</key><true/></dict></plist>\n'
    )
    assert entitlements_xml(xml) == xml  # an XML file is embedded byte for byte
    blob = entitlements_blob(xml)
    assert blob == struct.pack(">II", 0xFADE7171, 8 + len(xml)) + xml
    assert load_entitlements(entitlements_xml({"a": True})) == {"a": True}
    with pytest.raises(EntitlementsError, match="must be a dictionary"):
        load_entitlements(b'<plist version="1.0"><array/></plist>')
    with pytest.raises(EntitlementsError, match="not a valid property list"):
        load_entitlements(b"not a plist")
    with pytest.raises(EntitlementsError, match="only holds"):
        encode_der({"when": 1.5})
    assert exec_segment_flags({"get-task-allow": True, "dynamic-codesigning": True, "x": True}) == 0x50
    assert exec_segment_flags({"get-task-allow": False}) == 0
