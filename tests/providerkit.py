"""Helpers for the crypto provider tests: ``signbridge start`` against a real demo service.

Every token a test starts lives in a private runtime directory (short, under /tmp, so socket
paths fit) and registers a real p11-kit module file; :meth:`Provider.cleanup` stops the tokens and
removes every module file that points into that directory, so other tests on the machine never
meet a leftover token.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from servicekit import DemoService
from signbridge import p11kit
from signbridge.provider import registration, registry

PROXY_MODULE = "/usr/lib/x86_64-linux-gnu/p11-kit-proxy.so"
CLIENT_MODULE = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
ENGINE = "/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so"
SECRET_VARIABLES = ("SIGNPATH_API_TOKEN", "SIGNPATH_CI_USER_TOKEN")


def key_id_hex(key_id: str) -> str:
    return key_id.encode().hex()


@dataclass
class Provider:
    """``signbridge start|stop|status|restart`` with a private runtime and log directory."""

    api_url: str
    organization_id: str
    api_token: str
    runtime: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="sbt", dir="/tmp")))

    @classmethod
    def for_service(cls, service: DemoService) -> Provider:
        return cls(service.api_url, service.org, service.token)

    @property
    def log_dir(self) -> Path:
        return self.runtime / "log"

    @property
    def log_file(self) -> Path:
        return self.log_dir / "signbridge-provider.log"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for a command: the provider's settings, and no token unless given."""
        env = {key: value for key, value in os.environ.items() if key not in SECRET_VARIABLES}
        env.pop("SIGNPATH_CONFIG_FILE", None)
        env.update({
            "SIGNBRIDGE_RUNTIME_DIR": str(self.runtime / "run"),
            "SIGNPATH_LOG_FILE_DIRECTORY": str(self.log_dir),
            "SIGNPATH_LOG_FILE_LEVEL": "debug",
            "SIGNPATH_API_URL": self.api_url,
            "SIGNPATH_ORGANIZATION_ID": self.organization_id,
            "SIGNPATH_API_TOKEN": self.api_token,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent.parent / "src"),
                                                         os.environ.get("PYTHONPATH")])),
        })  # fmt: skip
        env.update(extra)
        return {key: value for key, value in env.items() if value is not None}

    def run(self, *args: str, timeout: float = 120, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "signbridge", *args],
            capture_output=True, text=True, env=self.env(**extra), timeout=timeout, check=False,
        )  # fmt: skip

    def start(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        proc = self.run("start", *args, **extra)
        assert proc.returncode == 0, f"signbridge start failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        return proc

    def consumer_env(self, record: registry.TokenRecord | None = None, **extra: str) -> dict[str, str]:
        """The environment of a consumer tool: no signbridge settings, no API token."""
        env = {key: value for key, value in os.environ.items() if key not in SECRET_VARIABLES}
        if record is not None:
            env["P11_KIT_SERVER_ADDRESS"] = record.server_address
        env.update(extra)
        return env

    def records(self) -> list[registry.TokenRecord]:
        base = self.runtime / "run" / "tokens"
        if not base.is_dir():
            return []
        found = [registry.read_record(entry) for entry in sorted(base.iterdir()) if entry.is_dir()]
        return [record for record in found if record is not None]

    def record(self, name: str | None = None) -> registry.TokenRecord:
        records = [r for r in self.records() if name is None or r.name == name]
        assert len(records) == 1, records
        return records[0]

    def status(self) -> dict:
        proc = self.run("status", "--json")
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def our_module_files(self) -> list[Path]:
        """Module files (anywhere p11-kit looks) whose socket is inside this provider's runtime dir."""
        found = []
        for path in registration.our_module_files(registration.module_dir()):
            socket_path = p11kit.socket_of(p11kit.read_fields(path)) or ""
            if socket_path.startswith(str(self.runtime)):
                found.append(path)
        return found

    def cleanup(self) -> None:
        for record in self.records():
            if registry.pid_alive(record.pid):
                os.kill(record.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(registry.pid_alive(r.pid) for r in self.records()):
            time.sleep(0.05)
        for record in self.records():
            if registry.pid_alive(record.pid):
                os.kill(record.pid, signal.SIGKILL)
        for path in self.our_module_files():
            path.unlink(missing_ok=True)
        shutil.rmtree(self.runtime, ignore_errors=True)


def policy_certificates(service: DemoService, directory: Path) -> dict[str, Path]:
    """PEM files of each policy's certificate, public key and chain: ``<slug>.pem|.pub.pem|.chain.pem``."""
    paths: dict[str, Path] = {}
    for slug, policy in service.policies().items():
        certificate = x509.load_der_x509_certificate(base64.b64decode(policy["certificateBytes"]))
        (directory / f"{slug}.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        (directory / f"{slug}.pub.pem").write_bytes(
            certificate.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        chain = b"".join(
            x509.load_der_x509_certificate(base64.b64decode(der)).public_bytes(serialization.Encoding.PEM)
            for der in policy.get("certificateChain", [])
        )
        (directory / f"{slug}.chain.pem").write_bytes(chain)
        paths[slug] = directory / f"{slug}.pem"
    return paths


def audit_records(service: DemoService, since: int = 0) -> list[dict]:
    proc = service.admin("audit", "list", "--json", "--since", str(since), "--limit", "100000")
    return json.loads(proc.stdout)


def last_audit_seq(service: DemoService) -> int:
    records = audit_records(service)
    return records[-1]["seq"] if records else 0
