"""pkgutil --check-signature's engine: the verification matrix.

Valid packages from productsign and from openssl-made signatures in the forms real packages use
(RSA over the checksum or over its SHA-1/SHA-256; CMS with or without signed attributes, in BER
with indefinite lengths, zero-padded), and damaged ones: a changed byte in the TOC, the stored
checksum, the RSA signature, anywhere in the CMS (timestamp included) or in a file's data.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization

from conftest import require_tool, run
from pkgkit import (
    component_package,
    flip,
    identity_of,
    local_signer,
    pki_fixture,  # noqa: F401 - provides the pki fixture
    product_archive,
    rewrite_toc,
    signed_parts,
    tsa_fixture,  # noqa: F401 - provides the tsa fixture
    write_pem,
)
from pkikit import resign
from signbridge.apple.codesig import cms_signing
from signbridge.apple.pkg.sign import sign_package
from signbridge.apple.pkg.verify import PackageStatus, verify_package
from signbridge.apple.pkg.xar.archive import XarArchive
from signbridge.apple.pkg.xar.errors import XarError
from signbridge.apple.pkg.xar.signing import prepare_signed
from signbridge.crypto.identity import Identity
from tokenkit import apple_pki, developer_id_installer
from xarfixtures import finish, notarize

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def signed(pki, tsa, tmp_path_factory) -> Path:
    """A product archive signed by productsign with a timestamp: the package every damage starts from."""
    directory = tmp_path_factory.mktemp("signed")
    package = product_archive(directory / "unsigned.pkg")
    sign_package(package, directory / "signed.pkg", identity_of(pki), timestamp=cms_signing.timestamper(tsa.url))
    return directory / "signed.pkg"


def anchors(pki, tsa):
    return [pki.root.certificate, tsa.root]


def copy(source: Path, directory: Path, name: str = "copy.pkg") -> Path:
    target = directory / name
    target.write_bytes(source.read_bytes())
    return target


# --- valid --------------------------------------------------------------------------------------


def test_a_signed_package_is_trusted(signed, pki, tsa):
    verdict = verify_package(signed, anchors(pki, tsa))
    assert verdict.status is PackageStatus.TRUSTED and verdict.ok and verdict.exit_code == 0
    assert verdict.status_text == 'signed by a certificate trusted by "Test Apple Root CA"'
    assert verdict.signatures == ("RSA", "CMS") and verdict.rsa_form == "checksum" and verdict.cms_signed_attributes
    # signed (and timestamped) by the module's fixture just now; NOW is when the suite imported this module
    assert verdict.timestamp is not None and abs(verdict.timestamp - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=10)
    assert [c.subject for c in verdict.chain] == [
        pki.installer.certificate.subject, pki.intermediate.certificate.subject, pki.root.certificate.subject,
    ]  # fmt: skip
    assert verdict.problems == ()


def test_an_apple_root_is_worded_as_apple_does(signed, pki, tsa):
    fingerprint = pki.root.certificate.fingerprint(hashes.SHA256())
    verdict = verify_package(signed, anchors(pki, tsa), apple_roots=frozenset({fingerprint}))
    assert verdict.status_text == "signed by a developer certificate issued by Apple for distribution"


def test_an_unsigned_package_has_no_signature(tmp_path, pki):
    verdict = verify_package(component_package(tmp_path / "unsigned.pkg"), [pki.root.certificate])
    assert (verdict.status, verdict.status_text, verdict.exit_code) == (PackageStatus.NO_SIGNATURE, "no signature", 1)


def test_a_stapled_ticket_is_reported(signed, pki, tsa, tmp_path):
    package = copy(signed, tmp_path)
    notarize(package)
    verdict = verify_package(package, anchors(pki, tsa))
    assert verdict.ok and verdict.stapled_ticket


# --- signatures as other tools write them -------------------------------------------------------


class OpensslSignatures:
    """Signatures made by the openssl command line with the installer identity's key."""

    def __init__(self, pki, directory: Path) -> None:
        self.openssl = require_tool("openssl")
        self.dir = directory
        self.key = directory / "installer.key"
        self.key.write_bytes(pki.installer.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))  # fmt: skip
        self.leaf = write_pem(directory / "installer.pem", pki.installer.certificate)
        self.chain = write_pem(directory / "chain.pem", pki.intermediate.certificate, pki.root.certificate)

    def _input(self, checksum: bytes) -> Path:
        path = self.dir / "checksum.bin"
        path.write_bytes(checksum)
        return path

    def rsa(self, checksum: bytes, form: str) -> bytes:
        source = self._input(checksum)
        if form == "checksum":  # the checksum is the message hash: DigestInfo(sha1, checksum)
            args = ["pkeyutl", "-sign", "-inkey", str(self.key), "-pkeyopt", "digest:sha1", "-in", str(source)]
        else:  # openssl hashes the checksum once more: DigestInfo(alg, alg(checksum))
            args = ["dgst", f"-{form.partition('(')[0]}", "-sign", str(self.key), str(source)]
        return run([self.openssl, *args]).stdout

    def cms(self, checksum: bytes, form: str) -> bytes:
        options = {"no-attributes": ["-noattr"], "ber": ["-stream"], "sha1": ["-md", "sha1"]}[form]
        return run([
            self.openssl, "cms", "-sign", "-binary", "-md", "sha256", *options, "-in", str(self._input(checksum)),
            "-signer", str(self.leaf), "-inkey", str(self.key), "-certfile", str(self.chain), "-outform", "DER",
        ]).stdout  # fmt: skip


