"""Trust evaluation of signing certificates, on hierarchies shaped like Apple's.

The test PKI (pkikit) mirrors Apple's: a root, a Developer ID-style intermediate carrying the 6.2.6
marker, and leaves with Apple's critical marker extensions and code-signing or installer EKUs.
``openssl verify`` judges the same chains independently.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding
from cryptography.x509.oid import ExtendedKeyUsageOID

from conftest import require_tool
from pkikit import (
    DAY,
    EKU_CODE,
    EKU_DEVID_INSTALLER,
    EKU_MAC_INSTALLER,
    NOW,
    Pki,
    Sha1Chain,
    certificate,
    key_usage,
    make_pki,
    make_sha1_chain,
    marker,
    name,
    new_key,
    resign,
    write_pem,
)
from signbridge.apple import certificates as apple
from signbridge.apple.certificates import APPLE_ROOT_FINGERPRINTS
from signbridge.apple.trust import (
    ANCHORS_ENVIRONMENT_VARIABLE,
    CertificateKind,
    Purpose,
    TrustAnchorError,
    anchors_from_environment,
    classify_certificate,
    evaluate_chain,
    load_anchors,
)
from signbridge.errors import ConfigError


def fingerprint(cert: x509.Certificate) -> frozenset[bytes]:
    return frozenset({cert.fingerprint(hashes.SHA256())})


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


@pytest.fixture(scope="module")
def other_pki() -> Pki:
    return make_pki("Other Root CA")


# ---------------------------------------------------------------------------------------------
# Good chains and how they are described


def test_developer_id_chain_is_trusted_for_code(pki):
    result = evaluate_chain(pki.code, pki.chain, [pki.root], purpose=Purpose.CODE)
    assert result.ok, result.problems
    assert result.problems == ()
    assert result.chain == (pki.code, pki.intermediate, pki.root)
    assert result.anchor == pki.root
    assert result.anchor_subject == "Test Root CA"
    assert not result.apple_anchor and not result.timestamp_used
    assert result.developer_id
    assert result.status == 'signed by a certificate trusted by "Test Root CA"'


def test_installer_chain_is_trusted_for_installers(pki):
    result = evaluate_chain(pki.installer, [pki.intermediate], [pki.root], purpose="installer")
    assert result.ok, result.problems
    assert result.chain == (pki.installer, pki.intermediate, pki.root)


def test_mac_installer_distribution_eku_is_an_installer_eku(pki):
    leaf = pki.leaf(eku=[EKU_MAC_INSTALLER], extensions=[marker(apple.MAC_INSTALLER_DISTRIBUTION)])
    assert evaluate_chain(leaf, [pki.intermediate], [pki.root], purpose=Purpose.INSTALLER).ok
    assert not evaluate_chain(leaf, [pki.intermediate], [pki.root], purpose=Purpose.CODE).ok


def test_apple_root_is_recognised_by_fingerprint(pki):
    """An anchor whose fingerprint is an Apple root's gets Apple's wording."""
    apple_roots = fingerprint(pki.root)
    result = evaluate_chain(pki.code, pki.chain, [pki.root], purpose="code", apple_roots=apple_roots)
    assert result.ok and result.apple_anchor
    assert result.status == "signed by a developer certificate issued by Apple for distribution"


def test_apple_root_without_developer_id_intermediate(pki):
    wwdr_key = new_key("p256")
    wwdr = certificate(
        name("Test WWDR"), wwdr_key, pki.root, pki.root_key, ca=True,
        extensions=[marker(apple.WWDR_INTERMEDIATE, critical=False)],
    )  # fmt: skip
    markers = [marker(apple.APPLE_DISTRIBUTION), marker(apple.IPHONE_DISTRIBUTION)]
    leaf = certificate(name("Apple Distribution: Test"), new_key("p256"), wwdr, wwdr_key, eku=[EKU_CODE],
                       extensions=markers)  # fmt: skip
    result = evaluate_chain(leaf, [wwdr], [pki.root], purpose="code", apple_roots=fingerprint(pki.root))
    assert result.ok and result.apple_anchor and not result.developer_id
    assert result.status == "signed by a certificate trusted by macOS"


def test_known_apple_root_fingerprints():
    # SHA-256 of Apple Root CA (2006), the root of the Developer ID and WWDR chains (reference §5.2).
    assert bytes.fromhex("b0b1730ecbc7ff4505142c49f1295e6eda6bcaed7e2c68c5be91b5a11001f024") in (
        APPLE_ROOT_FINGERPRINTS
    )
    assert all(len(value) == 32 for value in APPLE_ROOT_FINGERPRINTS)


def test_purpose_any_accepts_every_signing_leaf(pki):
    for leaf in (pki.code, pki.installer, pki.ec_code):
        assert evaluate_chain(leaf, pki.chain, [pki.root], purpose="any").ok


def test_pinned_self_signed_leaf(pki):
    key = new_key("p256")
    leaf = certificate(name("Self Signed Code"), key, eku=[EKU_CODE])
    result = evaluate_chain(leaf, [], [leaf], purpose="code")
    assert result.ok, result.problems
    assert result.chain == (leaf,) and result.anchor == leaf


def test_intermediate_given_as_anchor_is_enough(pki):
    result = evaluate_chain(pki.code, [], [pki.intermediate], purpose="code")
    assert result.ok and result.chain == (pki.code, pki.intermediate)


def test_path_found_among_several_anchors_and_decoys(pki, other_pki):
    result = evaluate_chain(
        pki.code,
        [other_pki.intermediate, pki.intermediate, other_pki.root, pki.root],
        [other_pki.root, pki.root],
        purpose="code",
    )
    assert result.ok and result.anchor == pki.root


# ---------------------------------------------------------------------------------------------
# Broken chains: every problem is named


def test_wrong_purpose_code_leaf_for_installer(pki):
    result = evaluate_chain(pki.code, pki.chain, [pki.root], purpose="installer")
    assert not result.ok
    assert result.status == "signed by untrusted certificate"
    (problem,) = result.problems
    assert "is not an installer signing certificate (it is a code signing certificate)" in problem
    assert apple.EKU_DEVELOPER_ID_INSTALLER in problem


def test_wrong_purpose_installer_leaf_for_code(pki):
    result = evaluate_chain(pki.installer, pki.chain, [pki.root], purpose="code")
    assert not result.ok
    assert result.problems == (
        '"Developer ID Installer: Test (TEAM123456)" is not a code signing certificate '
        "(no codeSigning extended key usage)",
    )


def test_leaf_without_eku_fails_code_purpose(pki):
    leaf = pki.leaf(eku=[])
    assert not evaluate_chain(leaf, pki.chain, [pki.root], purpose="code").ok
    assert evaluate_chain(leaf, pki.chain, [pki.root], purpose="any").ok


def test_missing_intermediate(pki):
    result = evaluate_chain(pki.code, [pki.root], [pki.root], purpose="code")
    assert not result.ok and result.anchor is None
    assert result.chain == (pki.code,)
    assert any(
        'the certificate that issued "Developer ID Application: Test (TEAM123456)"' in p
        and "was not found" in p
        for p in result.problems
    ), result.problems


def test_wrong_anchor(pki, other_pki):
    result = evaluate_chain(pki.code, pki.chain, [other_pki.root], purpose="code")
    assert not result.ok and result.anchor is None
    assert result.chain == (pki.code, pki.intermediate, pki.root)
    assert '"Test Root CA", which is not a trusted anchor' in result.problems[0]


def test_no_anchors_configured(pki):
    result = evaluate_chain(pki.code, pki.chain, [], purpose="code")
    assert not result.ok
    assert result.problems[0].startswith("no trust anchors are configured")


def test_forged_signature_with_the_issuers_name(pki):
    forger_key = new_key("p256")
    forged = certificate(name("Forged"), new_key("p256"), pki.intermediate, forger_key, eku=[EKU_CODE])
    result = evaluate_chain(forged, pki.chain, [pki.root], purpose="code")
    assert not result.ok
    assert any("signature does not verify" in p for p in result.problems), result.problems


def test_expired_leaf_without_timestamp(pki):
    leaf = pki.leaf(not_before=NOW - 400 * DAY, not_after=NOW - 10 * DAY)
    result = evaluate_chain(leaf, pki.chain, [pki.root], purpose="code")
    assert not result.ok and result.chain == (leaf, pki.intermediate, pki.root)
    (problem,) = result.problems
    assert "expired on" in problem
    assert "an expired certificate is valid only with a timestamp within its validity" in problem


def test_timestamp_within_validity_rescues_expired_leaf(pki):
    leaf = pki.leaf(not_before=NOW - 400 * DAY, not_after=NOW - 10 * DAY)
    result = evaluate_chain(leaf, pki.chain, [pki.root], purpose="code", timestamp_time=NOW - 20 * DAY)
    assert result.ok, result.problems
    assert result.timestamp_used


@pytest.mark.parametrize("when", [-5, -500], ids=["after-expiry", "before-issue"])
def test_timestamp_outside_validity_does_not_rescue(pki, when):
    leaf = pki.leaf(not_before=NOW - 400 * DAY, not_after=NOW - 10 * DAY)
    stamp = NOW + when * DAY
    result = evaluate_chain(leaf, pki.chain, [pki.root], purpose="code", timestamp_time=stamp)
    assert not result.ok and not result.timestamp_used
    (problem,) = result.problems
    assert f"the timestamp ({stamp:%Y-%m-%d %H:%M:%S} UTC) is not within its validity" in problem


def test_valid_leaf_does_not_need_the_timestamp(pki):
    result = evaluate_chain(pki.code, pki.chain, [pki.root], purpose="code", timestamp_time=NOW - 1000 * DAY)
    assert result.ok and not result.timestamp_used


def test_not_yet_valid_leaf(pki):
    leaf = pki.leaf(not_before=NOW + 10 * DAY, not_after=NOW + 100 * DAY)
    result = evaluate_chain(leaf, pki.chain, [pki.root], purpose="code")
    assert not result.ok
    assert "is not valid until" in result.problems[0]


def test_evaluation_time_is_respected(pki):
    assert not evaluate_chain(pki.code, pki.chain, [pki.root], at=NOW + 400 * DAY).ok
    assert evaluate_chain(pki.code, pki.chain, [pki.root], at=(NOW + DAY).replace(tzinfo=None)).ok


def test_expired_intermediate_rescued_only_by_timestamp_within_it(pki):
    key = new_key("p256")
    old_ca = certificate(name("Old CA"), key, pki.root, pki.root_key, ca=True,
                         not_before=NOW - 900 * DAY, not_after=NOW - 100 * DAY)  # fmt: skip
    leaf = certificate(name("Old leaf"), new_key("p256"), old_ca, key, eku=[EKU_CODE],
                       not_before=NOW - 800 * DAY, not_after=NOW - 200 * DAY)  # fmt: skip
    bad = evaluate_chain(leaf, [old_ca], [pki.root], purpose="code")
    assert not bad.ok and len(bad.problems) == 2  # both expired
    good = evaluate_chain(leaf, [old_ca], [pki.root], purpose="code", timestamp_time=NOW - 300 * DAY)
    assert good.ok and good.timestamp_used


def test_issuer_that_is_not_a_ca(pki):
    fake_key = new_key("p256")
    not_ca = certificate(name("Not A CA"), fake_key, pki.root, pki.root_key, ca=False)
    leaf = certificate(name("Leaf"), new_key("p256"), not_ca, fake_key, eku=[EKU_CODE])
    result = evaluate_chain(leaf, [not_ca], [pki.root], purpose="code")
    assert not result.ok
    assert result.problems == ('"Not A CA" issued "Leaf" but is not a certification authority',)


def test_issuer_without_basic_constraints(pki):
    fake_key = new_key("p256")
    no_bc = certificate(name("No Constraints"), fake_key, pki.root, pki.root_key, ca=None,
                        usage=key_usage(key_cert_sign=True))  # fmt: skip
    leaf = certificate(name("Leaf"), new_key("p256"), no_bc, fake_key, eku=[EKU_CODE])
    result = evaluate_chain(leaf, [no_bc], [pki.root], purpose="code")
    assert not result.ok and "is not a certification authority" in result.problems[0]


def test_path_length_constraint(pki):
    """The intermediate allows no CA below it (pathlen 0), as Apple's Developer ID G2 does."""
    sub_key = new_key("p256")
    sub_ca = certificate(name("Sub CA"), sub_key, pki.intermediate, pki.intermediate_key, ca=True)
    leaf = certificate(name("Leaf"), new_key("p256"), sub_ca, sub_key, eku=[EKU_CODE])
    result = evaluate_chain(leaf, [sub_ca, pki.intermediate], [pki.root], purpose="code")
    assert not result.ok
    assert result.problems == (
        '"Test Developer ID Certification Authority" allows 0 intermediate certificate(s) below it, '
        "but the chain has 1",
    )


