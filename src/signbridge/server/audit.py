"""The tamper-evident audit log.

Every signing attempt becomes one record. Records are chained: each stores the hash of the one
before it, and its own hash covers its sequence number, its fields and that previous hash, so an
edited, deleted or reordered record breaks the chain. A record is committed (fsynced) before the
signature it describes is returned; concurrent requests share one commit (group commit).
Several service processes append to one chain: SQLite writers queue on a file lock, PostgreSQL
writers on the head row's lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import BinaryIO, Protocol

from sqlalchemy import Connection, Engine, insert, select

from ..errors import AuditError
from .audit_writer import AuditWriter
from .database import driver_sql, writing
from .models import AuditHead, AuditRecord

GENESIS = "0" * 64
_BATCH = 512


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


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


def record_hash(seq: int, prev_hash: str, values: Mapping) -> str:
    """The SHA-256 of the record's canonical JSON: its fields, sequence number and previous hash, keys sorted."""
    return _canonical_hash({"seq": seq, "prev": prev_hash, **{name: values.get(name) for name in ENTRY_FIELDS}})


def _canonical_hash(values: dict) -> str:
    return hashlib.sha256(_CANONICAL.encode(values).encode()).hexdigest()


def _lock_path(engine: Engine) -> str | None:
    """The file that service processes sharing one SQLite file queue on before they append: SQLite's
    own busy handler would make them sleep and poll instead."""
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    return f"{database}.audit-lock" if database and database != ":memory:" else None


@contextlib.contextmanager
def _appending(engine: Engine) -> Iterator[Connection]:
    """A write transaction on the chain, taken behind the other service processes (see :func:`_lock_path`)."""
    path = _lock_path(engine)
    with contextlib.ExitStack() as stack:
        if path is not None:
            lock = stack.enter_context(open(path, "a+b"))  # noqa: SIM115
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


def entry_row(entry: AuditEntry) -> tuple:
    """The entry's values in ``ENTRY_FIELDS`` order."""
    values = vars(entry)
    return tuple(values[name] for name in ENTRY_FIELDS)


