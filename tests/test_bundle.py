"""Bundles and their resource seal (CodeResources), on real bundles with real Mach-O code.

Digests are checked with the openssl CLI, CodeResources is read by plistlib and by an independent
defusedxml parser, nested cdhashes are recomputed from LIEF's view of the signature, and the
unreadable-file case runs in a process without the capabilities that let root read anything.
"""

from __future__ import annotations

import base64
import hashlib
import os
import plistlib
import random
import re
import struct
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lief
import pytest
from defusedxml import ElementTree

import machofixtures
from bundlefixtures import APP_ID, FRAMEWORK_ID, adhoc_sign_bundle, build_myapp, slice_cdhash
from conftest import ROOT, require_file, require_tool, run
from machofixtures import MachOFixtures, sign_path
from signbridge.apple.bundle.layout import (
    Bundle,
    BundleError,
    BundleKind,
    BundleLayoutError,
    BundleSymlinkError,
    InfoPlistError,
    NotABundleError,
    UnsealedContentError,
    sign_bundle_plan,
)
from signbridge.apple.bundle.resources.checking import SealProblemKind, verify_code_resources
from signbridge.apple.bundle.resources.hashing import DigestCache, hash_file, hash_files
from signbridge.apple.bundle.resources.rules import ResourceSealError
from signbridge.apple.bundle.resources.writing import (
    NestedCode,
    NestedCodeNotSignedError,
    build_code_resources,
    serialize_code_resources,
)
from signbridge.apple.bundle.staging import staged_bundle
from signbridge.apple.codesig.codedirectory import HashType, hash_code
from signbridge.apple.codesig.embedded_signature import read_signature
from signbridge.apple.macho.parse import parse_file
from signbridge.apple.macho.sign import SigningOptions
from signbridge.atomic import write_atomically
from signbridge.errors import SignatureError

# Apple's default rules for a bundle with a Resources directory, written out from
# reference/apple-signing.md §3.2 (independently of the module's constants).
EXPECTED_RULES = {
    "^version.plist$": True,
    "^Resources/": True,
    r"^Resources/.*\.lproj/": {"optional": True, "weight": 1000.0},
    r"^Resources/Base\.lproj/": {"weight": 1010.0},
    r"^Resources/.*\.lproj/locversion.plist$": {"omit": True, "weight": 1100.0},
}
EXPECTED_RULES2 = {
    "^.*": True,
    "^[^/]+$": {"nested": True, "weight": 10.0},
    "^(Frameworks|SharedFrameworks|PlugIns|Plug-ins|XPCServices|Helpers|MacOS|Library/(Automator|Spotlight"
    "|LoginItems))/": {"nested": True, "weight": 10.0},
    r".*\.dSYM($|/)": {"weight": 11.0},
    r"^(.*/)?\.DS_Store$": {"omit": True, "weight": 2000.0},
    r"^Info\.plist$": {"omit": True, "weight": 20.0},
    r"^version\.plist$": {"weight": 20.0},
    r"^embedded\.provisionprofile$": {"weight": 20.0},
    "^PkgInfo$": {"omit": True, "weight": 20.0},
    "^Resources/": {"weight": 20.0},
    r"^Resources/.*\.lproj/": {"optional": True, "weight": 1000.0},
    r"^Resources/Base\.lproj/": {"weight": 1010.0},
    r"^Resources/.*\.lproj/locversion.plist$": {"omit": True, "weight": 1100.0},
}
APPLE_XML_HEADER = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b'<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">\n'
    b'<plist version="1.0">\n<dict>\n\t<key>files</key>\n'
)


@pytest.fixture(scope="session")
def fx(tmp_path_factory: pytest.TempPathFactory) -> MachOFixtures:
    return machofixtures.get_fixtures(tmp_path_factory)


@pytest.fixture
def app(tmp_path: Path, fx: MachOFixtures) -> Path:
    return build_myapp(tmp_path, fx)


@pytest.fixture
def signed_app(app: Path) -> Path:
    adhoc_sign_bundle(app)
    return app


def seal_problems(bundle: Bundle, stored: bytes, nested_check) -> list[str]:
    """The seal checker's problems as verification prints them."""
    return [str(problem) for problem in verify_code_resources(bundle, stored, nested_check)]


# --- independent views ------------------------------------------------------------------------------