def test_issuer_key_usage_must_allow_certificate_signing(pki):
    ca_key = new_key("p256")
    ca = certificate(name("Signing-only CA"), ca_key, pki.root, pki.root_key, ca=True,
                     usage=key_usage(digital_signature=True))  # fmt: skip
    leaf = certificate(name("Leaf"), new_key("p256"), ca, ca_key, eku=[EKU_CODE])
    result = evaluate_chain(leaf, [ca], [pki.root], purpose="code")
    assert result.problems == ('the key usage of "Signing-only CA" does not allow signing certificates',)


def test_leaf_key_usage_must_allow_signatures(pki):
    leaf = pki.leaf(usage=key_usage(key_encipherment=True))
    result = evaluate_chain(leaf, pki.chain, [pki.root], purpose="any")
    assert result.problems == (
        'the key usage of "Developer ID Application: Test (TEAM123456)" does not allow digital signatures',
    )


def test_apple_critical_markers_do_not_fail_but_unknown_critical_extensions_do(pki):
    apple_marked = pki.leaf(extensions=[marker(apple.DEVELOPER_ID_APPLICATION), marker(apple.MAC_DEVELOPER)])
    assert evaluate_chain(apple_marked, pki.chain, [pki.root], purpose="code").ok
    unknown = pki.leaf(extensions=[marker("1.3.6.1.4.1.55555.1")])
    result = evaluate_chain(unknown, pki.chain, [pki.root], purpose="code")
    assert result.problems == (
        '"Developer ID Application: Test (TEAM123456)" has a critical extension signbridge does not '
        "evaluate: 1.3.6.1.4.1.55555.1",
    )
    not_critical = pki.leaf(extensions=[marker("1.3.6.1.4.1.55555.1", False)])
    assert evaluate_chain(not_critical, pki.chain, [pki.root]).ok


