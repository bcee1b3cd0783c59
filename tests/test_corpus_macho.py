"""Real Mach-O signed by Apple's tools (the corpus's ``macho/`` items, two apps and two kexts).

``signbridge codesign --verify --strict --deep`` gives Apple's verdict for each (MANIFEST.md), with
Apple's exit code and wording; ``-dvvv`` shows what the manifest lists. Then each item is signed
again through a token with a test Developer ID identity and a timestamp, and checked by our
verifier and independently: openssl verifies the CMS over the CodeDirectory bytes, hashlib
recomputes every page hash from the file (the SuperBlob walked with struct), llvm-objdump and LIEF
read the load commands. The set includes i386 slices, SHA-1 + SHA-256 CodeDirectories and a
linker-signed file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import lief
import pytest

from codesignkit import (
    cd_fields,
    cdhash,
    codesign,
    local_tsa,
    objdump_code_signatures,
    openssl_cms_verify,
    raw_signatures,
    slices,
    token_and_anchors,
)
from corpuskit import apple_anchor_env, copy_item, corpus_item
from tokenkit import apple_pki

DEVELOPER_ID_CHAIN = ("Developer ID Certification Authority", "Apple Root CA")
WWDR_CHAIN = ("Apple Worldwide Developer Relations Certification Authority", "Apple Root CA")


@dataclass(frozen=True)
class Expected:
    """What MANIFEST.md says of the item, and what Apple's codesign then prints."""

    identifier: str
    team: str
    authorities: tuple[str, ...]  # empty: ad hoc
    timestamp: bool
    runtime: bool = False
    flags: str = "0x0(none)"
    architectures: tuple[str, ...] = ()
    trusted: bool = True
    executable: str | None = None  # for bundles, the main executable under Contents/MacOS


ITEMS = {
    "macho/htacg_tidy-mac-installer__tidy": Expected(
        "org.htacg.html-tidy.tidy5", "9PN2JXXG7Y",
        ("Developer ID Application: James Derry (9PN2JXXG7Y)", *DEVELOPER_ID_CHAIN), True,
        runtime=True, flags="0x10000(runtime)", architectures=("x86_64", "arm64"),
    ),
    "macho/htacg_tidy-mac-installer__libtidy.5.6.0.dylib": Expected(
        "libtidy.5", "9PN2JXXG7Y",
        ("Developer ID Application: James Derry (9PN2JXXG7Y)", *DEVELOPER_ID_CHAIN), True,
        runtime=True, flags="0x10000(runtime)", architectures=("x86_64", "arm64"),
    ),
    "macho/northpolesec_santa__yikes-universal_signed": Expected(
        "yikes-universal-signed", "998Z9C32TC",
        ("Mac Developer: Tom Burgin (QDXTTPU8MW)", *WWDR_CHAIN), False, architectures=("i386", "x86_64"),
    ),
    "macho/northpolesec_santa__yikes-universal_adhoc": Expected(
        "yikes-universal-adhoc-555549448764391694dd34cbafdf5b92099e899a", "not set", (), False,
        flags="0x2(adhoc)", architectures=("i386", "x86_64"),
    ),
    "macho/northpolesec_santa__signed-with-teamid": Expected(
        "goodcert", "EQHXZ8M8AV", ("Apple Development: Google Development (69FHSU289T)", *WWDR_CHAIN), False,
    ),
    "macho/northpolesec_santa__cert_hash_allowed_signingid_blocked": Expected(
        "com.google.blocked_signing_id", "EQHXZ8M8AV",
        ("Apple Development: Google Development (69FHSU289T)", *WWDR_CHAIN), False,
        architectures=("x86_64", "arm64"),
    ),
    "macho/northpolesec_santa__badcert": Expected("badcert", "not set", ("Kent Ma",), False, trusted=False),
    "macho/northpolesec_santa__allowed_cdhash": Expected(
        "allowed_cdhash", "not set", (), False, flags="0x20002(adhoc,linker-signed)"
    ),
    "bundles/achow101_signapple__signapple-test-universal.app": Expected(
        "com.achow101.signapple-test", "3U8RB33R2B",
        ("Apple Development: andrew+apple@achow101.com (N393WR46N6)", *WWDR_CHAIN), False,
        runtime=True, flags="0x10000(runtime)", architectures=("x86_64", "arm64"), executable="signapple-test",
    ),
    "bundles/sparkle-project_Sparkle__DevSignedApp.app": Expected(
        "com.zoo.SignedApp", "ZCK58M894E",
        ("Developer ID Application: Mayur Pawashe (ZCK58M894E)", *DEVELOPER_ID_CHAIN), True,
        executable="SignedApp",
    ),
    "bundles/pqrs-org_Karabiner-VirtualHIDDevice-archived__org.pqrs.driver.Karabiner.VirtualHIDDevice.v061000.kext":
        Expected(
            "org.pqrs.driver.Karabiner.VirtualHIDDevice.v061000", "G43BCU2T37",
            ("Developer ID Application: Fumihiko Takayama (G43BCU2T37)", *DEVELOPER_ID_CHAIN), True,
            executable="VirtualHIDDevice",
        ),
    "bundles/pqrs-org_Karabiner-VirtualHIDDevice-archived__org.pqrs.driver.VirtualHIDManager.kext": Expected(
        "org.pqrs.driver.VirtualHIDManager", "G43BCU2T37",
        ("Developer ID Application: Fumihiko Takayama (G43BCU2T37)", *DEVELOPER_ID_CHAIN), True,
        executable="VirtualHIDManager",
    ),
}  # fmt: skip

HASH_NAMES = {1: ("sha1", 20), 2: ("sha256", 32)}


