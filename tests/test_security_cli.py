"""`signbridge security list-smartcard | find-identity` and `signbridge pluginkit`, run as programs
against tokens served on real sockets (tests/tokenkit.py), with real `p11-kit list-modules`."""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import ROOT, require_tool
from signbridge.p11kit import p11kit_modules
from tokenkit import apple_pki, developer_id_application, serve_token, use_runtime_dir, write_stale_record

TESTS = Path(__file__).resolve().parent
NOBODY = 65534


@pytest.fixture(scope="module")
def pki():
    return apple_pki()


@pytest.fixture(scope="module")
def other_pki(pki):
    return apple_pki("Other Corp", "OTHER12345", issuer=pki)


@pytest.fixture
def runtime(tmp_path, monkeypatch) -> Path:
    return use_runtime_dir(tmp_path, monkeypatch)


def signbridge(*args: str, env: dict[str, str] | None = None, prefix: list[str] | None = None):
    environment = dict(os.environ if env is None else env)
    environment["PYTHONPATH"] = str(ROOT / "src")
    environment["PYTHONDONTWRITEBYTECODE"] = "1"
    return subprocess.run(
        [*(prefix or []), sys.executable, "-m", "signbridge", *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
    )


# --- list-smartcard -----------------------------------------------------------------------------


def test_list_smartcard_prints_one_line_per_running_token(runtime, pki, other_pki):
    write_stale_record("ghost")
    with (
        serve_token("beta", other_pki.identities, other_pki.authorities),
        serve_token("alpha", pki.identities, pki.authorities),
    ):
        for command in ("list-smartcard", "list-smartcards"):
            result = signbridge("security", command)
            assert (result.returncode, result.stderr) == (0, "")
            assert result.stdout == "io.signbridge.token:alpha\nio.signbridge.token:beta\n"


def test_list_smartcard_with_no_token_running(runtime):
    write_stale_record("ghost")
    result = signbridge("security", "list-smartcard")
    assert result.returncode == 44  # Apple's security: errSecItemNotFound as an exit status
    assert result.stdout == ""
    assert result.stderr.splitlines()[0] == "No smartcards found."
    assert "signbridge start" in result.stderr


# --- find-identity ------------------------------------------------------------------------------


def _line(number: int, certificate, problem: str | None = None) -> str:
    line = f'{number:3d}) {certificate.sha1} "{certificate.common_name}"'
    return f"{line} ({problem})" if problem else line


def test_find_identity_default_is_the_basic_policy_with_both_sections(runtime, pki):
    with serve_token("alpha", pki.identities, pki.authorities):
        result = signbridge("security", "find-identity")
    assert (result.returncode, result.stderr) == (0, "")
    app, installer, document = pki.application, pki.installer, pki.document
    assert result.stdout == "\n".join(
        [
            "",
            "Policy: X.509 Basic",
            "  Matching identities",
            _line(1, app),
            _line(2, installer),
            _line(3, document),
            "     3 identities found",
            "",
            "  Valid identities only",
            _line(1, app),
            _line(2, installer),
            _line(3, document),
            "     3 valid identities found",
            "",
        ]
    )


def test_find_identity_valid_code_signing_only(runtime, pki, other_pki):
    with (
        serve_token("alpha", pki.identities, pki.authorities),
        serve_token("beta", other_pki.identities, other_pki.authorities),
    ):
        combined = signbridge("security", "find-identity", "-vp", "codesigning")
        separate = signbridge("security", "find-identity", "-v", "-p", "codesigning")
        one_token = signbridge("security", "find-identity", "-v", "-p", "codesigning", "beta")
        unknown = signbridge("security", "find-identity", "-v", "gamma")
    expected = "\n".join(
        [_line(1, pki.application), _line(2, other_pki.application), "     2 valid identities found", ""]
    )
    assert (combined.returncode, combined.stdout) == (0, expected)
    assert separate.stdout == expected
    assert one_token.stdout == f"{_line(1, other_pki.application)}\n     1 valid identities found\n"
    assert unknown.returncode == 1
    assert unknown.stdout == ""
    assert unknown.stderr == (
        'signbridge: error: no signbridge token named "gamma" is running (running: alpha, beta)\n'
    )


def test_find_identity_reports_invalid_identities_as_apple_does(runtime, pki):
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=400)
    expired = developer_id_application(
        pki.intermediate, "Old Corp", "OLD1234567", key_id="old/release", not_before=past,
        not_after=past + datetime.timedelta(days=30),
    )  # fmt: skip
    with (
        serve_token("alpha", [pki.application, expired], pki.authorities),
        serve_token("short", [pki.installer], [pki.root.certificate]),  # intermediate missing
    ):
        result = signbridge("security", "find-identity", "-p", "basic", "-p", "codesigning")
    assert result.returncode == 0
    assert result.stdout == "\n".join(
        [
            "",
            "Policy: Code Signing",
            "  Matching identities",
            _line(1, pki.application),
            _line(2, expired, "CSSMERR_TP_CERT_EXPIRED"),
            "     2 identities found",
            "",
            "  Valid identities only",
            _line(1, pki.application),
            "     1 valid identities found",
            "",
            "Policy: X.509 Basic",
            "  Matching identities",
            _line(1, pki.application),
            _line(2, expired, "CSSMERR_TP_CERT_EXPIRED"),
            _line(3, pki.installer, "CSSMERR_TP_NOT_TRUSTED"),
            "     3 identities found",
            "",
            "  Valid identities only",
            _line(1, pki.application),
            "     1 valid identities found",
            "",
        ]
    )


