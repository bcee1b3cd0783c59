"""codesign's engine on real Mach-O files: signing with an identity, verification, display.

Independent checks: page hashes against ld64.lld's own signature and hashlib over the file (the
SuperBlob walked with struct), llvm-objdump and LIEF parse the signed files, openssl verifies the
CMS over the CodeDirectory bytes and ``openssl ts -verify`` the timestamp, asn1crypto reads the
signed attributes.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import plistlib
import shutil
import struct
from pathlib import Path

import lief
import pytest
from asn1crypto import cms as asn1_cms
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

import machofixtures
from codesignkit import (
    cd_fields,
    cdhash,
    independent_page_hashes,
    local_identity,
    local_tsa,
    objdump_code_signatures,
    openssl_accepts,
    openssl_cms_print,
    openssl_cms_verify,
    openssl_ts_verify,
    raw_signature,
    raw_signatures,
    slices,
    snapshot,
)
from machofixtures import MachOFixtures, sign_file
from signbridge.apple import codesign as cs
from signbridge.apple import display
from signbridge.apple.codesig import cms_signing, signed_code
from signbridge.apple.codesig import verification as vf
from signbridge.apple.codesig.codedirectory import HashType
from signbridge.apple.codesig.entitlements import signature_entitlements
from signbridge.apple.codesig.options import (
    AlreadySignedError,
    CodesignOptions,
    QuietReporter,
    canonical_identifier,
    parse_digest_algorithms,
    parse_flags,
)
from signbridge.apple.codesig.requirements.binary import encode_requirement_set
from signbridge.apple.codesig.requirements.text import render
from signbridge.apple.codesig.signed_code import designated_requirement
from signbridge.apple.codesig.signer import CmsSigner
from signbridge.apple.codesig.verdicts import VerifyOptions
from signbridge.apple.macho import parse as mo
from signbridge.apple.macho.sign import slice_plan
from signbridge.apple.macho.writer import HeaderPaddingError
from signbridge.apple.verify_code import verify_code
from signbridge.crypto.identity import Identity
from signbridge.errors import UsageError
from tokenkit import apple_name, apple_pki, issue


@pytest.fixture(scope="session")
def fx(tmp_path_factory: pytest.TempPathFactory) -> MachOFixtures:
    return machofixtures.get_fixtures(tmp_path_factory)


@pytest.fixture(scope="module")
def pki():
    return apple_pki()


@pytest.fixture
def identity(pki):
    return local_identity(pki)


def anchors(pki, *more) -> VerifyOptions:
    return VerifyOptions(anchors=(pki.root.certificate, *more))


def sign_copy(fx: MachOFixtures, name: str, directory: Path, identity: Identity | None, **options) -> Path:
    target = directory / name
    shutil.copyfile(fx.path(name), target)
    os.chmod(target, 0o755)
    cs.sign_code(target, identity, CodesignOptions(**options))
    return target


# --- page hashes: the linker's, and hashlib's ---------------------------------------------------------


@pytest.mark.parametrize("name", ["exe.arm64", "hello.arm64", "big.arm64", "plugin.arm64.bundle"])
def test_page_hashes_match_the_linkers(fx, tmp_path, identity, name):
    linker = raw_signature(fx.read(name))
    linker_cd = cd_fields(linker.code_directories[0])
    signed = sign_copy(fx, name, tmp_path, identity[0]).read_bytes()
    ours = raw_signature(signed)
    cd = cd_fields(ours.code_directories[0])
    # The signature stays where the linker put it: every page but the header page is the same.
    assert cd["code_limit"] == linker_cd["code_limit"] == ours.dataoff == linker.dataoff
    assert len(cd["hashes"]) == len(linker_cd["hashes"])
    assert cd["hashes"][1:] == linker_cd["hashes"][1:]
    assert cd["hashes"] == independent_page_hashes(signed, ours.dataoff)
    assert cd["page_size"] == 4096 and cd["hash_type"] == 2


@pytest.mark.parametrize("name", machofixtures.UNIVERSAL)
def test_universal_slices_are_each_signed(fx, tmp_path, identity, pki, name):
    path = sign_copy(fx, name, tmp_path, identity[0], identifier="com.example.tool")
    signed = path.read_bytes()
    raws = raw_signatures(signed)
    assert len(raws) == 2
    for (offset, _), raw in zip(slices(signed), raws, strict=True):
        cd = cd_fields(raw.code_directories[0])
        assert cd["identifier"] == "com.example.tool"
        assert cd["team"] == "TEAM123456"
        assert cd["hashes"] == independent_page_hashes(raw.image, raw.dataoff)
        assert offset % 4096 == 0
        assert openssl_accepts(tmp_path, raw, pki.root.certificate)
    # llvm-objdump sees both new signatures where struct finds them
    assert objdump_code_signatures(path) == [
        (raw.dataoff, struct.unpack_from("<I", raw.image, _command_offset(raw.image) + 12)[0]) for raw in raws
    ]
    if name != "exe.universal64":  # LIEF 1.0 cannot read FAT_MAGIC_64
        fat = lief.MachO.parse(str(path))
        for index, raw in enumerate(raws):
            binary = fat.at(index)
            assert binary.has_code_signature
            content = bytes(binary.code_signature.content)
            assert content == raw.image[raw.dataoff : raw.dataoff + len(content)]
    assert verify_code(path, anchors(pki)).satisfies_designated


def _command_offset(image: bytes) -> int:
    ncmds = struct.unpack_from("<I", image, 16)[0]
    offset = 32
    for _ in range(ncmds):
        cmd, size = struct.unpack_from("<II", image, offset)
        if cmd == 0x1D:
            return offset
        offset += size
    raise AssertionError("no LC_CODE_SIGNATURE")


SHA1_OID = bytes.fromhex("06052b0e03021a")
SHA256_OID = bytes.fromhex("0609608648016503040201")


def _agile(value) -> tuple[bytes, bytes]:
    """(DER OID, digest) of one CDHashes2 value: SEQUENCE { OID, OCTET STRING }."""
    oid, digest = _children(_content(value.dump()))
    return oid, _content(digest)


# --- codesign's file writer builds what the writer into memory builds ----------------------------------


@pytest.mark.parametrize("name", [*machofixtures.THIN, *machofixtures.UNIVERSAL])
@pytest.mark.parametrize("variant", ["adhoc", "identity", "runtime+entitlements", "sha1+sha256"])
def test_streaming_signer_matches_macho_signing(fx, pki, tmp_path, name, variant):
    """codesign writes signed files without copying their code through Python (kernel copy of the
    unchanged code, positioned writes of headers and signatures); the file must be exactly the bytes
    of the same writer into memory (machofixtures.sign_file) for the same inputs (RSA PKCS#1 v1.5 is deterministic)."""
    from signbridge.apple.macho.sign import SigningOptions

    data = fx.read(name)
    identity = None if variant == "adhoc" else local_identity(pki)[0]
    entitlements = plistlib.dumps({"get-task-allow": True}) if variant == "runtime+entitlements" else None
    options = CodesignOptions(
        identifier="com.example.x",
        force=True,
        entitlements=entitlements,
        signing_time=datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
        flags=parse_flags("runtime") if variant == "runtime+entitlements" else 0,
        hash_types=parse_digest_algorithms("sha1,sha256") if variant == "sha1+sha256" else None,
    )
    parsed = mo.parse_file(data)
    signer = CmsSigner.for_options(identity, options) if identity is not None else None
    plan = slice_plan(parsed, signer, options, identifier="com.example.x", entitlements=entitlements)
    reference = SigningOptions(
        identifier="com.example.x",
        team_id=plan.options.team_id,
        hash_types=plan.options.hash_types,
        flags=plan.options.flags,
        entitlements=entitlements,
        requirements=plan.options.requirements,
        cms_reserve=plan.options.cms_reserve,
    )
    expected = sign_file(data, reference, plan.signer)
    path = tmp_path / name
    path.write_bytes(data)
    cs.sign_code(path, identity, options)
    assert path.read_bytes() == expected


# --- the CMS ---------------------------------------------------------------------------------------


def test_cms_is_apples_and_only_a_digest_is_signed(fx, tmp_path, identity, pki):
    ident, signer = identity
    path = sign_copy(fx, "exe.arm64", tmp_path, ident)
    raw = raw_signature(path.read_bytes())
    primary = raw.code_directories[0]
    assert openssl_cms_verify(tmp_path, raw.cms, primary, pki.root.certificate).returncode == 0
    altered = primary[:-1] + bytes([primary[-1] ^ 1])
    tampered = openssl_cms_verify(tmp_path, raw.cms, altered, pki.root.certificate)
    assert tampered.returncode != 0

    info = asn1_cms.ContentInfo.load(raw.cms)
    signed_data = info["content"]
    assert info["content_type"].native == "signed_data"
    assert signed_data["encap_content_info"]["content_type"].native == "data"
    assert signed_data["encap_content_info"]["content"].native is None  # detached
    subjects = [c.chosen.subject.native["common_name"] for c in signed_data["certificates"]]
    assert sorted(subjects) == [  # the whole chain, root included (a DER SET: sorted)
        "Developer ID Application: Test Corp (TEAM123456)",
        "Test Apple Root CA",
        "Test Developer ID Certification Authority",
    ]
    signer_info = signed_data["signer_infos"][0]
    attributes = {a["type"].dotted: a["values"] for a in signer_info["signed_attrs"]}
    assert set(attributes) == {
        "1.2.840.113549.1.9.3",
        "1.2.840.113549.1.9.4",
        "1.2.840.113549.1.9.5",
        "1.2.840.113635.100.9.1",
        "1.2.840.113635.100.9.2",
    }
    assert attributes["1.2.840.113549.1.9.4"][0].native == hashlib.sha256(primary).digest()
    cdhashes = plistlib.loads(_content(attributes["1.2.840.113635.100.9.1"][0].dump()))
    assert cdhashes == {"cdhashes": [cdhash(primary)]}
    assert [_agile(value) for value in attributes["1.2.840.113635.100.9.2"]] == [
        (SHA256_OID, hashlib.sha256(primary).digest())
    ]

    # What left the machine: one SHA-256 digest, of the DER signed attributes, and nothing else.
    assert len(signer.requests) == 1
    request = signer.requests[0]
    der_attributes = b"\x31" + signer_info["signed_attrs"].dump()[1:]
    assert request.digest == hashlib.sha256(der_attributes).digest()
    assert request.hash_algorithm.hashlib_name == "sha256"

    printed = openssl_cms_print(tmp_path, raw.cms)
    assert "1.2.840.113635.100.9.1" in printed and "1.2.840.113635.100.9.2" in printed


def test_ecdsa_identity(fx, tmp_path, pki):
    leaf = issue(
        apple_name("Test Corp ECDSA Code Signing (TEAM123456)", "Test Corp", "TEAM123456"),
        ec.generate_private_key(ec.SECP256R1()),
        pki.intermediate,
        ekus=[ExtendedKeyUsageOID.CODE_SIGNING],
    )
    ident, signer = local_identity(pki, leaf)
    path = sign_copy(fx, "hello.arm64", tmp_path, ident)
    raw = raw_signature(path.read_bytes())
    assert openssl_accepts(tmp_path, raw, pki.root.certificate)
    assert signer.requests[0].scheme.value == "Ecdsa"
    assert verify_code(path, anchors(pki)).satisfies_designated


def test_old_deployment_target_gets_sha1_primary_and_sha256_alternate(fx, tmp_path, identity, pki):
    path = sign_copy(fx, "old.x86_64", tmp_path, identity[0])
    raw = raw_signature(path.read_bytes())
    sha1, sha256 = (cd_fields(blob) for blob in raw.code_directories)
    assert (sha1["hash_type"], sha256["hash_type"]) == (1, 2)
    assert sha1["hashes"] == independent_page_hashes(raw.image, raw.dataoff, "sha1", 20)
    assert sha256["hashes"] == independent_page_hashes(raw.image, raw.dataoff)
    assert openssl_accepts(tmp_path, raw, pki.root.certificate)
    info = asn1_cms.ContentInfo.load(raw.cms)
    attributes = {a["type"].dotted: a["values"] for a in info["content"]["signer_infos"][0]["signed_attrs"]}
    listed = plistlib.loads(_content(attributes["1.2.840.113635.100.9.1"][0].dump()))["cdhashes"]
    assert listed == [cdhash(raw.code_directories[0], "sha1"), cdhash(raw.code_directories[1])]
    agile = sorted(_agile(value) for value in attributes["1.2.840.113635.100.9.2"])
    assert agile == sorted(
        [
            (SHA1_OID, hashlib.sha1(raw.code_directories[0]).digest()),  # noqa: S324 - the format's
            (SHA256_OID, hashlib.sha256(raw.code_directories[1]).digest()),
        ]
    )
    verdict = verify_code(path, anchors(pki))
    assert verdict.cdhash == cdhash(raw.code_directories[1])  # the SHA-256 one stands for the code
    lines = dict(line.split("=", 1) for _, line in display.display_lines(display.signing_information(path), 3)
                 if "=" in line and not line.startswith("CodeDirectory"))  # fmt: skip
    assert lines["Hash choices"] == "sha1,sha256"
    assert lines["Hash type"] == "sha256 size=32"
    assert lines["CDHash"] == cdhash(raw.code_directories[1]).hex()
    assert lines["CMSDigest"] == hashlib.sha256(raw.code_directories[0]).hexdigest()

    (tmp_path / "forced").mkdir()
    forced = sign_copy(
        fx, "old.x86_64", tmp_path / "forced", identity[0], hash_types=parse_digest_algorithms("sha256")
    )
    assert [cd_fields(b)["hash_type"] for b in raw_signature(forced.read_bytes()).code_directories] == [2]


def test_timestamp_from_a_local_authority(fx, tmp_path, identity, pki):
    with local_tsa() as tsa:
        path = sign_copy(fx, "exe.arm64", tmp_path, identity[0], timestamp_url=tsa.url)
        assert len(tsa.requests) == 1
    raw = raw_signature(path.read_bytes())
    signer_info = asn1_cms.ContentInfo.load(raw.cms)["content"]["signer_infos"][0]
    (attribute,) = list(signer_info["unsigned_attrs"])
    assert attribute["type"].dotted == "1.2.840.113549.1.9.16.2.14"
    token = attribute["values"][0].dump()
    digest = hashlib.sha256(signer_info["signature"].native).digest()
    checked = openssl_ts_verify(tmp_path, token, digest, tsa.root)
    assert checked.returncode == 0 and "Verification: OK" in checked.stdout
    assert openssl_ts_verify(tmp_path, token, hashlib.sha256(b"other").digest(), tsa.root).returncode != 0
    verdict = verify_code(path, anchors(pki, tsa.root))
    assert verdict.slices[0].timestamp is not None
    # without the TSA's root the timestamp is not trusted
    with pytest.raises(vf.CodeVerificationError) as failed:
        verify_code(path, anchors(pki))
    assert failed.value.status == vf.NOT_TRUSTED and "timestamp" in failed.value.detail
    shown = [line for _, line in display.display_lines(display.signing_information(path), 1)]
    assert any(line.startswith("Timestamp=") for line in shown)


def test_timestamp_keeps_an_expired_certificate_valid(fx, tmp_path, identity, pki):
    """Verified two years on, after the leaf expired: valid with the timestamp under both policies;
    without one, valid as Apple's codesign --verify says, expired under --check-expiry."""
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=730)
    with local_tsa() as tsa:
        stamped = sign_copy(fx, "exe.arm64", tmp_path, identity[0], timestamp_url=tsa.url)
        trusted = VerifyOptions(anchors=(pki.root.certificate, tsa.root), at=later)
        strict = VerifyOptions(anchors=(pki.root.certificate, tsa.root), at=later, check_expiry=True)
        # the intermediate and root expire then too; the timestamp vouches for all of them
        for options in (trusted, strict):
            verdict = verify_code(stamped, options)
            assert verdict.slices[0].trust.timestamp_used and not verdict.slices[0].trust.expired
    (tmp_path / "plain").mkdir()
    plain = sign_copy(fx, "exe.arm64", tmp_path / "plain", identity[0])
    verdict = verify_code(plain, trusted)
    assert len(verdict.slices[0].trust.expired) == 3
    with pytest.raises(vf.CodeVerificationError) as failed:
        verify_code(plain, strict)
    assert failed.value.status == vf.CERT_EXPIRED
    assert "only with a timestamp" in failed.value.detail


