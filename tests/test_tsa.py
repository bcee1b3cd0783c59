"""The RFC 3161 timestamp authority and client, checked against openssl as the independent party.

openssl makes the requests our authority answers and verifies its replies; openssl's own TSA
makes replies our client must accept; asn1crypto reads the structures a second time.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import http.server
import random
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from asn1crypto import algos, cms, core, tsp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from conftest import require_tool, run
from pkikit import key_usage as usage_extension
from signbridge.crypto.ber import encode_tlv
from signbridge.crypto.cms_builder import encode_signed_data
from signbridge.crypto.hashes import HashAlgorithm
from signbridge.crypto.signatures import Scheme, SignatureRequest
from signbridge.crypto.timestamp_requests import (
    QUERY_CONTENT_TYPE,
    REPLY_CONTENT_TYPE,
    FailureInfo,
    PKIStatus,
    TimestampRejected,
    TimeStampResp,
    build_request,
    parse_response,
    request_timestamp,
)
from signbridge.crypto.timestamps import ID_CT_TST_INFO, parse_token
from signbridge.errors import KeystoreError, TimestampError
from signbridge.server.timestamp_authority import DEFAULT_POLICY_OID, TimestampAuthority

NOW = dt.datetime.now(dt.UTC)
DATA = b"the bytes being timestamped\n" * 10
TSA_KINDS = ["rsa", "p256", "p384"]


# ---------------------------------------------------------------------------------------------
# A small PKI: root -> TSA leaf, and root -> intermediate -> TSA leaf


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "signbridge tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _ca(common_name: str, key, issuer: x509.Certificate | None = None, issuer_key=None) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer.subject if issuer else _name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(usage_extension(key_cert_sign=True, crl_sign=True), critical=True)
    )
    return builder.sign(issuer_key or key, hashes.SHA256())


def _leaf(
    common_name: str,
    key,
    issuer: x509.Certificate,
    issuer_key,
    *,
    eku: list | None = None,
    eku_critical: bool = True,
    key_usage: x509.KeyUsage | None = None,
    not_after: dt.datetime | None = None,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(not_after or NOW + dt.timedelta(days=90))
        .add_extension(key_usage or usage_extension(digital_signature=True), critical=True)
    )
    if eku is None:
        eku = [ExtendedKeyUsageOID.TIME_STAMPING]
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=eku_critical)
    return builder.sign(issuer_key, hashes.SHA256())


def _new_key(kind: str):
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1() if kind == "p256" else ec.SECP384R1())


def _signer(key) -> Callable[[SignatureRequest], bytes]:
    """Signs as the keystores do: PKCS#1 v1.5 over the DigestInfo, ECDSA as DER."""

    def sign(request: SignatureRequest) -> bytes:
        prehashed = utils.Prehashed(request.hash_algorithm.cryptography_hash())
        if isinstance(key, rsa.RSAPrivateKey):
            assert request.scheme is Scheme.RSA_PKCS1
            return key.sign(request.digest, padding.PKCS1v15(), prehashed)
        assert request.scheme is Scheme.ECDSA
        return key.sign(request.digest, ec.ECDSA(prehashed))

    return sign


def _pem(path: Path, *certificates: x509.Certificate) -> Path:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates))
    return path


@dataclass
class Tsa:
    """A TSA identity and the files openssl needs to check its work."""

    kind: str
    key: object
    certificate: x509.Certificate
    root: x509.Certificate
    chain: list[x509.Certificate]
    root_pem: Path
    tsa_pem: Path
    key_pem: Path
    chain_pem: Path

    def authority(self, **kwargs) -> TimestampAuthority:
        return TimestampAuthority(self.certificate, self.chain, _signer(self.key), **kwargs)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> tuple[x509.Certificate, object, Path]:
    key = ec.generate_private_key(ec.SECP384R1())
    certificate = _ca("Test Root CA", key)
    return certificate, key, _pem(tmp_path_factory.mktemp("root") / "root.pem", certificate)


def _make_tsa(directory: Path, kind: str, root, *, intermediate: bool = False) -> Tsa:
    root_cert, root_key, root_pem = root
    issuer, issuer_key, chain = root_cert, root_key, [root_cert]
    if intermediate:
        issuer_key = ec.generate_private_key(ec.SECP256R1())
        issuer = _ca("Test Timestamping CA", issuer_key, root_cert, root_key)
        chain = [issuer, root_cert]
    key = _new_key(kind)
    certificate = _leaf(f"Test TSA {kind}", key, issuer, issuer_key)
    key_pem = directory / "tsa.key"
    key_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return Tsa(
        kind=kind,
        key=key,
        certificate=certificate,
        root=root_cert,
        chain=chain,
        root_pem=root_pem,
        tsa_pem=_pem(directory / "tsa.pem", certificate),
        key_pem=key_pem,
        chain_pem=_pem(directory / "chain.pem", *chain),
    )


