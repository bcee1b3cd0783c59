"""Flat packages (xar): reading, building and signature surgery, checked with bsdtar, openssl and dd."""

from __future__ import annotations

import base64
import datetime
import errno
import hashlib
import os
import shutil
import stat
import struct
import subprocess
import time
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import require_tool, run
from signbridge.apple.pkg.xar.archive import XarArchive, signature_data
from signbridge.apple.pkg.xar.errors import (
    ChecksumMismatchError,
    DuplicateSignatureError,
    HeapRangeError,
    InvalidNumberError,
    MalformedTocError,
    NotXarError,
    PackageBuildError,
    SignatureSizeError,
    SourceChangedError,
    StapledTicketError,
    TocTooLargeError,
    TruncatedXarError,
    UnsafeTocError,
    UnsupportedChecksumError,
    XarError,
    XarFormatError,
)
from signbridge.apple.pkg.xar.signing import prepare_signed
from signbridge.apple.pkg.xar.toc import HeapRange
from signbridge.apple.pkg.xar.writer import PackageEntry, write_package
from signbridge.errors import SignatureError
from xarfixtures import (
    APPLE_CHECKSUM_NUMBERS,
    OpensslSigner,
    bsdtar_create,
    bsdtar_extract,
    bsdtar_list,
    bsdtar_list_verbose,
    dd_cut,
    file_xml,
    finish,
    heap_bytes,
    openssl_digest,
    raw_xar,
    read_layout,
    sample_files,
    snapshot,
    staple,
    toc_document,
    write_tree,
)

FILES = sample_files()
DIRECTORIES = {"Resources", "Resources/en.lproj", "app.pkg"}
CMS_RESERVED = 6000


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> OpensslSigner:
    return OpensslSigner(tmp_path_factory.mktemp("signer"))


@pytest.fixture(scope="module")
def signer4096(tmp_path_factory: pytest.TempPathFactory) -> OpensslSigner:
    return OpensslSigner(tmp_path_factory.mktemp("signer4096"), bits=4096, name="second")


def writer_package(directory: Path, toc_checksum: str = "sha1", file_checksum: str = "sha1") -> Path:
    entries = [PackageEntry(path, data, compress=not path.endswith("Payload")) for path, data in FILES.items()]
    return write_package(directory / "unsigned.pkg", entries, toc_checksum=toc_checksum, file_checksum=file_checksum)


def bsdtar_package(directory: Path, *options: str) -> Path:
    source = write_tree(directory / "tree", FILES)
    return bsdtar_create(source, directory / "unsigned.pkg", *options)


SOURCES: dict[str, Callable[[Path], Path]] = {
    "writer-sha1": lambda d: writer_package(d, "sha1", "sha1"),
    "writer-sha256": lambda d: writer_package(d, "sha256", "sha256"),
    "writer-sha512-md5": lambda d: writer_package(d, "sha512", "md5"),
    "writer-none": lambda d: writer_package(d, "none", "sha1"),
    "bsdtar-sha1": lambda d: bsdtar_package(d, "xar:toc-checksum=sha1", "xar:checksum=sha1"),
    "bsdtar-md5": lambda d: bsdtar_package(d, "xar:toc-checksum=md5", "xar:checksum=md5"),
    "bsdtar-none-raw": lambda d: bsdtar_package(d, "xar:toc-checksum=none", "xar:checksum=none", "xar:compression=none"),
    "bsdtar-bzip2": lambda d: bsdtar_package(d, "xar:compression=bzip2"),
    "bsdtar-xz": lambda d: bsdtar_package(d, "xar:compression=xz"),
}


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- reading and writing -------------------------------------------------------------------------------


@pytest.mark.parametrize("source", SOURCES)
def test_reads_packages_from_our_writer_and_bsdtar(tmp_path: Path, source: str) -> None:
    package = SOURCES[source](tmp_path)
    archive = XarArchive.open(package)

    assert {f.path for f in archive.toc.files} == set(FILES) | DIRECTORIES
    for entry in archive.toc.files:
        if entry.type == "directory":
            assert entry.path in DIRECTORIES and entry.data is None
        else:
            assert archive.read_data(entry) == FILES[entry.path], entry.path
    # bsdtar lists and extracts the same tree, checking each file's checksums on the way
    assert bsdtar_list(package, tmp_path) == set(FILES) | DIRECTORIES
    assert bsdtar_extract(package, tmp_path) == FILES


