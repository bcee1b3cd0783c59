"""Fuzz harnesses for the bundle formats (tests/fuzzkit.py): Info.plist, CodeResources (reading the
seal and evaluating its rules), entitlements (XML and DER), requirements (compiled blobs and the
text language) and whole bundles (one file of a signed bundle mutated, then ``codesign --verify
--deep``, ``-dvvv`` and an ad hoc ``--deep`` signature through the library).

Seeds are the fixtures the tests build and the real artifacts of the corpus. Every harness runs
``SIGNBRIDGE_FUZZ_CASES`` inputs (10,000 in CI) and may only succeed or raise a SignbridgeError,
within the fuzz kit's time bound. Inputs that once failed are replayed deterministically in
tests/test_hostile_bundle.py.
"""

from __future__ import annotations

import contextlib
import os
import plistlib
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import machofixtures
from bundlefixtures import (
    APP_INFO,
    FRAMEWORK_INFO,
    WIDGET_INFO,
    adhoc_sign_bundle,
    build_myapp,
    build_resource_bundle,
)
from corpuskit import corpus_item
from fuzzkit import FUZZ_CASES, fuzz, read_seeds
from signbridge.apple import codesign as cs
from signbridge.apple import display
from signbridge.apple.bundle.layout import Bundle, InfoPlistError
from signbridge.apple.bundle.resources.rules import RuleSet, seal_exclusions
from signbridge.apple.bundle.resources.seal import read_code_resources
from signbridge.apple.codesig import cms
from signbridge.apple.codesig.embedded_signature import EmbeddedSignature, read_signature
from signbridge.apple.codesig.entitlements import (
    decode_der,
    encode_der,
    entitlements_xml,
    exec_segment_flags,
    load_entitlements,
    signature_entitlements,
)
from signbridge.apple.codesig.options import CodesignOptions, bundle_identifier
from signbridge.apple.codesig.requirements.binary import (
    RequirementType,
    encode_requirement,
    encode_requirement_set,
    parse_requirement,
    parse_requirement_set,
)
from signbridge.apple.codesig.requirements.evaluation import RequirementContext, evaluate
from signbridge.apple.codesig.requirements.text import parse_requirement_text, render
from signbridge.apple.codesig.verdicts import VerifyOptions
from signbridge.apple.macho.parse import parse_file
from signbridge.apple.plist import load_plist_dict
from signbridge.apple.verify_code import verify_code
from signbridge.errors import SignbridgeError

pytestmark = pytest.mark.fuzz

IPA = "bundles/fastlane_fastlane__very-capable-app.ipa"

# Paths a seal's rules are asked about: Apple's layout, and the name that made backtracking
# engines take 45 s on "^Resources/(a+)+$".
RULE_PATHS = (
    "Resources/en.lproj/Localizable.strings",
    "Resources/en.lproj/locversion.plist",
    "Resources/Base.lproj/Main.strings",
    "Resources/.DS_Store",
    "Frameworks/Demo.framework",
    "MacOS/helper",
    "Info.plist",
    "PkgInfo",
    "embedded.provisionprofile",
    "Symbols.dSYM/Contents/Info.plist",
    "Resources/" + "a" * 30 + "!",
    "caf\u00e9/\udcff-not-utf8",
)


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory):
    return machofixtures.get_fixtures(tmp_path_factory)


# --- seeds ------------------------------------------------------------------------------------------


def corpus_bundle_files(name: str) -> list[Path]:
    """Files called ``name`` anywhere in the corpus bundles."""
    return sorted(path for path in corpus_item("bundles").rglob(name) if path.is_file())


def ipa_members(suffix: str) -> list[bytes]:
    with zipfile.ZipFile(corpus_item(IPA)) as archive:
        return [archive.read(name) for name in archive.namelist() if name.endswith(suffix)]


def corpus_signatures() -> list[EmbeddedSignature]:
    """Every embedded signature of every Mach-O slice in the corpus bundles and Mach-O files."""
    candidates = [*corpus_item("macho").iterdir(), *corpus_item("bundles").rglob("*")]
    blobs = [path.read_bytes() for path in candidates if path.is_file() and path.stat().st_size < 4 << 20]
    blobs += ipa_members("/very-capable-app")
    signatures = []
    for data in blobs:
        if data[:4] not in (b"\xca\xfe\xba\xbe", b"\xcf\xfa\xed\xfe", b"\xce\xfa\xed\xfe"):
            continue
        for macho in parse_file(data).slices:
            signature = read_signature(macho)
            if signature is not None:
                signatures.append(signature)
    assert len(signatures) >= 10, "the corpus should hold signed Mach-O code"
    return signatures