# --- options ---------------------------------------------------------------------------------------


def test_runtime_entitlements_and_team(fx, tmp_path, identity, pki):
    entitlements = plistlib.dumps(
        {"com.apple.security.cs.allow-jit": True, "get-task-allow": True, "groups": ["a", "b"]}
    )
    path = sign_copy(fx, "exe.arm64", tmp_path, identity[0], flags=parse_flags("runtime,library"),
                     entitlements=entitlements)  # fmt: skip
    raw = raw_signature(path.read_bytes())
    cd = cd_fields(raw.code_directories[0])
    assert cd["version"] == 0x20500
    assert cd["flags"] == 0x12000
    assert cd["runtime"] == 0x000B0000  # LC_BUILD_VERSION sdk 11.0
    assert raw.blobs[5][8:] == entitlements
    assert struct.unpack_from(">I", raw.blobs[7])[0] == 0xFADE7172
    assert cd["special"][5] == hashlib.sha256(raw.blobs[5]).digest()
    assert cd["special"][7] == hashlib.sha256(raw.blobs[7]).digest()
    exec_flags = struct.unpack_from(">Q", raw.code_directories[0], 80)[0]
    assert exec_flags == 0x11  # main binary + get-task-allow
    assert verify_code(path, anchors(pki)).satisfies_designated
    value, _, _ = signature_entitlements(display.signing_information(path).signature)
    assert display.entitlements_text(value) == (
        "[Dict]\n\t[Key] com.apple.security.cs.allow-jit\n\t[Value]\n\t\t[Bool] true\n"
        "\t[Key] get-task-allow\n\t[Value]\n\t\t[Bool] true\n"
        "\t[Key] groups\n\t[Value]\n\t\t[Array]\n\t\t\t[String] a\n\t\t\t[String] b\n"
    )


