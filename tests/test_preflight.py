"""The notarization pre-flight on real signed fixtures (clang + ld64.lld + signbridge's signer) and on
the corpus. Each fixture breaks exactly one of the notary's rules, at a different depth: a helper
in Contents/Helpers, a dylib in Resources, a Mach-O in a zip in the bundle, a framework, an app in
a package's payload (gzip and pbzx). Packages are built with bsdtar's cpio writer and signbridge's
xar writer and productsign engine; payload archives are read back by libarchive."""

from __future__ import annotations

import io
import json
import lzma
import os
import plistlib
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

import machofixtures
from bundlefixtures import build_myapp
from codesignkit import local_identity, local_tsa
from conftest import require_tool, run
from corpuskit import APPLE_ROOT, corpus_item
from pkgkit import identity_of
from pkikit import marker
from signbridge.apple import codesign as cs
from signbridge.apple.codesig import cms_signing
from signbridge.apple.codesig.codedirectory import HashType
from signbridge.apple.codesig.options import CodesignOptions, parse_flags
from signbridge.apple.notary import preflight as pf
from signbridge.apple.notary.errors import PayloadError
from signbridge.apple.notary.payload import Limits, extract_cpio
from signbridge.apple.pkg.sign import sign_package
from signbridge.apple.pkg.xar.writer import PackageEntry, write_package
from signbridge.apple.trust import load_anchors
from signbridge.crypto.identity import Identity
from tokenkit import apple_name, apple_pki, issue, rsa_key
from xarfixtures import PACKAGE_INFO

LLVM = Path("/usr/lib/llvm-14/bin")
SIGNBRIDGE = [sys.executable, "-m", "signbridge"]


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return machofixtures.get_fixtures(tmp_path_factory)


@pytest.fixture(scope="module")
def tsa():
    with local_tsa() as authority:
        yield authority


@pytest.fixture(scope="module")
def pki():
    return apple_pki()


@pytest.fixture(scope="module")
def anchors(pki, tsa):
    return (pki.root.certificate, tsa.root)


@pytest.fixture(scope="module")
def old_sdk(tmp_path_factory) -> dict[str, Path]:
    """Executables built for the 10.8 SDK: one with LC_VERSION_MIN_MACOSX, one with LC_BUILD_VERSION."""
    directory = tmp_path_factory.mktemp("oldsdk")
    (directory / "m.c").write_text("int start(void) { return 0; }\n")
    run([str(LLVM / "clang"), "--target=x86_64-apple-macos10.8", "-c", str(directory / "m.c"), "-o", str(directory / "m.o")])
    built = {}
    for name, versions in (("version_min", ("10.8", "10.8")), ("build_version", ("11.0", "10.8"))):
        out = directory / name
        run([str(LLVM / "ld64.lld"), "-arch", "x86_64", "-platform_version", "macos", *versions, "-e", "_start",
             str(directory / "m.o"), "-o", str(out)])
        built[name] = out
    return built


def development_identity(pki) -> Identity:
    """An "Apple Development"-style leaf under the same CA: trusted for code, but not Developer ID."""
    leaf = issue(
        apple_name("Apple Development: Demo Corp (DEMOTEAM01)", "Demo Corp", "DEMOTEAM01"),
        rsa_key(),
        pki.intermediate,
        ekus=[ExtendedKeyUsageOID.CODE_SIGNING],
        markers=[marker("1.2.840.113635.100.6.1.2"), marker("1.2.840.113635.100.6.1.12")],
    )
    return local_identity(pki, leaf)[0]


def sign(path: Path, identity, tsa, *, runtime: bool = True, timestamp: bool = True, deep: bool = False,
         entitlements: bytes | None = None, hash_types=None) -> None:
    options = CodesignOptions(
        force=True, deep=deep, flags=parse_flags("runtime") if runtime else 0,
        timestamp_url=tsa.url if timestamp else None, entitlements=entitlements, hash_types=hash_types,
    )
    cs.sign_code(path, identity, options)


