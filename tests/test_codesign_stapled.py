"""Notarization tickets stapled to apps (``Contents/CodeResources``), through ``signbridge codesign``.

The ticket is real: taken at run time from the corpus's stapled package, whose trailer holds the
ticket Apple's notary service issued between two ``t8lr`` records (read with struct here). It is
written beside ``_CodeSignature`` in an app signed through a token, as stapler would. openssl
checks the CMS of the re-signed app.
"""

from __future__ import annotations

import plistlib
import struct
from pathlib import Path

import pytest

import machofixtures
from bundlefixtures import build_myapp
from codesignkit import codesign, local_tsa, openssl_accepts, raw_signatures, token_and_anchors
from corpuskit import corpus_item
from signbridge.apple.notary.stapled import read_stapled_ticket, remove_stapled_ticket
from tokenkit import apple_pki

STAPLED = "pkg/pqrs-org_Karabiner-DriverKit-VirtualHIDDevice__1.17.0-stapled.pkg"
UNSTAPLED = "pkg/pqrs-org_Karabiner-DriverKit-VirtualHIDDevice__1.17.0-unstapled.pkg"
WARNING = (
    "warning: the stapled notarization ticket was removed: it does not match the new signature. "
    "Notarize and staple the signed bundle again."
)


def real_ticket() -> bytes:
    """The ticket stapled to the corpus package: after the unstapled bytes, a 16-byte ``t8lr``
    record, the ticket, and a 16-byte ``t8lr`` trailer giving the ticket's length (little-endian)."""
    stapled = corpus_item(STAPLED).read_bytes()
    original_size = corpus_item(UNSTAPLED).stat().st_size
    assert stapled[original_size : original_size + 4] == b"t8lr"
    trailer = stapled[-16:]
    assert trailer[:4] == b"t8lr"
    (length,) = struct.unpack_from("<I", trailer, 8)
    ticket = stapled[original_size + 16 : -16]
    assert len(ticket) == length and ticket[:4] == b"s8ch"
    return ticket


@pytest.fixture(scope="session")
def fx(tmp_path_factory: pytest.TempPathFactory):
    return machofixtures.get_fixtures(tmp_path_factory)


@pytest.fixture(scope="module")
def pki():
    return apple_pki()


@pytest.fixture
def tsa(tmp_path, monkeypatch, pki):
    """A local timestamp authority, and a token serving the test identities; both trusted."""
    with local_tsa() as running, token_and_anchors(tmp_path, monkeypatch, pki, running.root):
        yield running


def test_stapled_ticket_is_shown_kept_out_of_the_seal_and_dropped_on_resigning(fx, tmp_path, tsa, pki):
    app = build_myapp(tmp_path, fx)
    signed = codesign("-s", "Developer ID Application", f"--timestamp={tsa.url}", "--deep", app)
    assert signed.returncode == 0, signed.stderr
    ticket = real_ticket()
    stapled = app / "Contents" / "CodeResources"
    stapled.write_bytes(ticket)

    # stapling changes nothing the signature covers
    verified = codesign("--verify", "--strict", "--deep", "-v", app)
    assert verified.returncode == 0, verified.stderr
    assert verified.stderr == f"{app}: valid on disk\n{app}: satisfies its Designated Requirement\n"

    shown = codesign("-dvvv", app)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stderr.splitlines()
    position = lines.index("Notarization Ticket=stapled")
    assert lines[position - 1].startswith("Timestamp=")
    assert lines[position + 1].startswith("Info.plist entries=")

    # re-signing: the stale ticket goes, with one warning line, and the seal never lists it
    resigned = codesign("-f", "-s", "Developer ID Application", f"--timestamp={tsa.url}", "--deep", app)
    assert resigned.returncode == 0, resigned.stderr
    warnings = [line for line in resigned.stderr.splitlines() if "warning: the stapled notarization ticket" in line]
    assert warnings == [f"{app}: {WARNING}"]
    assert not stapled.exists()
    seal = plistlib.loads((app / "Contents" / "_CodeSignature" / "CodeResources").read_bytes())
    assert "CodeResources" not in seal["files2"] and "CodeResources" not in seal["files"]
    for raw in raw_signatures((app / "Contents" / "MacOS" / "MyApp").read_bytes()):
        assert openssl_accepts(tmp_path, raw, pki.root.certificate)
    again = codesign("--verify", "--strict", "--deep", "-v", app)
    assert again.returncode == 0, again.stderr
    assert "Notarization Ticket" not in codesign("-dvvv", app).stderr


def test_a_file_that_is_not_a_ticket_is_neither_shown_nor_removed(fx, tmp_path, tsa):
    app = build_myapp(tmp_path, fx)
    assert codesign("-s", "Developer ID Application", "--deep", app).returncode == 0
    legacy = app / "Contents" / "CodeResources"
    legacy.symlink_to("_CodeSignature/CodeResources")
    assert codesign("--verify", "--strict", "--deep", app).returncode == 0
    assert "Notarization Ticket" not in codesign("-dvvv", app).stderr
    resigned = codesign("-f", "-s", "Developer ID Application", "--deep", app)
    assert resigned.returncode == 0 and "notarization ticket" not in resigned.stderr
    assert legacy.is_symlink()


def test_ticket_helpers_read_only_tickets(tmp_path: Path):
    ticket = real_ticket()
    (tmp_path / "CodeResources").write_bytes(ticket)
    assert read_stapled_ticket(tmp_path) == ticket
    assert remove_stapled_ticket(tmp_path) and not (tmp_path / "CodeResources").exists()
    (tmp_path / "CodeResources").write_bytes(b"<?xml version")
    assert read_stapled_ticket(tmp_path) is None and not remove_stapled_ticket(tmp_path)
