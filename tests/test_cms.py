"""CMS signatures for Apple code and packages, checked against openssl in both directions.

openssl verifies what signbridge builds (with and without Apple's attributes, with a timestamp from
a local RFC 3161 authority) and prints its attributes; signbridge parses and verifies what openssl
builds (with and without signed attributes, SHA-1 and SHA-256, RSA, RSA-PSS and ECDSA, BER with
indefinite lengths, zero-padded). asn1crypto and plistlib read the structures a second time.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import http.server
import plistlib
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from asn1crypto import cms, core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from cryptography.x509.oid import ExtendedKeyUsageOID

from conftest import require_tool, run
from pkikit import EKU_CODE, Pki, certificate, make_pki, name, new_key, write_pem
from signbridge.apple.codesig.cms import (
    ATTR_APPLE_CDHASHES,
    ATTR_APPLE_CDHASHES2,
    TimestampMismatch,
    check_timestamp,
    parse_signed_data,
)
from signbridge.apple.codesig.cms_signing import (
    build_cdhashes_plist,
    build_signed_attributes,
    estimate_size,
    sign_detached,
    timestamper,
)
from signbridge.crypto.cms import (
    CmsFormatError,
    ContentDigestMismatch,
    SignatureMismatch,
    read_signed_data,
    verify_detached,
)
from signbridge.crypto.cms_builder import assemble_signed_data, signed_attributes_digest
from signbridge.crypto.hashes import HashAlgorithm
from signbridge.crypto.signatures import EcdsaFormat, Scheme, SignatureRequest, ecdsa_der_to_ieee
from signbridge.crypto.timestamp_requests import (
    QUERY_CONTENT_TYPE,
    REPLY_CONTENT_TYPE,
    build_request,
    parse_response,
)
from signbridge.errors import SignatureError
from signbridge.server.timestamp_authority import TimestampAuthority

SHA1, SHA256 = HashAlgorithm.SHA1, HashAlgorithm.SHA256
# Stand-ins for CodeDirectory blobs: the CMS signs the primary one, the cdhashes name all of them.
PRIMARY_CD = b"\xfa\xde\x0c\x02" + bytes(range(256)) * 3
ALTERNATE_CD = b"\xfa\xde\x0c\x02" + bytes(reversed(range(256))) * 3
SIGNED_AT = dt.datetime(2026, 3, 14, 15, 9, 26, tzinfo=dt.UTC)
CODE_DIRECTORY = "the code directory"
BAD_ATTRIBUTES = "the CMS signature does not match the signed attributes"
BAD_DIGEST = "the message digest in the signature does not match the code directory"


# ---------------------------------------------------------------------------------------------
# Fixtures: an Apple-shaped PKI, a timestamp authority, signers


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


def signer_for(key) -> Callable[[SignatureRequest], bytes]:
    """Signs as a token does: PKCS#1 v1.5 over DigestInfo, ECDSA in the format asked for."""

    def sign(request: SignatureRequest) -> bytes:
        prehashed = utils.Prehashed(request.hash_algorithm.cryptography_hash())
        if isinstance(key, rsa.RSAPrivateKey):
            assert request.scheme is Scheme.RSA_PKCS1
            return key.sign(request.digest, padding.PKCS1v15(), prehashed)
        assert request.scheme is Scheme.ECDSA
        der = key.sign(request.digest, ec.ECDSA(prehashed))
        return ecdsa_der_to_ieee(der, key.curve) if request.ecdsa_format is EcdsaFormat.IEEE else der

    return sign


@pytest.fixture(scope="module")
def tsa() -> tuple[TimestampAuthority, x509.Certificate]:
    root_key = new_key("p384")
    root = certificate(name("Test TSA Root"), root_key, ca=True)
    key = new_key("rsa")
    leaf = certificate(name("Test TSA"), key, root, root_key, eku=[ExtendedKeyUsageOID.TIME_STAMPING])
    return TimestampAuthority(leaf, [root], signer_for(key)), root


def local_timestamp(authority: TimestampAuthority, imprint_of: Callable[[bytes], bytes] | None = None):
    """A ``timestamp`` callable answered in-process by the authority; by default over SHA-256(signature)."""

    def stamp(signature: bytes):
        digest = imprint_of(signature) if imprint_of else hashlib.sha256(signature).digest()
        return parse_response(authority.respond(build_request(digest, SHA256, nonce=7)))

    return stamp


def apple_attributes() -> dict:
    """Apple's two cdhash attributes for a SHA-1 primary and a SHA-256 alternate CodeDirectory."""
    cdhashes = [SHA1.digest(PRIMARY_CD), SHA256.digest(ALTERNATE_CD)]
    return {
        "cdhashes_plist": build_cdhashes_plist(cdhashes),
        "cdhashes2": [(SHA1, cdhashes[0]), (SHA256, cdhashes[1])],
    }


