"""Hostile bundle input: every failure an outside fuzzer or tests/test_fuzz_bundle.py found, replayed
deterministically on bundles the tests build (tests/bundlefixtures.py) and sign ad hoc.

Each case must end in a specific SignbridgeError with a message for the terminal and codesign's
exit code (1), never a traceback; the seal rule that made a backtracking engine hang must complete
and give the verdict the bundle deserves.
"""

from __future__ import annotations

import plistlib
import shutil
from pathlib import Path

import pytest

import machofixtures
from bundlefixtures import adhoc_sign_bundle, build_myapp
from codesignkit import codesign
from machofixtures import sign_path
from signbridge.apple import codesign as cs
from signbridge.apple import display
from signbridge.apple.bundle.layout import (
    MAX_NESTING,
    Bundle,
    BundleLayoutError,
    InfoPlistError,
    sign_bundle_plan,
)
from signbridge.apple.bundle.resources.rules import MAX_RULES, ResourceSealError, RuleSet
from signbridge.apple.bundle.resources.seal import read_code_resources
from signbridge.apple.codesig.blobs import CodeSignatureFormatError
from signbridge.apple.codesig.entitlements import (
    EntitlementsError,
    decode_der,
    entitlements_xml,
    load_entitlements,
)
from signbridge.apple.codesig.options import CodesignOptions
from signbridge.apple.codesig.requirements.binary import (
    MAX_EXPRESSION_DEPTH,
    encode_requirement,
    parse_requirement,
)
from signbridge.apple.codesig.requirements.evaluation import RequirementContext, evaluate
from signbridge.apple.codesig.requirements.text import RequirementSyntaxError, parse_requirement_text
from signbridge.apple.codesig.verdicts import VerifyOptions
from signbridge.apple.codesig.verification import (
    BAD_BUNDLE,
    RESOURCE_DIRECTORY_FAILED,
    CodeVerificationError,
    NotSignedError,
)
from signbridge.apple.macho.sign import SigningOptions
from signbridge.apple.plist import MAX_DEPTH, PlistError, load_plist
from signbridge.apple.verify_code import verify_code

DEEP = VerifyOptions(deep=True, strict=True)


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory):
    return machofixtures.get_fixtures(tmp_path_factory)


