"""Signed audit checkpoints: an insider with write access to the database cannot rewrite the log
unnoticed, and an export is verified offline against the certificate the auditor kept.

The service runs for real (loopback), writes checkpoints on its own, and every checkpoint
signature and timestamp is also checked with openssl."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from conftest import require_tool
from servicekit import DemoService, init_demo, signbridge
from signbridge.server.audit_chain import ENTRY_FIELDS, record_hash
from signbridge.server.process import ServiceProcess
from signbridge.server.settings import ServerSettings

H32 = base64.b64encode(bytes(range(32))).decode()
RECORDS = 13  # checkpoints every 5 records, and one at shutdown


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stopped service's data directory with RECORDS records and their checkpoints."""
    data_dir = tmp_path_factory.mktemp("checkpoints") / "data"
    info = init_demo(data_dir)
    settings = ServerSettings.load(data_dir)
    dataclasses.replace(settings, audit_checkpoint_records=5, audit_checkpoint_seconds=3600).save()
    with ServiceProcess(data_dir) as process:
        service = DemoService(data_dir, info, process)
        for index in range(RECORDS):
            digest = base64.b64encode(hashlib.sha256(str(index).encode()).digest()).decode()
            hash_data = {"hash": digest, "signatureAlgorithm": "Rsa", "rsaOptions": {"hashAlgorithmName": "Sha256"}}
            assert service.sign_hash("release-signing", hash_data).status_code == 200
    return data_dir


