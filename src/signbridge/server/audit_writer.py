"""The audit writer: a child process that commits audit records for one service process.

Committing a record costs hashing, SQL and an fsync. In the service process that work would hold the
GIL between the HTTP requests it serves; in a process of its own it runs on another core, as a
database server's work would. The service sends batches of records over a socket pair and waits for
the sequence numbers. It is one of the service's helper processes (:mod:`.helper_processes`: how it
starts and ends, and the frames).

Frames: ``("open", database_url)`` → ``("ready",)``; ``("append", rows)`` → ``("ok", first_seq,
last_seq)``; either may be answered ``("error", message)``.
"""

from __future__ import annotations

import asyncio
import marshal
import socket
import subprocess
import sys
from collections.abc import Sequence

from ..errors import AuditError
from .helper_processes import LENGTH, frame, helper_main, receive, start_helper
from .sockets import write_now

_START_TIMEOUT = 60.0


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
        try:
            self._process, ours = start_helper("signbridge.server.audit_writer")
        except OSError as exc:
            raise AuditError(f"cannot start the audit writer process: {exc.strerror}") from None
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
        data = frame(message)
        if not self._writer.transport.get_write_buffer_size():
            data = data[write_now(self._fd, data):]  # without the GIL, see .sockets
        if data:
            self._writer.write(data)
            await self._writer.drain()
        (length,) = LENGTH.unpack(await self._reader.readexactly(LENGTH.size))
        return marshal.loads(await self._reader.readexactly(length))

    async def _discard(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None
        process, self._process = self._process, None
        if process is not None:
            await asyncio.get_running_loop().run_in_executor(None, process.wait)


# The writer process


def serve(sock: socket.socket, _arguments: list[str]) -> None:
    """Answer frames until the service closes the socket."""
    from .audit_chain import ChainAppender
    from .database import open_engine, redact_url

    opening = receive(sock)
    if opening is None:
        return
    _, url = opening
    try:
        engine = open_engine(url)
    except Exception as exc:  # noqa: BLE001 - the service reports it
        sock.sendall(frame(("error", f"the audit writer cannot open {redact_url(url)}: {exc}")))
        return
    sock.sendall(frame(("ready",)))
    appender = ChainAppender(engine)
    try:
        while (message := receive(sock)) is not None:
            _, rows = message
            try:
                seqs = appender.append(rows)
            except Exception as exc:  # noqa: BLE001 - every waiting request learns that its record was not written
                reply: tuple = ("error", f"the audit record could not be written: {exc}")
            else:
                reply = ("ok", seqs[0], seqs[-1])
            sock.sendall(frame(reply))
    finally:
        appender.close()
        engine.dispose()


if __name__ == "__main__":
    sys.exit(helper_main(sys.argv, serve))
