"""The PKCS#11 token over p11-kit RPC, driven by real consumers through Debian's p11-kit-client.so.

A local CA issues an RSA-2048 and a P-256 certificate; their private keys stay in the test, in a
signer that stands in for the signing service. Every signature a consumer gets is verified with
the openssl CLI against the certificate's public key.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from asn1crypto import core
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from conftest import require_file, require_tool, run
from pkcs11_helpers import (
    CLIENT_MODULE,
    EC_ID,
    EC_LABEL,
    INITIALIZE,
    PIN,
    RSA_ID,
    RSA_LABEL,
    SOFTHSM_MODULE,
    TOKEN_LABEL,
    Pki,
    RawConnection,
    RecordingSigner,
    ay,
    body,
    build_token,
    consumer_env,
    u32,
    u64,
)
from signbridge.crypto.hashes import HashAlgorithm
from signbridge.crypto.signatures import Scheme
from signbridge.pkcs11 import (
    CKA,
    CKF,
    CKK,
    CKM,
    CKO,
    CKR,
    CKS,
    CallerInfo,
    Mechanism,
    Pkcs11Client,
    Pkcs11Error,
    PssParams,
    SocketPathError,
    Token,
    objects_for_identity,
    serve,
)
from signbridge.pkcs11.calls import SIGNATURES, Call
from signbridge.pkcs11.wire import (
    AttributeRequest,
    MechanismLayout,
    OaepParams,
    Reader,
    WireAttribute,
    Writer,
    error_body,
)

DIGEST_INFO_SHA256 = bytes.fromhex("3031300d060960864801650304020105000420")


@dataclass
class Served:
    pki: Pki
    signer: RecordingSigner
    token: Token
    server: object
    socket: Path
    env: dict[str, str]
    work: Path

    def file(self, name: str, data: bytes) -> str:
        path = self.work / name
        path.write_bytes(data)
        return str(path)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    require_file(CLIENT_MODULE, "p11-kit-modules")
    base = tmp_path_factory.mktemp("pkcs11")
    pki = Pki.create(base)
    signer = RecordingSigner({RSA_ID: pki.rsa_key, EC_ID: pki.ec_key})
    token = build_token(pki, signer)
    sock = base / "run" / "pkcs11.sock"
    server = serve(sock, token)
    try:
        yield Served(pki, signer, token, server, sock, consumer_env(sock), base)
    finally:
        server.close()


@pytest.fixture
def token(served):
    served.signer.reset()
    return served


def pkcs11_tool(served: Served, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    argv = [require_tool("pkcs11-tool"), "--module", CLIENT_MODULE, *args]
    if check:
        return run(argv, env=served.env, text=True)
    return subprocess.run(argv, env=served.env, text=True, capture_output=True)


def openssl_verify_digest(public_key: str, digest_file: str, signature_file: str, *options: str) -> None:
    proc = run(
        ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", public_key, "-in", digest_file,
         "-sigfile", signature_file, *options],
        text=True,
    )  # fmt: skip
    assert "Signature Verified Successfully" in proc.stdout


def openssl_verify_data(public_key: str, data_file: str, signature_file: str, digest: str = "sha256") -> None:
    proc = run(
        ["openssl", "dgst", f"-{digest}", "-verify", public_key, "-signature", signature_file, data_file]
    )
    assert b"Verified OK" in proc.stdout


def raw_ecdsa_to_der(signature: bytes) -> bytes:
    half = len(signature) // 2
    return utils.encode_dss_signature(
        int.from_bytes(signature[:half], "big"), int.from_bytes(signature[half:], "big")
    )


# --- socket setup -----------------------------------------------------------------------------


def test_socket_is_private(served):
    assert stat.S_IMODE(served.socket.stat().st_mode) == 0o600
    assert stat.S_ISSOCK(served.socket.stat().st_mode)
    assert stat.S_IMODE(served.socket.parent.stat().st_mode) == 0o700


def test_refuses_unsafe_socket_places(served, tmp_path):
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    os.chmod(open_dir, 0o755)
    with pytest.raises(SocketPathError, match="chmod 700"):
        serve(open_dir / "s.sock", served.token)
    assert list(open_dir.iterdir()) == []

    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "file").write_text("keep me")
    with pytest.raises(SocketPathError, match="not a socket"):
        serve(private / "file", served.token)
    assert (private / "file").read_text() == "keep me"

    with pytest.raises(SocketPathError, match="already listening"):
        serve(served.socket, served.token)
    assert Pkcs11Client.connect(served.socket).slots() == [1]


def test_only_allowed_uids_are_served(served, tmp_path):
    directory = tmp_path / "uid"
    server = serve(directory / "s.sock", served.token, allowed_uids={os.geteuid() + 4242})
    try:
        with pytest.raises(Pkcs11Error, match="closed the connection"):
            Pkcs11Client.connect(directory / "s.sock")
    finally:
        server.close()
    assert not (directory / "s.sock").exists()


# --- pkcs11-tool ------------------------------------------------------------------------------


def test_pkcs11_tool_lists_slot_token_and_mechanisms(token):
    listing = pkcs11_tool(token, "-L").stdout
    assert f"token label        : {TOKEN_LABEL}" in listing
    assert "login required, token initialized, PIN initialized, readonly" in listing
    mechanisms = pkcs11_tool(token, "-M").stdout
    names = {line.split(",")[0].strip() for line in mechanisms.splitlines() if line.startswith("  ")}
    # Debian's 0.24.1 client drops SHA*-RSA-PKCS-PSS and ECDSA-SHA* from the list (its allow-list).
    assert names == {
        "RSA-PKCS", "RSA-PKCS-PSS", "SHA256-RSA-PKCS", "SHA384-RSA-PKCS", "SHA512-RSA-PKCS", "ECDSA"
    }  # fmt: skip
    assert "ECDSA, keySize={256,256}, sign, EC F_P, EC OID, EC uncompressed" in mechanisms


def test_pkcs11_tool_lists_objects_and_private_keys_only_after_login(token):
    public = pkcs11_tool(token, "-O").stdout
    assert public.count("Certificate Object; type = X.509 cert") == 3
    assert public.count("Public Key Object") == 2
    assert "Private Key Object" not in public
    assert "subject:    DN: CN=RSA signer" in public
    assert f"ID:         {RSA_ID.hex()}" in public

    logged_in = pkcs11_tool(token, "-O", "--login", "--pin", PIN.decode()).stdout
    assert logged_in.count("Private Key Object") == 2
    assert "Access:     sensitive, always sensitive, never extractable" in logged_in
    assert "Allowed mechanisms: ECDSA,ECDSA-SHA256,ECDSA-SHA384,ECDSA-SHA512" in logged_in


SIGN_CASES = {
    "RSA-PKCS over a DigestInfo": (RSA_ID, ["-m", "RSA-PKCS"], "digest_info", Scheme.RSA_PKCS1),
    "RSA-PKCS-PSS": (
        RSA_ID, ["-m", "RSA-PKCS-PSS", "--hash-algorithm", "SHA256", "--mgf", "MGF1-SHA256"], "digest",
        Scheme.RSA_PSS,
    ),
    "SHA256-RSA-PKCS": (RSA_ID, ["-m", "SHA256-RSA-PKCS"], "data", Scheme.RSA_PKCS1),
    "ECDSA": (EC_ID, ["-m", "ECDSA", "--signature-format", "openssl"], "digest", Scheme.ECDSA),
}  # fmt: skip


@pytest.mark.parametrize("case", list(SIGN_CASES))
def test_pkcs11_tool_signs_and_openssl_verifies(token, case):
    key_id, mechanism, given, scheme = SIGN_CASES[case]
    data = os.urandom(3000)
    digest = hashlib.sha256(data).digest()
    files = {
        "data": token.file("data.bin", data),
        "digest": token.file("digest.bin", digest),
        "digest_info": token.file("digest_info.bin", DIGEST_INFO_SHA256 + digest),
    }
    signature = str(token.work / "sig.bin")
    pkcs11_tool(
        token, "--login", "--pin", PIN.decode(), "--sign", "--id", key_id.hex(), *mechanism,
        "-i", files[given], "-o", signature,
    )  # fmt: skip
    public_key = token.pki.path("rsa.pub" if key_id == RSA_ID else "ec.pub")
    options = ["-pkeyopt", "digest:sha256"] if key_id == RSA_ID else []
    if scheme is Scheme.RSA_PSS:
        options += ["-pkeyopt", "rsa_padding_mode:pss", "-pkeyopt", "rsa_pss_saltlen:32"]
    openssl_verify_digest(public_key, files["digest"], signature, *options)

    # The signer got exactly one request: the digest, never the data.
    [(label, request, caller)] = token.signer.calls
    assert label == (RSA_LABEL if key_id == RSA_ID else EC_LABEL)
    assert (request.digest, request.hash_algorithm, request.scheme) == (digest, HashAlgorithm.SHA256, scheme)
    assert caller.uid == os.geteuid() and caller.pid
    assert "pkcs11-tool" in caller.command_line[0]
    assert "***" in caller.describe() and PIN.decode() not in caller.describe()


def test_tampered_signature_fails_openssl_check(token):
    """The verifier used above rejects a wrong signature (it really checks)."""
    digest = hashlib.sha256(b"x").digest()
    client = Pkcs11Client.connect(token.socket)
    client.login(PIN)
    key = client.objects(object_class=CKO.PRIVATE_KEY, id=RSA_ID)[0]
    signature = bytearray(client.sign(key, CKM.RSA_PKCS, DIGEST_INFO_SHA256 + digest))
    client.close()
    signature[10] ^= 1
    proc = subprocess.run(
        ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", token.pki.path("rsa.pub"), "-in",
         token.file("d.bin", digest), "-sigfile", token.file("s.bin", bytes(signature)), "-pkeyopt",
         "digest:sha256"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode != 0 and "Signature Verified Successfully" not in proc.stdout


def test_pkcs11_tool_multipart_hash_signing(token):
    """pkcs11-tool feeds SHA256-RSA-PKCS input through C_SignUpdate in 1 KiB parts."""
    data = os.urandom(100_000)
    signature = str(token.work / "big.sig")
    pkcs11_tool(
        token, "--login", "--pin", PIN.decode(), "--sign", "--label", RSA_LABEL, "-m", "SHA256-RSA-PKCS",
        "-i", token.file("big.bin", data), "-o", signature,
    )  # fmt: skip
    openssl_verify_data(token.pki.path("rsa.pub"), str(token.work / "big.bin"), signature)
    assert token.signer.calls[0][1].digest == hashlib.sha256(data).digest()


def test_pkcs11_tool_ecdsa_sha256_is_refused_by_debian_client(token):
    """p11-kit 0.24.1 refuses ECDSA-SHA256 in the client (not in its allow-list); the server never
    sees it. Through a protocol-2 client it signs (test_client_signs_with_every_mechanism)."""
    proc = pkcs11_tool(
        token, "--login", "--pin", PIN.decode(), "--sign", "--id", EC_ID.hex(), "-m", "ECDSA-SHA256",
        "-i", token.file("d", b"data"), "-o", str(token.work / "x.sig"), check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "C_SignInit failed: rv = CKR_MECHANISM_INVALID" in proc.stderr
    assert token.signer.calls == []


def test_pkcs11_tool_wrong_pin(token):
    proc = pkcs11_tool(
        token, "--login", "--pin", "wrong", "--sign", "--id", RSA_ID.hex(), "-m", "RSA-PKCS",
        "-i", token.file("di.bin", DIGEST_INFO_SHA256 + bytes(32)), "-o", str(token.work / "x.sig"),
        check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "C_Login failed: rv = CKR_PIN_INCORRECT (0xa0)" in proc.stderr
    assert token.signer.calls == []


# --- OpenSSL with the libp11 engine, osslsigncode, p11tool, python-pkcs11 ---------------------


def engine_key(label: str) -> str:
    return f"pkcs11:token={TOKEN_LABEL};object={label};type=private;pin-value={PIN.decode()}"


def test_openssl_engine_pkeyutl_and_dgst(token):
    require_file("/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so", "libengine-pkcs11-openssl")
    data_file = token.file("data.bin", os.urandom(5000))
    digest_file = token.file("digest.bin", hashlib.sha256(Path(data_file).read_bytes()).digest())
    engine = ["-engine", "pkcs11", "-keyform", "engine"]

    signature = str(token.work / "pkeyutl.sig")
    run(["openssl", "pkeyutl", *engine, "-sign", "-inkey", engine_key(RSA_LABEL), "-pkeyopt", "digest:sha256",
         "-in", digest_file, "-out", signature], env=token.env)  # fmt: skip
    openssl_verify_digest(token.pki.path("rsa.pub"), digest_file, signature, "-pkeyopt", "digest:sha256")

    pss = str(token.work / "pss.sig")
    run(["openssl", "pkeyutl", *engine, "-sign", "-inkey", engine_key(RSA_LABEL), "-pkeyopt", "digest:sha256",
         "-pkeyopt", "rsa_padding_mode:pss", "-pkeyopt", "rsa_pss_saltlen:-1", "-in", digest_file,
         "-out", pss], env=token.env)  # fmt: skip
    openssl_verify_digest(
        token.pki.path("rsa.pub"), digest_file, pss, "-pkeyopt", "digest:sha256",
        "-pkeyopt", "rsa_padding_mode:pss", "-pkeyopt", "rsa_pss_saltlen:32",
    )  # fmt: skip

    for label, public_key in ((RSA_LABEL, "rsa.pub"), (EC_LABEL, "ec.pub")):
        signature = str(token.work / f"dgst-{label}.sig")
        run(["openssl", "dgst", *engine, "-sign", engine_key(label), "-sha256", "-out", signature, data_file],
            env=token.env)  # fmt: skip
        openssl_verify_data(token.pki.path(public_key), data_file, signature)
    schemes = [request.scheme for _, request, _ in token.signer.calls]
    assert schemes == [Scheme.RSA_PKCS1, Scheme.RSA_PSS, Scheme.RSA_PKCS1, Scheme.ECDSA]


def test_osslsigncode_signs_a_script(token):
    osslsigncode = require_tool("osslsigncode")
    script = token.file("hello.ps1", b'Write-Host "hello"\r\n')
    signed = str(token.work / "hello.signed.ps1")
    run([osslsigncode, "sign", "-pkcs11module", CLIENT_MODULE,
         "-pkcs11cert", f"pkcs11:token={TOKEN_LABEL};object={RSA_LABEL};type=cert",
         "-key", f"pkcs11:token={TOKEN_LABEL};object={RSA_LABEL};type=private", "-pass", PIN.decode(),
         "-h", "sha256", "-in", script, "-out", signed], env=token.env)  # fmt: skip
    verified = run([osslsigncode, "verify", "-CAfile", token.pki.path("ca.pem"), "-in", signed], text=True)
    assert "Signature verification: ok" in verified.stdout
    assert len(token.signer.calls) == 1


def test_p11tool_lists_everything(token):
    p11tool = require_tool("p11tool")
    proc = run([p11tool, "--provider", CLIENT_MODULE, "--login", "--set-pin", PIN.decode(), "--list-all",
                f"pkcs11:token={TOKEN_LABEL}"], env=token.env, text=True)  # fmt: skip
    out = proc.stdout
    assert out.count("type=cert") == 3 and out.count("type=public") == 2 and out.count("type=private") == 2
    assert f"token={TOKEN_LABEL};id=%01%02;object={RSA_LABEL};type=private" in out
    assert "Type: Private key (EC/ECDSA-SECP256R1)" in out


PYTHON_PKCS11_SCRIPT = r"""
import hashlib, sys, pkcs11
from pkcs11 import Attribute, Mechanism, ObjectClass
lib = pkcs11.lib(sys.argv[1])
token = lib.get_token(token_label=sys.argv[2])
out = sys.argv[4]
try:
    token.open(user_pin="not the pin")