def openssl_digest(path: Path, algorithm: str) -> bytes:
    return run([require_tool("openssl"), "dgst", f"-{algorithm}", "-binary", str(path)]).stdout


def plist_from_xml(element) -> object:
    """A second reader of XML property lists, over defusedxml's ElementTree."""
    tag = element.tag
    if tag == "plist":
        return plist_from_xml(element[0])
    if tag == "dict":
        children = list(element)
        assert all(child.tag == "key" for child in children[::2])
        return {key.text: plist_from_xml(value) for key, value in zip(children[::2], children[1::2], strict=True)}
    if tag == "array":
        return [plist_from_xml(child) for child in element]
    if tag in ("true", "false"):
        return tag == "true"
    if tag == "data":
        return base64.b64decode("".join((element.text or "").split()))
    if tag == "string":
        return element.text or ""
    if tag == "real":
        return float(element.text)
    if tag == "integer":
        return int(element.text)
    raise AssertionError(f"unexpected plist element <{tag}>")


def lief_cdhash(path: Path, cputype: lief.MachO.Header.CPU_TYPE) -> bytes:
    """cdhash of one slice: LIEF extracts the signature, openssl hashes the CodeDirectory blob."""
    fat = lief.MachO.parse(str(path))
    binary = next(fat.at(i) for i in range(fat.size) if fat.at(i).header.cpu_type == cputype)
    superblob = bytes(binary.code_signature.content)
    magic, _, count = struct.unpack_from(">III", superblob)
    assert magic == 0xFADE0CC0
    slots = dict(struct.unpack_from(">II", superblob, 12 + 8 * n) for n in range(count))
    offset = slots[0]
    length = struct.unpack_from(">I", superblob, offset + 4)[0]
    directory = path.parent / "cd.bin"
    directory.write_bytes(superblob[offset : offset + length])
    try:
        return openssl_digest(directory, "sha256")[:20]
    finally:
        directory.unlink()


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root with its type, mode and content (or link target)."""
    state: dict[str, tuple] = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            path = Path(directory, name)
            info = path.lstat()
            if path.is_symlink():
                state[path.relative_to(root).as_posix()] = ("link", os.readlink(path))
            elif path.is_dir():
                state[path.relative_to(root).as_posix()] = ("dir", info.st_mode)
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                state[path.relative_to(root).as_posix()] = ("file", info.st_mode, digest)
    return state


def nested_check(path: Path) -> bytes:
    """What a verifier does for nested code: check every slice's page hashes, return the cdhash."""
    target = Bundle.open(path).executable_path if path.is_dir() else path
    for macho in parse_file(target.read_bytes()).slices:
        signature = read_signature(macho)
        if signature is None:
            raise SignatureError("code object is not signed at all")
        directory = signature.code_directory
        pages = hash_code(macho.data[: directory.code_limit], directory.hash_type, directory.page_size)
        if tuple(pages) != tuple(directory.code_hashes):
            raise SignatureError(f"the {macho.arch} slice's code does not match its page hashes")
    return slice_cdhash(target)


# --- discovery --------------------------------------------------------------------------------------


def test_open_application(app: Path) -> None:
    bundle = Bundle.open(app)
    contents = app / "Contents"
    assert bundle.root == app.resolve()
    assert bundle.kind == BundleKind.APPLICATION
    assert bundle.content_root == contents
    assert bundle.info_plist_path == contents / "Info.plist"
    assert bundle.info_plist["CFBundleExecutable"] == "MyApp"
    assert bundle.identifier == APP_ID
    assert bundle.executable_path == contents / "MacOS" / "MyApp"
    assert bundle.resources_dir == contents / "Resources"
    assert bundle.code_resources_path == contents / "_CodeSignature" / "CodeResources"


def test_open_versioned_framework(app: Path) -> None:
    framework = app / "Contents" / "Frameworks" / "Demo.framework"
    bundle = Bundle.open(framework)
    version = framework / "Versions" / "A"
    assert bundle.kind == BundleKind.FRAMEWORK
    assert bundle.content_root == version
    assert bundle.info_plist_path == version / "Resources" / "Info.plist"
    assert bundle.identifier == FRAMEWORK_ID
    assert bundle.executable_path == version / "Demo"
    assert bundle.code_resources_path == version / "_CodeSignature" / "CodeResources"
    assert os.readlink(framework / "Versions" / "Current") == "A"


