"""The main job: `signbridge demo` runs the whole path and says what it did."""

from __future__ import annotations

import re

from dmgkit import sevenzip_listing
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
        "jar signed.",
        'jarsigner -verify -strict: - Signed by "C=US, O=Demo Corp, OU=DEMOTEAM01, CN=Developer ID Application: Demo Corp (DEMOTEAM01)',
        'jarsigner -verify -strict: Timestamped by "C=US, O=Demo Corp, CN=Demo Corp Timestamp Authority"',
        "jarsigner -verify -strict: jar verified.",
        "MyApp.app: signed app bundle with Mach-O universal (x86_64 arm64) [com.democorp.MyApp]",
        "MyApp.app: valid on disk",
        "MyApp.app: satisfies its Designated Requirement",
        "Authority=Developer ID Application: Demo Corp (DEMOTEAM01)",
        "Runtime Version=11.0.0",
        "MyApp.dmg: signed disk image [MyApp]",
        "MyApp.dmg: valid on disk",
        "Format=disk image",
        "CodeDirectory v=20200 size=293 flags=0x0(none) hashes=1+6 location=embedded",
        'signing product with identity "Developer ID Installer: Demo Corp (DEMOTEAM01)"',
        "Wrote signed product archive to MyApp-signed.pkg",
        'Status: signed by a certificate trusted by "Demo Corp Root CA"',
        "Signed with a trusted timestamp on:",
        "Pre-flight for notarization: the app and the package",
        "No problems found.",
        "Pre-flight of the disk image",
        "MyApp.dmg/MyApp/MyApp.app/Contents/Frameworks/Demo.framework: The signature of the binary is invalid.",
        "audit log intact: 12 records, chain verified",
        "Done:",
    ):
        assert expected in out, (expected, out)
    assert "Traceback" not in proc.stderr
    # 7-Zip, an independent UDIF reader, still finds the signed app in the signed image.
    listed = [name for name, _ in sevenzip_listing(tmp_path / "MyApp.dmg")]
    assert "MyApp/MyApp.app/Contents/MacOS/MyApp" in listed
    # The demo never prints the API token it uses (44 base64url characters).
    assert not re.search(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{44}(?![A-Za-z0-9_-])", out)