def sign_code(pki: Pki, *, leaf=None, key=None, apple: bool = True, **options) -> bytes:
    leaf, key = leaf or pki.code, key or pki.code_key
    attributes = apple_attributes() if apple else {}
    algorithm = options.pop("hash_algorithm", SHA256)
    options.setdefault("signing_time", SIGNED_AT)
    return sign_detached(algorithm.digest(PRIMARY_CD), signer_for(key), leaf, pki.chain,
                         hash_algorithm=algorithm, **attributes, **options)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# openssl helpers


def _openssl() -> str:
    return require_tool("openssl")


def openssl_verify(
    tmp_path: Path, der: bytes, content: bytes, root: x509.Certificate
) -> subprocess.CompletedProcess:
    sig, data = tmp_path / "sig.der", tmp_path / "content.bin"
    sig.write_bytes(der)
    data.write_bytes(content)
    anchors = write_pem(tmp_path / "root.pem", root)
    args = [_openssl(), "cms", "-verify", "-binary", "-inform", "DER", "-in", str(sig), "-content", str(data),
            "-CAfile", str(anchors), "-purpose", "any", "-ignore_critical",
            "-out", str(tmp_path / "out.bin")]  # fmt: skip
    return subprocess.run(args, capture_output=True, text=True)


def openssl_print(tmp_path: Path, der: bytes) -> str:
    sig = tmp_path / "print.der"
    sig.write_bytes(der)
    return run([_openssl(), "cms", "-cmsout", "-print", "-inform", "DER", "-in", str(sig)], text=True).stdout


def openssl_sign(tmp_path: Path, content: bytes, leaf, key, chain, *options: str) -> bytes:
    data, out = tmp_path / "in.bin", tmp_path / "openssl-sig.der"
    data.write_bytes(content)
    key_pem = tmp_path / "key.pem"
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))  # fmt: skip
    args = [_openssl(), "cms", "-sign", "-binary", "-outform", "DER", "-in", str(data),
            "-signer", str(write_pem(tmp_path / "leaf.pem", leaf)), "-inkey", str(key_pem),
            "-out", str(out)]  # fmt: skip
    if chain:
        args += ["-certfile", str(write_pem(tmp_path / "chain.pem", *chain))]
    run(args + list(options))
    return out.read_bytes()


# ---------------------------------------------------------------------------------------------
# A second, independent DER reader for the tests


def read_tlv(data: bytes, offset: int) -> tuple[int, int, int]:
    """(tag, content start, end) of a definite-length TLV with a low tag number."""
    tag, length = data[offset], data[offset + 1]
    start = offset + 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(data[start : start + count], "big")
        start += count
    return tag, start, start + length


def children(data: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """(tag, offset, content start, end) of each TLV in data[start:end]."""
    found, cursor = [], start
    while cursor < end:
        tag, content, stop = read_tlv(data, cursor)
        found.append((tag, cursor, content, stop))
        cursor = stop
    return found


def to_indefinite(der: bytes, *, signed_attributes: bool = False) -> bytes:
    """Re-encode the outer layers of a DER ContentInfo with BER indefinite lengths, as Apple's
    encoder does (certificates stay DER; the signed attributes too unless asked)."""

    def convert(start: int, end: int, path: tuple[int, ...]) -> bytes:
        out = b""
        for tag, offset, content, stop in children(der, start, end):
            here = (*path, tag)
            if tag & 0x20 and _outer(here, signed_attributes):
                out += bytes([tag, 0x80]) + convert(content, stop, here) + b"\0\0"
            else:
                out += der[offset:stop]
        return out

    return convert(0, len(der), ())


def _outer(path: tuple[int, ...], signed_attributes: bool) -> bool:
    depth = len(path)
    if depth <= 4:  # ContentInfo, [0], SignedData, and SignedData's fields
        return True
    if depth == 5:  # not the certificates themselves
        return path[3] != 0xA0
    if depth == 6 and path[3] == 0x31 and path[4] == 0x30:  # a SignerInfo's attribute sets
        return path[5] == 0xA1 or (signed_attributes and path[5] == 0xA0)
    return False


def stored_signed_attributes(der: bytes) -> tuple[int, int]:
    """Offset and end of the SignerInfo's [0] signed attributes in a DER ContentInfo."""
    _, ci_start, ci_end = read_tlv(der, 0)
    explicit = children(der, ci_start, ci_end)[1]
    signed_data = children(der, explicit[2], explicit[3])[0]
    signer_infos = children(der, signed_data[2], signed_data[3])[-1]
    signer_info = children(der, signer_infos[2], signer_infos[3])[0]
    attrs = next(child for child in children(der, signer_info[2], signer_info[3]) if child[0] == 0xA0)
    return attrs[1], attrs[3]


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0xFF]) + data[index + 1 :]


# ---------------------------------------------------------------------------------------------
# Building: openssl verifies what we make