def build_app(directory: Path, fx, pki, tsa, old_sdk, variant: str = "clean") -> Path:
    identity = local_identity(pki)[0]
    directory.mkdir(parents=True, exist_ok=True)
    app = build_myapp(directory, fx, extras=True)
    contents = app / "Contents"
    (contents / "Helpers").mkdir()
    helper = contents / "Helpers" / "helper"
    shutil.copyfile(old_sdk[variant] if variant in old_sdk else fx.path("hello.universal"), helper)
    extra = contents / "Resources" / "libextra.dylib"
    shutil.copyfile(fx.path("libdemo.universal.dylib"), extra)
    tool = directory / "tool"
    shutil.copyfile(fx.path("exe.arm64"), tool)
    for path in (helper, extra, tool):
        os.chmod(path, 0o755)
    sign(helper, identity, tsa)
    sign(extra, identity, tsa, timestamp=variant != "dylib_no_timestamp")
    sign(tool, identity, tsa, hash_types=(HashType.SHA1,) if variant == "zip_sha1" else None)
    with zipfile.ZipFile(contents / "Resources" / "tools.zip", "w") as archive:
        archive.write(tool, "bin/tool")
    if variant == "unsigned":
        shutil.copyfile(fx.path("exe_unsigned.arm64"), contents / "Resources" / "plain")
    sign(app, identity, tsa, deep=True)
    resign = True
    if variant == "helper_no_runtime":
        sign(helper, identity, tsa, runtime=False)
    elif variant == "get_task_allow":
        sign(helper, identity, tsa, entitlements=plistlib.dumps({"com.apple.security.get-task-allow": True}))
    elif variant == "framework_not_developer_id":
        sign(contents / "Frameworks" / "Demo.framework", development_identity(pki), tsa)
    else:
        resign = False
    if resign:
        sign(app, identity, tsa)
    if variant == "tampered_helper":
        data = bytearray(helper.read_bytes())
        data[0x4000 + 100] ^= 0xFF
        helper.write_bytes(bytes(data))
    return app


@pytest.fixture(scope="module")
def clean_app(tmp_path_factory, fx, pki, tsa, old_sdk) -> Path:
    return build_app(tmp_path_factory.mktemp("clean"), fx, pki, tsa, old_sdk)


def relative(problems: list[pf.Problem], root: Path) -> list[tuple[str, str]]:
    return [(p.path.removeprefix(str(root)).lstrip("/"), p.message) for p in problems]


def test_clean_developer_id_app_has_no_problems(clean_app, anchors):
    assert pf.preflight([clean_app], anchors) == []


@pytest.mark.parametrize(
    ("variant", "expected"),
    [
        ("helper_no_runtime", [("Contents/Helpers/helper", pf.NO_RUNTIME)]),
        ("get_task_allow", [("Contents/Helpers/helper", pf.GET_TASK_ALLOW)]),
        ("dylib_no_timestamp", [("Contents/Resources/libextra.dylib", pf.NO_TIMESTAMP)]),
        ("zip_sha1", [("Contents/Resources/tools.zip/bin/tool", pf.WEAK_ALGORITHM)]),
        ("framework_not_developer_id", [("Contents/Frameworks/Demo.framework/Versions/A/Demo", pf.NOT_DEVELOPER_ID)]),
        ("unsigned", [("Contents/Resources/plain", pf.NOT_SIGNED)]),
        ("tampered_helper", [("Contents/Helpers/helper", pf.INVALID)]),
        ("version_min", [("Contents/Helpers/helper", pf.OLD_SDK)]),
        ("build_version", [("Contents/Helpers/helper", pf.OLD_SDK)]),
    ],
)
def test_each_rule_alone(tmp_path, fx, pki, tsa, old_sdk, anchors, variant, expected):
    app = build_app(tmp_path / variant, fx, pki, tsa, old_sdk, variant)
    assert relative(pf.preflight([app], anchors), app) == expected


def test_untrusted_root_is_not_developer_id(clean_app, tsa):
    problems = pf.preflight([clean_app], (tsa.root,))
    assert {p.message for p in problems} == {pf.NOT_DEVELOPER_ID}


# --- packages and zips ----------------------------------------------------------------------------


