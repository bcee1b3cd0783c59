"""Reading certificates from files: one PEM file with one or several certificates, or one DER file.

Each certificate is read by :func:`signbridge.crypto.der.read_certificate`, so a certificate returned here
can be read anywhere without raising.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ..errors import SignbridgeError
from .der import read_certificate


def read_certificates(
    path: Path, *, role: str = "certificate file", error: type[SignbridgeError] = SignbridgeError
) -> list[x509.Certificate]:
    """The certificates in ``path``; anything unreadable is ``error`` naming the ``role`` and the file."""
    what = f"the {role} {path}"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise error(f"cannot read {what}: {exc.strerror or exc}") from None
    if b"-----BEGIN" in data:
        try:
            ders = [certificate.public_bytes(Encoding.DER) for certificate in x509.load_pem_x509_certificates(data)]
        except ValueError:
            raise error(f"{what} holds no readable PEM certificate") from None
        count = len(ders)
        return [
            read_certificate(der, f"certificate {number} of {what}" if count > 1 else what, error)
            for number, der in enumerate(ders, 1)
        ]
    if not data.strip():
        raise error(f"{what} is empty")
    try:
        x509.load_der_x509_certificate(data)
    except ValueError:
        raise error(f"{what} is neither a PEM nor a DER certificate") from None
    return [read_certificate(data, what, error)]