@pytest.mark.parametrize("apple", [True, False], ids=["code", "package"])
def test_openssl_verifies_detached_signature(pki, tmp_path, apple):
    der = sign_code(pki, apple=apple)
    verified = openssl_verify(tmp_path, der, PRIMARY_CD, pki.root)
    assert verified.returncode == 0, verified.stderr
    assert "Verification successful" in verified.stderr

    printed = openssl_print(tmp_path, der)
    for attribute in ("contentType", "signingTime", "messageDigest"):
        assert f"object: {attribute}" in printed
    assert "UTCTIME:Mar 14 15:09:26 2026 GMT" in printed
    assert (ATTR_APPLE_CDHASHES in printed) is apple
    assert (ATTR_APPLE_CDHASHES2 in printed) is apple
    assert "unsignedAttrs:\n          <ABSENT>" in printed

    wrong = openssl_verify(tmp_path, der, PRIMARY_CD + b"x", pki.root)
    assert wrong.returncode != 0


def test_structure_read_by_asn1crypto(pki):
    """Apple's layout: v1 SignedData, detached id-data, NULL digest parameters, issuer and serial."""
    der = sign_code(pki)
    assert b"\x30\x0d\x06\x09\x60\x86\x48\x01\x65\x03\x04\x02\x01\x05\x00" in der  # sha256 + NULL
    content_info = cms.ContentInfo.load(der)
    signed_data = content_info["content"]
    assert content_info["content_type"].native == "signed_data"
    assert signed_data["version"].native == "v1"
    assert [a["algorithm"].native for a in signed_data["digest_algorithms"]] == ["sha256"]
    assert signed_data["encap_content_info"]["content_type"].native == "data"
    assert isinstance(signed_data["encap_content_info"]["content"], core.Void)
    stored = {x509.load_der_x509_certificate(c.chosen.dump()) for c in signed_data["certificates"]}
    assert stored == {pki.code, pki.intermediate, pki.root}
    (signer_info,) = signed_data["signer_infos"]
    assert signer_info["version"].native == "v1"
    assert signer_info["sid"].name == "issuer_and_serial_number"
    assert signer_info["sid"].chosen["serial_number"].native == pki.code.serial_number
    assert signer_info["signature_algorithm"]["algorithm"].dotted == "1.2.840.113549.1.1.1"
    types = [a["type"].dotted for a in signer_info["signed_attrs"]]
    assert sorted(types) == sorted(["1.2.840.113549.1.9.3", "1.2.840.113549.1.9.5", "1.2.840.113549.1.9.4",
                                    ATTR_APPLE_CDHASHES, ATTR_APPLE_CDHASHES2])  # fmt: skip
    attributes = {a["type"].dotted: list(a["values"]) for a in signer_info["signed_attrs"]}
    assert attributes["1.2.840.113549.1.9.4"][0].native == SHA256.digest(PRIMARY_CD)

    plist = plistlib.loads(core.OctetString.load(attributes[ATTR_APPLE_CDHASHES][0].dump()).native)
    assert plist == {"cdhashes": [SHA1.digest(PRIMARY_CD), SHA256.digest(ALTERNATE_CD)[:20]]}
    agile = [core.Sequence.load(value.dump()) for value in attributes[ATTR_APPLE_CDHASHES2]]
    assert [(v[0].dotted, v[1].native) for v in agile] == [
        (SHA1.oid, SHA1.digest(PRIMARY_CD)),
        (SHA256.oid, SHA256.digest(ALTERNATE_CD)),
    ]


def test_signed_attributes_are_der(pki):
    attrs = build_signed_attributes(SHA256.digest(PRIMARY_CD), signing_time=SIGNED_AT, **apple_attributes())
    assert attrs[0] == 0x31
    assert cms.CMSAttributes.load(attrs).dump(force=True) == attrs  # asn1crypto's DER sorting agrees
    assert signed_attributes_digest(attrs, SHA256) == hashlib.sha256(attrs).digest()
    assert signed_attributes_digest(attrs, SHA1) == hashlib.sha1(attrs).digest()
    with pytest.raises(SignatureError, match="tag 0x31"):
        signed_attributes_digest(b"\xa0" + attrs[1:], SHA256)


def test_signing_time_encoding():
    digest = SHA256.digest(b"x")
    late = build_signed_attributes(digest, signing_time=dt.datetime(2051, 1, 1, tzinfo=dt.UTC))
    assert b"\x18\x0f20510101000000Z" in late  # GeneralizedTime from 2050
    naive = build_signed_attributes(digest, signing_time=dt.datetime(2026, 1, 2, 3, 4, 5, 678))
    assert b"\x17\x0d260102030405Z" in naive  # UTCTime, whole seconds, naive taken as UTC
    without = build_signed_attributes(digest, include_signing_time=False)
    assert b"\x06\x09\x2a\x86\x48\x86\xf7\x0d\x01\x09\x05" not in without


def test_cdhashes_plist_truncates_to_20_bytes():
    full = SHA256.digest(b"cd")
    assert plistlib.loads(build_cdhashes_plist([full])) == {"cdhashes": [full[:20]]}
    assert build_cdhashes_plist([full]).endswith(b"</plist>\n")
    with pytest.raises(SignatureError, match="at least 20 bytes"):
        build_cdhashes_plist([b"short"])