def test_designated_requirement_is_embedded(fx, tmp_path, identity, pki):
    path = sign_copy(fx, "exe_plist.arm64", tmp_path, identity[0])
    info = display.signing_information(path)
    leaf_sha1 = pki.application.certificate.fingerprint(hashes.SHA1()).hex()  # noqa: S303
    expected = f'identifier "com.example.hello" and certificate leaf = H"{leaf_sha1}"'
    assert display.requirement_lines(info, None) == [f"designated => {expected}"]
    assert verify_code(path, anchors(pki)).designated_text == expected
    adhoc = sign_copy(fx, "exe.x86_64", tmp_path, None)
    adhoc_info = display.signing_information(adhoc)
    assert display.requirement_lines(adhoc_info, display.implicit_designated(adhoc_info)) == [
        f'# designated => cdhash H"{cdhash(raw_signature(adhoc.read_bytes()).code_directories[0]).hex()}"'
    ]


def test_developer_id_requirement_under_an_apple_root(pki):
    chain = (pki.application.certificate, pki.intermediate.certificate, pki.root.certificate)
    root_fingerprint = pki.root.certificate.fingerprint(hashes.SHA256())
    expr = designated_requirement("com.example.MyApp", chain, apple_roots=frozenset({root_fingerprint}))
    assert render(expr) == (
        'identifier "com.example.MyApp" and anchor apple generic and '
        "certificate 1[field.1.2.840.113635.100.6.2.6] /* exists */ and "
        "certificate leaf[field.1.2.840.113635.100.6.1.13] /* exists */ and "
        "certificate leaf[subject.OU] = TEAM123456"
    )
    # Sizes Apple's codesign reports ("Internal requirements count=1 size=N") for Developer ID
    # signatures of these identifiers and teams (rcodesign #50, firebase-ios-sdk #7705).
    for identifier, team, size in (
        ("rcodesign", "MK22MZP987", 172),
        ("com.firebase.crashlytics.upload-symbols", "EQHXZ8M8AV", 200),
    ):
        requirement = signed_code.right_and(*_developer_id_terms(identifier, team))
        assert len(encode_requirement_set({3: requirement})) == size