def test_binary_info_plist_and_plugin_kind(tmp_path: Path, fx: MachOFixtures) -> None:
    app = build_myapp(tmp_path, fx, extras=True)
    widget = app / "Contents" / "PlugIns" / "Widget.bundle"
    assert (widget / "Contents" / "Info.plist").read_bytes().startswith(b"bplist00")
    bundle = Bundle.open(widget)
    assert bundle.kind == BundleKind.PLUGIN
    assert bundle.identifier == "com.example.Widget"
    assert bundle.executable_path == widget / "Contents" / "MacOS" / "Widget"


def test_nested_code_innermost_first(tmp_path: Path, fx: MachOFixtures) -> None:
    app = build_myapp(tmp_path, fx, extras=True)
    contents = app / "Contents"
    nested = Bundle.open(app).nested()
    assert [item.root if isinstance(item, Bundle) else item for item in nested] == [
        contents / "Frameworks" / "Demo.framework",
        contents / "MacOS" / "helper",
        contents / "PlugIns" / "Widget.bundle",
    ]
    assert isinstance(nested[0], Bundle) and nested[0].kind == BundleKind.FRAMEWORK
    assert isinstance(nested[1], Path)  # an extra Mach-O executable; launch.sh (a script) is no code

    plan = sign_bundle_plan(Bundle.open(app))
    assert plan == [
        contents / "Frameworks" / "Demo.framework",
        contents / "MacOS" / "helper",
        contents / "PlugIns" / "Widget.bundle" / "Contents" / "Frameworks" / "libinner.dylib",
        contents / "PlugIns" / "Widget.bundle",
        app,
    ]
    for position, item in enumerate(plan):
        assert not any(later.is_relative_to(item) for later in plan[position + 1 :] if later != item), (
            f"{item} is listed before code inside it"
        )


# --- CodeResources ----------------------------------------------------------------------------------


def test_code_resources_structure(signed_app: Path) -> None:
    bundle = Bundle.open(signed_app)
    data = bundle.code_resources_path.read_bytes()
    seal = plistlib.loads(data)
    assert seal == plist_from_xml(ElementTree.fromstring(data))
    assert sorted(seal) == ["files", "files2", "rules", "rules2"]
    assert seal["rules"] == EXPECTED_RULES
    assert seal["rules2"] == EXPECTED_RULES2

    # Apple's XML: its header, tab indents, whole-number reals, keys sorted.
    assert data.startswith(APPLE_XML_HEADER) and data.endswith(b"</dict>\n</plist>\n")
    assert b"\t\t\t<real>1000</real>\n" in data and b".0</real>" not in data
    keys = re.findall(rb"\n\t\t<key>(.*?)</key>", data)
    start = keys.index(b"^Resources/")
    assert keys[start : start + 5] == sorted(keys[start : start + 5])

    resources = signed_app / "Contents" / "Resources"
    files, files2 = seal["files"], seal["files2"]
    assert set(files) == {
        "Resources/.DS_Store",  # the v1 rules have no .DS_Store exception
        "Resources/AppIcon.icns",
        "Resources/Base.lproj/Main.strings",
        "Resources/data.txt",
        "Resources/en.lproj/Localizable.strings",
    }
    assert set(files2) == {
        "Frameworks/Demo.framework",
        "Resources/AppIcon.icns",
        "Resources/Base.lproj/Main.strings",
        "Resources/current.txt",
        "Resources/data.txt",
        "Resources/en.lproj/Localizable.strings",
    }
    for name in ("AppIcon.icns", "data.txt", "Base.lproj/Main.strings"):
        path = resources / name
        assert files[f"Resources/{name}"] == openssl_digest(path, "sha1")
        assert files2[f"Resources/{name}"] == {
            "hash": openssl_digest(path, "sha1"),
            "hash2": openssl_digest(path, "sha256"),
        }
    strings = resources / "en.lproj" / "Localizable.strings"
    assert files["Resources/en.lproj/Localizable.strings"] == {
        "hash": openssl_digest(strings, "sha1"),
        "optional": True,
    }
    assert files2["Resources/en.lproj/Localizable.strings"] == {
        "hash": openssl_digest(strings, "sha1"),
        "hash2": openssl_digest(strings, "sha256"),
        "optional": True,
    }
    assert files2["Resources/current.txt"] == {"symlink": "data.txt"}

    framework_exec = signed_app / "Contents" / "Frameworks" / "Demo.framework" / "Versions" / "A" / "Demo"
    cdhash = lief_cdhash(framework_exec, lief.MachO.Header.CPU_TYPE.ARM64)
    assert files2["Frameworks/Demo.framework"] == {
        "cdhash": cdhash,
        "requirement": f'cdhash H"{cdhash.hex()}"',
    }