@pytest.mark.parametrize("algorithm", [SHA1, SHA256], ids=["sha1", "sha256"])
def test_rsa_signature_round_trip(pki, tmp_path, algorithm):
    der = sign_code(pki, hash_algorithm=algorithm)
    assert openssl_verify(tmp_path, der, PRIMARY_CD, pki.root).returncode == 0
    parsed = parse_signed_data(der)
    assert parsed.digest_algorithm is algorithm
    assert parsed.scheme is Scheme.RSA_PKCS1
    assert parsed.signer_certificate == pki.code
    assert set(parsed.chain) == {pki.intermediate, pki.root}
    assert parsed.message_digest == algorithm.digest(PRIMARY_CD)
    assert parsed.signing_time == SIGNED_AT
    assert parsed.content_type == parsed.encapsulated_content_type == "1.2.840.113549.1.7.1"
    assert parsed.cdhashes == (SHA1.digest(PRIMARY_CD), SHA256.digest(ALTERNATE_CD)[:20])
    assert parsed.cdhashes2 == ((SHA1, SHA1.digest(PRIMARY_CD)), (SHA256, SHA256.digest(ALTERNATE_CD)))
    assert parsed.timestamp is None and parsed.content is None
    verify_detached(parsed, PRIMARY_CD)
    verify_detached(parsed, content_digest=algorithm.digest(PRIMARY_CD))


@pytest.mark.parametrize("ecdsa_format", [EcdsaFormat.IEEE, EcdsaFormat.ASN1])
def test_ecdsa_signature_round_trip(pki, tmp_path, ecdsa_format):
    der = sign_code(pki, leaf=pki.ec_code, key=pki.ec_code_key, ecdsa_format=ecdsa_format)
    verified = openssl_verify(tmp_path, der, PRIMARY_CD, pki.root)
    assert verified.returncode == 0, verified.stderr
    signer_info = cms.ContentInfo.load(der)["content"]["signer_infos"][0]
    assert signer_info["signature_algorithm"]["algorithm"].native == "sha256_ecdsa"
    parsed = parse_signed_data(der)
    assert parsed.scheme is Scheme.ECDSA
    verify_detached(parsed, PRIMARY_CD)


def test_signature_without_signed_attributes(pki, tmp_path):
    der = sign_code(pki, apple=False, signed_attributes=False)
    verified = openssl_verify(tmp_path, der, PRIMARY_CD, pki.root)
    assert verified.returncode == 0, verified.stderr
    assert "signedAttrs:\n          <ABSENT>" in openssl_print(tmp_path, der)
    parsed = parse_signed_data(der)
    assert parsed.signed_attributes is None and not parsed.has_signed_attributes
    assert parsed.message_digest is parsed.signing_time is parsed.cdhashes is None
    verify_detached(parsed, PRIMARY_CD, content_name="the code directory")
    with pytest.raises(SignatureMismatch, match="^the CMS signature does not match the code directory$"):
        verify_detached(parsed, PRIMARY_CD + b"!", content_name="the code directory")
    with pytest.raises(SignatureError, match="cannot carry CDHashes"):
        sign_code(pki, signed_attributes=False)


# ---------------------------------------------------------------------------------------------
# Timestamps


def test_timestamped_signature(pki, tsa, tmp_path):
    authority, tsa_root = tsa
    der = sign_code(pki, timestamp=local_timestamp(authority))
    verified = openssl_verify(tmp_path, der, PRIMARY_CD, pki.root)
    assert verified.returncode == 0, verified.stderr
    printed = openssl_print(tmp_path, der)
    assert "object: id-smime-aa-timeStampToken (1.2.840.113549.1.9.16.2.14)" in printed

    parsed = parse_signed_data(der)
    token = parsed.timestamp
    assert token is not None
    assert token.hash_algorithm is SHA256 and token.digest == hashlib.sha256(parsed.signature).digest()
    assert check_timestamp(parsed) == token.gen_time
    assert check_timestamp(parsed, [tsa_root]) == token.gen_time
    assert abs(token.gen_time - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=5)
    verify_detached(parsed, PRIMARY_CD)
    with pytest.raises(TimestampMismatch, match="timestamp is not valid"):
        check_timestamp(parsed, [pki.root])


def test_timestamp_over_something_else_is_refused(pki, tsa):
    authority, _ = tsa
    wrong = local_timestamp(authority, imprint_of=lambda signature: hashlib.sha256(b"other").digest())
    with pytest.raises(TimestampMismatch, match="the timestamp does not cover this signature"):
        sign_code(pki, timestamp=wrong)


def test_check_timestamp_catches_a_transplanted_token(pki, tsa):
    authority, _ = tsa
    stamped = cms.ContentInfo.load(sign_code(pki, timestamp=local_timestamp(authority)))
    other = cms.ContentInfo.load(sign_code(pki, signing_time=SIGNED_AT + dt.timedelta(seconds=1)))
    unsigned = stamped["content"]["signer_infos"][0]["unsigned_attrs"]
    transplanted = cms.CMSAttributes.load(b"\x31" + unsigned.dump()[1:])
    other["content"]["signer_infos"][0]["unsigned_attrs"] = transplanted
    parsed = parse_signed_data(other.dump())
    verify_detached(parsed, PRIMARY_CD)  # the signature itself is fine
    with pytest.raises(TimestampMismatch, match="the timestamp does not cover this signature"):
        check_timestamp(parsed)


