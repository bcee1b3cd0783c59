"""The software and PKCS#11 keystores, checked with openssl, pkcs11-tool and a second PKCS#8 parser."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
from asn1crypto import keys as asn1_keys
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from conftest import require_tool, run
from signbridge.crypto.hashes import HashAlgorithm
from signbridge.crypto.signatures import EcdsaFormat, Scheme, SignatureRequest, verify_digest_signature
from signbridge.errors import ConfigError, KeystoreError, SignatureError
from signbridge.server.keystores import KeyRef, KeySpec, Keystore
from signbridge.server.keystores.factory import describe_keystore, open_keystore
from signbridge.server.keystores.pkcs11 import Pkcs11Keystore
from signbridge.server.keystores.software import SoftwareKeystore
from softhsm import SoftHsmToken, create_softhsm_token, softhsm_in_this_process

BACKENDS = ["software", "pkcs11"]
SHA256, SHA384, SHA512 = HashAlgorithm.SHA256, HashAlgorithm.SHA384, HashAlgorithm.SHA512
RSA_CASES = [
    (Scheme.RSA_PKCS1, SHA256),
    (Scheme.RSA_PKCS1, SHA384),
    (Scheme.RSA_PKCS1, SHA512),
    (Scheme.RSA_PSS, SHA256),
    (Scheme.RSA_PSS, SHA384),
    (Scheme.RSA_PSS, SHA512),
]
EC_CASES = [(Scheme.ECDSA, SHA256), (Scheme.ECDSA, SHA384), (Scheme.ECDSA, SHA512)]
SIGNING_CASES = [
    (spec, scheme, algorithm)
    for spec in KeySpec
    for scheme, algorithm in (RSA_CASES if spec.family == "rsa" else EC_CASES)
]


@dataclass
class Hsm:
    token: SoftHsmToken
    spare: SoftHsmToken  # a second token no keystore logs in to, for first-login failures


@pytest.fixture(scope="module")
def hsm(tmp_path_factory: pytest.TempPathFactory):
    token = create_softhsm_token(tmp_path_factory.mktemp("softhsm"), label="signbridge")
    spare = token.add_token("spare")
    with softhsm_in_this_process(token):
        yield Hsm(token, spare)


@pytest.fixture(scope="module")
def stores(hsm: Hsm, tmp_path_factory: pytest.TempPathFactory):
    opened = {
        "software": SoftwareKeystore(tmp_path_factory.mktemp("software") / "data"),
        "pkcs11": Pkcs11Keystore(hsm.token.module, hsm.token.label, hsm.token.pin),
    }
    yield opened
    for store in opened.values():
        store.close()


@pytest.fixture(scope="module")
def key_for(stores: dict[str, Keystore]):
    """One key per backend and key type, generated on first use and shared by the module's tests."""
    made: dict[tuple[str, KeySpec], KeyRef] = {}

    def get(backend: str, spec: KeySpec) -> KeyRef:
        if (backend, spec) not in made:
            made[backend, spec] = stores[backend].generate(spec, f"test {spec.label}")
        return made[backend, spec]

    return get


def digest_request(algorithm: HashAlgorithm, scheme: Scheme, data: bytes = b"signbridge") -> SignatureRequest:
    return SignatureRequest(algorithm.digest(data), algorithm, scheme, EcdsaFormat.ASN1)


