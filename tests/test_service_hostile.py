"""Hostile HTTP clients against a real service: deep JSON, forged forwarding headers, slow clients,
connection floods. Every case is bounded in count and time and stays on loopback."""

from __future__ import annotations

import base64
import dataclasses
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from servicekit import DemoService, init_demo
from signbridge.server.process import ServiceProcess
from signbridge.server.settings import ServerSettings

H32 = base64.b64encode(bytes(range(32))).decode()
GOOD = {
    "projectSlug": "demo",
    "signingPolicySlug": "release-signing",
    "hashSigningData": {"hash": H32, "signatureAlgorithm": "Rsa", "rsaOptions": {"hashAlgorithmName": "Sha256"}},
}


def _service(directory: Path, **settings: object) -> Iterator[DemoService]:
    data_dir = directory / "data"
    info = init_demo(data_dir)
    current = ServerSettings.load(data_dir)
    dataclasses.replace(current, **settings).save()
    with ServiceProcess(data_dir) as process:
        yield DemoService(data_dir, info, process)


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoService]:
    yield from _service(tmp_path_factory.mktemp("hostile"), header_timeout=1.0, body_timeout=1.0, max_connections_per_ip=40)


def _records(svc: DemoService) -> list[dict]:
    return json.loads(svc.admin("audit", "list", "--json", "--limit", "100000").stdout)


def _sign_hash_request(svc: DemoService, body: bytes, extra_headers: dict[str, str] | None = None) -> httpx.Response:
    headers = {**svc.auth(), "Content-Type": "application/json", **(extra_headers or {})}
    return httpx.post(svc.url("SigningRequests/SignHash"), content=body, headers=headers, timeout=30)


@pytest.mark.parametrize("depth", [1_000, 5_000, 100_000])
def test_deeply_nested_json_is_a_400_and_audited(svc: DemoService, depth: int) -> None:
    before = len(_records(svc))
    body = b"[" * depth + b"]" * depth
    response = _sign_hash_request(svc, body)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    records = _records(svc)
    assert len(records) == before + 1
    assert records[-1]["status"] == 400 and records[-1]["outcome"] == "rejected"


def test_deeply_nested_fast_signing_payload_is_a_400(svc: DemoService) -> None:
    payload = b'{"a":' * 5_000 + b"1" + b"}" * 5_000
    files = {"Artifact": ("payload.json", payload, "application/json")}
    data = {"ProjectSlug": "demo", "SigningPolicySlug": "release-signing", "IsFastSigningRequest": "true"}
    response = httpx.post(svc.url("SigningRequests"), headers=svc.auth(), data=data, files=files, timeout=30)
    assert response.status_code == 400, response.text
    assert "nested too deeply" in response.json()["detail"]


def test_huge_numbers_are_a_400(svc: DemoService) -> None:
    body = json.dumps(GOOD).encode().replace(b'"Rsa"', b"9" * 100_000)
    assert _sign_hash_request(svc, body).status_code == 400


def test_forwarded_for_from_an_unlisted_proxy_is_ignored(svc: DemoService) -> None:
    response = _sign_hash_request(svc, json.dumps(GOOD).encode(), {"X-Forwarded-For": "203.0.113.66"})
    assert response.status_code == 200, response.text
    record = _records(svc)[-1]
    assert record["outcome"] == "granted" and record["remote_address"] == "127.0.0.1"


def test_forwarded_for_from_a_listed_proxy_is_believed(tmp_path: Path) -> None:
    for service in _service(tmp_path, forwarded_allow_ips=["127.0.0.1"]):
        response = _sign_hash_request(service, json.dumps(GOOD).encode(), {"X-Forwarded-For": "203.0.113.66"})
        assert response.status_code == 200, response.text
        assert _records(service)[-1]["remote_address"] == "203.0.113.66"


def _connect(svc: DemoService) -> socket.socket:
    return socket.create_connection(("127.0.0.1", svc.process.port), timeout=10)


def _read_until_closed(sock: socket.socket, deadline: float) -> bytes:
    received = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            break
        if not chunk:
            return received
        received += chunk
    raise AssertionError(f"the server did not close the connection in time; received {received!r}")


def test_slow_clients_are_closed(svc: DemoService) -> None:
    head_only = [_connect(svc) for _ in range(10)]
    for sock in head_only:
        sock.sendall(b"POST /Api/v1/x/SigningRequests/SignHash HTTP/1.1\r\nHost: x\r\n")
    body_only = [_connect(svc) for _ in range(10)]
    for sock in body_only:
        sock.sendall(
            f"POST /Api/v1/{svc.org}/SigningRequests/SignHash HTTP/1.1\r\nHost: x\r\n"
            f"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{".encode()
        )
    silent = [_connect(svc) for _ in range(5)]
    # Meanwhile a well-behaved client is served.
    assert httpx.get(f"{svc.api_url}/healthz").status_code == 200
    deadline = time.monotonic() + 8
    try:
        for sock in head_only + body_only:
            assert b"408 Request Timeout" in _read_until_closed(sock, deadline)
        for sock in silent:
            _read_until_closed(sock, deadline)
    finally:
        for sock in head_only + body_only + silent:
            sock.close()
    assert httpx.get(f"{svc.api_url}/healthz").status_code == 200


def test_keep_alive_client_sending_requests_in_time_is_not_closed(svc: DemoService) -> None:
    with httpx.Client() as client:
        for _ in range(3):
            assert client.get(f"{svc.api_url}/healthz").status_code == 200
            time.sleep(0.4)
        assert client.get(f"{svc.api_url}/healthz").status_code == 200


def test_connections_per_address_are_capped(tmp_path: Path) -> None:
    for service in _service(tmp_path, max_connections_per_ip=3):
        held = [_connect(service) for _ in range(3)]
        try:
            for sock in held:
                sock.sendall(b"GET /Api/healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert b"200" in sock.recv(4096)
            extra = _connect(service)
            assert b"503 Service Unavailable" in _read_until_closed(extra, time.monotonic() + 5)
            extra.close()
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{service.api_url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        else:
            raise AssertionError("closed connections were not released from the cap")


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    init_demo(data_dir)
    raw = json.loads((data_dir / "server.json").read_text())
    for key, value, message in [
        ("headerTimeoutSeconds", 0, "must be positive"),
        ("forwardedAllowIps", [1], "list of addresses"),
        ("maxConnectionsPerIp", "x", "an integer"),
    ]:
        (data_dir / "server.json").write_text(json.dumps({**raw, key: value}))
        with pytest.raises(Exception, match=message):
            ServerSettings.load(data_dir)