def test_framework_seal_and_slot_binding(signed_app: Path) -> None:
    framework = Bundle.open(signed_app / "Contents" / "Frameworks" / "Demo.framework")
    seal = plistlib.loads(framework.code_resources_path.read_bytes())
    info = framework.info_plist_path
    assert set(seal["files2"]) == {"Resources/Info.plist", "Resources/notes.txt"}  # not the executable "Demo"
    assert seal["files2"]["Resources/Info.plist"]["hash2"] == openssl_digest(info, "sha256")
    assert seal["rules2"] == EXPECTED_RULES2

    # The engine's part, done here ad hoc: slot 1 = Info.plist, slot 3 = CodeResources.
    app = Bundle.open(signed_app)
    for bundle in (app, framework):
        for macho in parse_file(bundle.executable_path.read_bytes()).slices:
            signature = read_signature(macho)
            assert signature is not None
            slots = signature.code_directory.special_slots
            assert slots[1] == openssl_digest(bundle.info_plist_path, "sha256")
            assert slots[3] == openssl_digest(bundle.code_resources_path, "sha256")


def test_unsigned_nested_code_is_refused(app: Path) -> None:
    with pytest.raises(NestedCodeNotSignedError, match="Contents/Frameworks/Demo.framework"):
        build_code_resources(Bundle.open(app), {})


def test_nested_info_accepts_relative_or_absolute_keys(app: Path) -> None:
    bundle = Bundle.open(app)
    code = NestedCode(bytes(range(20)), 'identifier "com.example.Demo"')
    by_name = build_code_resources(bundle, {"Frameworks/Demo.framework": code})
    by_path = build_code_resources(bundle, {app / "Contents" / "Frameworks" / "Demo.framework": code})
    assert by_name == by_path
    assert plistlib.loads(by_name)["files2"]["Frameworks/Demo.framework"] == {
        "cdhash": code.cdhash,
        "requirement": code.requirement,
    }


def test_sha256_only_seal_writes_hash2_alone(signed_app: Path) -> None:
    bundle = Bundle.open(signed_app)
    stored = plistlib.loads(bundle.code_resources_path.read_bytes())
    nested = {"Frameworks/Demo.framework": NestedCode(**stored["files2"]["Frameworks/Demo.framework"])}
    data = build_code_resources(bundle, nested, hash_types=(HashType.SHA256,))
    seal = plistlib.loads(data)
    data_txt = signed_app / "Contents" / "Resources" / "data.txt"
    assert seal["files2"]["Resources/data.txt"] == {"hash2": openssl_digest(data_txt, "sha256")}
    assert seal["files"]["Resources/data.txt"] == openssl_digest(data_txt, "sha1")
    assert seal_problems(bundle, data, nested_check) == []
    data_txt.write_text("changed\n")
    assert seal_problems(bundle, data, nested_check) == ["file modified: Contents/Resources/data.txt"]


def test_parallel_hashing_of_2000_files_reports_progress(app: Path) -> None:
    many = app / "Contents" / "Resources" / "many"
    many.mkdir()
    for number in range(2000):
        (many / f"f{number:04d}.txt").write_bytes(f"file {number}\n".encode() * (number % 7 + 1))
    bundle = Bundle.open(app)
    calls: list[tuple[int, int]] = []
    code = NestedCode(bytes(20), "always")
    with ThreadPoolExecutor(max_workers=4) as pool:
        data = build_code_resources(
            bundle,
            {"Frameworks/Demo.framework": code},
            executor=pool,
            progress=lambda done, total: calls.append((done, total)),
        )
    total = 2000 + 5  # four sealed resources, plus .DS_Store which only the v1 rules seal
    assert calls[0] == (0, calls[0][1]) and calls[-1] == (calls[0][1], calls[0][1])
    assert calls[0][1] == total
    assert [done for done, _ in calls] == list(range(total + 1))
    files2 = plistlib.loads(data)["files2"]
    for number in range(2000):
        content = (many / f"f{number:04d}.txt").read_bytes()
        assert files2[f"Resources/many/f{number:04d}.txt"]["hash2"] == hashlib.sha256(content).digest()
    for number in (0, 1234, 1999):
        path = many / f"f{number:04d}.txt"
        assert files2[f"Resources/many/f{number:04d}.txt"]["hash"] == openssl_digest(path, "sha1")