def openssl_verify(
    public_key, request: SignatureRequest, signature: bytes, directory: Path
) -> subprocess.CompletedProcess:
    """``openssl pkeyutl -verify`` over the digest, with the padding spelled out for openssl."""
    directory.mkdir(parents=True, exist_ok=True)
    public_pem = directory / "public.pem"
    public_pem.write_bytes(
        public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    (directory / "digest.bin").write_bytes(request.digest)
    (directory / "signature.bin").write_bytes(signature)
    name = request.hash_algorithm.hashlib_name
    args = [
        require_tool("openssl"), "pkeyutl", "-verify", "-pubin", "-inkey", str(public_pem),
        "-in", str(directory / "digest.bin"), "-sigfile", str(directory / "signature.bin"),
        "-pkeyopt", f"digest:{name}",
    ]
    if request.scheme is Scheme.RSA_PSS:
        args += ["-pkeyopt", "rsa_padding_mode:pss", "-pkeyopt", "rsa_pss_saltlen:digest",
                 "-pkeyopt", f"rsa_mgf1_md:{name}"]
    return subprocess.run(args, capture_output=True, text=True)


def assert_openssl_accepts(public_key, request: SignatureRequest, signature: bytes, directory: Path) -> None:
    proc = openssl_verify(public_key, request, signature, directory)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Signature Verified Successfully" in proc.stdout


def keystore_error(call) -> KeystoreError:
    with pytest.raises(KeystoreError) as info:
        call()
    return info.value


def formatted(error: BaseException) -> str:
    """Everything a traceback would show: the message and any chained exceptions."""
    return "".join(traceback.format_exception(error))


# --- both backends --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "spec, scheme, algorithm",
    SIGNING_CASES,
    ids=[f"{spec.label}-{scheme.value}-{hash_.hashlib_name}" for spec, scheme, hash_ in SIGNING_CASES],
)
def test_signature_verifies_with_openssl(backend, spec, scheme, algorithm, stores, key_for, tmp_path):
    store = stores[backend]
    ref = key_for(backend, spec)
    request = digest_request(algorithm, scheme)
    signature = store.sign(ref, request)
    public_key = store.public_key(ref)

    assert_openssl_accepts(public_key, request, signature, tmp_path)
    verify_digest_signature(public_key, request, signature)
    if spec.family == "rsa":
        assert isinstance(public_key, rsa.RSAPublicKey)
        assert public_key.key_size == spec.bits
        assert len(signature) == spec.bits // 8
    else:
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        assert public_key.curve.key_size == spec.bits


@pytest.mark.parametrize("backend", BACKENDS)
def test_openssl_rejects_an_altered_signature(backend, stores, key_for, tmp_path):
    ref = key_for(backend, KeySpec.RSA_2048)
    request = digest_request(SHA256, Scheme.RSA_PKCS1)
    signature = bytearray(stores[backend].sign(ref, request))
    signature[-1] ^= 1
    proc = openssl_verify(stores[backend].public_key(ref), request, bytes(signature), tmp_path)
    assert proc.returncode != 0
    assert "Signature Verified Successfully" not in proc.stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_pkcs1_signature_is_deterministic_and_pss_is_not(backend, stores, key_for):
    store, ref = stores[backend], key_for(backend, KeySpec.RSA_2048)
    pkcs1 = digest_request(SHA256, Scheme.RSA_PKCS1)
    pss = digest_request(SHA256, Scheme.RSA_PSS)
    assert store.sign(ref, pkcs1) == store.sign(ref, pkcs1)
    assert store.sign(ref, pss) != store.sign(ref, pss)  # a fresh random salt each time