def assemble(pki, package: Path, out: Path, rsa_of, cms_of, reserve: int = 9216) -> None:  # noqa: ANN001
    """Sign ``package`` with signatures from elsewhere, in Apple's layout (CMS slot of 9216 bytes)."""
    certificates = [c.public_bytes(serialization.Encoding.DER)
                    for c in (pki.installer.certificate, pki.intermediate.certificate, pki.root.certificate)]  # fmt: skip
    prepared = prepare_signed(
        XarArchive.open(package), "sha1", 256 if rsa_of else None, reserve if cms_of else None, certificates
    )
    finish(prepared, rsa_of(prepared.toc_checksum) if rsa_of else None,
           cms_of(prepared.toc_checksum) if cms_of else None, out)  # fmt: skip


@pytest.mark.parametrize("rsa_form", ["checksum", "sha1(checksum)", "sha256(checksum)"])
@pytest.mark.parametrize("cms_form", ["no-attributes", "ber", "sha1"])
def test_signatures_in_the_forms_real_packages_use(tmp_path, pki, rsa_form, cms_form):
    tool = OpensslSignatures(pki, tmp_path)
    out = tmp_path / "signed.pkg"
    assemble(pki, product_archive(tmp_path / "in.pkg"), out, lambda c: tool.rsa(c, rsa_form),
             lambda c: tool.cms(c, cms_form))  # fmt: skip
    parts = signed_parts(out)
    if cms_form == "ber":
        assert parts.cms[1] == 0x80  # indefinite length, as Apple's own CMS blobs often are
    assert parts.cms_slot.endswith(bytes(1000))  # zero padding to the reserved size

    verdict = verify_package(out, [pki.root.certificate])

    assert verdict.status is PackageStatus.TRUSTED, verdict.problems
    assert verdict.rsa_form == rsa_form
    assert verdict.cms_signed_attributes is (cms_form != "no-attributes")


def test_either_signature_alone_is_enough(tmp_path, pki):
    tool = OpensslSignatures(pki, tmp_path)
    package = product_archive(tmp_path / "in.pkg")
    assemble(pki, package, tmp_path / "rsa.pkg", lambda c: tool.rsa(c, "checksum"), None)
    assemble(pki, package, tmp_path / "cms.pkg", None, lambda c: tool.cms(c, "ber"))
    assert verify_package(tmp_path / "rsa.pkg", [pki.root.certificate]).signatures == ("RSA",)
    assert verify_package(tmp_path / "cms.pkg", [pki.root.certificate]).signatures == ("CMS",)
    assert verify_package(tmp_path / "rsa.pkg", [pki.root.certificate]).ok


def test_signatures_by_two_different_keys_are_invalid(tmp_path, pki):
    other = apple_pki("Other Corp", "OTHER12345", issuer=pki)
    (tmp_path / "o").mkdir()
    tool, other_tool = OpensslSignatures(pki, tmp_path), OpensslSignatures(other, tmp_path / "o")
    assemble(pki, product_archive(tmp_path / "in.pkg"), tmp_path / "out.pkg",
             lambda c: other_tool.rsa(c, "checksum"), lambda c: tool.cms(c, "ber"))  # fmt: skip
    verdict = verify_package(tmp_path / "out.pkg", [pki.root.certificate])
    assert verdict.status is PackageStatus.INVALID_SIGNATURE


# --- damage -------------------------------------------------------------------------------------


def test_an_edited_toc_fails_its_checksum(signed, pki, tsa, tmp_path):
    package = copy(signed, tmp_path)
    rewrite_toc(package, lambda xml: xml.replace(b"<name>Distribution</name>", b"<name>Distributiom</name>"))
    verdict = verify_package(package, anchors(pki, tsa))
    assert verdict.status is PackageStatus.INVALID_CHECKSUM and verdict.exit_code == 1
    assert verdict.status_text == "package is invalid (checksum did not verify)"