@pytest.mark.parametrize("algorithm", ["sha1", "sha256", "sha512"])
def test_writer_toc_checksum_is_the_hash_of_the_compressed_toc(tmp_path: Path, algorithm: str) -> None:
    package = writer_package(tmp_path, algorithm, "sha256")
    layout = read_layout(package)
    size = hashlib.new(algorithm).digest_size

    assert layout.checksum_number == APPLE_CHECKSUM_NUMBERS[algorithm]
    assert layout.slot("checksum") == (0, size)
    dd_cut(package, layout.header_size, layout.toc_compressed_length, tmp_path / "toc.z")
    stored = dd_cut(package, layout.heap_offset, size, tmp_path / "checksum.bin")
    assert openssl_digest(algorithm, tmp_path / "toc.z") == stored
    assert XarArchive.open(package).compute_toc_checksum() == stored
    data = layout.toc_element().find("file[name='Distribution']/data")
    assert data.find("encoding").get("style") == "application/x-gzip"
    assert data.findtext("extracted-checksum") == hashlib.sha256(FILES["Distribution"]).hexdigest()
    payload = layout.toc_element().find("file[name='app.pkg']/file[name='Payload']/data")
    assert payload.find("encoding").get("style") == "application/octet-stream"


def test_file_metadata_is_reported(tmp_path: Path) -> None:
    archive = XarArchive.open(bsdtar_package(tmp_path, "xar:checksum=sha1"))
    data = archive.file("app.pkg/Payload").data
    stored = heap_bytes(archive.path, read_layout(archive.path), data.offset, data.length)

    assert data.size == len(FILES["app.pkg/Payload"])
    assert data.encoding == "application/x-gzip"
    assert zlib.decompress(stored) == FILES["app.pkg/Payload"]
    assert data.archived_checksum.style == "sha1"
    assert data.archived_checksum.digest == hashlib.sha1(stored).digest()
    assert data.extracted_checksum.digest == hashlib.sha1(FILES["app.pkg/Payload"]).digest()


def test_reads_the_extended_header_of_open_source_xar(tmp_path: Path) -> None:
    """xar 1.6 writes checksum 3 ("other") with the algorithm's name after the 28 header bytes."""
    toc = toc_document(file_xml("a", 32, 5), "sha256")
    compressed = zlib.compress(toc.encode())
    header = struct.pack(">4sHHQQI", b"xar!", 64, 1, len(compressed), len(toc), 3) + b"sha256".ljust(36, b"\0")
    package = raw_xar(tmp_path / "x.xar", toc, b"hello", checksum="sha256", header=header)

    archive = XarArchive.open(package)
    assert (archive.header.size, archive.header.checksum_name, archive.heap_offset) == (64, "sha256", 64 + len(compressed))
    assert archive.read_data(archive.file("a")) == b"hello"


def test_damaged_file_data_is_detected(tmp_path: Path) -> None:
    package = writer_package(tmp_path)
    layout = read_layout(package)
    offset, length = layout.file_ranges()["app.pkg/Payload"]
    data = bytearray(package.read_bytes())
    data[layout.heap_offset + offset + length // 2] ^= 0x01
    package.write_bytes(data)

    archive = XarArchive.open(package)  # the TOC is intact
    with pytest.raises(ChecksumMismatchError, match="Payload"):
        archive.read_data(archive.file("app.pkg/Payload"))
    bsdtar = require_tool("bsdtar")
    (tmp_path / "x").mkdir()
    assert run_fails([bsdtar, "-xf", str(package), "-C", str(tmp_path / "x")])


def run_fails(args: list[str]) -> bool:
    return subprocess.run(args, capture_output=True).returncode != 0


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([PackageEntry("a/../b", b"x")], "not a valid path"),
        ([PackageEntry("a", b"x"), PackageEntry("a", b"y")], "twice"),
        ([PackageEntry("a", b"x"), PackageEntry("a/b", b"y")], "both a file and a directory"),
    ],
)
def test_writer_refuses_bad_paths(tmp_path: Path, entries: list[PackageEntry], message: str) -> None:
    with pytest.raises(PackageBuildError, match=message):
        write_package(tmp_path / "x.pkg", entries)
    assert list(tmp_path.iterdir()) == []


# --- signing -------------------------------------------------------------------------------------------


def sign(
    package: Path, out: Path, signer: OpensslSigner, algorithm: str = "sha256", cms_reserved: int = CMS_RESERVED
):
    prepared = prepare_signed(XarArchive.open(package), algorithm, signer.size, cms_reserved, [signer.cert_der])
    rsa = signer.rsa_sign(prepared.toc_checksum, algorithm)
    cms = signer.cms_sign(prepared.toc_checksum)
    finish(prepared, rsa, cms, out)
    return prepared, rsa, cms


