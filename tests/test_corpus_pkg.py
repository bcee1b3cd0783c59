"""Installer packages as Apple's tools write them today: every ``pkg/`` item of the corpus of real
artifacts, and packages the tests build in the same shape (repeated ``<name>``, elements and
attributes no reader models, ``id`` attributes, a product archive holding a component package,
stapled notarization tickets).

``pkgutil --check-signature`` must give Apple's verdict on every corpus item; ``productsign``
through a token must re-sign every one of them, keeping all the TOC that signing does not have to
change, which bsdtar, hashlib over the heap and openssl check independently of the code under test.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import struct
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from corpuskit import apple_anchor_env, corpus_item, corpus_items
from pkgkit import (
    flip,
    identity_of,
    openssl_cms_verify,
    openssl_rsa_verify,
    pki_fixture,  # noqa: F401 - provides the pki fixture
    rewrite_toc,
    signbridge,
    signed_parts,
    tsa_fixture,  # noqa: F401 - provides the tsa fixture
    write_pem,
)
from signbridge.apple.pkg.sign import sign_package
from signbridge.apple.pkg.verify import PackageStatus, verify_package
from signbridge.apple.pkg.xar.archive import XarArchive
from signbridge.apple.pkg.xar.errors import StapledTicketError
from tokenkit import TEAM, apple_pki, serve_token, use_runtime_dir
from xarfixtures import (
    bsdtar_extract,
    bsdtar_list,
    check_file_checksums,
    notarization_ticket,
    notarize,
    pkgbuild_package,
    read_layout,
    snapshot,
    staple,
    toc_checksum,
    toc_shape,
)

PACKAGES = corpus_items("pkg", ".pkg")
APPLE_STATUS = "signed by a developer certificate issued by Apple for distribution"
NOTARIZED = "   Notarization: trusted by the Apple notary service"
TIDY = "pkg/htacg_binaries__HTML_Tidy-5.2.0.pkg"
KARABINER = "pkg/pqrs-org_Karabiner-DriverKit-VirtualHIDDevice__{}.pkg"

# What MANIFEST.md records of the known items: the signer and the trusted timestamp's date.
KNOWN = {
    TIDY: ("Developer ID Installer: James Derry (9PN2JXXG7Y)", "2016-04-09 06:11:38"),
    KARABINER.format("1.17.0-unstapled"): ("Developer ID Installer: Fumihiko Takayama (G43BCU2T37)", "2021-03-20"),
    KARABINER.format("1.17.0-stapled"): ("Developer ID Installer: Fumihiko Takayama (G43BCU2T37)", "2021-03-20"),
    KARABINER.format("1.27.0"): ("Developer ID Installer: Fumihiko Takayama (G43BCU2T37)", "2021-11-19"),
    KARABINER.format("2.4.0"): ("Developer ID Installer: Fumihiko Takayama (G43BCU2T37)", "2023-09-06"),
    KARABINER.format("4.3.0"): ("Developer ID Installer: Fumihiko Takayama", "2024-05-26"),
    KARABINER.format("6.14.0"): ("Developer ID Installer: Fumihiko Takayama", "2026-04-26"),
}


def stapled_length(path: Path) -> int:
    """How many bytes a stapled ticket adds at the end of the file (its two records included), read
    with struct, not the code under test; 0 without one."""
    with open(path, "rb") as f:
        f.seek(-16, 2)
        magic, _, kind, length, _ = struct.unpack("<4sHHII", f.read(16))
    return 32 + length if magic == b"t8lr" and kind == 2 else 0


def is_stapled(path: Path) -> bool:
    return stapled_length(path) > 0


@pytest.fixture
def token(tmp_path, monkeypatch, pki, tsa):
    use_runtime_dir(tmp_path, monkeypatch)
    monkeypatch.setenv("SIGNBRIDGE_TIMESTAMP_URL", tsa.url)
    monkeypatch.delenv("SIGNBRIDGE_ANCHORS", raising=False)
    with serve_token("alpha", pki.identities, pki.authorities) as served:
        yield served


def test_the_corpus_has_the_package_classes():
    assert len(PACKAGES) >= 7 and TIDY in PACKAGES and KARABINER.format("6.14.0") in PACKAGES


# --- pkgutil --check-signature: Apple's verdict ------------------------------------------------------


@pytest.mark.parametrize("item", PACKAGES)
def test_check_signature_gives_apples_verdict(item):
    package = corpus_item(item)
    result = signbridge("pkgutil", "--check-signature", str(package), env=apple_anchor_env())

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[:2] == [f'Package "{package.name}":', f"   Status: {APPLE_STATUS}"]
    rest = lines[2:]
    if is_stapled(package):
        assert rest.pop(0) == NOTARIZED
    assert NOTARIZED not in rest
    assert rest[0].startswith("   Signed with a trusted timestamp on: ") and rest[0].endswith(" +0000")
    assert rest[1] == "   Certificate Chain:"
    names = [line.strip().split(". ", 1)[1] for line in rest if line[:6].strip().rstrip(".").isdigit()]
    assert names[1:] == ["Developer ID Certification Authority", "Apple Root CA"]
    if item in KNOWN:
        signer, stamped = KNOWN[item]
        assert names[0].startswith(signer) and stamped in rest[0]


# MANIFEST.md: how each item's RSA signature and CMS are formed (both conventions occur).
CONVENTIONS = {
    TIDY: ("checksum", False),
    KARABINER.format("1.17.0-unstapled"): ("sha1(checksum)", False),
    KARABINER.format("1.17.0-stapled"): ("sha1(checksum)", False),
    KARABINER.format("1.27.0"): ("checksum", True),
    KARABINER.format("2.4.0"): ("checksum", True),
    KARABINER.format("4.3.0"): ("checksum", True),
    KARABINER.format("6.14.0"): ("checksum", True),
}


@pytest.mark.parametrize("item", sorted(CONVENTIONS))
def test_both_historical_signature_conventions_verify(item):
    package = corpus_item(item)
    result = signbridge("pkgutil", "--json", "--check-signature", str(package), env=apple_anchor_env())
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert (report["rsaSignatureOver"], report["cmsSignedAttributes"]) == CONVENTIONS[item]
    assert report["signatures"] == ["RSA", "CMS"] and report["tocChecksum"] == "sha1"
    assert report["notarizationTicketStapled"] is is_stapled(package)
    assert (report["notarizationTicketIssued"] is not None) is is_stapled(package)
    if report["notarizationTicketIssued"]:  # the notary service answers minutes after the signature
        issued = dt.datetime.fromisoformat(report["notarizationTicketIssued"])
        stamped = dt.datetime.fromisoformat(report["trustedTimestamp"])
        assert dt.timedelta(0) < issued - stamped < dt.timedelta(hours=6)


@pytest.mark.parametrize("item", PACKAGES)
def test_every_file_matches_its_checksums(item):
    package = corpus_item(item)
    archive = XarArchive.open(package)
    assert all("/" not in name and name for file in archive.toc.files for name in file.path.split("/"))
    verdict = verify_package(package, [])
    assert verdict.problems and verdict.status is PackageStatus.UNTRUSTED  # contents and signatures fine
    assert check_file_checksums(package) >= 4


def test_repeated_names_are_read_as_libxar_reads_them():
    archive = XarArchive.open(corpus_item(KARABINER.format("6.14.0")))
    assert sorted(file.path for file in archive.toc.files) == ["Bom", "PackageInfo", "Payload", "Scripts"]
    assert archive.file("PackageInfo").id == "4"
    assert b"<pkg-info" in archive.read_data(archive.file("PackageInfo"))


def test_a_product_archive_holds_its_component_package():
    archive = XarArchive.open(corpus_item(TIDY))
    paths = {file.path: file for file in archive.toc.files}
    assert {"Distribution", "HTML_Tidy.pkg/Payload", "HTML_Tidy.pkg/Bom", "HTML_Tidy.pkg/PackageInfo"} <= set(paths)
    assert paths["HTML_Tidy.pkg"].type == "directory"


def test_the_stapled_ticket_is_where_manifest_says():
    stapled = corpus_item(KARABINER.format("1.17.0-stapled"))
    unstapled = corpus_item(KARABINER.format("1.17.0-unstapled"))
    archive = XarArchive.open(stapled)
    assert archive.stapled_ticket.offset == unstapled.stat().st_size
    assert archive.stapled_ticket.ticket_length == 1778
    assert archive.read_ticket()[:4] == b"s8ch"
    assert XarArchive.open(unstapled).stapled_ticket is None


# --- productsign through the token ----------------------------------------------------------------------


@pytest.mark.parametrize("item", PACKAGES)
def test_productsign_resigns_through_the_token(item, tmp_path, token, pki, tsa):
    package = corpus_item(item)
    before = hashlib.sha256(package.read_bytes()).digest()
    out = tmp_path / "signed.pkg"

    result = signbridge("productsign", "--timestamp", "--sign", TEAM, str(package), str(out))

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == f"productsign: Wrote signed product archive to {out}"
    warnings = [line for line in result.stderr.splitlines() if line]
    if is_stapled(package):
        assert len(warnings) == 1 and warnings[0].startswith("productsign: warning: the notarization ticket")
        assert not is_stapled(out)
    else:
        assert warnings == []
    assert hashlib.sha256(package.read_bytes()).digest() == before  # the input is never written to
    assert all(label.endswith("installer-signing") for label, _ in token.signer.requests)

    check_resigned(package, out, tmp_path)
    parts = signed_parts(out)
    leaf = pki.installer.certificate.public_bytes(serialization.Encoding.DER)
    verified = openssl_rsa_verify(tmp_path, leaf, parts.checksum, parts.rsa_signature, parts.checksum_algorithm)
    assert verified.returncode == 0 and "Signature Verified Successfully" in verified.stdout, verified.stderr
    verified = openssl_cms_verify(tmp_path, parts.cms, parts.checksum, write_pem(tmp_path / "root.pem", pki.root.certificate))
    assert verified.returncode == 0 and "Verification successful" in verified.stderr, verified.stderr

    anchors = write_pem(tmp_path / "anchors.pem", pki.root.certificate, tsa.root)
    checked = signbridge("pkgutil", "--check-signature", str(out), "--check-files",
                         env={"SIGNBRIDGE_ANCHORS": str(anchors)})  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.splitlines()[2].startswith("   Signed with a trusted timestamp on: ")


def check_resigned(original: Path, signed: Path, scratch: Path) -> None:
    """What signing must keep, checked with bsdtar, hashlib and a second TOC parser."""
    assert bsdtar_list(signed, scratch) == bsdtar_list(original, scratch)
    (scratch / "a").mkdir()
    (scratch / "b").mkdir()
    extracted = bsdtar_extract(signed, scratch / "a", xattrs=False)
    assert extracted == bsdtar_extract(original, scratch / "b", xattrs=False) and extracted
    assert check_file_checksums(signed) == check_file_checksums(original)

    old_shape, old_offsets = toc_shape(original)
    new_shape, new_offsets = toc_shape(signed)
    assert new_shape == old_shape  # unknown elements and attributes, repeated names, ids, order
    shifts = {new - old for old, new in zip(old_offsets, new_offsets, strict=True)}
    assert len(shifts) <= 1  # every heap offset moved by the same amount

    # the heap after the signatures is the input's, byte for byte
    old, new = read_layout(original), read_layout(signed)
    old_start = old.heap_offset + max(sum(old.slot(tag)) for tag in ("checksum", "signature", "x-signature")
                                      if old.toc_element().find(tag) is not None)  # fmt: skip
    new_start = new.heap_offset + max(sum(new.slot(tag)) for tag in ("checksum", "signature", "x-signature"))
    old_data, new_data = original.read_bytes(), signed.read_bytes()
    assert new_data[new_start : len(new_data) - stapled_length(signed)] == old_data[
        old_start : len(old_data) - stapled_length(original)
    ]


# --- packages built in today's shape --------------------------------------------------------------------

COMPONENT = {
    "Bom": b"BOMStore" + bytes(range(256)) * 4,
    "Payload": hashlib.sha512(b"payload").digest() * 2000,
    "Scripts": b"#!/bin/sh\nexit 0\n" * 10,
    "PackageInfo": b'<pkg-info format-version="2" identifier="com.example.tool" version="1.0"/>\n',
}
PRODUCT = {
    "Distribution": b'<installer-gui-script minSpecVersion="2"><pkg-ref id="t">#Tool.pkg</pkg-ref></installer-gui-script>',
    "Resources/en.lproj/Welcome.rtf": b"{\\rtf1 Welcome}" * 30,
    **{f"Tool.pkg/{name}": data for name, data in COMPONENT.items()},
}
GZIP = ("Bom", "PackageInfo", "Distribution", "Resources/en.lproj/Welcome.rtf", "Tool.pkg/Bom", "Tool.pkg/PackageInfo")


@pytest.fixture
def shaped(tmp_path, pki) -> dict[str, Path]:
    """A component package and a product archive in today's shape, unsigned and signed + notarized."""
    built = {
        "component": pkgbuild_package(tmp_path / "component.pkg", COMPONENT, gzip=GZIP),
        "product": pkgbuild_package(tmp_path / "product.pkg", PRODUCT, gzip=GZIP),
    }
    for kind in ("component", "product"):
        signed = tmp_path / f"{kind}-signed.pkg"
        sign_package(built[kind], signed, identity_of(pki))
        notarize(signed)
        built[f"{kind}-notarized"] = signed
    return built


