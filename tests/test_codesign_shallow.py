"""Shallow bundles, bundles without a main executable (detached signatures) and .ipa archives,
built by the tests (tests/bundlefixtures.py) from clang/lld Mach-O files.

Independent checks: CodeDirectories are read with struct (codesignkit.cd_fields) and their page
and special-slot hashes recomputed with hashlib; CodeResources is read with plistlib and every
file hash recomputed; openssl verifies each CMS over the CodeDirectory bytes; llvm-objdump reads
LC_CODE_SIGNATURE; bsdtar lists the .ipa that signing writes.
"""

from __future__ import annotations

import hashlib
import os
import plistlib
import shutil
import stat
import subprocess
import zipfile
from pathlib import Path

import pytest

import machofixtures
from bundlefixtures import (
    DRIVER_ID,
    FILTER_ID,
    HELPER_ID,
    HOST_ID,
    IOS_ID,
    PROFILE,
    RESOURCE_ID,
    SHARE_ID,
    build_ios_app,
    build_resource_bundle,
    build_sysext_host,
)
from codesignkit import (
    cd_fields,
    codesign,
    local_identity,
    objdump_code_signatures,
    openssl_accepts,
    openssl_cms_verify,
    pem,
    raw_signatures,
    snapshot,
)
from conftest import require_tool
from corpuskit import corpus_item
from signbridge.apple import codesign as cs
from signbridge.apple.bundle.ipa import IpaError, UnsafeIpaError
from signbridge.apple.bundle.resources.rules import SHALLOW_RULES, SHALLOW_RULES2
from signbridge.apple.certificates import team_identifier
from signbridge.apple.codesig import verification as vf
from signbridge.apple.codesig.codedirectory import HashType
from signbridge.apple.codesig.options import CodesignError, CodesignOptions, parse_flags
from signbridge.apple.codesig.verdicts import VerifyOptions
from signbridge.apple.verify_code import verify_code
from tokenkit import apple_pki

DEXT_IN_CORPUS = (
    "bundles/pqrs-org_Karabiner-DriverKit-VirtualHIDDevice__2.4.0_Karabiner-VirtualHIDDevice-Manager.app"
    "/Contents/Library/SystemExtensions/org.pqrs.Karabiner-DriverKit-VirtualHIDDevice.dext"
)


@pytest.fixture(scope="session")
def fx(tmp_path_factory: pytest.TempPathFactory):
    return machofixtures.get_fixtures(tmp_path_factory)


@pytest.fixture(scope="module")
def pki():
    return apple_pki()


def trusted(pki) -> VerifyOptions:
    return VerifyOptions(anchors=(pki.root.certificate,), deep=True, strict=True)


def sha256(path: Path) -> bytes:
    return hashlib.sha256(path.read_bytes()).digest()


def assert_seal_matches_disk(root: Path, content: Path) -> dict:
    """Every files2 file entry of the seal recomputed with hashlib (nested code, recorded by cdhash,
    is checked by the callers); returns the seal."""
    seal = plistlib.loads((content / "_CodeSignature" / "CodeResources").read_bytes())
    for relative, entry in seal["files2"].items():
        path = content / relative
        if isinstance(entry, dict) and "cdhash" in entry:
            continue
        assert isinstance(entry, dict) and "hash2" in entry, relative
        assert entry["hash2"] == sha256(path), relative
        if "hash" in entry:
            assert entry["hash"] == hashlib.sha1(path.read_bytes()).digest(), relative  # noqa: S324
    return seal


def assert_executable_binds(executable: Path, info_plist: Path, seal: Path, identifier: str) -> None:
    for raw in raw_signatures(executable.read_bytes()):
        for blob in raw.code_directories:
            cd = cd_fields(blob)
            digest = hashlib.sha1 if cd["hash_type"] == 1 else hashlib.sha256
            size = 20 if cd["hash_type"] == 1 else 32
            assert cd["identifier"] == identifier
            assert cd["special"][1] == digest(info_plist.read_bytes()).digest()[:size]
            assert cd["special"][3] == digest(seal.read_bytes()).digest()[:size]


# --- shallow bundles nested in a deep app -------------------------------------------------------------


