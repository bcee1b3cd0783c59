"""productsign's engine: signing packages from the project's writer and from bsdtar, checked with
openssl (RSA over the checksum, CMS over the checksum, RFC 3161 timestamp) and bsdtar."""

from __future__ import annotations

import hashlib
import mmap
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import require_tool, run
from pkgkit import (
    COMPONENT_FILES,
    MTIME,
    bsdtar_package,
    component_package,
    flip,
    identity_of,
    openssl_cms_verify,
    openssl_rsa_verify,
    openssl_ts_verify,
    pki_fixture,  # noqa: F401 - provides the pki fixture
    product_archive,
    signed_parts,
    timestamp_token,
    tsa_fixture,  # noqa: F401 - provides the tsa fixture
    write_pem,
)
from signbridge.apple.certificates import EKU_DEVELOPER_ID_INSTALLER
from signbridge.apple.codesig import cms_signing
from signbridge.apple.pkg.sign import InstallerIdentityError, sign_package
from signbridge.apple.pkg.verify import PackageStatus, verify_package
from signbridge.apple.pkg.xar import output
from signbridge.apple.pkg.xar.errors import (
    ChecksumMismatchError,
    DuplicateSignatureError,
    HeapRangeError,
    NotXarError,
    TocTooLargeError,
    TruncatedXarError,
    UnsafeTocError,
    UnsupportedChecksumError,
    XarError,
)
from signbridge.apple.pkg.xar.writer import PackageEntry, write_package
from signbridge.crypto.hashes import HashAlgorithm
from signbridge.crypto.identity import Identity
from signbridge.crypto.signatures import Scheme
from signbridge.errors import SignatureError
from tokenkit import apple_name, apple_pki, issue
from xarfixtures import (
    APPLE_CHECKSUM_NUMBERS,
    bsdtar_extract,
    bsdtar_list,
    bsdtar_list_verbose,
    bsdtar_readable,
    check_file_checksums,
    file_xml,
    heap_bytes,
    notarize,
    raw_xar,
    read_layout,
    sample_files,
    snapshot,
    toc_document,
)

PRODUCT_DIRECTORIES = {"Resources", "Resources/en.lproj", "app.pkg"}


def build(source: str, directory: Path, toc_checksum: str = "sha1") -> tuple[Path, dict[str, bytes], set[str]]:
    """An unsigned package, its files and its directories."""
    if source == "product":
        return product_archive(directory / "product.pkg", toc_checksum=toc_checksum), sample_files(), PRODUCT_DIRECTORIES
    if source == "component":
        return component_package(directory / "component.pkg", toc_checksum=toc_checksum), COMPONENT_FILES, set()
    return bsdtar_package(directory), sample_files(), PRODUCT_DIRECTORIES