@pytest.fixture(scope="module", params=TSA_KINDS)
def tsa(request, root, tmp_path_factory) -> Tsa:
    return _make_tsa(tmp_path_factory.mktemp(f"tsa-{request.param}"), request.param, root)


@pytest.fixture(scope="module")
def rsa_tsa(root, tmp_path_factory) -> Tsa:
    return _make_tsa(tmp_path_factory.mktemp("tsa-rsa"), "rsa", root)


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "data.bin"
    path.write_bytes(DATA)
    return path


# ---------------------------------------------------------------------------------------------
# openssl helpers


def _openssl() -> str:
    return require_tool("openssl")


def _query(tmp_path: Path, data_file: Path, *options: str, name: str = "query.tsq") -> Path:
    path = tmp_path / name
    run([_openssl(), "ts", "-query", "-data", str(data_file), *options, "-out", str(path)])
    return path


def _reply_text(reply_path: Path) -> str:
    return run([_openssl(), "ts", "-reply", "-in", str(reply_path), "-text"], text=True).stdout


def _openssl_verify(
    tsa: Tsa, reply_path: Path, *source: str, untrusted: bool = True
) -> subprocess.CompletedProcess:
    args = [_openssl(), "ts", "-verify", *source, "-in", str(reply_path), "-CAfile", str(tsa.root_pem)]
    if untrusted:
        args += ["-untrusted", str(tsa.chain_pem if len(tsa.chain) > 1 else tsa.tsa_pem)]
    return subprocess.run(args, capture_output=True, text=True)


def _token_certificate_subjects(tmp_path: Path, reply_path: Path) -> list[str]:
    """The certificates inside the reply's token, as openssl lists them."""
    token = tmp_path / "token.der"
    run([_openssl(), "ts", "-reply", "-in", str(reply_path), "-token_out", "-out", str(token)])
    listed = run(
        [_openssl(), "pkcs7", "-inform", "DER", "-in", str(token), "-print_certs", "-noout"], text=True
    )
    return re.findall(r"^subject=(.*)$", listed.stdout, re.MULTILINE)


def _hex_field(text: str, label: str) -> str:
    match = re.search(rf"^{label}: (.*)$", text, re.MULTILINE)
    assert match, f"{label} missing from:\n{text}"
    return match.group(1).strip()


def _respond(authority: TimestampAuthority, query: bytes, path: Path) -> bytes:
    reply = authority.respond(query)
    path.write_bytes(reply)
    return reply


# ---------------------------------------------------------------------------------------------
# The authority, checked by openssl


@pytest.mark.parametrize("digest_option", ["-sha256", "-sha384", "-sha512"])
def test_openssl_verifies_granted_reply(tsa, tmp_path, data_file, digest_option):
    query = _query(tmp_path, data_file, digest_option, "-cert")
    reply_path = tmp_path / "reply.tsr"
    reply = _respond(tsa.authority(), query.read_bytes(), reply_path)

    text = _reply_text(reply_path)
    assert "Status: Granted." in text
    assert _hex_field(text, "Policy OID") == DEFAULT_POLICY_OID
    assert _hex_field(text, "Hash Algorithm") == digest_option[1:]
    assert _hex_field(text, "Accuracy").startswith("0x01 seconds")
    query_text = run([_openssl(), "ts", "-query", "-in", str(query), "-text"], text=True).stdout
    assert _hex_field(text, "Nonce") == _hex_field(query_text, "Nonce") != "unspecified"

    for source in (["-queryfile", str(query)], ["-data", str(data_file)]):
        verified = _openssl_verify(tsa, reply_path, *source)
        assert verified.returncode == 0, verified.stderr
        assert "Verification: OK" in verified.stdout
    subjects = _token_certificate_subjects(tmp_path, reply_path)
    common_names = sorted(subject.split("CN = ")[-1] for subject in subjects)
    assert common_names == ["Test Root CA", f"Test TSA {tsa.kind}"]

    algorithm = HashAlgorithm.from_name(digest_option[1:])
    token = parse_response(reply)
    assert token.hash_algorithm is algorithm
    assert token.digest == algorithm.digest(DATA)
    assert token.policy == DEFAULT_POLICY_OID
    assert abs(token.gen_time - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=1)
    assert token.accuracy == dt.timedelta(seconds=1)
    assert token.nonce == int(_hex_field(text, "Nonce"), 16)
    assert token.serial == int(_hex_field(text, "Serial number"), 16)
    assert set(token.certificates) == {tsa.certificate, *tsa.chain}
    token.verify(algorithm.digest(DATA), algorithm, [tsa.root])


