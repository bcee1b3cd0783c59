"""codesign's engine on real bundles (tests/bundlefixtures.py): MyApp.app with a universal main
executable, a versioned framework, a second executable, a plug-in with its own nested dylib.

Independent checks: the CodeDirectory slots are read with struct and compared with hashlib over
Info.plist and CodeResources, CodeResources is read with plistlib and its file hashes recomputed,
openssl verifies every CMS against its CodeDirectory.
"""

from __future__ import annotations

import hashlib
import os
import plistlib
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes

import machofixtures
from bundlefixtures import APP_ID, FRAMEWORK_ID, build_myapp
from codesignkit import cd_fields, cdhash, local_identity, openssl_accepts, raw_signatures, snapshot
from signbridge.apple import codesign as cs
from signbridge.apple import display
from signbridge.apple.bundle import layout as bd
from signbridge.apple.codesig import verification as vf
from signbridge.apple.codesig.options import (
    AlreadySignedError,
    CodesignOptions,
    QuietReporter,
    UnsignedNestedCodeError,
    parse_flags,
)
from signbridge.apple.codesig.verdicts import VerifyOptions
from signbridge.apple.verify_code import verify_code
from signbridge.crypto.identity import Identity
from signbridge.errors import SignatureError
from tokenkit import apple_pki


@pytest.fixture(scope="session")
def fx(tmp_path_factory: pytest.TempPathFactory):
    return machofixtures.get_fixtures(tmp_path_factory)


@pytest.fixture(scope="module")
def pki():
    return apple_pki()


@pytest.fixture(scope="module")
def signed_template(fx, pki, tmp_path_factory) -> Path:
    """MyApp.app signed --deep with the Developer ID identity and the hardened runtime."""
    directory = tmp_path_factory.mktemp("signed")
    app = build_myapp(directory, fx, extras=True)
    cs.sign_code(app, local_identity(pki)[0], CodesignOptions(deep=True, flags=parse_flags("runtime")))
    return app


@pytest.fixture
def app(signed_template, tmp_path) -> Path:
    copy = tmp_path / "MyApp.app"
    shutil.copytree(signed_template, copy, symlinks=True)
    return copy


def options(pki) -> VerifyOptions:
    return VerifyOptions(anchors=(pki.root.certificate,))


def test_signed_bundle_binds_info_plist_and_seal(app, pki, tmp_path):
    contents = app / "Contents"
    seal_bytes = (contents / "_CodeSignature" / "CodeResources").read_bytes()
    info_bytes = (contents / "Info.plist").read_bytes()
    for raw in raw_signatures((contents / "MacOS" / "MyApp").read_bytes()):
        cd = cd_fields(raw.code_directories[0])
        assert cd["identifier"] == APP_ID
        assert cd["flags"] == 0x10000
        assert cd["special"][1] == hashlib.sha256(info_bytes).digest()
        assert cd["special"][3] == hashlib.sha256(seal_bytes).digest()
        assert openssl_accepts(tmp_path, raw, pki.root.certificate)

    seal = plistlib.loads(seal_bytes)
    assert set(seal) == {"files", "files2", "rules", "rules2"}
    files2 = seal["files2"]
    assert files2["Resources/data.txt"] == {"hash2": hashlib.sha256(b"sealed resource\n").digest()}
    assert files2["Resources/current.txt"] == {"symlink": "data.txt"}
    assert "Resources/.DS_Store" not in files2 and "Info.plist" not in files2
    framework_exec = contents / "Frameworks/Demo.framework/Versions/A/Demo"
    framework_raw = raw_signatures(framework_exec.read_bytes())
    entry = files2["Frameworks/Demo.framework"]
    assert entry["cdhash"] == cdhash(framework_raw[1].code_directories[0])  # the arm64 slice
    leaf = pki.application.certificate.fingerprint(hashes.SHA1()).hex()  # noqa: S303 - Apple's requirement
    assert entry["requirement"] == f'identifier "{FRAMEWORK_ID}" and certificate leaf = H"{leaf}"'
    assert cd_fields(framework_raw[0].code_directories[0])["special"][3] == hashlib.sha256(
        (framework_exec.parent / "_CodeSignature" / "CodeResources").read_bytes()
    ).digest()
    assert "MacOS/helper" in files2 and "cdhash" in files2["MacOS/helper"]
    assert files2["MacOS/launch.sh"] == {"hash2": hashlib.sha256(b"#!/bin/sh\nexec ./MyApp\n").digest()}
    assert "PlugIns/Widget.bundle" in files2

    verdict = verify_code(app, options(pki))
    assert verdict.identifier == APP_ID
    assert verdict.format == "app bundle with Mach-O universal (x86_64 arm64)"
    assert verdict.satisfies_designated
    nested = {Path(item.path).name for item in verdict.nested}
    assert nested == {"Demo.framework", "helper", "Widget.bundle"}