def executable_of(path: Path, expected: Expected) -> Path:
    return path / "Contents" / "MacOS" / expected.executable if expected.executable else path


@pytest.fixture(scope="module")
def pki():
    return apple_pki()


@pytest.mark.parametrize("item", sorted(ITEMS))
def test_verify_gives_apples_verdict(item):
    path = corpus_item(item)
    expected = ITEMS[item]
    verified = codesign("--verify", "--strict", "--deep", "-v", path, env=apple_anchor_env())
    if expected.trusted:
        assert verified.returncode == 0, verified.stderr
        assert verified.stderr == f"{path}: valid on disk\n{path}: satisfies its Designated Requirement\n"
    else:
        assert verified.returncode == 1
        assert verified.stderr.splitlines()[0] == f"{path}: CSSMERR_TP_NOT_TRUSTED"
    quiet = codesign("--verify", "--strict", "--deep", path, env=apple_anchor_env())
    assert quiet.returncode == verified.returncode
    assert (quiet.stderr == "") is expected.trusted


@pytest.mark.parametrize("item", sorted(ITEMS))
def test_display_shows_what_the_manifest_lists(item):
    path = corpus_item(item)
    expected = ITEMS[item]
    shown = codesign("-dvvv", path, env=apple_anchor_env())
    assert shown.returncode == 0, shown.stderr
    lines = shown.stderr.splitlines()
    fields = dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("Authority="))
    assert fields["Identifier"] == expected.identifier
    assert fields["TeamIdentifier"] == expected.team
    if expected.architectures:
        assert fields["Format"].endswith(f"Mach-O universal ({' '.join(expected.architectures)})")
    assert f"flags={expected.flags} " in fields["CodeDirectory v"]
    assert ("Runtime Version" in fields) is expected.runtime
    assert [line[len("Authority=") :] for line in lines if line.startswith("Authority=")] == list(
        expected.authorities
    )
    if not expected.authorities:
        assert fields["Signature"] == "adhoc"
    assert ("Timestamp" in fields) is expected.timestamp
    if expected.authorities and not expected.timestamp:
        assert "Signed Time" in fields

    # the CodeDirectory Apple's codesign shows (SHA-256 when there is one) of the preferred slice,
    # read with struct: its page count and cdhash
    # (the last slice of each of these files: arm64 before x86_64 before i386)
    preferred = raw_signatures(executable_of(path, expected).read_bytes())[-1]
    directory = max(preferred.code_directories, key=lambda blob: cd_fields(blob)["hash_type"])
    cd = cd_fields(directory)
    assert f" hashes={len(cd['hashes'])}+{len(cd['special'])} " in fields["CodeDirectory v"]
    assert fields["CDHash"] == cdhash(directory, HASH_NAMES[cd["hash_type"]][0]).hex()


# --- signed again through the token ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tsa():
    with local_tsa() as running:
        yield running


@pytest.fixture
def token(tmp_path, monkeypatch, pki, tsa):
    with token_and_anchors(tmp_path, monkeypatch, pki, tsa.root) as running:
        yield running


def independent_checks(directory: Path, executable: Path, pki) -> None:
    data = executable.read_bytes()
    objdump = objdump_code_signatures(executable)
    parsed = lief.MachO.parse(str(executable))
    assert parsed is not None and len(parsed) == len(slices(data))
    for number, (raw, (offset, size)) in enumerate(zip(raw_signatures(data), slices(data), strict=True)):
        image = data[offset : offset + size]
        signature_size = int.from_bytes(image[raw.dataoff + 4 : raw.dataoff + 8], "big")
        assert objdump[number][0] == raw.dataoff and objdump[number][1] >= signature_size
        binary = parsed.at(number)
        assert binary.has_code_signature and binary.code_signature.data_offset == raw.dataoff
        for blob in raw.code_directories:
            cd = cd_fields(blob)
            name, length = HASH_NAMES[cd["hash_type"]]
            assert not cd["flags"] & 0x20002  # neither ad hoc nor linker-signed any more
            assert cd["code_limit"] == raw.dataoff
            pages = [
                hashlib.new(name, image[start : min(start + cd["page_size"], raw.dataoff)]).digest()[:length]
                for start in range(0, raw.dataoff, cd["page_size"])
            ]
            assert cd["hashes"] == pages
        checked = openssl_cms_verify(directory, raw.cms, raw.code_directories[0], pki.root.certificate)
        assert checked.returncode == 0, checked.stderr


@pytest.mark.parametrize("item", sorted(ITEMS))
def test_signed_again_through_the_token(item, tmp_path, token, tsa, pki):
    expected = ITEMS[item]
    work = tmp_path / "work"
    work.mkdir()
    path = copy_item(item, work)
    deep = ("--deep",) if path.is_dir() else ()
    signed = codesign("-f", "-s", "Developer ID Application", f"--timestamp={tsa.url}", *deep, path)
    assert signed.returncode == 0, signed.stderr
    # a linker signature is replaced silently, as Apple's codesign does (no --force needed)
    replacing = "linker-signed" not in expected.flags
    assert (f"{path}: replacing existing signature" in signed.stderr.splitlines()) is replacing

    verified = codesign("--verify", "--strict", "--deep", "-v", path)
    assert verified.returncode == 0, verified.stderr
    assert verified.stderr == f"{path}: valid on disk\n{path}: satisfies its Designated Requirement\n"
    shown = codesign("-dvvv", path).stderr.splitlines()
    assert "Authority=Developer ID Application: Test Corp (TEAM123456)" in shown
    assert "TeamIdentifier=TEAM123456" in shown
    assert any(line.startswith("Timestamp=") for line in shown)
    if expected.executable:
        assert f"Identifier={expected.identifier}" in shown
    independent_checks(tmp_path, executable_of(path, expected), pki)