def test_token_structure_read_by_asn1crypto(tsa, tmp_path, data_file):
    """A second parser sees the signed attributes openssl and RFC 5816 require."""
    query = _query(tmp_path, data_file, "-sha256", "-cert")
    reply = tsp.TimeStampResp.load(tsa.authority().respond(query.read_bytes()))
    signed_data = reply["time_stamp_token"]["content"]
    assert signed_data["version"].native == "v3"
    assert signed_data["encap_content_info"]["content_type"].native == "tst_info"
    (signer_info,) = signed_data["signer_infos"]
    assert signer_info["version"].native == "v1"
    assert signer_info["sid"].name == "issuer_and_serial_number"
    assert signer_info["sid"].chosen["serial_number"].native == tsa.certificate.serial_number
    attributes = {a["type"].native: a["values"][0] for a in signer_info["signed_attrs"]}
    assert set(attributes) == {"content_type", "signing_time", "message_digest", "signing_certificate_v2"}
    ess = attributes["signing_certificate_v2"]["certs"][0]
    tsa_der = tsa.certificate.public_bytes(serialization.Encoding.DER)
    assert ess["cert_hash"].native == hashlib.sha256(tsa_der).digest()
    assert ess["issuer_serial"]["serial_number"].native == tsa.certificate.serial_number
    tst_der = bytes(signed_data["encap_content_info"]["content"])
    digest_name = signer_info["digest_algorithm"]["algorithm"].native
    assert attributes["message_digest"].native == hashlib.new(digest_name, tst_der).digest()
    assert digest_name == {"rsa": "sha256", "p256": "sha256", "p384": "sha384"}[tsa.kind]


def test_no_nonce_and_no_certificates(tsa, tmp_path, data_file):
    query = _query(tmp_path, data_file, "-sha256", "-no_nonce")
    reply_path = tmp_path / "reply.tsr"
    reply = _respond(tsa.authority(), query.read_bytes(), reply_path)

    text = _reply_text(reply_path)
    assert "Status: Granted." in text
    assert _hex_field(text, "Nonce") == "unspecified"
    assert _token_certificate_subjects(tmp_path, reply_path) == []
    token_der = tsp.TimeStampResp.load(reply)["time_stamp_token"]
    assert isinstance(token_der["content"]["certificates"], core.Void)

    # Without the certificate in the token, openssl needs it from -untrusted; so do we.
    verified = _openssl_verify(tsa, reply_path, "-queryfile", str(query))
    assert verified.returncode == 0, verified.stderr
    unaided = _openssl_verify(tsa, reply_path, "-queryfile", str(query), untrusted=False)
    assert unaided.returncode != 0

    token = parse_response(reply)
    assert token.nonce is None
    assert token.certificates == ()
    digest = hashlib.sha256(DATA).digest()
    with pytest.raises(TimestampError, match="does not carry the timestamp authority's certificate"):
        token.verify(digest, HashAlgorithm.SHA256, [tsa.root])
    token.verify(digest, HashAlgorithm.SHA256, [tsa.root], intermediates=[tsa.certificate])


