"""The audit log: chained, durable before the signature leaves, tamper-evident, complete on SIGTERM."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import signal
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest

from servicekit import init_demo, signbridge
from signbridge.server.audit import AuditEntry, AuditWriter, ensure_head, verify
from signbridge.server.database import create_schema, open_engine
from signbridge.server.process import ServiceProcess

H32 = base64.b64encode(bytes(32)).decode()


def _engine(path: Path):
    engine = open_engine(f"sqlite:///{path}")
    create_schema(engine)
    ensure_head(engine)
    return engine


def test_concurrent_appends_form_one_chain(tmp_path: Path) -> None:
    engine = _engine(tmp_path / "a.db")
    writer = AuditWriter(engine)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        seqs = list(pool.map(lambda i: writer.append_sync(AuditEntry("granted", 200, digest=f"{i:064x}")), range(500)))
    writer.close()
    assert sorted(seqs) == list(range(1, 501))
    result = verify(engine)
    assert result.ok and result.records == 500


def test_two_writers_on_one_database_share_the_chain(tmp_path: Path) -> None:
    """Two service processes (here: two engines) append to one chain without forking it."""
    first, second = _engine(tmp_path / "b.db"), open_engine(f"sqlite:///{tmp_path / 'b.db'}")
    writers = [AuditWriter(first), AuditWriter(second)]
    threads = [threading.Thread(target=lambda w=w: [w.append_sync(AuditEntry("granted", 200)) for _ in range(100)]) for w in writers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for writer in writers:
        writer.close()
    assert verify(first).ok and verify(first).records == 200


def test_closed_writer_refuses(tmp_path: Path) -> None:
    writer = AuditWriter(_engine(tmp_path / "c.db"))
    writer.close()
    with pytest.raises(Exception, match="closed"):
        writer.submit(AuditEntry("granted", 200))


@pytest.fixture
def populated(tmp_path: Path) -> Path:
    engine = _engine(tmp_path / "d.db")
    writer = AuditWriter(engine)
    for i in range(6):
        writer.append_sync(AuditEntry("granted", 200, user_name=f"user{i}", digest=f"{i:064x}"))
    writer.close()
    engine.dispose()
    (tmp_path / "server.json").write_text(json.dumps({"databaseUrl": f"sqlite:///{tmp_path / 'd.db'}"}))
    return tmp_path


def _verify_cli(data_dir: Path):
    return signbridge("admin", "--data-dir", str(data_dir), "audit", "verify", check=False)


def test_verify_intact(populated: Path) -> None:
    proc = _verify_cli(populated)
    assert proc.returncode == 0 and "6 records" in proc.stdout


def test_edited_record_detected(populated: Path) -> None:
    with sqlite3.connect(populated / "d.db") as db:
        db.execute("UPDATE audit_records SET user_name = 'mallory' WHERE seq = 3")
    proc = _verify_cli(populated)
    assert proc.returncode == 1 and "record 3 was modified" in proc.stderr


def test_deleted_record_detected(populated: Path) -> None:
    with sqlite3.connect(populated / "d.db") as db:
        db.execute("DELETE FROM audit_records WHERE seq = 4")
    proc = _verify_cli(populated)
    assert proc.returncode == 1 and "records 4..4 are missing" in proc.stderr


def test_deleted_last_record_detected(populated: Path) -> None:
    with sqlite3.connect(populated / "d.db") as db:
        db.execute("DELETE FROM audit_records WHERE seq = 6")
    proc = _verify_cli(populated)
    assert proc.returncode == 1 and "records deleted at the end" in proc.stderr


def test_reordered_records_detected(populated: Path) -> None:
    with sqlite3.connect(populated / "d.db") as db:
        rows = {r[0]: r for r in db.execute("SELECT seq, time, user_name, digest, prev_hash, record_hash FROM audit_records")}
        for target, source in ((2, 5), (5, 2)):
            _, time_, user, digest, prev, record = rows[source]
            db.execute("UPDATE audit_records SET time=?, user_name=?, digest=?, prev_hash=?, record_hash=? WHERE seq=?",
                       (time_, user, digest, prev, record, target))
    proc = _verify_cli(populated)
    assert proc.returncode == 1 and "does not follow" in proc.stderr


def test_export_is_json_lines(populated: Path, tmp_path: Path) -> None:
    out = tmp_path / "export.jsonl"
    signbridge("admin", "--data-dir", str(populated), "audit", "export", "--json", "--output", str(out))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["seq"] for r in lines] == list(range(1, 7))
    assert all(len(r["record_hash"]) == 64 for r in lines)


def test_sigterm_loses_no_audit_record(tmp_path: Path) -> None:
    """Signatures returned to clients while the service is being stopped all have their records."""
    data_dir = tmp_path / "data"
    info = init_demo(data_dir)
    process = ServiceProcess(data_dir).start()
    url = f"{process.api_url}/v1/{info['organizationId']}/SigningRequests/SignHash"
    headers = {"Authorization": f"Bearer {info['apiToken']}"}
    granted: list[str] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(headers=headers, timeout=10) as http:
            while not stop.is_set():
                body = {"projectSlug": "demo", "signingPolicySlug": "release-signing",
                        "hashSigningData": {"hash": H32, "signatureAlgorithm": "Rsa", "rsaOptions": {"hashAlgorithmName": "Sha256"}}}
                try:
                    response = http.post(url, json=body)
                except httpx.TransportError:
                    return
                if response.status_code == 200:
                    granted.append(response.json()["signingRequestId"])

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    process.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    code = process.process.wait(30)  # type: ignore[union-attr]
    stop.set()
    for thread in threads:
        thread.join()
    assert code in (0, -signal.SIGTERM)
    assert len(granted) > 20
    records = json.loads(signbridge("admin", "--data-dir", str(data_dir), "audit", "list", "--json", "--limit", "1000000").stdout)
    recorded = {r["request_id"] for r in records if r["outcome"] == "granted"}
    assert set(granted) <= recorded
    assert "intact" in signbridge("admin", "--data-dir", str(data_dir), "audit", "verify").stdout
