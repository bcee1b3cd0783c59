"""The token under stress: the service down or restarted, 1,000 concurrent signs, bad frames, other users."""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from conftest import require_tool, run
from providerkit import Provider, audit_records, last_audit_seq
from servicekit import DemoService, init_demo
from signbridge.crypto.hashes import HashAlgorithm
from signbridge.pkcs11 import CKA, CKM, CKO, CKR, Pkcs11Client, Pkcs11Error
from signbridge.server.process import ServiceProcess, free_port

pytestmark = pytest.mark.timeout(300)

DIGEST_INFO_SHA256 = bytes.fromhex("3031300d060960864801650304020105000420")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict]]:
    data_dir = tmp_path_factory.mktemp("svc") / "data"
    yield data_dir, init_demo(data_dir)


@pytest.fixture(scope="module")
def service(demo: tuple[Path, dict]) -> Iterator[DemoService]:
    data_dir, info = demo
    process = ServiceProcess(data_dir)
    with process:
        yield DemoService(data_dir, info, process)


@pytest.fixture
def provider(service: DemoService) -> Iterator[Provider]:
    provider = Provider.for_service(service)
    yield provider
    provider.cleanup()


def release_key(client: Pkcs11Client):  # noqa: ANN201
    client.login("CONFIG")
    (key,) = client.objects(object_class=CKO.PRIVATE_KEY, label="demo/release-signing")
    return key


def sign_once(client: Pkcs11Client, key, digest: bytes) -> bytes:  # noqa: ANN001
    return client.sign(key, CKM.RSA_PKCS, DIGEST_INFO_SHA256 + digest)


def release_certificate(client: Pkcs11Client) -> x509.Certificate:
    (certificate,) = client.objects(
        object_class=CKO.CERTIFICATE, label="demo/release-signing", attributes=(CKA.VALUE,)
    )
    return x509.load_der_x509_certificate(certificate.attributes[CKA.VALUE])


def verify(certificate: x509.Certificate, digest: bytes, signature: bytes) -> None:
    certificate.public_key().verify(signature, digest, padding.PKCS1v15(), Prehashed(HashAlgorithm.SHA256.cryptography_hash()))


# --- the service down, late, restarted --------------------------------------------------------