def der(certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize("toc_checksum", ["sha1", "sha256"])
@pytest.mark.parametrize("source", ["product", "component", "bsdtar"])
def test_signed_package_checks_out_with_openssl_and_bsdtar(tmp_path, pki, tsa, source, toc_checksum):
    package, files, directories = build(source, tmp_path)
    before = package.read_bytes()
    requests = []
    identity = identity_of(pki, log=requests)
    out = tmp_path / "signed.pkg"

    signed = sign_package(package, out, identity, toc_checksum=toc_checksum, timestamp=cms_signing.timestamper(tsa.url))

    assert package.read_bytes() == before  # the input is never written to
    parts = signed_parts(out)
    assert parts.layout.checksum_number == APPLE_CHECKSUM_NUMBERS[toc_checksum]
    assert parts.checksum_algorithm == toc_checksum
    assert parts.checksum == parts.computed_checksum == signed.toc_checksum
    chain = [der(pki.installer.certificate), der(pki.intermediate.certificate), der(pki.root.certificate)]
    assert parts.rsa_certificates == parts.cms_certificates == chain
    assert signed.signatures == ("RSA", "CMS") and signed.timestamp is not None

    # only digests reached the signer: the TOC checksum itself, then the hash of the CMS signed attributes
    algorithm = HashAlgorithm.from_name(toc_checksum)
    assert [(r.digest, r.hash_algorithm, r.scheme) for r in requests[:1]] == [
        (parts.checksum, algorithm, Scheme.RSA_PKCS1)
    ]
    assert len(requests) == 2 and requests[1].hash_algorithm is HashAlgorithm.SHA256
    assert requests[1].digest != parts.checksum and len(requests[1].digest) == 32

    # openssl: the RSA signature is PKCS#1 v1.5 with the checksum as the message hash
    verified = openssl_rsa_verify(tmp_path, chain[0], parts.checksum, parts.rsa_signature, toc_checksum)
    assert verified.returncode == 0 and "Signature Verified Successfully" in verified.stdout, verified.stderr
    # openssl: the CMS is a detached signature over the checksum bytes, chaining to the demo root
    root_pem = write_pem(tmp_path / "root.pem", pki.root.certificate)
    verified = openssl_cms_verify(tmp_path, parts.cms, parts.checksum, root_pem)
    assert verified.returncode == 0 and "Verification successful" in verified.stderr, verified.stderr
    assert parts.cms_slot[len(parts.cms) :] == bytes(len(parts.cms_slot) - len(parts.cms))  # zero padding
    # openssl: the timestamp token covers the CMS signature value and chains to the TSA's root
    token, signature_value = timestamp_token(parts.cms)
    verified = openssl_ts_verify(tmp_path, token, signature_value, write_pem(tmp_path / "tsa.pem", tsa.root))
    assert verified.returncode == 0 and "Verification: OK" in verified.stdout, verified.stdout + verified.stderr

    # bsdtar lists every file with its size and extracts it byte for byte
    listing = bsdtar_list_verbose(out, tmp_path)
    for name, data in files.items():
        assert any(line.split()[4] == str(len(data)) and line.endswith(name) for line in listing.splitlines()), name
    assert bsdtar_list(out, tmp_path) == set(files) | directories
    assert bsdtar_extract(out, tmp_path) == files

    verdict = verify_package(out, [pki.root.certificate, tsa.root])
    assert verdict.status is PackageStatus.TRUSTED and verdict.timestamp == signed.timestamp


def test_default_toc_checksum_is_sha1_as_apples_productsign(tmp_path, pki):
    signed = sign_package(product_archive(tmp_path / "in.pkg", toc_checksum="sha256"), tmp_path / "out.pkg",
                          identity_of(pki))  # fmt: skip
    parts = signed_parts(tmp_path / "out.pkg")
    assert signed.checksum_algorithm is HashAlgorithm.SHA1
    assert parts.layout.checksum_number == 1 and len(parts.checksum) == 20
    assert parts.layout.slot("signature") == (20, 256)  # Apple's layout: checksum, RSA, then CMS
    assert parts.layout.slot("x-signature")[0] == 276
    # file data keeps its offset within a memory page (the CMS slot's zero padding absorbs the shift)
    unsigned = read_layout(tmp_path / "in.pkg")
    moved = parts.layout.heap_offset + parts.layout.file_ranges()["Distribution"][0]
    original = unsigned.heap_offset + unsigned.file_ranges()["Distribution"][0]
    assert moved % mmap.PAGESIZE == original % mmap.PAGESIZE


def test_resigning_replaces_the_signatures(tmp_path, pki):
    other = apple_pki("Other Corp", "OTHER12345", issuer=pki)
    package = product_archive(tmp_path / "in.pkg")
    first = sign_package(package, tmp_path / "once.pkg", identity_of(pki))
    second = sign_package(tmp_path / "once.pkg", tmp_path / "twice.pkg", identity_of(other))

    assert first.replaced_signatures == () and second.replaced_signatures == ("RSA", "CMS")
    parts = signed_parts(tmp_path / "twice.pkg")
    assert (parts.layout.count("signature"), parts.layout.count("x-signature")) == (1, 1)
    assert parts.rsa_certificates[0] == der(other.installer.certificate)
    verified = openssl_rsa_verify(tmp_path, parts.rsa_certificates[0], parts.checksum, parts.rsa_signature, "sha1")
    assert verified.returncode == 0, verified.stderr
    assert bsdtar_extract(tmp_path / "twice.pkg", tmp_path) == sample_files()
    assert verify_package(tmp_path / "twice.pkg", [pki.root.certificate]).ok


def test_stapled_ticket_is_dropped(tmp_path, pki):
    package = product_archive(tmp_path / "in.pkg")
    sign_package(package, tmp_path / "signed.pkg", identity_of(pki))
    notarize(tmp_path / "signed.pkg")
    stapled = verify_package(tmp_path / "signed.pkg", [pki.root.certificate])
    assert stapled.ok and stapled.stapled_ticket

    resigned = sign_package(tmp_path / "signed.pkg", tmp_path / "resigned.pkg", identity_of(pki))

    assert resigned.dropped_ticket
    assert b"t8lr" not in (tmp_path / "resigned.pkg").read_bytes()
    verdict = verify_package(tmp_path / "resigned.pkg", [pki.root.certificate])
    assert verdict.ok and not verdict.stapled_ticket


def test_ecdsa_installer_identity_signs_with_cms_only(tmp_path, pki):
    leaf = issue(
        apple_name("Developer ID Installer: EC Corp (ECTEAM1234)", "EC Corp", "ECTEAM1234"),
        ec.generate_private_key(ec.SECP256R1()),
        pki.intermediate,
        ekus=[x509.ObjectIdentifier(EKU_DEVELOPER_ID_INSTALLER)],
    )
    signed = sign_package(product_archive(tmp_path / "in.pkg"), tmp_path / "out.pkg", identity_of(pki, leaf))

    assert signed.signatures == ("CMS",)
    parts = signed_parts(tmp_path / "out.pkg")
    assert parts.rsa_signature is None and parts.layout.count("signature") == 0
    root_pem = write_pem(tmp_path / "root.pem", pki.root.certificate)
    verified = openssl_cms_verify(tmp_path, parts.cms, parts.checksum, root_pem)
    assert verified.returncode == 0, verified.stderr
    assert verify_package(tmp_path / "out.pkg", [pki.root.certificate]).signatures == ("CMS",)


def test_application_identity_is_refused(tmp_path, pki):
    package = product_archive(tmp_path / "in.pkg")
    before = snapshot(tmp_path)
    requests = []
    with pytest.raises(InstallerIdentityError, match="An installer signing identity .not an application"):
        sign_package(package, tmp_path / "out.pkg", identity_of(pki, pki.application, log=requests))
    assert requests == [] and snapshot(tmp_path) == before


def test_a_wrong_signature_from_the_signer_leaves_nothing_behind(tmp_path, pki):
    package = product_archive(tmp_path / "in.pkg")
    before = snapshot(tmp_path)
    liar = Identity(pki.installer.certificate, (pki.intermediate.certificate,), lambda request: bytes(256), "liar")
    with pytest.raises(SignatureError, match="RSA signature of the package from the token liar is wrong"):
        sign_package(package, tmp_path / "out.pkg", liar)
    assert snapshot(tmp_path) == before


def test_output_may_not_be_the_input(tmp_path, pki):
    package = product_archive(tmp_path / "in.pkg")
    before = package.read_bytes()
    with pytest.raises(XarError, match="must be written to a new file"):
        sign_package(package, package, identity_of(pki))
    assert package.read_bytes() == before


def test_extra_certificates_are_embedded_after_the_chain(tmp_path, pki, tsa):
    sign_package(product_archive(tmp_path / "in.pkg"), tmp_path / "out.pkg", identity_of(pki),
                 extra_certificates=[tsa.root])  # fmt: skip
    parts = signed_parts(tmp_path / "out.pkg")
    assert parts.cms_certificates[-1] == der(tsa.root) and len(parts.cms_certificates) == 4


def test_signing_a_large_package_streams_its_payload(tmp_path, pki):
    payload = tmp_path / "Payload"
    with open(payload, "wb") as f:
        for i in range(64):
            f.write(hashlib.sha512(i.to_bytes(4, "big")).digest() * 16384)  # 64 MiB
    package = write_package(tmp_path / "big.pkg", [PackageEntry("PackageInfo", b"<pkg-info/>"),
                                                   PackageEntry("Payload", payload, compress=False)], mtime=MTIME)  # fmt: skip
    sign_package(package, tmp_path / "out.pkg", identity_of(pki))
    cmp = require_tool("cmp")
    parts = signed_parts(tmp_path / "out.pkg")
    offset = parts.layout.heap_offset + parts.layout.file_ranges()["Payload"][0]
    run([cmp, "-i", f"{offset}:0", "-n", str(payload.stat().st_size), str(tmp_path / "out.pkg"), str(payload)])
    # the data keeps its offset within 64 KiB (a large package), so the kernel copies it as fast as cp
    unsigned = read_layout(package)
    before = unsigned.heap_offset + unsigned.file_ranges()["Payload"][0]
    assert offset % 65536 == before % 65536 and offset != before


# --- file data against the table of contents --------------------------------------------------


@pytest.mark.parametrize(
    ("source", "path"),
    [("product", "app.pkg/Payload"), ("product", "Distribution"), ("component", "Payload"),
     ("bsdtar", "app.pkg/Bom")],
)  # fmt: skip
def test_file_data_that_does_not_match_its_checksum_is_refused_before_signing(tmp_path, pki, source, path):
    """The last stored byte of one file is changed (``Distribution`` is stored gzip-compressed):
    nothing is signed or written, and the error names the file and both checksums."""
    package, _, _ = build(source, tmp_path)
    layout = read_layout(package)
    offset, length = layout.file_ranges()[path]
    flip(package, layout.heap_offset + offset + length - 1)
    # independently of signbridge: hashlib over the stored bytes no longer gives the archived checksum
    with pytest.raises(AssertionError):
        check_file_checksums(package)
    changed = hashlib.sha1(heap_bytes(package, layout, offset, length)).hexdigest()
    before = snapshot(tmp_path)
    requests = []
    with pytest.raises(ChecksumMismatchError) as raised:
        sign_package(package, tmp_path / "out.pkg", identity_of(pki, log=requests))
    message = str(raised.value)
    assert message.startswith(f"{package}: the stored data of {path!r} does not match its archived sha1 checksum")
    assert changed in message  # what the data hashes to, next to what the TOC gives
    assert requests == []  # nothing was sent to the signer
    assert snapshot(tmp_path) == before  # input untouched, no output, no temporary file


def test_the_check_can_be_skipped_and_the_data_is_then_copied_unread(tmp_path, pki):
    package = component_package(tmp_path / "in.pkg")
    layout = read_layout(package)
    offset, length = layout.file_ranges()["Payload"]
    flip(package, layout.heap_offset + offset + 100)
    out = tmp_path / "out.pkg"
    sign_package(package, out, identity_of(pki), check_files=False)
    signed = read_layout(out)
    assert heap_bytes(out, signed, signed.file_ranges()["Payload"][0], length) == heap_bytes(
        package, layout, offset, length
    )
    # the signature covers the TOC, so it verifies; the data is what the installer (and --check-files) refuses
    assert verify_package(out, [pki.root.certificate], check_files=False).ok
    assert verify_package(out, [pki.root.certificate]).status is PackageStatus.INVALID_CHECKSUM


def _stored(name: str, file_id: int, offset: int, data: bytes, checksums: dict[str, str]) -> str:
    """A <file> stored as is, with the given checksums ({"archived-checksum": "sha256", ...})."""
    sums = "".join(f'<{tag} style="{style}">{hashlib.new(style, data).hexdigest()}</{tag}>'
                   for tag, style in checksums.items())  # fmt: skip
    return (
        f'<file id="{file_id}"><name>{name}</name><type>file</type><data><length>{len(data)}</length>'
        f'<offset>{offset}</offset><size>{len(data)}</size><encoding style="application/octet-stream"/>{sums}'
        "</data></file>"
    )


HAND_MADE = {  # name -> (checksums, what the error calls the mismatch)
    "a": ({"archived-checksum": "sha256", "extracted-checksum": "sha256"}, "archived sha256"),
    "b": ({"extracted-checksum": "md5"}, "extracted md5"),  # no archived checksum: the stored bytes are the contents
    "c": ({"archived-checksum": "sha512", "extracted-checksum": "sha512"}, "archived sha512"),
}


def _hand_made(path: Path) -> tuple[Path, dict[str, tuple[int, int]]]:
    """Three files of 5,000 bytes; "c" lies inside "a" (two files sharing stored bytes)."""
    a, b = bytes(range(256)) * 19 + bytes(136), hashlib.sha512(b"b").digest() * 78 + bytes(8)
    ranges = {"a": (20, 5000), "b": (5020, 5000), "c": (1020, 3000)}
    body = "".join(_stored(name, number, ranges[name][0], (a + b)[ranges[name][0] - 20 : sum(ranges[name]) - 20],
                           HAND_MADE[name][0]) for number, name in enumerate(HAND_MADE, 1))  # fmt: skip
    return raw_xar(path, toc_document(body), a + b), ranges


@pytest.mark.parametrize("chunk", [7, 4096, 1024 * 1024])
@pytest.mark.parametrize("name", HAND_MADE)
def test_every_file_is_checked_across_chunks_and_shared_bytes(tmp_path, pki, monkeypatch, chunk, name):
    monkeypatch.setattr(output, "_CHECKED_CHUNK", chunk)  # chunk boundaries inside and between files
    package, ranges = _hand_made(tmp_path / "in.pkg")
    sign_package(package, tmp_path / "good.pkg", identity_of(pki))
    assert check_file_checksums(tmp_path / "good.pkg") == 2  # hashlib agrees (it reads archived checksums)
    offset, length = ranges[name]
    flip(package, read_layout(package).heap_offset + offset + (10 if name == "a" else length // 2))  # "a" alone
    with pytest.raises(ChecksumMismatchError, match=f"the stored data of '{name}' does not match its "
                                                    f"{HAND_MADE[name][1]} checksum"):  # fmt: skip
        sign_package(package, tmp_path / "bad.pkg", identity_of(pki))
    assert not (tmp_path / "bad.pkg").exists()


def test_a_checksum_signbridge_cannot_compute_is_refused_unless_the_check_is_skipped(tmp_path, pki):
    toc = toc_document(_stored("a", 1, 20, b"hello", {}).replace(
        "</data>", '<archived-checksum style="whirlpool2">00</archived-checksum></data>'))  # fmt: skip
    package = raw_xar(tmp_path / "in.pkg", toc, b"hello")
    with pytest.raises(UnsupportedChecksumError, match="'a' has a 'whirlpool2' checksum"):
        sign_package(package, tmp_path / "out.pkg", identity_of(pki))
    sign_package(package, tmp_path / "out.pkg", identity_of(pki), check_files=False)
    assert bsdtar_extract(tmp_path / "out.pkg", tmp_path) == {"a": b"hello"}


def test_bsdtar_refuses_the_data_productsign_refuses(tmp_path):
    """libarchive's xar reader, a second implementation, also compares the archived checksum."""
    package = component_package(tmp_path / "in.pkg")
    layout = read_layout(package)
    flip(package, layout.heap_offset + layout.file_ranges()["Payload"][0] + 10)
    bsdtar = bsdtar_readable(package, tmp_path)
    result = subprocess.run([require_tool("bsdtar"), "-x", "-f", str(bsdtar), "-C", str(tmp_path)],
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert result.returncode != 0 and "Payload" in result.stderr, result.stderr


# --- bad input ----------------------------------------------------------------------------------

LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE xar [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
    ']><xar><toc><creation-time>&b;</creation-time></toc></xar>'
)
SIG = '<signature style="RSA"><offset>20</offset><size>4</size></signature>'


def _cut(path: Path, keep: int) -> Path:
    raw_xar(path, toc_document(file_xml("a", 20, 5)), b"hello")
    path.write_bytes(path.read_bytes()[:keep])
    return path


def _bomb(path: Path) -> Path:
    toc = b"<xar><toc>" + b" " * (65 * 1024 * 1024) + b"</toc></xar>"
    compressed = zlib.compress(toc, 9)
    header = struct.pack(">4sHHQQI", b"xar!", 28, 1, len(compressed), 100, 0)
    return raw_xar(path, toc, header=header, compressed=compressed, checksum="none")


BAD_INPUTS = {
    "not a xar": (lambda p: (p.write_bytes(b"PK\x03\x04" + bytes(200)), p)[1], NotXarError, "not a flat package"),
    "truncated header": (lambda p: _cut(p, 20), TruncatedXarError, "inside its xar header"),
    "truncated toc": (lambda p: _cut(p, 40), TruncatedXarError, "inside its table of contents"),
    "toc inflates past the limit": (_bomb, TocTooLargeError, "inflates to more than"),
    "entity expansion": (lambda p: raw_xar(p, LAUGHS), UnsafeTocError, "DTD or entities"),
    "offset beyond the file": (
        lambda p: raw_xar(p, toc_document(file_xml("a", 10**9, 5)), b"hello"), HeapRangeError, "outside the heap",
    ),
    "duplicate signatures": (
        lambda p: raw_xar(p, toc_document(SIG + SIG + file_xml("a", 24, 5)), b"xxxxhello"),
        DuplicateSignatureError, "2 <signature>",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_refused_and_left_alone(tmp_path, pki, case):
    make, error, message = BAD_INPUTS[case]
    package = make(tmp_path / "input.pkg")
    before = snapshot(tmp_path)
    requests = []
    with pytest.raises(error, match=message) as raised:
        sign_package(package, tmp_path / "out.pkg", identity_of(pki, log=requests))
    assert type(raised.value) is error and str(package) in str(raised.value)
    assert requests == []  # nothing was sent to the signer
    assert snapshot(tmp_path) == before  # input untouched, no output, no temporary file