def check_signed(
    tmp_path: Path, original: Path, signed: Path, signer: OpensslSigner, algorithm: str, cms_reserved: int
) -> None:
    """Everything a signed package must satisfy, checked without signbridge's reader."""
    size = hashlib.new(algorithm).digest_size
    layout = read_layout(signed)
    assert layout.checksum_number == APPLE_CHECKSUM_NUMBERS[algorithm]
    assert (layout.count("checksum"), layout.count("signature"), layout.count("x-signature")) == (1, 1, 1)
    assert layout.slot("checksum") == (0, size)
    assert layout.slot("signature") == (size, signer.size)
    assert layout.slot("x-signature") == (size + signer.size, cms_reserved)
    assert layout.toc_element().find("signature").get("style") == "RSA"
    assert layout.toc_element().find("x-signature").get("style") == "CMS"
    for tag in ("signature", "x-signature"):
        assert [base64.b64decode(c) for c in layout.certificates(tag)] == [signer.cert_der]

    # the checksum in the heap is openssl's digest of the compressed TOC cut out with dd
    toc_file = tmp_path / f"{signed.name}.toc"
    dd_cut(signed, layout.header_size, layout.toc_compressed_length, toc_file)
    checksum = dd_cut(signed, layout.heap_offset, size, tmp_path / f"{signed.name}.checksum")
    assert openssl_digest(algorithm, toc_file) == checksum
    # both signatures verify over that checksum
    rsa = dd_cut(signed, layout.heap_offset + size, signer.size, tmp_path / f"{signed.name}.rsa")
    verified = signer.rsa_verify(rsa, checksum, algorithm)
    assert verified.returncode == 0 and "Signature Verified Successfully" in verified.stdout, verified.stderr
    cms = dd_cut(signed, layout.heap_offset + size + signer.size, cms_reserved, tmp_path / f"{signed.name}.cms")
    verified = signer.cms_verify(cms, checksum)
    assert verified.returncode == 0, verified.stderr

    # file data is byte-identical, only moved
    before = read_layout(original)
    old, new = before.file_ranges(), layout.file_ranges()
    assert old.keys() == new.keys() and set(FILES) - {"app.pkg/Scripts"} <= old.keys()
    for path, (offset, length) in old.items():
        assert new[path][1] == length
        assert heap_bytes(signed, layout, new[path][0], length) == heap_bytes(original, before, offset, length), path
    # and bsdtar still lists and extracts every file
    assert bsdtar_list(signed, tmp_path) == set(FILES) | DIRECTORIES
    assert bsdtar_extract(signed, tmp_path) == FILES


@pytest.mark.parametrize("algorithm", ["sha1", "sha256"])
@pytest.mark.parametrize("source", ["writer-sha1", "writer-sha256", "writer-none", "bsdtar-sha1", "bsdtar-md5",
                                    "bsdtar-none-raw", "bsdtar-xz"])
def test_sign(tmp_path: Path, signer: OpensslSigner, source: str, algorithm: str) -> None:
    package = SOURCES[source](tmp_path)
    before = sha256_of(package)
    out = tmp_path / "out" / "signed.pkg"
    out.parent.mkdir()

    prepared, rsa, cms = sign(package, out, signer, algorithm)

    assert sha256_of(package) == before
    assert os.listdir(out.parent) == ["signed.pkg"]
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE(package.stat().st_mode)
    assert (prepared.replaced_signatures, prepared.dropped_ticket) == ((), False)
    check_signed(tmp_path, package, out, signer, algorithm, CMS_RESERVED)
    # the heap lost the old checksum and gained the signature area, nothing else
    old_checksum = read_layout(package).slot("checksum")[1] if "none" not in source else 0
    grown = prepared.signature_area_size - old_checksum
    assert out.stat().st_size == package.stat().st_size + grown + len(prepared.toc_compressed) - read_layout(
        package
    ).toc_compressed_length
    # our reader agrees
    data = signature_data(XarArchive.open(out))
    assert data.checksum == prepared.toc_checksum and data.checksum_matches
    assert data.rsa_signature == rsa
    assert data.cms == cms.ljust(CMS_RESERVED, b"\0")
    assert data.certificates == (signer.cert_der,)
    assert data.checksum_algorithm.hashlib_name == algorithm


