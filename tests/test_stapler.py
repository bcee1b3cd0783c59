"""Tickets and stapling on the real tickets Apple stapled to the corpus's packages and disk images."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import require_tool
from corpuskit import copy_item, corpus_item
from notarykit import (
    DMGS,
    MANAGER_APP,
    PKG,
    STAPLED_117,
    STAPLED_PKGS,
    UNSTAPLED_117,
    NotaryState,
    notary_server,
    slot_ticket,
    trailer_ticket,
)
from signbridge.apple.notary.errors import StapleError, TicketError
from signbridge.apple.notary.lookup import record_name
from signbridge.apple.notary.stapler import check_chain, covers, open_stapleable, staple, unstaple, validate
from signbridge.apple.notary.ticket import parse_ticket
from signbridge.apple.trust import load_anchors

SIGNBRIDGE = [sys.executable, "-m", "signbridge"]


def _stapler(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*SIGNBRIDGE, "stapler", *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("item", STAPLED_PKGS + DMGS)
def test_real_tickets_parse_and_verify(item):
    path = corpus_item(item)
    ticket = parse_ticket(trailer_ticket(path) if item.endswith(".pkg") else slot_ticket(path), item)
    ticket.verify_signature()
    assert check_chain(ticket) is False  # the chain checks out; Apple Root CA - G3 is not configured
    assert [c.subject.rfc4514_string() for c in ticket.certificates][0] == "C=US,O=Apple Inc.,CN=Software Ticket Signing"
    assert {len(entry.digest) for entry in ticket.entries} == {20} and len(ticket.entries) >= 5
    assert ticket.certificates[0].not_valid_before_utc <= ticket.issued <= ticket.certificates[0].not_valid_after_utc


@pytest.mark.parametrize("item", STAPLED_PKGS)
def test_package_round_trip_is_byte_identical(tmp_path, item):
    original = corpus_item(item).read_bytes()
    copy = copy_item(item, tmp_path)
    removed = unstaple(copy)
    assert removed == trailer_ticket(corpus_item(item))
    assert copy.read_bytes() == original[: len(original) - len(removed) - 32]
    if item == STAPLED_117:
        assert copy.read_bytes() == corpus_item(UNSTAPLED_117).read_bytes()
    with pytest.raises(StapleError, match="does not have a ticket stapled to it"):
        validate(copy)
    ticket_file = tmp_path / "ticket"
    ticket_file.write_bytes(removed)
    result = _stapler("staple", "--ticket", str(ticket_file), str(copy))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"Processing: {copy}", "The staple and validate action worked!"]
    assert copy.read_bytes() == original
    checked = _stapler("validate", str(copy))
    assert checked.returncode == 0 and checked.stdout.endswith("The validate action worked!\n")


def test_package_ticket_covers_toc_checksum():
    target = open_stapleable(corpus_item(STAPLED_117))
    ((hash_type, digest),) = target.digests()
    assert record_name(hash_type, digest) == "2/1/ec40ccf8aa6f133ebdce5bf150057001ff97bf21"
    assert covers(validate(corpus_item(STAPLED_117)), hash_type, digest)


def test_staple_fetches_from_ticket_service(tmp_path):
    copy = copy_item(UNSTAPLED_117, tmp_path)
    state = NotaryState(ec.generate_private_key(ec.SECP256R1()).public_key(), "K", "I", "")
    with notary_server(state) as url:
        env = dict(os.environ, SIGNBRIDGE_TICKET_LOOKUP_URL=f"{url}/database/1/x/production/public/records/lookup")
        missing = _stapler("staple", str(copy), env=env)
        assert missing.returncode == 65
        assert 'CloudKit query for 2/1/ec40ccf8aa6f133ebdce5bf150057001ff97bf21 failed due to "Record not found".' in missing.stderr
        assert "The staple and validate action failed! Error 65." in missing.stderr
        assert copy.read_bytes() == corpus_item(UNSTAPLED_117).read_bytes()
        state.tickets["2/1/ec40ccf8aa6f133ebdce5bf150057001ff97bf21"] = trailer_ticket(corpus_item(STAPLED_117))
        found = _stapler("staple", str(copy), env=env)
        assert found.returncode == 0, found.stderr
    assert copy.read_bytes() == corpus_item(STAPLED_117).read_bytes()
    assert state.lookups == ["2/1/ec40ccf8aa6f133ebdce5bf150057001ff97bf21"] * 2


def test_fetch_retries_record_not_found(tmp_path):
    from signbridge.apple.notary.lookup import fetch_ticket

    state = NotaryState(ec.generate_private_key(ec.SECP256R1()).public_key(), "K", "I", "")
    ticket = trailer_ticket(corpus_item(STAPLED_117))

    def appear(_seconds: float) -> None:
        state.tickets["2/1/ab"] = ticket

    with notary_server(state) as url:
        assert fetch_ticket("2/1/ab", wait=30, interval=1, url=f"{url}/records/lookup", sleep=appear) == ticket
    assert len(state.lookups) == 2


def test_corrupt_or_foreign_ticket_writes_nothing(tmp_path):
    copy = copy_item(UNSTAPLED_117, tmp_path)
    before = copy.read_bytes()
    good = trailer_ticket(corpus_item(STAPLED_117))
    flipped = bytearray(good)
    flipped[len(good) - 90] ^= 0x01  # inside the listed hashes
    with pytest.raises(TicketError, match="does not verify"):
        staple(copy, ticket=bytes(flipped))
    with pytest.raises(TicketError, match="more than it holds"):
        staple(copy, ticket=good[:400])
    with pytest.raises(TicketError, match="does not start with 's8ch'"):
        staple(copy, ticket=b"PK\x03\x04" + good)
    with pytest.raises(TicketError, match="does not cover"):
        staple(copy, ticket=trailer_ticket(corpus_item(PKG.format("1.27.0"))))
    assert copy.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [copy.name]
    bad = tmp_path / "bad.ticket"
    bad.write_bytes(bytes(flipped))
    result = _stapler("staple", "--ticket", str(bad), str(copy))
    assert result.returncode == 65 and "does not verify" in result.stderr
    assert copy.read_bytes() == before


def test_app_staple_validate_with_the_package_ticket(tmp_path):
    # the 2.4.0 package's ticket lists the CodeDirectory hashes of the app in its payload
    app = copy_item(MANAGER_APP, tmp_path)
    ticket = trailer_ticket(corpus_item(PKG.format("2.4.0")))
    unstapled = _stapler("validate", str(app))
    assert unstapled.returncode == 65 and "does not have a ticket stapled to it." in unstapled.stderr
    result = _stapler("staple", "--ticket", _write(tmp_path / "t", ticket), str(app))
    assert result.returncode == 0, result.stderr
    assert (app / "Contents" / "CodeResources").read_bytes() == ticket
    assert _stapler("validate", str(app)).returncode == 0
    assert unstaple(app) == ticket and not (app / "Contents" / "CodeResources").exists()


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


DMG_STAPLED = DMGS[1]  # signed (CodeDirectory, CMS) and stapled by Apple


def test_disk_image_round_trip_is_byte_identical(tmp_path):
    original = corpus_item(DMG_STAPLED).read_bytes()
    copy = copy_item(DMG_STAPLED, tmp_path)
    assert _stapler("validate", str(copy)).returncode == 0
    removed = unstaple(copy)
    assert removed == slot_ticket(corpus_item(DMG_STAPLED))
    assert len(copy.read_bytes()) == len(original) - len(removed) - 16  # the slot's index entry and BlobWrapper
    # the image without its ticket is still a valid signed image and a readable UDIF image
    env = dict(os.environ, SIGNBRIDGE_ANCHORS=str(corpus_item("anchors/AppleRootCA.pem")))
    verified = subprocess.run([*SIGNBRIDGE, "codesign", "--verify", "--strict", str(copy)], capture_output=True, text=True, env=env)
    assert verified.returncode == 0, verified.stderr
    listed = subprocess.run([require_tool("7zz"), "l", str(copy)], capture_output=True, text=True)
    assert listed.returncode == 0 and "Karabiner-VirtualHIDDevice-Manager" in listed.stdout
    result = _stapler("staple", "--ticket", _write(tmp_path / "ticket", removed), str(copy))
    assert result.returncode == 0, result.stderr
    assert copy.read_bytes() == original


def test_disk_image_record_is_its_cdhash():
    ((hash_type, digest),) = open_stapleable(corpus_item(DMG_STAPLED)).digests()
    assert hash_type == 2 and covers(parse_ticket(slot_ticket(corpus_item(DMG_STAPLED)), "dmg"), hash_type, digest)


@pytest.mark.parametrize("item", [DMGS[0], "dmg/indygreg_apple-platform-rs__example.dmg"])
def test_unsigned_disk_images_are_refused(tmp_path, item):
    copy = copy_item(item, tmp_path)
    before = copy.read_bytes()
    result = _stapler("validate" if item == DMGS[0] else "staple", str(copy))
    assert result.returncode == 65
    assert "is not signed; sign the disk image" in result.stderr
    assert copy.read_bytes() == before


@pytest.mark.parametrize("item", STAPLED_PKGS[:1] + DMGS[1:2])
def test_ticket_that_chains_to_no_configured_anchor_is_refused(item):
    # Apple's tickets chain to Apple Root CA - G3; configured with only Apple Root CA, validation
    # must fail rather than accept a chain that ends nowhere it was told to trust.
    path = corpus_item(item)
    other_root = corpus_item("anchors/AppleRootCA.pem")
    with pytest.raises(TicketError, match="none of the configured ticket anchors"):
        validate(path, anchors=tuple(load_anchors(str(other_root))))
    checked = _stapler("validate", "--anchors", str(other_root), str(path))
    assert checked.returncode != 0 and "none of the configured ticket anchors" in checked.stderr
    assert validate(path).certificates  # without anchors the ticket's own chain is checked, as before