def test_packages_in_todays_shape_are_read(shaped):
    component = XarArchive.open(shaped["component"])
    assert sorted(file.path for file in component.toc.files) == sorted(COMPONENT)
    assert {file.id for file in component.toc.files} == {"1", "2", "3", "4"}
    product = XarArchive.open(shaped["product"])
    assert {file.path for file in product.toc.files} >= set(PRODUCT) | {"Tool.pkg", "Resources/en.lproj"}
    assert product.read_data(product.file("Tool.pkg/Payload")) == COMPONENT["Payload"]
    assert check_file_checksums(shaped["product"]) == len(PRODUCT) + 1  # and the extended attribute
    assert verify_package(shaped["product"], []).status is PackageStatus.NO_SIGNATURE


@pytest.mark.parametrize("kind", ["component", "product"])
def test_packages_in_todays_shape_are_signed_and_verify(shaped, kind, tmp_path, pki):
    verdict = verify_package(shaped[f"{kind}-notarized"], [pki.root.certificate])
    assert verdict.ok and verdict.stapled_ticket, verdict.problems
    check_resigned(shaped[kind], shaped[f"{kind}-notarized"], tmp_path)


def test_resigning_a_notarized_package_drops_its_ticket_and_keeps_the_rest(shaped, tmp_path, pki):
    other = apple_pki("Other Corp", "OTHER12345", issuer=pki)
    out = tmp_path / "resigned.pkg"
    signed = sign_package(shaped["product-notarized"], out, identity_of(other))
    assert signed.dropped_ticket and signed.replaced_signatures == ("RSA", "CMS")
    assert not is_stapled(out)
    check_resigned(shaped["product"], out, tmp_path)
    assert verify_package(out, [pki.root.certificate]).ok