def cpio_payload(root: Path, out: Path) -> bytes:
    """An odc cpio archive of ``root`` written by bsdtar (pkgbuild's format), uncompressed."""
    run([require_tool("bsdtar"), "-c", "--format", "odc", "-f", str(out), "-C", str(root), "."])
    return out.read_bytes()


def gzip_bytes(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data, mtime=0)


def pbzx_bytes(data: bytes, chunk: int = 64 * 1024) -> bytes:
    """pbzx as Apple writes it: magic, chunk size, then (flags, length, xz data) per chunk."""
    out = io.BytesIO()
    out.write(b"pbzx" + struct.pack(">Q", chunk))
    for start in range(0, len(data), chunk):
        piece = lzma.compress(data[start : start + chunk], format=lzma.FORMAT_XZ)
        more = 1 << 24 if start + chunk < len(data) else 0
        out.write(struct.pack(">QQ", more | chunk, len(piece)) + piece)
    return out.getvalue()


def build_package(path: Path, payload: bytes, pki, tsa, *, identity=None) -> Path:
    unsigned = path.with_suffix(".unsigned.pkg")
    entries = [
        PackageEntry("PackageInfo", PACKAGE_INFO),
        PackageEntry("Bom", b"BOMStore" + bytes(64)),
        PackageEntry("Payload", payload, compress=False),
    ]
    write_package(unsigned, entries, toc_checksum="sha1")
    sign_package(unsigned, path, identity or identity_of(pki), timestamp=cms_signing.timestamper(tsa.url))
    return path


@pytest.fixture(scope="module")
def payload_root(tmp_path_factory, fx, pki, tsa, old_sdk) -> Path:
    root = tmp_path_factory.mktemp("payload") / "root"
    (root / "Applications").mkdir(parents=True)
    app = build_app(root.parent / "build", fx, pki, tsa, old_sdk, "helper_no_runtime")
    shutil.copytree(app, root / "Applications" / "MyApp.app", symlinks=True)
    return root


@pytest.mark.parametrize("compression", ["gzip", "pbzx"])
def test_app_inside_package_payload(tmp_path, payload_root, pki, tsa, anchors, compression):
    cpio = cpio_payload(payload_root, tmp_path / "payload.cpio")
    payload = gzip_bytes(cpio) if compression == "gzip" else pbzx_bytes(cpio)
    package = build_package(tmp_path / "MyApp.pkg", payload, pki, tsa)
    assert relative(pf.preflight([package], anchors), package) == [
        ("Payload/Applications/MyApp.app/Contents/Helpers/helper", pf.NO_RUNTIME)
    ]


def test_clean_package_and_zip_of_an_app(tmp_path, clean_app, pki, tsa, anchors):
    root = tmp_path / "root" / "Applications"
    root.mkdir(parents=True)
    shutil.copytree(clean_app, root / "MyApp.app", symlinks=True)
    package = build_package(tmp_path / "Clean.pkg", gzip_bytes(cpio_payload(root.parent, tmp_path / "p.cpio")), pki, tsa)
    assert pf.preflight([package], anchors) == []
    archive = tmp_path / "MyApp.zip"
    # as ditto -c -k --keepParent writes it: symbolic links stored as links
    run([require_tool("bsdtar"), "-c", "--format", "zip", "-f", str(archive), "-C", str(clean_app.parent), "MyApp.app"])
    assert pf.preflight([archive], anchors) == []


def test_package_not_signed_with_developer_id_installer(tmp_path, clean_app, pki, tsa, anchors):
    root = tmp_path / "root"
    root.mkdir()
    # a Mac App Store installer certificate: trusted for packages, but not Developer ID Installer
    store = issue(
        apple_name("3rd Party Mac Developer Installer: Demo Corp (DEMOTEAM01)", "Demo Corp", "DEMOTEAM01"),
        rsa_key(),
        pki.intermediate,
        ekus=[x509.ObjectIdentifier("1.2.840.113635.100.4.9")],
        markers=[marker("1.2.840.113635.100.6.1.8")],
    )
    package = build_package(tmp_path / "Wrong.pkg", gzip_bytes(cpio_payload(root, tmp_path / "p.cpio")), pki, tsa,
                            identity=identity_of(pki, store))
    assert relative(pf.preflight([package], anchors), package) == [("", pf.PACKAGE_NOT_DEVELOPER_ID)]