def _developer_id_terms(identifier: str, team: str):
    from signbridge.apple.codesig.requirements import binary as rq

    return (
        rq.identifier(identifier),
        rq.anchor_apple_generic(),
        rq.certificate_generic(1, rq.OID_DEVELOPER_ID_CA, rq.Match(rq.MatchOp.EXISTS)),
        rq.certificate_generic(0, rq.OID_DEVELOPER_ID_LEAF, rq.Match(rq.MatchOp.EXISTS)),
        rq.certificate_field(0, "subject.OU", rq.Match(rq.MatchOp.EQUAL, team.encode())),
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("libfrotz7.3.5.dylib", "libfrotz7"),
        ("mumble.77.plugin", "mumble.77"),
        ("rumble.rb", "rumble"),
        ("foo", "foo"),
        ("foo2.3", "foo2"),
        ("1password", "1password"),
        ("exe.arm64", "exe"),
    ],
)
def test_canonical_identifier(name, expected):
    assert canonical_identifier(name) == expected


def test_prefix_applies_to_undotted_default_identifiers(fx, tmp_path):
    plain = sign_copy(fx, "exe.x86_64", tmp_path, None, prefix="com.example.")
    assert cd_fields(raw_signature(plain.read_bytes()).code_directories[0])["identifier"] == "com.example.exe"
    dotted = sign_copy(fx, "exe_plist.arm64", tmp_path, None, prefix="com.example.")
    dotted_cd = cd_fields(raw_signature(dotted.read_bytes()).code_directories[0])
    assert dotted_cd["identifier"] == "com.example.hello"


