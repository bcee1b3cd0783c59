"""GnuPG through the token: gpg-agent runs gnupg-pkcs11-scd as its smart-card daemon, which loads
p11-kit's client module and finds the token's certificates and keys. The token holds one policy,
whose key gnupg-pkcs11-scd's openpgp-sign names, so that gpg --card-status shows it as the
signature key. An OpenPGP key is made from it (gpg's "existing key" by keygrip), and then gpg
--detach-sign, rpmsign and debsigs sign with it; gpg (in a keyring that holds only the exported
public key), rpm's own verifier (rpmkeys) and debsig-verify check the signatures.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import require_file, require_tool, run
from providerkit import CLIENT_MODULE, Provider, audit_records, last_audit_seq
from servicekit import DemoService, demo_service

pytestmark = pytest.mark.timeout(300)

SCD = "/usr/bin/gnupg-pkcs11-scd"
UID = "Demo Corp Release Signing <release@democorp.example>"
EMAIL = "release@democorp.example"
LOOPBACK = ("--batch", "--pinentry-mode", "loopback", "--passphrase", "CONFIG")


@dataclass
class Gpg:
    home: Path
    socket: str

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "GNUPGHOME": str(self.home), "P11_KIT_SERVER_ADDRESS": f"unix:path={self.socket}", **extra}

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["gpg", *args], capture_output=True, text=True, env=self.env(), timeout=120)
        if check and proc.returncode != 0:
            pytest.fail(f"gpg {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc


@dataclass
class GpgServed:
    gpg: Gpg
    service: DemoService
    keygrip: str
    fingerprint: str
    public_key: Path


def _configure(home: Path, sign_keygrip: str | None = None) -> None:
    """gpg-agent and gnupg-pkcs11-scd as docs/provider.md configures them; gpg-agent (and with it
    gnupg-pkcs11-scd) is stopped, so that the next gpg starts them with this configuration."""
    home.chmod(0o700)
    (home / "gpg-agent.conf").write_text(f"scdaemon-program {SCD}\nallow-loopback-pinentry\n")
    (home / "gnupg-pkcs11-scd.conf").write_text(
        f"providers signbridge\nprovider-signbridge-library {CLIENT_MODULE}\n"
        + (f"openpgp-sign {sign_keygrip}\n" if sign_keygrip else "")
    )
    subprocess.run(["gpgconf", "--kill", "all"], env={**os.environ, "GNUPGHOME": str(home)}, capture_output=True,
                   check=False)  # fmt: skip


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GpgServed]:
    for tool in ("gpg", "gpg-connect-agent", "gpgconf", "rpmbuild", "rpmsign", "rpmkeys"):
        require_tool(tool)
    require_file(SCD, "gnupg-pkcs11-scd")
    require_file(CLIENT_MODULE, "p11-kit-modules")
    # gpg-agent's sockets live in the home directory: keep its path short.
    home = Path(tempfile.mkdtemp(prefix="sbg", dir="/tmp"))
    with demo_service(tmp_path_factory.mktemp("svc")) as service:
        provider = Provider.for_service(service)
        gpg = None
        try:
            provider.start("--name", "sbgpg", "--project-slug", "demo", "--signing-policy-slug", "release-signing")
            _configure(home)
            gpg = Gpg(home, provider.record().socket)
            gpg("--card-status")  # gpg-agent learns the card: a stub per key, by keygrip
            (keygrip,) = _learn(gpg).values()
            # Only now: with openpgp-sign set, gnupg-pkcs11-scd's READKEY finds no key, and without
            # the stubs gpg-agent would need it for, --card-status fails ("Not found").
            _configure(home, sign_keygrip=keygrip)
            fingerprint = _key_from_the_token(gpg, keygrip)
            public_key = tmp_path_factory.mktemp("pub") / "release.asc"
            public_key.write_text(gpg("--armor", "--export", fingerprint).stdout)
            yield GpgServed(gpg, service, keygrip, fingerprint, public_key)
        finally:
            if gpg is not None:
                subprocess.run(["gpgconf", "--kill", "all"], env=gpg.env(), capture_output=True, check=False)
            provider.cleanup()
            shutil.rmtree(home, ignore_errors=True)


def _scd(gpg: Gpg, *commands: str) -> str:
    proc = subprocess.run(["gpg-connect-agent", *(f"SCD {c}" for c in commands), "/bye"], capture_output=True,
                          text=True, env=gpg.env(), timeout=120, check=True)  # fmt: skip
    return proc.stdout


def _learn(gpg: Gpg) -> dict[str, str]:
    """The card's key pairs as gnupg-pkcs11-scd reports them: common name -> keygrip. (Issuer
    certificates are listed too, without a KEYPAIRINFO; ECDSA keys are not: it handles RSA only.)"""
    learned = _scd(gpg, "LEARN --force")
    pairs = set(re.findall(r"^S KEYPAIRINFO ([0-9A-F]{40}) ", learned, re.M))
    named = re.finditer(r"^S KEY-FRIEDNLY ([0-9A-F]{40}) .*?/CN=([^/]+)/.* on sbgpg\w*$", learned, re.M)
    return {m[2]: m[1] for m in named if m[1] in pairs}


def _key_from_the_token(gpg: Gpg, keygrip: str) -> str:
    """An OpenPGP key whose secret part is the token's key with that keygrip (gpg's "existing key")."""
    parameters = gpg.home / "key.params"
    parameters.write_text(
        f"Key-Type: RSA\nKey-Grip: {keygrip}\nKey-Usage: sign\nName-Real: Demo Corp Release Signing\n"
        f"Name-Email: {EMAIL}\nExpire-Date: 0\n%commit\n"
    )
    gpg(*LOOPBACK, "--generate-key", str(parameters))
    listing = gpg("--with-colons", "--with-keygrip", "--list-secret-keys", EMAIL).stdout
    assert f"grp:::::::::{keygrip}:" in listing
    (fingerprint,) = re.findall(r"^fpr:::::::::([0-9A-F]{40}):", listing, re.M)
    return fingerprint


def _as_gpg_prints_a_fingerprint(hexdigits: str) -> str:
    groups = [hexdigits[i : i + 4] for i in range(0, 40, 4)]
    return " ".join(groups[:5]) + "  " + " ".join(groups[5:])


def test_card_status_shows_the_token_and_its_signature_key(served: GpgServed) -> None:
    status = served.gpg("--card-status").stdout
    serial = re.search(r"^Application ID \.+: (D27600012401\w+)$", status, re.M)
    assert serial, status
    assert _learn(served.gpg) == {"Developer ID Application: Demo Corp (DEMOTEAM01)": served.keygrip}
    # openpgp-sign makes gnupg-pkcs11-scd report that key as the card's signature key; what it
    # reports is its keygrip (it keeps no OpenPGP fingerprint), so gpg finds no OpenPGP key by it.
    assert f"Signature key ....: {_as_gpg_prints_a_fingerprint(served.keygrip)}\n" in status, status
    assert "Encryption key....: [none]\n" in status and "Authentication key: [none]\n" in status
    assert "General key info..: [none]\n" in status
    # The OpenPGP key lives on that card: gpg keeps only a stub that points to it.
    secret = served.gpg("--with-keygrip", "--list-secret-keys", served.fingerprint).stdout
    assert "sec>" in secret and f"Card serial no. = {serial[1][16:20]} {serial[1][20:28]}" in secret
    assert f"Keygrip = {served.keygrip}" in secret


def test_a_token_with_an_ecdsa_key_cannot_sign_with_openpgp_sign_set(served: GpgServed) -> None:
    """Why the token holds one policy: on a token with all the demo's keys gnupg-pkcs11-scd lists the
    RSA keys and skips the ECDSA one, but with openpgp-sign set, PKSIGN looks the key up by walking
    the certificates and gives up at the ECDSA one, which comes first (gnupg-pkcs11-scd 0.10.0;
    fixed upstream after 0.11.0, in no release yet)."""
    home = Path(tempfile.mkdtemp(prefix="sbe", dir="/tmp"))
    provider = Provider.for_service(served.service)
    gpg = None
    try:
        provider.start("--name", "sbgpgall")
        _configure(home)
        gpg = Gpg(home, provider.record().socket)
        keys = _learn(gpg)
        assert set(keys) == {"Developer ID Application: Demo Corp (DEMOTEAM01)",
                             "Developer ID Installer: Demo Corp (DEMOTEAM01)"}  # fmt: skip
        application = keys["Developer ID Application: Demo Corp (DEMOTEAM01)"]
        (key_id,) = re.findall(rf"^S KEYPAIRINFO {application} (\S+)$", _scd(gpg, "LEARN --force"), re.M)
        _configure(home, sign_keygrip=application)
        signed = _scd(gpg, f"SETDATA {'00' * 32}", f"PKSIGN --hash=sha256 {key_id}")
        assert re.search(r"^ERR \d+ Wrong public key algorithm", signed, re.M), signed
    finally:
        if gpg is not None:
            subprocess.run(["gpgconf", "--kill", "all"], env=gpg.env(), capture_output=True, check=False)
        provider.cleanup()
        shutil.rmtree(home, ignore_errors=True)


def test_detach_sign_and_verify_with_the_exported_public_key(served: GpgServed, tmp_path: Path) -> None:
    document = tmp_path / "release-notes.txt"
    document.write_text("Demo Corp 1.0 release notes\n")
    before = last_audit_seq(served.service)
    served.gpg(*LOOPBACK, "--local-user", served.fingerprint, "--detach-sign", "--armor", str(document))
    signature = tmp_path / "release-notes.txt.asc"
    assert signature.read_text().startswith("-----BEGIN PGP SIGNATURE-----")
    records = [r for r in audit_records(served.service, before) if r["outcome"] == "granted"]
    assert len(records) == 1 and records[0]["policy_slug"] == "release-signing"
    caller = json.loads(records[0]["client_metadata"])["sourceProcess"]["commandLine"]
    assert caller.startswith("gnupg-pkcs11-scd") and "CONFIG" not in caller

    verifier = Gpg(Path(tempfile.mkdtemp(prefix="sbv", dir="/tmp")), served.gpg.socket)
    try:
        verifier.home.chmod(0o700)
        verifier("--batch", "--import", str(served.public_key))
        good = verifier("--batch", "--status-fd", "1", "--verify", str(signature), str(document))
        assert f"[GNUPG:] VALIDSIG {served.fingerprint}" in good.stdout
        assert f'Good signature from "{UID}"' in good.stderr
        document.write_text("Demo Corp 1.0 release notes, edited\n")
        bad = verifier("--batch", "--verify", str(signature), str(document), check=False)
        assert bad.returncode != 0 and "BAD signature" in bad.stderr
    finally:
        subprocess.run(["gpgconf", "--kill", "all"], env=verifier.env(), capture_output=True, check=False)
        shutil.rmtree(verifier.home, ignore_errors=True)


SPEC = """Name: signbridge-hello
Version: 1.0
Release: 1
Summary: A package signed through signbridge's token
License: Apache-2.0
BuildArch: noarch

