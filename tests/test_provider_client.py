"""Talking to the service: TLS with an extra CA bundle, HTTP proxies, the User-Agent, retries, and how
failures become PKCS#11 return values.

Failure modes the real service never produces (a 500, a 503 with Retry-After, a malformed answer)
come from a small local HTTP server that answers what each test tells it to.
"""

from __future__ import annotations

import datetime
import email.utils
import hashlib
import http.server
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from providerkit import Provider
from servicekit import DemoService, demo_service
from signbridge import __version__
from signbridge.api.client import (
    ApiError,
    Failure,
    ServiceClient,
    ServiceUnavailable,
    TlsVerificationError,
    classify,
    tls_context,
)
from signbridge.crypto.hashes import HashAlgorithm
from signbridge.crypto.signatures import Scheme, SignatureRequest
from signbridge.pkcs11 import CKR, CallerInfo, Pkcs11Error, objects_for_identity
from signbridge.provider.settings import ProviderSettings
from signbridge.provider.signer import ServiceSigner, caller_metadata, ckr_for, service_client
from signbridge.server.process import free_port

pytestmark = pytest.mark.timeout(180)

ORG = "0a1b2c3d-0000-4000-8000-00000000abcd"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoService]:
    with demo_service(tmp_path_factory.mktemp("svc")) as svc:
        yield svc


# --- a scriptable HTTP server and a forwarding proxy ---------------------------------------------


@dataclass
class Answer:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


class Scripted(http.server.ThreadingHTTPServer):
    """Answers each request with the next scripted answer (the last one repeats) and records them."""

    daemon_threads = True

    def __init__(self, answers: list[Answer]) -> None:
        self.answers = list(answers)
        self.seen: list[tuple[str, str, dict[str, str], bytes, float]] = []
        super().__init__(("127.0.0.1", 0), _ScriptedHandler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/Api"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _ScriptedHandler(http.server.BaseHTTPRequestHandler):
    server: Scripted

    def log_message(self, *_args: object) -> None:
        return

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        self.server.seen.append((self.command, self.path, dict(self.headers), body, time.monotonic()))
        answer = self.server.answers[min(len(self.server.seen), len(self.server.answers)) - 1]
        self.send_response(answer.status)
        headers = {"content-type": "application/problem+json", **answer.headers}
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(answer.body)))
        self.end_headers()
        self.wfile.write(answer.body)

    do_GET = do_POST = _answer


class ForwardProxy(http.server.ThreadingHTTPServer):
    """A plain HTTP forward proxy (absolute-form requests) that records what passed through."""

    daemon_threads = True

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: ForwardProxy

    def log_message(self, *_args: object) -> None:
        return

    def _forward(self) -> None:
        self.server.seen.append((self.command, self.path, dict(self.headers)))
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "proxy-connection", "connection")}
        upstream = httpx.request(self.command, self.path, headers=headers, content=body, trust_env=False)
        self.send_response(upstream.status_code)
        for name, value in upstream.headers.items():
            if name.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                self.send_header(name, value)
        self.send_header("content-length", str(len(upstream.content)))
        self.end_headers()
        self.wfile.write(upstream.content)

    do_GET = do_POST = _forward


@pytest.fixture
def scripted() -> Iterator[list[Scripted]]:
    servers: list[Scripted] = []
    yield servers
    for server in servers:
        server.close()


def serve(servers: list[Scripted], *answers: Answer) -> Scripted:
    server = Scripted(list(answers))
    servers.append(server)
    return server


def problem(status: int, detail: str) -> bytes:
    return json.dumps({"status": status, "title": "Error", "detail": detail}).encode()


# --- retries -------------------------------------------------------------------------------------