class ChainAppender:
    """Appends batches of records to the chain, for the one process that does (the audit writer). It
    keeps its connection and lock file open: checking a connection out of the pool and opening the
    lock file for every batch cost as much as hashing and inserting its records."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock_path = _lock_path(engine)
        self._lock: BinaryIO | None = None
        self._connection: Connection | None = None
        self._head_sql = driver_sql(engine, _HEAD_SQL if engine.dialect.name == "sqlite" else _HEAD_SQL + " FOR UPDATE")
        self._insert_sql = driver_sql(engine, _INSERT_SQL)
        self._update_sql = driver_sql(engine, _UPDATE_SQL)

    def append(self, rows: Sequence[tuple]) -> list[int]:
        """Append ``rows`` (see :func:`entry_row`) in one transaction; returns their sequence numbers."""
        try:
            if self._lock is None and self._lock_path is not None:
                self._lock = open(self._lock_path, "a+b")  # noqa: SIM115 - kept open until close()
            if self._connection is None:
                self._connection = writing(self._engine.connect())
            if self._lock is not None:
                fcntl.flock(self._lock, fcntl.LOCK_EX)
            try:
                return self._append(self._connection, rows)
            finally:
                if self._lock is not None:
                    fcntl.flock(self._lock, fcntl.LOCK_UN)
        except BaseException:
            self.close()  # the next batch starts on a fresh connection
            raise

    def _append(self, connection: Connection, rows: Sequence[tuple]) -> list[int]:
        with connection.begin():
            head = connection.exec_driver_sql(self._head_sql).first()
            if head is None:
                raise AuditError("the audit log has no head record; was the database initialized?")
            first, prev = head
            seq = first
            records = []
            for row in rows:
                seq += 1
                values = dict(zip(ENTRY_FIELDS, row, strict=True))
                values["seq"], values["prev"] = seq, prev
                digest = _canonical_hash(values)  # as record_hash(seq, prev, values), without a second dict
                records.append((*row, seq, prev, digest))
                prev = digest
            connection.exec_driver_sql(self._insert_sql, records)
            connection.exec_driver_sql(self._update_sql, (seq, prev))
        return list(range(first + 1, seq + 1))

    def close(self) -> None:
        connection, self._connection = self._connection, None
        lock, self._lock = self._lock, None
        if connection is not None:
            connection.close()
        if lock is not None:
            lock.close()


class AuditObserver(Protocol):
    """What the audit log reports as it works (the service's metrics)."""

    def audit_queue(self, depth: int) -> None: ...

    def audit_committed(self, seconds: float, ok: bool) -> None: ...


class _Unobserved:
    def audit_queue(self, depth: int) -> None:
        return None

    def audit_committed(self, seconds: float, ok: bool) -> None:
        return None


class AuditLog:
    """Appends records for the tasks of one event loop, committing whatever is waiting in one
    transaction (group commit): while one batch is being written, the next one gathers. The commits
    happen in the audit writer process (:mod:`.audit_writer`)."""

    def __init__(self, engine: Engine, observer: AuditObserver | None = None) -> None:
        self._observer = observer or _Unobserved()
        self._pending: list[tuple[AuditEntry, asyncio.Future[int]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._process = AuditWriter(engine.url.render_as_string(hide_password=False))
        self._closed = False

    async def append(self, entry: AuditEntry) -> int:
        """Returns the record's sequence number once it is committed; raises AuditError if it could not be."""
        if self._closed:
            raise AuditError("the audit log is closed")
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append((entry, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_pending())
        return await future

    async def _write_pending(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:_BATCH], self._pending[_BATCH:]
            self._observer.audit_queue(len(batch) + len(self._pending))
            started = time.perf_counter()
            try:
                seqs = await self._process.append([entry_row(entry) for entry, _ in batch])
            except AuditError as error:
                self._observer.audit_committed(time.perf_counter() - started, False)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            self._observer.audit_committed(time.perf_counter() - started, True)
            for (_, future), seq in zip(batch, seqs, strict=True):
                if not future.done():
                    future.set_result(seq)
        self._observer.audit_queue(0)

    async def aclose(self) -> None:
        """Write everything appended so far, then stop the writer process."""
        self._closed = True
        while self._writer is not None and not self._writer.done():
            await self._writer
        await self._process.aclose()


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


def verify_records(
    records: Iterable[Mapping], *, head: tuple[int, str] | None = None, trusted: Mapping[int, str] | None = None
) -> VerifyResult:
    """Walk a chain of records (from the database or an export) and name every record that was
    edited, deleted or moved. ``head`` is the (seq, hash) the database says was written last;
    ``trusted`` maps sequence numbers to the record hashes that signed checkpoints vouch for, which
    exposes what recomputing the hashes or deleting the newest records would otherwise hide."""
    trusted = trusted or {}
    problems: list[str] = []
    hashes_at: dict[int, str] = {}
    expected_seq, prev = 1, GENESIS
    count = 0
    for row in records:
        count += 1
        seq = row["seq"]
        if seq != expected_seq:
            problems.append(f"records {expected_seq}..{seq - 1} are missing (deleted)")
        if row["prev_hash"] != prev:
            problems.append(f"record {seq} does not follow the record before it (deleted or reordered records)")
        if record_hash(seq, row["prev_hash"], row) != row["record_hash"]:
            problems.append(f"record {seq} was modified after it was written")
        if seq in trusted:
            hashes_at[seq] = row["record_hash"]
        expected_seq, prev = seq + 1, row["record_hash"]
    last = expected_seq - 1
    if head is not None and head != (last, prev):
        problems.append(f"the log ends at record {last} but record {head[0]} was the last written (records deleted at the end)")
    for seq, vouched in sorted(trusted.items()):
        if seq > last:
            problems.append(
                f"records {last + 1}..{seq} are missing, but a signed checkpoint covers record {seq} (records deleted at the end)"
            )
        elif seq not in hashes_at:
            problems.append(f"record {seq} is missing, but a signed checkpoint covers it (records deleted)")
        elif hashes_at[seq] != vouched:
            problems.append(
                f"the chain up to record {seq} differs from its signed checkpoint (records edited and the hashes recomputed)"
            )
    return VerifyResult(count, problems)


def verify(engine: Engine, *, trusted: Mapping[int, str] | None = None) -> VerifyResult:
    """Verify the chain in the database (see :func:`verify_records`)."""
    with engine.connect() as connection:
        head = connection.execute(select(AuditHead.seq, AuditHead.record_hash).where(AuditHead.id == 1)).first()
    result = verify_records(iter_records(engine), head=None if head is None else (head.seq, head.record_hash), trusted=trusted)
    if head is None:
        result.problems.append("the audit head record is missing")
    return result