@pytest.mark.parametrize("backend", BACKENDS)
def test_scheme_that_does_not_fit_the_key_is_refused(backend, stores, key_for):
    store = stores[backend]
    with pytest.raises(SignatureError, match="RSA key cannot make Ecdsa"):
        store.sign(key_for(backend, KeySpec.RSA_2048), digest_request(SHA256, Scheme.ECDSA))
    with pytest.raises(SignatureError, match="ECDSA key cannot make RsaPss"):
        store.sign(key_for(backend, KeySpec.EC_P256), digest_request(SHA256, Scheme.RSA_PSS))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_key_references_are_refused(backend, stores):
    store = stores[backend]
    other = "pkcs11" if backend == "software" else "software"
    request = digest_request(SHA256, Scheme.RSA_PKCS1)
    assert "belongs to the" in str(keystore_error(lambda: store.sign(KeyRef(other, "00" * 16), request)))
    traversal = KeyRef(backend, "../../etc/passwd")
    assert "malformed" in str(keystore_error(lambda: store.sign(traversal, request)))
    missing = KeyRef(backend, "ab" * 16)
    assert f"no key {missing}" in str(keystore_error(lambda: store.sign(missing, request)))
    assert f"no key {missing}" in str(keystore_error(lambda: store.public_key(missing)))
    assert f"no key {missing}" in str(keystore_error(lambda: store.delete(missing)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_deleted_key_is_gone(backend, stores):
    store = stores[backend]
    ref = store.generate(KeySpec.EC_P256, "short-lived")
    request = digest_request(SHA256, Scheme.ECDSA)
    store.sign(ref, request)
    store.delete(ref)
    assert "no key" in str(keystore_error(lambda: store.sign(ref, request)))
    assert "no key" in str(keystore_error(lambda: store.public_key(ref)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_reaches_the_key_past_the_cache(backend, stores):
    """Readiness: ``check`` finds the key where it is kept, even after it was used (and cached)."""
    store = stores[backend]
    ref = store.generate(KeySpec.EC_P256, "checked")
    store.sign(ref, digest_request(SHA256, Scheme.ECDSA))
    store.check(ref)
    store.delete(ref)
    assert "no key" in str(keystore_error(lambda: store.check(ref)))


def test_check_notices_a_key_file_gone_while_signing_still_uses_the_cache(tmp_path):
    store = SoftwareKeystore(tmp_path / "data")
    try:
        ref = store.generate(KeySpec.EC_P256, "cached")
        request = digest_request(SHA256, Scheme.ECDSA)
        store.sign(ref, request)
        (key_file,) = store.keys_dir.iterdir()
        key_file.unlink()
        store.sign(ref, request)
        assert "no key" in str(keystore_error(lambda: store.check(ref)))
    finally:
        store.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_signing(backend, stores, key_for):
    """8 threads x 50 signatures, RSA (PKCS#1 and PSS) and ECDSA mixed; every one must verify."""
    store = stores[backend]
    refs = [key_for(backend, KeySpec.RSA_2048), key_for(backend, KeySpec.EC_P256)]
    public_keys = {ref: store.public_key(ref) for ref in refs}
    jobs = [(refs[0], Scheme.RSA_PKCS1), (refs[0], Scheme.RSA_PSS), (refs[1], Scheme.ECDSA)]
    results: list[tuple[KeyRef, SignatureRequest, bytes]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def worker(number: int) -> None:
        start.wait()
        try:
            for i in range(50):
                ref, scheme = jobs[(number + i) % len(jobs)]
                request = digest_request(SHA256, scheme, f"{number}/{i}".encode())
                signature = store.sign(ref, request)
                with lock:
                    results.append((ref, request, signature))
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread and reported there
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    elapsed = time.perf_counter() - began

    assert not errors, errors
    assert len(results) == 400
    for ref, request, signature in results:
        verify_digest_signature(public_keys[ref], request, signature)
    rate = 400 / elapsed
    print(f"{backend}: 400 signatures from 8 threads in {elapsed:.2f}s ({rate:.0f}/s)")
    assert rate > 100, f"{backend} signs only {rate:.0f}/s under concurrency"


# --- software keystore ----------------------------------------------------------------------------


def decrypt_key_file(data_dir: Path, ref: KeyRef) -> tuple[dict, bytes]:
    """Decrypt a key file by its documented layout, without the keystore's code."""
    blob = (data_dir / "keys" / f"{ref.key_id}.key").read_bytes()
    magic = b"SBKEY1\n"
    assert blob.startswith(magic)
    header_end = len(magic) + 2 + int.from_bytes(blob[len(magic) : len(magic) + 2], "big")
    nonce = blob[header_end : header_end + 12]
    master = (data_dir / "master.key").read_bytes()
    der = AESGCM(master).decrypt(nonce, blob[header_end + 12 :], blob[:header_end])
    return json.loads(blob[len(magic) + 2 : header_end]), der


@pytest.mark.parametrize("spec", [KeySpec.RSA_2048, KeySpec.EC_P384])
def test_software_key_file_is_encrypted_pkcs8(spec, tmp_path):
    data_dir = tmp_path / "data"
    store = SoftwareKeystore(data_dir)
    ref = store.generate(spec, "release key")
    public_key = store.public_key(ref)
    path = data_dir / "keys" / f"{ref.key_id}.key"
    blob = path.read_bytes()

    header, der = decrypt_key_file(data_dir, ref)
    info = asn1_keys.PrivateKeyInfo.load(der)
    assert info.dump() == der  # DER, and nothing after it
    if spec.family == "rsa":
        assert info["private_key_algorithm"]["algorithm"].native == "rsa"
        modulus = info["private_key"].parsed["modulus"].native
        assert modulus == public_key.public_numbers().n
        public_marker = modulus.to_bytes(spec.bits // 8, "big")
        algorithm_oid = bytes.fromhex("06092a864886f70d010101")
    else:
        assert info["private_key_algorithm"]["algorithm"].native == "ec"
        assert info["private_key_algorithm"]["parameters"].chosen.native == "secp384r1"
        point = public_key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        assert info["private_key"].parsed["public_key"].native == point
        public_marker = point
        algorithm_oid = bytes.fromhex("06072a8648ce3d0201")
    assert header == {
        "id": ref.key_id, "type": spec.label, "label": "release key", "created": header["created"]
    }

    # The plaintext's markers must not survive encryption.
    assert der[:64] not in blob
    assert public_marker not in blob
    assert algorithm_oid not in blob
    assert b"PRIVATE KEY" not in blob and b"-----BEGIN" not in blob
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((data_dir / "keys").stat().st_mode) == 0o700
    assert not [p.name for p in (data_dir / "keys").iterdir() if p.name != path.name]  # no temp files left
    store.close()


def test_master_key_is_created_0600_whatever_the_umask(tmp_path):
    previous = os.umask(0)
    try:
        SoftwareKeystore(tmp_path / "data").close()
    finally:
        os.umask(previous)
    master = tmp_path / "data" / "master.key"
    assert stat.S_IMODE(master.stat().st_mode) == 0o600
    assert len(master.read_bytes()) == 32
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["keys", "master.key"]


def test_master_key_is_kept_across_openings(tmp_path):
    first = SoftwareKeystore(tmp_path)
    ref = first.generate(KeySpec.RSA_2048, "persistent")
    master = (tmp_path / "master.key").read_bytes()
    first.close()
    second = SoftwareKeystore(tmp_path)
    request = digest_request(SHA256, Scheme.RSA_PKCS1)
    verify_digest_signature(second.public_key(ref), request, second.sign(ref, request))
    assert (tmp_path / "master.key").read_bytes() == master
    second.close()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o666])
def test_master_key_open_to_others_is_refused(mode, tmp_path):
    SoftwareKeystore(tmp_path).close()
    master = tmp_path / "master.key"
    master.chmod(mode)
    before = master.read_bytes()
    error = keystore_error(lambda: SoftwareKeystore(tmp_path))
    assert str(master) in str(error)
    assert f"{mode:04o}" in str(error) and "chmod 600" in str(error)
    assert master.read_bytes() == before
    assert stat.S_IMODE(master.stat().st_mode) == mode


def test_wrong_master_key_is_a_clear_error(tmp_path):
    store = SoftwareKeystore(tmp_path)
    ref = store.generate(KeySpec.EC_P256, "k")
    store.close()
    key_file = tmp_path / "keys" / f"{ref.key_id}.key"
    before = key_file.read_bytes()
    (tmp_path / "master.key").write_bytes(os.urandom(32))

    reopened = SoftwareKeystore(tmp_path)
    error = keystore_error(lambda: reopened.sign(ref, digest_request(SHA256, Scheme.ECDSA)))
    assert "different master key" in str(error) and str(key_file) in str(error)
    assert key_file.read_bytes() == before


def test_master_key_of_the_wrong_size_is_refused(tmp_path):
    fd = os.open(tmp_path / "master.key", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"too short")
    os.close(fd)
    assert "must hold 32 bytes, not 9" in str(keystore_error(lambda: SoftwareKeystore(tmp_path)))


def test_missing_master_key_with_existing_keys_is_refused(tmp_path):
    store = SoftwareKeystore(tmp_path)
    store.generate(KeySpec.EC_P256, "k")
    store.close()
    (tmp_path / "master.key").unlink()
    error = keystore_error(lambda: SoftwareKeystore(tmp_path))
    assert "master.key is missing" in str(error) and "backup" in str(error)
    assert not (tmp_path / "master.key").exists()


def test_key_file_moved_to_another_id_does_not_decrypt(tmp_path):
    store = SoftwareKeystore(tmp_path)
    first = store.generate(KeySpec.EC_P256, "first")
    second = store.generate(KeySpec.EC_P256, "second")
    store.close()
    shutil.copy(tmp_path / "keys" / f"{first.key_id}.key", tmp_path / "keys" / f"{second.key_id}.key")

    reopened = SoftwareKeystore(tmp_path)
    request = digest_request(SHA256, Scheme.ECDSA)
    assert "belongs to key" in str(keystore_error(lambda: reopened.sign(second, request)))
    verify_digest_signature(reopened.public_key(first), request, reopened.sign(first, request))


def test_altered_key_file_does_not_decrypt(tmp_path):
    store = SoftwareKeystore(tmp_path)
    ref = store.generate(KeySpec.EC_P256, "k")
    store.close()
    path = tmp_path / "keys" / f"{ref.key_id}.key"
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0x40
    path.write_bytes(bytes(blob))
    reopened = SoftwareKeystore(tmp_path)
    assert "or it was altered" in str(keystore_error(lambda: reopened.public_key(ref)))


def test_software_signing_is_fast(tmp_path):
    """Keys are decrypted and parsed once: RSA-2048 signing runs at the private-key operation's rate."""
    store = SoftwareKeystore(tmp_path)
    ref = store.generate(KeySpec.RSA_2048, "fast")
    store.close()
    reopened = SoftwareKeystore(tmp_path)  # starts with an empty cache
    request = digest_request(SHA256, Scheme.RSA_PKCS1)
    began = time.perf_counter()
    for _ in range(500):
        reopened.sign(ref, request)
    rate = 500 / (time.perf_counter() - began)
    print(f"software keystore: {rate:.0f} RSA-2048 signatures/s in one thread")
    assert rate > 500


def test_closed_software_keystore_refuses_work(tmp_path):
    store = SoftwareKeystore(tmp_path)
    ref = store.generate(KeySpec.EC_P256, "k")
    store.close()
    assert "closed" in str(keystore_error(lambda: store.sign(ref, digest_request(SHA256, Scheme.ECDSA))))
    assert "closed" in str(keystore_error(lambda: store.generate(KeySpec.EC_P256, "k")))


# --- PKCS#11 keystore -----------------------------------------------------------------------------

ATTRIBUTE_PROBE = """
import json, os, sys
import pkcs11
from pkcs11 import Attribute as A, ObjectClass
lib = pkcs11.lib(sys.argv[1])
token = lib.get_token(token_label=sys.argv[2])
with token.open(user_pin=os.environ["PROBE_PIN"]) as session:
    key_id = bytes.fromhex(sys.argv[3])
    key = session.get_key(ObjectClass.PRIVATE_KEY, id=key_id)
    report = {name: bool(key[getattr(A, name)]) for name in
              ("TOKEN", "PRIVATE", "SENSITIVE", "EXTRACTABLE", "ALWAYS_SENSITIVE", "NEVER_EXTRACTABLE",
               "SIGN", "DECRYPT", "UNWRAP", "DERIVE")}
    report["LABEL"] = key[A.LABEL]
    secret = A.PRIVATE_EXPONENT if key.key_type == pkcs11.KeyType.RSA else A.VALUE
    try:
        key[secret]
        report["secret_readable"] = True
    except pkcs11.exceptions.AttributeSensitive:
        report["secret_readable"] = False
    public = session.get_key(ObjectClass.PUBLIC_KEY, id=key_id)
    report["public_label"] = public[A.LABEL]
print(json.dumps(report))
"""


def pkcs11_tool_objects(token: SoftHsmToken) -> list[dict[str, str]]:
    """``pkcs11-tool --list-objects`` parsed into one dict per object (with its ``kind`` line)."""
    proc = run(
        [require_tool("pkcs11-tool"), "--module", token.module, "--token-label", token.label,
         "--login", "--pin", "env:PKCS11_TOOL_PIN", "--list-objects"],
        env={**os.environ, **token.env, "PKCS11_TOOL_PIN": token.pin},
        text=True,
    )
    objects: list[dict[str, str]] = []
    for line in proc.stdout.splitlines():
        if line and not line[0].isspace():
            objects.append({"kind": line.strip()})
        elif objects and ":" in line:
            name, _, value = line.strip().partition(":")
            objects[-1][name.strip()] = value.strip()
    return objects


@pytest.mark.parametrize("spec", [KeySpec.RSA_3072, KeySpec.EC_P384])
def test_token_keys_are_sensitive_and_never_extractable(spec, hsm, stores, key_for):
    ref = key_for("pkcs11", spec)

    probe = subprocess.run(
        [sys.executable, "-c", ATTRIBUTE_PROBE, hsm.token.module, hsm.token.label, ref.key_id],
        env={**os.environ, **hsm.token.env, "PROBE_PIN": hsm.token.pin},
        capture_output=True, text=True,
    )
    assert probe.returncode == 0, probe.stderr
    attributes = json.loads(probe.stdout)
    assert attributes == {
        "TOKEN": True, "PRIVATE": True, "SENSITIVE": True, "EXTRACTABLE": False,
        "ALWAYS_SENSITIVE": True, "NEVER_EXTRACTABLE": True,
        "SIGN": True, "DECRYPT": False, "UNWRAP": False, "DERIVE": False,
        "LABEL": f"test {spec.label}", "secret_readable": False, "public_label": f"test {spec.label}",
    }

    listed = [obj for obj in pkcs11_tool_objects(hsm.token) if obj.get("ID") == ref.key_id]
    private = [obj for obj in listed if obj["kind"].startswith("Private Key Object")]
    assert len(private) == 1 and len(listed) == 2, listed
    access = {item.strip() for item in private[0]["Access"].split(",")}
    assert {"sensitive", "always sensitive", "never extractable"} <= access
    assert "extractable" not in access  # pkcs11-tool prints a bare "extractable" for CKA_EXTRACTABLE true
    assert private[0]["Usage"] == "sign"
    assert private[0]["label"] == f"test {spec.label}"


@pytest.mark.parametrize("spec", [KeySpec.RSA_2048, KeySpec.EC_P256])
def test_token_public_key_matches_pkcs11_tool(spec, hsm, stores, key_for, tmp_path):
    ref = key_for("pkcs11", spec)
    out = tmp_path / "public.der"
    run(
        [require_tool("pkcs11-tool"), "--module", hsm.token.module, "--token-label", hsm.token.label,
         "--read-object", "--type", "pubkey", "--id", ref.key_id, "--output-file", str(out)],
        env={**os.environ, **hsm.token.env},
    )
    ours = stores["pkcs11"].public_key(ref).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert out.read_bytes() == ours


def test_wrong_pin_is_refused_without_showing_it(hsm):
    wrong = "wrong-pin-4711"
    error = keystore_error(lambda: Pkcs11Keystore(hsm.spare.module, hsm.spare.label, wrong))
    assert str(error) == "wrong PIN for the PKCS#11 token 'spare'"
    for secret in (wrong, hsm.spare.pin):
        assert secret not in formatted(error) and secret not in repr(error)
    # The right PIN still works afterwards.
    Pkcs11Keystore(hsm.spare.module, hsm.spare.label, hsm.spare.pin).close()


def test_wrong_pin_is_refused_while_the_token_is_open(hsm, stores):
    wrong = "wrong-pin-0815"
    error = keystore_error(lambda: Pkcs11Keystore(hsm.token.module, hsm.token.label, wrong))
    assert str(error) == "wrong PIN for the PKCS#11 token 'signbridge'"
    assert wrong not in formatted(error) and hsm.token.pin not in formatted(error)


def test_unknown_token_label(hsm):
    error = keystore_error(lambda: Pkcs11Keystore(hsm.token.module, "no-such-token", hsm.token.pin))
    assert "no token labelled 'no-such-token'" in str(error)
    assert "'signbridge'" in str(error) and "'spare'" in str(error)
    assert hsm.token.pin not in formatted(error)


def test_missing_or_unloadable_module(hsm, tmp_path):
    missing = str(tmp_path / "libmissing.so")
    error = keystore_error(lambda: Pkcs11Keystore(missing, hsm.token.label, hsm.token.pin))
    assert str(error) == f"the PKCS#11 module {missing} does not exist"
    not_a_library = tmp_path / "notes.so"
    not_a_library.write_text("not a shared object\n")
    error = keystore_error(lambda: Pkcs11Keystore(str(not_a_library), hsm.token.label, hsm.token.pin))
    assert f"cannot load the PKCS#11 module {not_a_library}" in str(error)
    assert hsm.token.pin not in formatted(error)


def test_pkcs11_keystore_repr_hides_the_pin(hsm, stores):
    assert hsm.token.pin not in repr(stores["pkcs11"])
    assert hsm.token.pin not in str(vars(stores["pkcs11"]))
    assert hsm.token.label in repr(stores["pkcs11"])


def test_keystores_sharing_a_token_close_independently(hsm, stores, key_for):
    """Login is per process: closing one keystore must not log out another on the same token."""
    ref = key_for("pkcs11", KeySpec.EC_P256)
    request = digest_request(SHA256, Scheme.ECDSA)
    second = Pkcs11Keystore(hsm.token.module, hsm.token.label, hsm.token.pin)
    verify_digest_signature(second.public_key(ref), request, second.sign(ref, request))
    second.close()
    second.close()  # closing twice is harmless
    assert "closed" in str(keystore_error(lambda: second.sign(ref, request)))
    verify_digest_signature(stores["pkcs11"].public_key(ref), request, stores["pkcs11"].sign(ref, request))


def test_deleted_token_key_is_removed_from_the_token(hsm, stores):
    store = stores["pkcs11"]
    ref = store.generate(KeySpec.EC_P256, "to delete")
    assert len([obj for obj in pkcs11_tool_objects(hsm.token) if obj.get("ID") == ref.key_id]) == 2
    store.delete(ref)
    assert [obj for obj in pkcs11_tool_objects(hsm.token) if obj.get("ID") == ref.key_id] == []


# --- factory --------------------------------------------------------------------------------------


def test_factory_opens_the_software_keystore_by_default(tmp_path):
    for settings in ({}, {"backend": "software"}):
        store = open_keystore(tmp_path, settings)
        assert isinstance(store, SoftwareKeystore) and store.data_dir == tmp_path
        store.close()
    assert "master.key" in describe_keystore({})


@pytest.mark.parametrize("source", ["pinFile", "pinEnv"])
def test_factory_opens_the_pkcs11_keystore(source, hsm, stores, key_for, monkeypatch, tmp_path):
    monkeypatch.setenv("SIGNBRIDGE_TEST_PIN", hsm.token.pin)
    settings = hsm.token.keystore_settings(pin_env="SIGNBRIDGE_TEST_PIN" if source == "pinEnv" else None)
    store = open_keystore(tmp_path, settings)
    try:
        assert isinstance(store, Pkcs11Keystore)
        ref = key_for("pkcs11", KeySpec.RSA_2048)
        request = digest_request(SHA384, Scheme.RSA_PSS)
        verify_digest_signature(store.public_key(ref), request, store.sign(ref, request))
    finally:
        store.close()
    description = describe_keystore(settings)
    assert hsm.token.pin not in description
    assert "'signbridge'" in description and hsm.token.module in description
    assert ("SIGNBRIDGE_TEST_PIN" if source == "pinEnv" else str(hsm.token.pin_file)) in description


@pytest.mark.parametrize(
    "settings, named",
    [
        ({"backend": "hsm"}, '"backend"'),
        ({"backend": "pkcs11", "tokenLabel": "t", "pinEnv": "X"}, '"module"'),
        ({"backend": "pkcs11", "module": "/m.so", "pinEnv": "X"}, '"tokenLabel"'),
        ({"backend": "pkcs11", "module": "/m.so", "tokenLabel": "t"}, '"pinEnv" and "pinFile"'),
        ({"backend": "pkcs11", "module": "/m.so", "tokenLabel": "t", "pinEnv": "X", "pinFile": "/p"},
         '"pinEnv" and "pinFile"'),
        ({"backend": "pkcs11", "module": 7, "tokenLabel": "t", "pinEnv": "X"}, '"module"'),
        ({"backend": "pkcs11", "module": "/m.so", "tokenLabel": "", "pinEnv": "X"}, '"tokenLabel"'),
        ({"backend": "pkcs11", "module": "/m.so", "tokenlabel": "t", "pinEnv": "X"}, '"tokenlabel"'),
        ({"backend": "software", "module": "/m.so"}, '"module"'),
    ],
)
def test_factory_names_the_setting_at_fault(settings, named, tmp_path):
    for call in (lambda: open_keystore(tmp_path, settings), lambda: describe_keystore(settings)):
        with pytest.raises(ConfigError) as info:
            call()
        assert named in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing was created


def test_factory_refuses_a_pin_in_the_settings(tmp_path):
    settings = {"backend": "pkcs11", "module": "/m.so", "tokenLabel": "t", "pin": "123456"}
    with pytest.raises(ConfigError) as info:
        open_keystore(tmp_path, settings)
    assert '"pin" is not allowed' in str(info.value) and "123456" not in str(info.value)


def test_factory_reports_a_missing_pin_source(hsm, monkeypatch, tmp_path):
    monkeypatch.delenv("SIGNBRIDGE_UNSET_PIN", raising=False)
    with pytest.raises(ConfigError, match="environment variable SIGNBRIDGE_UNSET_PIN"):
        open_keystore(tmp_path, hsm.token.keystore_settings(pin_env="SIGNBRIDGE_UNSET_PIN"))
    settings = {**hsm.token.keystore_settings(), "pinFile": str(tmp_path / "absent.pin")}
    with pytest.raises(ConfigError, match="cannot read the PIN file .*absent.pin"):
        open_keystore(tmp_path, settings)
    empty = tmp_path / "empty.pin"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        open_keystore(tmp_path, {**settings, "pinFile": str(empty)})