def test_retry_after_is_honoured_then_the_answer_is_used(scripted: list[Scripted]) -> None:
    server = serve(
        scripted,
        Answer(503, problem(503, "busy"), {"retry-after": "1"}),
        Answer(429, problem(429, "slow down"), {"retry-after": email.utils.format_datetime(
            datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=3), usegmt=True)}),
        Answer(200, b'{"signingPolicies": []}', {"content-type": "application/json"}),
    )  # fmt: skip
    retries: list[tuple[str, float]] = []
    with ServiceClient(server.url, ORG, "token", service_unavailable_timeout=30,
                       on_retry=lambda reason, delay: retries.append((reason, delay))) as client:  # fmt: skip
        assert client.my_signing_policies() == []
    assert len(server.seen) == 3
    assert retries[0] == ("HTTP 503: busy", 1.0)
    assert retries[1][0] == "HTTP 429: slow down" and 0.5 < retries[1][1] <= 3
    assert server.seen[1][4] - server.seen[0][4] >= 0.95


def test_client_errors_fail_at_once_with_the_problem_detail(scripted: list[Scripted]) -> None:
    server = serve(scripted, Answer(400, json.dumps({"title": "Bad", "errors": {"hash": ["The hash is bad."]}}).encode()))
    with ServiceClient(server.url, ORG, "token", service_unavailable_timeout=30) as client, \
            pytest.raises(ApiError) as failure:  # fmt: skip
        client.my_signing_policies()
    assert len(server.seen) == 1
    assert failure.value.status == 400 and failure.value.detail == "The hash is bad."
    assert classify(failure.value) is Failure.CLIENT


def test_the_retry_budget_ends_with_the_last_status(scripted: list[Scripted]) -> None:
    server = serve(scripted, Answer(500, problem(500, "database on fire")))
    started = time.monotonic()
    with ServiceClient(server.url, ORG, "token", service_unavailable_timeout=1.5) as client, \
            pytest.raises(ServiceUnavailable) as failure:  # fmt: skip
        client.my_signing_policies()
    assert 1.5 <= time.monotonic() - started < 5
    assert failure.value.status == 500 and len(server.seen) >= 3
    assert "database on fire" in str(failure.value) and "ServiceUnavailableTimeoutInSeconds is 1.5" in str(failure.value)
    assert classify(failure.value) is Failure.SERVER


# --- failures as CK_RV, through the token's signer ----------------------------------------------


def _key():  # noqa: ANN202
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stub")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return objects_for_identity(certificate, "demo/stub-signing", "demo/stub-signing")[2]


CALLER = CallerInfo(4242, 0, 0, ("pkcs11-tool", "--login", "--pin", "0a1b:secret", "--sign"), "root")


@pytest.mark.parametrize(
    ("answer", "ckr"),
    [
        (Answer(503, problem(503, "keystore busy")), CKR.FUNCTION_FAILED),
        (Answer(500, problem(500, "internal")), CKR.DEVICE_ERROR),
        (Answer(502, b"bad gateway", {"content-type": "text/plain"}), CKR.DEVICE_ERROR),
        (Answer(400, problem(400, "bad hash")), CKR.ARGUMENTS_BAD),
        (Answer(403, problem(403, "not a submitter")), CKR.ARGUMENTS_BAD),
        (Answer(200, b'{"unexpected": true}', {"content-type": "application/json"}), CKR.GENERAL_ERROR),
    ],
)
def test_service_failures_map_to_pkcs11_return_values(scripted: list[Scripted], answer: Answer, ckr: int) -> None:
    server = serve(scripted, answer)
    settings = ProviderSettings(api_url=server.url, organization_id=ORG, api_token="token",
                                service_unavailable_timeout=1)  # fmt: skip
    client = service_client(settings)
    signer = ServiceSigner(settings, client, "signbridge-stub")
    request = SignatureRequest(hashlib.sha256(b"x").digest(), HashAlgorithm.SHA256, Scheme.ECDSA)
    with pytest.raises(Pkcs11Error) as failure:
        signer(_key(), request, CALLER)
    assert failure.value.ckr == ckr
    method, path, headers, body, _ = server.seen[0]
    assert (method, path) == ("POST", f"/Api/v1/{ORG}/SigningRequests/SignHash")
    sent = json.loads(body)
    assert (sent["projectSlug"], sent["signingPolicySlug"]) == ("demo", "stub-signing")
    metadata = sent["hashSigningData"]["metadata"]
    assert metadata == caller_metadata(CALLER, "signbridge-stub")
    assert metadata["sourceProcess"] == {"pid": 4242, "commandLine": "pkcs11-tool --login --pin *** --sign", "user": "root"}
    client.close()


