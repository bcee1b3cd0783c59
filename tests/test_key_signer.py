"""The key signer process: the signatures of the data directory's keys, made beside the event loop,
answered in order, checked by openssl; errors, cancelled requests and a killed signer."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from signbridge.crypto.hashes import HashAlgorithm
from signbridge.crypto.signatures import EcdsaFormat, Scheme, SignatureRequest
from signbridge.errors import KeystoreError
from signbridge.server.key_signer import KeySigner
from signbridge.server.keystores import KeyRef, KeySpec
from signbridge.server.keystores.software import SoftwareKeystore


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, KeyRef, KeyRef]:
    data_dir = tmp_path_factory.mktemp("key-signer")
    keystore = SoftwareKeystore(data_dir)
    rsa_ref = keystore.generate(KeySpec.RSA_2048, "rsa")
    ec_ref = keystore.generate(KeySpec.EC_P256, "ec")
    for ref in (rsa_ref, ec_ref):
        pem = keystore.public_key(ref).public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        (data_dir / f"{ref.key_id}.pub.pem").write_bytes(pem)
    keystore.close()
    return data_dir, rsa_ref, ec_ref


def _request(number: int, scheme: Scheme) -> SignatureRequest:
    return SignatureRequest(HashAlgorithm.SHA256.digest(b"%d" % number), HashAlgorithm.SHA256, scheme, EcdsaFormat.ASN1)


def _openssl_verifies(data_dir: Path, ref: KeyRef, request: SignatureRequest, signature: bytes, tmp_path: Path) -> bool:
    digest, sig = tmp_path / "digest.bin", tmp_path / "signature.bin"
    digest.write_bytes(request.digest)
    sig.write_bytes(signature)
    options = ["-pkeyopt", "digest:sha256"]
    if request.scheme is Scheme.RSA_PSS:
        options += ["-pkeyopt", "rsa_padding_mode:pss", "-pkeyopt", "rsa_pss_saltlen:auto"]
    result = subprocess.run(
        ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(data_dir / f"{ref.key_id}.pub.pem"),
         "-in", str(digest), "-sigfile", str(sig), *options],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return result.returncode == 0 and "Signature Verified Successfully" in result.stdout


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def test_signatures_are_made_in_the_signer_process_in_order_and_openssl_verifies_them(keys, tmp_path: Path) -> None:
    data_dir, rsa_ref, ec_ref = keys
    jobs = [(rsa_ref, _request(n, Scheme.RSA_PKCS1)) for n in range(6)]
    jobs += [(rsa_ref, _request(n, Scheme.RSA_PSS)) for n in range(6, 9)]
    jobs += [(ec_ref, _request(n, Scheme.ECDSA)) for n in range(9, 14)]

    async def main() -> tuple[list[bytes], int]:
        signer = KeySigner(data_dir)
        signer.start()
        try:
            signatures = await asyncio.gather(*(signer.sign(ref, request) for ref, request in jobs))
            assert signer.pid is not None
            return signatures, signer.pid
        finally:
            await signer.aclose()

    signatures, pid = asyncio.run(main())
    assert pid != os.getpid()
    assert len(set(signatures)) == len(jobs)
    for (ref, request), signature in zip(jobs, signatures, strict=True):
        assert _openssl_verifies(data_dir, ref, request, signature, tmp_path), (ref, request.scheme)
    assert not Path(f"/proc/{pid}").exists() or b"key_signer" not in _cmdline(pid)  # exited when the socket closed


def test_a_key_it_cannot_find_is_a_keystore_error_and_the_signer_goes_on(keys) -> None:
    data_dir, rsa_ref, _ = keys

    async def main() -> bytes:
        signer = KeySigner(data_dir)
        try:
            with pytest.raises(KeystoreError, match=f"there is no key software:{'ab' * 16}"):
                await signer.sign(KeyRef("software", "ab" * 16), _request(1, Scheme.RSA_PKCS1))
            return await signer.sign(rsa_ref, _request(2, Scheme.RSA_PKCS1))
        finally:
            await signer.aclose()

    assert len(asyncio.run(main())) == 256


def test_a_cancelled_request_leaves_the_other_answers_to_their_requests(keys, tmp_path: Path) -> None:
    data_dir, rsa_ref, _ = keys
    requests = [_request(n, Scheme.RSA_PKCS1) for n in range(5)]

    async def main() -> list[bytes | None]:
        signer = KeySigner(data_dir)
        try:
            tasks = [asyncio.create_task(signer.sign(rsa_ref, request)) for request in requests]
            await asyncio.sleep(0)  # every request is sent
            tasks[1].cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            return [None if isinstance(result, asyncio.CancelledError) else result for result in results]  # type: ignore[misc]
        finally:
            await signer.aclose()

    results = asyncio.run(main())
    assert results[1] is None
    for request, signature in zip(requests, results, strict=True):
        if signature is not None:
            assert _openssl_verifies(data_dir, rsa_ref, request, signature, tmp_path)


def test_a_killed_signer_fails_the_requests_it_held_and_the_next_one_starts_a_new_signer(keys, tmp_path: Path) -> None:
    data_dir, rsa_ref, _ = keys

    async def main() -> tuple[list[BaseException | bytes], bytes, int, int]:
        signer = KeySigner(data_dir)
        try:
            await signer.sign(rsa_ref, _request(0, Scheme.RSA_PKCS1))
            first = signer.pid
            assert first is not None
            os.kill(first, signal.SIGSTOP)  # the next requests wait in its socket
            held = [asyncio.create_task(signer.sign(rsa_ref, _request(n, Scheme.RSA_PKCS1))) for n in range(1, 4)]
            await asyncio.sleep(0.05)
            os.kill(first, signal.SIGKILL)
            failed = await asyncio.gather(*held, return_exceptions=True)
            after = await signer.sign(rsa_ref, _request(4, Scheme.RSA_PKCS1))
            assert signer.pid is not None
            return failed, after, first, signer.pid
        finally:
            await signer.aclose()

    failed, after, first, second = asyncio.run(main())
    assert all(isinstance(error, KeystoreError) and "key signer process stopped" in str(error) for error in failed)
    assert second != first
    assert _openssl_verifies(data_dir, rsa_ref, _request(4, Scheme.RSA_PKCS1), after, tmp_path)


def test_the_signer_outlasts_sigterm_and_sigint_and_exits_with_its_socket(keys) -> None:
    data_dir, rsa_ref, _ = keys

    async def main() -> int:
        signer = KeySigner(data_dir)
        await signer.sign(rsa_ref, _request(0, Scheme.RSA_PKCS1))
        pid = signer.pid
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGINT)
        await asyncio.sleep(0.1)
        assert len(await signer.sign(rsa_ref, _request(1, Scheme.RSA_PKCS1))) == 256
        assert signer.pid == pid
        await signer.aclose()
        return pid

    pid = asyncio.run(main())
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and b"key_signer" in _cmdline(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists() or b"key_signer" not in _cmdline(pid)


def test_a_signer_that_does_not_exit_is_killed_when_the_service_closes(keys) -> None:
    data_dir, rsa_ref, _ = keys

    async def main() -> tuple[int, float]:
        signer = KeySigner(data_dir)
        await signer.sign(rsa_ref, _request(0, Scheme.RSA_PKCS1))
        pid = signer.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # it cannot see its socket close
        started = time.monotonic()
        await signer.aclose(timeout=0.5)
        return pid, time.monotonic() - started

    pid, seconds = asyncio.run(main())
    assert 0.5 <= seconds < 5
    assert not Path(f"/proc/{pid}").exists()  # killed and reaped
