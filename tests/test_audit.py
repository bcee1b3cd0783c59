"""The audit log: chained, durable before the signature leaves, tamper-evident, complete on SIGTERM."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from servicekit import SigningLoad, init_demo, signbridge
from signbridge.errors import AuditError
from signbridge.server.audit import AuditLog, verify
from signbridge.server.audit_chain import AuditEntry, ChainAppender, ensure_head, entry_row, record_hash
from signbridge.server.database import create_schema, open_engine
from signbridge.server.process import ServiceProcess

H32 = base64.b64encode(bytes(32)).decode()


def _engine(path: Path):
    engine = open_engine(f"sqlite:///{path}")
    create_schema(engine)
    ensure_head(engine)
    return engine


def _append_many(engine, entries: list[AuditEntry]) -> list[int]:
    async def run() -> list[int]:
        log = AuditLog(engine)
        seqs = await asyncio.gather(*(log.append(entry) for entry in entries))
        await log.aclose()
        return list(seqs)

    return asyncio.run(run())


def test_concurrent_appends_form_one_chain(tmp_path: Path) -> None:
    engine = _engine(tmp_path / "a.db")
    seqs = _append_many(engine, [AuditEntry("granted", 200, digest=f"{i:064x}") for i in range(500)])
    assert seqs == list(range(1, 501))  # in order of appending, without gaps
    result = verify(engine)
    assert result.ok and result.records == 500


def test_two_processes_on_one_database_share_the_chain(tmp_path: Path) -> None:
    """Two service processes append to one SQLite chain without forking it."""
    engine = _engine(tmp_path / "b.db")
    script = (
        "import sys; from test_audit import _append_many; from signbridge.server.audit_chain import AuditEntry; "
        "from signbridge.server.database import open_engine; "
        "_append_many(open_engine(sys.argv[1]), [AuditEntry('granted', 200) for _ in range(300)])"
    )
    env = {**os.environ, "PYTHONPATH": f"{Path(__file__).parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    procs = [subprocess.Popen([sys.executable, "-c", script, f"sqlite:///{tmp_path / 'b.db'}"], env=env) for _ in range(2)]
    assert [proc.wait(120) for proc in procs] == [0, 0]
    result = verify(engine)
    assert result.ok and result.records == 600


def test_closed_log_refuses(tmp_path: Path) -> None:
    async def run() -> None:
        log = AuditLog(_engine(tmp_path / "c.db"))
        await log.aclose()
        with pytest.raises(AuditError, match="closed"):
            await log.append(AuditEntry("granted", 200))

    asyncio.run(run())


def test_failed_commit_reaches_every_waiter(tmp_path: Path) -> None:
    engine = _engine(tmp_path / "e.db")
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE audit_head")

    async def run() -> list:
        log = AuditLog(engine)
        results = await asyncio.gather(*(log.append(AuditEntry("granted", 200)) for _ in range(5)), return_exceptions=True)
        await log.aclose()
        return results

    results = asyncio.run(run())
    assert all(isinstance(r, AuditError) and "could not be written" in str(r) for r in results)


def test_the_appender_keeps_its_connection_and_recovers_after_a_failed_batch(tmp_path: Path) -> None:
    engine = _engine(tmp_path / "f.db")
    appender = ChainAppender(engine)
    try:
        assert appender.append([entry_row(AuditEntry("granted", 200, digest="aa"))]) == [1]
        assert appender.append([entry_row(AuditEntry("denied", 403)) for _ in range(3)]) == [2, 3, 4]
        assert engine.pool.checkedout() == 1  # one connection, kept between batches
        with engine.begin() as connection:
            connection.exec_driver_sql("UPDATE audit_head SET id = 2 WHERE id = 1")
        with pytest.raises(AuditError, match="no head record"):
            appender.append([entry_row(AuditEntry("granted", 200))])
        assert engine.pool.checkedout() == 0  # given up, not left in a transaction
        with engine.begin() as connection:
            connection.exec_driver_sql("UPDATE audit_head SET id = 1 WHERE id = 2")
        assert appender.append([entry_row(AuditEntry("granted", 200, user_name="after"))]) == [5]
    finally:
        appender.close()
    with engine.connect() as connection:
        rows = connection.exec_driver_sql("SELECT * FROM audit_records ORDER BY seq").mappings().all()
    assert [row["seq"] for row in rows] == [1, 2, 3, 4, 5]
    assert all(row["record_hash"] == record_hash(row["seq"], row["prev_hash"], row) for row in rows)
    assert verify(engine).ok


@pytest.fixture
def populated(tmp_path: Path) -> Path:
    engine = _engine(tmp_path / "d.db")
    for i in range(6):
        _append_many(engine, [AuditEntry("granted", 200, user_name=f"user{i}", digest=f"{i:064x}")])
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
    with SigningLoad(process, info) as load:
        time.sleep(1.5)
        process.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        code = process.process.wait(30)  # type: ignore[union-attr]
    granted = load.granted
    assert code in (0, -signal.SIGTERM)
    assert len(granted) > 20
    records = json.loads(signbridge("admin", "--data-dir", str(data_dir), "audit", "list", "--json", "--limit", "1000000").stdout)
    recorded = {r["request_id"] for r in records if r["outcome"] == "granted"}
    assert set(granted) <= recorded
    assert "intact" in signbridge("admin", "--data-dir", str(data_dir), "audit", "verify").stdout
