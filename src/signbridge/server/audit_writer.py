"""The audit writer: a child process that commits audit records for one service process.

Committing a record costs hashing, SQL and an fsync. In the service process that work would hold the
GIL between the HTTP requests it serves; in a process of its own it runs on another core, as a
database server's work would. The service sends batches of records over a socket pair and waits for
the sequence numbers; the writer exits when the socket closes, so it outlives neither a clean
shutdown nor a killed parent, and it ignores SIGINT and SIGTERM so that a signal sent to the whole
process group cannot stop it before the service has handed over its last records.

Frames are a 4-byte big-endian length followed by a ``marshal``-encoded tuple:
``("open", database_url)`` → ``("ready",)``; ``("append", rows)`` → ``("ok", first_seq, last_seq)``;
either may be answered ``("error", message)``.
"""

from __future__ import annotations

import asyncio
import marshal
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from ..errors import AuditError
from .sockets import write_now

_LENGTH = struct.Struct(">I")
_START_TIMEOUT = 60.0


def _frame(message: tuple) -> bytes:
    payload = marshal.dumps(message)
    return _LENGTH.pack(len(payload)) + payload


class AuditWriter:
    """The service side: starts the writer process on first use and hands it batches of rows."""

    def __init__(self, database_url: str) -> None:
        self._database_url = database_url
        self._process: subprocess.Popen[bytes] | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._fd = -1

    async def append(self, rows: Sequence[tuple]) -> list[int]:
        """Commit ``rows`` (values in ``ENTRY_FIELDS`` order); their sequence numbers."""
        if self._writer is None:
            await self._start()
        try:
            kind, *rest = await self._exchange(("append", list(rows)))
        except (OSError, asyncio.IncompleteReadError, ValueError, EOFError) as exc:
            await self._discard()
            raise AuditError(f"the audit writer process stopped ({exc or type(exc).__name__}); it is restarted for the next record") from None
        if kind != "ok":
            raise AuditError(str(rest[0]) if rest else "the audit writer failed")
        first, last = rest
        return list(range(first, last + 1))

    async def aclose(self) -> None:
        """Close the socket (the writer finishes and exits) and wait for the process."""
        await self._discard()

    async def _start(self) -> None:
        ours, theirs = socket.socketpair()
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "signbridge.server.audit_writer", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        except OSError as exc:
            ours.close()
            raise AuditError(f"cannot start the audit writer process: {exc.strerror}") from None
        finally:
            theirs.close()
        self._fd = ours.fileno()
        self._reader, self._writer = await asyncio.open_unix_connection(sock=ours)
        try:
            kind, *rest = await asyncio.wait_for(self._exchange(("open", self._database_url)), _START_TIMEOUT)
        except (OSError, asyncio.IncompleteReadError, ValueError, EOFError, TimeoutError):
            await self._discard()
            raise AuditError("the audit writer process did not start; see the service log") from None
        if kind != "ready":
            await self._discard()
            raise AuditError(str(rest[0]) if rest else "the audit writer could not open the database")

    async def _exchange(self, message: tuple) -> tuple:
        assert self._reader is not None and self._writer is not None
        frame = _frame(message)
        if not self._writer.transport.get_write_buffer_size():
            frame = frame[write_now(self._fd, frame):]  # without the GIL, see .sockets
        if frame:
            self._writer.write(frame)
            await self._writer.drain()
        (length,) = _LENGTH.unpack(await self._reader.readexactly(_LENGTH.size))
        return marshal.loads(await self._reader.readexactly(length))

    async def _discard(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None
        process, self._process = self._process, None
        if process is not None:
            await asyncio.get_running_loop().run_in_executor(None, process.wait)


# The writer process


def _read_exactly(sock: socket.socket, size: int) -> bytes | None:
    chunks, remaining = [], size
    while remaining:
        chunk = sock.recv(remaining)
        if not chunk:
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _receive(sock: socket.socket) -> Any:
    header = _read_exactly(sock, _LENGTH.size)
    if header is None:
        return None
    payload = _read_exactly(sock, _LENGTH.unpack(header)[0])
    return None if payload is None else marshal.loads(payload)


def serve(sock: socket.socket) -> None:
    """Answer frames until the service closes the socket."""
    from .audit_chain import ChainAppender
    from .database import open_engine, redact_url

    opening = _receive(sock)
    if opening is None:
        return
    _, url = opening
    try:
        engine = open_engine(url)
    except Exception as exc:  # noqa: BLE001 - the service reports it
        sock.sendall(_frame(("error", f"the audit writer cannot open {redact_url(url)}: {exc}")))
        return
    sock.sendall(_frame(("ready",)))
    appender = ChainAppender(engine)
    try:
        while (message := _receive(sock)) is not None:
            _, rows = message
            try:
                seqs = appender.append(rows)
            except Exception as exc:  # noqa: BLE001 - every waiting request learns that its record was not written
                reply: tuple = ("error", f"the audit record could not be written: {exc}")
            else:
                reply = ("ok", seqs[0], seqs[-1])
            sock.sendall(_frame(reply))
    finally:
        appender.close()
        engine.dispose()


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with socket.socket(fileno=int(argv[1])) as sock:
        try:
            serve(sock)
        except (BrokenPipeError, ConnectionResetError):
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
