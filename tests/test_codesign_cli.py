"""``signbridge codesign`` end to end: a child process, identities from real tokens on sockets
(tests/tokenkit.py), the demo signing service's timestamp authority, openssl as the verifier.

Messages and exit codes are Apple's: 0 success, 1 failure, 2 usage, 3 requirement not satisfied.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from asn1crypto import cms as asn1_cms
from cryptography import x509

import machofixtures
from bundlefixtures import build_myapp
from codesignkit import (
    cd_fields,
    cdhash,
    codesign,
    isolate_codesign,
    openssl_accepts,
    openssl_ts_verify,
    raw_signature,
    raw_signatures,
    snapshot,
)
from conftest import ROOT, require_tool
from servicekit import demo_service
from tokenkit import apple_pki, serve_token


@pytest.fixture(scope="session")
def fx(tmp_path_factory: pytest.TempPathFactory):
    return machofixtures.get_fixtures(tmp_path_factory)


@pytest.fixture(scope="module")
def pki():
    return apple_pki()


@pytest.fixture(scope="module")
def other_pki(pki):
    return apple_pki("Other Corp", "OTHER12345", issuer=pki)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with demo_service(tmp_path_factory.mktemp("service")) as running:
        yield running


@pytest.fixture
def env(tmp_path, monkeypatch, pki) -> dict[str, str]:
    """A runtime directory for the tokens, the test root as trust anchor, no configured TSA."""
    isolate_codesign(tmp_path, monkeypatch, pki.root.certificate)
    return {}


@pytest.fixture
def alpha(env, pki):
    with serve_token("alpha", pki.identities, pki.authorities) as token:
        yield token


def copy(fx, name: str, directory: Path, target: str | None = None) -> Path:
    path = directory / (target or name)
    shutil.copyfile(fx.path(name), path)
    os.chmod(path, 0o755)
    return path


# --- signing and verifying ---------------------------------------------------------------------------


def test_sign_verify_display(fx, tmp_path, alpha, pki):
    exe = copy(fx, "exe.universal", tmp_path, "tool")
    signed = codesign("-s", "Developer ID Application", "-o", "runtime", "-v", exe)
    assert (signed.returncode, signed.stdout) == (0, "")
    assert signed.stderr == (
        f"{exe}: warning: signing with a Developer ID identity without --timestamp: the notary service will "
        "reject it (The signature does not include a secure timestamp.)\n"
        f"{exe}: signed Mach-O universal (x86_64 arm64) [tool]\n"
    )
    # only digests went to the token: one per slice
    requests = [request for _, request in alpha.signer.requests]
    assert len(requests) == 2 and all(len(r.digest) == 32 for r in requests)
    for raw in raw_signatures(exe.read_bytes()):
        assert openssl_accepts(tmp_path, raw, pki.root.certificate)

    verified = codesign("--verify", "--strict", "--verbose", exe)
    assert verified.returncode == 0
    assert verified.stderr == f"{exe}: valid on disk\n{exe}: satisfies its Designated Requirement\n"
    quiet = codesign("-v", exe)
    assert (quiet.returncode, quiet.stderr) == (0, "")

    shown = codesign("-dvvv", exe)
    assert shown.returncode == 0 and shown.stdout == ""
    arm64 = raw_signatures(exe.read_bytes())[1]
    cd = cd_fields(arm64.code_directories[0])
    digest = cdhash(arm64.code_directories[0])
    full = hashlib.sha256(arm64.code_directories[0]).hexdigest()
    lines = shown.stderr.splitlines()
    signed_time = next(line for line in lines if line.startswith("Signed Time="))
    assert lines == [
        f"Executable={exe}",
        "Identifier=tool",
        "Format=Mach-O universal (x86_64 arm64)",
        f"CodeDirectory v=20500 size={cd['length']} flags=0x10000(runtime) hashes={len(cd['hashes'])}+2 "
        "location=embedded",
        "Hash type=sha256 size=32",
        f"CandidateCDHash sha256={digest.hex()}",
        f"CandidateCDHashFull sha256={full}",
        "Hash choices=sha256",
        f"CMSDigest={full}",
        "CMSDigestType=2",
        f"CDHash={digest.hex()}",
        f"Signature size={len(arm64.cms)}",
        "Authority=Developer ID Application: Test Corp (TEAM123456)",
        "Authority=Test Developer ID Certification Authority",
        "Authority=Test Apple Root CA",
        signed_time,
        "Info.plist=not bound",
        "TeamIdentifier=TEAM123456",
        "Runtime Version=11.0.0",
        "Sealed Resources=none",
        f"Internal requirements count=1 size={len(arm64.blobs[2])}",
    ]
    requirement = codesign("-d", "-r-", exe)
    leaf = pki.application.sha1.lower()
    assert requirement.stdout == f'designated => identifier tool and certificate leaf = H"{leaf}"\n'
    assert requirement.stderr == f"Executable={exe}\n"


def test_timestamp_from_the_configured_authority(fx, tmp_path, alpha, pki, service, monkeypatch):
    monkeypatch.setenv("SIGNBRIDGE_TIMESTAMP_URL", f"{service.api_url}/timestamp")
    anchors = os.pathsep.join([os.environ["SIGNBRIDGE_ANCHORS"], str(service.root_pem)])
    monkeypatch.setenv("SIGNBRIDGE_ANCHORS", anchors)
    exe = copy(fx, "hello.arm64", tmp_path)
    signed = codesign("-s", "TEAM123456", "--timestamp", "-o", "runtime", exe)
    assert signed.returncode == 0, signed.stderr
    assert ": warning:" not in signed.stderr  # ready for notarization: nothing to warn about
    raw = raw_signature(exe.read_bytes())
    signer_info = asn1_cms.ContentInfo.load(raw.cms)["content"]["signer_infos"][0]
    token = list(signer_info["unsigned_attrs"])[0]["values"][0].dump()
    demo_root = x509.load_pem_x509_certificate(service.root_pem.read_bytes())
    imprint = hashlib.sha256(signer_info["signature"].native).digest()
    checked = openssl_ts_verify(tmp_path, token, imprint, demo_root)
    assert checked.returncode == 0 and "Verification: OK" in checked.stdout
    verified = codesign("-vv", "--strict", exe)
    assert verified.returncode == 0, verified.stderr
    shown = codesign("-dv", exe).stderr.splitlines()
    assert any(line.startswith("Timestamp=") for line in shown)
    assert not any(line.startswith("Signed Time=") for line in shown)
    none = copy(fx, "hello.arm64", tmp_path, "hello.none")
    assert codesign("-s", "TEAM123456", "--timestamp=none", none).returncode == 0
    plain = asn1_cms.ContentInfo.load(raw_signature(none.read_bytes()).cms)["content"]["signer_infos"][0]
    assert plain["unsigned_attrs"].native is None


def apple_lines(stderr: str) -> str:
    """codesign's own output, without signbridge's notarization warnings."""
    return "".join(line for line in stderr.splitlines(keepends=True) if ": warning: " not in line)


def test_several_paths_resigning_and_requirements(fx, tmp_path, alpha):
    first, second = copy(fx, "exe.x86_64", tmp_path, "one"), copy(fx, "libdemo.arm64.dylib", tmp_path, "two")
    assert codesign("-s", "Test Corp", "-i", "com.example.one", first).returncode == 0
    again = codesign("-s", "Test Corp", first, second)
    assert again.returncode == 1
    assert apple_lines(again.stderr) == f"{first}: is already signed\n"
    assert raw_signature(second.read_bytes()).code_directories  # linker signature only: untouched
    forced = codesign("-f", "-s", "Test Corp", "--prefix", "com.example.", first, second)
    assert forced.returncode == 0
    assert apple_lines(forced.stderr) == f"{first}: replacing existing signature\n"
    # without --timestamp and --options runtime: one warning of each kind per file
    assert forced.stderr.count(": warning: ") == 4  # after each signature, not for the file refused above
    assert ": warning: " not in again.stderr
    assert forced.stderr.count(f"{second}: warning: signing with a Developer ID identity without --options runtime") == 1
    directories = [raw_signature(p.read_bytes()).code_directories[0] for p in (first, second)]
    identifiers = [cd_fields(directory)["identifier"] for directory in directories]
    assert identifiers == ["com.example.one", "com.example.two"]  # --prefix on undotted default identifiers

    both = codesign("-vv", first, second)
    assert both.returncode == 0
    assert both.stderr.count("valid on disk") == 2
    satisfied = codesign("-vv", "-R=identifier com.example.two and anchor trusted", second)
    assert satisfied.returncode == 0
    assert f"{second}: explicit requirement satisfied" in satisfied.stderr
    unsatisfied = codesign("-v", "-R=identifier \"com.other\"", second)
    assert unsatisfied.returncode == 3
    assert unsatisfied.stderr == "test-requirement: code failed to satisfy specified code requirement(s)\n"
    requirement_file = tmp_path / "requirement.txt"
    requirement_file.write_text(codesign("-d", "-r-", second).stdout)
    assert codesign("-v", "-R", requirement_file, second).returncode == 0


def test_digest_algorithm_and_entitlements(fx, tmp_path, alpha):
    exe = copy(fx, "exe.arm64", tmp_path)
    entitlements = tmp_path / "app.entitlements"
    entitlements.write_text(
        '<?xml version="1.0" encoding="UTF-8"?>\n<plist version="1.0"><dict>'
        "<key>com.apple.security.cs.disable-library-validation</key><true/></dict></plist>\n"
    )
    result = codesign("-s", "Developer ID Application", "--digest-algorithm=sha1,sha256",
                      "--entitlements", entitlements, exe)  # fmt: skip
    assert result.returncode == 0, result.stderr
    raw = raw_signature(exe.read_bytes())
    assert [cd_fields(cd)["hash_type"] for cd in raw.code_directories] == [1, 2]
    assert raw.blobs[5][8:] == entitlements.read_bytes()
    shown = codesign("-d", "--entitlements", "-", exe)
    assert shown.stdout == (
        "[Dict]\n\t[Key] com.apple.security.cs.disable-library-validation\n\t[Value]\n\t\t[Bool] true\n"
    )
    xml = codesign("-d", "--entitlements", "-", "--xml", exe)
    assert xml.stdout.encode() == entitlements.read_bytes()
    legacy = codesign("-d", "--ent", ":-", exe)
    assert legacy.stdout.encode() == entitlements.read_bytes() and "deprecated" in legacy.stderr
    assert "Hash choices=sha1,sha256" in codesign("-dvvv", exe).stderr


def test_bundle_deep_sign_and_tamper(fx, tmp_path, alpha):
    app = build_myapp(tmp_path, fx, extras=True)
    result = codesign("-s", "Developer ID Application", "--deep", "-o", "runtime", app)
    assert result.returncode == 0, result.stderr
    verified = codesign("--verify", "--deep", "--strict", "-vv", app)
    assert verified.returncode == 0, verified.stderr
    shown = codesign("-dvvv", app).stderr
    assert "Format=app bundle with Mach-O universal (x86_64 arm64)" in shown
    assert "Sealed Resources version=2 rules=13 files=" in shown
    (app / "Contents/Resources/data.txt").write_text("modified\n")
    tampered = codesign("--verify", "--deep", "--strict", app)
    assert tampered.returncode == 1
    assert tampered.stderr == (
        f"{app}: a sealed resource is missing or invalid\n"
        f"file modified: {app.resolve() / 'Contents/Resources/data.txt'}\n"
    )


# --- Apple's messages and exit codes for failures ------------------------------------------------------


def test_unsigned_missing_and_usage(fx, tmp_path, env):
    unsigned = copy(fx, "exe.x86_64", tmp_path)
    for args in (("-v",), ("-d",)):
        result = codesign(*args, unsigned)
        assert (result.returncode, result.stderr) == (1, f"{unsigned}: code object is not signed at all\n")
    missing = codesign("-v", tmp_path / "nope", unsigned)
    assert missing.returncode == 1
    assert missing.stderr.splitlines() == [
        f"{tmp_path / 'nope'}: No such file or directory",
        f"{unsigned}: code object is not signed at all",
    ]
    for args in ((), ("-s",), ("--frobnicate", "x"), ("-s", "-", "-o", "bogus", str(unsigned))):
        result = codesign(*args)
        assert result.returncode == 2, (args, result.stderr)
    assert "Usage: signbridge codesign" in codesign().stderr
    assert '"bogus" is not a flag codesign can set' in codesign("-s", "-", "-o", "bogus", unsigned).stderr


def test_tampered_code_is_reported(fx, tmp_path, alpha):
    exe = copy(fx, "hello.universal", tmp_path, "hello")
    assert codesign("-s", "Developer ID Application", exe).returncode == 0
    data = bytearray(exe.read_bytes())
    arm64_offset = int.from_bytes(data[8 + 20 + 8 : 8 + 20 + 12], "big")
    data[arm64_offset + 0x4000 + 5] ^= 1
    exe.write_bytes(bytes(data))
    result = codesign("-v", exe)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[:2] == [
        f"{exe}: invalid signature (code or signature have been modified)",
        "In architecture: arm64",
    ]
    assert "code page 4 (bytes 16384-20479) does not match its hash" in lines[2]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "Developer ID Installer",
            "this identity cannot be used for signing code (it is an installer identity",
        ),
        ("Nobody", "Nobody: no identity found"),
    ],
)
def test_identity_errors(fx, tmp_path, alpha, name, message):
    work = tmp_path / "work"
    work.mkdir()
    exe = copy(fx, "exe.x86_64", work)
    before = snapshot(work)
    result = codesign("-s", name, exe)
    assert result.returncode == 1
    assert message in result.stderr
    assert snapshot(work) == before


def test_team_and_organization_are_not_ambiguous_but_two_teams_are(fx, tmp_path, alpha, other_pki):
    exe = copy(fx, "exe.x86_64", tmp_path)
    for name in ("TEAM123456", "Test Corp"):  # the installer certificate shares both: still one identity
        assert codesign("-f", "-s", name, exe).returncode == 0
    with serve_token("beta", other_pki.identities, other_pki.authorities):
        result = codesign("-f", "-s", "Developer ID Application", exe)
        assert result.returncode == 1
        assert "Developer ID Application: ambiguous (matches" in result.stderr
        chosen = codesign("-f", "-s", "Developer ID Application", "--token", "beta", exe)
        assert chosen.returncode == 0, chosen.stderr
    assert cd_fields(raw_signature(exe.read_bytes()).code_directories[0])["team"] == "OTHER12345"


def test_token_stopped(fx, tmp_path, env, pki):
    work = tmp_path / "work"
    work.mkdir()
    exe = copy(fx, "exe.x86_64", work)
    before = snapshot(work)
    token = serve_token("alpha", pki.identities, pki.authorities)
    token.stop()
    result = codesign("-s", "Developer ID Application", exe)
    assert result.returncode == 1
    assert "no signbridge token is running" in result.stderr
    token = serve_token("alpha", pki.identities, pki.authorities)
    token.stop(keep_record=True)  # killed: a stale record, nothing listening
    stale = codesign("-s", "Developer ID Application", exe)
    assert stale.returncode == 1 and "no signbridge token is running" in stale.stderr
    assert snapshot(work) == before


def test_unreadable_input(fx, env, alpha):
    # root reads anything: run the command without the capabilities that allow it
    directory = Path(tempfile.mkdtemp(prefix="codesign-unreadable-"))
    try:
        exe = copy(fx, "exe.x86_64", directory)
        os.chmod(exe, 0)
        setpriv = require_tool("setpriv") if os.geteuid() == 0 else None
        prefix = [setpriv, "--bounding-set", "-dac_override,-dac_read_search"] if setpriv else []
        result = subprocess.run(
            [*prefix, sys.executable, "-m", "signbridge", "codesign", "-s", "-", str(exe)],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, check=False,
        )  # fmt: skip
        assert result.returncode == 1
        assert result.stderr == f"{exe}: cannot be read: Permission denied\n"
        assert sorted(p.name for p in directory.iterdir()) == ["exe.x86_64"]
        os.chmod(exe, 0o755)
        assert exe.read_bytes() == fx.read("exe.x86_64")
    finally:
        shutil.rmtree(directory)


def test_token_stopping_while_signing(fx, tmp_path, env, pki):
    """The identity was found, then its token went away: the signer's error, the input untouched."""
    from signbridge.apple import codesign as engine
    from signbridge.apple.certificates import Usage
    from signbridge.apple.codesig.options import CodesignOptions
    from signbridge.errors import SignatureError
    from signbridge.keychain.selection import select_identity

    work = tmp_path / "work"
    work.mkdir()
    exe = copy(fx, "exe.universal", work)
    before = snapshot(work)
    token = serve_token("alpha", pki.identities, pki.authorities)
    identity = select_identity("Developer ID Application", usage=Usage.CODE)
    token.stop()
    with pytest.raises(SignatureError, match="the token alpha could not sign"):
        engine.sign_code(exe, identity, CodesignOptions())
    assert snapshot(work) == before