def test_an_edited_toc_with_a_recomputed_checksum_fails_the_signatures(signed, pki, tsa, tmp_path):
    package = copy(signed, tmp_path)
    rewrite_toc(package, lambda xml: xml.replace(b"<name>Distribution</name>", b"<name>Distributiom</name>"),
                fix_checksum=True)  # fmt: skip
    verdict = verify_package(package, anchors(pki, tsa))
    assert (verdict.status, verdict.status_text) == (PackageStatus.INVALID_SIGNATURE, "invalid signature")


def test_a_changed_byte_in_the_compressed_toc(signed, pki, tsa, tmp_path):
    parts = signed_parts(signed)
    for offset in range(parts.layout.header_size, parts.layout.heap_offset, 97):
        package = copy(signed, tmp_path)
        flip(package, offset)
        verdict = verify_package(package, anchors(pki, tsa))
        assert verdict.status in (PackageStatus.INVALID_PACKAGE, PackageStatus.INVALID_CHECKSUM), offset
        assert verdict.exit_code == 1 and verdict.problems


def test_a_changed_byte_in_the_stored_checksum(signed, pki, tsa, tmp_path):
    package = copy(signed, tmp_path)
    flip(package, signed_parts(signed).slot_offset("checksum") + 7)
    assert verify_package(package, anchors(pki, tsa)).status is PackageStatus.INVALID_CHECKSUM


def test_a_changed_byte_in_the_rsa_signature(signed, pki, tsa, tmp_path):
    start = signed_parts(signed).slot_offset("signature")
    for offset in (0, 1, 100, 255):
        package = copy(signed, tmp_path)
        flip(package, start + offset)
        verdict = verify_package(package, anchors(pki, tsa))
        assert verdict.status is PackageStatus.INVALID_SIGNATURE and verdict.exit_code == 1
        assert "RSA signature" in verdict.problems[0]


def test_a_changed_byte_anywhere_in_the_cms_or_its_padding(signed, pki, tsa, tmp_path):
    """Every 11th byte of the CMS (signed attributes, signature, certificates, timestamp token and
    its certificates, and the unsigned framing around them), and bytes of the zero padding."""
    parts = signed_parts(signed)
    start = parts.slot_offset("x-signature")
    offsets = [*range(0, len(parts.cms), 11), len(parts.cms), len(parts.cms_slot) - 1]
    for offset in offsets:
        package = copy(signed, tmp_path)
        flip(package, start + offset, 0x10)
        verdict = verify_package(package, anchors(pki, tsa), check_files=False)
        assert verdict.status is PackageStatus.INVALID_SIGNATURE, (offset, verdict.problems)


@pytest.mark.parametrize("member", ["app.pkg/Payload", "Distribution"])
def test_a_changed_byte_in_a_file(signed, pki, tsa, tmp_path, member):
    parts = signed_parts(signed)
    offset, length = parts.layout.file_ranges()[member]
    package = copy(signed, tmp_path)
    flip(package, parts.layout.heap_offset + offset + length // 2)
    verdict = verify_package(package, anchors(pki, tsa))
    assert verdict.status is PackageStatus.INVALID_CHECKSUM and member in verdict.problems[0]
    # the signatures cover the TOC, which holds the file checksums; only reading the data finds this
    assert verify_package(package, anchors(pki, tsa), check_files=False).ok


def test_a_missing_file_is_an_error(tmp_path, pki):
    with pytest.raises(XarError, match="cannot open .*missing.pkg: No such file or directory"):
        verify_package(tmp_path / "missing.pkg", [pki.root.certificate])


def test_a_file_that_is_no_package_is_invalid(tmp_path, pki):
    (tmp_path / "x.pkg").write_bytes(b"PK\x03\x04" + bytes(100))
    verdict = verify_package(tmp_path / "x.pkg", [pki.root.certificate])
    assert (verdict.status_text, verdict.exit_code) == ("package is invalid", 1)
    assert "not a flat package" in verdict.problems[0]


# --- trust and time -----------------------------------------------------------------------------


def test_without_anchors_the_signer_is_untrusted(signed):
    verdict = verify_package(signed, [])
    assert (verdict.status_text, verdict.exit_code) == ("signed by untrusted certificate", 1)
    assert any("no trust anchors are configured" in problem for problem in verdict.problems)
    assert verdict.chain  # the chain is still shown


def test_another_root_does_not_vouch_for_the_signer(signed, tsa):
    assert verify_package(signed, [apple_pki().root.certificate, tsa.root]).status is PackageStatus.UNTRUSTED


def test_an_untrusted_timestamp_authority_is_reported_but_does_not_invalidate(signed, pki):
    verdict = verify_package(signed, [pki.root.certificate])
    assert verdict.ok and verdict.timestamp is None
    assert "the timestamp is not trusted" in verdict.problems[0]


def test_an_application_certificate_is_not_trusted_for_packages(tmp_path, pki):
    # signed by hand with the application key: productsign itself refuses that identity
    tool = OpensslSignatures(pki, tmp_path)
    tool.key.write_bytes(pki.application.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))  # fmt: skip
    tool.leaf = write_pem(tmp_path / "application.pem", pki.application.certificate)
    certificates = [c.public_bytes(serialization.Encoding.DER)
                    for c in (pki.application.certificate, pki.intermediate.certificate, pki.root.certificate)]  # fmt: skip
    prepared = prepare_signed(XarArchive.open(product_archive(tmp_path / "in.pkg")), "sha1", 256, 9216, certificates)
    finish(prepared, tool.rsa(prepared.toc_checksum, "checksum"), tool.cms(prepared.toc_checksum, "ber"),
           tmp_path / "out.pkg")  # fmt: skip
    verdict = verify_package(tmp_path / "out.pkg", [pki.root.certificate])
    assert verdict.status is PackageStatus.UNTRUSTED
    assert any("not an installer signing certificate" in problem for problem in verdict.problems)


