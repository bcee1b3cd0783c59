"""Helpers for the productsign and pkgutil tests: packages, identities, a timestamp authority over
HTTP, and independent checks of signed packages with openssl, bsdtar and a second parser.

Packages are built by the project's writer (a product archive with a Distribution file, and a
component package with PackageInfo/Bom/Payload/Scripts) and by bsdtar. Signed packages are taken
apart with xarfixtures' minimal parser (struct, zlib, ElementTree) and asn1crypto, never with the
code under test, and checked with the openssl command line.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import http.server
import os
import struct
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from asn1crypto import cms as asn1_cms
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.x509.oid import ExtendedKeyUsageOID

from conftest import ROOT, require_tool, run
from signbridge.apple.pkg.xar.writer import PackageEntry, write_package
from signbridge.crypto.identity import Identity
from signbridge.crypto.signatures import EcdsaFormat, Scheme, SignatureRequest, ecdsa_der_to_ieee
from signbridge.crypto.timestamp_requests import QUERY_CONTENT_TYPE, REPLY_CONTENT_TYPE
from signbridge.server.timestamp_authority import TimestampAuthority
from tokenkit import ApplePki, KeyedCertificate, apple_name, apple_pki, issue, rsa_key
from xarfixtures import (
    DSIG,
    PACKAGE_INFO,
    Layout,
    bsdtar_create,
    heap_bytes,
    read_layout,
    sample_files,
    write_tree,
)

MTIME = datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)  # packages are the same in every run
COMPONENT_FILES = {
    "PackageInfo": PACKAGE_INFO,
    "Bom": b"BOMStore" + bytes(range(256)) * 8,
    "Payload": hashlib.sha256(b"payload").digest() * 4000,
    "Scripts": b"#!/bin/sh\nexit 0\n",
}


# --- packages -----------------------------------------------------------------------------------


def product_archive(path: Path, *, toc_checksum: str = "sha1") -> Path:
    """A product archive (Distribution, Resources, app.pkg/...) built by the project's writer."""
    entries = [PackageEntry(name, data, compress=not name.endswith("Payload")) for name, data in sample_files().items()]
    return write_package(path, entries, toc_checksum=toc_checksum, mtime=MTIME)


def component_package(path: Path, *, toc_checksum: str = "sha1") -> Path:
    """A component package (PackageInfo, Bom, Payload, Scripts) built by the project's writer."""
    entries = [PackageEntry(name, data, compress=name != "Payload") for name, data in COMPONENT_FILES.items()]
    return write_package(path, entries, toc_checksum=toc_checksum, mtime=MTIME)


def bsdtar_package(directory: Path, name: str = "bsdtar.pkg") -> Path:
    """A product archive written by bsdtar (libarchive's xar writer, SHA-1 TOC checksum)."""
    tree = write_tree(directory / f"{name}.tree", sample_files())
    return bsdtar_create(tree, directory / name, "xar:toc-checksum=sha1")


# --- identities ---------------------------------------------------------------------------------


def local_signer(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, log: list[SignatureRequest] | None = None):
    """Signs as the token does (PKCS#1 v1.5 over the DigestInfo; ECDSA in DER) and records each request."""

    def sign(request: SignatureRequest) -> bytes:
        if log is not None:
            log.append(request)
        prehashed = utils.Prehashed(request.hash_algorithm.cryptography_hash())
        if isinstance(key, rsa.RSAPrivateKey):
            assert request.scheme is Scheme.RSA_PKCS1
            return key.sign(request.digest, padding.PKCS1v15(), prehashed)
        der = key.sign(request.digest, ec.ECDSA(prehashed))
        return ecdsa_der_to_ieee(der, key.curve) if request.ecdsa_format is EcdsaFormat.IEEE else der

    return sign


def identity_of(pki: ApplePki, leaf: KeyedCertificate | None = None, log: list | None = None) -> Identity:
    """An identity backed by a local key (the engine tests; the CLI tests use a served token)."""
    leaf = leaf or pki.installer
    chain = (pki.intermediate.certificate, pki.root.certificate)
    return Identity(leaf.certificate, chain, local_signer(leaf.key, log), "local")


