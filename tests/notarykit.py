"""A local Notary API v2 and ticket delivery service, and a real S3-compatible server (moto).

The notary server implements the documented request and response shapes of
``/notary/v2/submissions`` and checks what Apple checks of a request: an ES256 token for audience
``appstoreconnect-v1`` that lives at most 20 minutes, signed by the registered key. A submission is
Accepted once its object is in the bucket and its SHA-256 matches the declared one (Invalid if
not). The ticket service answers CloudKit ``records/lookup`` requests from a dict of tickets.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from signbridge.server.process import free_port

BUCKET = "notary-submissions-prod"

# Real tickets: the corpus items Apple stapled.
PKG = "pkg/pqrs-org_Karabiner-DriverKit-VirtualHIDDevice__{}.pkg"
STAPLED_117, UNSTAPLED_117 = PKG.format("1.17.0-stapled"), PKG.format("1.17.0-unstapled")
STAPLED_PKGS = [STAPLED_117, PKG.format("1.27.0"), PKG.format("2.4.0"), PKG.format("4.3.0"), PKG.format("6.14.0")]
DMGS = [
    "dmg/pqrs-org_Karabiner-DriverKit-VirtualHIDDevice__VirtualHIDDevice-0.90.6.dmg",
    "dmg/pqrs-org_Karabiner-DriverKit-VirtualHIDDevice__Karabiner-VirtualHIDDevice-Manager-0.20.0.dmg",
]
MANAGER_APP = "bundles/pqrs-org_Karabiner-DriverKit-VirtualHIDDevice__2.4.0_Karabiner-VirtualHIDDevice-Manager.app"


def trailer_ticket(path: Path) -> bytes:
    """The ticket between a package's t8lr markers, read independently of signbridge's reader."""
    data = path.read_bytes()
    magic, _version, kind, length, _ = struct.unpack("<4sHHII", data[-16:])
    assert (magic, kind) == (b"t8lr", 2)
    assert data[-32 - length : -16 - length] == b"t8lr\x01\x00\x01\x00" + bytes(8)
    return data[-16 - length : -16]


def slot_ticket(path: Path) -> bytes:
    """The ticket in a DMG's slot 0x10002: a BlobWrapper (0xfade0b01) around the s8ch document."""
    data = path.read_bytes()
    start = data.rfind(b"s8ch")
    magic, length = struct.unpack(">II", data[start - 8 : start])
    assert magic == 0xFADE0B01
    return data[start : start - 8 + length]