def test_option_parsing():
    assert parse_flags("runtime") == 0x10000
    assert parse_flags("library,kill,hard") == 0x2000 | 0x200 | 0x100
    assert parse_flags("0x10000") == 0x10000
    for bad in ("nonsense", "adhoc", "", "li,"):
        with pytest.raises(UsageError):
            parse_flags(bad)
    assert parse_digest_algorithms("sha256,sha1") == (HashType.SHA1, HashType.SHA256)
    assert cms_signing.resolve_timestamp_url(None, "http://x/ts") is None
    assert cms_signing.resolve_timestamp_url("none", "http://x/ts") is None
    assert cms_signing.resolve_timestamp_url("", "http://x/ts") == "http://x/ts"
    assert cms_signing.resolve_timestamp_url("", None, environ={"SIGNBRIDGE_TIMESTAMP_URL": "http://y"}) == "http://y"
    assert cms_signing.resolve_timestamp_url("", None, environ={}) == "http://timestamp.apple.com/ts01"
    assert cms_signing.resolve_timestamp_url("http://z/tsa", "http://x/ts") == "http://z/tsa"
    assert signed_code.flag_names(0x10002) == "0x10002(adhoc,runtime)"
    assert signed_code.flag_names(0) == "0x0(none)"


# --- re-signing --------------------------------------------------------------------------------------


