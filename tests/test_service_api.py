"""The service's API against a real server on loopback; every signature checked with openssl."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from conftest import require_tool, run
from servicekit import DemoService, demo_service


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory):
    with demo_service(tmp_path_factory.mktemp("svc")) as service:
        yield service


def openssl_verify(pub: Path, digest: bytes, signature: bytes, tmp: Path, *pkeyopts: str) -> None:
    require_tool("openssl")
    (tmp / "digest.bin").write_bytes(digest)
    (tmp / "sig.bin").write_bytes(signature)
    args = ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(pub), "-in", str(tmp / "digest.bin"),
            "-sigfile", str(tmp / "sig.bin")]
    for option in pkeyopts:
        args += ["-pkeyopt", option]
    proc = run(args)
    assert "Signature Verified Successfully" in proc.stdout.decode()


def ieee_to_der(signature: bytes) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    half = len(signature) // 2
    return encode_dss_signature(int.from_bytes(signature[:half], "big"), int.from_bytes(signature[half:], "big"))


def test_healthz_and_openapi(svc: DemoService) -> None:
    assert httpx.get(f"{svc.api_url}/healthz").text == "Healthy"
    document = httpx.get(f"{svc.api_url}/swagger/v1/swagger.json").json()
    assert document["openapi"].startswith("3.")
    assert "/v1/{organizationId}/SigningRequests/SignHash" in document["paths"]
    assert "/v1/{organizationId}/Cryptoki/MySigningPolicies" in document["paths"]
    assert {"/healthz", "/readyz", "/metrics"} <= set(document["paths"])
    assert httpx.get(f"{svc.api_url}/readyz").json() == {"status": "ready", "checks": {"database": "ok", "keystore": "ok"}}


def test_my_signing_policies_shape(svc: DemoService) -> None:
    policies = svc.policies()
    assert set(policies) == {"release-signing", "installer-signing", "ecdsa-signing"}
    release = policies["release-signing"]
    for key in ("signingPolicyId", "signingPolicySlug", "projectSlug", "certificateBytes", "publicKeyBytes",
                "keyType", "keySizeInBits", "rsaParameters", "certificateType", "certificateChain"):
        assert key in release, key
    assert release["keyType"] == "Rsa" and release["keySizeInBits"] == 2048 and release["certificateType"] == "X509"
    assert release["publicKeyBytes"].startswith("MIIBCgKCAQEA")  # PKCS#1 RSAPublicKey, as SignPath sends it
    assert release["rsaParameters"]["publicExponent"] == "AQAB"
    certificate = svc.certificate("release-signing")
    public = certificate.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    modulus = int.from_bytes(base64.b64decode(release["rsaParameters"]["modulus"]), "big")
    assert modulus == public.public_numbers().n
    assert "Developer ID Application: Demo Corp (DEMOTEAM01)" in certificate.subject.rfc4514_string()
    assert policies["ecdsa-signing"]["keyType"] == "Ecdsa" and policies["ecdsa-signing"]["keySizeInBits"] == 256


def test_chain_verifies_with_openssl(svc: DemoService, tmp_path: Path) -> None:
    release = svc.policies()["release-signing"]
    chain = [base64.b64decode(der) for der in release["certificateChain"]]
    assert len(chain) == 2  # intermediate, root
    (tmp_path / "leaf.pem").write_text(ssl.DER_cert_to_PEM_cert(base64.b64decode(release["certificateBytes"])))
    (tmp_path / "inter.pem").write_text(ssl.DER_cert_to_PEM_cert(chain[0]))
    # Apple marks the leaf markers critical; the demo's are not, so that Java accepts jars they sign
    # (and openssl verifies the chain without -ignore_critical).
    proc = run(["openssl", "verify", "-CAfile", str(svc.root_pem), "-untrusted",
                str(tmp_path / "inter.pem"), "-purpose", "any", str(tmp_path / "leaf.pem")])
    assert b": OK" in proc.stdout
    text = run(["openssl", "x509", "-in", str(tmp_path / "inter.pem"), "-noout", "-text"]).stdout.decode()
    assert "1.2.840.113635.100.6.2.6" in text
    leaf_text = run(["openssl", "x509", "-in", str(tmp_path / "leaf.pem"), "-noout", "-text"]).stdout.decode()
    assert "1.2.840.113635.100.6.1.13:" in leaf_text and "1.2.840.113635.100.6.1.13: critical" not in leaf_text
    assert "Code Signing" in leaf_text


@pytest.mark.parametrize(
    ("hash_name", "padding", "pkeyopts"),
    [
        ("Sha256", "Pkcs1", ["digest:sha256"]),
        ("Sha384", "Pkcs1", ["digest:sha384"]),
        ("Sha512", "Pkcs1", ["digest:sha512"]),
        ("Sha1", "Pkcs1", ["digest:sha1"]),
        ("Sha256", "Pss", ["digest:sha256", "rsa_padding_mode:pss", "rsa_pss_saltlen:digest", "rsa_mgf1_md:sha256"]),
        ("Sha512", "Pss", ["digest:sha512", "rsa_padding_mode:pss", "rsa_pss_saltlen:digest", "rsa_mgf1_md:sha512"]),
    ],
)
def test_sign_hash_rsa(svc: DemoService, tmp_path: Path, hash_name: str, padding: str, pkeyopts: list[str]) -> None:
    digest = hashlib.new(hash_name.lower(), b"payload " + hash_name.encode() + padding.encode()).digest()
    response = svc.sign_hash(
        "release-signing",
        {"hash": base64.b64encode(digest).decode(), "signatureAlgorithm": "Rsa",
         "rsaOptions": {"hashAlgorithmName": hash_name, "paddingMode": padding}},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["hashSigningData"]["hash"] == base64.b64encode(digest).decode()
    assert len(body["signingRequestId"]) == 36
    signature = base64.b64decode(body["hashSigningResult"]["signature"])
    assert len(signature) == 256
    openssl_verify(svc.public_key_pem("release-signing", tmp_path), digest, signature, tmp_path, *pkeyopts)


def test_sign_hash_rsa_by_oid(svc: DemoService, tmp_path: Path) -> None:
    digest = hashlib.sha384(b"by oid").digest()
    response = svc.sign_hash(
        "installer-signing",
        {"hash": base64.b64encode(digest).decode(), "signatureAlgorithm": "Rsa",
         "rsaOptions": {"hashAlgorithmOid": "2.16.840.1.101.3.4.2.2"}},
    )
    assert response.status_code == 200, response.text
    signature = base64.b64decode(response.json()["hashSigningResult"]["signature"])
    openssl_verify(svc.public_key_pem("installer-signing", tmp_path), digest, signature, tmp_path, "digest:sha384")


@pytest.mark.parametrize("fmt", ["Ieee", "Asn1", None])
def test_sign_hash_ecdsa(svc: DemoService, tmp_path: Path, fmt: str | None) -> None:
    digest = hashlib.sha256(f"ecdsa {fmt}".encode()).digest()
    data: dict = {"hash": base64.b64encode(digest).decode(), "signatureAlgorithm": "Ecdsa"}
    if fmt:
        data["ecdsaOptions"] = {"signatureFormat": fmt}
    response = svc.sign_hash("ecdsa-signing", data)
    assert response.status_code == 200, response.text
    signature = base64.b64decode(response.json()["hashSigningResult"]["signature"])
    if fmt == "Asn1":
        assert signature[0] == 0x30
        der = signature
    else:
        assert len(signature) == 64  # IEEE P1363 r||s is the default
        der = ieee_to_der(signature)
    openssl_verify(svc.public_key_pem("ecdsa-signing", tmp_path), digest, der, tmp_path)


def test_fast_signing_request_as_jsign_sends_it(svc: DemoService, tmp_path: Path) -> None:
    digest = hashlib.sha256(b"jsign").digest()
    payload = {"SignatureAlgorithm": "RsaPkcs1", "RsaHashAlgorithm": "2.16.840.1.101.3.4.2.1",
               "Base64EncodedHash": base64.b64encode(digest).decode()}
    response = httpx.post(
        f"{svc.api_url.replace('/Api', '/API')}/v1/{svc.org}/SigningRequests",
        headers=svc.auth(),
        data={"ProjectSlug": "demo", "SigningPolicySlug": "release-signing", "IsFastSigningRequest": "true"},
        files={"Artifact": ("Artifact.data", json.dumps(payload).encode(), "application/octet-stream")},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert {k: body[k] for k in payload} == payload
    openssl_verify(svc.public_key_pem("release-signing", tmp_path), digest, base64.b64decode(body["Signature"]),
                   tmp_path, "digest:sha256")


def test_fast_signing_request_ecdsa_asn1_with_metadata(svc: DemoService, tmp_path: Path) -> None:
    digest = hashlib.sha256(b"provider").digest()
    payload = {"SignatureAlgorithm": "Ecdsa", "EcdsaSignatureFormat": "Asn1", "Base64EncodedHash": base64.b64encode(digest).decode(),
               "Metadata": {"CreatingProcess": {"CommandLine": "osslsigncode sign", "User": "builder"}}}
    response = httpx.post(
        svc.url("SigningRequests"),
        headers=svc.auth(),
        data={"projectSlug": "demo", "signingPolicySlug": "ecdsa-signing", "isFastSigningRequest": "true"},
        files={"Artifact": ("payload.json", json.dumps(payload).encode(), "application/json")},
    )
    assert response.status_code == 200, response.text
    openssl_verify(svc.public_key_pem("ecdsa-signing", tmp_path), digest, base64.b64decode(response.json()["Signature"]), tmp_path)
    records = json.loads(svc.admin("audit", "list", "--json", "--limit", "100000").stdout)
    assert any(r["client_metadata"] and "osslsigncode sign" in r["client_metadata"] for r in records)


def test_routes_ignore_case(svc: DemoService) -> None:
    response = httpx.get(f"{svc.api_url.replace('/Api', '/api')}/v1/{svc.org.upper()}/cryptoki/mysigningpolicies", headers=svc.auth())
    assert response.status_code == 200
    assert len(response.json()["signingPolicies"]) == 3


def test_filters(svc: DemoService) -> None:
    response = httpx.get(svc.url("Cryptoki/MySigningPolicies"), params={"projectSlug": "demo", "signingPolicySlug": "ecdsa-signing"},
                         headers=svc.auth())
    assert [p["signingPolicySlug"] for p in response.json()["signingPolicies"]] == ["ecdsa-signing"]


def test_timestamp_authority_with_openssl(svc: DemoService, tmp_path: Path) -> None:
    require_tool("openssl")
    data = tmp_path / "data.txt"
    data.write_bytes(os.urandom(1000))
    for algorithm in ("sha256", "sha384", "sha512"):
        query = tmp_path / f"q-{algorithm}.tsq"
        run(["openssl", "ts", "-query", "-data", str(data), f"-{algorithm}", "-cert", "-out", str(query)])
        response = httpx.post(f"{svc.api_url}/timestamp", content=query.read_bytes(),
                              headers={"Content-Type": "application/timestamp-query"})
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/timestamp-reply"
        reply = tmp_path / f"r-{algorithm}.tsr"
        reply.write_bytes(response.content)
        text = run(["openssl", "ts", "-reply", "-in", str(reply), "-text"]).stdout.decode()
        assert "Status: Granted." in text
        assert f"Hash Algorithm: {algorithm}" in text
        proc = run(["openssl", "ts", "-verify", "-queryfile", str(query), "-in", str(reply), "-CAfile", str(svc.root_pem)])
        assert b"Verification: OK" in proc.stdout
        run(["openssl", "ts", "-verify", "-data", str(data), "-in", str(reply), "-CAfile", str(svc.root_pem)])


def test_timestamp_tampered_reply_fails_openssl(svc: DemoService, tmp_path: Path) -> None:
    data = tmp_path / "data.txt"
    data.write_bytes(b"tamper me")
    query = tmp_path / "q.tsq"
    run(["openssl", "ts", "-query", "-data", str(data), "-sha256", "-cert", "-out", str(query)])
    reply = bytearray(httpx.post(f"{svc.api_url}/timestamp", content=query.read_bytes(),
                                 headers={"Content-Type": "application/timestamp-query"}).content)
    reply[-40] ^= 0x01  # inside the signature
    (tmp_path / "bad.tsr").write_bytes(bytes(reply))
    proc = subprocess.run(["openssl", "ts", "-verify", "-queryfile", str(query), "-in", str(tmp_path / "bad.tsr"),
                           "-CAfile", str(svc.root_pem)], capture_output=True)
    assert proc.returncode != 0


def test_no_secret_in_responses_or_log(svc: DemoService) -> None:
    for response in (
        httpx.get(svc.url("Cryptoki/MySigningPolicies"), headers=svc.auth()),
        svc.sign_hash("release-signing", {"hash": "!!", "signatureAlgorithm": "Rsa"}),
        svc.sign_hash("nope", {"hash": "AA==", "signatureAlgorithm": "Rsa"}),
    ):
        assert svc.token not in response.text
    assert svc.token not in svc.log_text()
    assert svc.token not in svc.admin("audit", "export", "--json").stdout