@pytest.fixture(scope="module", name="pki")
def pki_fixture() -> ApplePki:
    """The ``pki`` fixture (import ``pki_fixture`` into a test module): an Apple-shaped test PKI."""
    return apple_pki()


# --- timestamp authority over HTTP --------------------------------------------------------------


@dataclass(frozen=True)
class Tsa:
    url: str
    root: x509.Certificate
    authority: TimestampAuthority


def make_authority() -> tuple[TimestampAuthority, x509.Certificate]:
    root = issue(apple_name("Test Timestamp Root CA", "Test TSA"), rsa_key(), None, ca=True)
    leaf = issue(apple_name("Test Timestamp Authority", "Test TSA"), rsa_key(), root,
                 ekus=[ExtendedKeyUsageOID.TIME_STAMPING])
    return TimestampAuthority(leaf.certificate, [root.certificate], local_signer(leaf.key)), root.certificate


class _TsaHandler(http.server.BaseHTTPRequestHandler):
    authority: TimestampAuthority

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.headers.get("Content-Type") != QUERY_CONTENT_TYPE:
            self.send_error(415)
            return
        reply = self.authority.respond(body)
        self.send_response(200)
        self.send_header("Content-Type", REPLY_CONTENT_TYPE)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        return


@contextmanager
def serve_tsa() -> Iterator[Tsa]:
    """The project's RFC 3161 authority (signbridge.server.timestamp_authority) behind http.server on loopback."""
    authority, root = make_authority()
    handler = type("Handler", (_TsaHandler,), {"authority": authority})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Tsa(f"http://127.0.0.1:{server.server_address[1]}/ts", root, authority)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="module", name="tsa")
def tsa_fixture() -> Iterator[Tsa]:
    """The ``tsa`` fixture (import ``tsa_fixture`` into a test module): :func:`serve_tsa`."""
    with serve_tsa() as served:
        yield served


# --- taking a signed package apart (independently of the code under test) ------------------------


def der_length(data: bytes) -> int:
    """The length of the DER/BER value at the start of ``data`` (indefinite lengths followed)."""
    return _tlv_end(data, 0)


def _tlv_end(data: bytes, offset: int) -> int:
    position = offset + 1
    length = data[position]
    position += 1
    if length == 0x80:
        while data[position : position + 2] != b"\0\0":
            position = _tlv_end(data, position)
        return position + 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(data[position : position + count], "big")
        position += count
    return position + length


@dataclass
class SignedParts:
    layout: Layout
    checksum_algorithm: str
    checksum: bytes
    computed_checksum: bytes
    rsa_signature: bytes | None
    cms_slot: bytes | None  # the whole <x-signature> slot
    cms: bytes | None  # the CMS without its zero padding
    rsa_certificates: list[bytes]
    cms_certificates: list[bytes]

    def slot_offset(self, tag: str) -> int:
        """File offset of the <checksum>, <signature> or <x-signature> data."""
        return self.layout.heap_offset + self.layout.slot(tag)[0]


def signed_parts(path: Path) -> SignedParts:
    layout = read_layout(path)
    toc = layout.toc_element()
    style = toc.find("checksum").get("style")
    checksum = heap_bytes(path, layout, *layout.slot("checksum"))
    data = path.read_bytes()
    compressed = data[layout.header_size : layout.heap_offset]
    rsa_signature = heap_bytes(path, layout, *layout.slot("signature")) if toc.find("signature") is not None else None
    cms_slot = heap_bytes(path, layout, *layout.slot("x-signature")) if toc.find("x-signature") is not None else None

    def certificates(tag: str) -> list[bytes]:
        element = toc.find(tag)
        if element is None:
            return []
        return [base64.b64decode(e.text) for e in element.iter(f"{DSIG}X509Certificate")]

    return SignedParts(
        layout=layout,
        checksum_algorithm=style,
        checksum=checksum,
        computed_checksum=hashlib.new(style, compressed).digest(),
        rsa_signature=rsa_signature,
        cms_slot=cms_slot,
        cms=cms_slot[: der_length(cms_slot)] if cms_slot else None,
        rsa_certificates=certificates("signature"),
        cms_certificates=certificates("x-signature"),
    )