@contextmanager
def moto_s3() -> Iterator[str]:
    """moto's server mode on a loopback port; yields its ``http://host:port`` endpoint."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                httpx.get(endpoint + "/moto-api/", timeout=1)
                break
            except httpx.TransportError:
                if proc.poll() is not None:
                    pytest.fail("moto's server did not start (moto[server] is a test dependency)")
                time.sleep(0.1)
        else:
            pytest.fail("moto's server did not answer on loopback")
        s3(endpoint).create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": "us-west-2"})
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def s3(endpoint: str):  # noqa: ANN201 - boto3's client type is generated
    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-west-2", aws_access_key_id="check", aws_secret_access_key="check"
    )


@dataclass
class NotaryState:
    public_key: ec.EllipticCurvePublicKey
    key_id: str
    issuer: str
    s3_endpoint: str
    submissions: dict[str, dict[str, Any]] = field(default_factory=dict)
    polls_before_done: int = 1
    tickets: dict[str, bytes] = field(default_factory=dict)
    lookups: list[str] = field(default_factory=list)
    tokens: list[dict[str, Any]] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)
    fail_next: int = 0  # answer this many API requests with 503 first


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _check_token(state: NotaryState, authorization: str | None) -> str | None:
    if not authorization or not authorization.startswith("Bearer "):
        return "no bearer token"
    try:
        head, body, signature = authorization[7:].split(".")
        header, claims = json.loads(_b64decode(head)), json.loads(_b64decode(body))
        raw = _b64decode(signature)
        der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
        state.public_key.verify(der, f"{head}.{body}".encode(), ec.ECDSA(hashes.SHA256()))
    except Exception as exc:  # noqa: BLE001 - any defect is a 401, as at Apple
        return f"bad token: {exc!r}"
    state.tokens.append({"header": header, "claims": claims})
    now = time.time()
    if header.get("alg") != "ES256" or header.get("kid") != state.key_id or claims.get("iss") != state.issuer:
        return "wrong key"
    if claims.get("aud") != "appstoreconnect-v1" or claims["exp"] - claims["iat"] > 1200 or claims["exp"] < now:
        return "bad claims"
    return None


def _handler(state: NotaryState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, status: int, document: Any, content_type: str = "application/json") -> None:
            body = document if isinstance(document, bytes) else json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _authorized(self) -> bool:
            if state.fail_next > 0:
                state.fail_next -= 1
                self._send(503, {"errors": [{"status": "503", "title": "try again"}]})
                return False
            problem = _check_token(state, self.headers.get("Authorization"))
            if problem:
                self._send(401, {"errors": [{"status": "401", "code": "NOT_AUTHORIZED", "title": problem}]})
                return False
            return True

        def _body(self) -> Any:
            return json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")

        def do_POST(self) -> None:  # noqa: N802
            if self.path.endswith("/records/lookup"):
                return self._lookup()
            if self.path != "/notary/v2/submissions" or not self._authorized():
                return None if self.path == "/notary/v2/submissions" else self._send(404, {})
            body = self._body()
            if not body.get("submissionName") or len(body.get("sha256", "")) != 64:
                return self._send(400, {"errors": [{"status": "400", "detail": "submissionName and sha256 required"}]})
            ident = str(uuid.uuid4())
            secret, token = f"secret-{uuid.uuid4()}", f"session-{uuid.uuid4()}"
            state.secrets += [secret, token]
            state.submissions[ident] = {
                "name": body["submissionName"], "sha256": body["sha256"], "object": f"prod/{ident}",
                "createdDate": "2026-12-03T10:00:00.000Z", "polls": 0,
            }
            return self._send(200, {"data": {"type": "newSubmissions", "id": ident, "attributes": {
                "awsAccessKeyId": "ASIATESTKEY", "awsSecretAccessKey": secret, "awsSessionToken": token,
                "bucket": BUCKET, "object": f"prod/{ident}"}}, "meta": {}})

        def do_GET(self) -> None:  # noqa: N802
            if self.path.startswith("/logs/"):
                return self._send(200, json.dumps({"jobId": self.path[6:], "status": "Accepted", "issues": None}).encode())
            if not self.path.startswith("/notary/v2/submissions"):
                return self._send(404, {})
            if not self._authorized():
                return None
            parts = self.path.split("/")[4:]
            if not parts:
                return self._send(200, {"data": [self._resource(i) for i in state.submissions], "meta": {}, "links": {}})
            ident = parts[0]
            if ident not in state.submissions:
                return self._send(404, {"errors": [{"status": "404", "detail": "no such submission"}]})
            if len(parts) == 2 and parts[1] == "logs":
                url = f"http://{self.headers['Host']}/logs/{ident}"
                return self._send(200, {"data": {"type": "submissionsLog", "id": ident, "attributes": {"developerLogUrl": url}}})
            return self._send(200, {"data": self._resource(ident, poll=True), "meta": {}})

        def _resource(self, ident: str, poll: bool = False) -> dict[str, Any]:
            record = state.submissions[ident]
            if poll:
                record["polls"] += 1
            status = record.get("status", "In Progress")
            if status == "In Progress" and record["polls"] > state.polls_before_done:
                try:
                    data = s3(state.s3_endpoint).get_object(Bucket=BUCKET, Key=record["object"])["Body"].read()
                except Exception:  # noqa: BLE001 - not uploaded yet
                    data = None
                if data is not None:
                    record["status"] = status = "Accepted" if hashlib.sha256(data).hexdigest() == record["sha256"] else "Invalid"
            return {"type": "submissions", "id": ident, "attributes": {
                "status": status, "name": record["name"], "createdDate": record["createdDate"]}}

        def _lookup(self) -> None:
            records = []
            for request in self._body().get("records", []):
                name = request["recordName"]
                state.lookups.append(name)
                if name in state.tickets:
                    records.append({"recordName": name, "recordType": "DeveloperIDTicket", "deleted": False,
                                    "fields": {"signedTicket": {"type": "BYTES",
                                                                "value": base64.b64encode(state.tickets[name]).decode()}}})
                else:
                    records.append({"recordName": name, "reason": "Record not found", "serverErrorCode": "NOT_FOUND"})
            self._send(200, {"records": records})

    return Handler


@contextmanager
def notary_server(state: NotaryState) -> Iterator[str]:
    """Serve the Notary API on loopback; yields the base URL (``http://127.0.0.1:PORT``)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