def test_system_extensions_signed_deep_with_an_identity(fx, pki, tmp_path):
    app = build_sysext_host(tmp_path, fx)
    identity = local_identity(pki)[0]
    signed = cs.sign_code(app, identity, CodesignOptions(deep=True, flags=parse_flags("runtime")))
    assert signed.identifier == HOST_ID
    assert {item.identifier for item in signed.nested} == {DRIVER_ID, FILTER_ID, HELPER_ID}

    extensions = app / "Contents" / "Library" / "SystemExtensions"
    for name, identifier in ((f"{DRIVER_ID}.dext", DRIVER_ID), (f"{FILTER_ID}.systemextension", FILTER_ID)):
        shallow = extensions / name
        seal = assert_seal_matches_disk(shallow, shallow)
        assert seal["rules"] == SHALLOW_RULES and seal["rules2"] == SHALLOW_RULES2
        assert set(seal["files2"]) == {"embedded.provisionprofile"}  # Info.plist and executable are not resources
        assert set(seal["files"]) == {"Info.plist", "embedded.provisionprofile"}
        executable = shallow / identifier
        assert_executable_binds(executable, shallow / "Info.plist", shallow / "_CodeSignature/CodeResources", identifier)
        for raw in raw_signatures(executable.read_bytes()):
            assert openssl_accepts(tmp_path, raw, pki.root.certificate)
        assert len(objdump_code_signatures(executable)) == len(raw_signatures(executable.read_bytes()))

    # The host seals the extensions file by file, as Apple's seal of Karabiner's .dext shows.
    host_seal = assert_seal_matches_disk(app, app / "Contents")
    dext = f"Library/SystemExtensions/{DRIVER_ID}.dext"
    assert {f"{dext}/{DRIVER_ID}", f"{dext}/Info.plist", f"{dext}/_CodeSignature/CodeResources",
            f"{dext}/embedded.provisionprofile", "embedded.provisionprofile"} <= set(host_seal["files2"])  # fmt: skip
    helper = app / "Contents" / "XPCServices" / "Helper.xpc"
    helper_cd = raw_signatures((helper / "Helper").read_bytes())[0].code_directories[0]
    assert host_seal["files2"]["XPCServices/Helper.xpc"]["cdhash"] == hashlib.sha256(helper_cd).digest()[:20]
    assert host_seal["files2"]["XPCServices/Helper.xpc"]["requirement"].startswith(f'identifier "{HELPER_ID}"')
    verdict = verify_code(app, trusted(pki))
    assert verdict.satisfies_designated
    assert {nested.identifier for nested in verdict.nested} == {DRIVER_ID, FILTER_ID, HELPER_ID}
    alone = verify_code(extensions / f"{DRIVER_ID}.dext", trusted(pki))
    assert alone.format == "bundle with Mach-O thin (arm64)" and alone.identifier == DRIVER_ID


def test_our_shallow_rules_are_apples_for_a_dext():
    stored = plistlib.loads(corpus_item(DEXT_IN_CORPUS + "/_CodeSignature/CodeResources").read_bytes())
    assert stored["rules"] == SHALLOW_RULES
    assert stored["rules2"] == SHALLOW_RULES2


def test_ios_app_with_a_plugin_signed_ad_hoc(fx, tmp_path):
    app = build_ios_app(tmp_path, fx)
    signed = cs.sign_code(app, None, CodesignOptions(deep=True))
    assert (signed.identifier, signed.format) == (IOS_ID, "app bundle with Mach-O thin (arm64)")
    assert [item.identifier for item in signed.nested] == ["libswiftDemo", SHARE_ID]
    dylib = raw_signatures((app / "Frameworks" / "libswiftDemo.dylib").read_bytes())[0]
    assert cd_fields(dylib.code_directories[0])["flags"] == 0x2  # ad hoc, no longer linker-signed
    seal = assert_seal_matches_disk(app, app)
    assert seal["rules2"] == SHALLOW_RULES2
    files2 = seal["files2"]
    assert files2["embedded.mobileprovision"]["hash2"] == hashlib.sha256(PROFILE).digest()
    assert "Info.plist" not in files2 and "PkgInfo" not in files2 and "Pocket" not in files2
    assert "en.lproj/locversion.plist" not in files2
    assert "PlugIns/Share.appex/Share" in files2 and "PlugIns/Share.appex/_CodeSignature/CodeResources" in files2
    assert "Frameworks/libswiftDemo.dylib" in files2
    assert {"Info.plist", "PkgInfo"} <= set(seal["files"])
    assert_executable_binds(app / "Pocket", app / "Info.plist", app / "_CodeSignature/CodeResources", IOS_ID)
    verdict = verify_code(app, VerifyOptions(deep=True, strict=True))
    assert verdict.designated_text.startswith('cdhash H"')
    assert [nested.identifier for nested in verdict.nested] == ["libswiftDemo", SHARE_ID]


