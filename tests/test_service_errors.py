"""Unauthorized callers and bad input: exact status and problem type, never a 500, always audited."""

from __future__ import annotations

import base64
import json
import re

import httpx
import pytest

from servicekit import DemoService, demo_service

T400 = "https://tools.ietf.org/html/rfc9110#section-15.5.1"
T401 = "https://tools.ietf.org/html/rfc9110#section-15.5.2"
T403 = "https://tools.ietf.org/html/rfc9110#section-15.5.4"
T404 = "https://tools.ietf.org/html/rfc9110#section-15.5.5"
T413 = "https://tools.ietf.org/html/rfc9110#section-15.5.14"
T415 = "https://tools.ietf.org/html/rfc9110#section-15.5.16"
T429 = "https://tools.ietf.org/html/rfc6585#section-4"

H32 = base64.b64encode(bytes(range(32))).decode()
GOOD = {"hash": H32, "signatureAlgorithm": "Rsa", "rsaOptions": {"hashAlgorithmName": "Sha256"}}


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory):
    with demo_service(tmp_path_factory.mktemp("errors")) as service:
        # A second user in the same organization who is no submitter, and a second organization.
        service.admin("user", "create", "outsider")
        outsider = json.loads(service.admin("token", "create", "outsider", "--json").stdout)["apiToken"]
        service.admin("org", "create", "Other Org")
        service.admin("user", "create", "--org", "Other Org", "other-ci")
        other = json.loads(service.admin("token", "create", "--org", "Other Org", "other-ci", "--json").stdout)["apiToken"]
        revoked = json.loads(service.admin("token", "create", "--org", "Demo Corp", "demo-ci", "--json").stdout)
        service.admin("token", "revoke", revoked["tokenId"])
        service.tokens = {"outsider": outsider, "other": other, "revoked": revoked["apiToken"]}  # type: ignore[attr-defined]
        yield service


