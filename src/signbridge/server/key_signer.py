"""The key signer: a child process that makes the signatures of the data directory's own keys.

With keys kept in the data directory a signature is a few hundred microseconds of OpenSSL. Made in
a thread of the service process it would have to take the GIL back from the event loop after every
signature, and wait for it; made in a process of its own it runs on another core with nothing to
wait for, while the event loop parses, authorizes and audits the next requests. The service sends
requests over a socket pair and reads the answers as they come, in the order it sent the requests.
It is one of the service's helper processes (:mod:`.helper_processes`: how it starts and ends, and
the frames).

Requests are ``(key_ref, digest, hash, scheme, ecdsa_format)``, answered ``("ok", signature)`` or
``("error", kind, message)``, kind ``"keystore"`` or ``"signature"``. The first answer, to no
request, is the signer's ``("ok", None)`` once its keystore is open.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import subprocess
import sys
from pathlib import Path

from ..crypto.hashes import HashAlgorithm
from ..crypto.signatures import EcdsaFormat, Scheme, SignatureRequest
from ..errors import KeystoreError, SignatureError
from .helper_processes import frame, helper_main, split_frames, start_helper
from .keystores import KeyRef

log = logging.getLogger("signbridge.server")

_STOPPED = "the key signer process stopped; it is started again for the next request"


class KeySigner:
    """The service side: one signer process, started by :meth:`start` and again after it stops."""

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir
        self._process: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Futures of the requests sent, in order; None for the signer's first answer, to no request.
        self._waiting: collections.deque[asyncio.Future[bytes] | None] = collections.deque()
        self._received = bytearray()
        self._unsent = bytearray()
        self._exits: asyncio.Future[int] | None = None  # the wait for the last process that was stopped

    @property
    def pid(self) -> int | None:
        """The signer process's, while it runs."""
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        """Start the process (it opens the keystore while the first requests queue up)."""
        loop = asyncio.get_running_loop()
        try:
            self._process, ours = start_helper("signbridge.server.key_signer", str(self._data_dir))
        except OSError as exc:
            raise KeystoreError(f"cannot start the key signer process: {exc.strerror}") from None
        ours.setblocking(False)
        self._sock, self._loop = ours, loop
        loop.add_reader(ours.fileno(), self._readable)
        self._waiting.append(None)

    async def sign(self, ref: KeyRef, request: SignatureRequest) -> bytes:
        """The keystore's signature of ``request`` (as ``Keystore.sign``); raises KeystoreError or SignatureError."""
        if self._sock is None:
            self.start()
        assert self._loop is not None
        future: asyncio.Future[bytes] = self._loop.create_future()
        self._waiting.append(future)
        self._send(frame((
            str(ref), request.digest, request.hash_algorithm.name, request.scheme.value, request.ecdsa_format.value,
        )))  # fmt: skip
        return await future

    async def aclose(self, timeout: float = 10.0) -> None:
        """Close the socket, and wait for the process to exit (it finishes the signature it is making);
        after ``timeout`` seconds it is killed."""
        process = self._process
        self._stop()
        if self._exits is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._exits), timeout)
        except TimeoutError:
            if process is not None:
                log.warning("the key signer (pid %d) did not exit within %g s; it is killed", process.pid, timeout)
                process.kill()
            await self._exits

    def _send(self, data: bytes) -> None:
        sock = self._sock
        assert sock is not None and self._loop is not None
        if not self._unsent:
            try:
                data = data[sock.send(data):]
            except BlockingIOError:
                pass
            except OSError:
                self._stop()
                return
            if not data:
                return
            self._loop.add_writer(sock.fileno(), self._writable)
        self._unsent += data

    def _writable(self) -> None:
        sock = self._sock
        assert sock is not None and self._loop is not None
        try:
            sent = sock.send(self._unsent)
        except BlockingIOError:
            return
        except OSError:
            self._stop()
            return
        del self._unsent[:sent]
        if not self._unsent:
            self._loop.remove_writer(sock.fileno())

    def _readable(self) -> None:
        sock = self._sock
        assert sock is not None
        try:
            data = sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._stop()
            return
        self._received += data
        try:
            answers = split_frames(self._received)
            for answer in answers:
                self._deliver(self._waiting.popleft(), answer)
        except (ValueError, EOFError, TypeError, IndexError) as exc:  # not what a signer sends
            log.error("the key signer sent an answer that cannot be read (%s); it is stopped", exc)
            self._stop()

    @staticmethod
    def _deliver(future: asyncio.Future[bytes] | None, answer: tuple) -> None:
        if future is None:
            if answer[0] != "ok":
                log.error("the key signer cannot open the keystore: %s", answer[2])
        elif future.done():  # the request was cancelled
            return
        elif answer[0] == "ok":
            future.set_result(answer[1])
        else:
            _, kind, message = answer
            future.set_exception(SignatureError(message) if kind == "signature" else KeystoreError(message))

    def _stop(self) -> None:
        """Forget the process's socket, and fail every request still waiting for it."""
        sock, self._sock = self._sock, None
        if sock is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(sock.fileno())
            self._loop.remove_writer(sock.fileno())
        if sock is not None:
            sock.close()
        self._received.clear()
        self._unsent.clear()
        waiting, self._waiting = self._waiting, collections.deque()
        for future in waiting:
            if future is not None and not future.done():
                future.set_exception(KeystoreError(_STOPPED))
        process, self._process = self._process, None
        if process is not None and self._loop is not None and not self._loop.is_closed():
            self._exits = self._loop.run_in_executor(None, process.wait)  # it exits once its socket is closed


# The signer process


def serve(sock: socket.socket, arguments: list[str]) -> None:
    """Answer requests until the service closes the socket; ``arguments``: the data directory."""
    from .keystores.software import SoftwareKeystore

    try:
        keystore = SoftwareKeystore(Path(arguments[0]))
    except KeystoreError as exc:
        opened: KeystoreError | None = exc
        sock.sendall(frame(("error", "keystore", str(exc))))
    else:
        opened = None
        sock.sendall(frame(("ok", None)))
    received = bytearray()
    while data := sock.recv(1 << 16):
        received += data
        for ref, digest, hash_name, scheme, ecdsa_format in split_frames(received):
            try:
                if opened is not None:
                    raise opened
                request = SignatureRequest(digest, HashAlgorithm[hash_name], Scheme(scheme), EcdsaFormat(ecdsa_format))
                answer: tuple = ("ok", keystore.sign(KeyRef.parse(ref), request))
            except KeystoreError as exc:
                answer = ("error", "keystore", str(exc))
            except (SignatureError, ValueError, KeyError) as exc:
                answer = ("error", "signature", str(exc))
            sock.sendall(frame(answer))


if __name__ == "__main__":
    sys.exit(helper_main(sys.argv, serve))
