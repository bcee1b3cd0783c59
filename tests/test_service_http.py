"""The HTTP layer in front of the routes: the signing routes' front door, and one socket write per response."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import threading

import httpx
import pytest
import uvloop

from servicekit import DemoService, demo_service
from signbridge.server.app import ServiceApp
from signbridge.server.httpprotocol import CoalescingTransport
from signbridge.server.sockets import write_now

H32 = base64.b64encode(bytes(32)).decode()


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory):
    with demo_service(tmp_path_factory.mktemp("http")) as service:
        yield service


def _body(svc: DemoService) -> bytes:
    return json.dumps({
        "projectSlug": "demo", "signingPolicySlug": "release-signing",
        "hashSigningData": {"hash": H32, "signatureAlgorithm": "Rsa", "rsaOptions": {"hashAlgorithmName": "Sha256"}},
    }).encode()


def _request(svc: DemoService, *, path: str | None = None, extra: str = "", body: bytes | None = None) -> bytes:
    body = _body(svc) if body is None else body
    path = path or f"/Api/v1/{svc.org}/SigningRequests/SignHash"
    return (
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {svc.token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def _connect(svc: DemoService) -> socket.socket:
    return socket.create_connection(("127.0.0.1", svc.process.port), timeout=10)


def _read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before the headers: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return head, body


def test_get_on_a_signing_route_is_405(svc: DemoService) -> None:
    response = httpx.get(svc.url("SigningRequests/SignHash"), headers=svc.auth())
    assert response.status_code == 405
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == 405


@pytest.mark.parametrize("path", ["/API/V1/{org}/SIGNINGREQUESTS/SIGNHASH", "/api/v1/{org}/signingrequests/signhash"])
def test_signing_routes_ignore_case(svc: DemoService, path: str) -> None:
    response = httpx.post(f"http://127.0.0.1:{svc.process.port}{path.format(org=svc.org.upper())}",
                          content=_body(svc), headers={**svc.auth(), "Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    assert len(base64.b64decode(response.json()["hashSigningResult"]["signature"])) == 256


def test_keep_alive_answers_requests_in_order(svc: DemoService) -> None:
    with _connect(svc) as sock:
        sock.sendall(_request(svc) + _request(svc, body=b"{not json"))
        first_head, first = _read_response(sock)
        second_head, second = _read_response(sock)
    assert first_head.startswith(b"HTTP/1.1 200 ") and "hashSigningResult" in json.loads(first)
    assert second_head.startswith(b"HTTP/1.1 400 ") and json.loads(second)["detail"] == "The request body is not valid JSON."


def test_connection_close_gets_the_whole_answer_then_eof(svc: DemoService) -> None:
    with _connect(svc) as sock:
        sock.sendall(_request(svc, extra="Connection: close\r\n"))
        head, body = _read_response(sock)
        assert sock.recv(65536) == b""
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"connection: close" in head.lower()
    assert json.loads(body)["hashSigningResult"]["signature"]


def test_client_gone_mid_body_is_not_an_error(svc: DemoService) -> None:
    before = len(json.loads(svc.admin("audit", "list", "--json", "--limit", "1000000").stdout))
    request = _request(svc)
    with _connect(svc) as sock:
        sock.sendall(request[:-20])
    response = httpx.post(svc.url("SigningRequests/SignHash"), content=_body(svc),
                          headers={**svc.auth(), "Content-Type": "application/json"})
    assert response.status_code == 200
    records = json.loads(svc.admin("audit", "list", "--json", "--limit", "1000000").stdout)
    assert len(records) == before + 1 and records[-1]["outcome"] == "granted"
    assert "Traceback" not in svc.log_text()


def test_an_unexpected_failure_is_a_500_problem(caplog: pytest.LogCaptureFixture) -> None:
    class BrokenApi:
        async def sign_hash(self, scope, receive, send) -> None:  # noqa: ANN001
            raise RuntimeError("boom")

    async def call() -> list[dict]:
        sent: list[dict] = []

        async def receive() -> dict:
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        app = ServiceApp(BrokenApi(), starlette=None)  # type: ignore[arg-type]
        scope = {"type": "http", "method": "POST", "path": "/Api/v1/x/SigningRequests/SignHash", "headers": []}
        await app(scope, receive, send)
        return sent

    sent = asyncio.run(call())
    assert sent[0]["status"] == 500
    assert (b"content-type", b"application/problem+json") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["detail"].startswith("The service failed unexpectedly")
    assert "boom" in caplog.text


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = self.aborted = False

    def write(self, data) -> None:  # noqa: ANN001
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name: str, default=None):  # noqa: ANN001, ANN201
        return {"peername": ("127.0.0.1", 1)}.get(name, default)


def test_writes_within_one_loop_turn_are_one_socket_write() -> None:
    async def run() -> RecordingTransport:
        inner = RecordingTransport()
        transport = CoalescingTransport(inner, asyncio.get_running_loop())
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        transport.write(memoryview(b"body"))
        assert inner.writes == []
        await asyncio.sleep(0)
        transport.write(b"next")
        await asyncio.sleep(0)
        assert transport.get_extra_info("peername") == ("127.0.0.1", 1)
        return inner

    inner = asyncio.run(run())
    assert inner.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody", b"next"]


def test_close_flushes_and_abort_drops() -> None:
    async def run() -> tuple[RecordingTransport, RecordingTransport]:
        loop = asyncio.get_running_loop()
        closing, aborting = RecordingTransport(), RecordingTransport()
        first, second = CoalescingTransport(closing, loop), CoalescingTransport(aborting, loop)
        first.write(b"last words")
        first.close()
        second.write(b"never sent")
        second.abort()
        await asyncio.sleep(0)
        return closing, aborting

    closing, aborting = asyncio.run(run())
    assert closing.writes == [b"last words"] and closing.closed
    assert aborting.writes == [] and aborting.aborted


def test_writes_past_the_socket_buffer_arrive_whole_and_in_order() -> None:
    """The socket takes part of a large write at once (written without the GIL); uvloop's transport
    sends the rest, and what follows waits behind it."""
    big = os.urandom(8 << 20)
    ours, theirs = socket.socketpair()
    received = bytearray()

    def read() -> None:
        while chunk := theirs.recv(1 << 20):
            received.extend(chunk)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
        coalescing = CoalescingTransport(transport, loop)
        coalescing.write(b"head:")
        coalescing.write(big)
        await asyncio.sleep(0)
        assert transport.get_write_buffer_size() > 0  # the socket did not take it all
        coalescing.write(b":tail")
        await asyncio.sleep(0)
        while transport.get_write_buffer_size():
            await asyncio.sleep(0.01)
        coalescing.close()

    reader = threading.Thread(target=read)
    reader.start()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run())
    reader.join(30)
    theirs.close()
    assert bytes(received) == b"head:" + big + b":tail"


def test_write_now_takes_what_the_socket_takes_and_leaves_errors_to_the_transport() -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    with ours, theirs:
        assert write_now(ours.fileno(), b"ping") == 4
        assert theirs.recv(4) == b"ping"
        partial = write_now(ours.fileno(), bytes(64 << 20))
        assert 0 < partial < 64 << 20
        assert write_now(ours.fileno(), b"full") == 0  # would block
        theirs.close()
        assert write_now(ours.fileno(), b"gone") == 0  # EPIPE: the transport's own write reports it


def _data_segments_in(sock: socket.socket) -> int:
    """Linux's tcp_info.tcpi_data_segs_in: segments with data this socket received."""
    return struct.unpack_from("<I", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 160), 152)[0]


def test_each_response_is_one_tcp_segment(svc: DemoService) -> None:
    with _connect(svc) as sock:
        for _ in range(3):  # the first may also carry a window update; count the steady state
            sock.sendall(_request(svc))
            _read_response(sock)
        before = _data_segments_in(sock)
        for _ in range(10):
            sock.sendall(_request(svc))
            head, _ = _read_response(sock)
            assert head.startswith(b"HTTP/1.1 200 ")
        assert _data_segments_in(sock) - before == 10