# --- bundles without a main executable --------------------------------------------------------------


def test_executable_less_bundle_ad_hoc(tmp_path):
    bundle = build_resource_bundle(tmp_path)
    signed = cs.sign_code(bundle, None, CodesignOptions(hash_types=(HashType.SHA1, HashType.SHA256)))
    assert (signed.identifier, signed.format) == (RESOURCE_ID, "bundle")
    folder = bundle / "Contents" / "_CodeSignature"
    assert sorted(os.listdir(folder)) == [
        "CodeDirectory", "CodeRequirements", "CodeRequirements-1", "CodeResources", "CodeSignature",
    ]  # fmt: skip
    assert (folder / "CodeSignature").read_bytes() == b""
    info = (bundle / "Contents" / "Info.plist").read_bytes()
    for name, digest, hash_type in (("CodeDirectory", hashlib.sha1, 1), ("CodeRequirements-1", hashlib.sha256, 2)):
        blob = (folder / name).read_bytes()
        cd = cd_fields(blob)
        assert cd["hash_type"] == hash_type and cd["flags"] == 0x2 and blob[39] == 0  # one page: the whole file
        assert cd["code_limit"] == len(info)
        assert cd["hashes"] == [digest(info).digest()]
        assert cd["special"][1] == digest(info).digest()
        assert cd["special"][2] == digest((folder / "CodeRequirements").read_bytes()).digest()
        assert cd["special"][3] == digest((folder / "CodeResources").read_bytes()).digest()
    assert_seal_matches_disk(bundle, bundle / "Contents")
    assert verify_code(bundle, VerifyOptions(strict=True)).format == "bundle"

    # Re-signing with SHA-256 alone leaves no stale alternate behind.
    cs.sign_code(bundle, None, CodesignOptions(force=True))
    assert not (folder / "CodeRequirements-1").exists()
    assert cd_fields((folder / "CodeDirectory").read_bytes())["hash_type"] == 2
    verify_code(bundle, VerifyOptions(strict=True))


def test_executable_less_bundle_refuses_entitlements(tmp_path):
    bundle = build_resource_bundle(tmp_path)
    before = snapshot(bundle)
    with pytest.raises(CodesignError, match="no main executable to carry entitlements"):
        cs.sign_code(bundle, None, CodesignOptions(entitlements=plistlib.dumps({"a": True})))
    assert snapshot(bundle) == before


def test_executable_less_bundle_with_an_identity(pki, tmp_path):
    bundle = build_resource_bundle(tmp_path)
    identity, signer = local_identity(pki)
    cs.sign_code(bundle, identity, CodesignOptions())
    assert len(signer.requests) == 1 and len(signer.requests[0].digest) == 32
    folder = bundle / "Contents" / "_CodeSignature"
    cms = (folder / "CodeSignature").read_bytes()
    checked = openssl_cms_verify(tmp_path, cms, (folder / "CodeDirectory").read_bytes(), pki.root.certificate)
    assert checked.returncode == 0, checked.stderr
    assert cd_fields((folder / "CodeDirectory").read_bytes())["team"] == team_identifier(identity.certificate, identity.chain)
    verdict = verify_code(bundle, trusted(pki))
    assert verdict.satisfies_designated and verdict.designated_text.startswith(f'identifier "{RESOURCE_ID}"')
    shown = codesign("-dvvv", bundle)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stderr.splitlines()
    assert f"Executable={bundle.resolve()}/Contents/Info.plist" in lines
    assert "Format=bundle" in lines and f"Identifier={RESOURCE_ID}" in lines
    assert "Sealed Resources version=2 rules=13 files=1" in lines