def test_signed_code_needs_force(fx, tmp_path, identity):
    path = sign_copy(fx, "exe.x86_64", tmp_path, None)
    before = path.read_bytes()
    with pytest.raises(AlreadySignedError, match="is already signed"):
        cs.sign_code(path, identity[0], CodesignOptions())
    assert path.read_bytes() == before
    reporter = QuietReporter()
    cs.sign_code(path, identity[0], CodesignOptions(force=True), reporter)
    assert reporter.notes == [(path, "replacing existing signature")]
    # a linker signature is replaced without -f and without a note
    linker = tmp_path / "linker"
    shutil.copyfile(fx.path("exe.arm64"), linker)
    reporter = QuietReporter()
    cs.sign_code(linker, None, CodesignOptions(), reporter)
    assert reporter.notes == []
    assert cd_fields(raw_signature(linker.read_bytes()).code_directories[0])["flags"] == 0x2


# --- tampering -----------------------------------------------------------------------------------------


def _universal(fx, tmp_path, identity, pki) -> tuple[Path, bytes, list]:
    path = sign_copy(fx, "exe.universal", tmp_path, identity[0],
                     entitlements=plistlib.dumps({"com.apple.security.cs.allow-jit": True}))  # fmt: skip
    data = path.read_bytes()
    return path, data, list(zip(slices(data), raw_signatures(data), strict=True))


TAMPER_CASES = {
    "code byte (x86_64)": ("x86_64", "code", vf.MODIFIED, "code page 1 "),
    "code byte (arm64)": ("arm64", "code", vf.MODIFIED, "code page 1 "),
    "header byte": ("arm64", "header", vf.MODIFIED, "code page 0 "),
    "CodeDirectory byte": ("arm64", "cd", vf.MODIFIED, "CMS signature does not check out"),
    "CMS signature byte": ("arm64", "cms", vf.MODIFIED, "does not match the signed attributes"),
    "requirements byte": ("x86_64", "requirements", vf.MODIFIED, "requirements blob does not match"),
    "entitlements byte": ("arm64", "entitlements", vf.MODIFIED, "entitlements blob does not match"),
    "padding after the signature": ("arm64", "padding", vf.MODIFIED, "not zero padding"),
    "padding between slices": (None, "fat-padding", vf.MODIFIED, "padding before the arm64 slice"),
}


@pytest.mark.parametrize("case", list(TAMPER_CASES))
def test_one_changed_byte_is_rejected(fx, tmp_path, identity, pki, case):
    path, data, parts = _universal(fx, tmp_path, identity, pki)
    verify_code(path, anchors(pki))  # intact
    arch, where, status, detail = TAMPER_CASES[case]
    index = {"x86_64": 0, "arm64": 1, None: 1}[arch]
    (offset, size), raw = parts[index]
    signature_blobs = {
        "cd": raw.code_directories[0],
        "requirements": raw.blobs.get(2),
        "entitlements": raw.blobs.get(5),
    }
    if where == "code":
        position = offset + 4096 + 10
    elif where == "header":
        position = offset + 40
    elif where == "cms":
        cms_blob = raw.blobs[0x10000]
        position = offset + raw.image.index(cms_blob) + len(cms_blob) - 30
    elif where == "padding":
        position = offset + size - 8
    elif where == "fat-padding":
        position = offset - 100
    else:
        blob = signature_blobs[where]
        position = offset + raw.image.index(blob) + len(blob) // 2
    tampered = bytearray(data)
    tampered[position] ^= 0x01
    path.write_bytes(bytes(tampered))
    with pytest.raises(vf.CodeVerificationError) as failed:
        verify_code(path, anchors(pki))
    assert failed.value.status == status
    assert detail in failed.value.detail
    if arch is not None:
        assert failed.value.architecture == arch