# --- tampering ------------------------------------------------------------------------------------------


def _heap_file_offset(path: Path, name: str) -> int:
    layout = read_layout(path)
    return layout.heap_offset + layout.file_ranges()[name][0]


def _flip_at(where):  # noqa: ANN001, ANN202 - where: package path -> file offset
    return lambda path: flip(path, where(path))


def _edit_toc(*, fix_checksum: bool):  # noqa: ANN202
    return lambda path: rewrite_toc(path, lambda xml: xml.replace(b"<mode>0644", b"<mode>0666", 1),
                                    fix_checksum=fix_checksum)  # fmt: skip


TAMPERING = {
    "a byte of the nested component's Payload": (
        _flip_at(lambda p: _heap_file_offset(p, "Tool.pkg/Payload") + 100),
        PackageStatus.INVALID_CHECKSUM, "'Tool.pkg/Payload'",
    ),
    "a byte of the compressed TOC": (_flip_at(lambda p: 28 + 40), PackageStatus.INVALID_PACKAGE, "table of contents"),
    "the TOC, its checksum left": (
        _edit_toc(fix_checksum=False), PackageStatus.INVALID_CHECKSUM, "table of contents does not match its checksum",
    ),
    "the TOC and its checksum": (_edit_toc(fix_checksum=True), PackageStatus.INVALID_SIGNATURE, "signature"),
    "a byte of the RSA signature": (
        _flip_at(lambda p: signed_parts(p).slot_offset("signature") + 7), PackageStatus.INVALID_SIGNATURE,
        "RSA signature",
    ),
    "a byte of the CMS signature": (
        _flip_at(lambda p: signed_parts(p).slot_offset("x-signature") + len(signed_parts(p).cms) - 20),
        PackageStatus.INVALID_SIGNATURE, "CMS signature",
    ),
    "a byte of the ticket's content": (
        _flip_at(lambda p: p.stat().st_size - 16 - 72 - 10), PackageStatus.INVALID_PACKAGE, "notarization ticket",
    ),
    "a byte of the ticket's certificate": (
        _flip_at(lambda p: XarArchive.open(p).stapled_ticket.ticket_offset + 16 + 200),
        PackageStatus.INVALID_PACKAGE, "notarization ticket",
    ),
    "a byte of the ticket's signature": (
        _flip_at(lambda p: p.stat().st_size - 16 - 40), PackageStatus.INVALID_PACKAGE, "notarization ticket",
    ),
}


