"""Operating the service: Prometheus metrics summed over workers, readiness, JSON access and audit logs.

Every scrape is parsed by prometheus_client's own parser, and the counts are exact: they must match
the requests this test sent, whichever worker answered each one.
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from postgreskit import postgres_instance
from servicekit import demo_service
from signbridge.server.jsonlog import JsonLinesFormatter
from signbridge.server.process import free_port

pytestmark = pytest.mark.timeout(300)

RSA = {"signatureAlgorithm": "Rsa", "rsaOptions": {"hashAlgorithmName": "Sha256"}}
ECDSA = {"signatureAlgorithm": "Ecdsa", "ecdsaOptions": {"signatureFormat": "Asn1"}}


def _hash(i: int) -> str:
    return base64.b64encode(i.to_bytes(32, "big")).decode()


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def signing(samples: dict, outcome: str, org: str = "", project: str = "", policy: str = "", algorithm: str = "") -> float:
    return value(samples, "signbridge_signing_requests_total", organization=org, project=project, policy=policy,
                 algorithm=algorithm, outcome=outcome)


def test_metrics_across_workers_json_logs_and_a_separate_address(tmp_path: Path) -> None:
    metrics_port = free_port()
    run_args = ("--log-format", "json", "--audit-log", "--access-log", "--metrics-address", f"127.0.0.1:{metrics_port}")
    with demo_service(tmp_path, workers=2, run_args=run_args) as svc:
        operations = f"http://127.0.0.1:{metrics_port}/Api"
        ready = httpx.get(f"{operations}/readyz", timeout=10)
        assert ready.status_code == 200 and ready.json() == {"status": "ready", "checks": {"database": "ok", "keystore": "ok", "api": "ok"}}
        # On the API's own address there are neither metrics nor readiness once they have their own.
        assert httpx.get(f"{svc.api_url}/metrics").status_code == 404
        assert httpx.get(f"{svc.api_url}/readyz").status_code == 404

        for i in range(7):
            assert svc.sign_hash("release-signing", {"hash": _hash(i), **RSA}).status_code == 200
        for i in range(2):
            assert svc.sign_hash("ecdsa-signing", {"hash": _hash(i), **ECDSA}).status_code == 200
        for i in range(3):  # an unknown token: denied before anything in the request is believed
            assert svc.sign_hash("release-signing", {"hash": _hash(i), **RSA}, token="not-a-token").status_code == 401
        for _ in range(2):  # an authenticated caller, a policy that does not exist
            assert svc.sign_hash("no-such-policy", {"hash": _hash(0), **RSA}).status_code == 404
        assert svc.sign_hash("release-signing", {"hash": "not base64", **RSA}).status_code == 400

        samples = scrape(f"{operations}/metrics")
        org = svc.org
        assert signing(samples, "granted", org, "demo", "release-signing", "RsaPkcs1/Sha256") == 7
        assert signing(samples, "granted", org, "demo", "ecdsa-signing", "Ecdsa/Sha256/Asn1") == 2
        assert signing(samples, "denied") == 3
        assert signing(samples, "denied", org, "demo", "no-such-policy", "RsaPkcs1/Sha256") == 2
        assert sum(v for (name, labels), v in samples.items()
                   if name == "signbridge_signing_requests_total" and ("outcome", "rejected") in labels) == 1
        assert value(samples, "signbridge_http_responses_total", route="signhash", status="200") == 9
        assert value(samples, "signbridge_http_responses_total", route="signhash", status="401") == 3
        assert value(samples, "signbridge_http_request_duration_seconds_count", route="signhash") == 15
        assert value(samples, "signbridge_http_request_duration_seconds_bucket", route="signhash", le="+Inf") == 15
        commits = value(samples, "signbridge_audit_commit_seconds_count")
        assert 1 <= commits <= 15
        assert ("signbridge_audit_queue_depth", ()) in samples
        assert value(samples, "signbridge_audit_errors_total") == 0

        policies = svc.policies()
        assert set(policies) == {"release-signing", "installer-signing", "ecdsa-signing"}
        samples = scrape(f"{operations}/metrics")
        assert value(samples, "signbridge_http_responses_total", route="mysigningpolicies", status="200") == 1

    log_lines = svc.log_text().splitlines()
    events = [json.loads(line) for line in log_lines if line.startswith("{")]
    assert len(events) == len([line for line in log_lines if line.strip() and not line.startswith("signbridge ")])
    access = [e for e in events if e.get("event") == "access" and e["route"] == "signhash"]
    audit = [e for e in events if e.get("event") == "signing"]
    assert len(access) == 15 and {e["status"] for e in access} == {200, 400, 401, 404}
    assert all(e["durationMs"] > 0 and e["path"].startswith("/Api/v1/") for e in access)
    assert len(audit) == 15
    granted = [e for e in audit if e["outcome"] == "granted"]
    assert len(granted) == 9 and all(e["user"] == "demo-ci" and e["signingRequestId"] for e in granted)
    assert len({e["seq"] for e in audit}) == 15
    text = svc.log_text()
    assert svc.token not in text and "not-a-token" not in text and "Bearer" not in text


def test_rate_limit_and_keystore_errors_are_counted(tmp_path: Path) -> None:
    with demo_service(tmp_path, settings={"rateLimitPerMinute": 4}) as svc:
        # Keys the keystore can no longer read (no key has been used yet, so none is in memory).
        keys, hidden = svc.data_dir / "keys", tmp_path / "hidden-keys"
        keys.rename(hidden)
        keys.mkdir()
        failed = svc.sign_hash("ecdsa-signing", {"hash": _hash(0), **ECDSA})
        assert failed.status_code == 503, failed.text
        unready = httpx.get(f"{svc.api_url}/readyz", timeout=15)
        assert unready.status_code == 503 and unready.json()["checks"]["keystore"].startswith("unavailable: ")
        keys.rmdir()
        hidden.rename(keys)
        statuses = [svc.sign_hash("release-signing", {"hash": _hash(i), **RSA}).status_code for i in range(5)]
        assert statuses == [200, 200, 200, 429, 429]
        samples = scrape(f"{svc.api_url}/metrics")
        assert value(samples, "signbridge_keystore_errors_total", backend="software") == 1
        assert signing(samples, "failed", svc.org, "demo", "ecdsa-signing", "Ecdsa/Sha256/Asn1") == 1
        assert value(samples, "signbridge_rate_limit_rejections_total", organization=svc.org) == 2
        assert signing(samples, "granted", svc.org, "demo", "release-signing", "RsaPkcs1/Sha256") == 3
        assert signing(samples, "denied") == 2
        assert value(samples, "signbridge_http_responses_total", route="signhash", status="429") == 2
        assert value(samples, "signbridge_http_request_duration_seconds_count", route="metrics") == 0


def test_readiness_fails_while_the_database_is_unavailable(tmp_path: Path) -> None:
    with postgres_instance() as database, demo_service(tmp_path, database_url=database.url) as svc:
        ready = httpx.get(f"{svc.api_url}/readyz", timeout=15)
        assert ready.status_code == 200, ready.text
        database.stop()
        unready = httpx.get(f"{svc.api_url}/readyz", timeout=15)
        assert unready.status_code == 503
        body = unready.json()
        assert body["status"] == "unavailable" and body["checks"]["database"].startswith("unavailable: ")
        assert httpx.get(f"{svc.api_url}/healthz").status_code == 200  # alive, only not ready
        database.start()
        again = httpx.get(f"{svc.api_url}/readyz", timeout=15)
        assert again.status_code == 200, again.text


def test_json_lines_never_carry_credentials() -> None:
    record = logging.LogRecord(
        "signbridge.server", logging.ERROR, __file__, 1,
        "refused Authorization: Bearer abc.DEF-123 for pkcs11:object=k;pin-value=1234 at %s",
        ("postgresql://signbridge:s3cret@db/signbridge",), None,
    )  # fmt: skip
    record.fields = {"event": "x", "route": "signhash"}
    line = json.loads(JsonLinesFormatter().format(record))
    assert line["level"] == "error" and line["logger"] == "signbridge.server" and line["route"] == "signhash"
    assert "abc.DEF-123" not in line["message"] and "1234" not in line["message"] and "s3cret" not in line["message"]
    assert "Bearer ***" in line["message"] and "pin-value=***" in line["message"] and "signbridge:***@db" in line["message"]