def test_display_of_a_bundle(app, pki):
    info = display.signing_information(app)
    lines = [line for _, line in display.display_lines(info, 3, nested=True)]
    seal = plistlib.loads((app / "Contents/_CodeSignature/CodeResources").read_bytes())
    arm64 = raw_signatures((app / "Contents/MacOS/MyApp").read_bytes())[1]
    cd = cd_fields(arm64.code_directories[0])
    assert lines[0] == f"Executable={app / 'Contents/MacOS/MyApp'}"
    assert lines[1:4] == [
        f"Identifier={APP_ID}",
        "Format=app bundle with Mach-O universal (x86_64 arm64)",
        f"CodeDirectory v=20500 size={cd['length']} flags=0x10000(runtime) hashes={len(cd['hashes'])}+3 "
        "location=embedded",
    ]
    assert f"CDHash={cdhash(arm64.code_directories[0]).hex()}" in lines
    assert "Authority=Developer ID Application: Test Corp (TEAM123456)" in lines
    assert "Info.plist entries=7" in lines
    assert "TeamIdentifier=TEAM123456" in lines
    assert "Runtime Version=11.0.0" in lines
    assert f"Sealed Resources version=2 rules=13 files={len(seal['files2'])}" in lines
    assert [line for line in lines if line.startswith("Nested=")] == [
        "Nested=Frameworks/Demo.framework",
        "Nested=MacOS/helper",
        "Nested=PlugIns/Widget.bundle",
    ]


