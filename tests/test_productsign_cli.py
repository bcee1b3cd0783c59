"""``signbridge productsign`` and ``signbridge pkgutil --check-signature`` as users run them: a child
process, identities from a token served on a real socket, a timestamp authority over HTTP (the
project's, and the demo service's), Apple's messages and exit codes, openssl as the second opinion."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from pkgkit import (
    component_package,
    flip,
    identity_of,
    openssl_cms_verify,
    openssl_rsa_verify,
    openssl_ts_verify,
    pki_fixture,  # noqa: F401 - provides the pki fixture
    product_archive,
    signbridge,
    signed_parts,
    timestamp_token,
    tsa_fixture,  # noqa: F401 - provides the tsa fixture
    write_pem,
)
from servicekit import demo_service
from signbridge.apple.codesig import cms_signing
from signbridge.apple.pkg.sign import sign_package
from signbridge.apple.pkg.verify import verify_package
from signbridge.cli.productsign import render_check_signature
from signbridge.crypto.hashes import HashAlgorithm
from signbridge.crypto.signatures import Scheme
from tokenkit import TEAM, developer_id_installer, serve_token, use_runtime_dir
from xarfixtures import bsdtar_extract, file_xml, notarize, raw_xar, sample_files, snapshot, toc_document

INSTALLER = f"Developer ID Installer: Test Corp ({TEAM})"
INTERMEDIATE = "Test Developer ID Certification Authority"
ROOT = "Test Apple Root CA"


@pytest.fixture
def token(tmp_path, monkeypatch, pki):
    use_runtime_dir(tmp_path, monkeypatch)
    monkeypatch.delenv("SIGNBRIDGE_TIMESTAMP_URL", raising=False)
    monkeypatch.delenv("SIGNBRIDGE_ANCHORS", raising=False)
    with serve_token("alpha", pki.identities, pki.authorities) as served:
        yield served


@pytest.fixture
def anchors(tmp_path, pki, tsa) -> dict[str, str]:
    path = write_pem(tmp_path / "anchors.pem", pki.root.certificate, tsa.root)
    return {"SIGNBRIDGE_ANCHORS": str(path)}


def installer_requests(token) -> list:
    return [request for label, request in token.signer.requests if label.endswith("installer-signing")]


# --- productsign ----------------------------------------------------------------------------------


def test_productsign_with_the_team_id_signs_with_the_installer_identity(tmp_path, token, tsa, pki, anchors):
    package = product_archive(tmp_path / "MyInstaller.pkg")
    out = tmp_path / "MyInstaller-signed.pkg"

    result = signbridge("productsign", f"--timestamp={tsa.url}", "--sign", TEAM, str(package), str(out))

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "productsign: using timestamp authority for signature",
        f'productsign: signing product with identity "{INSTALLER}" from keychain io.signbridge.token:alpha',
        f'productsign: adding certificate "{INTERMEDIATE}"',
        f'productsign: adding certificate "{ROOT}"',
        f"productsign: Wrote signed product archive to {out}",
    ]
    # the token saw two digests for the installer key and nothing for the application key
    requests = [request for _, request in token.signer.requests]
    parts = signed_parts(out)
    assert [(r.digest, r.hash_algorithm, r.scheme) for r in requests] == [
        (parts.checksum, HashAlgorithm.SHA1, Scheme.RSA_PKCS1),
        (requests[1].digest, HashAlgorithm.SHA256, Scheme.RSA_PKCS1),
    ]
    assert installer_requests(token) == requests
    leaf = pki.installer.certificate.public_bytes(serialization.Encoding.DER)
    assert openssl_rsa_verify(tmp_path, leaf, parts.checksum, parts.rsa_signature, "sha1").returncode == 0
    root = write_pem(tmp_path / "root.pem", pki.root.certificate)
    assert openssl_cms_verify(tmp_path, parts.cms, parts.checksum, root).returncode == 0
    tst, value = timestamp_token(parts.cms)
    assert openssl_ts_verify(tmp_path, tst, value, write_pem(tmp_path / "tsa.pem", tsa.root)).returncode == 0
    assert bsdtar_extract(out, tmp_path) == sample_files()

    checked = signbridge("pkgutil", "--check-signature", str(out), env=anchors)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.startswith(
        f'Package "MyInstaller-signed.pkg":\n   Status: signed by a certificate trusted by "{ROOT}"\n'
        "   Signed with a trusted timestamp on: "
    )


def test_a_bare_timestamp_option_does_not_swallow_the_input(tmp_path, token, tsa):
    package = product_archive(tmp_path / "in.pkg")
    result = signbridge("productsign", "--sign", INSTALLER, "--timestamp", str(package), str(tmp_path / "out.pkg"),
                        env={"SIGNBRIDGE_TIMESTAMP_URL": tsa.url})  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "productsign: using timestamp authority for signature" in result.stdout
    assert timestamp_token(signed_parts(tmp_path / "out.pkg").cms)


def test_developer_id_signatures_are_timestamped_unless_told_not_to(tmp_path, token, tsa):
    package = product_archive(tmp_path / "in.pkg")
    env = {"SIGNBRIDGE_TIMESTAMP_URL": tsa.url}
    default = signbridge("productsign", "--sign", TEAM, str(package), str(tmp_path / "a.pkg"), env=env)
    none = signbridge("productsign", "--sign", TEAM, "--timestamp=none", str(package), str(tmp_path / "b.pkg"),
                      env=env)  # fmt: skip
    assert default.returncode == 0 and none.returncode == 0, default.stderr + none.stderr
    assert "using timestamp authority" in default.stdout and "using timestamp authority" not in none.stdout
    assert timestamp_token(signed_parts(tmp_path / "a.pkg").cms)
    with pytest.raises(AssertionError, match="no timestamp token"):
        timestamp_token(signed_parts(tmp_path / "b.pkg").cms)


def test_identity_by_fingerprint_token_and_sha256_toc(tmp_path, token, pki):
    package = product_archive(tmp_path / "in.pkg")
    sha1 = pki.installer.sha1
    result = signbridge("productsign", "--sign", sha1.lower(), "--keychain", "alpha", "--timestamp=none",
                        "--toc-checksum", "sha256", str(package), str(tmp_path / "out.pkg"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    parts = signed_parts(tmp_path / "out.pkg")
    assert parts.layout.checksum_number == 3 and len(parts.checksum) == 32
    leaf = pki.installer.certificate.public_bytes(serialization.Encoding.DER)
    assert openssl_rsa_verify(tmp_path, leaf, parts.checksum, parts.rsa_signature, "sha256").returncode == 0


def test_extra_certificates_from_files(tmp_path, token, tsa):
    extra = write_pem(tmp_path / "extra.pem", tsa.root)
    result = signbridge("productsign", "--sign", TEAM, "--timestamp=none", "--cert", str(extra),
                        str(product_archive(tmp_path / "in.pkg")), str(tmp_path / "out.pkg"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-2] == 'productsign: adding certificate "Test Timestamp Root CA"'
    assert signed_parts(tmp_path / "out.pkg").cms_certificates[-1] == tsa.root.public_bytes(serialization.Encoding.DER)


def test_an_application_identity_is_refused_with_apples_message(tmp_path, monkeypatch, pki):
    use_runtime_dir(tmp_path, monkeypatch)
    package = product_archive(tmp_path / "in.pkg")
    before = package.read_bytes()
    with serve_token("apps", [pki.application], pki.authorities) as served:
        result = signbridge("productsign", "--sign", TEAM, "--timestamp=none", str(package), str(tmp_path / "o.pkg"))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"productsign: error: Could not find appropriate signing identity for “{TEAM}”.",
        "An installer signing identity (not an application signing identity) is required for signing flat-style "
        "products.",
    ]
    assert served.signer.requests == []
    assert package.read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in.pkg", "run"]  # no output, no temporary file


def test_unknown_identity_and_no_token(tmp_path, token, monkeypatch):
    package = product_archive(tmp_path / "in.pkg")
    result = signbridge("productsign", "--sign", "Nobody", str(package), str(tmp_path / "o.pkg"))
    assert result.returncode == 1
    assert result.stderr.strip() == "productsign: error: Could not find appropriate signing identity for “Nobody”."
    named = signbridge("productsign", "--sign", TEAM, "--keychain", "beta", str(package), str(tmp_path / "o.pkg"))
    assert named.returncode == 1 and 'no signbridge token named "beta" is running' in named.stderr
    token.stop()
    stopped = signbridge("productsign", "--sign", TEAM, str(package), str(tmp_path / "o.pkg"))
    assert stopped.returncode == 1 and "productsign: error: no signbridge token is running" in stopped.stderr
    assert not (tmp_path / "o.pkg").exists()


SIG = '<signature style="RSA"><offset>20</offset><size>4</size></signature>'
BAD_INPUTS = {
    "not a xar": (lambda p: p.write_bytes(b"not a package at all"), "is not a flat package"),
    "truncated header": (lambda p: p.write_bytes(b"xar!\x00\x1c\x00\x01" + bytes(8)), "inside its xar header"),
    "offsets beyond the file": (
        lambda p: raw_xar(p, toc_document(file_xml("a", 10**9, 5)), b"hello"), "outside the heap"),
    "duplicate signatures": (
        lambda p: raw_xar(p, toc_document(SIG + SIG + file_xml("a", 24, 5)), b"xxxxhello"), "2 <signature>"),
    "missing": (lambda p: None, "cannot open"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_fails_with_a_specific_error_and_leaves_no_output(tmp_path, token, case):
    make, message = BAD_INPUTS[case]
    (tmp_path / "work").mkdir()
    package = tmp_path / "work" / "input.pkg"
    make(package)
    before = snapshot(tmp_path / "work")
    result = signbridge("productsign", "--sign", TEAM, "--timestamp=none", str(package),
                        str(tmp_path / "work" / "out.pkg"))  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.startswith("productsign: error: ") and message in result.stderr, result.stderr
    assert snapshot(tmp_path / "work") == before
    assert installer_requests(token) == []


def test_file_data_that_does_not_match_is_refused_unless_the_check_is_skipped(tmp_path, token, anchors):
    work = tmp_path / "work"
    work.mkdir()
    package = component_package(work / "in.pkg")
    layout = signed_parts(package).layout
    flip(package, layout.heap_offset + layout.file_ranges()["Payload"][0] + 1000)
    before = snapshot(work)
    command = ("productsign", "--sign", TEAM, "--timestamp=none", str(package), str(work / "out.pkg"))
    result = signbridge(*command)
    assert result.returncode == 1 and "Wrote signed product archive" not in result.stdout
    assert result.stderr.startswith(f"productsign: error: {package}: the stored data of 'Payload' does not match "
                                    "its archived sha1 checksum (the table of contents gives ")  # fmt: skip
    assert snapshot(work) == before and installer_requests(token) == []
    # skipped, for trusted inputs: the kernel copies the data unread, and pkgutil --check-files finds it
    result = signbridge(*command[:-2], "--no-check-files", *command[-2:])
    assert result.returncode == 0, result.stderr
    checked = signbridge("pkgutil", "--check-signature", str(work / "out.pkg"), "--check-files", env=anchors)
    assert checked.stdout.splitlines()[1] == "   Status: package is invalid (checksum did not verify)"


def test_an_output_directory_that_does_not_exist(tmp_path, token):
    package = product_archive(tmp_path / "in.pkg")
    result = signbridge("productsign", "--sign", TEAM, "--timestamp=none", str(package),
                        str(tmp_path / "missing" / "out.pkg"))  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip() == f"productsign: error: cannot write to {tmp_path / 'missing'}: No such file or directory"


def test_a_stapled_ticket_is_dropped_with_a_warning(tmp_path, token):
    package = product_archive(tmp_path / "in.pkg")
    first = signbridge("productsign", "--sign", TEAM, "--timestamp=none", str(package), str(tmp_path / "a.pkg"))
    assert first.returncode == 0 and first.stderr == "", first.stderr
    notarize(tmp_path / "a.pkg")
    result = signbridge("productsign", "--sign", TEAM, "--timestamp=none", str(tmp_path / "a.pkg"),
                        str(tmp_path / "b.pkg"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "productsign: warning: the notarization ticket stapled to" in result.stderr
    assert b"t8lr" not in (tmp_path / "b.pkg").read_bytes()


# --- the demo service's timestamp authority ---------------------------------------------------------


@pytest.mark.slow
def test_productsign_timestamped_by_the_signing_service(tmp_path, token, pki):
    with demo_service(tmp_path / "service") as service:
        url = f"{service.api_url}/timestamp"
        package = product_archive(tmp_path / "in.pkg")
        result = signbridge("productsign", f"--timestamp={url}", "--sign", TEAM, str(package), str(tmp_path / "o.pkg"))
    assert result.returncode == 0, result.stderr
    parts = signed_parts(tmp_path / "o.pkg")
    tst, value = timestamp_token(parts.cms)
    assert openssl_ts_verify(tmp_path, tst, value, service.root_pem).returncode == 0
    anchors = write_pem(tmp_path / "anchors.pem", pki.root.certificate)
    anchors.write_bytes(anchors.read_bytes() + service.root_pem.read_bytes())
    checked = signbridge("pkgutil", "--check-signature", str(tmp_path / "o.pkg"), env={"SIGNBRIDGE_ANCHORS": str(anchors)})
    assert checked.returncode == 0 and "Signed with a trusted timestamp on: " in checked.stdout


# --- pkgutil --check-signature ----------------------------------------------------------------------

REPORT = re.compile(
    r'Package "signed\.pkg":\n'
    r'   Status: signed by a certificate trusted by "Test Apple Root CA"\n'
    r"   Signed with a trusted timestamp on: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \+0000\n"
    r"   Certificate Chain:\n"
    r"(?P<chain>(?:.*\n)+)\Z"
)


@pytest.fixture(scope="module")
def signed(pki, tsa, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("signed")
    sign_package(product_archive(directory / "in.pkg"), directory / "signed.pkg", identity_of(pki),
                 timestamp=cms_signing.timestamper(tsa.url))
    return directory / "signed.pkg"


def fingerprint_lines(certificate) -> list[str]:
    pairs = [f"{b:02X}" for b in certificate.fingerprint(hashes.SHA256())]
    return ["           " + " ".join(pairs[:22]), "           " + " ".join(pairs[22:])]


def test_check_signature_prints_apples_report(signed, pki, anchors):
    result = signbridge("pkgutil", "--check-signature", str(signed), env=anchors)
    assert result.returncode == 0 and result.stderr == ""
    match = REPORT.fullmatch(result.stdout)
    assert match, result.stdout
    expected: list[str] = []
    for number, certificate in enumerate(
        (pki.installer.certificate, pki.intermediate.certificate, pki.root.certificate), start=1
    ):
        if number > 1:
            expected.append("       " + "-" * 72)
        expected += [
            f"    {number}. {certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value}",
            f"       Expires: {certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%S} +0000",
            "       SHA256 Fingerprint:",
            *fingerprint_lines(certificate),
        ]
    assert match["chain"].splitlines() == expected


def test_check_signature_json(signed, pki, anchors):
    result = signbridge("pkgutil", "--check-signature", str(signed), "--json", env=anchors)
    assert result.returncode == 0
    report = json.loads(result.stdout)
    assert report["status"] == 'signed by a certificate trusted by "Test Apple Root CA"'
    assert (report["result"], report["trusted"], report["exitCode"]) == ("trusted", True, 0)
    assert report["tocChecksum"] == "sha1" and report["signatures"] == ["RSA", "CMS"]
    assert report["rsaSignatureOver"] == "checksum" and report["cmsSignedAttributes"] is True
    assert dt.datetime.fromisoformat(report["trustedTimestamp"]) <= dt.datetime.now(dt.UTC)
    assert [c["commonName"] for c in report["certificates"]] == [INSTALLER, INTERMEDIATE, ROOT]
    assert report["certificates"][0]["sha1"] == pki.installer.sha1 and report["problems"] == []


def test_check_signature_of_an_unsigned_package(tmp_path, anchors):
    package = product_archive(tmp_path / "plain.pkg")
    result = signbridge("pkgutil", "--check-signature", str(package), env=anchors)
    assert (result.returncode, result.stdout) == (1, 'Package "plain.pkg":\n   Status: no signature\n')


@pytest.mark.parametrize(
    ("damage", "status"),
    [
        ("signature", "invalid signature"),
        ("x-signature", "invalid signature"),
        ("checksum", "package is invalid (checksum did not verify)"),
    ],
)
def test_check_signature_of_damaged_packages(signed, tmp_path, anchors, damage, status):
    package = tmp_path / "signed.pkg"
    package.write_bytes(signed.read_bytes())
    flip(package, signed_parts(package).slot_offset(damage) + 10)
    result = signbridge("pkgutil", "--check-signature", str(package), env=anchors)
    assert (result.returncode, result.stdout) == (1, f'Package "signed.pkg":\n   Status: {status}\n')
    assert result.stderr.startswith("pkgutil: ")  # why, for the person at the terminal


def test_check_signature_reads_file_data_only_when_asked(signed, tmp_path, anchors):
    """Apple's pkgutil checks the TOC checksum and the signatures; the file data is checked by the
    installer as it extracts it (libxar), and by --check-files here."""
    package = tmp_path / "signed.pkg"
    package.write_bytes(signed.read_bytes())
    layout = signed_parts(package).layout
    flip(package, layout.heap_offset + layout.file_ranges()["app.pkg/Payload"][0] + 1000)
    result = signbridge("pkgutil", "--check-signature", str(package), "--check-files", env=anchors)
    status = "package is invalid (checksum did not verify)"
    assert (result.returncode, result.stdout) == (1, f'Package "signed.pkg":\n   Status: {status}\n')
    assert "'app.pkg/Payload'" in result.stderr and "sha1 checksum" in result.stderr
    result = signbridge("pkgutil", "--check-signature", str(package), env=anchors)
    assert result.returncode == 0 and result.stdout.splitlines()[1].startswith("   Status: signed by a certificate")


def test_check_signature_without_anchors(signed):
    result = signbridge("pkgutil", "--check-signature", str(signed), env={"SIGNBRIDGE_ANCHORS": ""})
    assert result.returncode == 1
    assert result.stdout.splitlines()[1:3] == ["   Status: signed by untrusted certificate", "   Certificate Chain:"]
    assert "no trust anchors are configured" in result.stderr


def test_check_signature_of_a_notarized_package(signed, tmp_path, anchors):
    package = tmp_path / "signed.pkg"
    package.write_bytes(signed.read_bytes())
    notarize(package)
    result = signbridge("pkgutil", "--check-signature", str(package), env=anchors)
    assert result.returncode == 0
    assert result.stdout.splitlines()[2] == "   Notarization: trusted by the Apple notary service"


def test_check_signature_of_a_missing_file(tmp_path):
    result = signbridge("pkgutil", "--check-signature", str(tmp_path / "nope.pkg"))
    assert result.returncode == 1 and result.stderr.startswith("pkgutil: error: ") and result.stdout == ""


def test_expired_certificates_lose_their_expiry_line(tmp_path, pki, tsa):
    leaf = developer_id_installer(pki.intermediate, not_after=dt.datetime.now(dt.UTC) + dt.timedelta(days=1))
    out = tmp_path / "short.pkg"
    sign_package(product_archive(tmp_path / "in.pkg"), out, identity_of(pki, leaf),
                 timestamp=cms_signing.timestamper(tsa.url))
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    verdict = verify_package(out, [pki.root.certificate, tsa.root], at=later)
    lines = render_check_signature(verdict, now=later).splitlines()
    assert lines[1] == '   Status: signed by a certificate trusted by "Test Apple Root CA"'
    assert lines[2].startswith("   Signed with a trusted timestamp on: ")
    assert lines[4].startswith("    1. Developer ID Installer") and lines[5] == "       SHA256 Fingerprint:"
    assert sum(line.startswith("       Expires: ") for line in lines) == 2  # the intermediate and the root