def test_unreachable_is_function_failed() -> None:
    with ServiceClient(f"http://127.0.0.1:{free_port()}/Api", ORG, "t", service_unavailable_timeout=0.5) as client, \
            pytest.raises(ServiceUnavailable) as failure:  # fmt: skip
        client.my_signing_policies()
    assert failure.value.status is None
    assert ckr_for(failure.value) == CKR.FUNCTION_FAILED


# --- TLS with an extra CA bundle -----------------------------------------------------------------


def _tls_files(directory: Path) -> tuple[Path, Path, Path]:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "signbridge private test CA")])
    now = datetime.datetime.now(datetime.UTC)
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))  # fmt: skip
    return paths


@pytest.fixture(scope="module")
def tls_service(service: DemoService, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    directory = tmp_path_factory.mktemp("tls")
    ca, certificate, key = _tls_files(directory)
    port = free_port()
    log = (directory / "tls-service.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "signbridge", "server", "run", "--data-dir", str(service.data_dir), "--port", str(port),
         "--tls-cert", str(certificate), "--tls-key", str(key), "--no-access-log", "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"https://127.0.0.1:{port}/Api"
    context = tls_context(ca)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", verify=context, timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    try:
        yield url, ca
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def test_extra_ca_bundle_is_trusted_on_top_of_the_system_roots(service: DemoService, tls_service: tuple[str, Path]) -> None:
    url, ca = tls_service
    system = tls_context().cert_store_stats()["x509_ca"]
    assert tls_context(ca).cert_store_stats()["x509_ca"] == system + 1
    with ServiceClient(url, service.org, service.token, ca_bundle=ca) as client:
        assert {p.key_id for p in client.my_signing_policies()} >= {"demo/release-signing"}
    started = time.monotonic()
    with ServiceClient(url, service.org, service.token, service_unavailable_timeout=30) as client, \
            pytest.raises(TlsVerificationError) as failure:  # fmt: skip
        client.my_signing_policies()
    assert time.monotonic() - started < 5  # not retried: retrying cannot fix a certificate
    assert "did not verify" in str(failure.value) and "CaBundle (SIGNBRIDGE_CA_BUNDLE)" in str(failure.value)
    assert classify(failure.value) is Failure.OTHER


def test_start_over_tls_with_and_without_the_bundle(service: DemoService, tls_service: tuple[str, Path]) -> None:
    url, ca = tls_service
    provider = Provider(url, service.org, service.token)
    try:
        refused = provider.run("start")
        assert refused.returncode == 1
        assert refused.stderr.count("\n") == 1 and "did not verify" in refused.stderr
        provider.start(SIGNBRIDGE_CA_BUNDLE=str(ca))
        assert provider.record().api_url == url and provider.record().identities == 3
    finally:
        provider.cleanup()


# --- proxy and User-Agent -----------------------------------------------------------------------


def test_requests_go_through_the_http_proxy_with_our_user_agent(service: DemoService) -> None:
    proxy = ForwardProxy()
    try:
        with ServiceClient(service.api_url, service.org, service.token, proxy=proxy.url) as client:
            policies = client.my_signing_policies("demo")
        assert len(policies) == 3
        method, target, headers = proxy.seen[0]
        assert (method, target) == ("GET", f"{service.api_url}/v1/{service.org}/Cryptoki/MySigningPolicies?projectSlug=demo")
        agent = headers.get("User-Agent") or headers.get("user-agent")
        assert agent.startswith(f"signbridge/{__version__} (crypto provider; Linux; Python ")

        provider = Provider.for_service(service)
        try:
            seen = len(proxy.seen)
            provider.start(http_proxy=proxy.url.removeprefix("http://"))  # SignPath's "host:port" form
            assert any("/Cryptoki/MySigningPolicies" in target for _, target, _ in proxy.seen[seen:])
        finally:
            provider.cleanup()
    finally:
        proxy.close()
