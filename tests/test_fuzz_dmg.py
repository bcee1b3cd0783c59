"""Fuzzing disk images (UDIF trailer, the code signature it points at, a stapled ticket) through
``codesign --verify``, ``codesign -dvvv`` and ``codesign -f -s -``.

Seeds: an image pydmg writes, the same image signed here ad hoc and with a test Developer ID
identity, and the corpus's images (signed by Apple's codesign and stapled, ad hoc, ticket-only,
unsigned). Edits land near the end of the file half the time, where the signature and the
trailer are. What the ad hoc signer accepts, its verifier must accept too.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from codesignkit import local_identity
from corpuskit import APPLE_ROOT, CORPUS
from dmgkit import make_image
from fuzzkit import FUZZ_CASES, fuzz, input_file, read_seeds
from signbridge.apple import display
from signbridge.apple.codesig.options import CodesignOptions, QuietReporter
from signbridge.apple.codesig.verdicts import VerifyOptions
from signbridge.apple.display import disk_image_information
from signbridge.apple.dmg.sign import sign_disk_image
from signbridge.apple.dmg.verify import verify_disk_image
from signbridge.apple.trust import load_anchors
from tokenkit import apple_pki

pytestmark = pytest.mark.fuzz


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    directory = tmp_path_factory.mktemp("images")
    unsigned = make_image(directory)
    adhoc = shutil.copy(unsigned, directory / "adhoc.dmg")
    sign_disk_image(adhoc, None, CodesignOptions())
    signed = shutil.copy(unsigned, directory / "signed.dmg")
    sign_disk_image(signed, local_identity(apple_pki())[0], CodesignOptions())
    real = sorted((CORPUS / "dmg").iterdir())
    assert len(real) == 4, "the corpus's disk images are seeds"
    return read_seeds([unsigned, Path(adhoc), Path(signed), *real])


@pytest.fixture
def write():
    with input_file("dmg", "image.dmg") as write:
        yield write


def test_verify(seeds, write):
    options = VerifyOptions(anchors=tuple(load_anchors(APPLE_ROOT)), strict=True)

    def target(data: bytes) -> None:
        verify_disk_image(write(data), options)

    assert fuzz("dmg-verify", seeds, target) >= FUZZ_CASES


def test_display(seeds, write):
    def target(data: bytes) -> None:
        info = disk_image_information(write(data))
        display.display_lines(info, 6)
        display.requirement_lines(info, display.implicit_designated(info))

    assert fuzz("dmg-display", seeds, target) >= FUZZ_CASES


def test_adhoc_sign(seeds, write):
    options = CodesignOptions(force=True)

    def target(data: bytes) -> None:
        path = write(data)
        sign_disk_image(path, None, options, QuietReporter())
        verify_disk_image(path, VerifyOptions(strict=True))

    assert fuzz("dmg-sign", seeds, target) >= FUZZ_CASES