def test_check_timestamp_without_token(pki):
    with pytest.raises(SignatureError, match="has no timestamp"):
        check_timestamp(parse_signed_data(sign_code(pki)))


class _TsaHandler(http.server.BaseHTTPRequestHandler):
    authority: TimestampAuthority

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        assert self.headers.get("Content-Type") == QUERY_CONTENT_TYPE
        reply = self.authority.respond(body)
        self.send_response(200)
        self.send_header("Content-Type", REPLY_CONTENT_TYPE)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        return


@pytest.fixture
def tsa_url(tsa) -> Iterator[str]:
    handler = type("Handler", (_TsaHandler,), {"authority": tsa[0]})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/ts"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_timestamper_over_http(pki, tsa, tsa_url, tmp_path):
    der = sign_code(pki, timestamp=timestamper(tsa_url))
    assert openssl_verify(tmp_path, der, PRIMARY_CD, pki.root).returncode == 0
    parsed = parse_signed_data(der)
    assert check_timestamp(parsed, [tsa[1]]) == parsed.timestamp.gen_time


# ---------------------------------------------------------------------------------------------
# Signer mistakes are caught before anything is embedded


def test_signature_from_the_wrong_key_is_refused(pki, tsa):
    calls = []

    def stamp(signature: bytes):
        calls.append(signature)
        raise AssertionError("a bad signature must not be timestamped")

    with pytest.raises(SignatureMismatch, match="does not verify against the signing certificate's key"):
        sign_code(pki, key=new_key("rsa"), timestamp=stamp)
    assert calls == []


def test_malformed_ieee_signature_is_refused(pki):
    with pytest.raises(SignatureError, match="IEEE P1363"):
        sign_detached(SHA256.digest(PRIMARY_CD), lambda request: b"\x01" * 10, pki.ec_code, pki.chain)


def test_assemble_checks_its_inputs(pki):
    attrs = build_signed_attributes(SHA256.digest(PRIMARY_CD))
    good = signer_for(pki.code_key)(SignatureRequest(SHA256.digest(attrs), SHA256, Scheme.RSA_PKCS1))
    der = assemble_signed_data(signed_attrs_der=attrs, signature=good, signer_certificate=pki.code,
                               chain=pki.chain)  # fmt: skip
    assert parse_signed_data(der).signed_attributes == attrs
    with pytest.raises(SignatureMismatch):
        assemble_signed_data(signed_attrs_der=attrs, signature=flip(good, 5), signer_certificate=pki.code)
    with pytest.raises(SignatureError, match="needs the content digest"):
        assemble_signed_data(signed_attrs_der=None, signature=good, signer_certificate=pki.code)
    with pytest.raises(SignatureError, match="not used for Apple CMS"):
        assemble_signed_data(signed_attrs_der=attrs, signature=good, signer_certificate=pki.code,
                             signature_algorithm=Scheme.ECDSA)  # fmt: skip


def test_unsupported_key_type(pki):
    key = ed25519.Ed25519PrivateKey.generate()
    leaf = certificate(name("Ed25519"), key, pki.intermediate, pki.intermediate_key, eku=[EKU_CODE])
    with pytest.raises(SignatureError, match="need an RSA or ECDSA key"):
        sign_detached(SHA256.digest(PRIMARY_CD), lambda request: b"", leaf, pki.chain)


# ---------------------------------------------------------------------------------------------
# Reserving room


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_estimate_size_is_an_upper_bound(pki, tsa, kind):
    leaf, key = (pki.code, pki.code_key) if kind == "rsa" else (pki.ec_code, pki.ec_code_key)
    certificates = [leaf, *pki.chain]
    plain = sign_code(pki, leaf=leaf, key=key)
    stamped = sign_code(pki, leaf=leaf, key=key, timestamp=local_timestamp(tsa[0]))
    estimate = estimate_size(certificates, with_timestamp=False, code_directories=[SHA1, SHA256])
    assert len(plain) <= estimate <= len(plain) + 64
    estimate = estimate_size(certificates, with_timestamp=True, code_directories=[SHA1, SHA256])
    assert len(stamped) <= estimate
    assert estimate_size(certificates, 4096, False) > estimate_size(certificates, 2048, False)


# ---------------------------------------------------------------------------------------------
# Reading: what openssl makes, in every form Apple's tools also produce


OPENSSL_CASES = [
    pytest.param(kind, md, noattr, id=f"{kind}-{md}-{'noattr' if noattr else 'attr'}")
    for kind in ("rsa", "ec")
    for md in ("sha1", "sha256")
    for noattr in (False, True)
]


