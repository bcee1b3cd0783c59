"""Inputs the fuzz harnesses (and the issue's outside fuzzer) found, as deterministic regressions.

Each is a fixture or corpus item plus the mutation that broke a reader, made here at test time:
damaged certificates inside a CMS signature, a package's table of contents, a timestamp and a
notarization ticket (cryptography reads a certificate lazily, so these used to raise ValueError or
UnsupportedAlgorithm far from where it was read); Mach-O content inside the load commands (the
signer raised struct.error); SuperBlobs and load commands that ask for unbounded work; archives
with impossible offsets, names that are not UTF-8 and colliding entries. Every one must end in a
specific error with a message for the terminal, from the library and from the command line.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import struct
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from codesignkit import codesign
from conftest import require_tool, run
from corpuskit import CORPUS, copy_item
from machofixtures import get_fixtures
from pkgkit import rewrite_toc, signbridge
from signbridge.apple import codesign as engine
from signbridge.apple import display
from signbridge.apple.bundle.ipa import IpaError
from signbridge.apple.bundle.ipa import extract as extract_ipa
from signbridge.apple.codesig import cms
from signbridge.apple.codesig.blobs import (
    CodeSignatureFormatError,
    Magic,
    decode_blob,
    decode_superblob,
    encode_blob,
)
from signbridge.apple.codesig.embedded_signature import read_signature
from signbridge.apple.codesig.entitlements import signature_entitlements
from signbridge.apple.codesig.options import CodesignOptions
from signbridge.apple.codesig.verdicts import VerifyOptions
from signbridge.apple.codesig.verification import MODIFIED, CodeVerificationError
from signbridge.apple.macho.parse import LoadCommandError, SignatureLayoutError, parse_file
from signbridge.apple.notary.errors import PayloadError
from signbridge.apple.notary.payload import Limits, extract_cpio, extract_zip
from signbridge.apple.notary.ticket import TicketError, parse_ticket
from signbridge.apple.pkg.verify import PackageStatus, verify_package
from signbridge.apple.pkg.xar.archive import XarArchive
from signbridge.apple.pkg.xar.errors import TocTooLargeError
from signbridge.apple.verify_code import verify_code
from signbridge.crypto.cms import CmsFormatError, SignatureMismatch, verify_detached
from signbridge.crypto.der import CertificateFormatError, read_certificate
from xarfixtures import notarization_ticket, sample_files, write_tree

DER = serialization.Encoding.DER
TEAMID = "macho/northpolesec_santa__signed-with-teamid"  # thin x86_64, Apple Development, 3 certificates


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return get_fixtures(tmp_path_factory)


# --- certificates ---------------------------------------------------------------------------------


def _leaf(data: bytes) -> bytes:
    signature = read_signature(parse_file(data).slices[0])
    return cms.parse_signed_data(signature.cms).signer_certificate.public_bytes(DER)


def _damage_common_name(der: bytes) -> bytes:
    """The certificate with the first byte of its subject's CN string made invalid UTF-8."""
    text = re.search(rb"\x0c[\x01-\x7f](Apple Development|Developer ID|Test)", der)
    assert text is not None
    damaged = bytearray(der)
    damaged[text.start(1)] = 0xFF
    return bytes(damaged)


def _damage_policy_text(der: bytes) -> bytes:
    damaged = bytearray(der)
    damaged[der.index(b"Reliance on this certificate")] = 0xFF  # a UserNotice's explicitText
    return bytes(damaged)


def _unknown_key_algorithm(der: bytes) -> bytes:
    rsa_encryption = bytes.fromhex("06092a864886f70d010101")
    damaged = bytearray(der)
    damaged[der.index(rsa_encryption) + len(rsa_encryption) - 1] = 0x07  # RSAES-OAEP: no key cryptography loads
    return bytes(damaged)


DAMAGES = {
    "subject": (_damage_common_name, "subject"),
    "policy extension": (_damage_policy_text, "PolicyQualifierInfo"),
    "key algorithm": (_unknown_key_algorithm, "key type"),
}


