"""Signed checkpoints of the audit chain: what an insider with database access cannot forge.

The hash chain (:mod:`.audit`) shows an edited, deleted or reordered record, but someone who can
write to the database can also recompute every hash after an edit, or delete the newest records
and rewrite the head. A checkpoint closes that gap: every so many records or seconds the service
signs the chain head's sequence number and hash with a key in the keystore (never in the
database), and, when it has a timestamp authority, timestamps the signature. Verifying the chain
against checkpoints signed by that key shows any rewrite or deletion up to the newest checkpoint,
and an auditor who keeps an export keeps its checkpoints, so deleting checkpoints shows too.

A checkpoint signs the bytes of :func:`checkpoint_message`; the key is ECDSA P-256 and its
signature DER-encoded, so ``openssl dgst -sha256 -verify`` checks one with the exported certificate.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Engine, insert, select
from sqlalchemy.orm import Session

from ..crypto.hashes import HashAlgorithm
from ..crypto.signatures import EcdsaFormat, Scheme, SignatureRequest, verify_digest_signature
from ..crypto.timestamp_requests import build_request, parse_response
from ..crypto.timestamps import parse_token
from ..errors import AuditError, SignatureError, SignbridgeError
from . import directory, pki
from .keystores import KeyRef, KeySpec, Keystore
from .models import AuditCheckpoint, AuditHead, Certificate
from .timestamp_authority import TimestampAuthority

PURPOSE = "audit"
SLUG = "audit-checkpoints"
_CONTEXT = b"signbridge audit checkpoint v1\n"


def checkpoint_message(seq: int, record_hash: str, time: str) -> bytes:
    """The bytes a checkpoint's signature covers."""
    return _CONTEXT + f"{seq}\n{record_hash}\n{time}\n".encode()


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    record_hash: str
    time: str
    signature: bytes
    certificate_sha256: str
    timestamp: bytes | None = None

    @property
    def message(self) -> bytes:
        return checkpoint_message(self.seq, self.record_hash, self.time)

    def to_json(self) -> dict:
        return {
            "seq": self.seq,
            "record_hash": self.record_hash,
            "time": self.time,
            "signature": base64.b64encode(self.signature).decode(),
            "certificate_sha256": self.certificate_sha256,
            "timestamp": base64.b64encode(self.timestamp).decode() if self.timestamp else None,
        }

    @classmethod
    def from_json(cls, value: object) -> Checkpoint:
        try:
            assert isinstance(value, dict)
            timestamp = value.get("timestamp")
            return cls(
                seq=int(value["seq"]),
                record_hash=str(value["record_hash"]),
                time=str(value["time"]),
                signature=base64.b64decode(value["signature"], validate=True),
                certificate_sha256=str(value["certificate_sha256"]),
                timestamp=base64.b64decode(timestamp, validate=True) if timestamp else None,
            )
        except (AssertionError, KeyError, TypeError, ValueError):
            raise AuditError(f"a checkpoint is malformed: {json.dumps(value, default=str)[:200]}") from None


class CheckpointError(AuditError):
    pass


# Signing


def checkpoint_row(session: Session) -> Certificate | None:
    """The checkpoint key's certificate row, if the service has one."""
    return session.scalars(select(Certificate).where(Certificate.purpose == PURPOSE).order_by(Certificate.created_at)).first()


def ensure_checkpoint_key(session: Session, keystore: Keystore) -> Certificate:
    """The service's checkpoint certificate, generating its key in the keystore the first time."""
    row = checkpoint_row(session)
    if row is not None:
        return row
    ref = keystore.generate(KeySpec.EC_P256, f"signbridge/{SLUG}")
    public_key = keystore.public_key(ref)
    certificate = pki.issue_certificate(
        subject=pki.name("signbridge audit checkpoints"),
        subject_public_key=public_key,
        issuer=None,
        issuer_public_key=public_key,
        sign=lambda request: keystore.sign(ref, request),
        extensions=[
            pki.Extension(x509.BasicConstraints(ca=False, path_length=None), critical=True),
            pki.Extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True),
        ],
        days=365 * 30,
    )
    return directory.add_certificate(
        session, organization=None, slug=SLUG, key_ref=ref, key_spec=KeySpec.EC_P256, certificate=certificate,
        purpose=PURPOSE,
    )


def checkpoint_key_certificate(session: Session, keystore: Keystore) -> x509.Certificate | None:
    """The checkpoint certificate, once it is known to hold the keystore's checkpoint key (so that a
    certificate swapped in the database cannot vouch for forged checkpoints); None if there is none."""
    row = checkpoint_row(session)
    if row is None:
        return None
    certificate = directory.load_x509(row)
    in_keystore = keystore.public_key(KeyRef.parse(row.key_ref))
    if _spki(certificate.public_key()) != _spki(in_keystore):
        raise CheckpointError(
            "the checkpoint certificate in the database does not hold the keystore's checkpoint key; "
            "it was replaced: verify an export with the certificate you kept (`signbridge audit verify`)"
        )
    return certificate


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)  # type: ignore[attr-defined]