except pkcs11.exceptions.PinIncorrect:
    print("wrong pin refused")
with token.open(user_pin=sys.argv[3]) as session:
    rsa = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label="rsa-test")
    open(out + "/py-rsa.sig", "wb").write(rsa.sign(b"python-pkcs11\n", mechanism=Mechanism.SHA256_RSA_PKCS))
    ec = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label="ec-test")
    digest = hashlib.sha256(b"python-pkcs11\n").digest()
    open(out + "/py-ec.sig", "wb").write(ec.sign(digest, mechanism=Mechanism.ECDSA))
    certs = list(session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE}))
    print("certificates", len(certs), sorted(c[Attribute.LABEL] for c in certs))
"""


def test_python_pkcs11(token):
    data_file = token.file("py.txt", b"python-pkcs11\n")
    proc = run([sys.executable, "-c", PYTHON_PKCS11_SCRIPT, CLIENT_MODULE, TOKEN_LABEL, PIN.decode(),
                str(token.work)], env=token.env, text=True)  # fmt: skip
    assert "wrong pin refused" in proc.stdout
    assert "certificates 3 ['ec-test', 'rsa-test', 'signbridge test CA']" in proc.stdout
    openssl_verify_data(token.pki.path("rsa.pub"), data_file, str(token.work / "py-rsa.sig"))
    raw = (token.work / "py-ec.sig").read_bytes()
    assert len(raw) == 64  # CKM_ECDSA answers r||s
    openssl_verify_data(token.pki.path("ec.pub"), data_file, token.file("py-ec.der", raw_ecdsa_to_der(raw)))


# --- our own client ---------------------------------------------------------------------------


def test_client_reads_token_and_objects(token):
    with Pkcs11Client.connect(token.socket) as client:
        assert client.version == 2
        assert client.slots() == [1]
        info = client.token_info(1)
        assert (info.label, info.login_required, info.write_protected) == (TOKEN_LABEL, True, True)
        assert info.flags & CKF.TOKEN_INITIALIZED and info.flags & CKF.USER_PIN_INITIALIZED
        assert set(client.mechanisms(1)) == {int(m) for m in token.token.mechanisms}
        assert client.mechanism_info(1, CKM.RSA_PKCS).min_key_size == 2048
        before = client.objects()
        assert sorted(o.object_class for o in before) == [CKO.CERTIFICATE] * 3 + [CKO.PUBLIC_KEY] * 2
        certificates = {o.label: o for o in client.certificates()}
        assert certificates[RSA_LABEL].attributes[CKA.VALUE] == token.pki.rsa_cert.public_bytes(Encoding.DER)
        assert certificates["signbridge test CA"].attributes[CKA.CERTIFICATE_CATEGORY] == 2
        assert certificates[RSA_LABEL].attributes[CKA.CERTIFICATE_CATEGORY] == 1
        client.login(PIN)
        keys = client.objects(object_class=CKO.PRIVATE_KEY)
        assert sorted((k.label, k.id, k.key_type) for k in keys) == [
            (EC_LABEL, EC_ID, CKK.EC), (RSA_LABEL, RSA_ID, CKK.RSA)
        ]  # fmt: skip
        wanted = [CKA.SENSITIVE, CKA.EXTRACTABLE, CKA.SIGN, CKA.PRIVATE, CKA.VALUE]
        secrets = client.attributes(keys[0], wanted)
        assert secrets == {CKA.SENSITIVE: True, CKA.EXTRACTABLE: False, CKA.SIGN: True, CKA.PRIVATE: True}


PSS = ["-pkeyopt", "rsa_padding_mode:pss", "-pkeyopt"]
CLIENT_CASES = [  # mechanism, key, what the mechanism takes, hash, extra openssl options
    (CKM.RSA_PKCS, RSA_ID, "digest_info", "sha256", []),
    (CKM.SHA256_RSA_PKCS, RSA_ID, "data", "sha256", []),
    (CKM.SHA384_RSA_PKCS, RSA_ID, "data", "sha384", []),
    (CKM.SHA512_RSA_PKCS, RSA_ID, "data", "sha512", []),
    (CKM.RSA_PKCS_PSS, RSA_ID, "digest", "sha256", [*PSS, "rsa_pss_saltlen:32"]),
    (CKM.SHA256_RSA_PKCS_PSS, RSA_ID, "data", "sha256", [*PSS, "rsa_pss_saltlen:32"]),
    (CKM.SHA384_RSA_PKCS_PSS, RSA_ID, "data", "sha384", [*PSS, "rsa_pss_saltlen:48"]),
    (CKM.SHA512_RSA_PKCS_PSS, RSA_ID, "data", "sha512", [*PSS, "rsa_pss_saltlen:64"]),
    (CKM.ECDSA, EC_ID, "digest", "sha256", []),
    (CKM.ECDSA_SHA256, EC_ID, "data", "sha256", []),
    (CKM.ECDSA_SHA384, EC_ID, "data", "sha384", []),
    (CKM.ECDSA_SHA512, EC_ID, "data", "sha512", []),
]


@pytest.mark.parametrize("version", [0, 2])
def test_client_signs_with_every_mechanism(token, version):
    """All twelve mechanisms, single- and multi-part, in both mechanism layouts; openssl verifies."""
    data = os.urandom(777)
    with Pkcs11Client.connect(token.socket, version=version) as client:
        assert client.version == version
        client.login(PIN)
        keys = {k.id: k for k in client.objects(object_class=CKO.PRIVATE_KEY)}
        for mechanism, key_id, given, hash_name, extra in CLIENT_CASES:
            digest = hashlib.new(hash_name, data).digest()
            inputs = {"data": data, "digest": digest, "digest_info": DIGEST_INFO_SHA256 + digest}
            single = client.sign(keys[key_id], mechanism, inputs[given])
            multi = client.sign_parts(keys[key_id], mechanism, [inputs[given][:20], inputs[given][20:]])
            for name, signature in (("single", single), ("multi", multi)):
                if key_id == EC_ID:
                    assert len(signature) == 64
                    public_key, options = token.pki.path("ec.pub"), []
                    signature = raw_ecdsa_to_der(signature)
                else:
                    public_key = token.pki.path("rsa.pub")
                    options = ["-pkeyopt", f"digest:{hash_name}", *extra]
                files = (token.file("h.bin", digest), token.file(f"{name}.sig", signature))
                openssl_verify_digest(public_key, *files, *options)
    assert len(token.signer.calls) == 2 * len(CLIENT_CASES)
    assert {request.hash_algorithm.hashlib_name for _, request, _ in token.signer.calls} == {
        "sha256", "sha384", "sha512"
    }


def test_client_errors_are_specific(token):
    with Pkcs11Client.connect(token.socket) as client:
        public_rsa = client.objects(object_class=CKO.PUBLIC_KEY, id=RSA_ID)[0]
        assert client.objects(object_class=CKO.PRIVATE_KEY) == []  # hidden before C_Login
        with pytest.raises(Pkcs11Error) as not_permitted:
            client.sign(public_rsa, CKM.RSA_PKCS, DIGEST_INFO_SHA256 + bytes(32))
        assert not_permitted.value.ckr == CKR.KEY_FUNCTION_NOT_PERMITTED
        with pytest.raises(Pkcs11Error, match="did not accept the PIN") as wrong:
            client.login(b"CONFIGX")
        assert wrong.value.ckr == CKR.PIN_INCORRECT
        client.login(PIN)
        rsa_key = client.objects(object_class=CKO.PRIVATE_KEY, id=RSA_ID)[0]
        ec_key = client.objects(object_class=CKO.PRIVATE_KEY, id=EC_ID)[0]
        cases = [
            (rsa_key, CKM.RSA_PKCS, b"not a DigestInfo", None, CKR.DATA_INVALID),
            (rsa_key, CKM.RSA_PKCS_PSS, bytes(31), PssParams(CKM.SHA256, 2, 32), CKR.DATA_LEN_RANGE),
            (rsa_key, CKM.RSA_PKCS_PSS, bytes(32), PssParams(CKM.SHA256, 2, 20), CKR.MECHANISM_PARAM_INVALID),
            (rsa_key, CKM.SHA256_RSA_PKCS_PSS, b"x", PssParams(CKM.SHA384, 3, 48),
             CKR.MECHANISM_PARAM_INVALID),
            (rsa_key, CKM.ECDSA, bytes(32), None, CKR.KEY_TYPE_INCONSISTENT),
            (ec_key, CKM.SHA256_RSA_PKCS, b"x", None, CKR.KEY_TYPE_INCONSISTENT),
            (ec_key, CKM.ECDSA, bytes(33), None, CKR.DATA_LEN_RANGE),
            (ec_key, CKM.SHA1_RSA_PKCS, b"x", None, CKR.MECHANISM_INVALID),
            (999, CKM.ECDSA, bytes(32), None, CKR.KEY_HANDLE_INVALID),
        ]
        for key, mechanism, data, params, expected in cases:
            with pytest.raises(Pkcs11Error) as failure:
                client.sign(key, mechanism, data, params, slot=1)
            assert failure.value.ckr == expected, (mechanism, failure.value)
        # A failed operation ends; the next one starts cleanly.
        assert len(client.sign(rsa_key, CKM.SHA256_RSA_PKCS, b"ok")) == 256
        client.logout()
        with pytest.raises(Pkcs11Error) as logged_out:
            client.sign(rsa_key, CKM.SHA256_RSA_PKCS, b"x")
        assert logged_out.value.ckr == CKR.KEY_HANDLE_INVALID  # private objects vanish at C_Logout
    assert len(token.signer.calls) == 1


def test_signer_failures_reach_the_consumer(token):
    token.signer.failure = Pkcs11Error(CKR.FUNCTION_FAILED, "service unavailable (HTTP 503)")
    with Pkcs11Client.connect(token.socket) as client:
        client.login(PIN)
        rsa_key = client.objects(object_class=CKO.PRIVATE_KEY, id=RSA_ID)[0]
        with pytest.raises(Pkcs11Error) as failed:
            client.sign(rsa_key, CKM.SHA256_RSA_PKCS, b"x")
        assert failed.value.ckr == CKR.FUNCTION_FAILED
        token.signer.failure = RuntimeError("bug in the provider")
        with pytest.raises(Pkcs11Error) as general:
            client.sign(rsa_key, CKM.SHA256_RSA_PKCS, b"x")
        assert general.value.ckr == CKR.GENERAL_ERROR
        token.signer.failure = None
        saved = token.signer.keys[RSA_ID]
        token.signer.keys[RSA_ID] = rsa.generate_private_key(65537, 2048)  # the service used another key
        try:
            with pytest.raises(Pkcs11Error) as wrong_key:
                client.sign(rsa_key, CKM.SHA256_RSA_PKCS, b"x")
            assert wrong_key.value.ckr == CKR.DEVICE_ERROR  # a signature that does not verify never leaves
        finally:
            token.signer.keys[RSA_ID] = saved
        token.signer.der_ecdsa = True
        try:
            ec_key = client.objects(object_class=CKO.PRIVATE_KEY, id=EC_ID)[0]
            signature = client.sign(ec_key, CKM.ECDSA_SHA256, b"der from the service")
        finally:
            token.signer.der_ecdsa = False
        assert len(signature) == 64
        openssl_verify_data(
            token.pki.path("ec.pub"), token.file("der.txt", b"der from the service"),
            token.file("der.sig", raw_ecdsa_to_der(signature)),
        )  # fmt: skip


def test_client_against_p11_kit_remote_and_softhsm(tmp_path):
    """The client also speaks to p11-kit's own server (version 0) in front of SoftHSM2."""
    require_file(SOFTHSM_MODULE, "libsofthsm2")
    env = softhsm_env(tmp_path)
    run([require_tool("softhsm2-util"), "--init-token", "--free", "--label", "ref", "--pin", "1234",
         "--so-pin", "5678"], env=env)  # fmt: skip
    run([require_tool("pkcs11-tool"), "--module", SOFTHSM_MODULE, "--token-label", "ref", "--login",
         "--pin", "1234", "--keypairgen", "--key-type", "EC:prime256v1", "--id", "01", "--label", "k"],
        env=env)  # fmt: skip
    client = Pkcs11Client.spawn([require_tool("p11-kit"), "remote", SOFTHSM_MODULE], env=env)
    try:
        assert client.version == 0
        slot = next(s for s in client.slots() if client.token_info(s).label == "ref")
        client.login("1234", slot)
        [key] = client.objects(slot, object_class=CKO.PRIVATE_KEY)
        [public] = client.objects(slot, object_class=CKO.PUBLIC_KEY, id=key.id, attributes=[CKA.EC_POINT])
        point = core.OctetString.load(public.attributes[CKA.EC_POINT]).native
        signature = client.sign(key, CKM.ECDSA, hashlib.sha256(b"softhsm").digest())
    finally:
        client.close()
    public_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    (tmp_path / "k.pub").write_bytes(public_key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    (tmp_path / "m").write_bytes(hashlib.sha256(b"softhsm").digest())
    (tmp_path / "s").write_bytes(raw_ecdsa_to_der(signature))
    openssl_verify_digest(str(tmp_path / "k.pub"), str(tmp_path / "m"), str(tmp_path / "s"))


def softhsm_env(directory: Path) -> dict[str, str]:
    (directory / "tokens").mkdir()
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {directory / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    return {**os.environ, "SOFTHSM2_CONF": str(conf)}


# --- the wire, by hand ------------------------------------------------------------------------


def open_session(conn: RawConnection, login: bool = True) -> int:
    assert conn.call(INITIALIZE) == bytes.fromhex("0000000100000000")
    answer = conn.call(body(10, "uu", u64(1), u64(CKF.SERIAL_SESSION)))
    assert answer[:9] == bytes.fromhex("0000000a00000001") + b"u" and len(answer) == 17
    session = int.from_bytes(answer[-8:], "big")
    if login:
        assert conn.call(body(18, "uuay", u64(session), u64(1), ay(PIN))) == bytes.fromhex("0000001200000000")
    return session


def find_one(conn: RawConnection, session: int, object_class: int, key_id: bytes) -> int:
    template = u32(2) + u32(CKA.CLASS) + b"\x01" + u32(8) + u64(object_class)
    template += u32(CKA.ID) + b"\x01" + u32(len(key_id)) + u32(len(key_id)) + key_id
    assert conn.call(body(26, "uaA", u64(session), template)) == bytes.fromhex("0000001a00000000")
    found = conn.call(body(27, "ufu", u64(session), u32(10)))
    assert found[:15] == bytes.fromhex("0000001b00000002617501") + u32(1) and len(found) == 23
    conn.call(body(28, "u", u64(session)))
    return int.from_bytes(found[-8:], "big")


@pytest.mark.parametrize("offered,expected", [(0, 0), (1, 1), (2, 2), (7, 2)])
def test_version_negotiation(token, offered, expected):
    conn = RawConnection(token.socket, version=offered)
    assert conn.version == expected
    assert conn.call(INITIALIZE) == bytes.fromhex("0000000100000000")
    conn.close()


# CKM_SHA256_RSA_PKCS and CKM_RSA_PKCS_PSS (SHA-256, MGF1-SHA256, 32-byte salt) in both layouts,
# as the traces in reference/pkcs11.md §2.10 show them.
PLAIN_V0 = u32(CKM.SHA256_RSA_PKCS) + bytes.fromhex("ffffffff")
PLAIN_V2 = u32(CKM.SHA256_RSA_PKCS)
PSS_V0 = u32(CKM.RSA_PKCS_PSS) + u64(CKM.SHA256) + u64(2) + u64(32)
PSS_V2 = u32(CKM.RSA_PKCS_PSS) + b"\x01" + u64(CKM.SHA256) + u64(2) + u64(32)


@pytest.mark.parametrize("version", [0, 2])
@pytest.mark.parametrize("layout", ["v0", "v2"])
def test_both_mechanism_layouts_are_decoded(token, version, layout):
    """Each layout on each negotiated version (p11-kit >= 0.25.6 sends v2 even after v0, PR #744)."""
    conn = RawConnection(token.socket, version=version)
    session = open_session(conn)
    key = find_one(conn, session, CKO.PRIVATE_KEY, RSA_ID)
    plain, pss = (PLAIN_V0, PSS_V0) if layout == "v0" else (PLAIN_V2, PSS_V2)
    data = b"layout test\n"
    digest = hashlib.sha256(data).digest()

    assert conn.call(body(42, "uMu", u64(session), plain, u64(key))) == bytes.fromhex("0000002a00000000")
    answer = conn.call(body(43, "uayfy", u64(session), ay(data), u32(512)))
    assert answer[:15] == bytes.fromhex("0000002b00000002617901") + u32(256)
    signed = (token.file("l.txt", data), token.file("l.sig", answer[15:]))
    openssl_verify_data(token.pki.path("rsa.pub"), *signed)

    assert conn.call(body(42, "uMu", u64(session), pss, u64(key))) == bytes.fromhex("0000002a00000000")
    answer = conn.call(body(43, "uayfy", u64(session), ay(digest), u32(512)))
    assert answer[:15] == bytes.fromhex("0000002b00000002617901") + u32(256)
    openssl_verify_digest(
        token.pki.path("rsa.pub"), token.file("ld.bin", digest), token.file("lp.sig", answer[15:]),
        "-pkeyopt", "digest:sha256", "-pkeyopt", "rsa_padding_mode:pss", "-pkeyopt", "rsa_pss_saltlen:32",
    )  # fmt: skip

    # The PSS parameters are really read: a 20-byte salt is refused, in either layout.
    bad = pss[:-8] + u64(20)
    assert conn.call(body(42, "uMu", u64(session), bad, u64(key))) == error_body(CKR.MECHANISM_PARAM_INVALID)
    # v2 "no parameter" PSS: refused as invalid parameters, not as a broken frame.
    if layout == "v2":
        no_param = u32(CKM.RSA_PKCS_PSS) + b"\x00"
        answer = conn.call(body(42, "uMu", u64(session), no_param, u64(key)))
        assert answer == error_body(CKR.MECHANISM_PARAM_INVALID)
    conn.close()


def test_sign_size_query_and_small_buffer(token):
    conn = RawConnection(token.socket, version=0)
    session = open_session(conn)
    key = find_one(conn, session, CKO.PRIVATE_KEY, EC_ID)
    digest = hashlib.sha256(b"size").digest()
    assert conn.call(body(42, "uMu", u64(session), u32(CKM.ECDSA) + bytes.fromhex("ffffffff"), u64(key))) == (
        bytes.fromhex("0000002a00000000")
    )
    length_only = bytes.fromhex("0000002b000000026179") + b"\x00" + u32(64)
    assert conn.call(body(43, "uayfy", u64(session), ay(digest), u32(0))) == length_only  # NULL buffer
    assert conn.call(body(43, "uayfy", u64(session), ay(digest), u32(63))) == length_only  # too small
    assert conn.call(body(43, "uayfy", u64(session), ay(digest), u32(0xFFFFFFFF))) == length_only  # empty
    assert token.signer.calls == []  # size questions never reach the signing service
    answer = conn.call(body(43, "uayfy", u64(session), ay(digest), u32(64)))
    assert answer[:15] == bytes.fromhex("0000002b00000002617901") + u32(64)
    openssl_verify_digest(token.pki.path("ec.pub"), token.file("sq.bin", digest),
                          token.file("sq.sig", raw_ecdsa_to_der(answer[15:])))  # fmt: skip
    # The operation is over.
    assert conn.call(body(43, "uayfy", u64(session), ay(digest), u32(64))) == error_body(
        CKR.OPERATION_NOT_INITIALIZED
    )
    # Multi-part: the same rules for C_SignFinal.
    conn.call(body(42, "uMu", u64(session), u32(CKM.ECDSA) + bytes.fromhex("ffffffff"), u64(key)))
    assert conn.call(body(44, "uay", u64(session), ay(digest[:10]))) == bytes.fromhex("0000002c00000000")
    assert conn.call(body(44, "uay", u64(session), ay(digest[10:]))) == bytes.fromhex("0000002c00000000")
    final_length = bytes.fromhex("0000002d000000026179") + b"\x00" + u32(64)
    assert conn.call(body(45, "ufy", u64(session), u32(0))) == final_length
    answer = conn.call(body(45, "ufy", u64(session), u32(100)))
    assert answer[:15] == bytes.fromhex("0000002d00000002617901") + u32(64)
    assert len(token.signer.calls) == 2
    conn.close()


def test_get_attribute_value_semantics(token):
    conn = RawConnection(token.socket, version=0)
    session = open_session(conn)
    key = find_one(conn, session, CKO.PRIVATE_KEY, RSA_ID)

    def get(*requests: tuple[int, int]) -> bytes:
        template = u32(len(requests)) + b"".join(u32(t) + u32(n) for t, n in requests)
        return conn.call(body(24, "uufA", u64(session), u64(key), template))

    head = bytes.fromhex("0000001800000003614175")
    # Size query: bool -> 00, ulong -> 8 zero bytes, byte array -> ffffffff, in the order asked.
    assert get((CKA.SIGN, 0), (CKA.KEY_TYPE, 0), (CKA.ID, 0)) == head + u32(3) + (
        u32(CKA.SIGN) + b"\x01" + u32(1) + b"\x00"
        + u32(CKA.KEY_TYPE) + b"\x01" + u32(8) + u64(0)
        + u32(CKA.ID) + b"\x01" + u32(2) + bytes.fromhex("ffffffff")
    ) + u64(CKR.OK)  # fmt: skip
    # Values; an absent attribute keeps its place and makes the call CKR_ATTRIBUTE_TYPE_INVALID.
    assert get((CKA.SIGN, 1), (CKA.CERTIFICATE_TYPE, 8), (CKA.ID, 2)) == head + u32(3) + (
        u32(CKA.SIGN) + b"\x01" + u32(1) + b"\x01"
        + u32(CKA.CERTIFICATE_TYPE) + b"\x00"
        + u32(CKA.ID) + b"\x01" + u32(2) + u32(2) + RSA_ID
    ) + u64(CKR.ATTRIBUTE_TYPE_INVALID)  # fmt: skip
    # Too small a buffer: unavailable, CKR_BUFFER_TOO_SMALL.
    assert get((CKA.MODULUS, 100),) == head + u32(1) + u32(CKA.MODULUS) + b"\x00" + u64(CKR.BUFFER_TOO_SMALL)
    # Secret parts of a private key: sensitive.
    assert get((CKA.PRIVATE_EXPONENT, 256), (CKA.MODULUS, 256)) == head + u32(2) + (
        u32(CKA.PRIVATE_EXPONENT) + b"\x00" + u32(CKA.MODULUS) + b"\x01" + u32(256) + u32(256)
        + token.pki.rsa_key.public_key().public_numbers().n.to_bytes(256, "big")
    ) + u64(CKR.ATTRIBUTE_SENSITIVE)  # fmt: skip
    # CKA_ALLOWED_MECHANISMS travels as a count and u64s; its size answer carries an empty list.
    answer = get((CKA.ALLOWED_MECHANISMS, 0))
    assert answer == head + u32(1) + u32(CKA.ALLOWED_MECHANISMS) + b"\x01" + u32(64) + u32(0) + u64(CKR.OK)
    # Unknown object handle.
    template = u32(1) + u32(CKA.CLASS) + u32(0)
    answer = conn.call(body(24, "uufA", u64(session), u64(4242), template))
    assert answer == error_body(CKR.OBJECT_HANDLE_INVALID)
    conn.close()


def test_answers_match_p11_kit_remote_with_softhsm(token, tmp_path):
    """Differential check against the reference server: p11-kit remote in front of SoftHSM2,
    holding the same certificate. Size queries, too-small buffers, unknown attributes and the
    wrong-PIN error must be byte-identical."""
    env = softhsm_env(tmp_path)
    run([require_tool("softhsm2-util"), "--init-token", "--free", "--label", "ref", "--pin", "1234",
         "--so-pin", "5678"], env=env)  # fmt: skip
    der = token.pki.rsa_cert.public_bytes(Encoding.DER)
    run([require_tool("pkcs11-tool"), "--module", SOFTHSM_MODULE, "--token-label", "ref", "--login", "--pin",
         "1234", "--write-object", token.file("rsa.der", der), "--type", "cert", "--id", RSA_ID.hex(),
         "--label", RSA_LABEL], env=env)  # fmt: skip

    def exchange(conn: RawConnection, slot: int) -> list[bytes]:
        conn.call(INITIALIZE)
        session = int.from_bytes(conn.call(body(10, "uu", u64(slot), u64(CKF.SERIAL_SESSION)))[-8:], "big")
        cert = find_one(conn, session, CKO.CERTIFICATE, RSA_ID)
        sizes = [
            CKA.CLASS, CKA.LABEL, CKA.VALUE, CKA.ID, CKA.TOKEN, CKA.MODULUS, CKA.SERIAL_NUMBER, CKA.SUBJECT
        ]  # fmt: skip
        size_query = u32(len(sizes)) + b"".join(u32(t) + u32(0) for t in sizes)
        small = u32(3) + u32(CKA.CLASS) + u32(8) + u32(CKA.LABEL) + u32(2) + u32(CKA.TOKEN) + u32(1)
        values = u32(3) + u32(CKA.ID) + u32(16) + u32(CKA.LABEL) + u32(64) + u32(CKA.SUBJECT) + u32(1024)
        return [
            conn.call(body(24, "uufA", u64(session), u64(cert), size_query)),
            conn.call(body(24, "uufA", u64(session), u64(cert), small)),
            conn.call(body(24, "uufA", u64(session), u64(cert), values)),
            conn.call(body(18, "uuay", u64(session), u64(1), ay(b"9999"))),
            conn.call(body(4, "yfu", b"\x01", u32(0)))[:11],  # count answer (slot counts differ)
        ]

    reference = RawConnection.spawn([require_tool("p11-kit"), "remote", SOFTHSM_MODULE], env=env)
    try:
        reference.call(INITIALIZE)
        slots = reference.call(body(4, "yfu", b"\x01", u32(8)))
        expected = exchange(reference, int.from_bytes(slots[15:23], "big"))
        # p11-kit's own server drops the connection on an unknown call id ...
        with pytest.raises(EOFError):
            reference.call(body(200, ""))
    finally:
        reference.process.kill()
        reference.process.wait()
    ours = RawConnection(token.socket, version=0)
    try:
        assert exchange(ours, 1) == expected
        # ... where ours answers CKR_FUNCTION_NOT_SUPPORTED and carries on.
        assert ours.call(body(200, "")) == error_body(CKR.FUNCTION_NOT_SUPPORTED)
        assert ours.call(body(3, ""))[:8] == bytes.fromhex("0000000300000005")
    finally:
        ours.close()


def test_every_other_call_gets_an_answer(token):
    conn = RawConnection(token.socket, version=2)
    session = open_session(conn, login=False)
    s = u64(session)
    expectations = [
        (body(10, "uu", u64(1), u64(CKF.SERIAL_SESSION | CKF.RW_SESSION)), CKR.TOKEN_WRITE_PROTECTED),
        (body(10, "uu", u64(1), u64(0)), CKR.SESSION_PARALLEL_NOT_SUPPORTED),
        (body(10, "uu", u64(9), u64(CKF.SERIAL_SESSION)), CKR.SLOT_ID_INVALID),
        (body(9, "uayz", u64(1), ay(b"0000"), u32(3) + b"new"), CKR.TOKEN_WRITE_PROTECTED),
        (body(88, "uays", u64(1), ay(b"0000"), u32(32) + b" " * 32), CKR.TOKEN_WRITE_PROTECTED),
        (body(20, "uaA", s, u32(0)), CKR.SESSION_READ_ONLY),
        (body(22, "uu", s, u64(1)), CKR.SESSION_READ_ONLY),
        (body(25, "uuaA", s, u64(1), u32(0)), CKR.SESSION_READ_ONLY),
        (body(15, "uayay", s, ay(b"a"), ay(b"b")), CKR.SESSION_READ_ONLY),
        (body(59, "uMaAaA", s, u32(CKM.RSA_PKCS_KEY_PAIR_GEN), u32(0), u32(0)), CKR.SESSION_READ_ONLY),
        (body(64, "ufy", s, u32(16)), CKR.FUNCTION_NOT_SUPPORTED),
        (body(63, "uay", s, ay(b"seed")), CKR.FUNCTION_NOT_SUPPORTED),
        (body(16, "ufy", s, u32(0)), CKR.FUNCTION_NOT_SUPPORTED),
        (body(48, "uMu", s, PLAIN_V2, u64(1)), CKR.FUNCTION_NOT_SUPPORTED),
        (body(37, "uM", s, u32(CKM.SHA256)), CKR.FUNCTION_NOT_SUPPORTED),
        (body(29, "uMu", s, PLAIN_V2, u64(1)), CKR.FUNCTION_NOT_SUPPORTED),
        (body(65, "u", u64(0)), CKR.FUNCTION_NOT_SUPPORTED),
        (body(78, "uMu", s, PLAIN_V2, u64(1)), CKR.FUNCTION_NOT_SUPPORTED),
        (body(1000, ""), CKR.FUNCTION_NOT_SUPPORTED),
        (body(13, "u", u64(77)), CKR.SESSION_HANDLE_INVALID),
        (body(19, "u", s), CKR.USER_NOT_LOGGED_IN),
        (body(18, "uuay", s, u64(0), ay(PIN)), CKR.SESSION_READ_ONLY_EXISTS),
        (body(18, "uuay", s, u64(1), b"\x00" + u32(6)), CKR.ARGUMENTS_BAD),
        (body(28, "u", s), CKR.OPERATION_NOT_INITIALIZED),
        (body(45, "ufy", s, u32(64)), CKR.OPERATION_NOT_INITIALIZED),
        (body(8, "uu", u64(1), u64(CKM.RSA_X_509)), CKR.MECHANISM_INVALID),
        (body(42, "uMu", s, u32(CKM.AES_CBC) + b"\x01" + u32(16) + bytes(16), u64(1)), CKR.MECHANISM_INVALID),
        # Arguments that do not fit the signature: an error, and the connection lives on.
        (body(5, "u", b"\x00\x01"), CKR.DEVICE_ERROR),
        (body(5, "u", u64(1) + b"extra"), CKR.DEVICE_ERROR),
    ]
    for request, expected in expectations:
        assert conn.call(request) == error_body(expected), (request[:4].hex(), expected.name)
    info = conn.call(body(13, "u", s))
    expected_info = u64(1) + u64(CKS.RO_PUBLIC_SESSION) + u64(CKF.SERIAL_SESSION) + u64(0)
    assert info == bytes.fromhex("0000000d00000004") + b"uuuu" + expected_info
    mechanism_info = conn.call(body(8, "uu", u64(1), u64(CKM.ECDSA)))
    flags = CKF.SIGN | CKF.EC_F_P | CKF.EC_NAMEDCURVE | CKF.EC_UNCOMPRESS
    assert mechanism_info == bytes.fromhex("0000000800000003") + b"uuu" + u64(256) + u64(256) + u64(flags)
    # C_Login as the user, then again: already logged in. Cancel with a NULL mechanism.
    assert conn.call(body(18, "uuay", s, u64(1), ay(PIN))) == bytes.fromhex("0000001200000000")
    assert conn.call(body(18, "uuay", s, u64(1), ay(PIN))) == error_body(CKR.USER_ALREADY_LOGGED_IN)
    key = find_one(conn, session, CKO.PRIVATE_KEY, RSA_ID)
    assert conn.call(body(42, "uMu", s, PLAIN_V2, u64(key))) == bytes.fromhex("0000002a00000000")
    assert conn.call(body(42, "uMu", s, PLAIN_V2, u64(key))) == error_body(CKR.OPERATION_ACTIVE)
    assert conn.call(body(42, "uMu", s, u32(0xFFFFFFFF), u64(0))) == bytes.fromhex("0000002a00000000")
    assert conn.call(body(45, "ufy", s, u32(256))) == error_body(CKR.OPERATION_NOT_INITIALIZED)
    assert conn.call(body(2, "")) == bytes.fromhex("0000000200000000")  # C_Finalize
    conn.close()
    assert token.signer.calls == []


# --- robustness -------------------------------------------------------------------------------


def test_fuzzed_frames_close_only_their_connection(token):
    rng = random.Random(1234)
    valid = [INITIALIZE, body(4, "yfu", b"\x01", u32(4)), body(6, "u", u64(1)),
             body(24, "uufA", u64(1), u64(1), u32(1) + u32(0) + u32(0))]  # fmt: skip
    connected_before = token.server.connection_count
    started = time.monotonic()
    for round_number in range(400):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(str(token.socket))
        kind = round_number % 5
        try:
            if kind == 0:  # random bytes from the very first byte
                sock.sendall(rng.randbytes(rng.randrange(1, 200)))
            elif kind == 1:  # a truncated frame
                frame = u32(0x10) + u32(0) + u32(1000) + rng.randbytes(rng.randrange(0, 999))
                sock.sendall(bytes([rng.randrange(0, 3)]) + frame)
            elif kind == 2:  # a valid header around a mangled body
                base = bytearray(rng.choice(valid))
                for _ in range(rng.randrange(1, 6)):
                    base[rng.randrange(len(base))] = rng.randrange(256)
                sock.sendall(b"\x00" + u32(0x10) + u32(0) + u32(len(base)) + bytes(base))
            elif kind == 3:  # absurd lengths
                sock.sendall(b"\x02" + u32(0x10) + u32(0xFFFFFFFF) + u32(0xFFFFFFFF))
            else:  # a valid body cut short, with a truthful header
                base = rng.choice(valid)
                cut = base[: rng.randrange(0, len(base))]
                sock.sendall(b"\x00" + u32(0x11) + u32(0) + u32(len(cut)) + cut)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(4096):
                pass
        except OSError:
            pass  # the server may reset a connection it gave up on
        finally:
            sock.close()
    assert time.monotonic() - started < 60
    deadline = time.monotonic() + 10
    while token.server.connection_count > connected_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert token.server.connection_count <= connected_before  # every fuzzed connection was closed
    # A fresh, real consumer still gets everything.
    assert f"token label        : {TOKEN_LABEL}" in pkcs11_tool(token, "-L").stdout
    digest_file = token.file("after-fuzz.bin", hashlib.sha256(b"after").digest())
    signature = str(token.work / "after-fuzz.sig")
    pkcs11_tool(token, "--login", "--pin", PIN.decode(), "--sign", "--id", EC_ID.hex(), "-m", "ECDSA",
                "--signature-format", "openssl", "-i", digest_file, "-o", signature)  # fmt: skip
    openssl_verify_digest(token.pki.path("ec.pub"), digest_file, signature)


def test_many_concurrent_consumers(token):
    """24 clients at once (threads of ours plus pkcs11-tool processes), each signing."""
    errors: list[BaseException] = []
    signatures: list[bytes] = []
    barrier = threading.Barrier(20)

    def worker(index: int) -> None:
        try:
            with Pkcs11Client.connect(token.socket) as client:
                client.login(PIN)
                key = client.objects(object_class=CKO.PRIVATE_KEY, id=RSA_ID)[0]
                barrier.wait(timeout=30)
                for round_number in range(3):
                    signatures.append(client.sign(key, CKM.SHA256_RSA_PKCS, b"%d-%d" % (index, round_number)))
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(20)]
    digest_file = token.file("concurrent.bin", hashlib.sha256(b"c").digest())
    tools = [
        subprocess.Popen(
            [require_tool("pkcs11-tool"), "--module", CLIENT_MODULE, "--login", "--pin", PIN.decode(),
             "--sign", "--id", EC_ID.hex(), "-m", "ECDSA", "--signature-format", "openssl", "-i", digest_file,
             "-o", str(token.work / f"concurrent-{i}.sig")],
            env=token.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        for i in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for tool in tools:
        assert tool.wait(timeout=120) == 0, tool.stderr.read()
    assert errors == []
    assert len(signatures) == 60
    for i in range(4):
        openssl_verify_digest(token.pki.path("ec.pub"), digest_file, str(token.work / f"concurrent-{i}.sig"))
    # RSA PKCS#1 v1.5 is deterministic: every message's signature is there, and verifies.
    for index in (0, 7, 19):
        message = b"%d-2" % index
        expected = token.pki.rsa_key.sign(message, padding.PKCS1v15(), hashes.SHA256())
        assert expected in signatures
        signed = (token.file("c.txt", message), token.file("c.sig", expected))
        openssl_verify_data(token.pki.path("rsa.pub"), *signed)


def test_replacing_tokens_and_closing(served, tmp_path):
    signer = RecordingSigner({RSA_ID: served.pki.rsa_key, EC_ID: served.pki.ec_key})
    first = build_token(served.pki, signer, label="first")
    second = build_token(served.pki, signer, label="second", require_login=False, private=False)
    server = serve(tmp_path / "run" / "s.sock", [first, second])
    client = Pkcs11Client.connect(tmp_path / "run" / "s.sock")
    assert [client.token_info(slot).label for slot in client.slots()] == ["first", "second"]
    assert not client.token_info(2).login_required
    session = client.session(1)
    server.set_tokens([second])
    with pytest.raises(Pkcs11Error) as replaced:
        client.objects(1)
    assert replaced.value.ckr == CKR.SESSION_HANDLE_INVALID
    assert client.token_info(1).label == "second"
    assert client.session(1) != session  # the client opened a fresh session on the new token
    # PIN-less mode: no CKF_LOGIN_REQUIRED and CKA_PRIVATE=false keys sign without C_Login.
    key = client.objects(1, object_class=CKO.PRIVATE_KEY, id=EC_ID)[0]
    signature = client.sign(key, CKM.ECDSA_SHA256, b"second")
    (tmp_path / "m").write_bytes(b"second")
    (tmp_path / "s").write_bytes(raw_ecdsa_to_der(signature))
    openssl_verify_data(served.pki.path("ec.pub"), str(tmp_path / "m"), str(tmp_path / "s"))
    started = time.monotonic()
    server.close()
    assert time.monotonic() - started < 10
    assert not (tmp_path / "run" / "s.sock").exists()
    with pytest.raises(Pkcs11Error):
        client.slots()
    client.close()


# --- building blocks --------------------------------------------------------------------------


def test_codec_round_trips_every_type():
    attributes = [
        WireAttribute.of(CKA.CLASS, CKO.PRIVATE_KEY.value),
        WireAttribute.of(CKA.SIGN, True),
        WireAttribute.of(CKA.LABEL, b"label"),
        WireAttribute.of(CKA.START_DATE, b"20260101"),
        WireAttribute.of(CKA.ALLOWED_MECHANISMS, (CKM.ECDSA.value, CKM.ECDSA_SHA256.value)),
        WireAttribute.of(CKA.WRAP_TEMPLATE, (WireAttribute.of(CKA.TOKEN, True),)),
        WireAttribute(CKA.VALUE),
        WireAttribute(CKA.VALUE, None, 12),
    ]
    request = Writer(Call.C_CreateObject, response=False).ulong(7).attribute_array(attributes).getvalue()
    reader = Reader.request(request)
    assert reader.ulong() == 7
    decoded = reader.attribute_array()
    reader.done()
    assert decoded[0] == WireAttribute(CKA.CLASS, 3, 8)
    assert decoded[1] == WireAttribute(CKA.SIGN, 1, 1)
    assert decoded[2:5] == attributes[2:5]
    assert decoded[5] == WireAttribute(CKA.WRAP_TEMPLATE, (WireAttribute(CKA.TOKEN, 1, 1),), 24)
    assert decoded[6:] == [WireAttribute(CKA.VALUE), WireAttribute(CKA.VALUE, None, 12)]

    nested = [AttributeRequest(CKA.ID, 0), AttributeRequest(CKA.UNWRAP_TEMPLATE, 48,
                                                            (AttributeRequest(CKA.CLASS, 8),))]  # fmt: skip
    request = Writer(Call.C_GetAttributeValue, response=False).ulong(1).ulong(2).attribute_buffer(nested)
    reader = Reader.request(request.getvalue())
    assert (reader.ulong(), reader.ulong(), reader.attribute_buffer()) == (1, 2, nested)

    for layout in MechanismLayout:
        for mechanism in (
            Mechanism(CKM.ECDSA),
            Mechanism(CKM.SHA384_RSA_PKCS_PSS, PssParams(CKM.SHA384, 3, 48)),
            Mechanism(CKM.RSA_PKCS_OAEP, OaepParams(CKM.SHA256, 2, 1, b"label")),
            None,
        ):
            data = Writer(Call.C_SignInit, response=False).ulong(1).mechanism(mechanism, layout).ulong(2)
            reader = Reader.request(data.getvalue())
            assert reader.ulong() == 1
            got = reader.mechanism(layout)
            assert reader.ulong() == 2
            reader.done()
            if mechanism is not None and mechanism.type == CKM.ECDSA and layout is MechanismLayout.V0:
                assert got == Mechanism(CKM.ECDSA, None)
            else:
                assert got == mechanism

    response = (
        Writer(Call.C_GetTokenInfo, response=True)
        .space_string("é" * 20, 32).space_string("m", 32).space_string("model", 16).space_string("1", 16)
    )  # fmt: skip
    with pytest.raises(ValueError, match="were not written"):
        response.getvalue()
    with pytest.raises(Pkcs11Error) as error:
        Reader.response(error_body(CKR.PIN_INCORRECT), Call.C_Login)
    assert error.value.ckr == CKR.PIN_INCORRECT
    assert len(SIGNATURES) == 90


def test_objects_for_identity_match_the_certificate(served):
    from asn1crypto import core
    from asn1crypto import x509 as asn1_x509
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    pki = served.pki
    cert, public, private = objects_for_identity(pki.ec_cert, "project/policy", "release")
    parsed = asn1_x509.Certificate.load(pki.ec_cert.public_bytes(Encoding.DER))
    assert core.Integer.load(cert.attributes[CKA.SERIAL_NUMBER]).native == pki.ec_cert.serial_number
    assert asn1_x509.Name.load(cert.attributes[CKA.SUBJECT]).native == parsed.subject.native
    assert cert.attributes[CKA.ISSUER] == pki.ca.subject.public_bytes()
    assert cert.attributes[CKA.CERTIFICATE_CATEGORY] == 1 and cert.attributes[CKA.TRUSTED] is False
    point = core.OctetString.load(public.attributes[CKA.EC_POINT]).native
    assert point == pki.ec_key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    assert core.ObjectIdentifier.load(private.attributes[CKA.EC_PARAMS]).dotted == "1.2.840.10045.3.1.7"
    assert private.id == public.id == cert.id == b"project/policy"
    assert private.attributes[CKA.SENSITIVE] and not private.attributes[CKA.EXTRACTABLE]
    assert private.private and not public.private and not cert.private
    assert CKA.VALUE not in private.attributes and CKA.PRIVATE_EXPONENT not in private.attributes
    _, rsa_public, _ = objects_for_identity(pki.rsa_cert, b"\x01", "rsa")
    numbers = pki.rsa_key.public_key().public_numbers()
    assert int.from_bytes(rsa_public.attributes[CKA.MODULUS], "big") == numbers.n
    assert rsa_public.attributes[CKA.MODULUS_BITS] == 2048
    assert rsa_public.attributes[CKA.PUBLIC_KEY_INFO] == pki.rsa_key.public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo
    )


def test_caller_info_hides_secrets():
    caller = CallerInfo(
        1, 1000, 1000,
        ("openssl", "dgst", "-sign", "pkcs11:token=T;object=k;pin-value=s3cret", "-passin", "pass:hunter2",
         "--pin", "1234", "--pin=5678"),
        "alice",
    )  # fmt: skip
    text = caller.describe()
    for secret in ("s3cret", "hunter2", "1234", "5678"):
        assert secret not in text
    assert "pid 1 uid 1000 (alice): openssl dgst -sign pkcs11:token=T;object=k;pin-value=***" in text
    here = socket.socketpair()
    try:
        me = CallerInfo.from_socket(here[0])
    finally:
        for end in here:
            end.close()
    assert (me.pid, me.uid) == (os.getpid(), os.geteuid())
    assert me.command_line and "pytest" in " ".join(me.command_line)
