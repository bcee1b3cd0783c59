"""What signed code says about itself, for signers and readers alike.

The slice that stands for a universal file and the CodeDirectory that stands for a signature (the
ones Apple's tools show and record), the names ``codesign -d`` gives a file's format and its flags,
and the designated requirement: the one Apple's DRMaker derives from a signing chain, or the one a
signature states (explicitly, else derived from its CMS certificates, else its cdhash).
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509
from cryptography.x509.oid import NameOID

from ...crypto.chains import build_chain
from ...errors import SignbridgeError
from ..certificates import (
    APPLE_ROOT_FINGERPRINTS,
    DEVELOPER_ID_INTERMEDIATE,
    WWDR_INTERMEDIATE,
    certificate_sha1,
    extension_oids,
    is_apple_root,
)
from ..macho.parse import MachO, MachOFile
from . import cms
from .blobs import CodeSignatureFormatError
from .codedirectory import CodeDirectory, CodeDirectoryFlags, HashType
from .embedded_signature import EmbeddedSignature
from .requirements.binary import (
    ANCHOR_CERT,
    LEAF_CERT,
    OID_DEVELOPER_ID_CA,
    OID_DEVELOPER_ID_LEAF,
    Expr,
    Match,
    MatchOp,
    Op,
    RequirementType,
    anchor_apple_generic,
    certificate_field,
    certificate_generic,
    parse_requirement_set,
)
from .requirements.binary import identifier as identifier_expr


class ArchitectureNotFoundError(SignbridgeError):
    """``-a``/``--architecture`` names a slice the file does not hold."""


# codesign's names for the CodeDirectory flags (``-o``/``--options``), in Apple's table order.
FLAG_NAMES: tuple[tuple[str, int], ...] = (
    ("host", CodeDirectoryFlags.HOST),
    ("adhoc", CodeDirectoryFlags.ADHOC),
    ("hard", CodeDirectoryFlags.FORCE_HARD),
    ("kill", CodeDirectoryFlags.FORCE_KILL),
    ("expires", CodeDirectoryFlags.FORCE_EXPIRATION),
    ("restrict", CodeDirectoryFlags.RESTRICT),
    ("enforcement", CodeDirectoryFlags.ENFORCEMENT),
    ("library-validation", CodeDirectoryFlags.LIBRARY_VALIDATION),
    ("runtime", CodeDirectoryFlags.RUNTIME),
    ("linker-signed", CodeDirectoryFlags.LINKER_SIGNED),
)
# Apple's preference when one CodeDirectory must stand for the code (display, cdhash, nesting).
HASH_PREFERENCE = (
    HashType.SHA384,
    HashType.SHA256,
    HashType.SHA256_TRUNCATED,
    HashType.SHA1,
    HashType.SHA512,
)
# The slice that stands for a universal file: what an Apple silicon Mac runs.
ARCH_PREFERENCE = ("arm64e", "arm64", "x86_64h", "x86_64")


def flag_names(flags: int) -> str:
    """``0x10000(runtime)`` as ``codesign -d`` prints a flag word; ``0x0(none)`` when empty."""
    if not flags:
        return "0x0(none)"
    names = [name for name, bit in FLAG_NAMES if flags & bit]
    if flags & ~sum(bit for _, bit in FLAG_NAMES):
        names.append("???")
    return f"{flags:#x}({','.join(names)})"


def preferred_slice(parsed: MachOFile, architecture: str | None = None) -> MachO:
    """The slice that stands for the file: ``architecture`` when given, else what Apple silicon runs."""
    by_arch = {macho.arch: macho for macho in parsed.slices}
    if architecture is not None:
        if architecture not in by_arch:
            raise ArchitectureNotFoundError(
                f"the file holds no {architecture} code (it holds {' '.join(by_arch)})"
            )
        return by_arch[architecture]
    for arch in ARCH_PREFERENCE:
        if arch in by_arch:
            return by_arch[arch]
    return parsed.slices[0]


def preferred_directory(directories: Sequence[CodeDirectory]) -> CodeDirectory:
    """The CodeDirectory Apple's tools treat as the code's: the strongest supported hash."""
    for hash_type in HASH_PREFERENCE:
        for directory in directories:
            if directory.hash_type == hash_type:
                return directory
    return directories[0]


def macho_format(parsed: MachOFile) -> str:
    if parsed.is_universal:
        return f"Mach-O universal ({' '.join(macho.arch for macho in parsed.slices)})"
    return f"Mach-O thin ({parsed.slices[0].arch})"



# --- designated requirement -----------------------------------------------------------------------


def designated_requirement(
    identifier: str,
    certificates: Sequence[x509.Certificate],
    *,
    apple_roots: frozenset[bytes] = APPLE_ROOT_FINGERPRINTS,
) -> Expr | None:
    """The designated requirement Apple's DRMaker derives for a signature by ``certificates``
    (leaf first, up to the anchor); None for ad-hoc code (no certificates).

    Under an Apple root: the Developer ID form (``anchor apple generic and certificate
    1[field.1.2.840.113635.100.6.2.6] /* exists */ and certificate leaf[field....6.1.13] /* exists */
    and certificate leaf[subject.OU] = TEAM``), the WWDR form for development and distribution
    certificates, else ``anchor apple``. Under any other root: ``certificate <slot> = H"<sha1>"``
    for the highest certificate whose Organization is the leaf's. The terms nest to the right,
    as DRMaker writes them.
    """
    if not certificates:
        return None
    anchor = certificates[-1]
    if is_apple_root(anchor, apple_roots):
        tail = _apple_anchor(certificates)
    else:
        tail = _non_apple_anchor(certificates)
    return Expr(Op.AND, (identifier_expr(identifier), tail))


def right_and(*terms: Expr) -> Expr:
    result = terms[-1]
    for term in reversed(terms[:-1]):
        result = Expr(Op.AND, (term, result))
    return result


def _apple_anchor(certificates: Sequence[x509.Certificate]) -> Expr:
    leaf = certificates[0]
    if len(certificates) == 3 and WWDR_INTERMEDIATE in extension_oids(certificates[1]):
        common_name = _subject_value(leaf, NameOID.COMMON_NAME) or ""
        return right_and(
            anchor_apple_generic(),
            certificate_field(LEAF_CERT, "subject.CN", Match(MatchOp.EQUAL, common_name.encode())),
            certificate_generic(1, WWDR_INTERMEDIATE, Match(MatchOp.EXISTS)),
        )
    if len(certificates) == 3 and DEVELOPER_ID_INTERMEDIATE in extension_oids(certificates[1]):
        team = _subject_value(leaf, NameOID.ORGANIZATIONAL_UNIT_NAME) or ""
        return right_and(
            anchor_apple_generic(),
            certificate_generic(1, OID_DEVELOPER_ID_CA, Match(MatchOp.EXISTS)),
            certificate_generic(LEAF_CERT, OID_DEVELOPER_ID_LEAF, Match(MatchOp.EXISTS)),
            certificate_field(LEAF_CERT, "subject.OU", Match(MatchOp.EQUAL, team.encode())),
        )
    return Expr(Op.APPLE_ANCHOR)


def _non_apple_anchor(certificates: Sequence[x509.Certificate]) -> Expr:
    organization = _subject_value(certificates[0], NameOID.ORGANIZATION_NAME)
    slot = 0
    if organization is not None:
        while slot + 1 < len(certificates):
            if _subject_value(certificates[slot + 1], NameOID.ORGANIZATION_NAME) != organization:
                break
            slot += 1
        if slot == len(certificates) - 1:
            return Expr(Op.ANCHOR_HASH, (ANCHOR_CERT, certificate_sha1(certificates[slot])))
    return Expr(Op.ANCHOR_HASH, (slot if slot else LEAF_CERT, certificate_sha1(certificates[slot])))


def _subject_value(certificate: x509.Certificate, oid: x509.ObjectIdentifier) -> str | None:
    values = certificate.subject.get_attributes_for_oid(oid)
    return str(values[0].value) if values else None


# --- the designated requirement a signature states ------------------------------------------------------


def stored_designated_requirement(signature: EmbeddedSignature, directory: CodeDirectory) -> Expr:
    """The designated requirement of signed code, without judging trust: the explicit one, else
    the one derived from the CMS certificates, else (ad hoc) its cdhash."""
    try:
        explicit = explicit_designated_requirement(signature)
    except CodeSignatureFormatError:
        explicit = None
    if explicit is not None:
        return explicit
    certificates: Sequence[x509.Certificate] = ()
    if signature.cms:
        try:
            certificates = issuer_chain(cms.parse_signed_data(signature.cms))
        except SignbridgeError:
            certificates = ()
    return derived_designated_requirement(directory, certificates)


def explicit_designated_requirement(signature: EmbeddedSignature) -> Expr | None:
    """The designated requirement the signature's requirement set states, if any;
    :class:`CodeSignatureFormatError` when the set cannot be read."""
    if not signature.requirements:
        return None
    return parse_requirement_set(signature.requirements).get(RequirementType.DESIGNATED)


def derived_designated_requirement(
    directory: CodeDirectory,
    certificates: Sequence[x509.Certificate],
    *,
    apple_roots: frozenset[bytes] = APPLE_ROOT_FINGERPRINTS,
) -> Expr:
    """The designated requirement Apple derives for code signed by ``certificates`` (leaf first),
    ``cdhash H"..."`` for ad-hoc code."""
    derived = designated_requirement(directory.identifier, certificates, apple_roots=apple_roots)
    return derived if derived is not None else Expr(Op.CDHASH, (directory.cdhash(),))


def issuer_chain(parsed: cms.ParsedSignature) -> list[x509.Certificate]:
    """The CMS certificates ordered from the signer up its issuers, as far as they go."""
    return [parsed.signer_certificate, *build_chain(parsed.signer_certificate, parsed.certificates)]
