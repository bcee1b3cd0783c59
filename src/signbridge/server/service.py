"""The signing service: who may sign with which key, and the signing itself.

HTTP-free: the routes in :mod:`.app` parse requests and call these methods, which raise
:class:`~.problems.Problem` for anything the caller must be told.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import functools
import logging
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from sqlalchemy import Engine, or_, select

from ..crypto.signatures import (
    EcdsaFormat,
    Scheme,
    SignatureRequest,
    ecdsa_der_to_ieee,
    verify_digest_signature,
)
from ..errors import KeystoreError, SignatureError
from . import tokens
from .audit import AuditLog
from .audit_chain import AuditEntry
from .database import driver_sql
from .keystores import KeyRef, Keystore
from .models import Certificate, GroupMember, Project, SigningPolicy, Submitter
from .problems import Problem
from .ratelimit import RateLimiter
from .requests import HashSigningRequest

if TYPE_CHECKING:
    from .key_signer import KeySigner

log = logging.getLogger("signbridge.server")


@dataclass(frozen=True)
class Caller:
    user_id: str
    user_name: str
    organization_id: str
    token_id: str


@dataclass(frozen=True)
class Grant:
    """An authenticated caller, and the policy a request names (None when it names none or an unknown one)."""

    caller: Caller
    policy_id: str | None
    certificate_id: str | None
    allowed: bool


@dataclass(frozen=True)
class LoadedCertificate:
    row_id: str
    certificate: x509.Certificate
    der: bytes
    chain: tuple[bytes, ...]
    public_key: PublicKeyTypes
    key_ref: KeyRef
    sha256: str

    @functools.cached_property
    def policy_fields(self) -> dict[str, Any]:
        """What ``MySigningPolicies`` says of this certificate and its key (the same for every policy
        using it; built once, as a token of a thousand policies asks for all of them at start).
        Shared by every answer that lists the certificate: read it, never change it."""
        fields: dict[str, Any] = {"certificateType": "X509", "certificateBytes": base64.b64encode(self.der).decode()}
        key = self.public_key
        if isinstance(key, rsa.RSAPublicKey):
            numbers = key.public_numbers()
            fields |= {
                "keyType": "Rsa",
                "keySizeInBits": key.key_size,
                "publicKeyBytes": base64.b64encode(
                    key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
                ).decode(),
                "rsaParameters": {"publicExponent": _b64_int(numbers.e), "modulus": _b64_int(numbers.n)},
            }
        elif isinstance(key, ec.EllipticCurvePublicKey):
            fields |= {
                "keyType": "Ecdsa",
                "keySizeInBits": key.curve.key_size,
                "publicKeyBytes": base64.b64encode(
                    key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
                ).decode(),
            }
        fields["certificateChain"] = tuple(base64.b64encode(der).decode() for der in self.chain)
        return fields


@dataclass(frozen=True)
class SignResult:
    request_id: str
    signature: bytes


class SigningObserver(Protocol):
    """What the service reports besides its audit records (the service's metrics)."""

    def rate_limited(self, organization_id: str) -> None: ...

    def keystore_failed(self, backend: str) -> None: ...


class _Unobserved:
    def rate_limited(self, organization_id: str) -> None:
        return None

    def keystore_failed(self, backend: str) -> None:
        return None


class SigningService:
    def __init__(
        self, engine: Engine, keystore: Keystore, audit: AuditLog, *, rate_limit_per_minute: int = 0,
        observer: SigningObserver | None = None,
    ) -> None:
        self.observer = observer or _Unobserved()
        self.engine = engine
        self.keystore = keystore
        self.audit = audit
        self.rate_limiter = RateLimiter(rate_limit_per_minute) if rate_limit_per_minute > 0 else None
        self._certificates: dict[str, LoadedCertificate] = {}
        self._lock = threading.Lock()
        # With an embedded database and in-process keys a request is a few hundred microseconds of CPU:
        # the event loop authorizes it itself, on a database connection of its own, and hands only the
        # signature to the key signer process (see .key_signer); a thread per request would wait for the GIL.
        self.inline = engine.dialect.name == "sqlite" and keystore.signs_in_process
        self._loop_connection = engine.raw_connection() if self.inline else None
        self._authorize_sql = driver_sql(engine, _AUTHORIZE)

    def close(self) -> None:
        if self._loop_connection is not None:
            self._loop_connection.close()
            self._loop_connection = None

    # Authentication and authorization

    def authorize(
        self,
        authorization: str | None,
        organization_id: str,
        project_slug: str | None = None,
        policy_slug: str | None = None,
    ) -> Grant:
        """Check the API token and, in the same query, find the policy and whether the caller may use it."""
        if not authorization:
            raise Problem(401, "No API token was sent; send the header 'Authorization: Bearer <token>'.")
        scheme, _, credential = authorization.partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            raise Problem(401, "The Authorization header must be 'Bearer <token>'.")
        value = credential.strip().split(":", 1)[0]  # "<ApiToken>:<TrustedBuildSystemToken>" is accepted
        token_id = tokens.token_id_of(value)
        row = None
        if token_id is not None:
            row = self._fetch_one(self._authorize_sql, (project_slug, policy_slug, token_id))
        if row is None:
            raise Problem(401, "The API token is not valid.")
        secret_hash, expires_at, revoked_at, user_id, user_name, organization, policy_id, certificate_id, allowed = row
        if not tokens.matches(value, bytes(secret_hash)):
            raise Problem(401, "The API token is not valid.")
        if revoked_at is not None:
            raise Problem(401, "The API token was revoked.")
        if expires_at is not None and _parse_time(expires_at) <= dt.datetime.now(dt.UTC):
            raise Problem(401, "The API token has expired.")
        caller = Caller(user_id, user_name, organization, token_id)
        if caller.organization_id != organization_id.lower():
            raise Problem(403, f"The API token's user {caller.user_name!r} is not a member of organization {organization_id}.")
        if self.rate_limiter is not None:
            retry_after = self.rate_limiter.check(caller.token_id)
            if retry_after is not None:
                self.observer.rate_limited(caller.organization_id)
                raise Problem(
                    429,
                    f"Too many requests with this API token; try again in {retry_after} s.",
                    headers={"Retry-After": str(retry_after)},
                )
        return Grant(caller, policy_id, certificate_id, bool(allowed))

    def _fetch_one(self, sql: str, parameters: tuple) -> tuple | None:
        """One row through the driver's own cursor (no result processing): the hot path's query."""
        if self._loop_connection is not None:
            return self._loop_connection.driver_connection.execute(sql, parameters).fetchone()
        with self.engine.connect() as connection:
            cursor = connection.connection.cursor()
            try:
                cursor.execute(sql, parameters)
                return cursor.fetchone()
            finally:
                cursor.close()

    def authenticate(self, authorization: str | None, organization_id: str) -> Caller:
        return self.authorize(authorization, organization_id).caller

    # Policies

    def _submitter_clause(self, caller: Caller):  # noqa: ANN202
        groups = select(GroupMember.group_id).where(GroupMember.user_id == caller.user_id)
        return (
            select(Submitter.id)
            .where(
                Submitter.policy_id == SigningPolicy.id,
                or_(Submitter.user_id == caller.user_id, Submitter.group_id.in_(groups)),
            )
            .exists()
        )

    def my_signing_policies(
        self, caller: Caller, project_slug: str | None, policy_slug: str | None
    ) -> list[dict]:
        with self.engine.connect() as connection:
            if project_slug is not None or policy_slug is not None:
                self._check_filters(connection, caller, project_slug, policy_slug)
            statement = (
                select(SigningPolicy.id, SigningPolicy.slug, Project.slug.label("project_slug"), SigningPolicy.certificate_id)
                .join(Project, Project.id == SigningPolicy.project_id)
                .where(Project.organization_id == caller.organization_id, self._submitter_clause(caller))
                .order_by(Project.slug, SigningPolicy.slug)
            )
            if project_slug is not None:
                statement = statement.where(Project.slug == project_slug)
            if policy_slug is not None:
                statement = statement.where(SigningPolicy.slug == policy_slug)
            rows = connection.execute(statement).all()
        certificates = self._load_certificates([row.certificate_id for row in rows])
        return [
            {
                "signingPolicyId": row.id,
                "signingPolicySlug": row.slug,
                "projectSlug": row.project_slug,
                **certificates[row.certificate_id].policy_fields,
            }
            for row in rows
        ]

    def _check_filters(self, connection, caller: Caller, project_slug: str | None, policy_slug: str | None) -> None:  # noqa: ANN001
        if project_slug is not None:
            project = connection.execute(
                select(Project.id).where(Project.organization_id == caller.organization_id, Project.slug == project_slug)
            ).first()
            if project is None:
                raise Problem(404, f"There is no project with the slug {project_slug!r} in this organization.")
        if policy_slug is not None:
            statement = (
                select(SigningPolicy.id)
                .join(Project, Project.id == SigningPolicy.project_id)
                .where(Project.organization_id == caller.organization_id, SigningPolicy.slug == policy_slug)
            )
            if project_slug is not None:
                statement = statement.where(Project.slug == project_slug)
            if connection.execute(statement).first() is None:
                where = f" in project {project_slug!r}" if project_slug else ""
                raise Problem(404, f"There is no signing policy with the slug {policy_slug!r}{where}.")

    def certificate(self, certificate_id: str) -> LoadedCertificate:
        loaded = self._certificates.get(certificate_id)
        if loaded is None:
            loaded = self._load_certificates([certificate_id])[certificate_id]
        return loaded

    def _load_certificates(self, certificate_ids: list[str]) -> dict[str, LoadedCertificate]:
        """The certificates ``certificate_ids`` name, those not yet loaded read in one query."""
        missing = sorted(set(certificate_ids) - self._certificates.keys())
        if missing:
            loaded: dict[str, LoadedCertificate] = {}
            with self.engine.connect() as connection:
                for start in range(0, len(missing), _IDS_PER_QUERY):
                    batch = missing[start : start + _IDS_PER_QUERY]
                    rows = connection.execute(select(Certificate).where(Certificate.id.in_(batch))).mappings()
                    loaded |= {row["id"]: _loaded_certificate(row) for row in rows}
            if len(loaded) != len(missing):
                raise LookupError(f"no certificate with the id {sorted(set(missing) - loaded.keys())[0]!r}")
            with self._lock:
                self._certificates.update(loaded)
        return {certificate_id: self._certificates[certificate_id] for certificate_id in certificate_ids}

    def resolve_policy(self, grant: Grant, project_slug: str, policy_slug: str) -> LoadedCertificate:
        if grant.policy_id is None or grant.certificate_id is None:
            with self.engine.connect() as connection:
                self._check_filters(connection, grant.caller, project_slug, policy_slug)
            raise Problem(404, f"There is no signing policy {project_slug}/{policy_slug}.")
        if not grant.allowed:
            raise Problem(
                403,
                f"User {grant.caller.user_name!r} is not a submitter on signing policy {project_slug}/{policy_slug}.",
            )
        return self.certificate(grant.certificate_id)

    # Signing

    def sign(self, grant: Grant, request: HashSigningRequest, entry: AuditEntry) -> SignResult:
        """Sign, and complete ``entry`` as the record of the success; the caller must have the record
        committed before the signature leaves the service."""
        loaded = self.signing_key(grant, request, entry)
        return self.granted(entry, self.signature(loaded, request.signature))

    def signing_key(self, grant: Grant, request: HashSigningRequest, entry: AuditEntry) -> LoadedCertificate:
        """The certificate whose key signs ``request``, once the caller may use it for this kind of signature."""
        loaded = self.resolve_policy(grant, request.project_slug, request.policy_slug)
        entry.certificate_sha256 = loaded.sha256
        key = loaded.public_key
        wanted = request.signature
        if isinstance(key, rsa.RSAPublicKey) and wanted.scheme is Scheme.ECDSA:
            raise Problem(400, "The signing policy's key is an RSA key; use an RSA signature algorithm.", field="signatureAlgorithm")
        if isinstance(key, ec.EllipticCurvePublicKey) and wanted.scheme is not Scheme.ECDSA:
            raise Problem(400, "The signing policy's key is an ECDSA key; use the Ecdsa signature algorithm.", field="signatureAlgorithm")
        return loaded

    def signature(self, loaded: LoadedCertificate, wanted: SignatureRequest) -> bytes:
        """The keystore's signature, made in this thread, in the format ``wanted`` asks for."""
        with self._keystore_failures(loaded):
            signature = self.keystore.sign(loaded.key_ref, wanted)
            # A device can fail in ways that leak the key (a faulty RSA-CRT result) or sign with the wrong
            # key; OpenSSL already checks its own CRT results, so in-process keys skip the second check.
            if not self.keystore.signs_in_process:
                as_der = SignatureRequest(wanted.digest, wanted.hash_algorithm, wanted.scheme, EcdsaFormat.ASN1)
                verify_digest_signature(loaded.public_key, as_der, signature)
        return _in_format(loaded.public_key, wanted, signature)

    async def signature_from(self, signer: KeySigner, loaded: LoadedCertificate, wanted: SignatureRequest) -> bytes:
        """The same signature, made by the key signer process (in-process keys only)."""
        with self._keystore_failures(loaded):
            signature = await signer.sign(loaded.key_ref, wanted)
        return _in_format(loaded.public_key, wanted, signature)

    @contextlib.contextmanager
    def _keystore_failures(self, loaded: LoadedCertificate) -> Iterator[None]:
        """A keystore that cannot sign is logged, counted, and answered 503."""
        try:
            yield
        except (KeystoreError, SignatureError) as exc:
            log.error("signing with %s failed: %s", loaded.key_ref, exc)
            self.observer.keystore_failed(self.keystore.backend)
            raise Problem(503, "The keystore could not sign; try again later.", audit_outcome="failed") from None

    def granted(self, entry: AuditEntry, signature: bytes) -> SignResult:
        """Complete ``entry`` as the record of a signature made."""
        request_id = str(uuid.uuid4())
        entry.outcome, entry.status, entry.request_id = "granted", 200, request_id
        return SignResult(request_id, signature)


_IDS_PER_QUERY = 500  # bound parameters per query, well within every database's limit


def _loaded_certificate(row: Mapping[str, Any]) -> LoadedCertificate:
    certificate = x509.load_der_x509_certificate(row["der"])
    return LoadedCertificate(
        row_id=row["id"],
        certificate=certificate,
        der=row["der"],
        chain=tuple(base64.b64decode(item) for item in row["chain"]),
        public_key=certificate.public_key(),
        key_ref=KeyRef.parse(row["key_ref"]),
        sha256=row["sha256"],
    )


def _in_format(key: PublicKeyTypes, wanted: SignatureRequest, signature: bytes) -> bytes:
    """A keystore's signature (ECDSA in DER) in the format ``wanted`` asks for."""
    if isinstance(key, ec.EllipticCurvePublicKey) and wanted.ecdsa_format is EcdsaFormat.IEEE:
        return ecdsa_der_to_ieee(signature, key.curve)
    return signature


def _b64_int(value: int) -> str:
    return base64.b64encode(value.to_bytes((value.bit_length() + 7) // 8, "big")).decode()


def _parse_time(value: dt.datetime | str) -> dt.datetime:
    if isinstance(value, str):  # SQLite returns text for a raw query
        value = dt.datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


# The hot path's one query: the token, its user, the named policy, and whether the user submits to it
# (directly or through a group).
_AUTHORIZE = """
    SELECT t.secret_hash, t.expires_at, t.revoked_at,
           u.id AS user_id, u.name AS user_name, u.organization_id,
           p.id AS policy_id, p.certificate_id,
           CASE WHEN p.id IS NULL THEN 0 ELSE (
               SELECT COUNT(*) FROM submitters s
               WHERE s.policy_id = p.id AND (s.user_id = u.id OR s.group_id IN
                   (SELECT g.group_id FROM group_members g WHERE g.user_id = u.id))
           ) END AS allowed
    FROM api_tokens t
    JOIN users u ON u.id = t.user_id
    LEFT JOIN projects pr ON pr.organization_id = u.organization_id AND pr.slug = ?
    LEFT JOIN signing_policies p ON p.project_id = pr.id AND p.slug = ?
    WHERE t.id = ?
"""