def test_chain_through_intermediate(root, tmp_path, data_file):
    tsa = _make_tsa(tmp_path, "rsa", root, intermediate=True)
    query = _query(tmp_path, data_file, "-sha256", "-cert")
    reply_path = tmp_path / "reply.tsr"
    reply = _respond(tsa.authority(), query.read_bytes(), reply_path)

    assert len(_token_certificate_subjects(tmp_path, reply_path)) == 3
    # Every certificate openssl needs is in the token: no -untrusted.
    verified = _openssl_verify(tsa, reply_path, "-queryfile", str(query), untrusted=False)
    assert verified.returncode == 0, verified.stderr

    token = parse_response(reply)
    digest = hashlib.sha256(DATA).digest()
    token.verify(digest, HashAlgorithm.SHA256, [tsa.root])
    # The intermediate alone is not a root of trust unless the caller says so.
    token.verify(digest, HashAlgorithm.SHA256, [tsa.chain[0]])
    other_root = _ca("Some Other Root", ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(TimestampError, match="does not chain to a trusted root"):
        token.verify(digest, HashAlgorithm.SHA256, [other_root])


def test_requested_policy(rsa_tsa, tmp_path, data_file):
    query = _query(tmp_path, data_file, "-sha256", "-cert", "-tspolicy", DEFAULT_POLICY_OID)
    reply_path = tmp_path / "reply.tsr"
    _respond(rsa_tsa.authority(), query.read_bytes(), reply_path)
    assert "Status: Granted." in _reply_text(reply_path)
    assert _openssl_verify(rsa_tsa, reply_path, "-queryfile", str(query)).returncode == 0

    own_policy = "1.3.6.1.4.1.99999.1"
    authority = rsa_tsa.authority(policy=own_policy, accuracy=dt.timedelta(milliseconds=1500))
    query = _query(tmp_path, data_file, "-sha256", "-cert", "-tspolicy", own_policy, name="own.tsq")
    _respond(authority, query.read_bytes(), reply_path)
    text = _reply_text(reply_path)
    assert _hex_field(text, "Policy OID") == own_policy
    assert _hex_field(text, "Accuracy") == "0x01 seconds, 0x01F4 millis, unspecified micros"
    assert _openssl_verify(rsa_tsa, reply_path, "-queryfile", str(query)).returncode == 0


def test_tampered_reply_fails_both_verifiers(rsa_tsa, tmp_path, data_file):
    query = _query(tmp_path, data_file, "-sha256", "-cert")
    reply = rsa_tsa.authority().respond(query.read_bytes())
    token = parse_response(reply)
    digest = hashlib.sha256(DATA).digest()
    token.verify(digest, HashAlgorithm.SHA256, [rsa_tsa.root])

    gen_time = tsp.TimeStampResp.load(reply)["time_stamp_token"]["content"]["encap_content_info"]["content"]
    gen_time_der = gen_time.parsed["gen_time"].dump()
    assert reply.count(gen_time_der) == 1
    later = gen_time_der[:2] + b"2099" + gen_time_der[6:]
    tampered = {
        "genTime in the TSTInfo": (reply.replace(gen_time_der, later), "does not match its messageDigest"),
        "signature value": (reply[:-1] + bytes([reply[-1] ^ 0x01]), "signature does not verify"),
    }
    for what, (altered, message) in tampered.items():
        path = tmp_path / "tampered.tsr"
        path.write_bytes(altered)
        verified = _openssl_verify(rsa_tsa, path, "-queryfile", str(query))
        assert verified.returncode != 0, what
        assert "Verification: OK" not in verified.stdout, what
        with pytest.raises(TimestampError, match=message):
            parse_response(altered).verify(digest, HashAlgorithm.SHA256, [rsa_tsa.root])


def test_verify_rejects_wrong_digest_and_time(rsa_tsa, tmp_path, data_file):
    query = _query(tmp_path, data_file, "-sha256", "-cert")
    token = parse_response(rsa_tsa.authority().respond(query.read_bytes()))
    digest = hashlib.sha256(DATA).digest()
    with pytest.raises(TimestampError, match="different digest"):
        token.verify(hashlib.sha256(b"other").digest(), HashAlgorithm.SHA256, [rsa_tsa.root])
    with pytest.raises(TimestampError, match="covers a Sha256 digest, not a Sha512"):
        token.verify(hashlib.sha512(DATA).digest(), HashAlgorithm.SHA512, [rsa_tsa.root])
    with pytest.raises(TimestampError, match="was not valid at 2100"):
        token.verify(digest, HashAlgorithm.SHA256, [rsa_tsa.root], at=dt.datetime(2100, 1, 1, tzinfo=dt.UTC))
    with pytest.raises(TimestampError, match="no trusted root"):
        token.verify(digest, HashAlgorithm.SHA256, [])
    # A token read back from its own bytes (as when found in a signature) is the same token.
    again = parse_token(token.der)
    assert again == token
    again.verify(digest, HashAlgorithm.SHA256, [rsa_tsa.root])


# ---------------------------------------------------------------------------------------------
# Requests the authority must refuse


def _request_der(**overrides) -> bytes:
    fields = {
        "version": "v1",
        "message_imprint": {
            "hash_algorithm": algos.DigestAlgorithm({"algorithm": "sha256"}),
            "hashed_message": hashlib.sha256(DATA).digest(),
        },
        "nonce": 12345,
        "cert_req": True,
    }
    fields.update(overrides)
    return tsp.TimeStampReq(fields).dump()


class _LooseAlgorithm(core.Sequence):
    """An AlgorithmIdentifier with any parameters, which asn1crypto's own class will not build."""

    _fields = [("algorithm", core.ObjectIdentifier), ("parameters", core.Any, {"optional": True})]


class _LooseImprint(core.Sequence):
    _fields = [("hash_algorithm", _LooseAlgorithm), ("hashed_message", core.OctetString)]


def _bad_queries(tmp_path: Path, data_file: Path) -> dict[str, tuple[bytes, FailureInfo, str]]:
    valid = _query(tmp_path, data_file, "-sha256", "-cert").read_bytes()
    return {
        "garbage": (b"this is not DER at all", FailureInfo.BAD_DATA_FORMAT, "not a DER-encoded TimeStampReq"),
        "empty": (b"", FailureInfo.BAD_DATA_FORMAT, "not a DER-encoded TimeStampReq"),
        "truncated": (valid[:-5], FailureInfo.BAD_DATA_FORMAT, "not a DER-encoded TimeStampReq"),
        "trailing bytes": (valid + b"\x00", FailureInfo.BAD_DATA_FORMAT, "not a DER-encoded TimeStampReq"),
        "md5 imprint": (
            _query(tmp_path, data_file, "-md5", name="md5.tsq").read_bytes(),
            FailureInfo.BAD_ALG,
            "hash algorithm MD5 is not accepted; use SHA-256, SHA-384, SHA-512",
        ),
        "sha1 imprint": (
            _query(tmp_path, data_file, "-sha1", name="sha1.tsq").read_bytes(),
            FailureInfo.BAD_ALG,
            "hash algorithm SHA-1 is not accepted",
        ),
        "unknown algorithm OID": (
            _request_der(
                message_imprint={"hash_algorithm": {"algorithm": "1.2.3.4.5"}, "hashed_message": b"x" * 32}
            ),
            FailureInfo.BAD_ALG,
            "hash algorithm 1.2.3.4.5 is not accepted",
        ),
        "imprint of the wrong length": (
            _request_der(
                message_imprint={"hash_algorithm": {"algorithm": "sha256"}, "hashed_message": b"x" * 20}
            ),
            FailureInfo.BAD_DATA_FORMAT,
            "a Sha256 message imprint is 32 bytes long, not 20",
        ),
        "algorithm parameters": (
            _request_der(
                message_imprint=tsp.MessageImprint.load(
                    _LooseImprint(
                        {
                            "hash_algorithm": {
                                "algorithm": HashAlgorithm.SHA256.oid,
                                "parameters": core.Integer(1),
                            },
                            "hashed_message": b"x" * 32,
                        }
                    ).dump()
                )
            ),
            FailureInfo.BAD_DATA_FORMAT,
            "not a DER-encoded TimeStampReq",
        ),
        "unknown policy": (
            _query(tmp_path, data_file, "-sha256", "-tspolicy", "1.2.3.4", name="policy.tsq").read_bytes(),
            FailureInfo.UNACCEPTED_POLICY,
            "the policy 1.2.3.4 is not offered",
        ),
        "extension": (
            _request_der(extensions=[{"extn_id": "1.2.3.4", "extn_value": b"\x05\x00"}]),
            FailureInfo.UNACCEPTED_EXTENSION,
            "request extensions are not supported",
        ),
        "version 2": (_request_der(version="v2"), FailureInfo.BAD_DATA_FORMAT, "only version 1"),
    }


_OPENSSL_FAILURE_TEXT = {
    FailureInfo.BAD_ALG: "unrecognized or unsupported algorithm identifier",
    FailureInfo.BAD_DATA_FORMAT: "the data submitted has the wrong format",
    FailureInfo.UNACCEPTED_POLICY: "the requested TSA policy is not supported by the TSA",
    FailureInfo.UNACCEPTED_EXTENSION: "the requested extension is not supported by the TSA",
    FailureInfo.SYSTEM_FAILURE: "the request cannot be handled due to system failure",
}


def _assert_rejected(reply: bytes, tmp_path: Path, failure: FailureInfo, message: str) -> None:
    path = tmp_path / "rejected.tsr"
    path.write_bytes(reply)
    text = _reply_text(path)
    assert "Status: Rejected." in text
    assert _hex_field(text, "Failure info") == _OPENSSL_FAILURE_TEXT[failure]
    assert message in _hex_field(text, "Status description")
    assert "TST info:\nNot included." in text

    with pytest.raises(TimestampRejected) as caught:
        parse_response(reply)
    assert caught.value.status is PKIStatus.REJECTION
    assert caught.value.failures == frozenset({failure})
    assert message in str(caught.value)
    assert failure.rfc_name in str(caught.value)


def test_bad_queries_are_rejected(rsa_tsa, tmp_path, data_file):
    authority = rsa_tsa.authority()
    cases = _bad_queries(tmp_path, data_file)
    for what, (query, failure, message) in cases.items():
        before = bytes(query)
        reply = authority.respond(query)
        assert query == before, what
        _assert_rejected(reply, tmp_path, failure, message)
    # The authority keeps serving after all of that.
    good = _query(tmp_path, data_file, "-sha256", "-cert", name="after.tsq").read_bytes()
    assert parse_response(authority.respond(good)).nonce is not None


def test_fuzzed_queries_never_raise(rsa_tsa, tmp_path, data_file):
    authority = rsa_tsa.authority()
    valid = _query(tmp_path, data_file, "-sha512", "-cert").read_bytes()
    rng = random.Random(3161)
    outcomes = set()
    for _ in range(1500):
        mutated = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            choice = rng.random()
            position = rng.randrange(len(mutated) + 1)
            if choice < 0.6 and position < len(mutated):
                mutated[position] = rng.randrange(256)
            elif choice < 0.8:
                del mutated[position:]
            else:
                mutated[position:position] = rng.randbytes(rng.randint(1, 8))
        reply = TimeStampResp.load(authority.respond(bytes(mutated)), strict=True)
        outcomes.add(reply["status"]["status"].native)
    assert "rejection" in outcomes


@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
def test_client_on_damaged_replies(rsa_tsa):
    """Every flipped bit in what the TSA signs is caught; no damage makes the client crash."""
    digest = hashlib.sha256(DATA).digest()
    reply = rsa_tsa.authority().respond(build_request(digest, HashAlgorithm.SHA256, nonce=7))
    signed_data = TimeStampResp.load(reply)["time_stamp_token"]["content"]
    tst_info = bytes(signed_data["encap_content_info"]["content"])
    signed_attrs = signed_data["signer_infos"][0]["signed_attrs"].dump()
    for region in (tst_info, signed_attrs):
        start = reply.index(region)
        for offset in range(start, start + len(region)):
            damaged = bytearray(reply)
            damaged[offset] ^= 0x04
            with pytest.raises(TimestampError):
                parse_response(bytes(damaged)).verify(digest, HashAlgorithm.SHA256, [rsa_tsa.root])

    rng = random.Random(5816)
    verified = 0
    for _ in range(1500):
        damaged = bytearray(reply)
        for _ in range(rng.randint(1, 3)):
            position = rng.randrange(len(damaged) + 1)
            if position < len(damaged) and rng.random() < 0.8:
                damaged[position] = rng.randrange(256)
            else:
                del damaged[position:]
        try:
            parse_response(bytes(damaged)).verify(digest, HashAlgorithm.SHA256, [rsa_tsa.root])
        except TimestampError:
            continue
        verified += 1
    assert verified < 1500


def test_signing_failures_become_system_failure(rsa_tsa, tmp_path, data_file):
    query = _query(tmp_path, data_file, "-sha256", "-cert").read_bytes()

    def broken_keystore(request: SignatureRequest) -> bytes:
        raise KeystoreError("the HSM is not answering")

    def wrong_key(request: SignatureRequest) -> bytes:
        return _signer(_new_key("rsa"))(request)

    for sign in (broken_keystore, wrong_key):
        authority = TimestampAuthority(rsa_tsa.certificate, rsa_tsa.chain, sign)
        reply = authority.respond(query)
        _assert_rejected(reply, tmp_path, FailureInfo.SYSTEM_FAILURE, "could not sign the timestamp")
        assert b"HSM" not in reply


def test_only_accepted_algorithms(rsa_tsa, tmp_path, data_file):
    authority = rsa_tsa.authority(hash_algorithms=[HashAlgorithm.SHA512, HashAlgorithm.SHA1])
    granted = _query(tmp_path, data_file, "-sha1", "-cert", name="sha1.tsq")
    reply_path = tmp_path / "reply.tsr"
    _respond(authority, granted.read_bytes(), reply_path)
    assert _openssl_verify(rsa_tsa, reply_path, "-queryfile", str(granted)).returncode == 0
    refused = _query(tmp_path, data_file, "-sha256", "-cert", name="sha256.tsq")
    reply = authority.respond(refused.read_bytes())
    _assert_rejected(reply, tmp_path, FailureInfo.BAD_ALG, "use SHA-512, SHA-1")


def test_concurrent_requests_get_unique_serials(tsa, tmp_path, data_file):
    authority = tsa.authority()
    digests = [hashlib.sha256(b"%d" % i).digest() for i in range(64)]

    def stamp(index: int):
        reply = authority.respond(build_request(digests[index], HashAlgorithm.SHA256, nonce=index + 1))
        return index, parse_response(reply)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(stamp, range(len(digests))))
    serials = {token.serial for _, token in results}
    assert len(serials) == len(digests)
    for index, token in results:
        assert token.nonce == index + 1
        token.verify(digests[index], HashAlgorithm.SHA256, [tsa.root])


