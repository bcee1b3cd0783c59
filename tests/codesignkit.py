"""Helpers for the codesign tests: identities with local keys, a local RFC 3161 authority over HTTP,
independent views of signatures (struct, openssl, llvm-objdump, LIEF) and the command line.

Nothing here uses signbridge's own signature parsing: the SuperBlob is walked with struct, the
CMS is checked by openssl, the timestamp by ``openssl ts -verify``.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import plistlib
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.x509.oid import ExtendedKeyUsageOID

from conftest import ROOT, require_tool, run
from signbridge.crypto.identity import Identity
from signbridge.crypto.signatures import EcdsaFormat, SignatureRequest
from signbridge.crypto.timestamp_requests import QUERY_CONTENT_TYPE, REPLY_CONTENT_TYPE
from signbridge.server.timestamp_authority import TimestampAuthority
from tokenkit import (
    ApplePki,
    KeyedCertificate,
    TestToken,
    apple_name,
    issue,
    rsa_key,
    serve_token,
    use_runtime_dir,
)

SUPERBLOB = 0xFADE0CC0
CODE_DIRECTORY = 0xFADE0C02
BLOB_WRAPPER = 0xFADE0B01
LC_CODE_SIGNATURE = 0x1D


# --- identities -----------------------------------------------------------------------------------


@dataclass
class RecordingSigner:
    """Signs with a local key and records every request (what would leave the machine)."""

    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = field(repr=False)
    requests: list[SignatureRequest] = field(default_factory=list)

    def __call__(self, request: SignatureRequest) -> bytes:
        self.requests.append(request)
        prehashed = utils.Prehashed(request.hash_algorithm.cryptography_hash())
        if isinstance(self.key, rsa.RSAPrivateKey):
            return self.key.sign(request.digest, padding.PKCS1v15(), prehashed)
        der = self.key.sign(request.digest, ec.ECDSA(prehashed))
        assert request.ecdsa_format is EcdsaFormat.ASN1
        return der


def local_identity(pki: ApplePki, leaf: KeyedCertificate | None = None) -> tuple[Identity, RecordingSigner]:
    """The PKI's application identity (or ``leaf``) with its chain, signing with the local key."""
    leaf = leaf or pki.application
    signer = RecordingSigner(leaf.key)
    chain = (pki.intermediate.certificate, pki.root.certificate)
    return Identity(leaf.certificate, chain, signer, "local"), signer


def pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def isolate_codesign(directory: Path, monkeypatch, anchor: x509.Certificate) -> None:
    """A runtime directory for the tokens under ``directory``, ``anchor`` as the only trust anchor,
    no configured TSA and no config file."""
    use_runtime_dir(directory, monkeypatch)
    anchors = directory / "anchors.pem"
    anchors.write_bytes(pem(anchor))
    monkeypatch.setenv("SIGNBRIDGE_ANCHORS", str(anchors))
    monkeypatch.delenv("SIGNBRIDGE_TIMESTAMP_URL", raising=False)
    monkeypatch.setenv("SIGNPATH_CONFIG_FILE", str(directory / "no-config.json"))
    (directory / "no-config.json").write_text("{}")


# --- a timestamp authority on loopback ------------------------------------------------------------


@dataclass(frozen=True)
class LocalTsa:
    url: str
    root: x509.Certificate
    certificate: x509.Certificate
    requests: list[bytes]


@contextmanager
def local_tsa() -> Iterator[LocalTsa]:
    """signbridge's RFC 3161 authority (server/tsa.py) behind http.server on 127.0.0.1."""
    root = issue(apple_name("Test TSA Root", "Test TSA"), rsa_key(), None, ca=True)
    key = rsa_key()
    name = apple_name("Test Timestamp Authority", "Test TSA")
    leaf = issue(name, key, root, ekus=[ExtendedKeyUsageOID.TIME_STAMPING])

    def sign(request: SignatureRequest) -> bytes:
        prehashed = utils.Prehashed(request.hash_algorithm.cryptography_hash())
        return key.sign(request.digest, padding.PKCS1v15(), prehashed)

    authority = TimestampAuthority(leaf.certificate, [root.certificate], sign)
    requests: list[bytes] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            assert self.headers.get("Content-Type") == QUERY_CONTENT_TYPE
            requests.append(body)
            reply = authority.respond(body)
            self.send_response(200)
            self.send_header("Content-Type", REPLY_CONTENT_TYPE)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/ts"
        yield LocalTsa(url, root.certificate, leaf.certificate, requests)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextmanager
def token_and_anchors(
    directory: Path, monkeypatch, pki: ApplePki, *anchors: x509.Certificate
) -> Iterator[TestToken]:
    """A token serving ``pki``'s identities in a runtime directory under ``directory``, with its
    root and ``anchors`` as the trust anchors, and no configured timestamp authority."""
    use_runtime_dir(directory, monkeypatch)
    path = directory / "anchors.pem"
    path.write_bytes(b"".join(pem(certificate) for certificate in (pki.root.certificate, *anchors)))
    monkeypatch.setenv("SIGNBRIDGE_ANCHORS", str(path))
    monkeypatch.delenv("SIGNBRIDGE_TIMESTAMP_URL", raising=False)
    monkeypatch.setenv("SIGNPATH_CONFIG_FILE", str(directory / "no-config.json"))
    (directory / "no-config.json").write_text("{}")
    with serve_token("alpha", pki.identities, pki.authorities) as running:
        yield running


# --- independent views: struct --------------------------------------------------------------------


def slices(data: bytes) -> list[tuple[int, int]]:
    """(offset, size) of each Mach-O slice, from the fat header or the whole file."""
    magic = struct.unpack_from(">I", data)[0]
    if magic == 0xCAFEBABE:
        count = struct.unpack_from(">I", data, 4)[0]
        return [struct.unpack_from(">II", data, 8 + 20 * n + 8) for n in range(count)]
    if magic == 0xCAFEBABF:
        count = struct.unpack_from(">I", data, 4)[0]
        return [struct.unpack_from(">QQ", data, 8 + 32 * n + 8) for n in range(count)]
    return [(0, len(data))]


def code_signature_command(image: bytes) -> tuple[int, int]:
    """(dataoff, datasize) of LC_CODE_SIGNATURE in a thin little-endian image (32- or 64-bit)."""
    ncmds = struct.unpack_from("<I", image, 16)[0]
    offset = 28 if struct.unpack_from("<I", image)[0] == 0xFEEDFACE else 32
    for _ in range(ncmds):
        cmd, size = struct.unpack_from("<II", image, offset)
        if cmd == LC_CODE_SIGNATURE:
            return struct.unpack_from("<II", image, offset + 8)
        offset += size
    raise AssertionError("no LC_CODE_SIGNATURE")


@dataclass(frozen=True)
class RawSignature:
    """A slice's signature read with struct alone."""

    image: bytes = field(repr=False)
    dataoff: int
    blobs: dict[int, bytes] = field(repr=False)  # slot -> whole blob (magic, length, payload)

    @property
    def code_directories(self) -> list[bytes]:
        slots = [0, *range(0x1000, 0x1005)]
        return [self.blobs[slot] for slot in slots if slot in self.blobs]

    @property
    def cms(self) -> bytes:
        wrapper = self.blobs[0x10000]
        return wrapper[8 : struct.unpack_from(">I", wrapper, 4)[0]]


def raw_signature(image: bytes) -> RawSignature:
    dataoff, datasize = code_signature_command(image)
    magic, _length, count = struct.unpack_from(">III", image, dataoff)
    assert magic == SUPERBLOB
    blobs = {}
    for index in range(count):
        slot, offset = struct.unpack_from(">II", image, dataoff + 12 + 8 * index)
        start = dataoff + offset
        blob_length = struct.unpack_from(">I", image, start + 4)[0]
        blobs[slot] = image[start : start + blob_length]
    return RawSignature(image, dataoff, blobs)


def raw_signatures(data: bytes) -> list[RawSignature]:
    return [raw_signature(data[offset : offset + size]) for offset, size in slices(data)]


def cd_fields(blob: bytes) -> dict[str, int | str | list[bytes]]:
    """The CodeDirectory's fields and code hashes (struct, from Apple's layout)."""
    fields = struct.unpack_from(">9I", blob)
    magic, length, version, flags, hash_offset, ident_offset, n_special, n_code, code_limit = fields
    assert magic == CODE_DIRECTORY
    hash_size, hash_type, platform, page_shift = struct.unpack_from(">BBBB", blob, 36)
    identifier = blob[ident_offset : blob.index(b"\0", ident_offset)].decode()
    team_offset = struct.unpack_from(">I", blob, 48)[0] if version >= 0x20200 else 0
    team = blob[team_offset : blob.index(b"\0", team_offset)].decode() if team_offset else ""
    runtime = struct.unpack_from(">I", blob, 88)[0] if version >= 0x20500 else 0
    hashes = [blob[hash_offset + i * hash_size : hash_offset + (i + 1) * hash_size] for i in range(n_code)]
    special = {
        slot: blob[hash_offset - slot * hash_size : hash_offset - (slot - 1) * hash_size]
        for slot in range(1, n_special + 1)
    }
    return {
        "length": length,
        "version": version,
        "flags": flags,
        "identifier": identifier,
        "team": team,
        "hash_type": hash_type,
        "hash_size": hash_size,
        "page_size": 1 << page_shift,
        "code_limit": code_limit,
        "special": special,
        "hashes": hashes,
        "runtime": runtime,
        "platform": platform,
    }