def test_critical_name_constraints_are_not_silently_ignored(pki):
    ca_key = new_key("p256")
    constraints = x509.NameConstraints(permitted_subtrees=[x509.DNSName("example.com")],
                                       excluded_subtrees=None)  # fmt: skip
    ca = certificate(name("Constrained CA"), ca_key, pki.root, pki.root_key, ca=True,
                     extensions=[(constraints, True)])  # fmt: skip
    leaf = certificate(name("Leaf"), new_key("p256"), ca, ca_key, eku=[EKU_CODE])
    result = evaluate_chain(leaf, [ca], [pki.root], purpose="code")
    assert not result.ok
    assert "critical extension signbridge does not evaluate: nameConstraints" in result.problems[0]


def test_several_problems_are_all_reported(pki):
    leaf = pki.leaf(eku=[EKU_DEVID_INSTALLER], not_before=NOW - 400 * DAY, not_after=NOW - 10 * DAY,
                    extensions=[marker("1.3.6.1.4.1.55555.2")])  # fmt: skip
    result = evaluate_chain(leaf, pki.chain, [pki.root], purpose="code")
    assert len(result.problems) == 3
    joined = "\n".join(result.problems)
    for expected in ("critical extension", "not a code signing certificate", "expired"):
        assert expected in joined