def test_resigning_replaces_the_signatures(
    tmp_path: Path, signer: OpensslSigner, signer4096: OpensslSigner
) -> None:
    package = writer_package(tmp_path, "sha1")
    first, second = tmp_path / "first.pkg", tmp_path / "second.pkg"
    sign(package, first, signer, "sha256", cms_reserved=9000)
    first_bytes = first.read_bytes()

    prepared, _, _ = sign(first, second, signer4096, "sha1", cms_reserved=4000)

    assert first.read_bytes() == first_bytes
    assert prepared.replaced_signatures == ("RSA", "CMS")
    check_signed(tmp_path, package, second, signer4096, "sha1", 4000)
    layout = read_layout(second)
    # no dead bytes: the first signature area is gone, not kept in front of the files
    first_start = min(o for o, n in read_layout(package).file_ranges().values() if n)
    second_start = min(o for o, n in layout.file_ranges().values() if n)
    assert second_start == 20 + 512 + 4000
    assert first_start == 20


def test_one_signature_kind_can_be_left_out(tmp_path: Path, signer: OpensslSigner) -> None:
    package = writer_package(tmp_path)
    out = tmp_path / "signed.pkg"
    prepared = prepare_signed(XarArchive.open(package), "sha256", None, 5000, [signer.cert_der])
    finish(prepared, None, signer.cms_sign(prepared.toc_checksum), out)

    layout = read_layout(out)
    assert (layout.count("signature"), layout.count("x-signature")) == (0, 1)
    assert layout.slot("x-signature") == (32, 5000)
    assert bsdtar_extract(out, tmp_path) == FILES
    assert signature_data(XarArchive.open(out)).rsa_signature is None


def test_stapled_ticket_is_dropped(tmp_path: Path, signer: OpensslSigner) -> None:
    package = writer_package(tmp_path)
    signed = tmp_path / "signed.pkg"
    sign(package, signed, signer)
    staple(signed, b"TICKET" * 100)

    archive = XarArchive.open(signed)
    assert archive.stapled_ticket is not None
    assert archive.heap_offset + archive.heap_size == archive.stapled_ticket.offset
    assert archive.stapled_ticket.ticket_length == 600
    resigned = tmp_path / "resigned.pkg"
    prepared, _, _ = sign(signed, resigned, signer)

    assert prepared.dropped_ticket
    assert b"t8lr" not in resigned.read_bytes() and b"TICKET" not in resigned.read_bytes()
    check_signed(tmp_path, package, resigned, signer, "sha256", CMS_RESERVED)


def test_signing_moves_extended_attribute_data_too(tmp_path: Path, signer: OpensslSigner) -> None:
    ea = (
        '<ea id="0"><name>com.apple.FinderInfo</name><offset>25</offset><length>4</length><size>4</size>'
        '<encoding style="application/octet-stream"/></ea>'
    )
    package = _valid(tmp_path / "ea.pkg", file_xml("a", 20, 5, extra=ea), b"helloATTR")
    assert XarArchive.open(package).file("a").other_ranges == (HeapRange(25, 4),)
    out = tmp_path / "signed.pkg"
    sign(package, out, signer)

    layout = read_layout(out)
    moved = 32 + signer.size + CMS_RESERVED - 20
    assert int(layout.toc_element().findtext("file/ea/offset")) == 25 + moved
    assert heap_bytes(out, layout, 25 + moved, 4) == b"ATTR"
    assert layout.file_ranges() == {"a": (20 + moved, 5)}
    assert heap_bytes(out, layout, 20 + moved, 5) == b"hello"
    assert bsdtar_list(out, tmp_path) == {"a"}


# --- repeated and unknown elements, as real TOCs have them ---------------------------------------------

REPEATED_DATA = (
    '<file id="7" x-flag="1"><data><length>5</length><offset>20</offset><size>5</size>'
    '<encoding style="application/octet-stream"/></data>'
    '<data><length>5</length><offset>25</offset><size>5</size><encoding style="application/octet-stream"/></data>'
    "<type>file</type><name>first</name><name>second</name><x-unknown a=\"b\">text</x-unknown></file>"
)


def test_a_repeated_property_counts_as_libxar_reads_it_the_last_one(tmp_path: Path) -> None:
    package = _valid(tmp_path / "r.pkg", REPEATED_DATA, b"helloWORLD")
    entry = XarArchive.open(package).file("second")
    assert (entry.id, entry.data.offset, entry.other_ranges) == ("7", 25, (HeapRange(20, 5),))
    assert XarArchive.open(package).read_data(entry) == b"WORLD"


def test_a_repeated_data_element_is_range_checked_too(tmp_path: Path) -> None:
    body = REPEATED_DATA.replace("<offset>20</offset>", "<offset>9999</offset>")
    with pytest.raises(HeapRangeError, match="data of 'second' lies outside the heap"):
        XarArchive.open(_valid(tmp_path / "r.pkg", body, b"helloWORLD"))


