"""A real signing service for tests: a demo data directory and ``signbridge server run`` on loopback."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from signbridge.server.process import ServiceProcess


def signbridge(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the ``signbridge`` command line in a child process."""
    proc = subprocess.run(
        [sys.executable, "-m", "signbridge", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"signbridge {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def init_demo(data_dir: Path, *extra: str, env: dict[str, str] | None = None) -> dict:
    return json.loads(signbridge("server", "init", "--demo", "--json", "--data-dir", str(data_dir), *extra, env=env).stdout)


@dataclass
class DemoService:
    data_dir: Path
    info: dict
    process: ServiceProcess

    @property
    def api_url(self) -> str:
        return self.process.api_url

    @property
    def org(self) -> str:
        return self.info["organizationId"]

    @property
    def token(self) -> str:
        return self.info["apiToken"]

    @property
    def root_pem(self) -> Path:
        return Path(self.info["rootCertificate"])

    def url(self, path: str) -> str:
        return f"{self.api_url}/v1/{self.org}/{path}"

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}

    def admin(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return signbridge("admin", "--data-dir", str(self.data_dir), *args, env=self.process.extra_env, check=check)

    def policies(self, token: str | None = None) -> dict[str, dict]:
        response = httpx.get(self.url("Cryptoki/MySigningPolicies"), headers=self.auth(token))
        assert response.status_code == 200, response.text
        return {p["signingPolicySlug"]: p for p in response.json()["signingPolicies"]}

    def certificate(self, policy: str) -> x509.Certificate:
        return x509.load_der_x509_certificate(base64.b64decode(self.policies()[policy]["certificateBytes"]))

    def public_key_pem(self, policy: str, directory: Path) -> Path:
        path = directory / f"{policy}.pub.pem"
        path.write_bytes(
            self.certificate(policy).public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        return path

    def sign_hash(self, policy: str, hash_data: dict, *, token: str | None = None, project: str = "demo") -> httpx.Response:
        body = {"projectSlug": project, "signingPolicySlug": policy, "hashSigningData": hash_data}
        return httpx.post(self.url("SigningRequests/SignHash"), json=body, headers=self.auth(token))

    def log_text(self) -> str:
        return self.process.log_path.read_text(errors="replace")


@contextmanager
def demo_service(
    directory: Path, *, init_args: tuple[str, ...] = (), env: dict[str, str] | None = None, workers: int = 1,
    database_url: str | None = None, run_args: tuple[str, ...] = (), settings: dict | None = None,
) -> Iterator[DemoService]:
    """``settings``: values written into the data directory's server.json before the service starts."""
    data_dir = directory / "data"
    extra = (*init_args, *(("--database-url", database_url) if database_url else ()))
    info = init_demo(data_dir, *extra, env=env)
    if settings:
        path = data_dir / "server.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **settings}))
    process = ServiceProcess(data_dir, workers=workers, extra_env=env or {}, database_url=database_url, extra_args=run_args)
    with process:
        yield DemoService(data_dir, info, process)


class SigningLoad:
    """Clients that keep sending SignHash requests to a service being stopped; ``granted`` collects
    the request ids of every signature they received."""

    def __init__(self, process: ServiceProcess, info: dict, clients: int = 8) -> None:
        self.url = f"{process.api_url}/v1/{info['organizationId']}/SigningRequests/SignHash"
        self.headers = {"Authorization": f"Bearer {info['apiToken']}"}
        self.granted: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client) for _ in range(clients)]

    def _client(self) -> None:
        body = {"projectSlug": "demo", "signingPolicySlug": "release-signing", "hashSigningData": {
            "hash": base64.b64encode(bytes(32)).decode(), "signatureAlgorithm": "Rsa", "rsaOptions": {"hashAlgorithmName": "Sha256"}}}
        with httpx.Client(headers=self.headers, timeout=10) as http:
            while not self._stop.is_set():
                try:
                    response = http.post(self.url, json=body)
                except httpx.TransportError:
                    return
                if response.status_code == 200:
                    self.granted.append(response.json()["signingRequestId"])

    def __enter__(self) -> SigningLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()