# ---------------------------------------------------------------------------------------------
# openssl verify judges the same chains


def _openssl_verify(tmp_path: Path, leaf, untrusted, anchors, at: dt.datetime | None = None) -> bool:
    args = [require_tool("openssl"), "verify", "-ignore_critical", "-purpose", "any"]
    args += ["-CAfile", str(write_pem(tmp_path / "anchors.pem", *anchors))]
    if untrusted:
        args += ["-untrusted", str(write_pem(tmp_path / "untrusted.pem", *untrusted))]
    if at is not None:
        args += ["-attime", str(int(at.timestamp()))]
    args.append(str(write_pem(tmp_path / "leaf.pem", leaf)))
    return subprocess.run(args, capture_output=True, text=True).returncode == 0


def test_openssl_agrees(pki, other_pki, tmp_path):
    expired = pki.leaf(not_before=NOW - 400 * DAY, not_after=NOW - 10 * DAY)
    forged = certificate(name("Forged"), new_key("p256"), pki.intermediate, new_key("p256"), eku=[EKU_CODE])
    sub_key = new_key("p256")
    sub_ca = certificate(name("Sub CA"), sub_key, pki.intermediate, pki.intermediate_key, ca=True)
    too_deep = certificate(name("Too deep"), new_key("p256"), sub_ca, sub_key, eku=[EKU_CODE])
    cases = [
        (pki.code, pki.chain, [pki.root], None, True),
        (pki.installer, [pki.intermediate], [pki.root], None, True),
        (pki.code, [pki.root], [pki.root], None, False),
        (pki.code, pki.chain, [other_pki.root], None, False),
        (expired, pki.chain, [pki.root], None, False),
        (expired, pki.chain, [pki.root], NOW - 20 * DAY, True),
        (forged, pki.chain, [pki.root], None, False),
        (too_deep, [sub_ca, pki.intermediate], [pki.root], None, False),
    ]
    for index, (leaf, untrusted, anchors, at, expected) in enumerate(cases):
        ours = evaluate_chain(leaf, untrusted, anchors, at=at).ok
        theirs = _openssl_verify(tmp_path, leaf, untrusted, anchors, at)
        assert ours == theirs == expected, f"case {index}: ours={ours} openssl={theirs}"