@pytest.fixture(scope="module")
def signatures() -> list[EmbeddedSignature]:
    return corpus_signatures()


def payloads(blobs: list[bytes | None]) -> list[bytes]:
    """The payloads of generic blobs (magic, length, payload), without duplicates."""
    return list(dict.fromkeys(blob[8:] for blob in blobs if blob))


# --- Info.plist -------------------------------------------------------------------------------------


def test_fuzz_info_plist(tmp_path: Path) -> None:
    seeds = read_seeds(corpus_bundle_files("Info.plist")) + ipa_members("/Info.plist")
    for info in (APP_INFO, FRAMEWORK_INFO, WIDGET_INFO):
        seeds += [plistlib.dumps(info), plistlib.dumps(info, fmt=plistlib.FMT_BINARY)]
    bundle = tmp_path / "Plain.bundle"
    (bundle / "Contents" / "Resources").mkdir(parents=True)

    def target(data: bytes) -> None:
        info = load_plist_dict(data, "Info.plist", InfoPlistError)
        (bundle / "Contents" / "Info.plist").write_bytes(data)
        opened = Bundle.open(bundle)
        assert opened.info_plist == info
        assert bundle_identifier(data) == opened.identifier

    assert fuzz("info-plist", seeds, target) == FUZZ_CASES


# --- CodeResources ----------------------------------------------------------------------------------


def test_fuzz_code_resources(fx, tmp_path: Path) -> None:
    app = build_myapp(tmp_path, fx)
    adhoc_sign_bundle(app)
    seeds = read_seeds([*corpus_bundle_files("CodeResources"), *app.rglob("CodeResources")])
    seeds += ipa_members("/CodeResources")
    content_root = Path("/nonexistent/Contents")
    exclusions = seal_exclusions(content_root, content_root / "MacOS" / "MyApp")

    def target(data: bytes) -> None:
        seal = read_code_resources(data)
        rules = RuleSet.from_plist(seal.rules, exclusions)
        for path in RULE_PATHS:
            rule = rules.find(path)
            assert rule is None or rule in rules.rules
        shown = display.resource_seal(data)
        assert shown is not None and (shown.rules, shown.files) == (len(seal.rules), len(seal.files))

    assert fuzz("code-resources", seeds, target) == FUZZ_CASES


# --- entitlements -----------------------------------------------------------------------------------

SAMPLE_ENTITLEMENTS = {
    "com.apple.security.app-sandbox": True,
    "com.apple.security.application-groups": ["G43BCU2T37.org.example"],
    "com.apple.developer.team-identifier": "G43BCU2T37",
    "get-task-allow": False,
    "com.apple.developer.driverkit.transport.hid": True,
    "nested": {"depth": {"count": 3}},
}


def xml_normalized(value: object) -> object:
    """What a value reads back as after XML: line ends in strings and keys become newlines."""
    if isinstance(value, str):
        return value.replace("\r\n", "\n").replace("\r", "\n")
    if isinstance(value, dict):
        return {xml_normalized(key): xml_normalized(item) for key, item in value.items()}
    if isinstance(value, list):
        return [xml_normalized(item) for item in value]
    return value


def test_fuzz_entitlements_xml(signatures: list[EmbeddedSignature]) -> None:
    seeds = payloads([signature.entitlements for signature in signatures])
    seeds += [plistlib.dumps(SAMPLE_ENTITLEMENTS), plistlib.dumps(SAMPLE_ENTITLEMENTS, fmt=plistlib.FMT_BINARY)]
    assert len(seeds) >= 4

    def target(data: bytes) -> None:
        value = load_entitlements(data)
        exec_segment_flags(value)
        display.entitlements_text(value)
        assert load_entitlements(entitlements_xml(data)) == xml_normalized(value)
        assert decode_der(encode_der(value)) == value  # raises EntitlementsError for reals, dates, data

    assert fuzz("entitlements-xml", seeds, target) == FUZZ_CASES


def test_fuzz_entitlements_der(signatures: list[EmbeddedSignature]) -> None:
    seeds = payloads([signature.der_entitlements for signature in signatures]) + [encode_der(SAMPLE_ENTITLEMENTS)]
    assert len(seeds) >= 3

    def target(data: bytes) -> None:
        value = decode_der(data)
        display.entitlements_text(value)
        assert decode_der(encode_der(value)) == value

    assert fuzz("entitlements-der", seeds, target) == FUZZ_CASES