def _flip(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    index = len(data) // 2 if offset is None else offset
    data[index] ^= 0x01
    path.write_bytes(bytes(data))


def _replace_in(path: Path, old: bytes, new: bytes) -> None:
    path.write_bytes(path.read_bytes().replace(old, new))


def _relink(link: Path, target: str) -> None:
    link.unlink()
    os.symlink(target, link)


FRAMEWORK_CODE = "Frameworks/Demo.framework/Versions/A/Demo"
WIDGET_RESOURCE = "PlugIns/Widget.bundle/Contents/Resources/widget.txt"

# case: (change to Contents/, Apple's status, (attribute of the error, what it must show))
TAMPERING = {
    "Info.plist": (lambda c: _replace_in(c / "Info.plist", b"1.0", b"1.1"), vf.INFO_PLIST_FAILED,
                   ("detail", "slot 1")),
    "resource": (lambda c: _flip(c / "Resources/AppIcon.icns"), vf.BAD_RESOURCE,
                 ("modified", "Contents/Resources/AppIcon.icns")),
    "added file": (lambda c: (c / "Resources/new.txt").write_text("x"), vf.BAD_RESOURCE,
                   ("added", "Contents/Resources/new.txt")),
    "missing file": (lambda c: (c / "Resources/data.txt").unlink(), vf.BAD_RESOURCE,
                     ("missing", "Contents/Resources/data.txt")),
    "symlink target": (lambda c: _relink(c / "Resources/current.txt", "AppIcon.icns"), vf.BAD_RESOURCE,
                       ("modified", "Contents/Resources/current.txt")),
    "nested framework code": (lambda c: _flip(c / FRAMEWORK_CODE, 0x2010), vf.MODIFIED,
                              ("subcomponent", "Contents/Frameworks/Demo.framework")),
    "nested plug-in resource": (lambda c: _flip(c / WIDGET_RESOURCE), vf.BAD_RESOURCE,
                                ("subcomponent", "Contents/PlugIns/Widget.bundle")),
    "CMS of the main executable": (lambda c: _flip_cms(c / "MacOS/MyApp"), vf.MODIFIED,
                                   ("detail", "CMS signature does not check out")),
    "CodeResources": (lambda c: _flip(c / "_CodeSignature/CodeResources", 200), vf.RESOURCE_DIRECTORY_FAILED,
                      ("detail", "slot 3")),
}  # fmt: skip


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampering_is_named(app, pki, case):
    change, status, (attribute, shown) = TAMPERING[case]
    verify_code(app, options(pki))
    change(app / "Contents")
    with pytest.raises(vf.CodeVerificationError) as failed:
        verify_code(app, options(pki))
    error = failed.value
    assert error.status == status
    if attribute in ("detail", "subcomponent"):
        value = getattr(error, attribute)
        assert shown in value if attribute == "detail" else value == str(app.resolve() / shown)
    else:
        assert getattr(error, attribute) == (str(app.resolve() / shown),)
    if case == "nested framework code":
        assert "code page 1" in error.detail and error.architecture == "x86_64"
    if case == "CMS of the main executable":
        assert error.architecture == "x86_64"


def _flip_cms(executable: Path) -> None:
    raw = raw_signatures(executable.read_bytes())[0]  # the x86_64 slice at its fat offset
    data = executable.read_bytes()
    position = data.index(raw.cms) + len(raw.cms) - 20
    _flip(executable, position)


def test_stapled_ticket_is_accepted(app, pki):
    (app / "Contents" / "CodeResources").write_bytes(b"s8lt" + os.urandom(600))  # a notarization ticket
    assert verify_code(app, options(pki)).satisfies_designated


def test_signed_bundle_needs_force(app, pki):
    before = snapshot(app)
    with pytest.raises(AlreadySignedError):
        cs.sign_code(app, None, CodesignOptions(deep=True))
    assert snapshot(app) == before
    reporter = QuietReporter()
    cs.sign_code(app, None, CodesignOptions(deep=True, force=True), reporter)
    assert reporter.notes == [(app, "replacing existing signature")]
    assert verify_code(app, VerifyOptions()).designated_text.startswith('cdhash H"')


def test_without_deep_nested_code_must_be_signed(fx, tmp_path, pki):
    app = build_myapp(tmp_path, fx)
    before = snapshot(app)
    with pytest.raises(UnsignedNestedCodeError) as failed:
        cs.sign_code(app, local_identity(pki)[0], CodesignOptions())
    assert failed.value.subcomponent.endswith("Contents/Frameworks/Demo.framework")
    assert snapshot(app) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["MyApp.app"]  # no staging leftovers
    # sign the framework on its own, then the app around it
    framework = app / "Contents/Frameworks/Demo.framework"
    cs.sign_code(framework, local_identity(pki)[0], CodesignOptions())
    cs.sign_code(app, local_identity(pki)[0], CodesignOptions())
    verdict = verify_code(app, options(pki))
    assert [Path(nested.path).name for nested in verdict.nested] == ["Demo.framework"]


def test_bad_bundles_are_refused_untouched(fx, tmp_path, pki):
    app = build_myapp(tmp_path, fx)
    os.symlink("../../../../etc/passwd", app / "Contents/Resources/escape")
    before = snapshot(app)
    with pytest.raises(bd.BundleSymlinkError, match="points outside the bundle"):
        cs.sign_code(app, local_identity(pki)[0], CodesignOptions(deep=True))
    assert snapshot(app) == before
    with pytest.raises(vf.CodeVerificationError) as failed:
        verify_code(app, options(pki))
    assert failed.value.status == vf.INVALID_SYMLINK
    (app / "Contents/Resources/escape").unlink()
    (app / "stray.txt").write_text("outside Contents\n")
    with pytest.raises(bd.UnsealedContentError):
        cs.sign_code(app, None, CodesignOptions(deep=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["MyApp.app"]


def test_a_failure_midway_leaves_the_bundle_untouched(fx, tmp_path, pki):
    app = build_myapp(tmp_path, fx, extras=True)
    before = snapshot(app)
    calls = []
    good = local_identity(pki)[1]

    def flaky(request):
        calls.append(request)
        if len(calls) == 4:  # the plug-in's nested dylib and framework are done by then
            raise SignatureError("the token alpha could not sign: the connection was closed")
        return good(request)

    chain = (pki.intermediate.certificate, pki.root.certificate)
    identity = Identity(pki.application.certificate, chain, flaky)
    with pytest.raises(SignatureError, match="could not sign"):
        cs.sign_code(app, identity, CodesignOptions(deep=True))
    assert len(calls) == 4
    assert snapshot(app) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["MyApp.app"]