@pytest.fixture
def data_dir(pristine: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(pristine, copy)
    settings = json.loads((copy / "server.json").read_text())
    settings["databaseUrl"] = settings["databaseUrl"].replace(str(pristine), str(copy))
    (copy / "server.json").write_text(json.dumps(settings))
    return copy


def admin(data_dir: Path, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return signbridge("admin", "--data-dir", str(data_dir), "audit", *args, check=check)


def _db(data_dir: Path) -> sqlite3.Connection:
    return sqlite3.connect(data_dir / "signbridge.db")


def _checkpoints(data_dir: Path) -> list[dict]:
    with _db(data_dir) as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute("SELECT * FROM audit_checkpoints ORDER BY seq")]


def _recompute_from(db: sqlite3.Connection, first: int) -> None:
    """What an insider does to hide an edit: recompute every later hash and the head."""
    db.row_factory = sqlite3.Row
    rows = [dict(row) for row in db.execute("SELECT * FROM audit_records WHERE seq >= ? ORDER BY seq", (first - 1,))]
    prev = rows[0]["record_hash"] if rows[0]["seq"] == first - 1 else "0" * 64
    for row in rows:
        if row["seq"] < first:
            continue
        row["prev_hash"] = prev
        row["record_hash"] = record_hash(row["seq"], prev, row)
        db.execute("UPDATE audit_records SET prev_hash = ?, record_hash = ? WHERE seq = ?", (prev, row["record_hash"], row["seq"]))
        prev = row["record_hash"]
    last = db.execute("SELECT max(seq) FROM audit_records").fetchone()[0]
    db.execute("UPDATE audit_head SET seq = ?, record_hash = ? WHERE id = 1", (last, prev))


def test_service_writes_checkpoints_and_verify_reports_them(data_dir: Path) -> None:
    seqs = [c["seq"] for c in _checkpoints(data_dir)]
    assert seqs[:2] == [5, 10] and seqs[-1] == RECORDS
    proc = admin(data_dir, "verify", check=True)
    assert f"{RECORDS} records, chain verified" in proc.stdout
    assert f"the newest covers record {RECORDS}" in proc.stdout
    summary = json.loads(admin(data_dir, "verify", "--json", check=True).stdout)
    assert summary["ok"] and summary["newestCheckpoint"]["seq"] == RECORDS


def test_checkpoints_verify_with_openssl(data_dir: Path, tmp_path: Path) -> None:
    openssl = require_tool("openssl")
    certificate = tmp_path / "checkpoint.pem"
    certificate.write_text(admin(data_dir, "certificate", check=True).stdout)
    subprocess.run([openssl, "x509", "-in", certificate, "-pubkey", "-noout", "-out", tmp_path / "pub.pem"], check=True)
    for checkpoint in _checkpoints(data_dir):
        message = f"signbridge audit checkpoint v1\n{checkpoint['seq']}\n{checkpoint['record_hash']}\n{checkpoint['time']}\n"
        (tmp_path / "message").write_text(message)
        (tmp_path / "signature").write_bytes(checkpoint["signature"])
        verified = subprocess.run(
            [openssl, "dgst", "-sha256", "-verify", tmp_path / "pub.pem", "-signature", tmp_path / "signature", tmp_path / "message"],
            capture_output=True, text=True,
        )
        assert verified.returncode == 0 and "Verified OK" in verified.stdout, verified.stderr
        (tmp_path / "token.der").write_bytes(checkpoint["timestamp"])
        stamped = subprocess.run(
            [openssl, "ts", "-verify", "-data", tmp_path / "signature", "-in", tmp_path / "token.der", "-token_in",
             "-CAfile", data_dir / "demo-root.pem"],
            capture_output=True, text=True,
        )
        assert stamped.returncode == 0 and "Verification: OK" in stamped.stdout, stamped.stderr


def _tampered(data_dir: Path) -> subprocess.CompletedProcess[str]:
    proc = admin(data_dir, "verify")
    assert proc.returncode == 1, proc.stdout
    return proc


def test_delete_the_last_record_and_rewrite_the_head(data_dir: Path) -> None:
    with _db(data_dir) as db:
        db.execute("DELETE FROM audit_records WHERE seq = ?", (RECORDS,))
        prev = db.execute("SELECT record_hash FROM audit_records WHERE seq = ?", (RECORDS - 1,)).fetchone()[0]
        db.execute("UPDATE audit_head SET seq = ?, record_hash = ? WHERE id = 1", (RECORDS - 1, prev))
    assert f"records {RECORDS}..{RECORDS} are missing, but a signed checkpoint covers record {RECORDS}" in _tampered(data_dir).stderr


def test_edit_a_record_and_recompute_every_later_hash(data_dir: Path) -> None:
    with _db(data_dir) as db:
        db.execute("UPDATE audit_records SET remote_address = '203.0.113.66' WHERE seq = 3")
        _recompute_from(db, 3)
    stderr = _tampered(data_dir).stderr
    assert "the chain up to record 5 differs from its signed checkpoint" in stderr


def test_delete_checkpoints_too_is_caught_by_a_kept_export(data_dir: Path, tmp_path: Path) -> None:
    kept = tmp_path / "kept.jsonl"
    admin(data_dir, "export", "--json", "--output", str(kept), check=True)
    with _db(data_dir) as db:
        db.execute("UPDATE audit_records SET user_name = 'mallory' WHERE seq = 7")
        _recompute_from(db, 7)
        db.execute("DELETE FROM audit_checkpoints WHERE seq >= 5")
    assert admin(data_dir, "verify").returncode == 0  # without the auditor's copy this edit cannot be seen
    proc = admin(data_dir, "verify", "--kept", str(kept))
    assert proc.returncode == 1
    assert "the chain up to record 10 differs from its signed checkpoint" in proc.stderr
    assert "that the auditor kept is gone from the log" in proc.stderr


def test_forged_checkpoint(data_dir: Path) -> None:
    with _db(data_dir) as db:
        db.execute("UPDATE audit_checkpoints SET record_hash = ? WHERE seq = 10", ("ab" * 32,))
    assert "the checkpoint at record 10" in _tampered(data_dir).stderr


def test_swapped_checkpoint_certificate(data_dir: Path, tmp_path: Path) -> None:
    openssl = require_tool("openssl")
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=mallory",
         "-keyout", tmp_path / "k.pem", "-out", tmp_path / "c.pem", "-outform", "DER"],
        check=True, capture_output=True,
    )
    with _db(data_dir) as db:
        db.execute("UPDATE certificates SET der = ? WHERE purpose = 'audit'", ((tmp_path / "c.pem").read_bytes(),))
    proc = admin(data_dir, "verify")
    assert proc.returncode != 0 and "was replaced" in proc.stderr


