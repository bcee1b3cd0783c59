"""signbridge notarytool against a local Notary API v2 and moto's real S3 server, on loopback."""

from __future__ import annotations

import hashlib
import json
import os
import plistlib
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from corpuskit import APPLE_ROOT, copy_item, corpus_item
from notarykit import (
    BUCKET,
    STAPLED_117,
    UNSTAPLED_117,
    NotaryState,
    moto_s3,
    notary_server,
    s3,
    trailer_ticket,
)
from signbridge.apple.notary.api import NotaryClient, UploadTarget
from signbridge.apple.notary.credentials import ApiKey, resolve_api_key
from signbridge.apple.notary.errors import CredentialsError, NotaryError
from signbridge.apple.notary.upload import upload

SIGNBRIDGE = [sys.executable, "-m", "signbridge"]


@pytest.fixture(scope="module")
def s3_endpoint():
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture
def api_key(tmp_path: Path) -> tuple[Path, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "AuthKey_ABC123DEFG.p8"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return path, key


@pytest.fixture
def notary(api_key, s3_endpoint):
    state = NotaryState(api_key[1].public_key(), "ABC123DEFG", "69a6de70-03db-47e3-e053-5b8c7c11a4d1", s3_endpoint)
    with notary_server(state) as url:
        yield state, url


def _env(url: str, s3_endpoint: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        SIGNBRIDGE_NOTARY_API_URL=f"{url}/notary/v2",
        SIGNBRIDGE_NOTARY_S3_ENDPOINT=s3_endpoint,
        SIGNBRIDGE_NOTARY_PROFILES=str(tmp_path / "profiles"),
        **extra,
    )
    return env


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([*SIGNBRIDGE, "notarytool", *args], env=env, capture_output=True, text=True, timeout=120)


def _key_args(api_key, state) -> list[str]:
    return ["--key", str(api_key[0]), "--key-id", state.key_id, "--issuer", state.issuer]


def test_submit_wait_info_log_history(tmp_path, api_key, notary, s3_endpoint):
    state, url = notary
    archive = tmp_path / "MyApp.zip"
    archive.write_bytes(os.urandom(300_000))
    env = _env(url, s3_endpoint, tmp_path)

    result = _run(["submit", str(archive), *_key_args(api_key, state), "--wait", "--timeout", "2m", "--no-preflight"], env)
    assert result.returncode == 0, result.stderr
    (ident,) = state.submissions
    assert f"Submission ID received\n  id: {ident}" in result.stdout
    assert "Processing complete\n  id: " in result.stdout and "status: Accepted" in result.stdout
    assert "Current status: In Progress..." in result.stderr
    stored = s3(s3_endpoint).get_object(Bucket=BUCKET, Key=f"prod/{ident}")["Body"].read()
    assert stored == archive.read_bytes()
    assert state.submissions[ident]["sha256"] == hashlib.sha256(stored).hexdigest()
    assert state.submissions[ident]["name"] == "MyApp.zip"

    info = _run(["info", ident, *_key_args(api_key, state), "--output-format", "json"], env)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout) == {
        "createdDate": "2026-12-03T10:00:00.000Z", "id": ident, "name": "MyApp.zip", "status": "Accepted",
        "message": "Successfully received submission info",
    }
    human = _run(["info", ident, *_key_args(api_key, state)], env)
    assert human.stdout.splitlines()[0] == "Successfully received submission info"
    assert "  status: Accepted" in human.stdout

    log_path = tmp_path / "log.json"
    logged = _run(["log", ident, str(log_path), *_key_args(api_key, state)], env)
    assert logged.returncode == 0, logged.stderr
    assert json.loads(log_path.read_text())["jobId"] == ident

    listed = _run(["history", *_key_args(api_key, state), "-f", "json"], env)
    assert [entry["id"] for entry in json.loads(listed.stdout)["history"]] == [ident]

    waited = _run(["wait", ident, *_key_args(api_key, state), "-f", "json"], env)
    assert json.loads(waited.stdout)["status"] == "Accepted"
    as_plist = _run(["info", ident, *_key_args(api_key, state), "-f", "plist"], env)
    assert plistlib.loads(as_plist.stdout.encode())["status"] == "Accepted"
    apple_id = _run(["history", "--apple-id", "dev@example.com", "--team-id", "T"], env)
    assert apple_id.returncode == 2 and "Apple ID credentials are not supported" in apple_id.stderr

    every_output = "".join(r.stdout + r.stderr for r in (result, info, human, logged, listed, waited))
    for secret in [*state.secrets, api_key[0].read_text().splitlines()[1]]:
        assert secret not in every_output
    for token in state.tokens:
        assert token["claims"]["aud"] == "appstoreconnect-v1"
        assert token["claims"]["exp"] - token["claims"]["iat"] <= 1200
        assert token["header"] == {"alg": "ES256", "kid": "ABC123DEFG", "typ": "JWT"}