def test_untrusted_expired_and_unsigned(fx, tmp_path, pki):
    path = sign_copy(fx, "exe.arm64", tmp_path, local_identity(pki)[0])
    with pytest.raises(vf.CodeVerificationError) as untrusted:
        verify_code(path, VerifyOptions())
    assert untrusted.value.status == vf.NOT_TRUSTED
    expired_leaf = issue(
        apple_name("Developer ID Application: Test Corp (TEAM123456)", "Test Corp", "TEAM123456"),
        pki.application.key,
        pki.intermediate,
        ekus=[ExtendedKeyUsageOID.CODE_SIGNING],
        not_before=datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC),
        not_after=datetime.datetime(2021, 1, 1, tzinfo=datetime.UTC),
    )
    expired = tmp_path / "expired"
    expired.mkdir()
    old = sign_copy(fx, "exe.arm64", expired, local_identity(pki, expired_leaf)[0])
    assert verify_code(old, anchors(pki)).slices[0].trust.expired == (expired_leaf.certificate,)
    with pytest.raises(vf.CodeVerificationError) as failed:
        verify_code(old, VerifyOptions(anchors=(pki.root.certificate,), check_expiry=True))
    assert failed.value.status == vf.CERT_EXPIRED
    with pytest.raises(vf.NotSignedError):
        verify_code(fx.path("exe.x86_64"), anchors(pki))


# --- verification accepts what Apple writes --------------------------------------------------------


def _tlv(data: bytes, position: int) -> tuple[int, int, int]:
    """(tag, header length, content length) of the DER value at ``position``."""
    first = data[position + 1]
    if not first & 0x80:
        return data[position], 2, first
    count = first & 0x7F
    return data[position], 2 + count, int.from_bytes(data[position + 2 : position + 2 + count], "big")


def _children(data: bytes) -> list[bytes]:
    out, position = [], 0
    while position < len(data):
        _, header, length = _tlv(data, position)
        out.append(data[position : position + header + length])
        position += header + length
    return out


def _content(value: bytes) -> bytes:
    _, header, length = _tlv(value, 0)
    return value[header : header + length]


def _indefinite(value: bytes, keep=lambda child, index: False) -> bytes:
    """``value`` (constructed) with an indefinite length, its children converted unless ``keep``."""
    parts = []
    for index, child in enumerate(_children(_content(value))):
        if child[0] & 0x20 and not keep(child, index):
            parts.append(_indefinite(child))
        else:
            parts.append(child)
    return bytes([value[0], 0x80]) + b"".join(parts) + b"\0\0"


def _keep_signer_fields(child: bytes, index: int) -> bool:
    return True  # a SignerInfo's own fields keep their DER; only the SignerInfo itself is BER


def apple_style_ber(der: bytes) -> bytes:
    """A ContentInfo re-encoded the way Apple's tools write it: indefinite lengths on the outer
    structures; certificates and attributes keep their DER (as Apple's encoder leaves them)."""
    oid, explicit = _children(_content(der))
    (signed_data,) = _children(_content(explicit))
    fields = _children(_content(signed_data))
    converted = []
    for field in fields:
        if field[0] == 0xA0:  # certificates
            converted.append(field)
        elif field[0] == 0x31 and field is fields[-1]:  # signerInfos
            infos = [_indefinite(info, keep=_keep_signer_fields) for info in _children(_content(field))]
            converted.append(b"\x31\x80" + b"".join(infos) + b"\0\0")
        elif field[0] & 0x20:
            converted.append(_indefinite(field))
        else:
            converted.append(field)
    body = b"\x30\x80" + b"".join(converted) + b"\0\0"
    return b"\x30\x80" + oid + b"\xa0\x80" + body + b"\0\0" + b"\0\0"


def reordered_signer(identity: Identity):
    """A CMS signer that stores the signed attributes out of DER order (as some Apple signatures do)."""
    from signbridge.apple.codesig import cms_signing
    from signbridge.crypto.cms_builder import assemble_signed_data
    from signbridge.crypto.hashes import HashAlgorithm
    from signbridge.crypto.signatures import Scheme, SignatureRequest

    def sign(directories):
        primary = directories[0]
        attrs = cms_signing.build_signed_attributes(
            hashlib.sha256(primary.blob).digest(),
            cdhashes_plist=cms_signing.build_cdhashes_plist([d.cdhash() for d in directories]),
            cdhashes2=[(HashAlgorithm.SHA256, d.full_hash()) for d in directories],
        )
        elements = _children(_content(attrs))
        shuffled = list(reversed(elements))
        assert shuffled != sorted(shuffled)  # not DER order any more
        content = b"".join(shuffled)
        reordered = attrs[: len(attrs) - len(content)] + content
        digest = hashlib.sha256(reordered).digest()
        signature = identity.sign(SignatureRequest(digest, HashAlgorithm.SHA256, Scheme.RSA_PKCS1))
        return assemble_signed_data(
            signed_attrs_der=reordered,
            signature=signature,
            signer_certificate=identity.certificate,
            chain=identity.chain,
        )

    return sign


