"""The admin commands end to end: a key with a CSR issued by an openssl CA, policies, users, tokens, TLS."""

from __future__ import annotations

import base64
import hashlib
import json
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from conftest import require_tool, run
from servicekit import signbridge
from signbridge.server.process import ServiceProcess, free_port


def admin(data_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return signbridge("admin", "--data-dir", str(data_dir), *args, check=check)


@pytest.fixture
def openssl_ca(tmp_path: Path) -> tuple[Path, Path]:
    require_tool("openssl")
    key, cert = tmp_path / "ca.key", tmp_path / "ca.pem"
    run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "30", "-subj", "/CN=Example Test CA/O=Example", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
    return key, cert


@pytest.mark.parametrize("key_type", ["rsa-3072", "ecdsa-p384"])
def test_csr_issue_import_policy_sign(tmp_path: Path, openssl_ca: tuple[Path, Path], key_type: str) -> None:
    data_dir = tmp_path / "data"
    created = json.loads(signbridge("server", "init", "--json", "--data-dir", str(data_dir)).stdout)
    assert "apiToken" not in created
    admin(data_dir, "org", "create", "Example")
    admin(data_dir, "project", "create", "app")
    csr = tmp_path / "build.csr"
    out = admin(data_dir, "cert", "generate", "build-key", "--key-type", key_type,
                "--subject", "CN=Example Build Signing,O=Example", "--csr", str(csr)).stdout
    assert "CSR" in out
    # The CSR is self-consistent (signed by the keystore key) as openssl sees it.
    text = run(["openssl", "req", "-in", str(csr), "-noout", "-verify", "-subject"])
    assert b"verify OK" in text.stdout + text.stderr and b"Example Build Signing" in text.stdout
    # A policy cannot use a key before its certificate is imported.
    assert admin(data_dir, "policy", "create", "--project", "app", "--certificate", "build-key", "release",
                 check=False).returncode != 0
    ca_key, ca_cert = openssl_ca
    issued = tmp_path / "build.pem"
    ext = tmp_path / "ext.cnf"
    ext.write_text("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=codeSigning\n")
    run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key), "-CAcreateserial",
         "-out", str(issued), "-days", "10", "-extfile", str(ext)])
    admin(data_dir, "cert", "import", "build-key", str(issued), "--chain", str(ca_cert))
    shown = admin(data_dir, "cert", "show", "build-key", "--chain").stdout
    assert shown.count("BEGIN CERTIFICATE") == 2
    admin(data_dir, "policy", "create", "--project", "app", "--certificate", "build-key", "release")
    admin(data_dir, "user", "create", "ci-app")
    token = json.loads(admin(data_dir, "token", "create", "ci-app", "--json", "--description", "pipeline").stdout)
    admin(data_dir, "submitter", "add", "--project", "app", "--policy", "release", "--user", "ci-app")
    policies = json.loads(admin(data_dir, "policy", "list", "--json").stdout)
    assert policies[0]["submitters"] == ["user:ci-app"]
    with ServiceProcess(data_dir) as service:
        digest = hashlib.sha256(b"release build").digest()
        algorithm = {"signatureAlgorithm": "Ecdsa", "ecdsaOptions": {"signatureFormat": "Asn1"}} if "ecdsa" in key_type else {
            "signatureAlgorithm": "Rsa", "rsaOptions": {"hashAlgorithmName": "Sha256"}}
        response = httpx.post(
            f"{service.api_url}/v1/{token['organizationId']}/SigningRequests/SignHash",
            headers={"Authorization": f"Bearer {token['apiToken']}"},
            json={"projectSlug": "app", "signingPolicySlug": "release",
                  "hashSigningData": {"hash": base64.b64encode(digest).decode(), **algorithm}},
        )
        assert response.status_code == 200, response.text
        listed = httpx.get(f"{service.api_url}/v1/{token['organizationId']}/Cryptoki/MySigningPolicies",
                           headers={"Authorization": f"Bearer {token['apiToken']}"}).json()["signingPolicies"][0]
        ca_der = x509.load_pem_x509_certificate(ca_cert.read_bytes()).public_bytes(serialization.Encoding.DER)
        assert listed["certificateChain"] == [base64.b64encode(ca_der).decode()]
        (tmp_path / "digest").write_bytes(digest)
        (tmp_path / "sig").write_bytes(base64.b64decode(response.json()["hashSigningResult"]["signature"]))
        run(["openssl", "x509", "-in", str(issued), "-pubkey", "-noout", "-out", str(tmp_path / "pub.pem")])
        args = ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(tmp_path / "pub.pem"), "-in", str(tmp_path / "digest"),
                "-sigfile", str(tmp_path / "sig")]
        if "rsa" in key_type:
            args += ["-pkeyopt", "digest:sha256"]
        assert b"Signature Verified Successfully" in run(args).stdout
        run(["openssl", "verify", "-CAfile", str(ca_cert), str(issued)])
        # Revoking the token takes effect on the next request.
        admin(data_dir, "token", "revoke", token["tokenId"])
        again = httpx.get(f"{service.api_url}/v1/{token['organizationId']}/Cryptoki/MySigningPolicies",
                          headers={"Authorization": f"Bearer {token['apiToken']}"})
        assert again.status_code == 401 and "revoked" in again.json()["detail"]
    tokens = json.loads(admin(data_dir, "token", "list", "ci-app", "--json").stdout)
    assert tokens[0]["revoked"] is not None and "apiToken" not in tokens[0]


