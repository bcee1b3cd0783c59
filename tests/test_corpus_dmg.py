"""Disk images made by Apple's tools (the corpus): our verdicts and ``-dvvv`` against Apple's, then
every image re-signed through a token with a timestamp and checked by openssl, hashlib and 7-Zip."""

from __future__ import annotations

import hashlib
import os
import struct

import pytest

from codesignkit import cd_fields, codesign, isolate_codesign, local_tsa, openssl_cms_verify, pem
from corpuskit import apple_anchor_env, copy_item, corpus_item, corpus_items
from dmgkit import SIGNATURE_FIELDS, code_limit, independent_check, raw_image, sevenzip_listing, sevenzip_test
from tokenkit import apple_pki, serve_token

KARABINER_MANAGER = "dmg/pqrs-org_Karabiner-DriverKit-VirtualHIDDevice__Karabiner-VirtualHIDDevice-Manager-0.20.0.dmg"
KARABINER_TICKET_ONLY = "dmg/pqrs-org_Karabiner-DriverKit-VirtualHIDDevice__VirtualHIDDevice-0.90.6.dmg"
SPARKLE_ADHOC = "dmg/sparkle-project_Sparkle__SparkleTestCodeSign_apfs_lzma_aux_files.dmg"
UNSIGNED = "dmg/indygreg_apple-platform-rs__example.dmg"

UNSIGNED_STATUS = "code object is not signed at all"
# item -> (exit code, the phrase Apple's codesign --verify --strict -v prints)
EXPECTED = {
    KARABINER_MANAGER: (0, "valid on disk"),
    KARABINER_TICKET_ONLY: (1, UNSIGNED_STATUS),
    SPARKLE_ADHOC: (0, "valid on disk"),
    UNSIGNED: (1, UNSIGNED_STATUS),
}
# signed items -> (Identifier, CodeDirectory flags, stapled)
DISPLAYED = {
    KARABINER_MANAGER: ("Karabiner-VirtualHIDDevice-Manager 0", "0x0(none)", True),
    SPARKLE_ADHOC: (
        "SparkleTestCodeSign_apfs_lzma_aux_files-377068f48152a21a1d1792eb39741dcc34df3c2a", "0x2(adhoc)", False
    ),
}


def test_the_corpus_holds_the_expected_images():
    assert sorted(corpus_items("dmg", ".dmg")) == sorted(EXPECTED)


@pytest.mark.parametrize("item", sorted(EXPECTED))
def test_verdict_matches_apple(item):
    path = corpus_item(item)
    verified = codesign("--verify", "--strict", "-v", path, env=apple_anchor_env())
    code, phrase = EXPECTED[item]
    assert verified.returncode == code, verified.stderr
    assert verified.stderr.splitlines()[0] == f"{path}: {phrase}"
    if code == 0:
        assert verified.stderr.splitlines()[1] == f"{path}: satisfies its Designated Requirement"
    shown = codesign("-dvvv", path, env=apple_anchor_env())
    if code:
        assert (shown.returncode, shown.stderr) == (1, f"{path}: {UNSIGNED_STATUS}\n")


@pytest.mark.parametrize("item", sorted(DISPLAYED))
def test_display_matches_apple(item):
    path = corpus_item(item)
    raw = raw_image(path)
    digest = hashlib.sha256(raw.code_directory).hexdigest()
    identifier, flags, stapled = DISPLAYED[item]
    shown = codesign("-dvvv", path, env=apple_anchor_env())
    assert shown.returncode == 0
    lines = shown.stderr.splitlines()
    assert lines[:4] == [
        f"Executable={path}",
        f"Identifier={identifier}",
        "Format=disk image",
        f"CodeDirectory v={cd_fields(raw.code_directory)['version']:x} size={len(raw.code_directory)} "
        f"flags={flags} hashes=1+6 location=embedded",
    ]
    assert f"CDHash={digest[:40]}" in lines
    assert ("Notarization Ticket=stapled" in lines) == stapled
    if stapled:
        assert "Authority=Apple Root CA" in lines
        assert any(line.startswith("Timestamp=") for line in lines)


@pytest.fixture(scope="module")
def pki():
    return apple_pki()


@pytest.fixture
def token(tmp_path, monkeypatch, pki):
    isolate_codesign(tmp_path, monkeypatch, pki.root.certificate)
    with serve_token("alpha", pki.identities, pki.authorities) as served:
        yield served


