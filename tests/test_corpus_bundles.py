"""Real bundles made by Apple's tools (../shared/corpus/bundles): shallow iOS apps, an .ipa, a
Developer ID app with a nested DriverKit .dext, and Sparkle's executable-less bundles with
detached signatures.

Each item gets Apple's verdict, exit code and key phrase from ``codesign --verify --strict --deep``
with Apple Root CA as the anchor, and ``-dvvv`` reads it. The seals signbridge computes equal the
stored ``files``/``files2``; for items signed by current tools the rules equal too. Then each item
is re-signed with a Developer ID identity from a token served over p11-kit RPC, with a timestamp
from the demo service, and checked by our verifier and independently: openssl over the
CodeDirectory bytes, llvm-objdump on the Mach-O, hashlib over every sealed file.
"""

from __future__ import annotations

import hashlib
import os
import plistlib
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from codesignkit import (
    cd_fields,
    codesign,
    objdump_code_signatures,
    openssl_accepts,
    openssl_cms_verify,
    pem,
    raw_signatures,
)
from conftest import require_tool
from corpuskit import apple_anchor_env, copy_item, corpus_item
from servicekit import demo_service
from signbridge.apple.bundle.layout import Bundle
from signbridge.apple.bundle.resources.checking import verify_code_resources
from signbridge.apple.bundle.resources.writing import build_code_resources
from signbridge.apple.codesig import verification as vf
from signbridge.apple.codesig.codedirectory import HashType
from tokenkit import apple_pki, serve_token, use_runtime_dir

SIMULATOR = "bundles/fastlane_fastlane__simulator-app.app"
IPA = "bundles/fastlane_fastlane__very-capable-app.ipa"
SPARKLE_VALID = "bundles/sparkle-project_Sparkle__CodeSignedBothNew.bundle"
SPARKLE_INVALID = "bundles/sparkle-project_Sparkle__CodeSignedInvalid.bundle"
MANAGER = "bundles/pqrs-org_Karabiner-DriverKit-VirtualHIDDevice__2.4.0_Karabiner-VirtualHIDDevice-Manager.app"
DEXT = MANAGER + "/Contents/Library/SystemExtensions/org.pqrs.Karabiner-DriverKit-VirtualHIDDevice.dext"

# item: (exit code, the phrase after "<path>: ", identifier, format)
VERDICTS = {
    SIMULATOR: (0, "valid on disk", "org.fastlane.very-capable-app", "app bundle with Mach-O thin (x86_64)"),
    IPA: (1, vf.NOT_TRUSTED, "org.fastlane.very-capable-app", "app bundle with Mach-O thin (arm64)"),
    SPARKLE_VALID: (
        0, "valid on disk", "org.sparkle-project.Sparkle.SUUpdateValidatorTestBundle.CodeSignedNew", "bundle",
    ),
    SPARKLE_INVALID: (
        1, vf.INFO_PLIST_FAILED, "org.sparkle-project.Sparkle.SUUpdateValidatorTestBundle.CodeSigned",
        "bundle",  # the identifier signed before the Info.plist was edited
    ),
    MANAGER: (
        0, "valid on disk", "org.pqrs.Karabiner-VirtualHIDDevice-Manager",
        "app bundle with Mach-O universal (x86_64 arm64)",
    ),
    DEXT: (0, "valid on disk", "org.pqrs.Karabiner-DriverKit-VirtualHIDDevice", "bundle with Mach-O universal (x86_64 arm64)"),
}  # fmt: skip


@pytest.mark.parametrize("item", list(VERDICTS))
def test_apples_verdict(item):
    code, phrase, _, _ = VERDICTS[item]
    path = corpus_item(item)
    result = codesign("--verify", "--strict", "--deep", "-v", path, env=apple_anchor_env())
    assert result.returncode == code, result.stderr
    assert result.stderr.splitlines()[0] == f"{path}: {phrase}"


@pytest.mark.parametrize("item", list(VERDICTS))
def test_display(item):
    _, _, identifier, shown_format = VERDICTS[item]
    path = corpus_item(item)
    result = codesign("-dvvv", path)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert f"Identifier={identifier}" in lines
    assert f"Format={shown_format}" in lines
    assert any(line.startswith("Sealed Resources version=2 ") for line in lines)


def _unpacked_ipa(directory: Path) -> Path:
    with zipfile.ZipFile(corpus_item(IPA)) as archive:
        archive.extractall(directory)
    return directory / "Payload" / "very-capable-app.app"


# (item or "ipa", whether the stored rules are the ones current codesign writes)
SEALS = {SIMULATOR: False, "ipa": False, SPARKLE_VALID: True, MANAGER: True, DEXT: True}