def test_payload_past_the_limit_is_refused(tmp_path, payload_root, pki, tsa, anchors):
    payload = gzip_bytes(cpio_payload(payload_root, tmp_path / "payload.cpio"))
    package = build_package(tmp_path / "Big.pkg", payload, pki, tsa)
    problems = pf.preflight([package], anchors, Limits(max_bytes=100_000))
    assert [p.message for p in problems] == [pf.UNREADABLE]
    assert "expands to more than 100000 bytes" in problems[0].detail
    assert [p.message for p in pf.preflight([package], anchors, Limits(max_entries=5))] == [pf.UNREADABLE]


def odc_entry(name: str, data: bytes, mode: int = 0o100644) -> bytes:
    header = b"070707" + b"".join(
        f"{value:0{width}o}".encode()
        for value, width in ((0, 6), (1, 6), (mode, 6), (0, 6), (0, 6), (1, 6), (0, 6), (0, 11), (len(name) + 1, 6), (len(data), 11))
    )
    return header + name.encode() + b"\0" + data


def test_cpio_entry_escaping_the_root_is_refused(tmp_path):
    archive = odc_entry("./ok.txt", b"fine") + odc_entry("../escaped.txt", b"evil") + odc_entry("TRAILER!!!", b"")
    destination = tmp_path / "out"
    destination.mkdir()
    with pytest.raises(PayloadError, match="outside the archive's root"):
        extract_cpio(io.BytesIO(gzip_bytes(archive)), destination, Limits(), "Payload")
    assert not (tmp_path / "escaped.txt").exists()
    with pytest.raises(PayloadError, match="outside the archive's root"):
        extract_cpio(io.BytesIO(odc_entry("/etc/passwd", b"x") + odc_entry("TRAILER!!!", b"")), destination, Limits(), "P")


def test_apple_double_entries_are_metadata(tmp_path):
    archive = odc_entry("./a.txt", b"data") + odc_entry("./._a.txt", b"\x00\x05\x16\x07" + bytes(60)) + odc_entry("TRAILER!!!", b"")
    assert extract_cpio(io.BytesIO(archive), tmp_path, Limits(), "Payload") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


# --- command line ---------------------------------------------------------------------------------


def test_command_line_exit_codes_and_json(tmp_path, fx, pki, tsa, old_sdk, clean_app, anchors):
    anchor_file = tmp_path / "anchors.pem"
    anchor_file.write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in anchors))
    env = dict(os.environ, SIGNBRIDGE_ANCHORS=str(anchor_file))
    clean = subprocess.run([*SIGNBRIDGE, "notarytool", "preflight", str(clean_app)], capture_output=True, text=True, env=env)
    assert clean.returncode == 0 and clean.stdout == "No problems found.\n"
    app = build_app(tmp_path / "bad", fx, pki, tsa, old_sdk, "helper_no_runtime")
    bad = subprocess.run([*SIGNBRIDGE, "notarytool", "preflight", "--json", str(app)], capture_output=True, text=True, env=env)
    assert bad.returncode == 1
    document = json.loads(bad.stdout)
    assert document["ok"] is False
    assert document["problems"] == [{"path": f"{app}/Contents/Helpers/helper", "message": pf.NO_RUNTIME}]
    human = subprocess.run([*SIGNBRIDGE, "notarytool", "preflight", str(app)], capture_output=True, text=True, env=env)
    assert human.stdout == f"{app}/Contents/Helpers/helper: {pf.NO_RUNTIME}\n"


# --- the corpus: Apple's own output ---------------------------------------------------------------