@pytest.mark.parametrize(
    ("eku", "critical", "key_usage", "message"),
    [
        ([], True, None, "has no extended key usage"),
        ([ExtendedKeyUsageOID.CODE_SIGNING], True, None, "must have timeStamping only"),
        (
            [ExtendedKeyUsageOID.TIME_STAMPING, ExtendedKeyUsageOID.CODE_SIGNING],
            True,
            None,
            "timeStamping only",
        ),
        ([ExtendedKeyUsageOID.TIME_STAMPING], False, None, "non-critical extended key usage"),
        (
            [ExtendedKeyUsageOID.TIME_STAMPING],
            True,
            usage_extension(digital_signature=True, key_encipherment=True),
            "key usage other than digitalSignature",
        ),
    ],
)
def test_authority_refuses_unfit_certificates(root, eku, critical, key_usage, message):
    root_cert, root_key, _ = root
    key = _new_key("p256")
    certificate = _leaf(
        "Not A TSA", key, root_cert, root_key, eku=eku, eku_critical=critical, key_usage=key_usage
    )
    with pytest.raises(TimestampError, match=message) as caught:
        TimestampAuthority(certificate, [root_cert], _signer(key))
    assert "Not A TSA" in str(caught.value)


# ---------------------------------------------------------------------------------------------
# Our client against openssl's TSA