def test_find_identity_with_no_token_running(runtime):
    result = signbridge("security", "find-identity", "-v")
    assert result.returncode == 0
    assert result.stdout == "     0 valid identities found\n"
    assert "no signbridge token is running" in result.stderr


def test_find_identity_rejects_an_unknown_policy(runtime):
    result = signbridge("security", "find-identity", "-p", "smime")
    assert result.returncode == 2
    assert "'smime' is not one of 'codesigning', 'basic'" in result.stderr


# --- pluginkit ----------------------------------------------------------------------------------


def test_pluginkit_without_registration(runtime, pki, tmp_path):
    elsewhere = tmp_path / "modules"
    elsewhere.mkdir()
    (elsewhere / "signbridge-beta.module").write_text("remote: unix:path=/nonexistent\n")
    outside = str(elsewhere / "signbridge-beta.module")
    gone = str(tmp_path / "gone.module")
    with (
        serve_token("alpha", [pki.application], pki.authorities) as alpha,
        serve_token("beta", [pki.installer], pki.authorities, module_file=outside) as beta,
        serve_token("gamma", [pki.document], pki.authorities, module_file=gone) as gamma,
    ):
        verbose = signbridge("pluginkit", "-m", "-v", "-p", "com.apple.ctk-tokens")
        short = signbridge("pluginkit", "-m", "-p", "com.apple.ctk-tokens")
    assert (verbose.returncode, verbose.stderr) == (0, "")
    assert verbose.stdout.splitlines() == [
        f"     io.signbridge.token(0.1.0)\talpha\t{alpha.record.started}\t{alpha.socket}",
        "     registered with p11-kit: no (the token was started without a p11-kit module file)",
        f"     io.signbridge.token(0.1.0)\tbeta\t{beta.record.started}\t{beta.socket}",
        f"     registered with p11-kit: no (p11-kit does not read module files in {elsewhere})",
        f"     io.signbridge.token(0.1.0)\tgamma\t{gamma.record.started}\t{gamma.socket}",
        f"     registered with p11-kit: no (its module file {tmp_path / 'gone.module'} is missing)",
    ]
    assert (short.returncode, short.stdout) == (0, "     io.signbridge.token(0.1.0)\n")


def test_pluginkit_lists_each_driver_version_once(runtime, pki):
    with (
        serve_token("alpha", [pki.application], pki.authorities, version="0.1.0"),
        serve_token("beta", [pki.installer], pki.authorities, version="0.1.0"),
        serve_token("gamma", [pki.document], pki.authorities, version="0.2.0"),
    ):
        result = signbridge("pluginkit", "-m")
    assert result.stdout == "     io.signbridge.token(0.1.0)\n     io.signbridge.token(0.2.0)\n"


