"""The service on its other backends: PostgreSQL for the database, SoftHSM2 for the keys."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_tool, run
from postgreskit import postgres_server
from servicekit import demo_service
from softhsm import create_softhsm_token

H = hashlib.sha256(b"backend").digest()


def _sign_and_verify_everything(svc, tmp_path: Path) -> None:  # noqa: ANN001
    require_tool("openssl")
    (tmp_path / "digest").write_bytes(H)
    for policy, data, opts in (
        ("release-signing", {"signatureAlgorithm": "Rsa", "rsaOptions": {"hashAlgorithmName": "Sha256"}}, ["digest:sha256"]),
        ("installer-signing", {"signatureAlgorithm": "Rsa", "rsaOptions": {"hashAlgorithmName": "Sha256", "paddingMode": "Pss"}},
         ["digest:sha256", "rsa_padding_mode:pss", "rsa_pss_saltlen:digest"]),
        ("ecdsa-signing", {"signatureAlgorithm": "Ecdsa", "ecdsaOptions": {"signatureFormat": "Asn1"}}, []),
    ):
        response = svc.sign_hash(policy, {"hash": base64.b64encode(H).decode(), **data})
        assert response.status_code == 200, response.text
        (tmp_path / "sig").write_bytes(base64.b64decode(response.json()["hashSigningResult"]["signature"]))
        args = ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(svc.public_key_pem(policy, tmp_path)),
                "-in", str(tmp_path / "digest"), "-sigfile", str(tmp_path / "sig")]
        for opt in opts:
            args += ["-pkeyopt", opt]
        assert b"Signature Verified Successfully" in run(args).stdout


def test_postgresql(tmp_path: Path) -> None:
    with postgres_server() as url, demo_service(tmp_path, database_url=url, workers=2) as svc:
        assert svc.info["databaseUrl"].startswith("postgresql://")
        assert not (svc.data_dir / "signbridge.db").exists()
        _sign_and_verify_everything(svc, tmp_path)
        result = json.loads(svc.admin("audit", "verify", "--json").stdout)
        assert result["ok"] and result["records"] == 3


def test_softhsm_keystore(tmp_path: Path) -> None:
    token = create_softhsm_token(tmp_path / "hsm")
    env = {**token.env, "SIGNBRIDGE_TEST_PIN": token.pin}
    init_args = ("--keystore", "pkcs11", "--pkcs11-module", token.module, "--pkcs11-token-label", token.label,
                 "--pkcs11-pin-env", "SIGNBRIDGE_TEST_PIN")
    with demo_service(tmp_path, init_args=init_args, env=env) as svc:
        assert "PKCS#11" in svc.info["keystore"] and token.pin not in json.dumps(svc.info)
        settings = json.loads((svc.data_dir / "server.json").read_text())
        assert settings["keystore"]["backend"] == "pkcs11" and token.pin not in json.dumps(settings)
        assert not (svc.data_dir / "keys").exists()  # no key material on disk
        _sign_and_verify_everything(svc, tmp_path)
        # The keys are on the token, non-extractable, as pkcs11-tool (an independent reader) sees them.
        listing = run(["pkcs11-tool", "--module", token.module, "--token-label", token.label, "--login", "--pin", token.pin,
                       "--list-objects", "--type", "privkey"], env={**os.environ, **token.env}).stdout.decode()
        assert listing.count("Private Key Object") == 7  # root, intermediate, three policies, TSA, audit checkpoints
        assert "signbridge/audit-checkpoints" in listing
        assert "never extractable" in listing
        assert token.pin not in svc.log_text()


@pytest.mark.parametrize("bad", ["missing-env", "wrong-pin"])
def test_softhsm_bad_pin_is_a_clear_error(tmp_path: Path, bad: str) -> None:
    token = create_softhsm_token(tmp_path / "hsm")
    env = dict(token.env)
    if bad == "wrong-pin":
        env["SIGNBRIDGE_TEST_PIN"] = "99999999"
    proc = subprocess.run(
        [sys.executable, "-m", "signbridge", "server", "init", "--demo", "--data-dir", str(tmp_path / "data"), "--keystore", "pkcs11",
         "--pkcs11-module", token.module, "--pkcs11-token-label", token.label, "--pkcs11-pin-env", "SIGNBRIDGE_TEST_PIN"],
        capture_output=True, text=True, env={**os.environ, **env}, check=False,
    )
    assert proc.returncode != 0
    assert proc.stderr.startswith("signbridge: error:") and "Traceback" not in proc.stderr
    assert "99999999" not in proc.stderr and token.pin not in proc.stderr