_OPENSSL_TSA_CONFIG = """\
[ tsa ]
default_tsa = tsa_config

[ tsa_config ]
dir = {dir}
serial = $dir/serial
crypto_device = builtin
signer_cert = $dir/tsa.pem
certs = $dir/chain.pem
signer_key = $dir/tsa.key
signer_digest = sha256
default_policy = 1.2.3.4.1
other_policies = 1.2.3.4.5
digests = sha256, sha384, sha512
accuracy = secs:1, millisecs:500, microsecs:100
clock_precision_digits = 3
ordering = yes
tsa_name = yes
ess_cert_id_chain = no
ess_cert_id_alg = sha256
"""


@pytest.mark.parametrize("cert_option", [["-cert"], []])
def test_client_accepts_openssl_replies(tsa, tmp_path, data_file, cert_option):
    directory = tsa.tsa_pem.parent
    config = tmp_path / "tsa.cnf"
    config.write_text(_OPENSSL_TSA_CONFIG.format(dir=directory))
    (directory / "serial").write_text("0A\n")
    query = _query(tmp_path, data_file, "-sha384", *cert_option)
    reply_path = tmp_path / "openssl.tsr"
    reply_options = ["-config", str(config), "-queryfile", str(query), "-out", str(reply_path)]
    run([_openssl(), "ts", "-reply", *reply_options])
    assert "Status: Granted." in _reply_text(reply_path)

    token = parse_response(reply_path.read_bytes())
    assert token.policy == "1.2.3.4.1"
    assert token.accuracy == dt.timedelta(seconds=1, milliseconds=500, microseconds=100)
    digest = hashlib.sha384(DATA).digest()
    assert token.digest == digest
    intermediates = [] if cert_option else [tsa.certificate]
    token.verify(digest, HashAlgorithm.SHA384, [tsa.root], intermediates=intermediates)

    # Our verifier says no where openssl says no.
    reply = reply_path.read_bytes()
    altered = reply[:-1] + bytes([reply[-1] ^ 0x80])
    (tmp_path / "altered.tsr").write_bytes(altered)
    assert _openssl_verify(tsa, tmp_path / "altered.tsr", "-queryfile", str(query)).returncode != 0
    with pytest.raises(TimestampError, match="signature does not verify"):
        parse_response(altered).verify(
            digest, HashAlgorithm.SHA384, [tsa.root], intermediates=[tsa.certificate]
        )