def timestamp_token(cms_der: bytes) -> tuple[bytes, bytes]:
    """(the TimeStampToken, the signature value it covers), read with asn1crypto."""
    signer_info = asn1_cms.ContentInfo.load(cms_der)["content"]["signer_infos"][0]
    for attribute in signer_info["unsigned_attrs"]:
        if attribute["type"].dotted == "1.2.840.113549.1.9.16.2.14":
            return attribute["values"][0].dump(), signer_info["signature"].native
    raise AssertionError("the CMS carries no timestamp token")


# --- openssl ------------------------------------------------------------------------------------


def write_pem(path: Path, *certificates: x509.Certificate) -> Path:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates))
    return path


def openssl_rsa_verify(
    directory: Path, certificate_der: bytes, checksum: bytes, signature: bytes, digest: str
) -> subprocess.CompletedProcess:
    """``openssl pkeyutl -verify``: PKCS#1 v1.5 over DigestInfo(digest, checksum)."""
    openssl = require_tool("openssl")
    (directory / "leaf.der").write_bytes(certificate_der)
    run([openssl, "x509", "-inform", "DER", "-in", str(directory / "leaf.der"), "-out", str(directory / "leaf.pem")])
    (directory / "checksum.bin").write_bytes(checksum)
    (directory / "rsa.sig").write_bytes(signature)
    return subprocess.run(
        [openssl, "pkeyutl", "-verify", "-certin", "-inkey", str(directory / "leaf.pem"), "-pkeyopt",
         f"digest:{digest}", "-in", str(directory / "checksum.bin"), "-sigfile", str(directory / "rsa.sig")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip


def openssl_cms_verify(directory: Path, cms_der: bytes, content: bytes, root_pem: Path) -> subprocess.CompletedProcess:
    """``openssl cms -verify`` of the detached CMS over ``content`` against the root in ``root_pem``."""
    openssl = require_tool("openssl")
    (directory / "sig.cms").write_bytes(cms_der)
    (directory / "content.bin").write_bytes(content)
    return subprocess.run(
        [openssl, "cms", "-verify", "-binary", "-inform", "DER", "-in", str(directory / "sig.cms"), "-content",
         str(directory / "content.bin"), "-CAfile", str(root_pem), "-purpose", "any", "-ignore_critical",
         "-out", os.devnull],
        capture_output=True, text=True, check=False,
    )  # fmt: skip


def openssl_ts_verify(directory: Path, token: bytes, data: bytes, root_pem: Path) -> subprocess.CompletedProcess:
    """``openssl ts -verify`` of a TimeStampToken over ``data`` (its imprint is the hash of data)."""
    openssl = require_tool("openssl")
    (directory / "token.tst").write_bytes(token)
    (directory / "stamped.bin").write_bytes(data)
    return subprocess.run(
        [openssl, "ts", "-verify", "-token_in", "-in", str(directory / "token.tst"), "-data",
         str(directory / "stamped.bin"), "-CAfile", str(root_pem)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip


# --- running the command line -------------------------------------------------------------------


def signbridge(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``signbridge ARGS`` in a child process (exit status not checked)."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "signbridge", *args], capture_output=True, text=True, env=environment, check=False
    )


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(data)


def rewrite_toc(path: Path, edit: Callable[[bytes], bytes], *, fix_checksum: bool = False) -> None:
    """Replace the TOC by ``edit(xml)``, recompressed, with a header to match; the heap is kept, and
    so is the stored checksum unless ``fix_checksum`` (an attacker who recomputes it)."""
    data = path.read_bytes()
    magic, size, version, compressed_length, _, number = struct.unpack(">4sHHQQI", data[:28])
    xml = edit(zlib.decompress(data[size : size + compressed_length]))
    compressed = zlib.compress(xml, 9)
    heap = bytearray(data[size + compressed_length :])
    if fix_checksum:
        algorithm = {1: "sha1", 3: "sha256", 4: "sha512"}[number]
        digest = hashlib.new(algorithm, compressed).digest()
        heap[: len(digest)] = digest  # signbridge and Apple keep the checksum at heap offset 0
    header = struct.pack(">4sHHQQI", magic, size, version, len(compressed), len(xml), number)
    path.write_bytes(header + compressed + bytes(heap))