@pytest.mark.parametrize(("kind", "md", "noattr"), OPENSSL_CASES)
def test_openssl_signature_verifies(pki, tmp_path, kind, md, noattr):
    leaf, key = (pki.code, pki.code_key) if kind == "rsa" else (pki.ec_code, pki.ec_code_key)
    options = ["-md", md] + (["-noattr"] if noattr else [])
    der = openssl_sign(tmp_path, PRIMARY_CD, leaf, key, pki.chain, *options)
    algorithm = HashAlgorithm.from_name(md)

    for variant in (der, to_indefinite(der), to_indefinite(der, signed_attributes=True), der + bytes(3000)):
        parsed = parse_signed_data(variant)
        assert parsed.digest_algorithm is algorithm
        assert parsed.scheme is (Scheme.RSA_PKCS1 if kind == "rsa" else Scheme.ECDSA)
        assert parsed.signer_certificate == leaf
        assert set(parsed.certificates) == {leaf, *pki.chain}
        assert parsed.has_signed_attributes is not noattr
        verify_detached(parsed, PRIMARY_CD, content_name="the code directory")
        verify_detached(parsed, content_digest=algorithm.digest(PRIMARY_CD))
        expected = SignatureMismatch if noattr else ContentDigestMismatch
        with pytest.raises(expected):
            verify_detached(parsed, PRIMARY_CD[:-1], content_name="the code directory")
    assert to_indefinite(der) != der and b"\x30\x80" in to_indefinite(der)


def test_indefinite_length_conversion_is_valid_ber(pki, tmp_path):
    """openssl reads the BER our test helper writes, so the BER tests test real BER."""
    der = sign_code(pki)
    ber = to_indefinite(der, signed_attributes=True)
    assert openssl_verify(tmp_path, ber, PRIMARY_CD, pki.root).returncode == 0
    assert parse_signed_data(ber).signed_attributes == parse_signed_data(der).signed_attributes
    verify_detached(parse_signed_data(ber), PRIMARY_CD)


def test_openssl_streamed_signature_with_attached_content(pki, tmp_path):
    der = openssl_sign(tmp_path, PRIMARY_CD, pki.code, pki.code_key, pki.chain, "-stream", "-nodetach")
    assert der[:2] == b"\x30\x80"  # indefinite lengths
    parsed = parse_signed_data(der + bytes(16))
    assert parsed.content == PRIMARY_CD
    verify_detached(parsed)
    verify_detached(parsed, PRIMARY_CD)
    with pytest.raises(ContentDigestMismatch, match="embedded in the signature does not match"):
        verify_detached(parsed, PRIMARY_CD + b"x")


def test_openssl_rsa_pss_signature(pki, tmp_path):
    der = openssl_sign(tmp_path, PRIMARY_CD, pki.code, pki.code_key, pki.chain,
                       "-keyopt", "rsa_padding_mode:pss", "-keyopt", "rsa_pss_saltlen:32")  # fmt: skip
    parsed = parse_signed_data(der)
    assert parsed.scheme is Scheme.RSA_PSS and parsed.pss_salt_length == 32
    verify_detached(parsed, PRIMARY_CD)
    with pytest.raises(ContentDigestMismatch):
        verify_detached(parsed, b"other")


def test_signer_named_by_subject_key_identifier(pki, tmp_path):
    key = new_key("rsa")
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    leaf = certificate(name("SKI signer"), key, pki.intermediate, pki.intermediate_key, eku=[EKU_CODE],
                       extensions=[(ski, False)])  # fmt: skip
    der = openssl_sign(tmp_path, PRIMARY_CD, leaf, key, pki.chain, "-keyid")
    assert cms.ContentInfo.load(der)["content"]["signer_infos"][0]["sid"].name == "subject_key_identifier"
    parsed = parse_signed_data(der)
    assert parsed.signer_certificate == leaf
    verify_detached(parsed, PRIMARY_CD)


def test_signer_whose_issuer_is_stored_in_other_bytes(pki):
    """RFC 5280 compares names after string preparation: the string type and case do not count."""
    info = cms.ContentInfo.load(sign_code(pki))
    for edit, found in ((str.upper, True), ("{} Ltd".format, False)):
        issuer = asn1_x509.Name.load(pki.code.issuer.public_bytes())
        for relative_name in issuer.chosen:
            for attribute in relative_name:
                value = edit(attribute["value"].native)
                attribute["value"] = asn1_x509.DirectoryString(name="printable_string", value=value)
        assert issuer.dump(force=True) != pki.code.issuer.public_bytes()
        sid = {"issuer_and_serial_number": {"issuer": issuer, "serial_number": pki.code.serial_number}}
        info["content"]["signer_infos"][0]["sid"] = cms.SignerIdentifier(sid)
        if found:
            parsed = parse_signed_data(info.dump(force=True))
            assert parsed.signer_certificate == pki.code
            verify_detached(parsed, PRIMARY_CD)
        else:
            with pytest.raises(CmsFormatError, match="does not include the signer's certificate"):
                parse_signed_data(info.dump(force=True))


