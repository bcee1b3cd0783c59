"""Fuzzing flat packages (xar: header, TOC, heap, signatures, stapled ticket) through
``pkgutil --check-signature`` and ``productsign``.

Seeds: packages the project's writer and bsdtar build (product archive, component package,
SHA-1 and SHA-256 TOC checksums), one of them signed here with a test Developer ID Installer
identity, and the corpus's packages signed and stapled by Apple's tools. ``pkgutil`` reads every
file's data and checks it (a verdict for any package, never a traceback) and renders the verdict
as text and JSON; ``productsign`` reads a package and signs it into a scratch file.
"""

from __future__ import annotations

import pytest

from corpuskit import APPLE_ROOT, CORPUS
from fuzzkit import FUZZ_CASES, fuzz, input_file, read_seeds
from pkgkit import bsdtar_package, component_package, identity_of, product_archive
from signbridge.apple.pkg.sign import sign_package
from signbridge.apple.pkg.verify import verify_package
from signbridge.apple.trust import load_anchors
from signbridge.cli.productsign import render_check_signature, verdict_json
from tokenkit import apple_pki

pytestmark = pytest.mark.fuzz


@pytest.fixture(scope="module")
def pki():
    return apple_pki()


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory, pki) -> list[bytes]:
    directory = tmp_path_factory.mktemp("packages")
    built = [
        product_archive(directory / "product.pkg"),
        component_package(directory / "component.pkg", toc_checksum="sha256"),
        bsdtar_package(directory),
    ]
    signed = sign_package(built[0], directory / "signed.pkg", identity_of(pki)).path
    real = sorted((CORPUS / "pkg").iterdir())
    assert len(real) == 7, "the corpus's packages are seeds"
    return read_seeds([*built, signed, *real])


@pytest.fixture
def write():
    with input_file("pkg", "input.pkg") as write:
        yield write


def test_check_signature(seeds, pki, write):
    anchors = (*load_anchors(APPLE_ROOT), pki.root.certificate)

    def target(data: bytes) -> None:
        verdict = verify_package(write(data), anchors)
        render_check_signature(verdict)
        verdict_json(verdict)

    assert fuzz("pkgutil", seeds, target) >= FUZZ_CASES


def test_productsign(seeds, pki, write):
    identity = identity_of(pki)

    def target(data: bytes) -> None:
        source = write(data)
        sign_package(source, source.with_name("signed.pkg"), identity)

    assert fuzz("productsign", seeds, target) >= FUZZ_CASES