# --- verification -----------------------------------------------------------------------------------


def test_intact_bundle_verifies(signed_app: Path) -> None:
    bundle = Bundle.open(signed_app)
    stored = bundle.code_resources_path.read_bytes()
    assert seal_problems(bundle, stored, nested_check) == []
    # optional (localized) resources may go missing
    (signed_app / "Contents" / "Resources" / "en.lproj" / "Localizable.strings").unlink()
    assert seal_problems(bundle, stored, nested_check) == []


def test_verification_names_each_changed_resource(signed_app: Path) -> None:
    bundle = Bundle.open(signed_app)
    stored = bundle.code_resources_path.read_bytes()
    resources = signed_app / "Contents" / "Resources"
    with open(resources / "data.txt", "ab") as stream:
        stream.write(b"!")
    (resources / "added.txt").write_text("not sealed\n")
    (resources / "AppIcon.icns").unlink()
    (resources / "current.txt").unlink()
    os.symlink("Base.lproj/Main.strings", resources / "current.txt")
    (resources / "en.lproj" / "locversion.plist").write_text("omitted: changes do not matter\n")
    (resources / ".DS_Store").write_bytes(b"omitted from rules2 too")
    assert seal_problems(bundle, stored, nested_check) == [
        "file missing: Contents/Resources/AppIcon.icns",
        "file added: Contents/Resources/added.txt",
        "file modified: Contents/Resources/current.txt",
        "file modified: Contents/Resources/data.txt",
    ]


def test_verification_detects_a_resigned_nested_framework(signed_app: Path) -> None:
    app = Bundle.open(signed_app)
    stored = app.code_resources_path.read_bytes()
    framework = Bundle.open(signed_app / "Contents" / "Frameworks" / "Demo.framework")
    options = SigningOptions(
        identifier="com.example.Other",
        info_plist=framework.info_plist_path.read_bytes(),
        code_resources=framework.code_resources_path.read_bytes(),
    )
    sign_path(framework.executable_path, options)
    assert seal_problems(app, stored, nested_check) == [
        "nested code modified: Contents/Frameworks/Demo.framework"
    ]


def test_verification_detects_a_changed_byte_in_nested_code(signed_app: Path) -> None:
    app = Bundle.open(signed_app)
    stored = app.code_resources_path.read_bytes()
    executable = signed_app / "Contents" / "Frameworks" / "Demo.framework" / "Versions" / "A" / "Demo"
    parsed = parse_file(executable.read_bytes())
    assert parsed.fat_arches is not None
    text = parsed.slices[1].section("__TEXT", "__text")
    assert text is not None
    data = bytearray(executable.read_bytes())
    data[parsed.fat_arches[1].offset + text.offset] ^= 0xFF
    executable.write_bytes(bytes(data))
    problems = verify_code_resources(app, stored, nested_check)
    assert len(problems) == 1
    assert (problems[0].kind, problems[0].path) == (SealProblemKind.NESTED_INVALID, "Contents/Frameworks/Demo.framework")
    assert str(problems[0]).startswith("nested code invalid: Contents/Frameworks/Demo.framework: ")
    assert "page hashes" in problems[0].detail


def test_verification_of_a_version_1_seal(signed_app: Path) -> None:
    bundle = Bundle.open(signed_app)
    seal = plistlib.loads(bundle.code_resources_path.read_bytes())
    v1 = serialize_code_resources({"files": seal["files"], "rules": seal["rules"]})
    assert seal_problems(bundle, v1, nested_check) == []
    (signed_app / "Contents" / "Resources" / "data.txt").write_text("changed\n")
    assert seal_problems(bundle, v1, nested_check) == ["file modified: Contents/Resources/data.txt"]