def test_signature_without_the_signers_certificate(pki, tmp_path):
    der = openssl_sign(tmp_path, PRIMARY_CD, pki.code, pki.code_key, [], "-nocerts")
    with pytest.raises(CmsFormatError, match="does not include the signer's certificate"):
        parse_signed_data(der)


def test_signature_algorithm_naming_another_hash_is_refused(pki, tmp_path):
    der = openssl_sign(tmp_path, PRIMARY_CD, pki.code, pki.code_key, pki.chain, "-md", "sha256")
    info = cms.ContentInfo.load(der)
    signer = info["content"]["signer_infos"][0]
    assert read_signed_data(info.dump(force=True)).digest_algorithm is SHA256
    signer["signature_algorithm"] = {"algorithm": "sha1_rsa"}
    with pytest.raises(CmsFormatError, match="names sha1, but the signer's digest algorithm is sha256"):
        read_signed_data(info.dump(force=True))


def test_two_signers_are_refused(pki, tmp_path):
    second_key = tmp_path / "second.key"
    second_key.write_bytes(pki.installer_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))  # fmt: skip
    second = write_pem(tmp_path / "second.pem", pki.installer)
    der = openssl_sign(tmp_path, PRIMARY_CD, pki.code, pki.code_key, [], "-signer", str(second),
                       "-inkey", str(second_key))  # fmt: skip
    with pytest.raises(CmsFormatError, match="has 2 signers"):
        parse_signed_data(der)


# ---------------------------------------------------------------------------------------------
# Attribute order: the stored bytes are what counts


def test_signed_attributes_out_of_der_order(pki, tmp_path):
    digest = SHA256.digest(PRIMARY_CD)
    sorted_attrs = build_signed_attributes(digest, signing_time=SIGNED_AT, **apple_attributes())
    _, start, end = read_tlv(sorted_attrs, 0)
    parts = [sorted_attrs[offset:stop] for _, offset, _, stop in children(sorted_attrs, start, end)]
    reversed_attrs = b"\x31" + sorted_attrs[1:start] + b"".join(reversed(parts))
    assert reversed_attrs != sorted_attrs and len(reversed_attrs) == len(sorted_attrs)

    prehashed = utils.Prehashed(hashes.SHA256())
    signature = pki.code_key.sign(SHA256.digest(reversed_attrs), padding.PKCS1v15(), prehashed)
    der = assemble_signed_data(signed_attrs_der=reversed_attrs, signature=signature,
                               signer_certificate=pki.code, chain=pki.chain)  # fmt: skip
    offset, stop = stored_signed_attributes(der)
    assert der[offset + 1 : stop] == reversed_attrs[1:]  # stored exactly as signed

    parsed = parse_signed_data(der)
    assert parsed.signed_attributes == reversed_attrs
    verify_detached(parsed, PRIMARY_CD)
    assert parsed.cdhashes2 == tuple(apple_attributes()["cdhashes2"])
    verified = openssl_verify(tmp_path, der, PRIMARY_CD, pki.root)
    assert verified.returncode == 0, verified.stderr

    # Re-encoding sorts the attributes, and the signature no longer covers them.
    reencoded = cms.CMSAttributes.load(reversed_attrs).dump(force=True)
    assert reencoded == sorted_attrs != reversed_attrs
    with pytest.raises(InvalidSignature):
        pki.code.public_key().verify(signature, SHA256.digest(reencoded), padding.PKCS1v15(), prehashed)
    resorted = der[: offset + 1] + reencoded[1:] + der[stop:]
    with pytest.raises(SignatureMismatch, match=f"^{BAD_ATTRIBUTES}$"):
        verify_detached(parse_signed_data(resorted), PRIMARY_CD)


# ---------------------------------------------------------------------------------------------
# Tampering: every flipped byte is caught, with the message that says where


def test_every_flipped_content_byte_is_caught(pki):
    parsed = parse_signed_data(sign_code(pki))
    for index in range(len(PRIMARY_CD)):
        with pytest.raises(ContentDigestMismatch, match=f"^{BAD_DIGEST}$"):
            verify_detached(parsed, flip(PRIMARY_CD, index), content_name="the code directory")


def header_offsets(data: bytes, start: int, end: int) -> set[int]:
    """The offsets of every tag and length byte in data[start:end], recursively."""
    offsets: set[int] = set()
    for tag, offset, content, stop in children(data, start, end):
        offsets.update(range(offset, content))
        if tag & 0x20:
            offsets |= header_offsets(data, content, stop)
    return offsets


