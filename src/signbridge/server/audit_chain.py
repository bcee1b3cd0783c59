"""The audit chain: what a record holds, how its hash chains it to the one before, and how records are appended.

Below both the audit log (:mod:`.audit`, which batches records and reads the chain back) and the
audit writer process (:mod:`.audit_writer`, which appends them).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import BinaryIO

from sqlalchemy import Connection, Engine, insert, select
from sqlalchemy.pool import PoolProxiedConnection

from ..errors import AuditError
from .database import driver_sql, writing
from .models import AuditHead

GENESIS = "0" * 64


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
    lock file for every batch cost as much as hashing and inserting its records. It talks to the
    database driver itself: SQLAlchemy's execution and result layers cost as much again."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock_path = _lock_path(engine)
        self._lock: BinaryIO | None = None
        self._connection: PoolProxiedConnection | None = None
        sqlite = engine.dialect.name == "sqlite"
        # SQLite connections run in autocommit (see .database): a writer takes the lock when it begins.
        self._begin_sql = "BEGIN IMMEDIATE" if sqlite else None
        self._head_sql = driver_sql(engine, _HEAD_SQL if sqlite else _HEAD_SQL + " FOR UPDATE")
        self._insert_sql = driver_sql(engine, _INSERT_SQL)
        self._update_sql = driver_sql(engine, _UPDATE_SQL)

    def append(self, rows: Sequence[tuple]) -> list[int]:
        """Append ``rows`` (see :func:`entry_row`) in one transaction; returns their sequence numbers."""
        try:
            if self._lock is None and self._lock_path is not None:
                self._lock = open(self._lock_path, "a+b")  # noqa: SIM115 - kept open until close()
            if self._connection is None:
                self._connection = self._engine.raw_connection()
            if self._lock is not None:
                fcntl.flock(self._lock, fcntl.LOCK_EX)
            try:
                return self._append(self._connection, rows)
            finally:
                if self._lock is not None:
                    fcntl.flock(self._lock, fcntl.LOCK_UN)
        except BaseException:
            self.close()  # the next batch starts on a fresh connection (the pool rolls this one back)
            raise

    def _append(self, connection: PoolProxiedConnection, rows: Sequence[tuple]) -> list[int]:
        cursor = connection.cursor()
        try:
            if self._begin_sql is not None:
                cursor.execute(self._begin_sql)
            cursor.execute(self._head_sql)
            head = cursor.fetchone()
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
            cursor.executemany(self._insert_sql, records)
            cursor.execute(self._update_sql, (seq, prev))
            connection.commit()
        finally:
            cursor.close()
        return list(range(first + 1, seq + 1))

    def close(self) -> None:
        connection, self._connection = self._connection, None
        lock, self._lock = self._lock, None
        if connection is not None:
            connection.close()
        if lock is not None:
            lock.close()