def test_start_waits_for_a_service_that_comes_up(demo: tuple[Path, dict]) -> None:
    data_dir, info = demo
    port = free_port()
    provider = Provider(f"http://127.0.0.1:{port}/Api", info["organizationId"], info["apiToken"])
    late = ServiceProcess(data_dir, port=port, log_path=data_dir / "late-service.log")
    started = time.monotonic()
    child = subprocess.Popen(
        [sys.executable, "-m", "signbridge", "start"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=provider.env(SIGNPATH_SERVICE_UNAVAILABLE_TIMEOUT_IN_SECONDS="60"),
    )  # fmt: skip
    try:
        time.sleep(3)
        assert child.poll() is None, child.communicate()
        late.start()
        stdout, stderr = child.communicate(timeout=60)
        assert child.returncode == 0, stderr
        assert "is ready: 3 identities" in stdout.splitlines()[0]
        assert time.monotonic() - started >= 3
        log = provider.log_file.read_text()
        assert "the signing service is not available (ConnectError" in log and "trying again in" in log
        with Pkcs11Client.connect(provider.record().socket) as client:
            key = release_key(client)
            digest = hashlib.sha256(b"late service").digest()
            verify(release_certificate(client), digest, sign_once(client, key, digest))
    finally:
        if child.poll() is None:
            child.kill()
        provider.cleanup()
        late.stop()


def test_service_restart_while_the_token_runs(provider: Provider, service: DemoService) -> None:
    provider.start(SIGNPATH_SERVICE_UNAVAILABLE_TIMEOUT_IN_SECONDS="30")
    with Pkcs11Client.connect(provider.record().socket) as client:
        key = release_key(client)
        certificate = release_certificate(client)
        digest = hashlib.sha256(b"before").digest()
        verify(certificate, digest, sign_once(client, key, digest))

        service.process.stop()
        service.process.start()
        digest = hashlib.sha256(b"after a restart").digest()
        since = last_audit_seq(service)
        verify(certificate, digest, sign_once(client, key, digest))
        assert [r["digest"] for r in audit_records(service, since)] == [digest.hex()]

        # A sign that arrives while the service is down waits for it, within the timeout.
        service.process.stop()
        restarter = threading.Timer(2.0, service.process.start)
        restarter.start()
        try:
            digest = hashlib.sha256(b"during a restart").digest()
            started = time.monotonic()
            verify(certificate, digest, sign_once(client, key, digest))
            assert time.monotonic() - started >= 1.5
        finally:
            restarter.join()
        assert service.process.healthy()


def test_a_service_that_stays_down_is_function_failed(provider: Provider, service: DemoService) -> None:
    provider.start(SIGNPATH_SERVICE_UNAVAILABLE_TIMEOUT_IN_SECONDS="2")
    with Pkcs11Client.connect(provider.record().socket) as client:
        key = release_key(client)
        service.process.stop()
        try:
            started = time.monotonic()
            with pytest.raises(Pkcs11Error) as failure:
                sign_once(client, key, hashlib.sha256(b"nobody home").digest())
            assert failure.value.ckr == CKR.FUNCTION_FAILED
            assert 2 <= time.monotonic() - started < 15
        finally:
            service.process.start()
        digest = hashlib.sha256(b"back again").digest()
        verify(release_certificate(client), digest, sign_once(client, key, digest))


def test_revoked_or_unauthorized_credentials_are_arguments_bad(provider: Provider, service: DemoService) -> None:
    service.admin("user", "create", "temp-ci")
    service.admin("submitter", "add", "--project", "demo", "--policy", "release-signing", "--user", "temp-ci")
    created = json.loads(service.admin("token", "create", "temp-ci", "--json").stdout)
    provider.start()
    with Pkcs11Client.connect(provider.record().socket) as client:
        client.login(f"{service.org}:{created['apiToken']}")
        (key,) = client.objects(object_class=CKO.PRIVATE_KEY, label="demo/release-signing")
        sign_once(client, key, hashlib.sha256(b"allowed").digest())
        service.admin("submitter", "remove", "--project", "demo", "--policy", "release-signing", "--user", "temp-ci")
        with pytest.raises(Pkcs11Error) as forbidden:
            sign_once(client, key, hashlib.sha256(b"no longer a submitter").digest())
        assert forbidden.value.ckr == CKR.ARGUMENTS_BAD  # HTTP 403
        service.admin("token", "revoke", created["tokenId"])
        with pytest.raises(Pkcs11Error) as revoked:
            sign_once(client, key, hashlib.sha256(b"revoked").digest())
        assert revoked.value.ckr == CKR.ARGUMENTS_BAD  # HTTP 401
    assert created["apiToken"] not in provider.log_file.read_text()


# --- load -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_1000_signs_over_16_connections_each_audited_once(provider: Provider, service: DemoService) -> None:
    provider.start()
    socket_path = provider.record().socket
    connections, total = 16, 1000
    digests = [hashlib.sha256(f"load {i}".encode()).digest() for i in range(total)]
    signatures: dict[bytes, bytes] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()
    since = last_audit_seq(service)

    def worker(index: int) -> None:
        try:
            with Pkcs11Client.connect(socket_path) as client:
                key = release_key(client)
                for digest in digests[index::connections]:
                    signature = sign_once(client, key, digest)
                    with lock:
                        signatures[digest] = signature
        except BaseException as exc:  # noqa: BLE001 - reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(connections)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    assert errors == []
    assert len(signatures) == total
    with Pkcs11Client.connect(socket_path) as client:
        certificate = release_certificate(client)
    for digest, signature in signatures.items():
        verify(certificate, digest, signature)
    records = audit_records(service, since)
    assert len(records) == total, elapsed
    assert sorted(r["digest"] for r in records) == sorted(d.hex() for d in digests)
    assert all(r["outcome"] == "granted" and r["policy_slug"] == "release-signing" for r in records)


# --- bad frames and other users ---------------------------------------------------------------


def _send_and_close(socket_path: str, payload: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(socket_path)
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
        except OSError:
            return  # the server may close first; that is the point


def test_malformed_frames_close_that_connection_only(provider: Provider, service: DemoService) -> None:
    provider.start()
    record = provider.record()
    rng = random.Random(20240611)
    with Pkcs11Client.connect(record.socket) as steady:
        key = release_key(steady)
        certificate = release_certificate(steady)
        frames = [
            b"",
            b"\x09",  # an unknown protocol version, then nothing
            b"\x00" + b"\x00\x00\x00\x00" + b"\x00" * 8,  # call code 0
            b"\x00" + b"\x00\x00\x00\x11\x00\x00\x00\x00\xff\xff\xff\xff",  # a 4 GiB body
            b"\x00" + b"\x00\x00\x00\x11\x00\x00\x00\x00\x00\x00\x00\x10" + b"\x00\x00",  # truncated body
            b"\x00" + b"\x00\x00\x00\x11\x00\x00\x00\x00\x00\x00\x00\x04" + b"\x00\x00\x00\x01",  # C_Initialize, garbage
        ]
        frames += [b"\x00" + rng.randbytes(rng.randrange(1, 400)) for _ in range(150)]
        valid = bytes.fromhex("00000000110000000000000008") + b"\x00\x00\x00\x01\x00\x00\x00\x00"
        frames += [b"\x00" + valid[: rng.randrange(1, len(valid))] for _ in range(30)]
        for payload in frames:
            _send_and_close(record.socket, payload)
        # The connection that behaved is still served, and so are new ones.
        digest = hashlib.sha256(b"after the fuzz").digest()
        verify(certificate, digest, sign_once(steady, key, digest))
    with Pkcs11Client.connect(record.socket) as fresh:
        digest = hashlib.sha256(b"a new connection").digest()
        verify(certificate, digest, sign_once(fresh, release_key(fresh), digest))
    assert provider.status()["tokens"][0]["pid"] == record.pid
    assert "closing the connection of" in provider.log_file.read_text()


CONNECT = "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.settimeout(5)\n" \
          "try:\n  s.connect(sys.argv[1]); s.sendall(b'\\x00'); print('answer', s.recv(1))\n" \
          "except OSError as e:\n  print(type(e).__name__)\n"


def test_another_user_cannot_use_the_socket(provider: Provider) -> None:
    require_tool("runuser")
    provider.start()
    record = provider.record()
    socket_path = Path(record.socket)
    python = "/usr/bin/python3"
    proc = run(["runuser", "-u", "nobody", "--", python, "-c", CONNECT, str(socket_path)])
    assert proc.stdout.decode().strip() == "PermissionError"
    # Even with the file permissions opened up, the server refuses a peer with another uid.
    directories = [path for path in socket_path.parents if path.is_relative_to(provider.runtime)]
    modes = {path: stat.S_IMODE(path.stat().st_mode) for path in directories}
    for path in directories:
        os.chmod(path, 0o711)
    os.chmod(socket_path, 0o666)
    try:
        proc = run(["runuser", "-u", "nobody", "--", python, "-c", CONNECT, str(socket_path)])
        assert proc.stdout.decode().strip() in ("answer b''", "ConnectionResetError", "BrokenPipeError")
    finally:
        os.chmod(socket_path, 0o600)
        for path, mode in modes.items():
            os.chmod(path, mode)
    assert "refused a connection from pid" in provider.log_file.read_text()
    with Pkcs11Client.connect(record.socket) as client:
        assert client.token_info(client.slots()[0]).label == record.name