@pytest.mark.parametrize("apple", [True, False], ids=["code", "package"])
def test_every_flipped_signed_attribute_byte_is_caught(pki, apple):
    """A flipped value byte (digest, OID, time, plist text) breaks the signature and is reported
    as such; a flipped tag or length byte may instead make the structure unreadable."""
    der = sign_code(pki, apple=apple)
    offset, stop = stored_signed_attributes(der)
    structure = header_offsets(der, offset, stop)
    for index in range(offset, stop):
        with pytest.raises(SignatureError) as caught:
            verify_detached(parse_signed_data(flip(der, index)), PRIMARY_CD, content_name=CODE_DIRECTORY)
        error = caught.value
        if index in structure:
            assert isinstance(error, CmsFormatError | SignatureMismatch), f"byte {index}: {error!r}"
        else:
            assert isinstance(error, SignatureMismatch), f"byte {index}: {error!r}"
        if isinstance(error, SignatureMismatch):
            assert str(error) == BAD_ATTRIBUTES
    assert len(structure) < (stop - offset) // 3


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_every_flipped_signature_byte_is_caught(pki, kind):
    leaf, key = (pki.code, pki.code_key) if kind == "rsa" else (pki.ec_code, pki.ec_code_key)
    der = sign_code(pki, leaf=leaf, key=key)
    signature = parse_signed_data(der).signature
    start = der.index(signature)
    for index in range(start, start + len(signature)):
        with pytest.raises(SignatureMismatch, match=f"^{BAD_ATTRIBUTES}$"):
            verify_detached(parse_signed_data(flip(der, index)), PRIMARY_CD)


def test_every_flipped_signature_byte_without_attributes(pki):
    der = sign_code(pki, apple=False, signed_attributes=False)
    signature = parse_signed_data(der).signature
    start = der.index(signature)
    for index in range(start, start + len(signature)):
        with pytest.raises(SignatureMismatch, match="^the CMS signature does not match the code directory$"):
            verify_detached(parse_signed_data(flip(der, index)), PRIMARY_CD, content_name=CODE_DIRECTORY)


# ---------------------------------------------------------------------------------------------
# Malformed input


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "is empty"),
        (bytes(64), "is empty"),
        (b"\x04\x03abc", "does not start with a SEQUENCE"),
        (b"\x30\x80" * 200 + b"\0\0" * 200, "nested too deeply"),
        (b"\x30\x85\xff\xff\xff\xff\xff", "truncated"),
        (b"\x30\x8f" + bytes(15), "invalid length"),
        (b"\x30\x03\x02\x01\x01", "malformed|ContentInfo"),
    ],
)
def test_malformed_input(data, message):
    with pytest.raises(CmsFormatError, match=message):
        parse_signed_data(data)


def test_truncated_and_garbage_tails(pki):
    der = sign_code(pki)
    with pytest.raises(CmsFormatError, match="truncated"):
        parse_signed_data(der[:-10])
    with pytest.raises(CmsFormatError, match="5 bytes follow the CMS signature and they are not zero pad"):
        parse_signed_data(der + b"\0\0\0\0\x01")


def test_not_signed_data():
    data = cms.ContentInfo({"content_type": "data", "content": b"hello"}).dump()
    with pytest.raises(CmsFormatError, match="is data, not SignedData"):
        parse_signed_data(data)


def test_verify_detached_argument_errors(pki):
    parsed = parse_signed_data(sign_code(pki))
    with pytest.raises(SignatureError, match="not both"):
        verify_detached(parsed, PRIMARY_CD, SHA256.digest(PRIMARY_CD))
    with pytest.raises(SignatureError, match="is detached"):
        verify_detached(parsed)
    with pytest.raises(SignatureError, match="uses Sha256, but a 20-byte digest was given"):
        verify_detached(parsed, content_digest=SHA1.digest(PRIMARY_CD))


def test_token_embeds_however_late_asn1crypto_learns_the_tstinfo_content_type(pki, tsa, tmp_path):
    # asn1crypto builds its reverse map of content-type names once, the first time one is named;
    # the CMS builder and reader use none of it, so a token is embedded and read back in a fresh
    # process (as codesign --timestamp runs) where asn1crypto named a content type before TSTInfo.
    authority, _ = tsa
    signed = parse_signed_data(sign_code(pki, timestamp=local_timestamp(authority)))
    assert signed.timestamp is not None
    (tmp_path / "token.der").write_bytes(signed.timestamp.der)
    write_pem(tmp_path / "leaf.pem", pki.code)
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from asn1crypto import cms\n"
        "from cryptography import x509\n"
        "from signbridge.apple.codesig.cms import parse_signed_data\n"
        "from signbridge.crypto.cms_builder import encode_signed_data\n"
        "from signbridge.crypto.hashes import HashAlgorithm\n"
        "from signbridge.crypto.signatures import Scheme\n"
        "cms.ContentType('data').dump()\n"
        "folder = Path(sys.argv[1])\n"
        "leaf = x509.load_pem_x509_certificate((folder / 'leaf.pem').read_bytes())\n"
        "token = (folder / 'token.der').read_bytes()\n"
        "der = encode_signed_data(signed_attrs_der=None, signature=bytes(256), certificates=[leaf],\n"
        "    signer_certificate=leaf, hash_algorithm=HashAlgorithm.SHA256, scheme=Scheme.RSA_PKCS1, timestamp_token=token)\n"
        "print(parse_signed_data(der).timestamp.der == token)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"
