"""The signing thread: signatures made beside the event loop, results and errors handed back to it."""

from __future__ import annotations

import asyncio
import sys
import threading

import pytest
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from signbridge.crypto.hashes import HashAlgorithm
from signbridge.errors import KeystoreError
from signbridge.server.signing_thread import SWITCH_INTERVAL, SigningThread

KEY = rsa.generate_private_key(65537, 2048)
DIGEST = HashAlgorithm.SHA256.digest(b"signbridge")


def _sign(digest: bytes) -> bytes:
    return KEY.sign(digest, padding.PKCS1v15(), utils.Prehashed(HashAlgorithm.SHA256.cryptography_hash()))


def test_signatures_are_made_in_the_thread_and_verify() -> None:
    signer = SigningThread()

    async def main() -> list[tuple[bytes, int]]:
        def sign(digest: bytes) -> tuple[bytes, int]:
            return _sign(digest), threading.get_ident()

        return await asyncio.gather(*(signer.call(sign, DIGEST) for _ in range(8)))

    try:
        results = asyncio.run(main())
    finally:
        signer.close()
    assert len({ident for _, ident in results}) == 1
    assert results[0][1] != threading.get_ident()
    for signature, _ in results:
        KEY.public_key().verify(
            signature, DIGEST, padding.PKCS1v15(), utils.Prehashed(HashAlgorithm.SHA256.cryptography_hash())
        )


def test_the_loop_keeps_running_while_the_thread_works() -> None:
    signer = SigningThread()
    release = threading.Event()

    async def main() -> str:
        call = asyncio.create_task(signer.call(lambda: "done" if release.wait(10) else "timed out"))
        await asyncio.sleep(0.05)  # the job waits in the thread; the loop is free
        assert not call.done()
        release.set()
        return await call

    try:
        assert asyncio.run(main()) == "done"
    finally:
        signer.close()


def test_an_error_reaches_the_caller_and_the_thread_goes_on() -> None:
    signer = SigningThread()

    def fail() -> bytes:
        raise KeystoreError("the device is gone")

    async def main() -> bytes:
        with pytest.raises(KeystoreError, match="the device is gone"):
            await signer.call(fail)
        return await signer.call(_sign, DIGEST)

    try:
        assert len(asyncio.run(main())) == 256
    finally:
        signer.close()


def test_a_cancelled_request_does_not_stop_the_thread() -> None:
    signer = SigningThread()
    release = threading.Event()

    async def main() -> str:
        waiting = asyncio.create_task(signer.call(release.wait, 10))
        await asyncio.sleep(0.05)
        waiting.cancel()
        release.set()
        return await signer.call(str, "after")

    try:
        assert asyncio.run(main()) == "after"
    finally:
        signer.close()


def test_the_switch_interval_is_cut_while_the_thread_runs_and_restored_after() -> None:
    before = sys.getswitchinterval()
    signer = SigningThread()

    async def main() -> float:
        return await signer.call(sys.getswitchinterval)

    try:
        assert asyncio.run(main()) == pytest.approx(SWITCH_INTERVAL)
    finally:
        signer.close()
    assert sys.getswitchinterval() == pytest.approx(before)

    async def after_close() -> None:
        await signer.call(str, "too late")

    with pytest.raises(RuntimeError, match="stopped"):
        asyncio.run(after_close())
