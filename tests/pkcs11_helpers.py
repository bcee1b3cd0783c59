"""Helpers for the PKCS#11 RPC tests: a local PKI, a signer that stands in for the signing
service, a served token, and a raw-frame connection for hand-built requests."""

from __future__ import annotations

import datetime
import os
import socket
import struct
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.x509.oid import NameOID

from signbridge.crypto.signatures import EcdsaFormat, Scheme, SignatureRequest, ecdsa_der_to_ieee, pss_padding
from signbridge.pkcs11 import CallerInfo, Token, TokenObject, authority_object, objects_for_identity

CLIENT_MODULE = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
SOFTHSM_MODULE = "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"
PIN = b"CONFIG"
TOKEN_LABEL = "SignTok"
RSA_ID, RSA_LABEL = b"\x01\x02", "rsa-test"
EC_ID, EC_LABEL = b"\x0e\x0c", "ec-test"


def _certificate(common_name: str, key, issuer: x509.Name, issuer_key, *, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
        .sign(issuer_key, hashes.SHA256())
    )


@dataclass
class Pki:
    """A CA with an RSA-2048 and a P-256 code-signing certificate, written out as PEM files."""

    directory: Path
    ca_key: ec.EllipticCurvePrivateKey
    ca: x509.Certificate
    rsa_key: rsa.RSAPrivateKey
    rsa_cert: x509.Certificate
    ec_key: ec.EllipticCurvePrivateKey
    ec_cert: x509.Certificate

    @classmethod
    def create(cls, directory: Path) -> Pki:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "signbridge test CA")])
        ca = _certificate("signbridge test CA", ca_key, ca_name, ca_key, ca=True)
        rsa_key = rsa.generate_private_key(65537, 2048)
        ec_key = ec.generate_private_key(ec.SECP256R1())
        pki = cls(
            directory, ca_key, ca, rsa_key, _certificate("RSA signer", rsa_key, ca_name, ca_key, ca=False),
            ec_key, _certificate("EC signer", ec_key, ca_name, ca_key, ca=False),
        )  # fmt: skip
        for name, cert in (("ca", ca), ("rsa", pki.rsa_cert), ("ec", pki.ec_cert)):
            (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            (directory / f"{name}.pub").write_bytes(
                cert.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )
        return pki

    def path(self, name: str) -> str:
        return str(self.directory / name)


@dataclass
class RecordingSigner:
    """The test double of the signing service: signs with local keys and records every request."""

    keys: dict[bytes, object]
    calls: list[tuple[str, SignatureRequest, CallerInfo]] = field(default_factory=list)
    failure: Exception | None = None
    der_ecdsa: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, key: TokenObject, request: SignatureRequest, caller: CallerInfo) -> bytes:
        with self._lock:
            self.calls.append((key.label, request, caller))
        if self.failure is not None:
            raise self.failure
        private = self.keys[key.id]
        prehashed = utils.Prehashed(request.hash_algorithm.cryptography_hash())
        if request.scheme is Scheme.RSA_PKCS1:
            return private.sign(request.digest, padding.PKCS1v15(), prehashed)
        if request.scheme is Scheme.RSA_PSS:
            return private.sign(request.digest, pss_padding(request.hash_algorithm), prehashed)
        der = private.sign(request.digest, ec.ECDSA(prehashed))
        if self.der_ecdsa or request.ecdsa_format is EcdsaFormat.ASN1:
            return der
        return ecdsa_der_to_ieee(der, private.curve)

    def reset(self) -> None:
        with self._lock:
            self.calls.clear()
        self.failure = None


def build_token(
    pki: Pki, signer: RecordingSigner, *, label: str = TOKEN_LABEL, private: bool = True, **options
) -> Token:
    objects = [
        *objects_for_identity(pki.rsa_cert, RSA_ID, RSA_LABEL, private=private),
        *objects_for_identity(pki.ec_cert, EC_ID, EC_LABEL, private=private),
        authority_object(pki.ca),
    ]
    return Token(label, objects, signer, lambda pin: pin == PIN, **options)


def consumer_env(socket_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["P11_KIT_SERVER_ADDRESS"] = f"unix:path={socket_path}"
    env["PKCS11_MODULE_PATH"] = CLIENT_MODULE
    return env


class RawConnection:
    """A hand-driven p11-kit RPC connection: version byte, then frames of our own making.

    Over a Unix socket (``RawConnection(path)``) or a child's stdio (``RawConnection.spawn``).
    """

    def __init__(self, path: Path | None, version: int = 0, timeout: float = 10.0, process=None) -> None:
        self.process = process
        self.sock = None
        if path is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(str(path))
        self._send(bytes([version]))
        self.version = self._recv(1)[0]
        self.code = 0x10

    @classmethod
    def spawn(cls, argv: list[str], version: int = 0, env: dict[str, str] | None = None) -> RawConnection:
        process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        return cls(None, version, process=process)

    def _send(self, data: bytes) -> None:
        if self.sock is not None:
            self.sock.sendall(data)
        else:
            self.process.stdin.write(data)
            self.process.stdin.flush()

    def _recv(self, size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            if self.sock is not None:
                chunk = self.sock.recv(size - len(data))
            else:
                chunk = self.process.stdout.read1(size - len(data))
            if not chunk:
                raise EOFError("server closed the connection")
            data += chunk
        return bytes(data)

    def call(self, body: bytes) -> bytes:
        """Send one request body; return the response body (call codes must echo)."""
        self.code += 1
        self._send(struct.pack(">III", self.code, 6, len(body)) + b"client" + body)
        code, options, length = struct.unpack(">III", self._recv(12))
        assert code == self.code, (code, self.code)
        self._recv(options)
        return self._recv(length)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        if self.process is not None:
            self.process.stdin.close()
            self.process.stdout.close()
            self.process.wait(timeout=10)


def body(call_id: int, signature: str, *parts: bytes) -> bytes:
    """A request body built by hand: u32 id, u32 len + signature, arguments."""
    sig = signature.encode()
    return struct.pack(">II", call_id, len(sig)) + sig + b"".join(parts)


def u32(value: int) -> bytes:
    return struct.pack(">I", value)


def u64(value: int) -> bytes:
    return struct.pack(">Q", value)


def ay(data: bytes) -> bytes:
    return b"\x01" + u32(len(data)) + data


HANDSHAKE = b"PRIVATE-GNOME-KEYRING-PKCS11-PROTOCOL-V-1"
INITIALIZE = body(1, "ayyay", ay(HANDSHAKE), b"\x00", ay(b"\x00"))