%description
A package signed through signbridge's token.

%install
mkdir -p %{buildroot}/usr/share/signbridge-hello
echo hello > %{buildroot}/usr/share/signbridge-hello/hello.txt

%files
/usr/share/signbridge-hello/hello.txt
"""


def test_rpmsign_signs_an_rpm_that_rpm_verifies(served: GpgServed, tmp_path: Path) -> None:
    spec = tmp_path / "hello.spec"
    spec.write_text(SPEC)
    run(["rpmbuild", "--define", f"_topdir {tmp_path / 'build'}", "--define", f"_rpmdir {tmp_path / 'rpms'}",
         "-bb", str(spec)])  # fmt: skip
    (package,) = (tmp_path / "rpms").rglob("*.rpm")
    macros = ["--define", "__gpg /usr/bin/gpg", "--define", f"_gpg_name {served.fingerprint}",
              "--define", "_gpg_sign_cmd_extra_args --pinentry-mode loopback --passphrase CONFIG"]  # fmt: skip
    run(["rpmsign", "--addsign", *macros, str(package)], env=served.gpg.env(), stdin=subprocess.DEVNULL)

    database = tmp_path / "rpmdb"
    database.mkdir()
    unknown = subprocess.run(["rpmkeys", "--dbpath", str(database), "-K", str(package)], capture_output=True, text=True)
    assert unknown.returncode != 0 and "SIGNATURES NOT OK" in unknown.stdout
    run(["rpmkeys", "--dbpath", str(database), "--import", str(served.public_key)])
    checked = run(["rpmkeys", "--dbpath", str(database), "-Kv", str(package)], text=True).stdout
    short_id = served.fingerprint[-8:].lower()
    assert re.search(rf"Header V4 RSA/SHA(256|512) Signature, key ID {short_id}: OK", checked), checked
    assert "Payload SHA256 digest: OK" in checked


POLICY = """<?xml version="1.0"?>
<!DOCTYPE Policy SYSTEM "https://www.debian.org/debsig/1.0/policy.dtd">
<Policy xmlns="https://www.debian.org/debsig/1.0/">
  <Origin Name="Demo Corp" id="{keyid}" Description="Demo Corp release signing"/>
  <Selection><Required Type="origin" File="debsig.gpg" id="{keyid}"/></Selection>
  <Verification MinOptional="0"><Required Type="origin" File="debsig.gpg" id="{keyid}"/></Verification>