def test_corrupt_seal_is_a_specific_error(signed_app: Path) -> None:
    bundle = Bundle.open(signed_app)
    with pytest.raises(ResourceSealError, match="sealed resource directory .* not a valid property list"):
        verify_code_resources(bundle, b"<plist><dict><key>files2</key>", nested_check)
    with pytest.raises(ResourceSealError, match="has no rules2 and files2"):
        verify_code_resources(bundle, serialize_code_resources({"files2": {}}), nested_check)


# --- bad bundles ------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["/etc/passwd", "../../../outside.txt", "../../Contents/../../x"])
def test_symlink_outside_the_bundle_is_refused(app: Path, target: str) -> None:
    link = app / "Contents" / "Resources" / "escape"
    os.symlink(target, link)
    before = snapshot(app)
    with pytest.raises(BundleSymlinkError, match=r"Contents/Resources/escape -> .*outside the bundle"):
        Bundle.open(app)
    with pytest.raises(BundleSymlinkError), staged_bundle(app):
        pytest.fail("staging must not start")
    assert snapshot(app) == before
    assert sorted(os.listdir(app.parent)) == ["MyApp.app"]


def test_symlink_inside_the_bundle_is_fine(app: Path) -> None:
    os.symlink("../Resources/data.txt", app / "Contents" / "Resources" / "en.lproj" / "data.txt")
    assert Bundle.open(app).identifier == APP_ID


UNREADABLE_SCRIPT = """
import sys
from pathlib import Path
from signbridge.apple.bundle.layout import Bundle
from signbridge.apple.bundle.resources.hashing import hash_file
from signbridge.apple.bundle.resources.rules import UnreadableFileError
from signbridge.apple.bundle.resources.writing import DEFAULT_HASH_TYPES
app, victim = Path(sys.argv[1]), Path(sys.argv[2])
try:
    Bundle.open(app)
except UnreadableFileError as error:
    print("open:", error)
if victim.is_file():
    try:
        hash_file(victim, DEFAULT_HASH_TYPES)
    except UnreadableFileError as error:
        print("hash:", error)
"""


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_unreadable_content_is_refused(app: Path, kind: str) -> None:
    if kind == "file":
        victim = app / "Contents" / "Resources" / "data.txt"
    else:
        victim = app / "Contents" / "Resources" / "en.lproj"
    os.chmod(victim, 0)
    before = snapshot(app)
    command = [sys.executable, "-c", UNREADABLE_SCRIPT, str(app), str(victim)]
    if os.geteuid() == 0:  # root reads anything: run without the capabilities that allow it
        setpriv = require_tool("setpriv")
        command = [setpriv, "--bounding-set", "-dac_override,-dac_read_search", *command]
    environment = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    output = run(command, env=environment, text=True).stdout.splitlines()
    os.chmod(victim, 0o755)
    if kind == "file":
        assert output == [
            "open: cannot read Contents/Resources/data.txt: Permission denied",
            f"hash: cannot read {victim}: Permission denied",
        ]
    else:
        assert output == ["open: cannot read directory Contents/Resources/en.lproj: Permission denied"]
    after = snapshot(app)
    assert after.keys() == before.keys()


def test_unsealed_content_in_the_bundle_root(app: Path) -> None:
    (app / "README.txt").write_text("outside Contents\n")
    with pytest.raises(UnsealedContentError, match="bundle root: README.txt"):
        Bundle.open(app)
    (app / "README.txt").unlink()
    (app / ".DS_Store").write_bytes(b"tolerated")
    assert Bundle.open(app).kind == BundleKind.APPLICATION


def test_unsealed_content_in_a_framework_root(app: Path) -> None:
    framework = app / "Contents" / "Frameworks" / "Demo.framework"
    (framework / "Headers.txt").write_text("a file beside Versions\n")
    with pytest.raises(UnsealedContentError, match="embedded framework: Headers.txt"):
        Bundle.open(framework)
    (framework / "Headers.txt").unlink()
    os.symlink("Versions/A/Resources/notes.txt", framework / "Wrong")
    with pytest.raises(UnsealedContentError, match="embedded framework: Wrong"):
        Bundle.open(framework)