@pytest.mark.parametrize("case", TAMPERING)
def test_tampering_is_detected_and_named(shaped, tmp_path, pki, case):
    damage, status, named = TAMPERING[case]
    package = tmp_path / "tampered.pkg"
    shutil.copy(shaped["product-notarized"], package)
    damage(package)
    verdict = verify_package(package, [pki.root.certificate])
    assert verdict.status is status and not verdict.ok
    assert any(named in problem for problem in verdict.problems), verdict.problems


def test_tampering_reported_by_the_command_line(shaped, tmp_path, pki):
    package = tmp_path / "tampered.pkg"
    shutil.copy(shaped["product-notarized"], package)
    flip(package, _heap_file_offset(package, "Tool.pkg/Payload") + 5)
    anchors = write_pem(tmp_path / "anchors.pem", pki.root.certificate)
    command = ("pkgutil", "--check-signature", str(package))
    result = signbridge(*command, "--check-files", env={"SIGNBRIDGE_ANCHORS": str(anchors)})
    assert result.returncode == 1
    assert result.stdout.splitlines()[1] == "   Status: package is invalid (checksum did not verify)"
    assert "'Tool.pkg/Payload'" in result.stderr and "checksum" in result.stderr
    # as Apple's pkgutil, the plain check reads no file data: the TOC and its signatures are intact
    result = signbridge(*command, env={"SIGNBRIDGE_ANCHORS": str(anchors)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[1] == '   Status: signed by a certificate trusted by "Test Apple Root CA"'


def test_a_changed_byte_in_a_real_nested_component_is_named(tmp_path):
    package = tmp_path / "tidy.pkg"
    shutil.copy(corpus_item(TIDY), package)
    flip(package, _heap_file_offset(package, "HTML_Tidy.pkg/Payload") + 1000)
    result = signbridge("pkgutil", "--check-signature", str(package), "--check-files", env=apple_anchor_env())
    assert result.returncode == 1
    assert result.stdout.splitlines()[1] == "   Status: package is invalid (checksum did not verify)"
    assert "'HTML_Tidy.pkg/Payload'" in result.stderr


def test_a_real_ticket_changed_by_one_byte_fails(tmp_path):
    package = tmp_path / "notarized.pkg"
    shutil.copy(corpus_item(KARABINER.format("6.14.0")), package)
    flip(package, package.stat().st_size - 16 - 100)
    result = signbridge("pkgutil", "--check-signature", str(package), env=apple_anchor_env())
    assert result.returncode == 1
    assert result.stdout.splitlines()[1] == "   Status: package is invalid"
    assert "signature of the stapled notarization ticket does not verify" in result.stderr


def test_a_ticket_for_another_package_fails(tmp_path):
    donor = corpus_item(KARABINER.format("1.27.0"))
    ticket = XarArchive.open(donor).read_ticket()
    package = tmp_path / "borrowed.pkg"
    shutil.copy(corpus_item(KARABINER.format("1.17.0-unstapled")), package)
    staple(package, ticket)
    verdict = verify_package(package, [])
    assert verdict.status is PackageStatus.INVALID_PACKAGE
    assert "issued for another package" in verdict.problems[0]


def test_a_ticket_listing_the_package_among_other_hashes_is_accepted(shaped, tmp_path, pki):
    signed = sign_package(shaped["component"], tmp_path / "signed.pkg", identity_of(pki)).path
    others = [hashlib.sha256(bytes([n])).digest() for n in range(5)]
    staple(signed, notarization_ticket(*others[:2], toc_checksum(signed), *others[2:]))
    verdict = verify_package(signed, [pki.root.certificate])
    assert verdict.ok and verdict.stapled_ticket


# --- bad input ------------------------------------------------------------------------------------------


def _repeated(path: Path, count: int) -> Path:
    """A component package whose Payload <file> repeats <name> and an unknown element ``count`` times."""
    pkgbuild_package(path, COMPONENT, gzip=GZIP)
    rewrite_toc(
        path,
        lambda xml: xml.replace(b"<name>Payload</name>", b"<name>Payload</name>" * count + b"<x-note/>" * count, 1),
        fix_checksum=True,
    )
    return path


def test_thousands_of_repeated_elements_take_bounded_time(tmp_path, pki):
    package = _repeated(tmp_path / "repeated.pkg", 50_000)
    started = time.monotonic()
    archive = XarArchive.open(package)
    assert archive.file("Payload").data.size == len(COMPONENT["Payload"])
    signed = sign_package(package, tmp_path / "signed.pkg", identity_of(pki))
    verdict = verify_package(signed.path, [pki.root.certificate])
    assert verdict.ok, verdict.problems
    assert time.monotonic() - started < 30
    assert toc_shape(signed.path)[0] == toc_shape(package)[0]


def test_too_many_repeated_elements_are_refused(tmp_path, pki):
    package = _repeated(tmp_path / "repeated.pkg", 600_000)
    verdict = verify_package(package, [pki.root.certificate])
    assert verdict.status is PackageStatus.INVALID_PACKAGE
    # 1.2 million elements make a 17 MB table of contents: refused for its size before it is parsed
    assert "more than the 4194304 signbridge reads" in verdict.problems[0]


def _cut_trailer(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-8])


def _long_trailer(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-8:-4] = (10**9).to_bytes(4, "little")
    path.write_bytes(data)


def _trailer_without_start(path: Path) -> None:
    data = bytearray(path.read_bytes())
    start = len(data) - 16 - int.from_bytes(data[-8:-4], "little") - 16
    data[start : start + 4] = b"XXXX"
    path.write_bytes(data)


BAD_TRAILERS = {
    "trailer cut short": (_cut_trailer, "ends before its trailer"),
    "ticket length past the file": (_long_trailer, "length of 1000000000 bytes, more than"),
    "start record missing": (_trailer_without_start, "start record is missing"),
}


@pytest.mark.parametrize("case", BAD_TRAILERS)
def test_a_damaged_trailer_is_refused_and_left_alone(shaped, tmp_path, pki, token, case):
    damage, message = BAD_TRAILERS[case]
    directory = tmp_path / "work"
    directory.mkdir()
    package = directory / "damaged.pkg"
    shutil.copy(shaped["component-notarized"], package)
    damage(package)
    before = snapshot(directory)

    with pytest.raises(StapledTicketError, match=message) as raised:
        XarArchive.open(package)
    assert str(package) in str(raised.value)
    result = signbridge("productsign", "--timestamp=none", "--sign", TEAM, str(package), str(directory / "out.pkg"))
    assert result.returncode == 1 and result.stderr.startswith("productsign: error: ") and message in result.stderr
    assert snapshot(directory) == before  # input untouched, no output, no temporary file
    verdict = verify_package(package, [pki.root.certificate])
    assert verdict.status is PackageStatus.INVALID_PACKAGE and message in verdict.problems[0]