# ---------------------------------------------------------------------------------------------
# Requests built by the client, read by openssl


def test_build_request_read_by_openssl(tmp_path):
    digest = hashlib.sha512(DATA).digest()
    path = tmp_path / "ours.tsq"
    path.write_bytes(build_request(digest, HashAlgorithm.SHA512, nonce=0xDEADBEEF, cert_req=True))
    text = run([_openssl(), "ts", "-query", "-in", str(path), "-text"], text=True).stdout
    assert _hex_field(text, "Hash Algorithm") == "sha512"
    assert _hex_field(text, "Nonce") == "0xDEADBEEF"
    assert _hex_field(text, "Certificate required") == "yes"
    assert _hex_field(text, "Policy OID") == "unspecified"
    shown = re.findall(r"^\s+[0-9a-f]{4} - (.*?)\s{2,}", text, re.MULTILINE)
    assert bytes.fromhex("".join(shown).replace("-", " ").replace(" ", "")) == digest

    path.write_bytes(build_request(digest[:32], HashAlgorithm.SHA256, cert_req=False))
    text = run([_openssl(), "ts", "-query", "-in", str(path), "-text"], text=True).stdout
    assert _hex_field(text, "Nonce") == "unspecified"
    assert _hex_field(text, "Certificate required") == "no"

    with pytest.raises(TimestampError, match="a Sha256 hash is 32 bytes long, but 20 bytes were given"):
        build_request(b"x" * 20, HashAlgorithm.SHA256)


def test_token_reader_is_strict_der(rsa_tsa, tmp_path, data_file):
    """Nothing may follow the token or its TSTInfo, the TSTInfo has RFC 3161's fields only, version 1."""
    query = _query(tmp_path, data_file, "-sha256", "-cert")
    token = parse_response(rsa_tsa.authority().respond(query.read_bytes()))
    with pytest.raises(TimestampError, match="not a CMS SignedData .*1 bytes follow"):
        parse_token(token.der + b"\0")
    tst_info = tsp.TimeStampResp.load(rsa_tsa.authority().respond(query.read_bytes()))["time_stamp_token"]
    content = tst_info["content"]["encap_content_info"]["content"].contents
    _, start, _ = _tlv(content)
    assert content[start : start + 3] == b"\x02\x01\x01"
    version_2 = content[:start] + b"\x02\x01\x02" + content[start + 3 :]
    extra_field = encode_tlv(0x30, content[start:] + b"\x04\x00")
    cases = {
        content + b"\0": "the timestamp token is malformed .*1 bytes follow",
        extra_field: "the timestamp token is malformed .*unexpected field",
        version_2: "unsupported TSTInfo version 2",
    }
    for tst, message in cases.items():
        der = encode_signed_data(
            signed_attrs_der=None, signature=b"\1", certificates=[rsa_tsa.certificate],
            signer_certificate=rsa_tsa.certificate, hash_algorithm=HashAlgorithm.SHA256,
            scheme=Scheme.RSA_PKCS1, timestamp_token=None, content_type=ID_CT_TST_INFO, content=tst,
        )  # fmt: skip
        with pytest.raises(TimestampError, match=message):
            parse_token(der)


def _tlv(der: bytes) -> tuple[int, int, int]:
    """(tag, content start, end) of the definite-length value at the start of ``der``."""
    length, start = der[1], 2
    if length & 0x80:
        start += length & 0x7F
        length = int.from_bytes(der[2:start], "big")
    return der[0], start, start + length