def test_self_signed_key_and_errors(tmp_path: Path, openssl_ca: tuple[Path, Path]) -> None:
    data_dir = tmp_path / "data"
    signbridge("server", "init", "--data-dir", str(data_dir))
    admin(data_dir, "org", "create", "Example")
    out = admin(data_dir, "cert", "generate", "quick", "--subject", "CN=Quick", "--key-type", "ecdsa-p256").stdout
    assert "self-signed" in out
    pem = admin(data_dir, "cert", "show", "quick").stdout
    (tmp_path / "quick.pem").write_text(pem)
    run(["openssl", "verify", "-CAfile", str(tmp_path / "quick.pem"), str(tmp_path / "quick.pem")])
    # Errors: one line, specific, non-zero.
    cases = [
        (("cert", "generate", "quick", "--subject", "CN=Again"), "already exists"),
        (("cert", "generate", "bad", "--subject", "not a name"), "RFC 4514"),
        (("cert", "generate", "bad2", "--subject", "CN=x", "--key-type", "dsa-1024"), "unknown key type"),
        (("cert", "import", "quick", str(openssl_ca[1])), "public key is not the key"),
        (("project", "create", "bad slug!"), "not a valid slug"),
        (("policy", "create", "--project", "nope", "--certificate", "quick", "p"), "no project 'nope'"),
        (("token", "revoke", "0000"), "no API token"),
        (("user", "create", "x", "--interactive"), None),
    ]
    for args, message in cases:
        proc = admin(data_dir, *args, check=False)
        if message is None:
            assert proc.returncode == 0
            continue
        assert proc.returncode != 0, args
        assert proc.stderr.startswith("signbridge: error:") and message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    init_again = signbridge("server", "init", "--data-dir", str(data_dir), check=False)
    assert init_again.returncode != 0 and "already a signbridge data directory" in init_again.stderr
    not_data = signbridge("admin", "--data-dir", str(tmp_path / "nowhere"), "org", "list", check=False)
    assert not_data.returncode != 0 and "not a signbridge data directory" in not_data.stderr


def test_master_key_and_data_dir_permissions(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    signbridge("server", "init", "--demo", "--data-dir", str(data_dir))
    assert (data_dir.stat().st_mode & 0o777) == 0o700
    assert ((data_dir / "master.key").stat().st_mode & 0o777) == 0o600
    assert ((data_dir / "server.json").stat().st_mode & 0o777) == 0o600
    secret = (data_dir / "master.key").read_bytes()
    for path in data_dir.rglob("*"):
        if path.is_file() and path.name != "master.key":
            assert secret not in path.read_bytes()


def test_human_summary_has_export_lines(tmp_path: Path) -> None:
    out = signbridge("server", "init", "--demo", "--data-dir", str(tmp_path / "data")).stdout
    for line in ("export SIGNPATH_ORGANIZATION_ID=", "export SIGNPATH_API_TOKEN=", "export SIGNPATH_API_URL=",
                 "export SIGNBRIDGE_ANCHORS="):
        assert line in out


def test_tls(tmp_path: Path) -> None:
    require_tool("openssl")
    data_dir = tmp_path / "data"
    info = json.loads(signbridge("server", "init", "--demo", "--json", "--data-dir", str(data_dir)).stdout)
    cert, key = tmp_path / "tls.pem", tmp_path / "tls.key"
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "signbridge", "server", "run", "--data-dir", str(data_dir), "--port", str(port),
                             "--tls-cert", str(cert), "--tls-key", str(key)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                response = httpx.get(f"https://127.0.0.1:{port}/Api/v1/{info['organizationId']}/Cryptoki/MySigningPolicies",
                                     headers={"Authorization": f"Bearer {info['apiToken']}"}, verify=ssl.create_default_context(cafile=str(cert)))
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
        assert response.status_code == 200 and len(response.json()["signingPolicies"]) == 3
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"https://127.0.0.1:{port}/Api/healthz")  # not trusted without the certificate
    finally:
        proc.terminate()
        proc.wait(20)


def test_data_dir_after_the_subcommand(tmp_path: Path) -> None:
    """`--data-dir` and `--database-url` work after the subcommand too; the group's default directory
    (here one that does not exist) is never opened when a subcommand names another."""
    data_dir = tmp_path / "data"
    signbridge("server", "init", "--data-dir", str(data_dir))
    env = {"SIGNBRIDGE_DATA_DIR": str(tmp_path / "not-a-data-dir")}
    created = signbridge("admin", "org", "create", "Example", "--data-dir", str(data_dir), env=env)
    assert "Created organization 'Example'" in created.stdout
    verified = signbridge("admin", "audit", "verify", "--data-dir", str(data_dir), env=env)
    assert verified.stdout.splitlines()[0] == "audit log intact: 0 records, chain verified"
    url = f"sqlite:///{data_dir / 'signbridge.db'}"
    listed = signbridge("admin", "--data-dir", str(tmp_path / "elsewhere"), "org", "list", "--json",
                        "--data-dir", str(data_dir), "--database-url", url, env=env)
    assert [o["name"] for o in json.loads(listed.stdout)] == ["Example"]
    missing = signbridge("admin", "audit", "verify", env=env, check=False)
    assert missing.returncode == 2 and "not-a-data-dir is not a signbridge data directory" in missing.stderr