@pytest.mark.parametrize("item", list(SEALS))
def test_our_seal_is_apples(item, tmp_path):
    path = _unpacked_ipa(tmp_path) if item == "ipa" else corpus_item(item)
    bundle = Bundle.open(path)
    stored = plistlib.loads(bundle.code_resources_path.read_bytes())
    with_sha1 = any(isinstance(entry, dict) and "hash" in entry for entry in stored["files2"].values())
    hash_types = (HashType.SHA1, HashType.SHA256) if with_sha1 else (HashType.SHA256,)
    ours = plistlib.loads(build_code_resources(bundle, {}, hash_types=hash_types))
    assert ours["files2"] == stored["files2"]
    assert ours["files"] == stored["files"]
    if SEALS[item]:
        assert (ours["rules"], ours["rules2"]) == (stored["rules"], stored["rules2"])


def test_sparkle_invalid_also_has_an_unsealed_resource():
    bundle = Bundle.open(corpus_item(SPARKLE_INVALID))
    problems = verify_code_resources(bundle, bundle.code_resources_path.read_bytes(), lambda path: b"")
    assert [str(problem) for problem in problems] == ["file added: Contents/Resources/test-pubkey.pem"]


# --- re-signing real bundles through a token -----------------------------------------------------------


@pytest.fixture(scope="module")
def pki():
    return apple_pki()


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with demo_service(tmp_path_factory.mktemp("service")) as running:
        yield running


@pytest.fixture
def token(tmp_path, monkeypatch, pki, service):
    """A token with the test PKI's identities; anchors: the test root and the demo TSA's root."""
    use_runtime_dir(tmp_path, monkeypatch)
    anchors = tmp_path / "anchors.pem"
    anchors.write_bytes(pem(pki.root.certificate) + service.root_pem.read_bytes())
    monkeypatch.setenv("SIGNBRIDGE_ANCHORS", str(anchors))
    monkeypatch.setenv("SIGNPATH_CONFIG_FILE", str(tmp_path / "no-config.json"))
    (tmp_path / "no-config.json").write_text("{}")
    with serve_token("alpha", pki.identities, pki.authorities) as served:
        yield served


def _sealed_files_match(content: Path) -> None:
    seal = plistlib.loads((content / "_CodeSignature" / "CodeResources").read_bytes())
    for relative, entry in seal["files2"].items():
        assert entry["hash2"] == hashlib.sha256((content / relative).read_bytes()).digest(), relative


def _check_macho(executable: Path, content: Path, directory: Path, pki) -> None:
    raws = raw_signatures(executable.read_bytes())
    assert len(objdump_code_signatures(executable)) == len(raws)
    seal = (content / "_CodeSignature" / "CodeResources").read_bytes()
    for raw in raws:
        assert openssl_accepts(directory, raw, pki.root.certificate)
        cd = cd_fields(raw.code_directories[-1])
        assert cd["team"] == "TEAM123456"
        assert cd["special"][3] == hashlib.sha256(seal).digest()


RESIGN = [SIMULATOR, IPA, SPARKLE_VALID, SPARKLE_INVALID, MANAGER]


@pytest.mark.parametrize("item", RESIGN)
def test_resign_with_a_token(item, tmp_path, token, pki, service):
    path = copy_item(item, tmp_path)
    for directory, _, files in os.walk(path):
        os.chmod(directory, 0o755)
        for name in files:
            os.chmod(Path(directory, name), 0o755)
    signed = codesign(
        "-f", "-s", "Developer ID Application", "--deep", f"--timestamp={service.api_url}/timestamp", path
    )
    assert signed.returncode == 0, signed.stderr
    assert all(len(request.digest) == 32 for _, request in token.signer.requests)
    verified = codesign("--verify", "--strict", "--deep", "-v", path)
    assert verified.returncode == 0, verified.stderr
    assert verified.stderr.splitlines()[-1] == f"{path}: satisfies its Designated Requirement"

    if item == IPA:
        unpacked = tmp_path / "unpacked"
        unpacked.mkdir()
        subprocess.run([require_tool("bsdtar"), "-xf", str(path), "-C", str(unpacked)], check=True)
        path = unpacked / "Payload" / "very-capable-app.app"
    bundle = Bundle.open(path)
    _sealed_files_match(bundle.content_root)
    if bundle.executable_path is None:
        folder = bundle.signature_dir
        cms = (folder / "CodeSignature").read_bytes()
        checked = openssl_cms_verify(tmp_path, cms, (folder / "CodeDirectory").read_bytes(), pki.root.certificate)
        assert checked.returncode == 0, checked.stderr
        info = bundle.info_plist_path.read_bytes()
        assert cd_fields((folder / "CodeDirectory").read_bytes())["hashes"] == [hashlib.sha256(info).digest()]
        assert not (folder / "CodeRequirements-1").exists()  # SHA-256 alone now: the SHA-1 one is gone
        seal = plistlib.loads(bundle.code_resources_path.read_bytes())
        assert set(seal["files2"]) == {"Resources/test-pubkey.pem"}
    else:
        _check_macho(bundle.executable_path, bundle.content_root, tmp_path, pki)
    if item == MANAGER:
        dext = path / DEXT.removeprefix(MANAGER + "/")
        _sealed_files_match(dext)
        _check_macho(dext / "org.pqrs.Karabiner-DriverKit-VirtualHIDDevice", dext, tmp_path, pki)
    shutil.rmtree(tmp_path / "unpacked", ignore_errors=True)
