"""The keychain over real tokens: sockets, p11-kit RPC, the pure-Python client; openssl verifies.

Tokens are served by tests/tokenkit.py with the Apple-shaped test PKI and a local signer standing
in for the signing service; each test has its own runtime directory (SIGNBRIDGE_RUNTIME_DIR).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import subprocess
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from conftest import require_tool, run
from signbridge.apple.certificates import Usage, team_identifier, usage
from signbridge.apple.codesig.cms_signing import sign_detached
from signbridge.crypto.hashes import HashAlgorithm
from signbridge.crypto.signatures import Scheme, SignatureRequest
from signbridge.errors import NotFoundError, SignatureError
from signbridge.keychain.discovery import discover, validity_problem
from signbridge.keychain.selection import (
    AmbiguousIdentityError,
    NoIdentityError,
    UnsuitableIdentityError,
    select_identity,
)
from signbridge.keychain.tokens import NoTokenError, find_tokens
from signbridge.pkcs11 import Pkcs11Client, authority_object, objects_for_identity
from tokenkit import (
    LocalSigner,
    apple_name,
    apple_pki,
    developer_id_application,
    issue,
    rsa_key,
    serve_objects,
    serve_token,
    use_runtime_dir,
    write_stale_record,
)

PAST = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=400)


@pytest.fixture(scope="module")
def pki():
    return apple_pki()


@pytest.fixture(scope="module")
def other_pki(pki):
    return apple_pki("Other Corp", "OTHER12345", issuer=pki)


@pytest.fixture
def runtime(tmp_path, monkeypatch) -> Path:
    return use_runtime_dir(tmp_path, monkeypatch)


@pytest.fixture
def alpha(runtime, pki):
    with serve_token("alpha", pki.identities, pki.authorities) as token:
        yield token


@pytest.fixture
def beta(runtime, other_pki):
    with serve_token("beta", other_pki.identities, other_pki.authorities) as token:
        yield token


def _by_name(identities):
    return {identity.common_name: identity for identity in identities}


# --- discovery ----------------------------------------------------------------------------------


def test_lists_the_identities_of_a_token_with_their_chains(alpha, pki, tmp_path):
    identities = list(discover().identities)
    found = _by_name(identities)
    assert sorted(found) == sorted(identity.common_name for identity in pki.identities)
    assert {identity.source for identity in identities} == {"alpha"}
    assert usage(found[pki.application.common_name].certificate) is Usage.CODE
    assert usage(found[pki.installer.common_name].certificate) is Usage.INSTALLER
    assert usage(found[pki.document.common_name].certificate) is Usage.OTHER
    assert team_identifier(found[pki.application.common_name].certificate, found[pki.application.common_name].chain) == "TEAM123456"
    for identity in identities:
        assert identity.chain == (pki.intermediate.certificate, pki.root.certificate)
        assert validity_problem(identity) is None

    # openssl builds the same path from the chain the keychain found
    identity = found[pki.application.common_name]
    leaf, untrusted, root = tmp_path / "leaf.pem", tmp_path / "untrusted.pem", tmp_path / "root.pem"
    leaf.write_bytes(identity.certificate.public_bytes(serialization.Encoding.PEM))
    untrusted.write_bytes(identity.chain[0].public_bytes(serialization.Encoding.PEM))
    root.write_bytes(identity.chain[-1].public_bytes(serialization.Encoding.PEM))
    openssl = require_tool("openssl")
    # -ignore_critical: Apple's leaf markers are critical private extensions, as on real certificates
    argv = [openssl, "verify", "-ignore_critical", "-CAfile", root, "-untrusted", untrusted, leaf]
    out = run(argv, text=True)
    assert out.stdout.strip() == f"{leaf}: OK"


def test_chain_is_built_by_signature_not_by_name(runtime, pki):
    # an impostor CA with the intermediate's exact subject but another key must not be chosen
    impostor = apple_pki().intermediate
    assert impostor.certificate.subject == pki.intermediate.certificate.subject
    objects = [
        *objects_for_identity(pki.application.certificate, pki.application.key_id, "app"),
        authority_object(impostor.certificate, b"impostor"),
        authority_object(pki.intermediate.certificate),
        authority_object(pki.root.certificate),
    ]
    with serve_objects("gamma", objects, LocalSigner.of([pki.application])):
        (identity,) = list(discover().identities)
    assert identity.chain == (pki.intermediate.certificate, pki.root.certificate)


def test_missing_intermediate_leaves_the_chain_short_and_untrusted(runtime, pki):
    with serve_token("short", [pki.application], [pki.root.certificate]):
        (identity,) = list(discover().identities)
    assert identity.chain == ()
    assert validity_problem(identity) == "CSSMERR_TP_NOT_TRUSTED"


def test_a_self_signed_identity_is_listed_but_not_trusted(runtime, pki):
    self_signed = issue(apple_name("Local Code Signing"), rsa_key(), None, key_id="local/self")
    with serve_token("local", [self_signed], pki.authorities):
        (identity,) = list(discover().identities)
    assert identity.chain == ()
    assert validity_problem(identity) == "CSSMERR_TP_NOT_TRUSTED"


def test_a_certificate_without_a_private_key_is_not_an_identity(runtime, pki):
    objects = [
        *objects_for_identity(pki.application.certificate, pki.application.key_id, "app"),
        objects_for_identity(pki.installer.certificate, pki.installer.key_id, "installer")[0],  # cert only
        authority_object(pki.intermediate.certificate),
    ]
    with serve_objects("gamma", objects, LocalSigner.of([pki.application])):
        identities = list(discover().identities)
    assert [identity.common_name for identity in identities] == [pki.application.common_name]


def test_two_tokens_side_by_side(alpha, beta, pki, other_pki):
    identities = list(discover().identities)
    expected = [("alpha", i.common_name) for i in pki.identities]
    expected += [("beta", i.common_name) for i in other_pki.identities]
    assert sorted((i.source, i.common_name) for i in identities) == sorted(expected)
    only_beta = list(discover(tokens=find_tokens(["beta"])).identities)
    assert {identity.source for identity in only_beta} == {"beta"}
    assert find_tokens(["io.signbridge.token:alpha"])[0].name == "alpha"


def test_no_token_running(runtime):
    with pytest.raises(NoTokenError) as caught:
        list(discover().identities)
    assert str(caught.value) == "no signbridge token is running; start one with `signbridge start`"
    with pytest.raises(NoTokenError):
        select_identity("TEAM123456", usage=Usage.CODE)
    assert issubclass(NoTokenError, NotFoundError)


def test_unknown_token_name_lists_the_running_ones(alpha, beta):
    with pytest.raises(NoTokenError) as caught:
        find_tokens(["gamma"])
    assert str(caught.value) == 'no signbridge token named "gamma" is running (running: alpha, beta)'


def test_stale_records_are_ignored(runtime, pki):
    write_stale_record("ghost")  # its process is gone
    with pytest.raises(NoTokenError):
        list(discover().identities)
    stopped = serve_token("stopped", [pki.application], pki.authorities)
    stopped.stop(keep_record=True)  # our pid lives on, but nothing listens on its socket
    with serve_token("alpha", [pki.installer], pki.authorities):
        identities = list(discover().identities)
        assert [(identity.source, identity.common_name) for identity in identities] == [
            ("alpha", pki.installer.common_name)
        ]
        assert [token.name for token in find_tokens()] == ["alpha"]


def test_a_wrong_pin_is_reported_without_the_pin(alpha):
    found = discover(pin="s3cret-guess")
    assert found.identities == ()
    (problem,) = found.problems
    assert "did not accept the PIN" in problem
    assert "alpha" in problem
    assert "s3cret-guess" not in problem


def test_an_unreadable_token_does_not_hide_the_others(runtime, pki, other_pki):
    with (
        serve_token("alpha", pki.identities, pki.authorities, pin="other-pin"),
        serve_token("beta", other_pki.identities, other_pki.authorities),
    ):
        found = discover()
        assert {identity.source for identity in found.identities} == {"beta"}
        assert found.problems == ("token alpha could not be read: the token alpha did not accept the PIN",)
        with pytest.raises(NoIdentityError) as caught:
            select_identity("Test Corp", usage=Usage.CODE)
        assert str(caught.value) == (
            "Test Corp: no identity found "
            "(token alpha could not be read: the token alpha did not accept the PIN)"
        )


# --- selection ----------------------------------------------------------------------------------


def test_select_by_sha1_sha256_exact_name_and_substring(alpha, pki):
    application = pki.application
    for name in (application.sha1, application.sha1.lower(), application.sha256, application.sha256.lower()):
        assert select_identity(name, usage=None).certificate == application.certificate
    by_name = select_identity(application.common_name, usage=None)
    assert by_name.certificate == application.certificate
    assert select_identity("Application: Test", usage=None).certificate == application.certificate
    assert select_identity("Document Signing", usage=None).certificate == pki.document.certificate


def test_a_hash_selects_by_fingerprint_only(alpha, pki):
    # 40 hex digits that are not a fingerprint match nothing, even if they were in a name
    with pytest.raises(NoIdentityError, match=r"^0{40}: no identity found$"):
        select_identity("0" * 40, usage=None)


def test_names_are_case_sensitive(alpha):
    with pytest.raises(NoIdentityError, match=r"^developer id application: no identity found$"):
        select_identity("developer id application", usage=None)


def test_exact_name_wins_over_substring_matches(runtime, pki):
    longer = developer_id_application(pki.intermediate, "Test Corp", "TEAM123456 Renewed", key_id="p/renewed")
    assert pki.application.common_name.removesuffix(")") in longer.common_name
    with serve_token("alpha", [pki.application, longer], pki.authorities):
        exact = select_identity(pki.application.common_name, usage=Usage.CODE)
        assert exact.certificate == pki.application.certificate
        with pytest.raises(AmbiguousIdentityError):
            select_identity("Developer ID Application: Test Corp", usage=Usage.CODE)


def test_team_id_selects_by_usage(alpha, pki):
    code = select_identity("TEAM123456", usage=Usage.CODE)
    installer = select_identity("TEAM123456", usage=Usage.INSTALLER)
    assert code.certificate == pki.application.certificate
    assert installer.certificate == pki.installer.certificate
    with pytest.raises(AmbiguousIdentityError) as caught:
        select_identity("TEAM123456", usage=None)
    assert str(caught.value) == (
        'TEAM123456: ambiguous (matches "Developer ID Application: Test Corp (TEAM123456)", '
        '"Developer ID Installer: Test Corp (TEAM123456)" and '
        '"Test Corp Document Signing (TEAM123456)" in alpha)'
    )
    assert len(caught.value.candidates) == 3


def test_ambiguous_across_two_tokens(alpha, beta, pki):
    with pytest.raises(AmbiguousIdentityError) as caught:
        select_identity("Developer ID Application", usage=Usage.CODE)
    assert str(caught.value) == (
        "Developer ID Application: ambiguous ("
        'matches "Developer ID Application: Test Corp (TEAM123456)" in alpha '
        'and "Developer ID Application: Other Corp (OTHER12345)" in beta)'
    )
    chosen = select_identity(
        "Developer ID Application", usage=Usage.CODE, tokens=find_tokens(["beta"])
    )
    assert (chosen.source, team_identifier(chosen.certificate, chosen.chain)) == ("beta", "OTHER12345")


def test_the_same_certificate_on_two_tokens_is_ambiguous(runtime, pki):
    with (
        serve_token("alpha", [pki.application], pki.authorities),
        serve_token("beta", [pki.application], pki.authorities),
    ):
        with pytest.raises(AmbiguousIdentityError) as caught:
            select_identity(pki.application.sha1, usage=Usage.CODE)
        name = pki.application.common_name
        expected = f'{pki.application.sha1}: ambiguous (matches "{name}" in alpha and "{name}" in beta)'
        assert str(caught.value) == expected


def test_codesign_names_an_installer_identity(alpha):
    with pytest.raises(UnsuitableIdentityError) as caught:
        select_identity("Developer ID Installer", usage=Usage.CODE)
    assert str(caught.value) == (
        "Developer ID Installer: this identity cannot be used for signing code (it is an installer identity; "
        "a code signing identity such as Developer ID Application is needed)"
    )
    assert isinstance(caught.value, NoIdentityError)
    with pytest.raises(UnsuitableIdentityError) as caught:
        select_identity("Document Signing", usage=Usage.CODE)
    assert "(its certificate is not for code signing;" in str(caught.value)


def test_productsign_names_an_application_identity(alpha):
    with pytest.raises(UnsuitableIdentityError) as caught:
        select_identity("Developer ID Application", usage=Usage.INSTALLER)
    assert str(caught.value) == (
        '"Developer ID Application" matches only application signing identities. '
        "An installer signing identity (not an application signing identity) "
        "is required for signing flat-style products."
    )


def test_no_identity_found(alpha):
    with pytest.raises(NoIdentityError) as caught:
        select_identity("Apple Distribution", usage=Usage.CODE)
    assert str(caught.value) == "Apple Distribution: no identity found"
    assert not isinstance(caught.value, UnsuitableIdentityError)
    with pytest.raises(NoIdentityError):
        select_identity("", usage=None)


def test_expired_certificates_are_passed_over(runtime, pki):
    expired = developer_id_application(
        pki.intermediate, key_id="p/old", not_before=PAST, not_after=PAST + datetime.timedelta(days=30)
    )
    assert expired.common_name == pki.application.common_name
    with serve_token("alpha", [expired], pki.authorities):
        (identity,) = list(discover().identities)
        assert validity_problem(identity) == "CSSMERR_TP_CERT_EXPIRED"
        with pytest.raises(NoIdentityError) as caught:
            select_identity("TEAM123456", usage=Usage.CODE)
        expiry = (PAST + datetime.timedelta(days=30)).strftime("%Y-%m-%d %H:%M:%S UTC")
        reason = f'"{expired.common_name}" in alpha expired on {expiry}'
        assert str(caught.value) == f"TEAM123456: no identity found ({reason})"
    with serve_token("alpha", [expired, pki.application], pki.authorities):
        chosen = select_identity(pki.application.common_name, usage=Usage.CODE)
        assert chosen.certificate == pki.application.certificate
        then = PAST + datetime.timedelta(days=10)  # when only the old one was valid
        old = select_identity(pki.application.common_name, usage=Usage.CODE, now=then)
        assert old.certificate == expired.certificate


def test_not_yet_valid_is_reported(runtime, pki):
    future = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=10)
    early = developer_id_application(pki.intermediate, key_id="p/early", not_before=future)
    with serve_token("alpha", [early], pki.authorities):
        (identity,) = list(discover().identities)
    assert validity_problem(identity) == "CSSMERR_TP_CERT_NOT_VALID_YET"


# --- signing through the token ------------------------------------------------------------------


def _openssl_verify(tmp_path: Path, public_pem: bytes, digest: bytes, signature: bytes, options: list[str]):
    key, data, sig = tmp_path / "key.pub", tmp_path / "digest.bin", tmp_path / "sig.bin"
    key.write_bytes(public_pem)
    data.write_bytes(digest)
    sig.write_bytes(signature)
    argv = [require_tool("openssl"), "pkeyutl", "-verify", "-pubin", "-inkey", key]
    argv += ["-in", data, "-sigfile", sig]
    for option in options:
        argv += ["-pkeyopt", option]
    return subprocess.run(argv, capture_output=True, text=True)


def _public_pem(certificate) -> bytes:
    return certificate.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize(
    ("who", "scheme", "algorithm", "options"),
    [
        ("application", Scheme.RSA_PKCS1, HashAlgorithm.SHA256, ["digest:sha256"]),
        ("installer", Scheme.RSA_PKCS1, HashAlgorithm.SHA1, ["digest:sha1"]),
        (
            "application",
            Scheme.RSA_PSS,
            HashAlgorithm.SHA256,
            ["digest:sha256", "rsa_padding_mode:pss", "rsa_pss_saltlen:32", "rsa_mgf1_md:sha256"],
        ),
        (
            "application",
            Scheme.RSA_PSS,
            HashAlgorithm.SHA384,
            ["digest:sha384", "rsa_padding_mode:pss", "rsa_pss_saltlen:48", "rsa_mgf1_md:sha384"],
        ),
        ("document", Scheme.ECDSA, HashAlgorithm.SHA256, ["digest:sha256"]),
        ("document", Scheme.ECDSA, HashAlgorithm.SHA384, ["digest:sha384"]),
    ],
)
def test_signatures_through_the_token_verify_with_openssl(
    alpha, pki, tmp_path, who, scheme, algorithm, options
):
    expected = getattr(pki, who)
    identity = select_identity(expected.sha1, usage=None)
    digest = algorithm.digest(b"the signed attributes of a CMS")
    signature = identity.sign(SignatureRequest(digest, algorithm, scheme))

    verified = _openssl_verify(tmp_path, _public_pem(expected.certificate), digest, signature, options)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "Signature Verified Successfully" in verified.stdout
    tampered = bytearray(signature)
    tampered[len(tampered) // 2] ^= 0x01
    refused = _openssl_verify(tmp_path, _public_pem(expected.certificate), digest, bytes(tampered), options)
    assert refused.returncode != 0
    if scheme is Scheme.ECDSA:
        assert signature[0] == 0x30  # DER SEQUENCE { r, s }
    else:
        assert len(signature) == 256
    # only the digest reached the service
    ((label, request),) = alpha.signer.requests
    seen = (label, request.digest, request.hash_algorithm, request.scheme)
    assert seen == (expected.key_id, digest, algorithm, scheme)


def test_a_scheme_the_key_cannot_make_is_refused_before_the_token(alpha, pki):
    identity = select_identity(pki.application.sha1, usage=None)
    digest = hashlib.sha256(b"x").digest()
    with pytest.raises(SignatureError, match="an RSA key cannot make Ecdsa signatures"):
        identity.sign(SignatureRequest(digest, HashAlgorithm.SHA256, Scheme.ECDSA))
    ec_identity = select_identity(pki.document.sha1, usage=None)
    with pytest.raises(SignatureError, match="an ECDSA key cannot make RsaPkcs1 signatures"):
        ec_identity.sign(SignatureRequest(digest, HashAlgorithm.SHA256, Scheme.RSA_PKCS1))
    assert alpha.signer.requests == []


def test_a_signature_that_does_not_match_the_certificate_is_refused(runtime, pki):
    # the token pairs the application certificate with the installer's key: its signatures are
    # valid for the key it holds, but not for the certificate the keychain hands out
    certificate_object = objects_for_identity(pki.application.certificate, b"mixed", "mixed")[0]
    _, public_key, private_key = objects_for_identity(pki.installer.certificate, b"mixed", "mixed")
    signer = LocalSigner({b"mixed": pki.installer.key})
    with serve_objects("mixed", [certificate_object, public_key, private_key], signer):
        (identity,) = list(discover().identities)
        digest = hashlib.sha256(b"payload").digest()
        with pytest.raises(SignatureError) as caught:  # the signature is checked where it is used
            sign_detached(digest, identity.sign, identity.certificate, identity.chain, signer_name=identity.source)
    assert str(caught.value).startswith(
        "the token mixed returned a signature that does not verify against the certificate"
    )
    assert len(signer.requests) == 1


def test_signing_from_many_threads(alpha, pki):
    identity = select_identity("TEAM123456", usage=Usage.CODE)
    public_key = pki.application.certificate.public_key()
    results: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def sign(number: int) -> None:
        try:
            digest = hashlib.sha256(f"page {number}".encode()).digest()
            results[number] = identity.sign(SignatureRequest(digest, HashAlgorithm.SHA256, Scheme.RSA_PKCS1))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=sign, args=(number,)) for number in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(results) == 12 and len(alpha.signer.requests) == 12
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    for number, signature in results.items():
        public_key.verify(signature, f"page {number}".encode(), padding.PKCS1v15(), hashes.SHA256())


def test_identity_survives_a_token_restart_and_fails_clearly_when_stopped(runtime, pki):
    digest = hashlib.sha256(b"restart").digest()
    request = SignatureRequest(digest, HashAlgorithm.SHA256, Scheme.RSA_PKCS1)
    token = serve_token("alpha", pki.identities, pki.authorities)
    identity = select_identity("TEAM123456", usage=Usage.CODE)
    identity.sign(request)
    token.stop()
    with pytest.raises(SignatureError) as caught:
        identity.sign(request)
    assert str(caught.value).startswith("the token alpha could not sign: no token is listening on ")
    with serve_token("alpha", pki.identities, pki.authorities) as restarted:
        assert len(identity.sign(request)) == 256
        assert len(restarted.signer.requests) == 1


def test_one_session_serves_every_signature_and_a_reload_reconnects_once(alpha, monkeypatch):
    identity = select_identity("TEAM123456", usage=Usage.CODE)
    connects: list[str] = []
    connect = Pkcs11Client.connect.__func__

    def counting(cls, path, *args, **kwargs):
        connects.append(str(path))
        return connect(cls, path, *args, **kwargs)

    monkeypatch.setattr(Pkcs11Client, "connect", classmethod(counting))
    request = SignatureRequest(hashlib.sha256(b"one of many").digest(), HashAlgorithm.SHA256, Scheme.RSA_PKCS1)
    for _ in range(5):
        identity.sign(request)
    assert connects == [alpha.socket]
    # `signbridge restart` swaps the token: the old session is gone, the next signature connects again
    alpha.server.set_tokens(dataclasses.replace(alpha.server.tokens[1]))
    identity.sign(request)
    identity.sign(request)
    assert connects == [alpha.socket, alpha.socket]
    assert len(alpha.signer.requests) == 7  # nothing was signed twice
