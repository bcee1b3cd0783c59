"""Certificate chains as Apple's codesign accepts them, through ``signbridge codesign --verify``.

Chains whose certificates are signed with SHA-1 (as Apple Root CA and the older WWDR intermediate
are) verify; a tampered SHA-1 certificate does not. An expired certificate without a timestamp is
"valid on disk" as Apple says, and fails only under signbridge's ``--check-expiry``; an expired
certificate with a timestamp inside its validity is valid under both, shown on real Apple output
from the corpus. openssl checks the CMS and the chain independently.
"""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

import machofixtures
from codesignkit import RecordingSigner, codesign, local_identity, pem, raw_signature
from conftest import require_tool
from corpuskit import apple_anchor_env, corpus_item
from pkikit import make_sha1_chain
from signbridge.apple import codesign as cs
from signbridge.apple.codesig.options import CodesignOptions
from signbridge.crypto.identity import Identity
from tokenkit import apple_pki, developer_id_application


@pytest.fixture(scope="session")
def fx(tmp_path_factory: pytest.TempPathFactory):
    return machofixtures.get_fixtures(tmp_path_factory)


@pytest.fixture(scope="module")
def sha1_chain():
    return make_sha1_chain()


def signed_copy(fx, directory: Path, identity: Identity) -> Path:
    target = directory / "tool"
    shutil.copyfile(fx.path("exe.arm64"), target)
    os.chmod(target, 0o755)
    cs.sign_code(target, identity, CodesignOptions())
    return target


def anchors_env(directory: Path, *certificates) -> dict[str, str]:
    path = directory / "anchors.pem"
    path.write_bytes(b"".join(pem(certificate) for certificate in certificates))
    return {"SIGNBRIDGE_ANCHORS": str(path), "SIGNBRIDGE_TIMESTAMP_URL": ""}


def openssl_cms_sha1(directory: Path, tool: Path, root) -> subprocess.CompletedProcess:
    """openssl cms -verify over the primary CodeDirectory, at authentication level 0 (SHA-1 counts)."""
    raw = raw_signature(tool.read_bytes())
    (directory / "sig.der").write_bytes(raw.cms)
    (directory / "cd.bin").write_bytes(raw.code_directories[0])
    (directory / "root.pem").write_bytes(pem(root))
    return subprocess.run(
        [require_tool("openssl"), "cms", "-verify", "-binary", "-inform", "DER", "-auth_level", "0",
         "-in", str(directory / "sig.der"), "-content", str(directory / "cd.bin"),
         "-CAfile", str(directory / "root.pem"), "-purpose", "any", "-ignore_critical", "-out", os.devnull],
        capture_output=True, text=True, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("leaf", ["mac_developer", "apple_development"])
def test_sha1_signed_chain_verifies(fx, tmp_path, sha1_chain, leaf):
    certificate = getattr(sha1_chain, leaf)
    identity = Identity(
        certificate, (sha1_chain.intermediate, sha1_chain.root), RecordingSigner(sha1_chain.leaf_key), "local"
    )
    tool = signed_copy(fx, tmp_path, identity)
    env = anchors_env(tmp_path, sha1_chain.root)
    verified = codesign("--verify", "--strict", "-v", tool, env=env)
    assert verified.returncode == 0, verified.stderr
    assert verified.stderr == f"{tool}: valid on disk\n{tool}: satisfies its Designated Requirement\n"
    checked = openssl_cms_sha1(tmp_path, tool, sha1_chain.root)
    assert checked.returncode == 0, checked.stderr


def test_tampered_sha1_certificate_fails(fx, tmp_path, sha1_chain):
    identity = Identity(
        sha1_chain.mac_developer,
        (sha1_chain.intermediate, sha1_chain.root),
        RecordingSigner(sha1_chain.leaf_key),
        "local",
    )
    tool = signed_copy(fx, tmp_path, identity)
    data = bytearray(tool.read_bytes())
    der = sha1_chain.intermediate.public_bytes(serialization.Encoding.DER)
    at = bytes(data).index(der)
    data[at + len(der) - 10] ^= 0x01  # a bit of the intermediate's SHA-1 signature
    tool.write_bytes(bytes(data))
    verified = codesign("--verify", "--strict", "-v", tool, env=anchors_env(tmp_path, sha1_chain.root))
    assert verified.returncode == 1
    lines = verified.stderr.splitlines()
    assert lines[0] == f"{tool}: CSSMERR_TP_NOT_TRUSTED"
    assert "its signature does not verify with that certificate's key" in verified.stderr
    assert openssl_cms_sha1(tmp_path, tool, sha1_chain.root).returncode != 0


def test_expired_without_timestamp_is_valid_unless_check_expiry(fx, tmp_path):
    pki = apple_pki()
    expired_leaf = developer_id_application(
        pki.intermediate,
        not_before=datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC),
        not_after=datetime.datetime(2021, 1, 1, tzinfo=datetime.UTC),
    )
    tool = signed_copy(fx, tmp_path, local_identity(pki, expired_leaf)[0])
    env = anchors_env(tmp_path, pki.root.certificate)
    default = codesign("--verify", "--strict", "-v", tool, env=env)
    assert default.returncode == 0, default.stderr
    assert default.stderr.splitlines()[0] == f"{tool}: valid on disk"
    strict = codesign("--verify", "--strict", "--check-expiry", "-v", tool, env=env)
    assert strict.returncode == 1
    lines = strict.stderr.splitlines()
    assert lines[0] == f"{tool}: CSSMERR_TP_CERT_EXPIRED"
    assert "expired on 2021-01-01 00:00:00 UTC" in lines[1]


@pytest.mark.parametrize(
    "item",
    [
        # leaf expired 2026-02-08, timestamp 2023-03-12
        "bundles/sparkle-project_Sparkle__DevSignedApp.app",
        # leaf expired 2018-11-09, timestamp 2016-09-29, SHA-1 + SHA-256 CodeDirectories
        "bundles/pqrs-org_Karabiner-VirtualHIDDevice-archived__org.pqrs.driver.VirtualHIDManager.kext",
    ],
)
def test_expired_with_timestamp_inside_validity_is_valid_under_both(item):
    path = corpus_item(item)
    for extra in ((), ("--check-expiry",)):
        verified = codesign("--verify", "--strict", "--deep", "-v", *extra, path, env=apple_anchor_env())
        assert verified.returncode == 0, verified.stderr
        assert verified.stderr.splitlines()[0] == f"{path}: valid on disk"


@pytest.mark.parametrize(
    "item",
    [
        "bundles/achow101_signapple__signapple-test-universal.app",  # WWDR intermediate signed with SHA-1
        "macho/northpolesec_santa__yikes-universal_signed",  # Mac Developer, i386 + x86_64
        "macho/northpolesec_santa__signed-with-teamid",
    ],
)
def test_real_expired_untimestamped_apple_chains(item):
    """Apple's answer for these is "valid on disk"; the strict check names the expired leaf."""
    path = corpus_item(item)
    verified = codesign("--verify", "--strict", "--deep", "-v", path, env=apple_anchor_env())
    assert verified.returncode == 0, verified.stderr
    strict = codesign("--verify", "--strict", "--deep", "--check-expiry", path, env=apple_anchor_env())
    assert strict.returncode == 1
    assert strict.stderr.splitlines()[0] == f"{path}: CSSMERR_TP_CERT_EXPIRED"