def test_pluginkit_filters_and_no_token(runtime, pki):
    with serve_token("alpha", [pki.application], pki.authorities):
        other_protocol = signbridge("pluginkit", "-m", "-p", "com.apple.share-services")
        other_identifier = signbridge("pluginkit", "-m", "-i", "com.apple.CryptoTokenKit.pivtoken")
        ours = signbridge("pluginkit", "-m", "-i", "io.signbridge.token")
    assert (other_protocol.returncode, other_protocol.stdout) == (0, "")
    assert (other_identifier.returncode, other_identifier.stdout) == (0, "")
    assert ours.stdout == "     io.signbridge.token(0.1.0)\n"
    none = signbridge("pluginkit", "-m", "-v", "-p", "com.apple.ctk-tokens")
    assert none.returncode == 1
    assert none.stdout == ""
    assert none.stderr == (
        "signbridge: error: no signbridge token is running; start one with `signbridge start`\n"
    )


def test_p11kit_listing_is_parsed_from_real_output():
    listing = subprocess.run(
        [require_tool("p11-kit"), "list-modules"], capture_output=True, text=True, timeout=60
    ).stdout
    modules = p11kit_modules(listing)
    assert "System Trust" in modules["p11-kit-trust"]  # Debian's p11-kit-modules
    assert all(not name.startswith(" ") for name in modules)
    # token lines are only the four-space "token:" lines, not attributes of a token
    labels = [label for token_labels in modules.values() for label in token_labels]
    assert not any(label.startswith(("manufacturer", "model", "flags")) for label in labels)


def test_pluginkit_sees_a_token_registered_with_p11kit():
    """The whole path: a token in another process registered by a module file in the user's
    p11-kit directory; real p11-kit lists it; pluginkit says so. p11-kit reads no per-user module
    files for root, so as root the token and the commands run as nobody."""
    p11kit = require_tool("p11-kit")
    prefix: list[str] = []
    home = Path(tempfile.mkdtemp(prefix="signbridge-p11kit-"))
    if os.geteuid() == 0:
        prefix = [require_tool("setpriv"), f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
        os.chown(home, NOBODY, NOBODY)
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "SIGNBRIDGE_RUNTIME_DIR": str(home / "run"),
        "PYTHONPATH": str(ROOT / "src"),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    module_dir = home / ".config" / "pkcs11" / "modules"
    server = subprocess.Popen(
        [*prefix, sys.executable, str(TESTS / "tokenkit.py"), "serve", "demo", "--module-dir", module_dir],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        listing = subprocess.run(
            [*prefix, p11kit, "list-modules"], capture_output=True, text=True, env=env, timeout=60
        )
        assert listing.returncode == 0, (
            f"p11-kit list-modules fails for this user ({listing.stderr.strip()!r}); "
            "is /etc/pkcs11 readable by everyone?"
        )
        assert p11kit_modules(listing.stdout)["signbridge-demo"] == ["demo"]

        verbose = signbridge("pluginkit", "-m", "-v", "-p", "com.apple.ctk-tokens", env=env, prefix=prefix)
        assert verbose.returncode == 0, verbose.stderr
        lines = verbose.stdout.splitlines()
        assert lines[0].startswith("+    io.signbridge.token(0.1.0)\tdemo\t")
        assert lines[0].endswith(f"\t{home / 'run' / 'tokens' / 'demo' / 'pkcs11.sock'}")
        assert lines[1] == "     registered with p11-kit: yes (module signbridge-demo)"
        short = signbridge("pluginkit", "-m", env=env, prefix=prefix)
        assert short.stdout == "+    io.signbridge.token(0.1.0)\n"
        cards = signbridge("security", "list-smartcard", env=env, prefix=prefix)
        assert cards.stdout == "io.signbridge.token:demo\n"
        identities = signbridge("security", "find-identity", "-vp", "codesigning", env=env, prefix=prefix)
        assert identities.stdout.endswith("     1 valid identities found\n")
        assert '"Developer ID Application: Test Corp (TEAM123456)"' in identities.stdout
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(timeout=30)
        shutil.rmtree(home, ignore_errors=True)
    assert server.returncode == 0
    assert not (module_dir / "signbridge-demo.module").exists()