@pytest.mark.parametrize("damage", DAMAGES, ids=list(DAMAGES))
def test_one_reader_names_a_damaged_certificate(damage):
    edit, detail = DAMAGES[damage]
    leaf = _leaf(corpus_bytes(TEAMID))
    read_certificate(leaf)
    with pytest.raises(CertificateFormatError, match=f"the leaf is not a readable X.509 certificate .*{detail}"):
        read_certificate(edit(leaf), "the leaf")


def corpus_bytes(relative: str) -> bytes:
    return (CORPUS / relative).read_bytes()


@pytest.fixture(params=list(DAMAGES))
def damaged_macho(request, tmp_path) -> Path:
    """The corpus's Apple Development-signed tool with its leaf certificate damaged inside the CMS."""
    path = copy_item(TEAMID, tmp_path)
    data = path.read_bytes()
    leaf = _leaf(data)
    path.write_bytes(data.replace(leaf, DAMAGES[request.param][0](leaf)))
    return path


def test_verify_names_a_damaged_certificate_in_the_cms(damaged_macho):
    with pytest.raises(CodeVerificationError) as caught:
        verify_code(damaged_macho, VerifyOptions(strict=True))
    assert caught.value.status == MODIFIED
    assert "certificate 3 of the CMS signature is not a readable X.509 certificate" in str(caught.value.detail)


def test_display_shows_a_signature_whose_certificate_is_damaged(damaged_macho):
    info = display.signing_information(damaged_macho)
    lines = [line for _, line in display.display_lines(info, 3)]
    assert "Identifier=goodcert" in lines
    assert not any(line.startswith("Authority=") for line in lines)  # the CMS cannot be read
    assert display.implicit_designated(info).startswith("identifier goodcert and anchor apple generic")


def test_command_line_on_a_damaged_certificate(damaged_macho):
    verified = codesign("--verify", "--strict", damaged_macho)
    assert verified.returncode == 1, verified.stderr
    assert "not a readable X.509 certificate" in verified.stderr and "Traceback" not in verified.stderr
    shown = codesign("-dvvv", damaged_macho)
    assert shown.returncode == 0, shown.stderr
    assert "Identifier=goodcert" in shown.stderr and "Traceback" not in shown.stderr


def test_damaged_certificate_in_a_timestamp():
    data = corpus_bytes("macho/htacg_tidy-mac-installer__tidy")
    signature = read_signature(parse_file(data).slices[0])
    authority = cms.parse_signed_data(signature.cms).timestamp.certificates[0].public_bytes(DER)
    damaged = signature.cms.replace(authority, _unknown_key_algorithm(authority))
    with pytest.raises(CmsFormatError, match="certificate 1 of the timestamp token is not a readable X.509"):
        cms.parse_signed_data(damaged)


def test_damaged_certificate_in_a_package(tmp_path):
    """A package whose table of contents lists a damaged signing certificate (the checksum
    recomputed, as an attacker would): an invalid signature, in words."""
    path = copy_item("pkg/pqrs-org_Karabiner-DriverKit-VirtualHIDDevice__4.3.0.pkg", tmp_path)

    def edit(xml: bytes) -> bytes:
        found = re.search(rb"<X509Certificate>([^<]*)</X509Certificate>", xml)
        der = base64.b64decode(found.group(1))
        return xml.replace(found.group(1), base64.b64encode(_damage_common_name(der)), 1)

    rewrite_toc(path, edit, fix_checksum=True)
    verdict = verify_package(path, ())
    assert verdict.status is PackageStatus.INVALID_SIGNATURE
    assert verdict.problems[0].startswith("certificate 1 of the <signature> is not a readable X.509 certificate")
    checked = signbridge("pkgutil", "--check-signature", str(path))
    assert checked.returncode == 1 and "invalid signature" in checked.stdout, checked.stdout + checked.stderr
    assert "Traceback" not in checked.stderr


