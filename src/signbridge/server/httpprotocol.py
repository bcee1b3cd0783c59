"""uvicorn's httptools protocol, writing each response to the socket once and closing slow clients.

uvicorn writes a response's status line and headers, then its body, as two socket writes. On
loopback each write runs the receiver's TCP path and may wake it, so a small JSON answer costs two
of both. Here writes made during one turn of the event loop are joined and sent at its end, and on
a plain TCP connection with nothing queued they are written to the socket directly (see .sockets).

uvicorn waits forever for a request that never finishes arriving. Here a client has
``header_timeout`` seconds from connecting (or from the end of its previous response) to send a
request's head, then ``body_timeout`` seconds to send its body, or it is answered 408 and closed.
A connection keeps one timer, which finds the deadline moved on when it fires and waits for the new
one: a request moves the deadline three times, and a timer each time cost as much as the JSON.
One client address may hold at most ``max_connections_per_ip`` connections in a worker process.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .sockets import write_now


class CoalescingTransport:
    """A transport whose writes within one event-loop turn reach the socket as one write."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._fd = _plain_socket_fd(transport)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(bytes(data))

    def flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            if self._transport.is_closing():
                return
            if self._fd is not None and not self._transport.get_write_buffer_size():
                data = data[write_now(self._fd, data):]
            if data:
                self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _plain_socket_fd(transport: asyncio.Transport) -> int | None:
    """The socket under a transport that writes bytes as they are (no TLS), or None."""
    if transport.get_extra_info("sslcontext") is not None or transport.get_extra_info("ssl_object") is not None:
        return None
    sock = transport.get_extra_info("socket")
    return None if sock is None else sock.fileno()


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections_per_ip: int = 0  # 0: no cap


def _closing_response(status: str, text: str) -> bytes:
    body = text.encode()
    head = f"HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
    return head.encode() + f"content-length: {len(body)}\r\n\r\n".encode() + body


_TIMEOUT_RESPONSE = _closing_response("408 Request Timeout", "The request took too long to arrive.")
_BUSY_RESPONSE = _closing_response("503 Service Unavailable", "Too many open connections from this address.")


class HttpProtocol(HttpToolsProtocol):
    """What ``signbridge server run`` passes to uvicorn as its HTTP protocol (with its limits bound
    by ``functools.partial``, which pickles for uvicorn's worker processes)."""

    _open_by_address: dict[str, int] = {}

    def __init__(self, *args: Any, limits: ConnectionLimits | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits or ConnectionLimits()
        self._reading_deadline: float | None = None  # in loop time; None while the client is not sending
        self._timer: asyncio.TimerHandle | None = None
        self._counted_address: str | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
        address = self.client[0] if self.client else None
        cap = self.limits.max_connections_per_ip
        if address is not None and cap > 0:
            if self._open_by_address.get(address, 0) >= cap:
                self.transport.write(_BUSY_RESPONSE)
                self.transport.close()
                return
            self._open_by_address[address] = self._open_by_address.get(address, 0) + 1
            self._counted_address = address
        self._arm(self.limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        address, self._counted_address = self._counted_address, None
        if address is not None:
            remaining = self._open_by_address.get(address, 1) - 1
            if remaining > 0:
                self._open_by_address[address] = remaining
            else:
                self._open_by_address.pop(address, None)
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._reading_deadline is None:
            self._arm(self.limits.header_timeout)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._arm(self.limits.body_timeout)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._reading_deadline is None and not self.transport.is_closing():
            self._arm(self.limits.header_timeout)

    def _arm(self, seconds: float) -> None:
        self._reading_deadline = deadline = self.loop.time() + seconds
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_at(deadline, self._deadline_reached)

    def _disarm(self) -> None:
        self._reading_deadline = None

    def _deadline_reached(self) -> None:
        self._timer = None
        deadline = self._reading_deadline
        if deadline is None:
            return
        if self.loop.time() < deadline:
            self._timer = self.loop.call_at(deadline, self._deadline_reached)
            return
        self._reading_deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete or not self.cycle.response_started:
            self.transport.write(_TIMEOUT_RESPONSE)
        self.transport.close()