def test_every_repeated_name_must_be_safe(tmp_path: Path) -> None:
    body = file_xml("a", 20, 5).replace("<name>a</name>", "<name>../etc</name><name>a</name>")
    with pytest.raises(MalformedTocError, match="not a safe file name"):
        XarArchive.open(_valid(tmp_path / "r.pkg", body))


def test_base64_names_are_decoded(tmp_path: Path) -> None:
    name = "日本語.strings"
    encoded = base64.b64encode(name.encode()).decode()
    body = file_xml("x", 20, 5).replace("<name>x</name>", f'<name enctype="base64">{encoded}</name>')
    assert XarArchive.open(_valid(tmp_path / "n.pkg", body)).toc.files[0].path == name


def test_resigning_moves_every_repeated_offset_and_keeps_the_rest(tmp_path: Path, signer: OpensslSigner) -> None:
    package = _valid(tmp_path / "r.pkg", '<x-top id="t">kept</x-top>' + REPEATED_DATA, b"helloWORLD")
    out = tmp_path / "signed.pkg"
    sign(package, out, signer)
    moved = 32 + signer.size + CMS_RESERVED - 20
    toc = read_layout(out).toc_element()
    assert [int(e.text) for e in toc.iter("offset")][3:] == [20 + moved, 25 + moved]
    assert [e.text for e in toc.find("file").findall("name")] == ["first", "second"]
    assert toc.find("file").get("x-flag") == "1" and toc.find("file/x-unknown").get("a") == "b"
    assert [e.tag for e in toc] == ["checksum", "x-top", "signature", "x-signature", "file"]
    assert XarArchive.open(out).read_data(XarArchive.open(out).file("second")) == b"WORLD"


def test_the_signature_creation_time_says_when_the_new_signatures_were_made(
    tmp_path: Path, signer: OpensslSigner
) -> None:
    signed_time = '<signature-creation-time id="s">461137009.8</signature-creation-time>'
    package = _valid(tmp_path / "p.pkg", signed_time + file_xml("a", 20, 5))
    when = datetime.datetime(2026, 12, 3, tzinfo=datetime.UTC)  # 9467 days after 2001-01-01
    prepared = prepare_signed(package, "sha1", None, 100, [signer.cert_der], signed_at=when)
    element = ET.fromstring(prepared.toc_xml).find("toc/signature-creation-time")
    assert (element.text, element.get("id")) == ("817948800.0", "s")


def test_new_signatures_take_the_place_of_the_old_ones(tmp_path: Path, signer: OpensslSigner) -> None:
    package = _valid(tmp_path / "p.pkg", SIG + XSIG + '<x-top id="t"/>' + file_xml("a", 28, 5), b"xxxxyyyyhello")
    sign(package, tmp_path / "signed.pkg", signer)
    toc = read_layout(tmp_path / "signed.pkg").toc_element()
    assert [e.tag for e in toc] == ["checksum", "signature", "x-signature", "x-top", "file"]
    assert XarArchive.open(tmp_path / "signed.pkg").read_data(XarArchive.open(tmp_path / "signed.pkg").file("a")) == b"hello"


@pytest.mark.parametrize("unavailable", [["copy_file_range"], ["copy_file_range", "sendfile"]])
def test_finish_falls_back_when_the_kernel_cannot_copy(
    tmp_path: Path, signer: OpensslSigner, monkeypatch: pytest.MonkeyPatch, unavailable: list[str]
) -> None:
    """copy_file_range fails across file systems (EXDEV) and sendfile on some; the bytes must not change
    (and are those of the checked copy, which reads every byte)."""
    package = writer_package(tmp_path)
    prepared = prepare_signed(package, "sha256", signer.size, 3000, [signer.cert_der])
    rsa = signer.rsa_sign(prepared.toc_checksum, "sha256")
    finish(prepared, rsa, b"", tmp_path / "kernel.pkg", check_files=False)
    finish(prepared, rsa, b"", tmp_path / "checked.pkg")
    assert (tmp_path / "checked.pkg").read_bytes() == (tmp_path / "kernel.pkg").read_bytes()

    refused: list[str] = []

    def refuse(*args: object) -> int:
        refused.append("called")
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    for name in unavailable:
        monkeypatch.setattr(os, name, refuse)
    finish(prepared, rsa, b"", tmp_path / "fallback.pkg", check_files=False)
    assert len(refused) == len(unavailable)
    assert (tmp_path / "fallback.pkg").read_bytes() == (tmp_path / "kernel.pkg").read_bytes()
    assert bsdtar_extract(tmp_path / "fallback.pkg", tmp_path) == FILES


