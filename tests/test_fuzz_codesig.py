"""Fuzzing the parts of a code signature on their own: the CMS, the certificates inside it, the
embedded SuperBlob with its CodeDirectories, and the requirement blobs.

A mutation of a whole Mach-O file rarely lands inside a certificate; these harnesses mutate the
parts themselves and run them through what ``codesign --verify`` and ``-dvvv`` do with them: the
CMS is parsed, verified over its signed attributes, its unsigned fields, timestamp and chain are
checked and its authorities listed; every certificate is read through the one DER reader and then
classified, chained, named and matched by requirements; a SuperBlob is decoded by slot, each
CodeDirectory read and hashed, the requirements rendered and evaluated, the designated
requirement derived. Seeds: the corpus's Mach-O files signed by Apple's tools (Developer ID,
Apple Development, self-signed, ad hoc, SHA-1 + SHA-256, with entitlements and DER entitlements)
and a fixture signed here with a test Developer ID identity.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization

from codesignkit import local_identity
from corpuskit import APPLE_ROOT, CORPUS
from fuzzkit import FUZZ_CASES, fuzz
from machofixtures import get_fixtures
from signbridge.apple import codesign as engine
from signbridge.apple import display
from signbridge.apple.certificates import team_identifier, usage
from signbridge.apple.codesig import cms
from signbridge.apple.codesig.blobs import Magic, decode_superblob
from signbridge.apple.codesig.checks import check_timestamp, check_trust
from signbridge.apple.codesig.codedirectory import CodeDirectory
from signbridge.apple.codesig.embedded_signature import read_signature, signature_of
from signbridge.apple.codesig.entitlements import signature_entitlements
from signbridge.apple.codesig.options import CodesignOptions
from signbridge.apple.codesig.requirements.binary import parse_requirement_set
from signbridge.apple.codesig.requirements.evaluation import RequirementContext, evaluate
from signbridge.apple.codesig.requirements.text import render
from signbridge.apple.codesig.signed_code import (
    designated_requirement,
    flag_names,
    issuer_chain,
    stored_designated_requirement,
)
from signbridge.apple.codesig.verdicts import VerifyOptions
from signbridge.apple.macho.constants import FAT_MAGIC, MH_MAGIC, MH_MAGIC_64
from signbridge.apple.macho.parse import parse_file
from signbridge.apple.trust import Purpose, classify_certificate, evaluate_chain, load_anchors
from signbridge.crypto.chains import extended_key_usages
from signbridge.crypto.cms import verify_detached
from signbridge.crypto.der import read_certificate
from signbridge.crypto.names import common_name
from signbridge.crypto.signatures import verify_certificate_signature
from signbridge.crypto.timestamps import check_timestamping_certificate
from signbridge.errors import SignbridgeError
from tokenkit import apple_pki

pytestmark = pytest.mark.fuzz

ENTITLEMENTS = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<plist version="1.0"><dict>'
    b"<key>com.apple.security.cs.allow-jit</key><true/>"
    b"<key>com.apple.security.application-groups</key><array><string>T.group</string></array>"
    b"</dict></plist>\n"
)
MACHO_MAGICS = {FAT_MAGIC.to_bytes(4, "big"), MH_MAGIC.to_bytes(4, "little"), MH_MAGIC_64.to_bytes(4, "little")}


def _signed_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The corpus's signed Mach-O files (bare and inside bundles) and a fixture signed here."""
    files = sorted((CORPUS / "macho").iterdir())
    files += sorted(path for path in (CORPUS / "bundles").glob("*/Contents/MacOS/*") if path.is_file())
    files += sorted(path for path in (CORPUS / "bundles").glob("*/Contents/Library/SystemExtensions/*/*") if path.is_file())
    signed = tmp_path_factory.mktemp("signed") / "exe.universal"
    signed.write_bytes(get_fixtures(tmp_path_factory).read("exe.universal"))
    identity, _ = local_identity(apple_pki())
    engine.sign_code(signed, identity, CodesignOptions(flags=0x10000, entitlements=ENTITLEMENTS))
    return [*files, signed]


@pytest.fixture(scope="module")
def signatures(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[bytes, object]]:
    """(raw signature space, parsed signature) of every slice of every signed file."""
    found = []
    for path in _signed_files(tmp_path_factory):
        data = path.read_bytes()
        if data[:4] not in MACHO_MAGICS:
            continue  # the Info.plist beside a dext's executable
        for macho in parse_file(data).slices:
            signature = read_signature(macho)
            if signature is not None:
                found.append((bytes(macho.signature_data or b""), signature))
    assert len(found) >= 20
    return found


@pytest.fixture(scope="module")
def anchors() -> tuple:
    return tuple(load_anchors(APPLE_ROOT))


def _each(*steps: Callable[[], object]) -> None:
    """Run every step; a step may refuse its input with a SignbridgeError, and the next still runs."""
    for step in steps:
        with contextlib.suppress(SignbridgeError):
            step()