def test_executable_less_bundle_nested_in_an_app(fx, tmp_path):
    app = build_sysext_host(tmp_path, fx)
    plugin = build_resource_bundle(app / "Contents" / "PlugIns")
    cs.sign_code(app, None, CodesignOptions(deep=True))
    seal = plistlib.loads((app / "Contents/_CodeSignature/CodeResources").read_bytes())
    entry = seal["files2"]["PlugIns/Resources.bundle"]
    assert entry["cdhash"] == hashlib.sha256((plugin / "Contents/_CodeSignature/CodeDirectory").read_bytes()).digest()[:20]
    verify_code(app, VerifyOptions(deep=True, strict=True))


# --- tampering -----------------------------------------------------------------------------------------


def _flip(path: Path, offset: int = -1) -> None:
    """Change one byte (in an Info.plist, one character of a value, so it still parses)."""
    data = bytearray(path.read_bytes())
    if path.name == "Info.plist":
        offset = data.index(b"</string>") - 1
    data[offset] ^= 0x01
    os.chmod(path, stat.S_IMODE(path.stat().st_mode) | 0o200)
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def signed_set(fx, pki, tmp_path_factory) -> Path:
    """A host app with system extensions, an iOS app and an executable-less bundle, all signed."""
    root = tmp_path_factory.mktemp("tamper")
    identity = local_identity(pki)[0]
    cs.sign_code(build_sysext_host(root, fx), identity, CodesignOptions(deep=True))
    cs.sign_code(build_ios_app(root, fx), identity, CodesignOptions(deep=True))
    cs.sign_code(build_resource_bundle(root), identity, CodesignOptions())
    return root


