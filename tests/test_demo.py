"""The main job: `signbridge demo` runs the whole path and says what it did."""

from __future__ import annotations

import re

from servicekit import signbridge


def test_demo_runs_and_reports_each_step(tmp_path) -> None:
    proc = signbridge("demo", "--keep", str(tmp_path))
    out = proc.stdout
    for expected in (
        "Creating a data directory with the Demo Corp organization",
        "listening at http://127.0.0.1:",
        "demo/release-signing",
        "256-byte RsaPkcs1 signature verified against its certificate and chain",
        "64-byte Ecdsa signature verified",
        "verified against the demo root",
        "Token signbridge-demo is ready: 3 identities",
        '"Developer ID Application: Demo Corp (DEMOTEAM01)"',
        "3 valid identities found",
        "openssl dgst -verify with the certificate's public key: Verified OK",
        "token signbridge-demo stopped",
        "audit log intact: 4 records, chain verified",  # three SignHash calls and the one openssl made
        "Done:",
    ):
        assert expected in out, (expected, out)
    assert "Traceback" not in proc.stderr
    # The demo never prints the API token it uses (44 base64url characters).
    assert not re.search(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{44}(?![A-Za-z0-9_-])", out)