@pytest.mark.parametrize("item", sorted(EXPECTED))
def test_resign_through_the_token(tmp_path, token, pki, monkeypatch, item):
    image = copy_item(item, tmp_path)
    os.chmod(image, 0o644)
    original = image.read_bytes()
    listed = sevenzip_listing(image)
    with local_tsa() as tsa:
        anchors = tmp_path / "anchors.pem"
        anchors.write_bytes(pem(pki.root.certificate) + pem(tsa.root))
        monkeypatch.setenv("SIGNBRIDGE_ANCHORS", str(anchors))
        signed = codesign("-s", "Developer ID Application", f"--timestamp={tsa.url}", "-f", image)
    assert signed.returncode == 0, signed.stderr
    notes = signed.stderr.splitlines()
    had_signature = item in DISPLAYED
    had_ticket = item in (KARABINER_MANAGER, KARABINER_TICKET_ONLY)
    assert (f"{image}: replacing existing signature" in notes) == had_signature
    assert any("stapled notarization ticket was removed" in note for note in notes) == had_ticket
    assert len(notes) == had_signature + had_ticket

    data = image.read_bytes()
    limit = code_limit(original)
    assert data[:limit] == original[:limit]
    assert data[-512:][: SIGNATURE_FIELDS.start] == original[-512:][: SIGNATURE_FIELDS.start]
    assert data[-512:][SIGNATURE_FIELDS.stop :] == original[-512:][SIGNATURE_FIELDS.stop :]
    assert struct.unpack_from(">Q", data, len(data) - 512 + 296)[0] == limit
    raw = independent_check(image)
    assert 0x10002 not in raw.blobs
    checked = openssl_cms_verify(tmp_path, raw.cms, raw.code_directory, pki.root.certificate)
    assert checked.returncode == 0, checked.stderr
    assert sevenzip_listing(image) == listed
    assert "Everything is Ok" in sevenzip_test(image)

    verified = codesign("--verify", "--strict", "-vv", image)
    assert verified.returncode == 0, verified.stderr
    shown = codesign("-dvvv", image).stderr.splitlines()
    assert "Notarization Ticket=stapled" not in shown
    assert "Authority=Developer ID Application: Test Corp (TEAM123456)" in shown


def test_a_changed_ticket_is_found(tmp_path):
    image = copy_item(KARABINER_MANAGER, tmp_path)
    os.chmod(image, 0o644)
    raw = raw_image(image)
    ticket = raw.blobs[0x10002]
    data = bytearray(raw.data)
    data[raw.data.index(ticket, raw.signature_offset) + 8 + 1600] ^= 0x01  # in the ticket's content
    image.write_bytes(bytes(data))
    verified = codesign("--verify", "--strict", image, env=apple_anchor_env())
    assert verified.returncode == 1
    assert verified.stderr.splitlines() == [
        f"{image}: invalid signature (code or signature have been modified)",
        "slot 0x10002: the signature of the stapled notarization ticket does not verify; the ticket was altered "
        "or damaged",
    ]


def test_an_image_with_only_a_ticket_is_signed_without_force(tmp_path, token):
    image = copy_item(KARABINER_TICKET_ONLY, tmp_path)
    os.chmod(image, 0o644)
    signed = codesign("-s", "-", image)
    assert signed.returncode == 0
    assert signed.stderr == (
        f"{image}: warning: the stapled notarization ticket was removed: it does not match the new "
        "signature. Notarize and staple the disk image again.\n"
    )
    assert sorted(independent_check(image).blobs) == [0, 2, 0x10000]
    assert codesign("--verify", "--strict", image).returncode == 0


def test_adhoc_resigning_reproduces_apples_bytes(tmp_path, token):
    """Apple's ad-hoc signature depends only on the image, its name and its trailer: signing the
    Sparkle image again under its original name gives back the file codesign wrote."""
    original = corpus_item(SPARKLE_ADHOC)
    image = tmp_path / "SparkleTestCodeSign_apfs_lzma_aux_files.dmg"
    image.write_bytes(original.read_bytes())
    signed = codesign("-f", "-s", "-", image)
    assert (signed.returncode, signed.stderr) == (0, f"{image}: replacing existing signature\n")
    assert image.read_bytes() == original.read_bytes()
