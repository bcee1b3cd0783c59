"""Audit exports (JSON lines) and verifying the chain against signed checkpoints.

An export holds one record per line, in sequence order, each followed by the checkpoints that
cover it as lines of the form ``{"checkpoint": {...}}``. It carries everything needed to verify
the log without the database: :func:`verify_export` checks the chain, and every checkpoint
against the checkpoint certificate the auditor pinned. Checkpoints from exports the auditor kept
earlier (``kept``) must still hold, which shows records deleted together with their checkpoints.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from sqlalchemy import Engine

from ..errors import AuditError
from .audit import VerifyResult, iter_records, verify, verify_records
from .checkpoints import Checkpoint, check_signatures, iter_checkpoints

MAX_LINE = 1024 * 1024


@dataclass
class AuditExport:
    records: list[dict]
    checkpoints: list[Checkpoint]


@dataclass
class CheckedLog:
    """A chain verification with what the checkpoints added to it."""

    result: VerifyResult
    checkpoints: int
    newest: Checkpoint | None

    @property
    def ok(self) -> bool:
        return self.result.ok

    def summary(self) -> dict:
        return {
            "records": self.result.records,
            "ok": self.result.ok,
            "problems": self.result.problems,
            "checkpoints": self.checkpoints,
            "newestCheckpoint": None if self.newest is None else {"seq": self.newest.seq, "time": self.newest.time},
        }


def export_lines(engine: Engine) -> Iterator[str]:
    """The export, line by line."""
    pending = list(iter_checkpoints(engine))
    pending.reverse()
    for record in iter_records(engine):
        yield json.dumps(record, default=str, sort_keys=True) + "\n"
        while pending and pending[-1].seq <= record["seq"]:
            yield json.dumps({"checkpoint": pending.pop().to_json()}, sort_keys=True) + "\n"
    for checkpoint in reversed(pending):
        yield json.dumps({"checkpoint": checkpoint.to_json()}, sort_keys=True) + "\n"


def read_export(path: Path) -> AuditExport:
    """Parse an export written by :func:`export_lines`."""
    records: list[dict] = []
    checkpoints: list[Checkpoint] = []
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise AuditError(f"cannot read the audit export {path}: {exc.strerror}") from None
    with handle:
        for number, line in enumerate(handle, start=1):
            if len(line) > MAX_LINE:
                raise AuditError(f"{path}, line {number}: the line is longer than an audit record can be")
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except (ValueError, RecursionError):
                raise AuditError(f"{path}, line {number}: not a JSON object") from None
            if not isinstance(value, dict):
                raise AuditError(f"{path}, line {number}: not a JSON object")
            if "checkpoint" in value:
                checkpoints.append(Checkpoint.from_json(value["checkpoint"]))
            elif isinstance(value.get("seq"), int) and isinstance(value.get("prev_hash"), str) and isinstance(value.get("record_hash"), str):
                records.append(value)
            else:
                raise AuditError(f"{path}, line {number}: neither an audit record nor a checkpoint")
    return AuditExport(records, checkpoints)


def kept_checkpoints(paths: Sequence[Path]) -> list[Checkpoint]:
    """The checkpoints of earlier exports an auditor kept."""
    return [checkpoint for path in paths for checkpoint in read_export(path).checkpoints]


def _checked(
    own: Sequence[Checkpoint],
    kept: Sequence[Checkpoint],
    certificate: x509.Certificate,
    verify_chain: Callable[[dict[int, str]], VerifyResult],
) -> CheckedLog:
    trusted, problems = check_signatures([*own, *kept], certificate)
    result = verify_chain(trusted)
    result.problems.extend(problems)
    own_seqs = {(c.seq, c.record_hash) for c in own}
    for checkpoint in kept:
        if (checkpoint.seq, checkpoint.record_hash) not in own_seqs and checkpoint.seq in trusted:
            result.problems.append(
                f"the checkpoint at record {checkpoint.seq} ({checkpoint.time}) that the auditor kept is gone from the log"
            )
    newest = max(own, key=lambda c: c.seq, default=None)
    return CheckedLog(result, len(own), newest)


def verify_database(engine: Engine, certificate: x509.Certificate, kept: Sequence[Checkpoint] = ()) -> CheckedLog:
    """The database's chain, against its checkpoints and the ``kept`` ones, signed by ``certificate``."""
    own = list(iter_checkpoints(engine))
    return _checked(own, kept, certificate, lambda trusted: verify(engine, trusted=trusted))


def verify_export(export: AuditExport, certificate: x509.Certificate, kept: Sequence[Checkpoint] = ()) -> CheckedLog:
    """An export's chain, against its checkpoints and the ``kept`` ones, signed by ``certificate``."""
    return _checked(export.checkpoints, kept, certificate, lambda trusted: verify_records(export.records, trusted=trusted))