def test_cms(signatures, anchors):
    seeds = list(dict.fromkeys(signature.cms for _, signature in signatures if signature.cms))
    assert len(seeds) >= 10
    options = VerifyOptions(anchors=anchors)

    def target(der: bytes) -> None:
        parsed = cms.parse_signed_data(der)
        digest = parsed.message_digest
        if digest is None or len(digest) != parsed.digest_algorithm.digest_size:
            digest = bytes(parsed.digest_algorithm.digest_size)
        _each(
            lambda: verify_detached(parsed, content_digest=digest),
            lambda: cms.check_unsigned_fields(parsed),
            lambda: check_timestamp(parsed, options),
            lambda: check_trust(parsed, options, None),
            lambda: [common_name(certificate) for certificate in issuer_chain(parsed)],
            lambda: render(designated_requirement("com.example.fuzz", issuer_chain(parsed))),
            lambda: [display.format_date(when) for when in (parsed.signing_time, parsed.timestamp and parsed.timestamp.gen_time) if when],
        )

    assert fuzz("cms", seeds, target) >= FUZZ_CASES


def test_certificates(signatures, anchors):
    certificates = {}
    for _, signature in signatures:
        if signature.cms:
            parsed = cms.parse_signed_data(signature.cms)
            carried = parsed.timestamp.certificates if parsed.timestamp else ()
            for certificate in (*parsed.certificates, *carried):
                certificates[certificate.fingerprint(hashes.SHA256())] = certificate
    der = serialization.Encoding.DER
    seeds = [certificate.public_bytes(der) for certificate in (*certificates.values(), *anchors)]
    assert len(seeds) >= 10
    context = dict(identifier="com.example.fuzz", trusted=True, anchors=anchors)
    # The signatures' own requirements: certificate fields, extensions, anchors, hashes.
    named = [
        expr for _, signature in signatures if signature.requirements
        for expr in parse_requirement_set(signature.requirements).values()
    ]

    def target(der: bytes) -> None:
        certificate = read_certificate(der)
        chain = (certificate, *anchors)
        _each(
            lambda: (classify_certificate(certificate), usage(certificate), extended_key_usages(certificate)),
            lambda: (common_name(certificate), team_identifier(certificate, (certificate,))),
            lambda: evaluate_chain(certificate, [], anchors, purpose=Purpose.CODE),
            lambda: evaluate_chain(certificate, [], [certificate], purpose=Purpose.INSTALLER),
            lambda: verify_certificate_signature(certificate, certificate),
            lambda: check_timestamping_certificate(certificate),
            lambda: render(designated_requirement("com.example.fuzz", chain)),
            lambda: [evaluate(expr, RequirementContext(certificates=chain, **context)) for expr in named],
        )

    assert fuzz("certificate", seeds, target) >= FUZZ_CASES


def test_superblob(signatures, anchors):
    seeds = list(dict.fromkeys(raw for raw, _ in signatures))
    chain = tuple(
        (cms.parse_signed_data(signature.cms).signer_certificate, *anchors)
        for _, signature in signatures
        if signature.cms
    )[0]

    def target(data: bytes) -> None:
        signature = signature_of(decode_superblob(data, Magic.EMBEDDED_SIGNATURE))
        if signature is None:
            return
        for directory in signature.code_directories:
            directory.cdhash(), directory.full_hash(), directory.encode()  # noqa: B018
            flag_names(directory.flags)
        directory = signature.code_directory
        context = RequirementContext(
            identifier=directory.identifier,
            certificates=chain,
            trusted=True,
            anchors=anchors,
            entitlements=signature_entitlements(signature)[0],
            cdhashes=frozenset(d.cdhash() for d in signature.code_directories),
        )
        _each(
            lambda: [evaluate(expr, context) for expr in parse_requirement_set(signature.requirements or b"").values()],
            lambda: render(stored_designated_requirement(signature, directory)),
            lambda: signature_entitlements(signature),
        )

    assert fuzz("superblob", seeds, target) >= FUZZ_CASES


def test_code_directory(signatures):
    seeds = list(dict.fromkeys(cd.blob for _, signature in signatures for cd in signature.code_directories))

    def target(blob: bytes) -> None:
        directory = CodeDirectory.parse(blob)
        directory.cdhash(), directory.full_hash(), flag_names(directory.flags)  # noqa: B018
        for slot in range(-directory.special_slot_count, len(directory.code_hashes)):  # codesign -dvvvvvv
            directory.code_hashes[slot] if slot >= 0 else directory.special_slots.get(-slot)  # noqa: B018

    assert fuzz("code-directory", seeds, target) >= FUZZ_CASES


def test_requirements(signatures, anchors):
    seeds = list(dict.fromkeys(signature.requirements for _, signature in signatures if signature.requirements))
    context = RequirementContext(
        identifier="org.htacg.html-tidy.tidy5",
        certificates=tuple(anchors),
        trusted=True,
        anchors=anchors,
        info={"CFBundleIdentifier": "org.htacg.html-tidy.tidy5", "CFBundleVersion": "5.6.0"},
        entitlements={"com.apple.security.cs.allow-jit": True, "com.apple.application-identifier": "T.app"},
    )

    def target(data: bytes) -> None:
        for expr in parse_requirement_set(data).values():
            render(expr)
            evaluate(expr, context)

    assert fuzz("requirements", seeds, target) >= FUZZ_CASES