@pytest.fixture(scope="module")
def template(fx, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MyApp.app with a second executable, a plug-in holding its own dylib, signed ad hoc --deep."""
    app = build_myapp(tmp_path_factory.mktemp("hostile"), fx, extras=True)
    adhoc_sign_bundle(app)
    verify_code(app, DEEP)
    return app


@pytest.fixture
def app(template: Path, tmp_path: Path) -> Path:
    copy = tmp_path / template.name
    shutil.copytree(template, copy, symlinks=True)
    return copy


def seal_path(app: Path) -> Path:
    return app / "Contents" / "_CodeSignature" / "CodeResources"


def reseal(app: Path, edit) -> None:
    """Change the app's stored seal with ``edit(plist)`` and re-sign its main executable ad hoc over
    it, as anyone can: the seal is then bound to a valid signature."""
    plist = plistlib.loads(seal_path(app).read_bytes())
    edit(plist)
    data = plistlib.dumps(plist)
    seal_path(app).write_bytes(data)
    bundle = Bundle.open(app)
    options = SigningOptions(identifier=bundle.identifier or "x", info_plist=bundle.info_plist_path.read_bytes(), code_resources=data)
    sign_path(bundle.executable_path, options)


def run_cli(*args: str | Path) -> tuple[int, str]:
    result = codesign(*args)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stderr


# --- CodeResources ----------------------------------------------------------------------------------

MALFORMED_SEALS = {
    "truncated": lambda data: data[: len(data) // 2],
    "unknown encoding": lambda data: b'<?xml version="1.0" encoding="x-unknown"?>' + data.split(b"?>", 1)[1],
    "files2 not a dict": lambda data: plistlib.dumps({**plistlib.loads(data), "files2": "nope"}),
    "rules neither dict nor list": lambda data: plistlib.dumps({"files": {}, "rules": 7}),
    "entry of the wrong type": lambda data: plistlib.dumps({**plistlib.loads(data), "files2": {"Resources/data.txt": 5}}),
    "billion laughs": lambda data: b'<!DOCTYPE plist [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">]>'
    b"<plist><dict><key>files2</key><dict/><key>rules2</key><dict><key>&b;</key><true/></dict></dict></plist>",
}


@pytest.mark.parametrize("name", MALFORMED_SEALS)
def test_malformed_seal_is_a_seal_error_for_display_and_verify(app: Path, name: str) -> None:
    data = MALFORMED_SEALS[name](seal_path(app).read_bytes())
    with pytest.raises(ResourceSealError, match="sealed resource directory"):
        read_code_resources(data)
    seal_path(app).write_bytes(data)
    with pytest.raises(ResourceSealError, match="sealed resource directory"):
        display.signing_information(app)
    with pytest.raises(CodeVerificationError):
        verify_code(app, DEEP)


def test_malformed_seal_on_the_command_line(app: Path) -> None:
    seal_path(app).write_bytes(b'<?xml version="1.0" encoding="x-unknown"?><plist/>')
    status, stderr = run_cli("-dvvv", app)
    assert status == 1
    assert "unknown encoding" in stderr
    status, stderr = run_cli("--verify", "--deep", "--strict", app)
    assert status == 1
    assert "invalid signature" in stderr or "resource" in stderr


@pytest.mark.parametrize("weight", [float("inf"), float("-inf"), float("nan"), -1.0, 2.0**40])
def test_rule_weights_must_be_finite_and_in_range(app: Path, weight: float) -> None:
    reseal(app, lambda plist: plist["rules2"].__setitem__("^Resources/", {"weight": weight}))
    with pytest.raises(CodeVerificationError) as caught:
        verify_code(app, DEEP)
    assert caught.value.status == RESOURCE_DIRECTORY_FAILED
    assert "weights are finite numbers" in caught.value.detail


def test_rule_that_backtracks_is_evaluated_in_linear_time(app: Path) -> None:
    """``^Resources/(a+)+$`` against 40 a's and '!' takes a backtracking engine hours; the seal
    verifies, and a change to that very file is reported."""
    hostile = "a" * 40 + "!"
    (app / "Contents" / "Resources" / hostile).write_text("bait\n")
    adhoc_sign_bundle(app)

    def add_rule(plist: dict) -> None:
        plist["rules2"]["^Resources/(a+)+$"] = {"omit": True, "weight": 3000.0}

    reseal(app, add_rule)
    assert verify_code(app, DEEP).identifier == "com.example.MyApp"
    (app / "Contents" / "Resources" / hostile).write_text("changed\n")
    with pytest.raises(CodeVerificationError) as caught:
        verify_code(app, DEEP)
    assert caught.value.modified == (str(app.resolve() / "Contents" / "Resources" / hostile),)


@pytest.mark.parametrize("pattern", [r"^(a)\1$", r"^Resources/(?=x)", r"^Resources/\d+$", "^" + "x" * 2000])
def test_rules_beyond_posix_without_backreferences_are_refused(pattern: str) -> None:
    with pytest.raises(ResourceSealError, match="resource rule"):
        RuleSet.from_plist({pattern: True})


def test_rule_count_is_bounded() -> None:
    with pytest.raises(ResourceSealError, match=f"at most {MAX_RULES} are read"):
        RuleSet.from_plist({f"^r{n}/": True for n in range(MAX_RULES + 1)})


def test_apple_rules_use_posix_semantics() -> None:
    rules = RuleSet.from_plist({"^Resources/": True, "^(.*/)?\\.DS_Store$": {"omit": True, "weight": 2000.0}})
    assert rules.find("Resources/a\nb") is not None  # ^ anchors at the start of the path only
    assert rules.find("x\nResources/a") is None
    assert rules.find("Resources/sub/.DS_Store").pattern == "^(.*/)?\\.DS_Store$"


# --- Info.plist -------------------------------------------------------------------------------------

BAD_INFO_PLISTS = [
    b'<plist version="1.0"><key>a</key></plist>',
    b'<?xml version="1.0" encoding="x-unknown"?><plist><dict/></plist>',
    b"<plist><dict><key>CFBundleExecutable</key><integer>" + b"9" * 5000 + b"</integer></dict></plist>",
    b"<plist>" + b"<array>" * 10000 + b"</array>" * 10000 + b"</plist>",
    b"<plist><dict><key>a</key><date>yesterday</date></dict></plist>",
    b"bplist00" + bytes(40),
]


@pytest.mark.parametrize("data", BAD_INFO_PLISTS, ids=range(len(BAD_INFO_PLISTS)))
def test_bad_info_plist_is_an_info_plist_error_everywhere(app: Path, data: bytes) -> None:
    (app / "Contents" / "Info.plist").write_bytes(data)
    with pytest.raises(InfoPlistError, match="Contents/Info.plist is not a valid property list"):
        Bundle.open(app)
    with pytest.raises(CodeVerificationError) as caught:
        verify_code(app, DEEP)
    assert caught.value.status == BAD_BUNDLE
    with pytest.raises(InfoPlistError):
        display.signing_information(app)
    with pytest.raises(InfoPlistError):
        cs.sign_code(app, None, CodesignOptions(force=True))


def test_bad_info_plist_on_the_command_line(app: Path) -> None:
    (app / "Contents" / "Info.plist").write_bytes(BAD_INFO_PLISTS[0])
    for args in (("--verify", "--deep"), ("-dvvv",), ("-s", "-", "-f")):
        status, stderr = run_cli(*args, app)
        assert status == 1, args
        assert "Info.plist is not a valid property list" in stderr, args


def test_binary_plist_cycles_and_fan_out_are_bounded() -> None:
    # An array holding itself, and 20 arrays each holding the next twice (2^20 paths).
    cycle = b"bplist00\xa1\x00" + bytes([8]) + bytes(6) + b"\x01\x01" + (1).to_bytes(8, "big") + bytes(8) + (10).to_bytes(8, "big")
    with pytest.raises(PlistError, match=f"more than {MAX_DEPTH} deep"):
        load_plist(cycle, "the cycle")
    objects = [b"\xa2" + bytes([n + 1, n + 1]) for n in range(20)] + [b"\x09"]
    body, offsets = b"", []
    for item in objects:
        offsets.append(8 + len(body))
        body += item
    table = bytes(offsets[n] for n in range(len(objects)))
    trailer = bytes(6) + b"\x01\x01" + len(objects).to_bytes(8, "big") + bytes(8) + (8 + len(body)).to_bytes(8, "big")
    with pytest.raises(PlistError):
        load_plist(b"bplist00" + body + table + trailer, "the fan-out")


# --- entitlements -----------------------------------------------------------------------------------


def test_entitlements_with_control_characters_cannot_become_xml() -> None:
    binary = plistlib.dumps({"com.apple.dev\x01loper": True}, fmt=plistlib.FMT_BINARY)
    assert load_entitlements(binary) == {"com.apple.dev\x01loper": True}
    with pytest.raises(EntitlementsError, match="cannot be written as an XML property list"):
        entitlements_xml(binary)


def test_binary_entitlements_with_line_ends_become_xml_with_newlines() -> None:
    """Found by the entitlements-xml harness: XML turns a carriage return into a newline."""
    binary = plistlib.dumps({"com.ap\rle.team": "G43\r\nBCU"}, fmt=plistlib.FMT_BINARY)
    assert load_entitlements(entitlements_xml(binary)) == {"com.ap\nle.team": "G43\nBCU"}


@pytest.mark.parametrize(
    "der",
    [
        b"\x70\x0a\x02\x01\x01\xb0\x05\x30\x03\x0c\x01\xff",  # a key that is not UTF-8
        b"\x70\x03\x02\x01\x01",  # no value
        b"\x70\x84\xff\xff\xff\xff",  # a length past the end
    ],
)
def test_malformed_der_entitlements(der: bytes) -> None:
    with pytest.raises(EntitlementsError):
        decode_der(der)


# --- requirements -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["!" * 5000 + "always", "(" * 5000 + "always" + ")" * 5000, 'cdhash H"abc"', "platform = 99999999999",
     " and ".join(["always"] * 1000), 'certificate leaf[H"ff"] exists'],
)  # fmt: skip
def test_hostile_requirement_text_is_a_syntax_error(text: str) -> None:
    with pytest.raises(RequirementSyntaxError):
        parse_requirement_text(text)


def test_requirement_blobs_nested_past_the_limit_are_refused_and_at_it_evaluated() -> None:
    at_limit = parse_requirement_text(" and ".join(["always"] * MAX_EXPRESSION_DEPTH))
    assert evaluate(at_limit, RequirementContext(identifier="x")) is True
    blob = encode_requirement(at_limit)
    assert parse_requirement(blob) == at_limit
    # One more level: a NOT opcode (6) in front of the expression, the blob's length adjusted.
    deeper = blob[:12] + (6).to_bytes(4, "big") + blob[12:]
    deeper = deeper[:4] + len(deeper).to_bytes(4, "big") + deeper[8:]
    with pytest.raises(CodeSignatureFormatError, match="nested too deeply"):
        parse_requirement(deeper)


# --- nesting ----------------------------------------------------------------------------------------


def test_unsigned_code_two_levels_deep_is_reported_where_it_is(app: Path, fx) -> None:
    inner = app / "Contents" / "PlugIns" / "Widget.bundle" / "Contents" / "Frameworks" / "libinner.dylib"
    shutil.copyfile(fx.path("exe_unsigned.arm64"), inner)
    with pytest.raises(NotSignedError) as caught:
        verify_code(app, DEEP)
    assert caught.value.subcomponent == str(inner)
    status, stderr = run_cli("--verify", "--deep", app)
    assert status == 1
    assert "code object is not signed at all" in stderr and f"In subcomponent: {inner}" in stderr


def test_bundles_nested_too_deep_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "Outer.bundle"
    current = root
    for level in range(MAX_NESTING + 2):
        (current / "Contents").mkdir(parents=True)
        (current / "Contents" / "Info.plist").write_bytes(plistlib.dumps({"CFBundleIdentifier": f"level{level}"}))
        current = current / "Contents" / "PlugIns" / f"Level{level}.bundle"
    with pytest.raises(BundleLayoutError, match=f"nested more than {MAX_NESTING} bundles deep"):
        sign_bundle_plan(Bundle.open(root))