# ---------------------------------------------------------------------------------------------
# Certificate kinds


@pytest.mark.parametrize(
    ("markers", "eku", "kind"),
    [
        ([apple.DEVELOPER_ID_APPLICATION], [EKU_CODE], CertificateKind.DEVELOPER_ID_APPLICATION),
        ([apple.DEVELOPER_ID_INSTALLER], [EKU_DEVID_INSTALLER], CertificateKind.DEVELOPER_ID_INSTALLER),
        ([apple.DEVELOPER_ID_KERNEL], [], CertificateKind.DEVELOPER_ID_KERNEL),
        ([apple.IPHONE_DEVELOPER, apple.MAC_DEVELOPER], [EKU_CODE], CertificateKind.APPLE_DEVELOPMENT),
        ([apple.APPLE_DISTRIBUTION, apple.IPHONE_DISTRIBUTION], [EKU_CODE],
         CertificateKind.APPLE_DISTRIBUTION),  # fmt: skip
        ([apple.APPLE_DISTRIBUTION], [EKU_CODE], CertificateKind.MAC_APP_DISTRIBUTION),
        ([apple.MAC_INSTALLER_DISTRIBUTION], [EKU_MAC_INSTALLER], CertificateKind.MAC_INSTALLER_DISTRIBUTION),
        ([apple.MAC_DEVELOPER], [EKU_CODE], CertificateKind.MAC_DEVELOPER),
        ([apple.IPHONE_DEVELOPER], [EKU_CODE], CertificateKind.IPHONE_DEVELOPER),
        ([apple.IPHONE_DISTRIBUTION], [EKU_CODE], CertificateKind.IPHONE_DISTRIBUTION),
        ([], [EKU_CODE], CertificateKind.CODE_SIGNING),
        ([], [EKU_MAC_INSTALLER], CertificateKind.INSTALLER_SIGNING),
        ([], [ExtendedKeyUsageOID.SERVER_AUTH], CertificateKind.OTHER),
    ],
)
def test_classify_certificate(pki, markers, eku, kind):
    leaf = pki.leaf(eku=eku, extensions=[marker(oid) for oid in markers])
    assert classify_certificate(leaf) is kind
    assert kind.apple_issued == bool(markers)
    assert kind.label == kind.value


# ---------------------------------------------------------------------------------------------
# Loading anchors


def test_load_anchors_from_pem_bundle(pki, other_pki, tmp_path):
    path = write_pem(tmp_path / "bundle.pem", pki.root, other_pki.root, pki.root)
    assert load_anchors(path) == [pki.root, other_pki.root]
    assert load_anchors(str(path)) == [pki.root, other_pki.root]


def test_load_anchors_from_der_file(pki, tmp_path):
    path = tmp_path / "AppleRootCA.cer"
    path.write_bytes(pki.root.public_bytes(serialization.Encoding.DER))
    assert load_anchors(path) == [pki.root]


