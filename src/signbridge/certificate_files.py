"""Reading certificates from files: one PEM file with one or several certificates, or one DER file."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509

from .errors import SignbridgeError


def read_certificates(
    path: Path, *, role: str = "certificate file", error: type[SignbridgeError] = SignbridgeError
) -> list[x509.Certificate]:
    """The certificates in ``path``; anything unreadable is ``error`` naming the ``role`` and the file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise error(f"cannot read the {role} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN" in data:
        try:
            return x509.load_pem_x509_certificates(data)
        except ValueError:
            raise error(f"the {role} {path} holds no readable PEM certificate") from None
    if not data.strip():
        raise error(f"the {role} {path} is empty")
    try:
        return [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise error(f"the {role} {path} is neither a PEM nor a DER certificate") from None