def test_invalid_upload_exits_1_and_submit_json(tmp_path, api_key, notary, s3_endpoint):
    state, url = notary
    archive = tmp_path / "App.zip"
    archive.write_bytes(b"payload")
    env = _env(url, s3_endpoint, tmp_path)
    result = _run(["submit", str(archive), *_key_args(api_key, state), "--no-preflight", "-f", "json"], env)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["message"] == "Successfully uploaded file" and document["path"] == str(archive)
    # a different object under the submission's key: the service finds the hash wrong
    s3(s3_endpoint).put_object(Bucket=BUCKET, Key=f"prod/{document['id']}", Body=b"tampered")
    waited = _run(["wait", document["id"], *_key_args(api_key, state)], env)
    assert waited.returncode == 1
    assert "status: Invalid" in waited.stdout


def test_multipart_upload_to_s3(tmp_path, s3_endpoint):
    big = tmp_path / "big.zip"
    big.write_bytes(os.urandom(11 * 1024 * 1024))
    target = UploadTarget("id-1", "ASIA", "secret", "session", BUCKET, "prod/multipart")
    seen: list[tuple[int, int]] = []
    upload(big, target, endpoint=s3_endpoint, part_size=5 * 1024 * 1024, progress=lambda d, t: seen.append((d, t)))
    head = s3(s3_endpoint).head_object(Bucket=BUCKET, Key="prod/multipart")
    assert head["ETag"].strip('"').endswith("-3")  # three parts
    assert s3(s3_endpoint).get_object(Bucket=BUCKET, Key="prod/multipart")["Body"].read() == big.read_bytes()
    assert seen[-1] == (big.stat().st_size, big.stat().st_size)


def test_transient_failures_are_retried(tmp_path, api_key, notary):
    state, url = notary
    state.fail_next = 2
    key = resolve_api_key(key=str(api_key[0]), key_id=state.key_id, issuer=state.issuer)
    with NotaryClient(key, base_url=f"{url}/notary/v2", backoff=0.01) as client:
        target = client.create_submission("x.zip", "0" * 64)
        assert client.submission(target.submission_id).status == "In Progress"
    state.fail_next = 10
    client = NotaryClient(key, base_url=f"{url}/notary/v2", backoff=0.0, attempts=3)
    with client, pytest.raises(NotaryError, match="HTTP 503 \\(after 3 attempts\\)"):
        client.history()


def test_store_credentials_profile(tmp_path, api_key, notary, s3_endpoint):
    state, url = notary
    env = _env(url, s3_endpoint, tmp_path)
    stored = subprocess.run(
        [*SIGNBRIDGE, "notarytool", "store-credentials", "ci", *_key_args(api_key, state)],
        env=env, capture_output=True, text=True,
    )
    assert stored.returncode == 0, stored.stderr
    profile = tmp_path / "profiles" / "ci.json"
    assert stat.S_IMODE(profile.stat().st_mode) == 0o600
    assert api_key[0].read_text().splitlines()[1] not in stored.stdout
    listed = _run(["history", "--keychain-profile", "ci"], env)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.startswith("Successfully received submission history.")
    profile.chmod(0o644)
    refused = _run(["history", "-p", "ci"], env)
    assert refused.returncode == 2 and "chmod 600" in refused.stderr