def independent_page_hashes(image: bytes, limit: int, name: str = "sha256", size: int = 32) -> list[bytes]:
    return [
        hashlib.new(name, image[start : min(start + 4096, limit)]).digest()[:size]
        for start in range(0, limit, 4096)
    ]


def cdhash(blob: bytes, name: str = "sha256") -> bytes:
    return hashlib.new(name, blob).digest()[:20]


# --- independent views: tools ---------------------------------------------------------------------


def openssl_cms_verify(
    directory: Path, cms: bytes, content: bytes, ca: x509.Certificate
) -> subprocess.CompletedProcess:
    """``openssl cms -verify -binary -inform DER -content <CodeDirectory> -CAfile root.pem``."""
    (directory / "sig.der").write_bytes(cms)
    (directory / "cd.bin").write_bytes(content)
    (directory / "ca.pem").write_bytes(pem(ca))
    return subprocess.run(
        [require_tool("openssl"), "cms", "-verify", "-binary", "-inform", "DER",
         "-in", str(directory / "sig.der"), "-content", str(directory / "cd.bin"),
         "-CAfile", str(directory / "ca.pem"), "-purpose", "any", "-ignore_critical", "-out", os.devnull],
        capture_output=True, text=True, check=False,
    )  # fmt: skip


def openssl_accepts(directory: Path, raw: RawSignature, ca: x509.Certificate) -> bool:
    """Whether openssl verifies the slice's CMS over its primary CodeDirectory, chained to ``ca``."""
    return openssl_cms_verify(directory, raw.cms, raw.code_directories[0], ca).returncode == 0


def openssl_cms_print(directory: Path, cms: bytes) -> str:
    (directory / "print.der").write_bytes(cms)
    args = [require_tool("openssl"), "cms", "-cmsout", "-print", "-inform", "DER"]
    args += ["-in", str(directory / "print.der")]
    return run(args, text=True).stdout


def openssl_ts_verify(
    directory: Path, token: bytes, digest: bytes, ca: x509.Certificate
) -> subprocess.CompletedProcess:
    """``openssl ts -verify -digest <hex> -in token -token_in -CAfile root.pem``."""
    (directory / "token.der").write_bytes(token)
    (directory / "tsa-ca.pem").write_bytes(pem(ca))
    return subprocess.run(
        [require_tool("openssl"), "ts", "-verify", "-digest", digest.hex(),
         "-in", str(directory / "token.der"), "-token_in", "-CAfile", str(directory / "tsa-ca.pem")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip


def objdump_code_signatures(path: Path) -> list[tuple[int, int]]:
    """(dataoff, datasize) of LC_CODE_SIGNATURE in every slice, as llvm-objdump prints them."""
    output = run(
        [require_tool("llvm-objdump"), "--macho", "--private-headers", "--arch=all", str(path)], text=True
    ).stdout
    found = []
    lines = output.splitlines()
    for number, line in enumerate(lines):
        if line.strip() == "cmd LC_CODE_SIGNATURE":
            fields = dict(lines[n].split() for n in range(number + 2, number + 4))
            found.append((int(fields["dataoff"]), int(fields["datasize"])))
    return found


# --- the command line -----------------------------------------------------------------------------


def codesign(
    *args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """``signbridge codesign ARGS`` in a child process (the environment is inherited)."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "signbridge", "codesign", *map(str, args)],
        capture_output=True, text=True, env=environment, cwd=cwd, check=False, timeout=600,
    )  # fmt: skip


def snapshot(path: Path) -> dict[str, tuple[int, bytes | str]]:
    """Every entry under ``path`` (or the file itself): mode and content or link target."""
    if path.is_file() and not path.is_symlink():
        return {".": (path.stat().st_mode, path.read_bytes())}
    entries: dict[str, tuple[int, bytes | str]] = {}
    for directory, dirnames, filenames in os.walk(path):
        for name in [*dirnames, *filenames]:
            item = Path(directory, name)
            relative = item.relative_to(path).as_posix()
            mode = item.lstat().st_mode
            if item.is_symlink():
                entries[relative] = (mode, os.readlink(item))
            elif item.is_file():
                entries[relative] = (mode, item.read_bytes())
            else:
                entries[relative] = (mode, "")
    return entries


def plist_bytes(value: dict) -> bytes:
    return plistlib.dumps(value)