</Policy>
"""


def test_debsigs_signs_a_deb_that_debsig_verify_accepts(served: GpgServed, tmp_path: Path) -> None:
    for tool in ("dpkg-deb", "debsigs", "debsig-verify"):
        require_tool(tool)
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: signbridge-hello\nVersion: 1.0\nArchitecture: all\nMaintainer: Demo Corp <release@democorp.example>\n"
        "Description: A package signed through signbridge's token\n"
    )
    (root / "usr" / "share" / "signbridge-hello").mkdir(parents=True)
    (root / "usr" / "share" / "signbridge-hello" / "hello.txt").write_text("hello\n")
    package = tmp_path / "signbridge-hello_1.0_all.deb"
    run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(package)])
    # debsigs runs `gpg --openpgp --detach-sign` and passes it no options: gpg.conf gives the card PIN
    # to every gpg run, and a digest stronger than --openpgp's SHA-1 (which debsig-verify refuses).
    pin, conf = served.gpg.home / "token.pin", served.gpg.home / "gpg.conf"
    pin.write_text("CONFIG\n")
    pin.chmod(0o600)
    conf.write_text(f"pinentry-mode loopback\npassphrase-file {pin}\npersonal-digest-preferences SHA512 SHA256\n")
    try:
        run(["debsigs", "--sign=origin", f"--default-key={served.fingerprint}", str(package)], env=served.gpg.env())
    finally:
        conf.unlink()
        pin.unlink()
    listed = run(["debsigs", "--list", str(package)], env=served.gpg.env(), text=True).stdout
    assert "origin" in listed

    keyid = served.fingerprint[-16:]
    policies, keyrings = tmp_path / "policies" / keyid, tmp_path / "keyrings" / keyid
    policies.mkdir(parents=True)
    keyrings.mkdir(parents=True)
    (policies / "demo.pol").write_text(POLICY.format(keyid=keyid))
    served.gpg("--batch", "--output", str(keyrings / "debsig.gpg"), "--export", served.fingerprint)
    verify = ["debsig-verify", "--policies-dir", str(tmp_path / "policies"), "--keyrings-dir", str(tmp_path / "keyrings")]
    good = subprocess.run([*verify, str(package)], capture_output=True, text=True)
    assert good.returncode == 0 and "Verified package from 'Demo Corp release signing' (Demo Corp)" in good.stdout, good

    unsigned = tmp_path / "unsigned.deb"
    run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(unsigned)])
    refused = subprocess.run([*verify, str(unsigned)], capture_output=True, text=True)
    assert refused.returncode != 0