class CheckpointSigner:
    """Signs checkpoints with the key behind ``row``, timestamped by ``tsa`` when there is one."""

    def __init__(self, row: Certificate, keystore: Keystore, tsa: TimestampAuthority | None) -> None:
        self._ref = KeyRef.parse(row.key_ref)
        self._keystore = keystore
        self._tsa = tsa
        self._fingerprint = row.sha256 or ""

    def sign(self, seq: int, record_hash: str) -> Checkpoint:
        time = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
        message = checkpoint_message(seq, record_hash, time)
        request = SignatureRequest(hashlib.sha256(message).digest(), HashAlgorithm.SHA256, Scheme.ECDSA, EcdsaFormat.ASN1)
        signature = self._keystore.sign(self._ref, request)
        timestamp = None
        if self._tsa is not None:
            query = build_request(hashlib.sha256(signature).digest(), HashAlgorithm.SHA256)
            timestamp = parse_response(self._tsa.respond(query)).der
        return Checkpoint(seq, record_hash, time, signature, self._fingerprint, timestamp)


def write_checkpoint(engine: Engine, signer: CheckpointSigner) -> Checkpoint | None:
    """Sign the chain's current head and store the checkpoint; None when the head is already covered."""
    with engine.connect() as connection:
        head = connection.execute(select(AuditHead.seq, AuditHead.record_hash).where(AuditHead.id == 1)).first()
        newest = connection.execute(select(AuditCheckpoint.seq).order_by(AuditCheckpoint.seq.desc()).limit(1)).scalar()
    if head is None or head.seq == 0 or (newest is not None and newest >= head.seq):
        return None
    checkpoint = signer.sign(head.seq, head.record_hash)
    with engine.begin() as connection:
        connection.execute(insert(AuditCheckpoint).values(**_row(checkpoint)))
    return checkpoint


def _row(checkpoint: Checkpoint) -> dict:
    return {
        "seq": checkpoint.seq,
        "record_hash": checkpoint.record_hash,
        "time": checkpoint.time,
        "signature": checkpoint.signature,
        "certificate_sha256": checkpoint.certificate_sha256,
        "timestamp": checkpoint.timestamp,
    }


def iter_checkpoints(engine: Engine) -> Iterator[Checkpoint]:
    with engine.connect() as connection:
        for row in connection.execute(select(AuditCheckpoint).order_by(AuditCheckpoint.seq, AuditCheckpoint.id)).mappings():
            yield Checkpoint(
                row["seq"], row["record_hash"], row["time"], bytes(row["signature"]), row["certificate_sha256"],
                bytes(row["timestamp"]) if row["timestamp"] is not None else None,
            )


# Verifying


def check_signatures(checkpoints: Iterable[Checkpoint], certificate: x509.Certificate) -> tuple[dict[int, str], list[str]]:
    """The (seq → record hash) of every checkpoint that ``certificate``'s key signed, and a problem
    for every one it did not (a forged or altered checkpoint)."""
    public_key = certificate.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise CheckpointError("the checkpoint certificate does not hold an ECDSA key")
    trusted: dict[int, str] = {}
    problems: list[str] = []
    for checkpoint in checkpoints:
        request = SignatureRequest(
            HashAlgorithm.SHA256.digest(checkpoint.message), HashAlgorithm.SHA256, Scheme.ECDSA, EcdsaFormat.ASN1
        )
        try:
            verify_digest_signature(public_key, request, checkpoint.signature)
        except SignatureError:
            problems.append(f"the checkpoint at record {checkpoint.seq} ({checkpoint.time}) is not signed by the checkpoint key (forged or altered)")
            continue
        if checkpoint.timestamp is not None:
            problem = _timestamp_problem(checkpoint)
            if problem:
                problems.append(problem)
        known = trusted.setdefault(checkpoint.seq, checkpoint.record_hash)
        if known != checkpoint.record_hash:
            problems.append(f"two signed checkpoints disagree about record {checkpoint.seq}")
    return trusted, problems


def _timestamp_problem(checkpoint: Checkpoint) -> str | None:
    try:
        token = parse_token(checkpoint.timestamp or b"")
        token.verify_signature()
    except SignbridgeError as exc:
        return f"the timestamp of the checkpoint at record {checkpoint.seq} does not verify: {exc}"
    if token.hash_algorithm is not HashAlgorithm.SHA256 or token.digest != hashlib.sha256(checkpoint.signature).digest():
        return f"the timestamp of the checkpoint at record {checkpoint.seq} covers something else"
    return None