def problem(response: httpx.Response, status: int, problem_type: str, detail: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["type"] == problem_type and body["status"] == status and body["title"]
    if detail is not None:
        assert re.search(detail, body["detail"]), body["detail"]
    return body


AUTH_CASES = [
    ("no header", None, 401, T401, "No API token"),
    ("basic scheme", "Basic dXNlcjpwYXNz", 401, T401, "Bearer"),
    ("unknown token", "Bearer " + "A" * 44, 401, T401, "not valid"),
    ("garbage token", "Bearer not-a-token", 401, T401, "not valid"),
    ("revoked", "revoked", 401, T401, "revoked"),
    ("other organization", "other", 403, T403, "not a member of organization"),
]


@pytest.mark.parametrize(("name", "header", "status", "problem_type", "detail"), AUTH_CASES, ids=[c[0] for c in AUTH_CASES])
def test_unauthorized_sign_hash(svc: DemoService, name: str, header: str | None, status: int, problem_type: str, detail: str) -> None:
    headers = {}
    if header is not None:
        headers["Authorization"] = header if " " in header else f"Bearer {svc.tokens[header]}"  # type: ignore[attr-defined]
    body = {"projectSlug": "demo", "signingPolicySlug": "release-signing", "hashSigningData": GOOD}
    response = httpx.post(svc.url("SigningRequests/SignHash"), json=body, headers=headers)
    problem(response, status, problem_type, detail)
    response = httpx.get(svc.url("Cryptoki/MySigningPolicies"), headers=headers)
    problem(response, status, problem_type, detail)


def test_not_a_submitter(svc: DemoService) -> None:
    token = svc.tokens["outsider"]  # type: ignore[attr-defined]
    body = problem(svc.sign_hash("release-signing", GOOD, token=token), 403, T403, "not a submitter on signing policy demo/release-signing")
    assert "outsider" in body["detail"]
    assert svc.policies(token) == {}
    response = httpx.get(svc.url("Cryptoki/MySigningPolicies"), headers=svc.auth(token), params={"projectSlug": "demo"})
    assert response.json() == {"signingPolicies": []}


def test_group_membership_grants_access(svc: DemoService) -> None:
    svc.admin("user", "create", "--org", "Demo Corp", "via-group")
    token = json.loads(svc.admin("token", "create", "--org", "Demo Corp", "via-group", "--json").stdout)["apiToken"]
    problem(svc.sign_hash("ecdsa-signing", {"hash": H32, "signatureAlgorithm": "Ecdsa"}, token=token), 403, T403)
    svc.admin("group", "create", "--org", "Demo Corp", "signers")
    svc.admin("group", "add-member", "--org", "Demo Corp", "signers", "via-group")
    svc.admin("submitter", "add", "--org", "Demo Corp", "--project", "demo", "--policy", "ecdsa-signing", "--group", "signers")
    assert svc.sign_hash("ecdsa-signing", {"hash": H32, "signatureAlgorithm": "Ecdsa"}, token=token).status_code == 200
    assert list(svc.policies(token)) == ["ecdsa-signing"]
    svc.admin("submitter", "remove", "--org", "Demo Corp", "--project", "demo", "--policy", "ecdsa-signing", "--group", "signers")
    problem(svc.sign_hash("ecdsa-signing", {"hash": H32, "signatureAlgorithm": "Ecdsa"}, token=token), 403, T403)


def test_expired_token(svc: DemoService) -> None:
    created = json.loads(svc.admin("token", "create", "--org", "Demo Corp", "demo-ci", "--expires-in-days", "1", "--json").stdout)
    assert svc.sign_hash("release-signing", GOOD, token=created["apiToken"]).status_code == 200
    import sqlite3

    with sqlite3.connect(svc.data_dir / "signbridge.db") as db:
        db.execute("UPDATE api_tokens SET expires_at = '2020-01-01 00:00:00.000000' WHERE id = ?", (created["tokenId"],))
    problem(svc.sign_hash("release-signing", GOOD, token=created["apiToken"]), 401, T401, "expired")


def test_unknown_project_and_policy(svc: DemoService) -> None:
    problem(svc.sign_hash("release-signing", GOOD, project="nope"), 404, T404, "no project with the slug 'nope'")
    problem(svc.sign_hash("nope", GOOD), 404, T404, "no signing policy with the slug 'nope'")
    response = httpx.get(svc.url("Cryptoki/MySigningPolicies"), headers=svc.auth(), params={"signingPolicySlug": "nope"})
    problem(response, 404, T404)


BAD_HASH_DATA = [
    ("bad base64", {"hash": "!!!not base64", "signatureAlgorithm": "Rsa", "rsaOptions": {"hashAlgorithmName": "Sha256"}}, "not valid base64"),
    ("wrong length", {"hash": base64.b64encode(b"x" * 31).decode(), "signatureAlgorithm": "Rsa",
                      "rsaOptions": {"hashAlgorithmName": "Sha256"}}, "does not match the given hash"),
    ("sha512 length for sha256", {"hash": base64.b64encode(b"x" * 64).decode(), "signatureAlgorithm": "Rsa",
                                  "rsaOptions": {"hashAlgorithmName": "Sha256"}}, "does not match"),
    ("unknown hash name", {**GOOD, "rsaOptions": {"hashAlgorithmName": "Sha3"}}, "unknown hash algorithm"),
    ("unknown hash OID", {**GOOD, "rsaOptions": {"hashAlgorithmOid": "1.2.3.4"}}, "unknown hash algorithm OID"),
    ("no hash algorithm", {"hash": H32, "signatureAlgorithm": "Rsa"}, "hash algorithm is required"),
    ("unknown algorithm", {**GOOD, "signatureAlgorithm": "Dsa"}, "Unsupported signature algorithm"),
    ("ML-DSA", {**GOOD, "signatureAlgorithm": "Mldsa"}, "Unsupported signature algorithm"),
    ("unknown padding", {**GOOD, "rsaOptions": {"hashAlgorithmName": "Sha256", "paddingMode": "Oaep"}}, "padding"),
    ("ecdsa on RSA key", {"hash": H32, "signatureAlgorithm": "Ecdsa"}, "RSA key"),
    ("missing hash", {"signatureAlgorithm": "Rsa"}, "hash field is required"),
    ("hash not a string", {**GOOD, "hash": 12}, "must be a string"),
]


@pytest.mark.parametrize(("name", "data", "detail"), BAD_HASH_DATA, ids=[c[0] for c in BAD_HASH_DATA])
def test_bad_hash_signing_data(svc: DemoService, name: str, data: dict, detail: str) -> None:
    body = problem(svc.sign_hash("release-signing", data), 400, T400, detail)
    assert body["title"] == "One or more validation errors occurred."
    assert isinstance(body["errors"], dict)


def test_rsa_algorithm_on_ecdsa_key(svc: DemoService) -> None:
    problem(svc.sign_hash("ecdsa-signing", GOOD), 400, T400, "ECDSA key")


def test_bad_ecdsa_format(svc: DemoService) -> None:
    problem(svc.sign_hash("ecdsa-signing", {"hash": H32, "signatureAlgorithm": "Ecdsa", "ecdsaOptions": {"signatureFormat": "Raw"}}),
            400, T400, "ECDSA signature format")


@pytest.mark.parametrize(
    ("content", "detail"),
    [(b"{not json", "not valid JSON"), (b"[1,2]", "JSON object"), (b"\xff\xfe", "not valid JSON"),
     (json.dumps({"projectSlug": "demo"}).encode(), "signingPolicySlug field is required"),
     (json.dumps({"projectSlug": "demo", "signingPolicySlug": "release-signing"}).encode(), "hashSigningData")],
)
def test_malformed_json(svc: DemoService, content: bytes, detail: str) -> None:
    response = httpx.post(svc.url("SigningRequests/SignHash"), content=content,
                          headers={**svc.auth(), "Content-Type": "application/json"})
    problem(response, 400, T400, detail)


def test_oversized_body(svc: DemoService) -> None:
    body = {"projectSlug": "demo", "signingPolicySlug": "release-signing", "hashSigningData": {**GOOD, "metadata": {"x": "y" * 2_000_000}}}
    problem(httpx.post(svc.url("SigningRequests/SignHash"), json=body, headers=svc.auth()), 413, T413)

    def chunked():
        yield b'{"projectSlug": "'
        for _ in range(300):
            yield b"a" * 8192
    response = httpx.post(svc.url("SigningRequests/SignHash"), content=chunked(), headers={**svc.auth(), "Content-Type": "application/json"})
    problem(response, 413, T413)


def test_metadata_too_large(svc: DemoService) -> None:
    problem(svc.sign_hash("release-signing", {**GOOD, "metadata": {"x": "y" * 20_000}}), 400, T400, "metadata")


MULTIPART_CASES = [
    ("not fast", {"ProjectSlug": "demo", "SigningPolicySlug": "release-signing", "IsFastSigningRequest": "false"}, True, "fast signing"),
    ("no artifact", {"ProjectSlug": "demo", "SigningPolicySlug": "release-signing", "IsFastSigningRequest": "true"}, False, "Artifact"),
    ("no project", {"SigningPolicySlug": "release-signing", "IsFastSigningRequest": "true"}, True, "ProjectSlug"),
]


@pytest.mark.parametrize(("name", "fields", "with_artifact", "detail"), MULTIPART_CASES, ids=[c[0] for c in MULTIPART_CASES])
def test_bad_fast_signing_request(svc: DemoService, name: str, fields: dict, with_artifact: bool, detail: str) -> None:
    payload = {"SignatureAlgorithm": "RsaPkcs1", "RsaHashAlgorithm": "2.16.840.1.101.3.4.2.1", "Base64EncodedHash": H32}
    files = {"Artifact": ("payload.json", json.dumps(payload).encode())} if with_artifact else {"Other": ("x", b"1")}
    problem(httpx.post(svc.url("SigningRequests"), headers=svc.auth(), data=fields, files=files), 400, T400, detail)


def test_fast_signing_request_bad_payloads(svc: DemoService) -> None:
    fields = {"ProjectSlug": "demo", "SigningPolicySlug": "release-signing", "IsFastSigningRequest": "true"}
    for payload, detail in (
        (b"not json", "not valid JSON"),
        (json.dumps({"SignatureAlgorithm": "RsaPkcs1", "RsaHashAlgorithm": "9.9.9", "Base64EncodedHash": H32}).encode(), "OID"),
        (json.dumps({"SignatureAlgorithm": "RsaPkcs1", "RsaHashAlgorithm": "2.16.840.1.101.3.4.2.3",
                     "Base64EncodedHash": H32}).encode(), "does not match the given hash"),
    ):
        response = httpx.post(svc.url("SigningRequests"), headers=svc.auth(), data=fields, files={"Artifact": ("payload.json", payload)})
        problem(response, 400, T400, detail)


def test_malformed_multipart(svc: DemoService) -> None:
    response = httpx.post(svc.url("SigningRequests"), headers={**svc.auth(), "Content-Type": "multipart/form-data; boundary=xyz"},
                          content=b"--xyz\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nvalue-without-end")
    assert response.status_code == 400, response.text
    response = httpx.post(svc.url("SigningRequests"), headers={**svc.auth(), "Content-Type": "application/json"}, content=b"{}")
    problem(response, 415, T415)


def test_timestamp_errors(svc: DemoService) -> None:
    problem(httpx.post(f"{svc.api_url}/timestamp", content=b"x", headers={"Content-Type": "text/plain"}), 415, T415)
    problem(httpx.post(f"{svc.api_url}/timestamp", content=b"x" * 70000,
                       headers={"Content-Type": "application/timestamp-query"}), 413, T413)
    response = httpx.post(f"{svc.api_url}/timestamp", content=b"garbage", headers={"Content-Type": "application/timestamp-query"})
    assert response.status_code == 200  # RFC 3161: a rejection is a TimeStampResp with status rejection
    assert response.content[:2] == b"\x30\x80" or response.content[0] == 0x30


def test_unknown_route_and_method(svc: DemoService) -> None:
    problem(httpx.get(f"{svc.api_url}/v1/{svc.org}/Nothing"), 404, T404)
    assert httpx.get(svc.url("SigningRequests/SignHash")).status_code == 405


def test_every_attempt_is_audited(svc: DemoService) -> None:
    records = json.loads(svc.admin("audit", "list", "--json", "--limit", "100000").stdout)
    outcomes = {r["outcome"] for r in records}
    assert {"granted", "denied", "rejected"} <= outcomes
    statuses = {r["status"] for r in records}
    assert {200, 400, 401, 403, 404, 413} <= statuses
    denied = [r for r in records if r["status"] == 403 and r["user_name"] == "outsider"]
    assert denied and denied[0]["policy_slug"] == "release-signing" and "not a submitter" in denied[0]["reason"]
    assert "intact" in svc.admin("audit", "verify").stdout


def test_no_secret_in_log_or_audit(svc: DemoService) -> None:
    log = svc.log_text()
    export = svc.admin("audit", "export", "--json").stdout
    for token in [svc.token, *svc.tokens.values()]:  # type: ignore[attr-defined]
        assert token not in log and token not in export
    assert "Traceback" not in log  # bad input never reached an unhandled exception


def test_rate_limit(tmp_path) -> None:
    data_dir = tmp_path / "data"
    from servicekit import init_demo
    from signbridge.server.process import ServiceProcess

    info = init_demo(data_dir)
    settings = json.loads((data_dir / "server.json").read_text())
    settings["rateLimitPerMinute"] = 5
    (data_dir / "server.json").write_text(json.dumps(settings))
    with ServiceProcess(data_dir) as process:
        url = f"{process.api_url}/v1/{info['organizationId']}/SigningRequests/SignHash"
        headers = {"Authorization": f"Bearer {info['apiToken']}"}
        body = {"projectSlug": "demo", "signingPolicySlug": "release-signing", "hashSigningData": GOOD}
        statuses = [httpx.post(url, json=body, headers=headers).status_code for _ in range(7)]
        assert statuses[:5] == [200] * 5
        limited = httpx.post(url, json=body, headers=headers)
        problem(limited, 429, T429, "Too many requests")
        assert int(limited.headers["Retry-After"]) >= 1
