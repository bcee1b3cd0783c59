"""The tamper-evident audit log.

Every signing attempt becomes one record. Records are chained: each stores the hash of the one
before it, and its own hash covers its sequence number, its fields and that previous hash, so an
edited, deleted or reordered record breaks the chain. A record is committed (fsynced) before the
signature it describes is returned; concurrent requests share one commit (group commit).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields

from sqlalchemy import Connection, Engine, insert, select

from ..errors import AuditError
from .database import driver_sql, writing
from .models import AuditHead, AuditRecord

GENESIS = "0" * 64
_BATCH = 512
_GATHER_PAUSE = 0.0003  # seconds without a new record that end a batch
_GATHER_LIMIT = 0.002  # the longest a record waits for others


@dataclass
class AuditEntry:
    outcome: str  # granted | denied | rejected
    status: int
    organization_id: str | None = None
    user_id: str | None = None
    user_name: str | None = None
    token_id: str | None = None
    project_slug: str | None = None
    policy_slug: str | None = None
    certificate_sha256: str | None = None
    algorithm: str | None = None
    digest: str | None = None
    client_metadata: str | None = None
    remote_address: str | None = None
    reason: str | None = None
    request_id: str | None = None
    time: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="microseconds"))


ENTRY_FIELDS = tuple(f.name for f in fields(AuditEntry))


def record_hash(seq: int, prev_hash: str, values: dict) -> str:
    canonical = json.dumps(
        {"seq": seq, "prev": prev_hash, **{name: values.get(name) for name in ENTRY_FIELDS}},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


@contextlib.contextmanager
def _appending(engine: Engine) -> Iterator[Connection]:
    """A write transaction on the chain. Service processes sharing one SQLite file queue on a file
    lock first: SQLite's own busy handler would make them sleep and poll instead."""
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    with contextlib.ExitStack() as stack:
        if database and database != ":memory:":
            lock = stack.enter_context(open(f"{database}.audit-lock", "a+b"))  # noqa: SIM115
            fcntl.flock(lock, fcntl.LOCK_EX)
        connection = stack.enter_context(writing(engine.connect()))
        with connection.begin():
            yield connection


def ensure_head(engine: Engine) -> None:
    with _appending(engine) as connection:
        if connection.execute(select(AuditHead.id).where(AuditHead.id == 1)).first() is None:
            connection.execute(insert(AuditHead).values(id=1, seq=0, record_hash=GENESIS))


_COLUMNS = (*ENTRY_FIELDS, "seq", "prev_hash", "record_hash")


_HEAD_SQL = "SELECT seq, record_hash FROM audit_head WHERE id = 1"
_INSERT_SQL = f"INSERT INTO audit_records ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' for _ in _COLUMNS)})"
_UPDATE_SQL = "UPDATE audit_head SET seq = ?, record_hash = ? WHERE id = 1"


def append_batch(engine: Engine, entries: list[AuditEntry]) -> list[int]:
    """Append ``entries`` in one transaction; returns their sequence numbers."""
    head_sql = _HEAD_SQL if engine.dialect.name == "sqlite" else _HEAD_SQL + " FOR UPDATE"
    with _appending(engine) as connection:
        head = connection.exec_driver_sql(driver_sql(engine, head_sql)).first()
        if head is None:
            raise AuditError("the audit log has no head record; was the database initialized?")
        first, prev = head
        seq = first
        rows = []
        for entry in entries:
            seq += 1
            values = asdict(entry)
            digest = record_hash(seq, prev, values)
            rows.append((*(values[name] for name in ENTRY_FIELDS), seq, prev, digest))
            prev = digest
        connection.exec_driver_sql(driver_sql(engine, _INSERT_SQL), rows)
        connection.exec_driver_sql(driver_sql(engine, _UPDATE_SQL), (seq, prev))
    return list(range(first + 1, seq + 1))


class AuditWriter:
    """Appends records from many threads or tasks, committing whatever is waiting in one transaction."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._queue: queue.SimpleQueue[tuple[AuditEntry, concurrent.futures.Future[int]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._closed = False
        self._thread.start()

    def submit(self, entry: AuditEntry) -> concurrent.futures.Future[int]:
        if self._closed:
            raise AuditError("the audit log is closed")
        future: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._queue.put((entry, future))
        return future

    async def append(self, entry: AuditEntry) -> int:
        return await asyncio.wrap_future(self.submit(entry))

    def append_sync(self, entry: AuditEntry) -> int:
        return self.submit(entry).result()

    def close(self) -> None:
        """Write everything submitted so far, then stop."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            batch = []
            deadline = time.monotonic() + _GATHER_LIMIT
            while item is not None:
                batch.append(item)
                if len(batch) >= _BATCH:
                    break
                # Wait a moment for the records of requests being served right now: one commit for
                # many records costs far less than one each, and a lone request waits < 1 ms.
                wait = min(_GATHER_PAUSE, deadline - time.monotonic())
                try:
                    item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
            else:
                stopping = True
            if batch:
                self._write(batch)

    def _write(self, batch: list[tuple[AuditEntry, concurrent.futures.Future[int]]]) -> None:
        try:
            seqs = append_batch(self._engine, [entry for entry, _ in batch])
        except Exception as exc:  # noqa: BLE001 - every waiter must learn that its record was not written
            error = AuditError(f"the audit record could not be written: {exc}")
            for _, future in batch:
                future.set_exception(error)
            return
        for (_, future), seq in zip(batch, seqs, strict=True):
            future.set_result(seq)


# Reading and verifying


def iter_records(engine: Engine, *, since: int = 0, limit: int | None = None) -> Iterator[dict]:
    statement = select(AuditRecord).where(AuditRecord.seq > since).order_by(AuditRecord.seq)
    if limit is not None:
        statement = statement.limit(limit)
    with engine.connect() as connection:
        for row in connection.execute(statement).mappings():
            yield dict(row)


@dataclass
class VerifyResult:
    records: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(engine: Engine) -> VerifyResult:
    """Walk the chain and name every record that was edited, deleted or moved."""
    problems: list[str] = []
    expected_seq, prev = 1, GENESIS
    count = 0
    for row in iter_records(engine):
        count += 1
        seq = row["seq"]
        if seq != expected_seq:
            problems.append(f"records {expected_seq}..{seq - 1} are missing (deleted)")
        if row["prev_hash"] != prev:
            problems.append(f"record {seq} does not follow the record before it (deleted or reordered records)")
        if record_hash(seq, row["prev_hash"], row) != row["record_hash"]:
            problems.append(f"record {seq} was modified after it was written")
        expected_seq, prev = seq + 1, row["record_hash"]
    with engine.connect() as connection:
        head = connection.execute(select(AuditHead.seq, AuditHead.record_hash).where(AuditHead.id == 1)).first()
    if head is None:
        problems.append("the audit head record is missing")
    elif (head.seq, head.record_hash) != (expected_seq - 1, prev):
        problems.append(f"the log ends at record {expected_seq - 1} but record {head.seq} was the last written (records deleted at the end)")
    return VerifyResult(count, problems)
