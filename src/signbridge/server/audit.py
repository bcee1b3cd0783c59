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
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import Engine, select

from ..errors import AuditError
from .audit_chain import GENESIS, AuditEntry, entry_row, record_hash
from .audit_writer import AuditWriter
from .models import AuditHead, AuditRecord

_BATCH = 512


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
