"""The service's helper processes (the audit writer, the key signer): how they start, and the
frames they exchange with the service over a socket pair.

A frame is a 4-byte big-endian length followed by a ``marshal``-encoded tuple. Only the service and
helpers it started itself, from the same installation, read them. A helper exits when its socket
closes, so it outlives neither a clean shutdown nor a killed service, and it ignores SIGINT and
SIGTERM so that a signal sent to the whole process group cannot stop it before the service has
finished with it.
"""

from __future__ import annotations

import marshal
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from typing import Any

LENGTH = struct.Struct(">I")


def frame(message: tuple) -> bytes:
    payload = marshal.dumps(message)
    return LENGTH.pack(len(payload)) + payload


def split_frames(buffer: bytearray) -> list[Any]:
    """The whole frames at the start of ``buffer``, decoded, and removed from it."""
    messages, start, size = [], 0, len(buffer)
    while size - start >= LENGTH.size:
        (length,) = LENGTH.unpack_from(buffer, start)
        end = start + LENGTH.size + length
        if end > size:
            break
        messages.append(marshal.loads(buffer[start + LENGTH.size : end]))
        start = end
    del buffer[:start]
    return messages


def _read_exactly(sock: socket.socket, size: int) -> bytes | None:
    chunks, remaining = [], size
    while remaining:
        chunk = sock.recv(remaining)
        if not chunk:
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def receive(sock: socket.socket) -> Any:
    """The next message on a blocking socket; None once the other side has closed it."""
    header = _read_exactly(sock, LENGTH.size)
    if header is None:
        return None
    payload = _read_exactly(sock, LENGTH.unpack(header)[0])
    return None if payload is None else marshal.loads(payload)


def start_helper(module: str, *arguments: str) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """``python -m module FD arguments...`` with the other end of a socket pair as FD; the process and
    the service's end. Raises OSError when the process cannot be started."""
    ours, theirs = socket.socketpair()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", module, str(theirs.fileno()), *arguments],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
        )
    except OSError:
        ours.close()
        raise
    finally:
        theirs.close()
    return process, ours


def helper_main(argv: list[str], serve: Callable[[socket.socket, list[str]], None]) -> int:
    """A helper's ``main``: ``serve(socket, arguments)`` until the service closes the socket."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with socket.socket(fileno=int(argv[1])) as sock:
        try:
            serve(sock, argv[2:])
        except (BrokenPipeError, ConnectionResetError):
            return 0
    return 0