def test_damaged_certificate_in_a_ticket():
    ticket = notarization_ticket(bytes(20))
    with pytest.raises(TicketError, match="holds certificates that cannot be read"):
        parse_ticket(ticket.replace(b"Test Software Ticket Signing", b"\xffest Software Ticket Signing"), "a.pkg")


# --- Mach-O layout ----------------------------------------------------------------------------------


def _section_field(data: bytes, segment: str, section: str, field: int) -> int:
    """The file offset of a 64-bit section header's field (``offset`` is at 48)."""
    macho = parse_file(data).slices[0]
    found = macho.segment(segment)
    index = [item.name for item in found.sections].index(section)
    return found.command_offset + 72 + 80 * index + field


def test_section_inside_the_load_commands_is_refused_by_reader_and_signer(fx, tmp_path):
    """The outside fuzzer's struct.error: a section offset pointing into the load commands."""
    for name in ("exe.arm64", "exe_unsigned.arm64"):
        data = bytearray(fx.read(name))
        struct.pack_into("<I", data, _section_field(data, "__TEXT", "__text", 48), 16)
        (tmp_path / name).write_bytes(data)
    message = "section __TEXT,__text starts at offset 16, inside the header and load commands"
    with pytest.raises(LoadCommandError, match=message):
        parse_file((tmp_path / "exe.arm64").read_bytes())
    with pytest.raises(CodeVerificationError) as caught:
        verify_code(tmp_path / "exe.arm64", VerifyOptions())
    assert message in caught.value.detail
    unsigned = tmp_path / "exe_unsigned.arm64"
    before = unsigned.read_bytes()
    with pytest.raises(LoadCommandError, match=message):
        engine.sign_code(unsigned, None, CodesignOptions())
    signed = codesign("-f", "-s", "-", unsigned)
    assert signed.returncode == 1 and message in signed.stderr and "Traceback" not in signed.stderr
    assert unsigned.read_bytes() == before


def test_code_signature_inside_the_load_commands(fx):
    data = bytearray(fx.read("exe.arm64"))
    command = parse_file(bytes(data)).slices[0].code_signature.command_offset
    struct.pack_into("<I", data, command + 8, 16)
    with pytest.raises(SignatureLayoutError, match="the code signature starts at offset 16, inside the header"):
        parse_file(bytes(data))


def test_segment_mapping_the_header_signs_and_verifies(fx, tmp_path):
    """Fuzz-found: __PAGEZERO given a file size of 8 (at offset 0, like __TEXT it maps the header).
    The signer used to take it for content at offset 0 and raise struct.error."""
    data = bytearray(fx.read("exe_plist.arm64"))
    pagezero = parse_file(bytes(data)).slices[0].segment("__PAGEZERO")
    struct.pack_into("<Q", data, pagezero.command_offset + 48, 8)
    path = tmp_path / "exe"
    path.write_bytes(data)
    engine.sign_code(path, None, CodesignOptions(force=True))
    assert verify_code(path, VerifyOptions(strict=True)).identifier == "com.example.hello"


def test_too_many_load_commands_are_refused_quickly():
    count = 400_000  # 3.2 MB of 8-byte commands: seconds to walk one by one
    commands = struct.pack("<II", 0x2A, 8) * count
    data = struct.pack("<8I", 0xFEEDFACF, 0x01000007, 3, 2, count, len(commands), 0, 0) + commands
    started = time.monotonic()
    with pytest.raises(LoadCommandError, match="claims 400000 load commands; signbridge reads at most 4096"):
        parse_file(data)
    assert time.monotonic() - started < 0.5