def test_load_anchors_from_directory(pki, other_pki, tmp_path):
    (tmp_path / "a.cer").write_bytes(pki.root.public_bytes(serialization.Encoding.DER))
    write_pem(tmp_path / "b.pem", other_pki.root, pki.intermediate)
    (tmp_path / ".hidden").write_bytes(b"not a certificate")
    (tmp_path / "sub").mkdir()
    assert load_anchors(tmp_path) == [pki.root, other_pki.root, pki.intermediate]


def test_load_anchors_none_is_empty():
    assert load_anchors(None) == []
    assert load_anchors("") == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"hello, not a certificate", "is neither a PEM nor a DER certificate"),
        (b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n", "no readable PEM"),
    ],
)
def test_load_anchors_bad_file(tmp_path, content, message):
    path = tmp_path / "anchors.pem"
    path.write_bytes(content)
    with pytest.raises(TrustAnchorError, match=message) as caught:
        load_anchors(path)
    assert str(path) in str(caught.value)
    assert isinstance(caught.value, ConfigError)
    assert path.read_bytes() == content


def test_load_anchors_missing_path(tmp_path):
    with pytest.raises(TrustAnchorError, match="does not exist"):
        load_anchors(tmp_path / "nope.pem")


def test_load_anchors_empty_directory(tmp_path):
    with pytest.raises(TrustAnchorError, match="holds no certificate files"):
        load_anchors(tmp_path)


def test_load_anchors_directory_with_a_bad_file(pki, tmp_path):
    write_pem(tmp_path / "good.pem", pki.root)
    (tmp_path / "README").write_text("these are my anchors\n")
    with pytest.raises(TrustAnchorError, match="README is neither a PEM nor a DER certificate"):
        load_anchors(tmp_path)


def test_load_anchors_unreadable_file():
    """/proc/self/mem exists but cannot be read from offset 0, whoever runs the tests."""
    with pytest.raises(TrustAnchorError, match="cannot read the trust anchors file /proc/self/mem"):
        load_anchors("/proc/self/mem")


def test_anchors_from_environment_prefers_the_variable(pki, other_pki, tmp_path):
    configured = write_pem(tmp_path / "configured.pem", pki.root)
    from_env = write_pem(tmp_path / "env.pem", other_pki.root)
    assert anchors_from_environment(configured, environ={}) == [pki.root]
    assert anchors_from_environment(configured, environ={ANCHORS_ENVIRONMENT_VARIABLE: str(from_env)}) == [
        other_pki.root
    ]
    both = f"{from_env}{os.pathsep}{configured}"
    assert anchors_from_environment(None, environ={ANCHORS_ENVIRONMENT_VARIABLE: both}) == [
        other_pki.root,
        pki.root,
    ]
    assert anchors_from_environment(None, environ={}) == []


def test_anchors_from_environment_reads_os_environ(pki, tmp_path, monkeypatch):
    path = write_pem(tmp_path / "env.pem", pki.root)
    monkeypatch.setenv(ANCHORS_ENVIRONMENT_VARIABLE, str(path))
    assert anchors_from_environment() == [pki.root]
    monkeypatch.setenv(ANCHORS_ENVIRONMENT_VARIABLE, str(tmp_path / "gone.pem"))
    with pytest.raises(TrustAnchorError, match="gone.pem does not exist"):
        anchors_from_environment()


# ---------------------------------------------------------------------------------------------
# Certificates signed with SHA-1, as Apple's older chains are


def _openssl_verify_sha1(tmp_path: Path, leaf, untrusted, anchors) -> subprocess.CompletedProcess:
    """openssl verify at authentication level 0, where SHA-1 certificate signatures count."""
    args = [require_tool("openssl"), "verify", "-auth_level", "0", "-ignore_critical", "-purpose", "any"]
    args += ["-CAfile", str(write_pem(tmp_path / "anchors.pem", *anchors))]
    args += ["-untrusted", str(write_pem(tmp_path / "untrusted.pem", *untrusted))]
    args.append(str(write_pem(tmp_path / "leaf.pem", leaf)))
    return subprocess.run(args, capture_output=True, text=True)


@pytest.fixture(scope="module")
def sha1_chain() -> Sha1Chain:
    return make_sha1_chain()