# --- requirements -----------------------------------------------------------------------------------


def requirement_context(signatures: list[EmbeddedSignature]) -> RequirementContext:
    """A context with a real Developer ID chain from the corpus, an Info.plist and entitlements."""
    parsed = next(cms.parse_signed_data(s.cms) for s in signatures if s.cms and len(s.cms) > 100)
    return RequirementContext(
        identifier="org.pqrs.Karabiner-VirtualHIDDevice-Manager",
        certificates=(parsed.signer_certificate, *parsed.chain),
        info={"CFBundleIdentifier": "org.pqrs.Karabiner-VirtualHIDDevice-Manager", "CFBundleVersion": "2.4.0"},
        entitlements=SAMPLE_ENTITLEMENTS,
        cdhashes=frozenset({bytes(20)}),
    )


DEVELOPER_ID_TEXT = (
    'identifier "com.example.MyApp" and anchor apple generic and '
    "certificate 1[field.1.2.840.113635.100.6.2.6] /* exists */ and "
    "certificate leaf[field.1.2.840.113635.100.6.1.13] /* exists */ and certificate leaf[subject.OU] = G43BCU2T37"
)
TEXT_SEEDS = [
    'identifier "com.example.MyApp" and anchor apple generic and certificate leaf[subject.OU] = "G43BCU2T37"',
    'designated => anchor apple generic and certificate 1[field.1.2.840.113635.100.6.2.6] /* exists */ and '
    'certificate leaf[field.1.2.840.113635.100.6.1.13] exists',
    'cdhash H"0000000000000000000000000000000000000000" or !(info[CFBundleVersion] >= "2" and entitlement["get-task-allow"] exists)',
    'anchor trusted and certificate root = H"611e5b662c593a08ff58d14ae22452d198df6c60" and platform = 2',
    'identifier com.example.MyApp and (certificate leaf[subject.CN] = *Takayama* or not notarized)',
]


def test_fuzz_requirement_blob(signatures: list[EmbeddedSignature]) -> None:
    seeds = list(dict.fromkeys(signature.requirements for signature in signatures if signature.requirements))
    seeds.append(encode_requirement_set({RequirementType.DESIGNATED: parse_requirement_text(DEVELOPER_ID_TEXT)}))
    seeds += [encode_requirement(parse_requirement_text(text)) for text in TEXT_SEEDS]
    context = requirement_context(signatures)

    def target(data: bytes) -> None:
        blobs = parse_requirement_set(data) if data[:4] == b"\xfa\xde\x0c\x01" else {0: parse_requirement(data)}
        for expr in blobs.values():
            assert isinstance(evaluate(expr, context), bool)
            assert render(expr)

    assert fuzz("requirement-blob", seeds, target) == FUZZ_CASES


def test_fuzz_requirement_text(signatures: list[EmbeddedSignature]) -> None:
    rendered = [render(expr) for s in signatures if s.requirements for expr in parse_requirement_set(s.requirements).values()]
    seeds = [text.encode() for text in dict.fromkeys([*rendered, *TEXT_SEEDS])]
    context = requirement_context(signatures)

    def target(data: bytes) -> None:
        expr = parse_requirement_text(data.decode(errors="replace"))
        assert isinstance(evaluate(expr, context), bool)
        assert parse_requirement(encode_requirement(expr)) == expr
        assert render(expr)

    assert fuzz("requirement-text", seeds, target) == FUZZ_CASES


# --- whole bundles ----------------------------------------------------------------------------------

# The files of the template bundles a case may replace; the first byte of an input picks one.
# Signing reads Info.plist files and existing signatures, never the stored seals it replaces, so
# only cases that mutate what it reads are signed.
APP_TARGETS = (
    "Contents/_CodeSignature/CodeResources",
    "Contents/Info.plist",
    "Contents/Frameworks/Tiny.framework/Versions/A/_CodeSignature/CodeResources",
    "Contents/Frameworks/Tiny.framework/Versions/A/Resources/Info.plist",
)
DETACHED_TARGETS = (
    "Contents/_CodeSignature/CodeDirectory",
    "Contents/_CodeSignature/CodeSignature",
    "Contents/_CodeSignature/CodeRequirements",
    "Contents/_CodeSignature/CodeResources",
    "Contents/Info.plist",
)
READ_BY_SIGNING = ("Info.plist", "CodeDirectory", "CodeSignature", "CodeRequirements")

# One pool for every case, as the command line keeps one for all its paths.
_POOL = ThreadPoolExecutor(max_workers=2)


