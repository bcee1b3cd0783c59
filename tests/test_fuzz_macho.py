"""Fuzzing Mach-O files through what ``codesign --verify``, ``codesign -dvvv`` and ``codesign -f -s -`` call.

Seeds: the Mach-O fixtures the tests build (thin and universal, linker-signed and unsigned, fat64)
and the corpus's real Mach-O files signed by Apple's tools (Developer ID with timestamps, ad hoc,
SHA-1 + SHA-256 CodeDirectories, i386 slices). Every mutant must verify, display and sign, or be
refused with a :class:`~signbridge.errors.SignbridgeError`; what the ad hoc signer accepts, its own
verifier must accept too.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from corpuskit import APPLE_ROOT, CORPUS
from fuzzkit import FUZZ_CASES, fuzz, input_file, read_seeds
from machofixtures import THIN, UNIVERSAL, get_fixtures
from signbridge.apple import codesign as engine
from signbridge.apple import display
from signbridge.apple.codesig.entitlements import signature_entitlements
from signbridge.apple.codesig.options import CodesignOptions
from signbridge.apple.codesig.verdicts import VerifyOptions
from signbridge.apple.trust import load_anchors
from signbridge.apple.verify_code import verify_code

pytestmark = pytest.mark.fuzz


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    fixtures = get_fixtures(tmp_path_factory)
    built = read_seeds([fixtures.path(name) for name in (*THIN, *UNIVERSAL)])
    real = read_seeds(sorted((CORPUS / "macho").iterdir()))
    assert len(real) == 8, "the corpus's Mach-O files are seeds"
    return built + real


@pytest.fixture(scope="module")
def options() -> VerifyOptions:
    # Apple Root CA as the anchor: the corpus's chains get as far as trust evaluation.
    return VerifyOptions(anchors=tuple(load_anchors(APPLE_ROOT)), strict=True)


@pytest.fixture(scope="module")
def executor():
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield pool


@pytest.fixture
def write():
    with input_file("macho", "code") as write:
        yield write


def test_verify(seeds, options, executor, write):

    def target(data: bytes) -> None:
        verify_code(write(data), options, executor=executor)

    assert fuzz("macho-verify", seeds, target) >= FUZZ_CASES


def test_display(seeds, write):

    def target(data: bytes) -> None:
        info = display.signing_information(write(data))
        display.display_lines(info, 6, nested=True)
        display.requirement_lines(info, display.implicit_designated(info))
        value, _, _ = signature_entitlements(info.signature)
        if value is not None:
            display.entitlements_text(value)

    assert fuzz("macho-display", seeds, target) >= FUZZ_CASES


def test_adhoc_sign(seeds, executor, write):
    """Ad hoc signing into a temporary file; whatever it signs, its verifier must accept."""
    options = CodesignOptions(force=True)

    def target(data: bytes) -> None:
        path = write(data)
        engine.sign_code(path, None, options, executor=executor)
        verify_code(path, VerifyOptions(strict=True), executor=executor)

    assert fuzz("macho-sign", seeds, target) >= FUZZ_CASES