def test_superblob_pointing_many_times_at_one_blob():
    """An index of 100,000 entries all naming one 1 MB blob asked for 100 GB of copies."""
    blob = encode_blob(Magic.BLOB_WRAPPER, bytes(1 << 20))
    count = 100_000
    start = 12 + 8 * count
    data = struct.pack(">III", Magic.EMBEDDED_SIGNATURE, start + len(blob), count)
    data += struct.pack(">II", 0x10000, start) * count + blob
    started = time.monotonic()
    with pytest.raises(CodeSignatureFormatError, match="lists 100000 blobs; signatures hold at most 64"):
        decode_superblob(data)
    few = struct.pack(">III", Magic.EMBEDDED_SIGNATURE, 28 + len(blob), 2) + struct.pack(">IIII", 0, 28, 2, 28)
    with pytest.raises(CodeSignatureFormatError, match="blobs 0 and 1 of the SuperBlob overlap"):
        decode_superblob(few + blob)
    assert time.monotonic() - started < 0.5


# --- packages and archives ----------------------------------------------------------------------------


def test_toc_bounded_by_its_declared_size(tmp_path):
    """A 16 KB TOC that inflates to 16 MB of XML (seconds of parsing) while its header says 14 KB."""
    source = CORPUS / "pkg" / "pqrs-org_Karabiner-DriverKit-VirtualHIDDevice__4.3.0.pkg"
    path = shutil.copy(source, tmp_path / "bomb.pkg")
    declared = struct.unpack_from(">Q", Path(path).read_bytes(), 16)[0]
    rewrite_toc(Path(path), lambda xml: xml.replace(b"</toc>", b" " * (16 << 20) + b"</toc>"))
    data = bytearray(Path(path).read_bytes())
    struct.pack_into(">Q", data, 16, declared)  # the header keeps the old size
    Path(path).write_bytes(data)
    started = time.monotonic()
    with pytest.raises(TocTooLargeError, match=f"inflates to more than {declared} bytes"):
        XarArchive.open(path)
    assert time.monotonic() - started < 0.5


@pytest.fixture(scope="module")
def odc(tmp_path_factory) -> bytes:
    directory = tmp_path_factory.mktemp("odc")
    tree = write_tree(directory / "tree", sample_files())
    archive = directory / "a.cpio"
    run([require_tool("bsdtar"), "--format", "odc", "-cf", str(archive), "-C", str(tree), "."])
    return archive.read_bytes()


def test_cpio_name_that_is_not_utf8_keeps_its_bytes(odc, tmp_path):
    """Fuzz-found: libarchive gives such a name as bytes, which the path check did not take."""
    assert b"Distribution" in odc
    extract_cpio(io.BytesIO(odc.replace(b"Distribution", b"Distributio\xe9")), tmp_path, Limits(), "Payload")
    assert (tmp_path / os.fsdecode(b"Distributio\xe9")).read_bytes() == sample_files()["Distribution"]


def test_cpio_entry_that_is_a_file_and_a_folder(tmp_path):
    """Fuzz-found: a file entry whose path an earlier entry made a folder (IsADirectoryError)."""
    tree = write_tree(tmp_path / "tree", {"a/b": b"in a folder", "c": b"a file"})
    archive = tmp_path / "a.cpio"
    run([require_tool("bsdtar"), "--format", "odc", "-cf", str(archive), "-C", str(tree), "./a", "./c"])
    colliding = archive.read_bytes().replace(b"./c\0", b"./a\0")
    with pytest.raises(PayloadError, match="Payload: an entry cannot be extracted .*Is a directory"):
        extract_cpio(io.BytesIO(colliding), tmp_path / "out", Limits(), "Payload")