def test_parsers_reject_garbage():
    for garbage in (b"", b"\x30\x03\x02\x01\x00", b"nonsense"):
        with pytest.raises(TimestampError, match="not a DER TimeStampResp|holds no token|malformed"):
            parse_response(garbage)
        with pytest.raises(TimestampError, match="not a CMS SignedData|malformed"):
            parse_token(garbage)
    data_content = cms.ContentInfo({"content_type": "data", "content": b"hello"}).dump()
    with pytest.raises(TimestampError, match="not data"):
        parse_token(data_content)


# ---------------------------------------------------------------------------------------------
# request_timestamp against a real HTTP server on 127.0.0.1


class _TsaHandler(http.server.BaseHTTPRequestHandler):
    authority: TimestampAuthority
    replay: bytes | None = None

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.headers.get("Content-Type") != QUERY_CONTENT_TYPE:
            self._send(415, "text/plain", b"wrong request content type")
        elif self.path == "/ts":
            self._send(200, REPLY_CONTENT_TYPE, self.authority.respond(body))
        elif self.path == "/wrong-type":
            self._send(200, "text/html", b"<html>hello</html>")
        elif self.path == "/fail":
            self._send(500, "text/plain", b"internal error")
        elif self.path == "/replay":
            if type(self).replay is None:
                type(self).replay = self.authority.respond(body)
            self._send(200, REPLY_CONTENT_TYPE, type(self).replay)
        elif self.path == "/slow":
            time.sleep(2)
            self._send(200, REPLY_CONTENT_TYPE, self.authority.respond(body))
        else:
            self._send(404, "text/plain", b"not found")

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            return  # the client gave up waiting (the timeout case)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        return


@pytest.fixture
def tsa_server(rsa_tsa) -> Iterator[str]:
    handler = type("Handler", (_TsaHandler,), {"authority": rsa_tsa.authority(), "replay": None})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_request_timestamp_over_http(tsa_server, rsa_tsa):
    digest = hashlib.sha256(DATA).digest()
    token = request_timestamp(f"{tsa_server}/ts", digest, HashAlgorithm.SHA256, timeout=10)
    assert token.digest == digest
    assert token.nonce is not None and token.nonce.bit_length() == 63
    assert token.signer_certificate == rsa_tsa.certificate
    token.verify(digest, HashAlgorithm.SHA256, [rsa_tsa.root])

    # Through a caller's client, with another algorithm.
    digest = hashlib.sha384(DATA).digest()
    with httpx.Client() as client:
        token = request_timestamp(f"{tsa_server}/ts", digest, HashAlgorithm.SHA384, client=client)
    token.verify(digest, HashAlgorithm.SHA384, [rsa_tsa.root])


def test_request_timestamp_failures(tsa_server):
    digest = hashlib.sha256(DATA).digest()
    cases = {
        "/wrong-type": "answered with text/html, not application/timestamp-reply",
        "/fail": "answered HTTP 500 Internal Server Error",
        "/nowhere": "answered HTTP 404",
    }
    for path, message in cases.items():
        url = f"{tsa_server}{path}"
        with pytest.raises(TimestampError, match=re.escape(message)) as caught:
            request_timestamp(url, digest, HashAlgorithm.SHA256, timeout=10)
        assert f"the timestamp authority at {url}" in str(caught.value)

    url = f"{tsa_server}/replay"
    request_timestamp(url, digest, HashAlgorithm.SHA256, timeout=10)  # the server keeps this reply
    with pytest.raises(TimestampError, match="did not return the nonce it was sent") as caught:
        request_timestamp(url, digest, HashAlgorithm.SHA256, timeout=10)
    assert url in str(caught.value)

    with pytest.raises(TimestampError, match=r"did not answer within 0.5 seconds"):
        request_timestamp(f"{tsa_server}/slow", digest, HashAlgorithm.SHA256, timeout=0.5)


def test_request_timestamp_rejection_and_unreachable(tsa_server):
    url = f"{tsa_server}/ts"
    with pytest.raises(TimestampRejected) as caught:
        request_timestamp(url, hashlib.sha1(DATA).digest(), HashAlgorithm.SHA1, timeout=10)
    assert caught.value.failures == frozenset({FailureInfo.BAD_ALG})
    expected = f"the timestamp authority at {url} refused the request (rejection, badAlg)"
    assert str(caught.value).startswith(expected)

    with _closed_port() as port:
        unreachable = f"http://127.0.0.1:{port}/ts"
        message = f"could not reach the timestamp authority at {re.escape(unreachable)}"
        with pytest.raises(TimestampError, match=message):
            request_timestamp(unreachable, hashlib.sha256(DATA).digest(), HashAlgorithm.SHA256, timeout=5)


@contextlib.contextmanager
def _closed_port() -> Iterator[int]:
    """A loopback port nothing listens on, for the duration of the block."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        yield bound.getsockname()[1]