TAMPERING = {
    "shallow bundle resource": ("Pocket.app", "Base.lproj/Main.strings", vf.BAD_RESOURCE, "Base.lproj/Main.strings"),
    "nested shallow executable": (
        "Host.app", f"Contents/Library/SystemExtensions/{DRIVER_ID}.dext/{DRIVER_ID}", vf.BAD_RESOURCE,
        f"{DRIVER_ID}.dext/{DRIVER_ID}",
    ),
    "detached CodeDirectory": (
        "Resources.bundle", "Contents/_CodeSignature/CodeDirectory", vf.MODIFIED, "CMS signature does not check out",
    ),
    "executable-less Info.plist": (
        "Resources.bundle", "Contents/Info.plist", vf.INFO_PLIST_FAILED, "Info.plist does not match its hash",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampering_is_named(signed_set, pki, tmp_path, case):
    bundle_name, relative, status, named = TAMPERING[case]
    bundle = tmp_path / bundle_name
    shutil.copytree(signed_set / bundle_name, bundle, symlinks=True)
    verify_code(bundle, trusted(pki))
    _flip(bundle / relative, -2)
    with pytest.raises(vf.CodeVerificationError) as failure:
        verify_code(bundle, trusted(pki))
    assert failure.value.status == status
    assert named in " ".join(failure.value.lines())
    result = codesign("--verify", "--strict", "--deep", bundle, env={"SIGNBRIDGE_ANCHORS": str(_anchor(tmp_path, pki))})
    assert result.returncode == 1
    assert result.stderr.startswith(f"{bundle}: {status}\n")


def _anchor(directory: Path, pki) -> Path:
    path = directory / "anchor.pem"
    path.write_bytes(pem(pki.root.certificate))
    return path


# --- .ipa ------------------------------------------------------------------------------------------------


def zip_app(app: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as output:
        for path in sorted(app.rglob("*")):
            name = Path("Payload") / app.name / path.relative_to(app)
            if path.is_file():
                output.write(path, name.as_posix())
    return archive


def bsdtar_list(archive: Path) -> list[str]:
    listed = subprocess.run([require_tool("bsdtar"), "-tf", str(archive)], capture_output=True, text=True, check=True)
    return listed.stdout.splitlines()


def test_ipa_signed_verified_and_displayed(fx, pki, tmp_path):
    archive = zip_app(build_ios_app(tmp_path / "build", fx), tmp_path / "Pocket.ipa")
    unsigned = codesign("--verify", archive)  # only the linker's signature: Info.plist is unbound
    assert unsigned.returncode == 1 and unsigned.stderr.startswith(f"{archive}: invalid Info.plist")

    signed = codesign("-s", "-", "--deep", "-v", archive)
    assert signed.returncode == 0, signed.stderr
    assert signed.stderr == f"{archive}: signed app bundle with Mach-O thin (arm64) [{IOS_ID}]\n"
    assert [name for name in os.listdir(tmp_path) if name.startswith(".")] == []
    names = bsdtar_list(archive)
    assert "Payload/Pocket.app/_CodeSignature/CodeResources" in names
    assert "Payload/Pocket.app/PlugIns/Share.appex/_CodeSignature/CodeResources" in names

    verified = codesign("--verify", "--strict", "--deep", "-v", archive)
    assert (verified.returncode, verified.stderr) == (0, f"{archive}: valid on disk\n{archive}: satisfies its Designated Requirement\n")
    shown = codesign("-dvvv", archive)
    assert shown.returncode == 0
    assert f"Executable={archive}/Payload/Pocket.app/Pocket" in shown.stderr.splitlines()

    unpacked = tmp_path / "unpacked"
    subprocess.run([require_tool("bsdtar"), "-xf", str(archive), "-C", str(unpacked.mkdir() or unpacked)], check=True)
    app = unpacked / "Payload" / "Pocket.app"
    assert os.access(app / "Pocket", os.X_OK)
    assert_seal_matches_disk(app, app)
    assert verify_code(app, VerifyOptions(deep=True)).identifier == IOS_ID

    resigned = codesign("-s", "-", archive)
    assert resigned.returncode == 1 and resigned.stderr == f"{archive}: is already signed\n"


def _bad_archive(path: Path, case: str) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as output:
        output.writestr("Payload/Evil.app/Info.plist", plistlib.dumps({"CFBundleIdentifier": "x"}))
        if case == "traversal":
            output.writestr("Payload/../../evil", b"x")
        elif case == "absolute":
            output.writestr("/tmp/evil", b"x")
        elif case == "outside Payload":
            output.writestr("iTunesMetadata.plist", b"x")
        elif case == "escaping symlink":
            link = zipfile.ZipInfo("Payload/Evil.app/link")
            link.create_system = 3
            link.external_attr = (stat.S_IFLNK | 0o755) << 16
            output.writestr(link, b"../../../etc/passwd")
        elif case == "symlink chain":
            for name, target in (("Payload/Evil.app/d/up", b".."), ("Payload/Evil.app/chain", b"d/up/..")):
                link = zipfile.ZipInfo(name)
                link.create_system = 3
                link.external_attr = (stat.S_IFLNK | 0o755) << 16
                output.writestr(link, target)
        elif case == "file and folder":
            output.writestr("Payload/Evil.app/x", b"file")
            output.writestr("Payload/Evil.app/x/", b"")
        elif case == "two apps":
            output.writestr("Payload/Other.app/Info.plist", b"x")
        elif case == "huge declared size":
            output.writestr("Payload/Evil.app/blob", b"\0" * 4096)
    if case == "huge declared size":
        data = bytearray(path.read_bytes())
        central = data.rindex(b"PK\x01\x02")  # the last entry's central directory header
        data[central + 24 : central + 28] = (0xFFFFFFF0).to_bytes(4, "little")
        path.write_bytes(bytes(data))
    return path


BAD_IPAS = {
    "traversal": (UnsafeIpaError, "climbs out of the archive"),
    "absolute": (UnsafeIpaError, "has an absolute path"),
    "outside Payload": (UnsafeIpaError, "is outside Payload/"),
    "escaping symlink": (UnsafeIpaError, "points outside the app"),
    "symlink chain": (UnsafeIpaError, "leads outside the app"),
    "two apps": (IpaError, "exactly one Payload/<Name>.app"),
    "file and folder": (UnsafeIpaError, "as a file and a folder"),
    "huge declared size": (UnsafeIpaError, "refusing to unpack it"),
}


@pytest.mark.parametrize("case", list(BAD_IPAS))
def test_bad_ipa_is_refused_and_left_alone(tmp_path, case):
    error, message = BAD_IPAS[case]
    archive = _bad_archive(tmp_path / "Evil.ipa", case)
    before = snapshot(tmp_path)
    with pytest.raises(error, match=message):
        cs.sign_code(archive, None, CodesignOptions())
    with pytest.raises(error, match=message):
        verify_code(archive)
    assert snapshot(tmp_path) == before
    result = codesign("-s", "-", archive)
    assert result.returncode == 1 and message in result.stderr
    assert snapshot(tmp_path) == before
    assert not (tmp_path.parent / "evil").exists()