def test_apple_encodings_verify(fx, tmp_path, pki):
    """BER indefinite lengths, zero padding after the CMS, attributes out of DER order."""
    from signbridge.apple.macho.sign import SigningOptions

    ident = local_identity(pki)[0]
    base = CmsSigner(ident)
    data = fx.read("exe.arm64")
    cases = {
        "ber-indefinite": lambda directories: apple_style_ber(base.sign(directories)),
        "zero-padded": lambda directories: base.sign(directories) + bytes(64),
        "attributes-out-of-order": reordered_signer(ident),
    }
    for name, signer in cases.items():
        signed = sign_file(data, SigningOptions(identifier="exe", cms_reserve=12000), signer)
        path = tmp_path / name
        path.write_bytes(signed)
        raw = raw_signature(signed)
        if name == "ber-indefinite":
            assert raw.cms.startswith(b"\x30\x80")
        _, header, length = _tlv(raw.cms, 0)
        der = raw.cms if name == "ber-indefinite" else raw.cms[: header + length]
        verified = openssl_cms_verify(tmp_path, der, raw.code_directories[0], pki.root.certificate)
        assert verified.returncode == 0
        verdict = verify_code(path, anchors(pki))
        assert verdict.identifier == "exe", name
        tampered = bytearray(signed)
        tampered[raw.dataoff + raw.image[raw.dataoff:].index(raw.cms) + len(raw.cms) // 2] ^= 1
        path.write_bytes(bytes(tampered))
        with pytest.raises(vf.CodeVerificationError):
            verify_code(path, anchors(pki))


# --- bad input ---------------------------------------------------------------------------------------


def _patched(data: bytes, offset: int, code: str, *values: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(code, out, offset, *values)
    return bytes(out)


def bad_inputs(fx: MachOFixtures) -> dict[str, tuple[bytes, type[Exception], str]]:
    exe = fx.read("exe.arm64")
    macho = mo.parse_macho(exe)
    linkedit = macho.linkedit
    universal = fx.read("exe.universal")
    x86 = mo.parse_file(universal).fat_arches[0]
    return {
        "empty": (b"", mo.TruncatedMachOError, "too short"),
        "truncated": (exe[: len(exe) // 2], mo.TruncatedMachOError, "past the end of the file"),
        "corrupt magic": (b"\0\0\0\0" + exe[4:], mo.NotMachOError, "not a Mach-O file"),
        "overlapping fat slices": (
            _patched(universal, 8 + 20 + 8, ">I", x86.offset + 16), mo.FatLayoutError, "overlap",
        ),
        "absurd load-command count": (
            _patched(exe, 16, "<I", 0x7FFFFFFF), mo.LoadCommandError, "load commands",
        ),
        "signature not last in __LINKEDIT": (
            _patched(exe, linkedit.command_offset + 48, "<Q", linkedit.filesize + 16) + bytes(16),
            mo.SignatureLayoutError,
            "follow the code signature",
        ),
        "no room for LC_CODE_SIGNATURE": (fx.read("nopad.arm64"), HeaderPaddingError, "headerpad"),
    }  # fmt: skip


@pytest.mark.parametrize(
    "case",
    ["empty", "truncated", "corrupt magic", "overlapping fat slices", "absurd load-command count",
     "signature not last in __LINKEDIT", "no room for LC_CODE_SIGNATURE"],
)  # fmt: skip
def test_bad_input_is_refused_and_left_untouched(fx, tmp_path, identity, case):
    data, error, message = bad_inputs(fx)[case]
    path = tmp_path / "input"
    path.write_bytes(data)
    os.utime(path, (1_000_000_000, 1_000_000_000))
    before = snapshot(tmp_path)
    with pytest.raises(error, match=message):
        cs.sign_code(path, identity[0], CodesignOptions(force=True))
    assert snapshot(tmp_path) == before
    assert path.stat().st_mtime == 1_000_000_000
    assert identity[1].requests == []  # nothing reached the signer


def test_a_signer_failure_leaves_the_input_untouched(fx, tmp_path, pki):
    from signbridge.errors import SignatureError

    def broken(request):
        raise SignatureError("the token alpha could not sign: connection refused")

    ident = Identity(pki.application.certificate, (pki.intermediate.certificate,), broken, "alpha")
    path = tmp_path / "exe"
    shutil.copyfile(fx.path("exe.universal"), path)
    before = snapshot(tmp_path)
    with pytest.raises(SignatureError, match="could not sign"):
        cs.sign_code(path, ident, CodesignOptions())
    assert snapshot(tmp_path) == before

    # a signature that does not verify against the certificate is never written
    def wrong_key(request):
        return local_identity(pki, pki.installer)[1](request)

    liar = Identity(pki.application.certificate, (pki.intermediate.certificate,), wrong_key, "alpha")
    with pytest.raises(SignatureError, match="does not verify"):
        cs.sign_code(path, liar, CodesignOptions())
    assert snapshot(tmp_path) == before
