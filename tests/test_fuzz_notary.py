"""Fuzzing what notarization reads: stapled tickets, a package's cpio Payload (gzip, pbzx, plain)
and zip archives (``.ipa``, zip and jar files met by ``notarytool preflight``).

Seeds: the tickets Apple's stapler attached to the corpus's packages and disk images and one
made here; the Payloads of the corpus's packages (gzip cpio as pkgbuild writes them) and the same
archives re-packed as pbzx (xz chunks, as Apple's own packages) and plain cpio, and a small one
bsdtar writes; the corpus's ``.ipa`` and zip and jar archives built here. Archives are extracted
under the pre-flight's limits into a scratch directory emptied after every input.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import lzma
import shutil
import struct
import zipfile
from pathlib import Path

import pytest

from conftest import require_tool, run
from corpuskit import APPLE_ROOT, CORPUS
from fuzzkit import FUZZ_CASES, fuzz, scratch
from signbridge.apple.bundle.ipa import extract as extract_ipa
from signbridge.apple.dmg.udif import read_layout, read_signature
from signbridge.apple.notary.payload import Limits, extract_cpio, extract_zip
from signbridge.apple.notary.stapler import check_chain, covers
from signbridge.apple.notary.ticket import parse_ticket
from signbridge.apple.pkg.xar.archive import XarArchive
from signbridge.apple.trust import load_anchors
from signbridge.errors import SignbridgeError
from xarfixtures import notarization_ticket, sample_files, write_tree

pytestmark = pytest.mark.fuzz

# The pre-flight's limits, scaled to what a fuzzed input may expand to.
LIMITS = Limits(max_bytes=64 << 20, max_entries=10_000)


def _disk_image_ticket(path: Path) -> bytes | None:
    with path.open("rb") as stream:
        read = read_signature(read_layout(path, stream.fileno()), stream.fileno())
    return read.ticket if read is not None else None


def test_tickets():
    tickets = [XarArchive.open(path).read_ticket() for path in sorted((CORPUS / "pkg").iterdir())]
    tickets += [_disk_image_ticket(path) for path in sorted((CORPUS / "dmg").iterdir())]
    seeds = [ticket for ticket in dict.fromkeys(tickets) if ticket]
    assert len(seeds) >= 5
    seeds.append(notarization_ticket(bytes(20), bytes(32)))
    anchors = tuple(load_anchors(APPLE_ROOT))

    def target(data: bytes) -> None:
        ticket = parse_ticket(data, "fuzzed.pkg")
        ticket.verify_signature()
        check_chain(ticket, anchors)
        covers(ticket, 1, bytes(20))
        ticket.covers(bytes(32))

    assert fuzz("ticket", seeds, target) >= FUZZ_CASES


def _pbzx(raw: bytes, chunk: int = 64 << 10) -> bytes:
    """A pbzx stream: magic, chunk size, then (flags, length, xz data) per chunk."""
    out = bytearray(b"pbzx" + struct.pack(">Q", chunk))
    for start in range(0, len(raw), chunk):
        data = lzma.compress(raw[start : start + chunk], format=lzma.FORMAT_XZ)
        out += struct.pack(">QQ", 1 << 24 if start + chunk < len(raw) else 0, len(data)) + data
    return bytes(out)


def _small_entries(raw: bytes, limit: int = 64 << 10) -> bytes:
    """The entries of an odc cpio archive smaller than ``limit``, unchanged, and its trailer: a
    real archive a fraction of the size (a Payload's executables are most of its bytes)."""
    kept, position = [], 0
    while position < len(raw):
        namesize, filesize = int(raw[position + 59 : position + 65], 8), int(raw[position + 65 : position + 76], 8)
        end = position + 76 + namesize + filesize
        if filesize < limit:
            kept.append(raw[position:end])
        if raw[position + 76 : position + 76 + namesize] == b"TRAILER!!!\0":
            break
        position = end
    return b"".join(kept)


@pytest.fixture(scope="module")
def payloads(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    """The Payload of the corpus's product archive (pkgbuild's gzip odc cpio), its small entries
    as gzip, pbzx and plain cpio, and a small archive bsdtar writes, in the same three forms."""
    archive = XarArchive.open(CORPUS / "pkg" / "htacg_binaries__HTML_Tidy-5.2.0.pkg")
    real = archive.read_data(archive.file("HTML_Tidy.pkg/Payload"))
    small = _small_entries(gzip.decompress(real))
    directory = tmp_path_factory.mktemp("cpio")
    tree = write_tree(directory / "tree", sample_files())
    made = directory / "small.cpio"
    run([require_tool("bsdtar"), "--format", "odc", "-cf", str(made), "-C", str(tree), "."])
    built = made.read_bytes()
    return [real, gzip.compress(small), _pbzx(small, 16 << 10), small, built, gzip.compress(built), _pbzx(built, 4096)]


def test_cpio(payloads):
    with scratch("cpio") as directory:
        destination = directory / "out"

        def target(data: bytes) -> None:
            shutil.rmtree(destination, ignore_errors=True)
            destination.mkdir()
            extract_cpio(io.BytesIO(data), destination, LIMITS, "Payload")

        assert fuzz("cpio", payloads, target) >= FUZZ_CASES


@pytest.fixture(scope="module")
def archives() -> list[bytes]:
    ipa = (CORPUS / "bundles" / "fastlane_fastlane__very-capable-app.ipa").read_bytes()
    built = []
    for compression in (zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression) as archive:
            archive.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\r\n\r\n")
            for name, data in sample_files().items():
                archive.writestr(f"Payload/Sample.app/{name}", data)
            link = zipfile.ZipInfo("Payload/Sample.app/link")
            link.create_system, link.external_attr = 3, (0o120777 << 16)
            archive.writestr(link, "Resources")
        built.append(buffer.getvalue())
    return [ipa, *built]


def test_zip(archives):
    """The pre-flight's zip reader and the ``.ipa`` reader of codesign, on the same inputs."""
    with scratch("zip") as directory:
        source, destination = directory / "input.ipa", directory / "out"

        def fresh() -> Path:
            shutil.rmtree(destination, ignore_errors=True)
            destination.mkdir()
            return destination

        def target(data: bytes) -> None:
            source.write_bytes(data)
            with contextlib.suppress(SignbridgeError):
                extract_zip(source, fresh(), LIMITS, "input.zip")
            extract_ipa(source, fresh())

        assert fuzz("zip", archives, target) >= FUZZ_CASES