@pytest.mark.parametrize("tamper", ["edit", "delete middle", "reorder"])
def test_older_tampering_still_detected(data_dir: Path, tamper: str) -> None:
    with _db(data_dir) as db:
        if tamper == "edit":
            db.execute("UPDATE audit_records SET user_name = 'mallory' WHERE seq = 3")
        elif tamper == "delete middle":
            db.execute("DELETE FROM audit_records WHERE seq = 4")
        else:
            first, second = (db.execute("SELECT digest FROM audit_records WHERE seq = ?", (s,)).fetchone()[0] for s in (2, 6))
            db.execute("UPDATE audit_records SET digest = ? WHERE seq = 2", (second,))
            db.execute("UPDATE audit_records SET digest = ? WHERE seq = 6", (first,))
    _tampered(data_dir)


def _offline(export: Path, certificate: Path, *kept: Path) -> subprocess.CompletedProcess[str]:
    extra = [arg for path in kept for arg in ("--kept", str(path))]
    return signbridge("audit", "verify", "--export", str(export), "--cert", str(certificate), *extra, check=False)


def test_offline_verification_of_an_export(data_dir: Path, tmp_path: Path) -> None:
    certificate = tmp_path / "checkpoint.pem"
    certificate.write_text(admin(data_dir, "certificate", check=True).stdout)
    export = tmp_path / "export.jsonl"
    admin(data_dir, "export", "--json", "--output", str(export), check=True)
    proc = _offline(export, certificate)
    assert proc.returncode == 0 and f"{RECORDS} records, chain verified" in proc.stdout, proc.stderr

    lines = [json.loads(line) for line in export.read_text().splitlines()]
    records = [line for line in lines if "checkpoint" not in line]
    assert [r["seq"] for r in records] == list(range(1, RECORDS + 1))

    # An insider edits record 2 and recomputes the chain, then writes a new export.
    edited = [dict(r) for r in records]
    edited[1]["user_name"] = "mallory"
    prev = edited[0]["record_hash"]
    for record in edited[1:]:
        record["prev_hash"] = prev
        record["record_hash"] = record_hash(record["seq"], prev, {k: record.get(k) for k in ENTRY_FIELDS})
        prev = record["record_hash"]
    forged = tmp_path / "forged.jsonl"
    checkpoints = [line for line in lines if "checkpoint" in line]
    forged.write_text("".join(json.dumps(line) + "\n" for line in [*edited, *checkpoints]))
    proc = _offline(forged, certificate)
    assert proc.returncode == 1 and "differs from its signed checkpoint" in proc.stderr

    # Without its checkpoints the forged export looks intact, but not next to the export the auditor kept.
    stripped = tmp_path / "stripped.jsonl"
    stripped.write_text("".join(json.dumps(line) + "\n" for line in edited))
    assert _offline(stripped, certificate).returncode == 0
    proc = _offline(stripped, certificate, export)
    assert proc.returncode == 1 and "differs from its signed checkpoint" in proc.stderr


def test_offline_verification_refuses_bad_input(tmp_path: Path, data_dir: Path) -> None:
    certificate = tmp_path / "checkpoint.pem"
    certificate.write_text(admin(data_dir, "certificate", check=True).stdout)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"seq": 1}\n')
    proc = _offline(bad, certificate)
    assert proc.returncode != 0 and "neither an audit record nor a checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr
    bad.write_text("[" * 10000 + "\n")
    proc = _offline(bad, certificate)
    assert proc.returncode != 0 and "not a JSON object" in proc.stderr and "Traceback" not in proc.stderr
