"""``signbridge demo``: the whole path a signature takes, on the embedded default, in one command."""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from .api import ServiceClient
from .hashes import HashAlgorithm
from .server.process import ServiceProcess
from .signatures import EcdsaFormat, Scheme, SignatureRequest, verify_digest_signature
from .tsa import request_timestamp

Echo = Callable[[str], None]


def _init_demo(data_dir: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "signbridge", "server", "init", "--demo", "--json", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"signbridge demo: creating the demo organization failed:\n{proc.stderr}")
    return json.loads(proc.stdout)


def run_demo(echo: Echo, *, keep: Path | None = None) -> None:
    with tempfile.TemporaryDirectory(prefix="signbridge-demo-") as temporary:
        data_dir = (keep or Path(temporary)) / "data"
        echo(f"1. Creating a data directory with the Demo Corp organization in {data_dir}")
        info = _init_demo(data_dir)
        echo(f"   organization {info['organizationId']}, project 'demo', CI user '{info['ciUser']}'")
        root = x509.load_pem_x509_certificate(Path(info["rootCertificate"]).read_bytes())

        service = ServiceProcess(data_dir)
        echo("2. Starting the signing service on a free loopback port")
        with service:
            echo(f"   listening at {service.api_url}")
            with ServiceClient(service.api_url, info["organizationId"], info["apiToken"], service_unavailable_timeout=10) as client:
                policies = client.my_signing_policies()
                echo(f"3. The CI user may sign with {len(policies)} signing policies:")
                for policy in policies:
                    echo(f"   {policy.key_id:<28} {policy.key_type} {policy.key_size}  {policy.certificate.subject.rfc4514_string()}")
                echo("4. Signing a SHA-256 digest with each policy through SignHash; only the digest leaves this machine")
                digest = HashAlgorithm.SHA256.digest(b"signbridge demo " + secrets.token_bytes(16))
                for policy in policies:
                    scheme = Scheme.ECDSA if policy.key_type == "Ecdsa" else Scheme.RSA_PKCS1
                    request = SignatureRequest(digest, HashAlgorithm.SHA256, scheme, EcdsaFormat.IEEE)
                    signature = client.sign_hash(policy.project_slug, policy.signing_policy_slug, request, {"demo": True})
                    verify_digest_signature(policy.certificate.public_key(), request, signature)
                    for issuer, subject in zip((*policy.chain,), (policy.certificate, *policy.chain), strict=False):
                        subject.verify_directly_issued_by(issuer)
                    echo(f"   {policy.key_id:<28} {len(signature)}-byte {scheme.value} signature verified against its certificate and chain")
                echo("5. Timestamping the digest with the service's RFC 3161 authority")
                token = request_timestamp(f"{service.api_url}/timestamp", digest, HashAlgorithm.SHA256)
                token.verify(digest, HashAlgorithm.SHA256, [root])
                echo(f"   timestamp {token.gen_time.isoformat()} (serial {token.serial}) verified against the demo root")
            echo("6. Stopping the service (SIGTERM); every signature above is in the audit log")
        # uvicorn re-raises SIGTERM after its graceful shutdown, so -SIGTERM is a clean exit.
        if service.process is not None and service.process.returncode not in (0, -signal.SIGTERM, None):
            raise SystemExit(f"signbridge demo: the service exited with code {service.process.returncode}")
        verify = subprocess.run(
            [sys.executable, "-m", "signbridge", "admin", "--data-dir", str(data_dir), "audit", "verify"],
            capture_output=True, text=True, check=False,
        )
        echo(f"   {(verify.stdout or verify.stderr).strip()}")
        if verify.returncode != 0:
            raise SystemExit("signbridge demo: the audit log did not verify")
        echo("Done: keys stayed in the service, every signature was verified, audited and timestamped.")
