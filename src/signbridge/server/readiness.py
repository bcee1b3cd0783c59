"""Readiness: the database and the keystore answer now (``GET /Api/readyz``).

``/Api/healthz`` says only that the process serves HTTP; readiness goes to the database and to the
keystore, past every cache, so a load balancer stops sending work to an instance that could not
sign or could not write its audit records.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError

from ..errors import KeystoreError
from .keystores import KeyRef, Keystore
from .models import AuditHead, Certificate


@dataclass
class Readiness:
    checks: dict[str, str] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return all(value == "ok" for value in self.checks.values())

    def body(self) -> dict:
        return {"status": "ready" if self.ready else "unavailable", "checks": self.checks}


def check_readiness(engine: Engine, keystore: Keystore) -> Readiness:
    """Blocking: one query, then one key looked up in the keystore."""
    result = Readiness()
    try:
        with engine.connect() as connection:
            connection.execute(select(AuditHead.seq)).first()
            key_ref = connection.execute(select(Certificate.key_ref).limit(1)).scalar()
    except SQLAlchemyError as exc:
        result.checks["database"] = f"unavailable: {_first_line(exc)}"
        result.checks["keystore"] = "not checked: the database did not answer"
        return result
    result.checks["database"] = "ok"
    if key_ref is None:
        result.checks["keystore"] = "ok"
        return result
    try:
        keystore.check(KeyRef.parse(key_ref))
    except KeystoreError as exc:
        result.checks["keystore"] = f"unavailable: {exc}"
    else:
        result.checks["keystore"] = "ok"
    return result


def _first_line(exc: SQLAlchemyError) -> str:
    original = getattr(exc, "orig", None) or exc
    text = str(original).strip().splitlines()
    return text[0] if text else type(original).__name__