def test_zip_with_an_impossible_offset(tmp_path):
    """Fuzz-found: a central directory placed past its real offset made zipfile seek before the
    file's start (OSError) in the pre-flight's zip reader and the .ipa reader."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("Payload/A.app/Info.plist", b"<plist/>" * 16)
    data = bytearray(buffer.getvalue())
    end = data.rfind(b"PK\x05\x06")
    struct.pack_into("<I", data, end + 16, struct.unpack_from("<I", data, end + 16)[0] + 0x1000)
    path = tmp_path / "A.ipa"
    path.write_bytes(data)
    with pytest.raises(PayloadError, match="A.ipa is not a readable zip archive: .*Invalid argument"):
        extract_zip(path, tmp_path / "zip", Limits(), "A.ipa")
    with pytest.raises(IpaError, match="cannot be read: .*Invalid argument"):
        extract_ipa(path, tmp_path / "ipa")


# --- property lists met on the way (the plist reader itself is tested with the bundle formats) ------------


def test_unknown_encoding_in_the_cdhashes_attribute():
    """Fuzz-found: the CMS's CDHashes plist naming an encoding Python does not know (LookupError)."""
    data = corpus_bytes("macho/htacg_tidy-mac-installer__tidy")
    der = read_signature(parse_file(data).slices[0]).cms.replace(b'encoding="UTF-8"', b'encoding="UTB-8"')
    parsed = cms.parse_signed_data(der)
    assert parsed.cdhashes is None and "CDHashes" in parsed.attribute_problem
    with pytest.raises(SignatureMismatch):  # the attributes no longer match their signature
        verify_detached(parsed, content_digest=bytes(32))


@pytest.mark.parametrize("damage", ["not well-formed", "key without a dictionary"])
def test_embedded_info_plist_that_is_not_a_plist_signs_and_verifies(fx, tmp_path, damage):
    """Fuzz-found: ad hoc signing a tool whose __TEXT,__info_plist is not well-formed (ExpatError) or
    is a key outside any dictionary (IndexError), while choosing its identifier and then while
    verifying what was signed: the tool is named after its file, and its Info.plist still bound."""
    data = bytearray(fx.read("exe_plist.arm64"))
    section = parse_file(bytes(data)).slices[0].section("__TEXT", "__info_plist")
    if damage == "not well-formed":
        data[section.offset + 40] = ord("<")  # inside the XML declaration
    else:
        plist = b'<plist version="1.0"><key>a</key></plist>'
        data[section.offset : section.offset + section.size] = plist.ljust(section.size)
    path = tmp_path / "tool"
    path.write_bytes(data)
    engine.sign_code(path, None, CodesignOptions(force=True))
    assert verify_code(path, VerifyOptions(strict=True)).identifier == "tool"


def test_entitlements_that_are_not_a_property_list():
    """Fuzz-found in a SuperBlob: entitlements whose XML is not well-formed or names an unknown
    encoding, read by --verify (requirement context) and -d --entitlements."""
    signature = read_signature(parse_file(corpus_bytes(
        "bundles/sparkle-project_Sparkle__DevSignedApp.app/Contents/MacOS/SignedApp")).slices[0])
    xml = decode_blob(signature.entitlements)[1]
    assert b'encoding="UTF-8"' in xml
    for broken in (xml.replace(b'encoding="UTF-8"', b'encoding="UTB-8"'), xml.replace(b"<plist", b"<<plist", 1)):
        damaged = replace(signature, entitlements=encode_blob(Magic.EMBEDDED_ENTITLEMENTS, broken))
        assert signature_entitlements(damaged)[0] is None  # (dictionary, XML, DER), whatever can be read


def test_zip_entry_whose_utf8_name_is_not_utf8(tmp_path):
    """Fuzz-found: an entry flagged as having a UTF-8 name whose local header's name is not UTF-8
    (UnicodeDecodeError from zipfile)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("Payload/Caf\u00e9.app/Info.plist", b"<plist/>")
    data = buffer.getvalue()
    local = data.index("Payload/Caf\u00e9".encode())  # the local header's copy comes first
    path = tmp_path / "A.ipa"
    path.write_bytes(data[:local + 11] + b"\x90" + data[local + 12 :])
    with pytest.raises(PayloadError, match="A.ipa is not a readable zip archive: 'utf-8' codec"):
        extract_zip(path, tmp_path / "zip", Limits(), "A.ipa")
    with pytest.raises(IpaError, match="cannot be read: 'utf-8' codec"):
        extract_ipa(path, tmp_path / "ipa")