def build_tiny_app(directory: Path, fx) -> Path:
    """Tiny.app: thin arm64 code, resources, a localization and a versioned framework (nested code)."""
    app = directory / "Tiny.app"
    contents = app / "Contents"
    (contents / "MacOS").mkdir(parents=True)
    (contents / "Resources" / "en.lproj").mkdir(parents=True)
    (contents / "Info.plist").write_bytes(plistlib.dumps({**APP_INFO, "CFBundleExecutable": "Tiny"}))
    shutil.copy(fx.path("exe.arm64"), contents / "MacOS" / "Tiny")
    (contents / "Resources" / "data.txt").write_text("sealed resource\n")
    (contents / "Resources" / "en.lproj" / "Localizable.strings").write_text('"a" = "b";\n')
    version = contents / "Frameworks" / "Tiny.framework" / "Versions" / "A"
    (version / "Resources").mkdir(parents=True)
    shutil.copy(fx.path("libdemo.arm64.dylib"), version / "Tiny")
    (version / "Resources" / "Info.plist").write_bytes(plistlib.dumps({**FRAMEWORK_INFO, "CFBundleExecutable": "Tiny"}))
    os.symlink("A", version.parent / "Current")
    os.symlink("Versions/Current/Tiny", version.parent.parent / "Tiny")
    os.symlink("Versions/Current/Resources", version.parent.parent / "Resources")
    adhoc_sign_bundle(app)
    return app




@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    """A private directory, in memory where the system offers it."""
    memory = Path("/dev/shm")
    directory = Path(tempfile.mkdtemp(prefix="fuzz-bundle-", dir=memory if memory.is_dir() else None))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def bundle_target(template: Path, targets: tuple[str, ...], directory: Path) -> Callable[[bytes], None]:
    """A working copy of ``template`` in ``directory``; each case replaces the file the input's first
    byte picks with the rest of the input, verifies (--deep --strict), displays (-dvvv, -r-,
    --entitlements) and, when the file is one signing reads, signs ad hoc (--deep -f) and verifies
    again. The working copy is restored after each case."""
    work = directory / template.name
    shutil.copytree(template, work, symlinks=True)

    def target(data: bytes) -> None:
        relative = targets[data[0] % len(targets)] if data else targets[0]
        (work / relative).write_bytes(data[1:])
        signed = False
        try:
            verified, displayed = _attempt(_verify, work), _attempt(_display, work)
            assert verified is not None or displayed is None, f"valid code that cannot be displayed: {displayed}"
            if relative.endswith(READ_BY_SIGNING):
                signed = True
                if _attempt(_sign, work) is None:
                    assert _attempt(_verify, work) is None, "a bundle signed ad hoc does not verify"
        finally:
            if signed:
                shutil.rmtree(work)
                shutil.copytree(template, work, symlinks=True)
            else:
                (work / relative).write_bytes((template / relative).read_bytes())

    return target


def _attempt(step: Callable[[Path], object], path: Path) -> SignbridgeError | None:
    try:
        step(path)
    except SignbridgeError as error:
        return error
    return None


def _verify(path: Path) -> None:
    verify_code(path, VerifyOptions(deep=True, strict=True), executor=_POOL)


def _display(path: Path) -> None:
    info = display.signing_information(path)
    display.display_lines(info, 3)
    display.requirement_lines(info, display.implicit_designated(info))
    signature_entitlements(info.signature)


def _sign(path: Path) -> None:
    cs.sign_code(path, None, CodesignOptions(force=True, deep=True), executor=_POOL)


def seeds_for(template: Path, targets: tuple[str, ...]) -> list[bytes]:
    return [bytes([index]) + (template / relative).read_bytes() for index, relative in enumerate(targets)]


def test_fuzz_whole_app(fx, tmp_path: Path) -> None:
    app = build_tiny_app(tmp_path, fx)
    assert _attempt(_verify, app) is None
    seeds = seeds_for(app, APP_TARGETS)
    with scratch() as directory:
        target = bundle_target(app, APP_TARGETS, directory)
        assert fuzz("whole-app", seeds, target) == FUZZ_CASES


def test_fuzz_whole_detached_bundle(tmp_path: Path) -> None:
    bundle = build_resource_bundle(tmp_path)
    cs.sign_code(bundle, None, CodesignOptions())
    assert _attempt(_verify, bundle) is None
    seeds = seeds_for(bundle, DETACHED_TARGETS)
    with scratch() as directory:
        target = bundle_target(bundle, DETACHED_TARGETS, directory)
        assert fuzz("whole-detached", seeds, target) == FUZZ_CASES