NOT_NOTARIZABLE = {pf.NOT_DEVELOPER_ID, pf.NO_TIMESTAMP}
CORPUS_VERDICTS = {
    # notarized by Apple: nothing to report
    "pkg/pqrs-org_Karabiner-DriverKit-VirtualHIDDevice__1.17.0-stapled.pkg": set(),
    "pkg/pqrs-org_Karabiner-DriverKit-VirtualHIDDevice__1.17.0-unstapled.pkg": set(),
    "pkg/pqrs-org_Karabiner-DriverKit-VirtualHIDDevice__1.27.0.pkg": set(),
    "pkg/pqrs-org_Karabiner-DriverKit-VirtualHIDDevice__2.4.0.pkg": set(),
    "pkg/pqrs-org_Karabiner-DriverKit-VirtualHIDDevice__4.3.0.pkg": set(),
    "pkg/pqrs-org_Karabiner-DriverKit-VirtualHIDDevice__6.14.0.pkg": set(),
    "bundles/pqrs-org_Karabiner-DriverKit-VirtualHIDDevice__2.4.0_Karabiner-VirtualHIDDevice-Manager.app": set(),
    # Developer ID, timestamped, hardened
    "macho/htacg_tidy-mac-installer__tidy": set(),
    "macho/htacg_tidy-mac-installer__libtidy.5.6.0.dylib": set(),
    "bundles/pqrs-org_Karabiner-VirtualHIDDevice-archived__org.pqrs.driver.VirtualHIDManager.kext": set(),
    "bundles/pqrs-org_Karabiner-VirtualHIDDevice-archived__org.pqrs.driver.Karabiner.VirtualHIDDevice.v061000.kext": set(),
    # Developer ID without the hardened runtime
    "bundles/sparkle-project_Sparkle__DevSignedApp.app": {pf.NO_RUNTIME},
    # Apple Development, no timestamp, debuggable
    "bundles/achow101_signapple__signapple-test-universal.app": {pf.NOT_DEVELOPER_ID, pf.NO_TIMESTAMP, pf.GET_TASK_ALLOW},
    # not Developer ID (development certificates, self-signed, ad hoc, linker-signed)
    "macho/northpolesec_santa__yikes-universal_signed": NOT_NOTARIZABLE | {pf.NO_RUNTIME},
    "macho/northpolesec_santa__yikes-universal_adhoc": NOT_NOTARIZABLE | {pf.NO_RUNTIME},
    "macho/northpolesec_santa__signed-with-teamid": NOT_NOTARIZABLE | {pf.NO_RUNTIME},
    "macho/northpolesec_santa__badcert": NOT_NOTARIZABLE | {pf.NO_RUNTIME},
    "macho/northpolesec_santa__allowed_cdhash": NOT_NOTARIZABLE | {pf.NO_RUNTIME},
    # iOS code: ad hoc or self-signed, never hardened; an executable-less bundle signed ad hoc
    "bundles/fastlane_fastlane__simulator-app.app": NOT_NOTARIZABLE | {pf.NO_RUNTIME},
    "bundles/fastlane_fastlane__very-capable-app.ipa": NOT_NOTARIZABLE | {pf.NO_RUNTIME},
    "bundles/sparkle-project_Sparkle__CodeSignedBothNew.bundle": NOT_NOTARIZABLE,
    # ad hoc, and its Info.plist was edited after signing
    "bundles/sparkle-project_Sparkle__CodeSignedInvalid.bundle": NOT_NOTARIZABLE | {pf.INVALID},
    # disk images: notarized by Apple (one signed, one carrying only a ticket, its package inside)
    "dmg/pqrs-org_Karabiner-DriverKit-VirtualHIDDevice__Karabiner-VirtualHIDDevice-Manager-0.20.0.dmg": set(),
    "dmg/pqrs-org_Karabiner-DriverKit-VirtualHIDDevice__VirtualHIDDevice-0.90.6.dmg": set(),
    # an ad hoc image holding an unsigned app; an unsigned image holding an unsigned app
    "dmg/sparkle-project_Sparkle__SparkleTestCodeSign_apfs_lzma_aux_files.dmg": NOT_NOTARIZABLE | {pf.NOT_SIGNED},
    "dmg/indygreg_apple-platform-rs__example.dmg": {pf.NOT_SIGNED},
    # 2016, before notarization: the payload's binaries are unsigned
    "pkg/htacg_binaries__HTML_Tidy-5.2.0.pkg": {pf.NOT_SIGNED},
}