def test_layout_errors(tmp_path: Path, app: Path) -> None:
    with pytest.raises(NotABundleError, match="no such file"):
        Bundle.open(tmp_path / "Missing.app")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    with pytest.raises(NotABundleError, match="not a directory"):
        Bundle.open(plain)
    shallow = tmp_path / "Shallow.app"
    shallow.mkdir()
    (shallow / "Info.plist").write_bytes(plistlib.dumps({"CFBundleExecutable": "Shallow"}))
    with pytest.raises(BundleLayoutError, match="main executable Shallow .CFBundleExecutable. is missing"):
        Bundle.open(shallow)
    with pytest.raises(NotABundleError, match="no Info.plist, Contents/ or Versions/"):
        Bundle.open(app / "Contents" / "Resources")

    info = app / "Contents" / "Info.plist"
    original = info.read_bytes()
    info.write_bytes(original[:-20])
    with pytest.raises(InfoPlistError, match="Contents/Info.plist is not a valid property list"):
        Bundle.open(app)
    info.write_bytes(plistlib.dumps(["not", "a", "dict"]))
    with pytest.raises(InfoPlistError, match="not a dictionary"):
        Bundle.open(app)
    info.write_bytes(plistlib.dumps({"CFBundleIdentifier": APP_ID, "CFBundleExecutable": "../x"}))
    with pytest.raises(BundleLayoutError, match="invalid main executable"):
        Bundle.open(app)
    info.write_bytes(plistlib.dumps({"CFBundleIdentifier": APP_ID}))
    assert Bundle.open(app).executable_path is None
    info.write_bytes(original)
    fifo = app / "Contents" / "Resources" / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(BundleError, match="Contents/Resources/pipe is not a regular file"):
        Bundle.open(app)
    fifo.unlink()
    (app / "Contents" / "MacOS" / "MyApp").unlink()
    with pytest.raises(BundleLayoutError, match="Contents/MacOS/MyApp"):
        Bundle.open(app)

    framework = app / "Contents" / "Frameworks" / "Demo.framework"
    (framework / "Versions" / "Current").unlink()
    os.symlink("/tmp", framework / "Versions" / "Current")
    with pytest.raises(BundleLayoutError, match="Versions/Current must point to a version"):
        Bundle.open(framework)


# --- writing safely ---------------------------------------------------------------------------------


def test_write_atomically(tmp_path: Path) -> None:
    target = tmp_path / "_CodeSignature" / "CodeResources"
    write_atomically(target, b"first", fsync=True, make_parents=True)
    write_atomically(target, b"second", fsync=True, make_parents=True)
    assert target.read_bytes() == b"second"
    assert target.stat().st_mode & 0o777 == 0o644
    with pytest.raises(TypeError):
        write_atomically(target, "not bytes", fsync=True, make_parents=True)  # type: ignore[arg-type]
    assert target.read_bytes() == b"second"
    assert os.listdir(target.parent) == ["CodeResources"]


def test_staged_bundle_leaves_the_original_untouched_on_failure(app: Path) -> None:
    before = snapshot(app)
    executable = Path("Contents", "MacOS", "MyApp")
    with pytest.raises(RuntimeError, match="signing failed"), staged_bundle(app) as work:
        assert work != app and snapshot(work) == before
        # Staging copies no file data: each staged file is the original's file, linked.
        assert (work / executable).stat().st_ino == (app / executable).stat().st_ino
        write_atomically(work / executable, b"half-written", mode=0o755, fsync=True, make_parents=True)
        (work / "Contents" / "Resources" / "new.txt").write_text("new\n")
        (work / "Contents" / "Info.plist").unlink()
        raise RuntimeError("signing failed")
    assert snapshot(app) == before
    assert (app / executable).stat().st_nlink == 1
    assert sorted(os.listdir(app.parent)) == ["MyApp.app"]


def test_staged_bundle_swaps_atomically_on_success(app: Path) -> None:
    before = snapshot(app)
    info = app / "Contents" / "Info.plist"
    info_inode = info.stat().st_ino
    misses = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal misses
        while not stop.is_set():
            try:
                info.stat()
            except FileNotFoundError:
                misses += 1

    with staged_bundle(app) as work:
        staged_inode = work.stat().st_ino
        write_atomically(work / "Contents" / "_CodeSignature" / "CodeResources", b"sealed", fsync=True, make_parents=True)
        watcher = threading.Thread(target=watch)
        watcher.start()
    stop.set()
    watcher.join()

    assert misses == 0
    assert app.stat().st_ino == staged_inode
    assert info.stat().st_ino == info_inode and info.stat().st_nlink == 1  # the same file, not a copy
    after = snapshot(app)
    assert after.pop("Contents/_CodeSignature/CodeResources")[0] == "file"
    assert after.pop("Contents/_CodeSignature")[0] == "dir"
    assert after == before  # modes, symlinks and contents carried over
    assert sorted(os.listdir(app.parent)) == ["MyApp.app"]