@pytest.mark.parametrize("leaf", ["mac_developer", "apple_development"])
def test_sha1_signed_chain_is_trusted(sha1_chain, leaf, tmp_path):
    certificate_ = getattr(sha1_chain, leaf)
    chain = [sha1_chain.intermediate, sha1_chain.root]
    result = evaluate_chain(certificate_, chain, [sha1_chain.root], purpose="code")
    assert result.ok, result.problems
    assert result.chain == (certificate_, sha1_chain.intermediate, sha1_chain.root)
    assert sha1_chain.intermediate.signature_hash_algorithm.name == "sha1"
    checked = _openssl_verify_sha1(tmp_path, certificate_, chain, [sha1_chain.root])
    assert checked.returncode == 0, checked.stderr


def test_tampered_sha1_certificate_fails(sha1_chain, tmp_path):
    der = bytearray(sha1_chain.intermediate.public_bytes(serialization.Encoding.DER))
    der[-10] ^= 0x01  # inside the signature value
    tampered = x509.load_der_x509_certificate(bytes(der))
    result = evaluate_chain(sha1_chain.mac_developer, [tampered], [sha1_chain.root], purpose="code")
    assert not result.ok
    assert any("its signature does not verify with that certificate's key" in p for p in result.problems)
    checked = _openssl_verify_sha1(tmp_path, sha1_chain.mac_developer, [tampered], [sha1_chain.root])
    assert checked.returncode != 0


def test_md5_signed_certificate_is_refused(sha1_chain):
    weak = resign(sha1_chain.intermediate, sha1_chain.root_key, hashes.MD5())  # noqa: S303
    result = evaluate_chain(sha1_chain.mac_developer, [weak], [sha1_chain.root], purpose="code")
    assert not result.ok
    assert any("uses MD5, which is too weak to trust" in p for p in result.problems), result.problems


# ---------------------------------------------------------------------------------------------
# Expired certificates, when the caller tolerates them (codesign --verify)


def test_allow_expired_accepts_an_expired_chain_and_says_so(pki):
    leaf = pki.leaf(not_before=NOW - 400 * DAY, not_after=NOW - 10 * DAY)
    result = evaluate_chain(leaf, pki.chain, [pki.root], purpose="code", allow_expired=True)
    assert result.ok and result.expired == (leaf,) and not result.timestamp_used
    within = evaluate_chain(
        leaf, pki.chain, [pki.root], purpose="code", allow_expired=True, timestamp_time=NOW - 20 * DAY
    )
    assert within.ok and within.expired == () and within.timestamp_used


def test_allow_expired_still_refuses_what_is_not_valid_yet_or_untrusted(pki, other_pki):
    early = pki.leaf(not_before=NOW + 10 * DAY, not_after=NOW + 100 * DAY)
    result = evaluate_chain(early, pki.chain, [pki.root], purpose="code", allow_expired=True)
    assert not result.ok and "is not valid until" in result.problems[0]
    expired = pki.leaf(not_before=NOW - 400 * DAY, not_after=NOW - 10 * DAY)
    assert not evaluate_chain(expired, pki.chain, [other_pki.root], allow_expired=True).ok


def _signed(subject: x509.Name, public_key, issuer: x509.Name, issuer_key, kind: str, ca: bool) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + DAY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([EKU_CODE]), critical=True)
    if kind == "rsa-pss":
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        return builder.sign(issuer_key, hashes.SHA256(), rsa_padding=pss)
    return builder.sign(issuer_key, None)


@pytest.mark.parametrize("kind", ["rsa-pss", "ed25519"])
def test_other_certificate_signature_algorithms(kind):
    def key():
        return new_key("rsa") if kind == "rsa-pss" else ed25519.Ed25519PrivateKey.generate()

    root_key, impostor_key = key(), key()
    root_name = name(f"{kind} root")
    root = _signed(root_name, root_key.public_key(), root_name, root_key, kind, ca=True)
    impostor = _signed(root_name, impostor_key.public_key(), root_name, impostor_key, kind, ca=True)
    leaf = _signed(name(f"{kind} leaf"), new_key("p256").public_key(), root_name, root_key, kind, ca=False)
    assert evaluate_chain(leaf, [], [root], purpose="code").ok
    refused = evaluate_chain(leaf, [], [impostor], purpose="code")
    assert not refused.ok
    assert any("its signature does not verify with that certificate's key" in p for p in refused.problems)