def test_finish_refuses_signatures_that_do_not_fit(tmp_path: Path, signer: OpensslSigner) -> None:
    package = writer_package(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    prepared = prepare_signed(package, "sha256", 256, 100, [signer.cert_der])
    rsa = signer.rsa_sign(prepared.toc_checksum, "sha256")

    with pytest.raises(SignatureSizeError, match="reserved"):
        finish(prepared, rsa[:-1], b"", out_dir / "a.pkg")
    with pytest.raises(SignatureSizeError, match="more than the 100"):
        finish(prepared, rsa, b"\x30" * 101, out_dir / "a.pkg")
    assert list(out_dir.iterdir()) == []


def test_finish_refuses_to_overwrite_its_input(tmp_path: Path, signer: OpensslSigner) -> None:
    package = writer_package(tmp_path)
    before = package.read_bytes()
    prepared = prepare_signed(package, "sha256", 256, 3000, [signer.cert_der])
    with pytest.raises(XarError, match="new file"):
        finish(prepared, signer.rsa_sign(prepared.toc_checksum, "sha256"), b"", package)
    assert package.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unsigned.pkg"]


def test_finish_notices_an_input_changed_since_prepare(tmp_path: Path, signer: OpensslSigner) -> None:
    package = writer_package(tmp_path)
    prepared = prepare_signed(package, "sha256", 256, 3000, [signer.cert_der])
    rsa = signer.rsa_sign(prepared.toc_checksum, "sha256")
    with open(package, "ab") as f:
        f.write(b"more")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(SourceChangedError):
        finish(prepared, rsa, b"", out_dir / "signed.pkg")
    assert list(out_dir.iterdir()) == []


def test_prepare_refuses_bad_parameters(tmp_path: Path, signer: OpensslSigner) -> None:
    package = writer_package(tmp_path)
    with pytest.raises(UnsupportedChecksumError, match="md5"):
        prepare_signed(package, "md5", 256, 3000, [signer.cert_der])
    with pytest.raises(SignatureSizeError):
        prepare_signed(package, "sha256", -1, 3000, [signer.cert_der])
    with pytest.raises(SignatureSizeError):
        prepare_signed(package, "sha256", None, None, [signer.cert_der])
    with pytest.raises(SignatureError, match="not a DER"):
        prepare_signed(package, "sha256", 256, 3000, [b"not a certificate"])
    with pytest.raises(SignatureError, match="needs the signing certificate"):
        prepare_signed(package, "sha256", 256, 3000, [])


# --- hostile and damaged input -------------------------------------------------------------------------

SIG = '<signature style="RSA"><offset>20</offset><size>4</size></signature>'
XSIG = '<x-signature style="CMS"><offset>24</offset><size>4</size></x-signature>'
LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE xar [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
    '<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]><xar><toc><creation-time>&c;</creation-time></toc></xar>'
)
EXTERNAL = '<?xml version="1.0"?><!DOCTYPE xar [<!ENTITY x SYSTEM "file:///etc/passwd">]><xar><toc>&x;</toc></xar>'


def header(compressed_length: int, uncompressed_length: int, checksum: int = 1, *, size: int = 28, version: int = 1):
    return struct.pack(">4sHHQQI", b"xar!", size, version, compressed_length, uncompressed_length, checksum)


def _valid(path: Path, body: str = file_xml("a", 20, 5), heap: bytes = b"hello", **kw) -> Path:
    return raw_xar(path, toc_document(body, kw.pop("checksum", "sha1")), heap, **kw)


def _with_header(path: Path, **fields) -> Path:
    toc = toc_document(file_xml("a", 20, 5)).encode()
    compressed = zlib.compress(toc)
    values = {"compressed_length": len(compressed), "uncompressed_length": len(toc)} | fields
    return raw_xar(path, toc, b"hello", header=header(**values), compressed=compressed)


def _cut(path: Path, keep: int) -> Path:
    _valid(path)
    path.write_bytes(path.read_bytes()[:keep])
    return path


def _bomb(path: Path) -> Path:
    toc = b"<xar><toc>" + b" " * (65 * 1024 * 1024) + b"</toc></xar>"
    compressed = zlib.compress(toc, 9)
    return raw_xar(path, toc, header=header(len(compressed), 100, 0), compressed=compressed, checksum="none")


def _zlib_cut(path: Path) -> Path:
    toc = toc_document(file_xml("a", 20, 5)).encode()
    compressed = zlib.compress(toc)[:-8]
    return raw_xar(path, toc, b"hello", compressed=compressed, header=header(len(compressed), len(toc)))


def _corrupt_checksum(path: Path) -> Path:
    _valid(path)
    data = bytearray(path.read_bytes())
    data[-6] ^= 0xFF  # last byte of the stored checksum (5 bytes of file data follow it)
    path.write_bytes(data)
    return path


def _damaged_ticket(path: Path) -> Path:
    _valid(path)
    with open(path, "ab") as f:
        f.write(b"x" * 40 + struct.pack("<4sHHII", b"t8lr", 1, 2, 8, 0))
    return path


def _ticket_too_long(path: Path) -> Path:
    _valid(path)
    with open(path, "ab") as f:
        f.write(struct.pack("<4sHHII", b"t8lr", 1, 1, 0, 0) + b"ticket" + struct.pack("<4sHHII", b"t8lr", 1, 2, 4 * 10**9, 0))
    return path


def _ticket_cut(path: Path) -> Path:
    _valid(path)
    with open(path, "ab") as f:
        f.write(struct.pack("<4sHHII", b"t8lr", 1, 1, 0, 0) + b"ticket" * 10 + struct.pack("<4sHHII", b"t8lr", 1, 2, 60, 0)[:9])
    return path


def _ticket_wrong_type(path: Path) -> Path:
    _valid(path)
    with open(path, "ab") as f:
        f.write(struct.pack("<4sHHII", b"t8lr", 1, 1, 0, 0) + b"ticket" + struct.pack("<4sHHII", b"t8lr", 1, 1, 6, 0))
    return path


BAD_INPUTS: dict[str, tuple[Callable[[Path], Path], type[Exception], str]] = {
    "zip file": (lambda p: (p.write_bytes(b"PK\x03\x04" + b"\0" * 100), p)[1], NotXarError, "not a flat package"),
    "empty file": (lambda p: (p.write_bytes(b""), p)[1], NotXarError, "does not start with"),
    "truncated header": (lambda p: _cut(p, 20), TruncatedXarError, "inside its xar header"),
    "truncated toc": (lambda p: _cut(p, 40), TruncatedXarError, "inside its table of contents"),
    "toc zlib stream cut short": (_zlib_cut, TruncatedXarError, "ends early"),
    "toc not zlib": (
        lambda p: raw_xar(p, "<xar/>", compressed=b"plain text, not zlib", checksum="none",
                          header=header(20, 6, 0)),
        MalformedTocError, "not valid zlib",
    ),
    "header version 2": (lambda p: _with_header(p, version=2), XarFormatError, "version 2"),
    "header size 20": (lambda p: _with_header(p, size=20), XarFormatError, "at least 28"),
    "header checksum 9": (lambda p: _with_header(p, checksum=9), UnsupportedChecksumError, "number 9"),
    "header toc length 2**64-1": (
        lambda p: _with_header(p, compressed_length=2**64 - 1), InvalidNumberError, "impossibly large",
    ),
    "header claims a huge toc": (
        lambda p: _with_header(p, uncompressed_length=65 * 1024 * 1024), TocTooLargeError, "more than",
    ),
    "toc inflates past the limit": (_bomb, TocTooLargeError, "inflates to more than"),
    "entity expansion": (lambda p: raw_xar(p, LAUGHS), UnsafeTocError, "DTD or entities"),
    "external entity": (lambda p: raw_xar(p, EXTERNAL), UnsafeTocError, "DTD or entities"),
    "bare doctype": (lambda p: raw_xar(p, "<!DOCTYPE xar><xar><toc/></xar>"), UnsafeTocError, "DTD"),
    "deeply nested toc": (
        lambda p: raw_xar(p, "<xar><toc>" + "<file>" * 5000 + "</file>" * 5000 + "</toc></xar>"),
        MalformedTocError, "more than 256 deep",
    ),
    "toc with too many elements": (
        lambda p: raw_xar(p, "<xar><toc>" + "<a/>" * 1_000_001 + "</toc></xar>"),
        MalformedTocError, "more than 1000000 elements",
    ),
    "malformed xml": (lambda p: raw_xar(p, "<xar><toc></xar>"), MalformedTocError, "not well-formed"),
    "not a xar toc": (lambda p: raw_xar(p, "<html/>"), MalformedTocError, "<html>"),
    "file data past the end": (lambda p: _valid(p, file_xml("a", 20, 5000)), HeapRangeError, "outside the heap"),
    "file offset past the end": (lambda p: _valid(p, file_xml("a", 10**9, 5)), HeapRangeError, "outside the heap"),
    "signature past the end": (
        lambda p: _valid(p, SIG.replace("<size>4", "<size>400")), HeapRangeError, "<signature>",
    ),
    "checksum past the end": (
        lambda p: raw_xar(p, toc_document("").replace("<offset>0", "<offset>99"), b""), HeapRangeError, "checksum",
    ),
    "two signatures": (lambda p: _valid(p, SIG + SIG, b"x" * 8), DuplicateSignatureError, "2 <signature>"),
    "two x-signatures": (lambda p: _valid(p, XSIG + XSIG, b"x" * 8), DuplicateSignatureError, "2 <x-signature>"),
    "negative offset": (lambda p: _valid(p, file_xml("a", -20, 5)), InvalidNumberError, "'-20'"),
    "overflowing offset": (
        lambda p: _valid(p, file_xml("a", 10**25, 5)), InvalidNumberError, "not a whole number",
    ),
    "offset not a number": (
        lambda p: _valid(p, file_xml("a", 20, 5).replace("<offset>20", "<offset>0x14")), InvalidNumberError, "0x14",
    ),
    "two checksums": (
        lambda p: _valid(p, '<checksum style="sha1"><offset>0</offset><size>20</size></checksum>'),
        MalformedTocError, "2 <checksum>",
    ),
    "damaged checksum": (_corrupt_checksum, ChecksumMismatchError, "does not match its checksum"),
    "header and toc disagree": (
        lambda p: _with_header(p, checksum=3), ChecksumMismatchError, "header says the TOC checksum is sha256",
    ),
    "signed without a checksum": (
        lambda p: raw_xar(p, toc_document(SIG, "none"), b"x" * 30, checksum="none"), ChecksumMismatchError,
        "no checksum",
    ),
    "unsafe file name": (lambda p: _valid(p, file_xml("..", 20, 5)), MalformedTocError, "not a safe file name"),
    "file inside the signature area": (
        lambda p: _valid(p, file_xml("a", 10, 5), b"hello"), HeapRangeError, "inside the signature area",
    ),
    "damaged stapled ticket": (_damaged_ticket, StapledTicketError, "notarization ticket"),
    "ticket length past the file": (_ticket_too_long, StapledTicketError, "length of 4000000000 bytes, more than"),
    "ticket without its trailer": (_ticket_cut, StapledTicketError, "ends before its trailer"),
    "ticket trailer of the wrong type": (_ticket_wrong_type, StapledTicketError, "record of type 1"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_refused_and_left_alone(tmp_path: Path, signer: OpensslSigner, case: str) -> None:
    build, error, message = BAD_INPUTS[case]
    package = build(tmp_path / "input.pkg")
    before = snapshot(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    with pytest.raises(error, match=message) as raised:
        prepared = prepare_signed(package, "sha256", 256, 3000, [signer.cert_der])
        finish(prepared, b"\0" * 256, b"", out_dir / "signed.pkg")

    assert type(raised.value) is error
    assert str(package) in str(raised.value)
    assert snapshot(tmp_path) == before  # input untouched, no output or temporary file left behind


def test_the_stapled_ticket_check_only_triggers_on_its_magic(tmp_path: Path) -> None:
    package = _valid(tmp_path / "x.pkg", file_xml("a", 20, 5), b"hello" + b"\0" * 64)
    archive = XarArchive.open(package)
    assert archive.stapled_ticket is None and archive.heap_size == 20 + 5 + 64


# --- cost ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_signing_a_256_mib_package_costs_about_a_copy(tmp_path: Path, signer: OpensslSigner) -> None:
    payload = tmp_path / "Payload"
    with open(payload, "wb") as f:
        for _ in range(256):
            f.write(os.urandom(1024 * 1024))
    package = write_package(
        tmp_path / "big.pkg",
        [PackageEntry("PackageInfo", FILES["app.pkg/PackageInfo"]), PackageEntry("Payload", payload, compress=False)],
    )
    payload.unlink()
    cp = shutil.which("cp")
    copies = []
    for _ in range(2):
        start = time.perf_counter()
        run([cp, str(package), str(tmp_path / "copy.pkg")])
        copies.append(time.perf_counter() - start)
        (tmp_path / "copy.pkg").unlink()

    start = time.perf_counter()
    sign(package, tmp_path / "signed.pkg", signer)
    signing = time.perf_counter() - start

    print(f"\ncp of a 256 MiB package: {min(copies):.3f}s; prepare + sign (openssl) + finish: {signing:.3f}s")
    assert signing < max(3 * min(copies), min(copies) + 1.0)
    archive = XarArchive.open(tmp_path / "signed.pkg")
    assert archive.file("Payload").data.size == 256 * 1024 * 1024
    assert bsdtar_list_verbose(tmp_path / "signed.pkg", tmp_path).count("268435456") == 1
