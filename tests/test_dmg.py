"""``signbridge codesign`` on UDIF disk images written by pydmg, read back by 7-Zip.

Signing keeps every byte of the image before the signature and the trailer's own fields; the
signature is checked with hashlib and struct (tests/dmgkit.py), openssl (the CMS over the
CodeDirectory) and signbridge's verifier; 7-Zip still lists and tests the signed image.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import pytest

from codesignkit import cd_fields, codesign, isolate_codesign, local_tsa, openssl_cms_verify, pem
from dmgkit import (
    SIGNATURE_FIELDS,
    code_limit,
    independent_check,
    make_image,
    raw_image,
    sevenzip_listing,
    sevenzip_test,
)
from tokenkit import apple_pki, serve_token

PAYLOAD = [("SAMPLE/Readme.txt", 52), ("SAMPLE/data/payload.bin", 131072)]


@pytest.fixture(scope="module")
def pki():
    return apple_pki()


@pytest.fixture
def env(tmp_path, monkeypatch, pki) -> None:
    isolate_codesign(tmp_path, monkeypatch, pki.root.certificate)


@pytest.fixture
def token(env, pki):
    with serve_token("alpha", pki.identities, pki.authorities) as served:
        yield served


def listing(path: Path) -> list[tuple[str, int]]:
    return [(name.split("/", 1)[-1], size) for name, size in sevenzip_listing(path)]


def assert_image_kept(original: bytes, signed: bytes) -> None:
    """The image's data and its trailer's fields (all but the signature's) are unchanged."""
    limit = code_limit(original)
    assert signed[:limit] == original[:limit]
    old, new = original[-512:], signed[-512:]
    assert old[: SIGNATURE_FIELDS.start] == new[: SIGNATURE_FIELDS.start]
    assert old[SIGNATURE_FIELDS.stop :] == new[SIGNATURE_FIELDS.stop :]


def test_adhoc_signature(tmp_path, env):
    image = make_image(tmp_path)
    original = image.read_bytes()
    names = listing(image)
    assert [name for name, _ in names] == ["Readme.txt", "data/payload.bin"]

    signed = codesign("-s", "-", "-v", image)
    # codesign's ad-hoc suffix: the SHA-1 of the trailer pointing at where the signature goes
    trailer = bytearray(original[-512:])
    struct.pack_into(">QQ", trailer, 296, len(original) - 512, 0)
    trailer_hash = hashlib.sha1(trailer).hexdigest()
    assert (signed.returncode, signed.stderr) == (0, f"{image}: signed disk image [Sample-{trailer_hash}]\n")
    data = image.read_bytes()
    assert_image_kept(original, data)
    raw = independent_check(image)
    fields = cd_fields(raw.code_directory)
    assert (fields["version"], fields["flags"], fields["identifier"]) == (0x20100, 2, f"Sample-{trailer_hash}")
    assert raw.cms == b"" and sorted(raw.blobs) == [0, 2, 0x10000]
    assert listing(image) == names
    assert "Everything is Ok" in sevenzip_test(image)

    verified = codesign("--verify", "--strict", "-v", image)
    assert (verified.returncode, verified.stderr) == (
        0, f"{image}: valid on disk\n{image}: satisfies its Designated Requirement\n"
    )  # fmt: skip
    shown = codesign("-dvvv", image)
    digest = hashlib.sha256(raw.code_directory).hexdigest()
    assert shown.returncode == 0
    assert shown.stderr.splitlines() == [
        f"Executable={image}",
        f"Identifier=Sample-{trailer_hash}",
        "Format=disk image",
        f"CodeDirectory v=20100 size={len(raw.code_directory)} flags=0x2(adhoc) hashes=1+6 location=embedded",
        "Hash type=sha256 size=32",
        f"CandidateCDHash sha256={digest[:40]}",
        f"CandidateCDHashFull sha256={digest}",
        "Hash choices=sha256",
        f"CMSDigest={digest}",
        "CMSDigestType=2",
        f"CDHash={digest[:40]}",
        "Signature=adhoc",
        "Info.plist=not bound",
        "TeamIdentifier=not set",
        "Sealed Resources=none",
        "Internal requirements count=0 size=12",
    ]


def test_signature_through_the_token_with_a_timestamp(tmp_path, token, pki, monkeypatch):
    image = make_image(tmp_path, "Release 2.1.dmg")
    original = image.read_bytes()
    with local_tsa() as tsa:
        anchors = tmp_path / "anchors-and-tsa.pem"
        anchors.write_bytes(pem(pki.root.certificate) + pem(tsa.root))
        monkeypatch.setenv("SIGNBRIDGE_ANCHORS", str(anchors))
        signed = codesign("-s", "Developer ID Application", f"--timestamp={tsa.url}", image)
        assert (signed.returncode, signed.stderr) == (0, "")
        assert len(tsa.requests) == 1
    # one digest went to the token
    assert [len(request.digest) for _, request in token.signer.requests] == [32]
    data = image.read_bytes()
    assert_image_kept(original, data)
    raw = independent_check(image)
    fields = cd_fields(raw.code_directory)
    assert (fields["version"], fields["flags"], fields["team"]) == (0x20200, 0, "TEAM123456")
    assert fields["identifier"] == "Release 2"
    checked = openssl_cms_verify(tmp_path, raw.cms, raw.code_directory, pki.root.certificate)
    assert checked.returncode == 0, checked.stderr
    assert listing(image)[0][0] == "Readme.txt"

    verified = codesign("-vv", "--strict", image)
    assert verified.returncode == 0, verified.stderr
    shown = codesign("-dvv", image).stderr.splitlines()
    assert "Format=disk image" in shown and "Identifier=Release 2" in shown
    assert "Authority=Developer ID Application: Test Corp (TEAM123456)" in shown
    assert any(line.startswith("Timestamp=") for line in shown)
    requirement = codesign("-d", "-r-", image).stdout
    assert requirement.startswith('designated => identifier "Release 2" and anchor apple generic') or (
        requirement.startswith('designated => identifier "Release 2" and certificate')
    )

    again = codesign("-s", "Developer ID Application", image)
    assert (again.returncode, again.stderr) == (1, f"{image}: is already signed\n")
    assert image.read_bytes() == data
    forced = codesign("-f", "-s", "-", image)
    assert (forced.returncode, forced.stderr) == (0, f"{image}: replacing existing signature\n")
    assert_image_kept(original, image.read_bytes())
    assert raw_image(image).signature_offset == len(original) - 512


def _flip(data: bytearray, offset: int) -> None:
    data[offset] ^= 0x01


TAMPERING = {
    "data": (lambda raw: 4096, "the image data (bytes 0-"),
    "trailer": (lambda raw: len(raw.data) - 512 + 88, "the UDIF trailer does not match its hash"),
    "code directory": (lambda raw: raw.signature_offset + 200, "the CMS signature does not check out"),
    "requirements": (
        lambda raw: raw.data.index(raw.blobs[2], raw.signature_offset) + 20,
        "the requirements blob does not match its hash",
    ),
    "cms signature value": (
        lambda raw: raw.data.index(raw.cms, raw.signature_offset) + len(raw.cms) - 10,
        "the CMS signature does not check out",
    ),
}


@pytest.mark.parametrize("where", sorted(TAMPERING))
def test_tampering_is_found(tmp_path, token, pki, where):
    image = make_image(tmp_path)
    assert codesign("-s", "Developer ID Application", "--timestamp=none", image).returncode == 0
    raw = raw_image(image)
    locate, phrase = TAMPERING[where]
    data = bytearray(raw.data)
    _flip(data, locate(raw))
    image.write_bytes(bytes(data))
    verified = codesign("--verify", "--strict", image)
    assert verified.returncode == 1
    lines = verified.stderr.splitlines()
    assert lines[0] == f"{image}: invalid signature (code or signature have been modified)"
    assert phrase in verified.stderr, verified.stderr


def _set_signature_fields(path: Path, offset: int, length: int) -> None:
    data = bytearray(path.read_bytes())
    struct.pack_into(">QQ", data, len(data) - 512 + 296, offset, length)
    path.write_bytes(bytes(data))


BAD_INPUT = {
    "truncated trailer": "the UDIF trailer is cut short: 100 of its 512 bytes are missing",
    "signature past the end": "runs past the trailer",
    "signature overlapping the data": "overlaps the image data",
    "too short": "too short to end with a 512-byte UDIF trailer",
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_images_are_refused_untouched(tmp_path, env, case):
    image = make_image(tmp_path)
    size = image.stat().st_size
    if case == "truncated trailer":
        os.truncate(image, size - 100)
    elif case == "signature past the end":
        _set_signature_fields(image, size - 512 - 100, 4096)
    elif case == "signature overlapping the data":
        _set_signature_fields(image, 1000, size - 512 - 1000)
    else:
        image.write_bytes(b"koly")
    before = image.read_bytes()
    signed = codesign("-f", "-s", "-", image)
    assert signed.returncode == 1
    assert signed.stderr.startswith(f"{image}: ") and BAD_INPUT[case] in signed.stderr, signed.stderr
    assert image.read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        ["Sample.dmg", "anchors.pem", "no-config.json", "run"]
    )
    verified = codesign("--verify", image)
    assert verified.returncode == 1 and BAD_INPUT[case] in verified.stderr


def test_an_unreadable_signature_is_replaced_only_with_force(tmp_path, env):
    image = make_image(tmp_path)
    assert codesign("-s", "-", image).returncode == 0
    raw = raw_image(image)
    data = bytearray(raw.data)
    data[raw.signature_offset : raw.signature_offset + 4] = b"\0\0\0\0"  # the SuperBlob's magic
    image.write_bytes(bytes(data))
    refused = codesign("-s", "-", image)
    assert (refused.returncode, refused.stderr) == (1, f"{image}: is already signed\n")
    verified = codesign("-v", image)
    assert verified.returncode == 1 and "the code signature cannot be read" in verified.stderr
    forced = codesign("-f", "-s", "-", image)
    assert (forced.returncode, forced.stderr) == (0, f"{image}: replacing invalid existing signature\n")
    independent_check(image)
    assert codesign("-v", image).returncode == 0