@pytest.mark.parametrize("item", sorted(CORPUS_VERDICTS))
def test_corpus_verdicts(item):
    problems = pf.preflight([corpus_item(item)], tuple(load_anchors(APPLE_ROOT)))
    assert {p.message for p in problems} == CORPUS_VERDICTS[item], [str(p) for p in problems]


def test_links_in_a_payload(tmp_path):
    link = 0o120777
    inside = odc_entry("./dir", b"", 0o40755) + odc_entry("./dir/a", b"x") + odc_entry("./cur", b"dir", link)
    destination = tmp_path / "ok"
    destination.mkdir()
    extract_cpio(io.BytesIO(inside + odc_entry("TRAILER!!!", b"")), destination, Limits(), "Payload")
    assert os.readlink(destination / "cur") == "dir"
    for name, evil in (("out", odc_entry("./out", b"../../etc", link)), ("through", odc_entry("./cur/../../x", b"x"))):
        target = tmp_path / name
        target.mkdir()
        with pytest.raises(PayloadError, match="outside the archive's root"):
            extract_cpio(io.BytesIO(inside + evil + odc_entry("TRAILER!!!", b"")), target, Limits(), "Payload")
    escape = tmp_path / "via-link"
    escape.mkdir()
    through_link = odc_entry("./up", b"..", link)
    with pytest.raises(PayloadError, match="outside the archive's root"):
        extract_cpio(io.BytesIO(through_link + odc_entry("TRAILER!!!", b"")), escape, Limits(), "Payload")


def test_disk_image_contents_past_the_limit():
    image = corpus_item("dmg/indygreg_apple-platform-rs__example.dmg")
    problems = pf.preflight([image], (), Limits(max_bytes=10_000))
    assert [p.message for p in problems] == [pf.UNREADABLE]
    assert "expands to more than 10000 bytes" in problems[0].detail


def test_object_files_are_not_code(tmp_path, clean_app, anchors):
    """A .o file (MH_OBJECT) left in Resources is Mach-O but never loaded: not reported."""
    app = tmp_path / "MyApp.app"
    shutil.copytree(clean_app, app, symlinks=True)
    source = tmp_path / "x.c"
    source.write_text("int x(void) { return 1; }\n")
    run([str(LLVM / "clang"), "--target=arm64-apple-macos11", "-c", str(source), "-o", str(tmp_path / "x.o")])
    shutil.copyfile(tmp_path / "x.o", app / "Contents" / "Resources" / "x.o")
    problems = pf.preflight([app], anchors)
    # the seal now misses x.o, which the verifier reports; the object file itself is not "unsigned code"
    assert [(p.path.removeprefix(str(app)), p.message) for p in problems] == [("/Contents/MacOS/MyApp", pf.INVALID)]


@pytest.mark.parametrize("timestamped", [True, False])
def test_disk_image_with_a_zipped_app_and_a_tool(tmp_path, fx, clean_app, pki, tsa, anchors, timestamped):
    """A pydmg image (FAT32: no symbolic links, so the app travels as a zip, as many projects ship
    it) with a signed tool beside it, the image itself signed with the Developer ID identity."""
    import pydmg

    from signbridge.apple.dmg.sign import sign_disk_image

    folder = tmp_path / "MyApp"
    folder.mkdir()
    run([require_tool("bsdtar"), "-c", "--format", "zip", "-f", str(folder / "MyApp.zip"), "-C", str(clean_app.parent),
         "MyApp.app"])
    tool = folder / "tool"
    shutil.copyfile(fx.path("exe.arm64"), tool)
    sign(tool, local_identity(pki)[0], tsa)
    image = tmp_path / "MyApp.dmg"
    pydmg.create_dmg(source_dir=folder, output_path=image, volume_label="MyApp", total_sectors=32768)
    options = CodesignOptions(timestamp_url=tsa.url if timestamped else None)
    sign_disk_image(image, local_identity(pki)[0], options)
    expected = [] if timestamped else [("", pf.NO_TIMESTAMP)]
    assert relative(pf.preflight([image], anchors), image) == expected