def test_staged_signing_end_to_end(app: Path) -> None:
    with staged_bundle(app) as work:
        adhoc_sign_bundle(work)
    bundle = Bundle.open(app)
    assert seal_problems(bundle, bundle.code_resources_path.read_bytes(), nested_check) == []
    objdump = require_file(str(machofixtures.LLVM / "llvm-objdump"), "llvm-14")
    headers = run([objdump, "--macho", "--private-headers", "--arch=arm64", str(bundle.executable_path)]).stdout
    assert b"LC_CODE_SIGNATURE" in headers


def test_code_resources_are_serialized_as_plistlib_writes_them() -> None:
    """The seal's own XML writer gives plistlib's bytes (sorted keys, tab indents, base64 lines as
    wide as the nesting allows) with whole reals written without ``.0``, for every kind of value,
    at every depth, including strings that need escaping."""
    generator = random.Random(20261203)

    def value(depth: int) -> object:
        kind = generator.randrange(8 if depth < 9 else 5)
        if kind == 0:
            return "".join(generator.choice("ab<>&\r\n\tz é€/") for _ in range(generator.randrange(12)))
        if kind == 1:
            return generator.choice([True, False, 0, -(1 << 63), (1 << 64) - 1, 1.0, -3.0, 0.5, 1e20])
        if kind in (2, 3):
            return generator.randbytes(generator.choice([0, 1, 20, 32, 39, 42, 45, 57, 60, 200]))
        if kind == 4:
            return {}
        if kind in (5, 6):
            keys = ["".join(generator.choice("ab/._<") for _ in range(generator.randrange(1, 8))) for _ in range(5)]
            return {key: value(depth + 1) for key in keys}
        return [value(depth + 1) for _ in range(generator.randrange(4))]

    for _ in range(2000):
        plist = {f"key{n}": value(0) for n in range(generator.randrange(5))}
        expected = plistlib.dumps(plist, fmt=plistlib.FMT_XML, sort_keys=True)
        expected = re.sub(rb"<real>(-?\d+)\.0</real>", rb"<real>\1</real>", expected)
        assert serialize_code_resources(plist) == expected
    with pytest.raises(ValueError, match="control characters"):
        serialize_code_resources({"files": {"a\x01b": b""}})


def test_digests_hashed_ahead_are_taken_only_for_the_file_that_was_hashed(tmp_path: Path) -> None:
    files = [tmp_path / f"file{n}.bin" for n in range(8)]
    generator = random.Random(8)
    for path in files:
        path.write_bytes(generator.randbytes(generator.randrange(1, 3 << 20)))
    types = (HashType.SHA1, HashType.SHA256)
    cache = DigestCache()
    cache.start(files, types)
    cache.finish(stop=False)
    write_atomically(files[1], b"signed since", mode=0o644, fsync=True, make_parents=True)  # replaced: a new inode
    with files[2].open("ab") as stream:  # written into: new size and times
        stream.write(b"more")
    files[3].unlink()
    os.link(files[4], tmp_path / "another name")  # a new link changes the change time

    assert cache.take(files[0], (HashType.SHA512,)) is None  # not computed ahead
    assert cache.take(files[0], types) is None  # taken once only
    for path in files[1:5]:
        assert cache.take(path, types) is None
    assert cache.take(files[5], types) == hash_file(files[5], types)

    cache = DigestCache()
    cache.start(files[:3] + files[4:], types)
    cache.finish(stop=False)
    files[6].write_bytes(b"rewritten in place")
    digests = hash_files([*files[:3], *files[4:]], types, cache=cache)
    for path in [*files[:3], *files[4:]]:
        expected = {hash_type: hashlib.new(hash_type.hashlib_name, path.read_bytes()).digest() for hash_type in types}
        assert digests[path] == expected