def test_credentials_from_environment_and_errors(tmp_path, api_key, notary, s3_endpoint):
    state, url = notary
    env = _env(url, s3_endpoint, tmp_path, SIGNBRIDGE_NOTARY_KEY=str(api_key[0]),
               SIGNBRIDGE_NOTARY_KEY_ID=state.key_id, SIGNBRIDGE_NOTARY_ISSUER=state.issuer)
    assert _run(["history"], env).returncode == 0
    env.pop("SIGNBRIDGE_NOTARY_ISSUER")
    missing = _run(["history"], env)
    assert missing.returncode == 2 and "--issuer missing" in missing.stderr
    rsa_like = tmp_path / "not-a-key.p8"
    rsa_like.write_text("hello")
    bad = _run(["history", "--key", str(rsa_like), "--key-id", "K", "--issuer", "I"], _env(url, s3_endpoint, tmp_path))
    assert bad.returncode == 2 and "not an unencrypted PKCS#8 private key" in bad.stderr
    other = ApiKey(state.key_id, state.issuer, ec.generate_private_key(ec.SECP256R1()))
    with NotaryClient(other, base_url=f"{url}/notary/v2") as client, pytest.raises(NotaryError, match="HTTP 401"):
        client.history()
    assert "redacted" in repr(other)


def test_submit_runs_the_preflight_first(tmp_path, api_key, notary, s3_endpoint):
    state, url = notary
    archive = tmp_path / "Broken.zip"
    archive.write_bytes(b"PK\x03\x04 this is no zip archive")
    result = _run(["submit", str(archive), *_key_args(api_key, state)], _env(url, s3_endpoint, tmp_path))
    assert result.returncode == 1
    assert f"{archive}: The archive could not be read." in result.stderr
    assert "nothing was uploaded" in result.stderr
    assert state.submissions == {}


def test_submit_wait_staple_a_real_package(tmp_path, api_key, notary, s3_endpoint):
    """The whole pipeline on Apple's own output: pre-flight (Apple Root CA as anchor), upload, wait,
    then the ticket fetched from the delivery service and stapled: the result is the package Apple's
    stapler wrote, byte for byte."""
    state, url = notary
    package = copy_item(UNSTAPLED_117, tmp_path)
    state.tickets["2/1/ec40ccf8aa6f133ebdce5bf150057001ff97bf21"] = trailer_ticket(corpus_item(STAPLED_117))
    env = _env(url, s3_endpoint, tmp_path, SIGNBRIDGE_ANCHORS=str(APPLE_ROOT),
               SIGNBRIDGE_TICKET_LOOKUP_URL=f"{url}/database/1/com.apple.gk.ticket-delivery/production/public/records/lookup")
    result = _run(["submit", str(package), *_key_args(api_key, state), "--wait", "--staple"], env)
    assert result.returncode == 0, result.stderr
    assert "status: Accepted" in result.stdout and "The staple and validate action worked!" in result.stdout
    assert package.read_bytes() == corpus_item(STAPLED_117).read_bytes()


def test_token_verifies_with_openssl(tmp_path, api_key):
    """The ES256 JWT checked by an independent verifier: openssl, over header.claims, with the
    raw r||s signature turned back into DER."""
    import base64

    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    from conftest import require_tool, run

    key = resolve_api_key(key=str(api_key[0]), key_id="ABC123DEFG", issuer="issuer-uuid")
    head, body, signature = key.token(lifetime=600).split(".")
    raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    assert len(raw) == 64
    (tmp_path / "sig.der").write_bytes(
        encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    )
    (tmp_path / "signed.txt").write_bytes(f"{head}.{body}".encode())
    (tmp_path / "pub.pem").write_bytes(
        api_key[1].public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    checked = run([require_tool("openssl"), "dgst", "-sha256", "-verify", str(tmp_path / "pub.pem"),
                   "-signature", str(tmp_path / "sig.der"), str(tmp_path / "signed.txt")], text=True)
    assert "Verified OK" in checked.stdout
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    assert claims["aud"] == "appstoreconnect-v1" and claims["exp"] - claims["iat"] == 600
    with pytest.raises(CredentialsError, match="at most 1200 seconds"):
        key.token(lifetime=1201)