@pytest.fixture(scope="module")
def short_lived(pki, tsa, tmp_path_factory):
    """Packages signed by an installer certificate that expires tomorrow, with and without a timestamp."""
    directory = tmp_path_factory.mktemp("expiring")
    leaf = developer_id_installer(pki.intermediate, not_after=NOW + dt.timedelta(days=1))
    package = product_archive(directory / "in.pkg")
    sign_package(package, directory / "stamped.pkg", identity_of(pki, leaf), timestamp=cms_signing.timestamper(tsa.url))
    sign_package(package, directory / "plain.pkg", identity_of(pki, leaf))
    return directory


def test_an_expired_certificate_is_rescued_by_the_timestamp(short_lived, pki, tsa):
    later = NOW + dt.timedelta(days=3)
    verdict = verify_package(short_lived / "stamped.pkg", anchors(pki, tsa), at=later)
    assert verdict.ok and verdict.trust.timestamp_used and verdict.timestamp < NOW + dt.timedelta(days=1)


def test_an_expired_certificate_without_timestamp_has_since_expired(short_lived, pki, tsa):
    later = NOW + dt.timedelta(days=3)
    verdict = verify_package(short_lived / "plain.pkg", anchors(pki, tsa), at=later)
    assert (verdict.status_text, verdict.exit_code) == ("signed by a certificate that has since expired", 1)
    assert any("expired on" in problem for problem in verdict.problems)
    # ... and so is one whose timestamp authority is not trusted
    untrusted_tsa = verify_package(short_lived / "stamped.pkg", [pki.root.certificate], at=later)
    assert untrusted_tsa.status is PackageStatus.EXPIRED


def test_a_certificate_that_is_not_yet_valid_is_untrusted(short_lived, pki, tsa):
    earlier = NOW - dt.timedelta(days=30)
    verdict = verify_package(short_lived / "plain.pkg", anchors(pki, tsa), at=earlier)
    assert verdict.status is PackageStatus.UNTRUSTED


def test_a_chain_signed_with_sha1_is_trusted(pki, tmp_path):
    """pkgutil checks chains through the same certificate-signature check as codesign: an
    intermediate and a root signed with SHA-1, as Apple's older ones are, are trusted."""
    sha1 = hashes.SHA1()  # noqa: S303 - the point of the test
    root = resign(pki.root.certificate, pki.root.key, sha1)
    intermediate = resign(pki.intermediate.certificate, pki.root.key, sha1)
    identity = Identity(pki.installer.certificate, (intermediate, root), local_signer(pki.installer.key), "local")
    sign_package(product_archive(tmp_path / "in.pkg"), tmp_path / "out.pkg", identity)
    verdict = verify_package(tmp_path / "out.pkg", [root])
    assert verdict.ok, verdict.problems
    assert [certificate.signature_hash_algorithm.name for certificate in verdict.chain] == ["sha256", "sha1", "sha1"]
    tampered = resign(pki.intermediate.certificate, pki.installer.key, sha1)  # right name, wrong key
    forged = Identity(pki.installer.certificate, (tampered, root), local_signer(pki.installer.key), "local")
    sign_package(product_archive(tmp_path / "in2.pkg"), tmp_path / "forged.pkg", forged)
    refused = verify_package(tmp_path / "forged.pkg", [root])
    assert refused.status is PackageStatus.UNTRUSTED
    assert any("does not verify with that certificate's key" in problem for problem in refused.problems)
