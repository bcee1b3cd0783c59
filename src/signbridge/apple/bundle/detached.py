"""Detached signatures of bundles without a main executable, read from ``_CodeSignature/``.

A bundle whose Info.plist names no CFBundleExecutable (a resource-only ``.bundle``, a Safari web
app) is signed with its Info.plist as the code: one code "page" (page size 0) over the Info.plist
bytes, Info.plist again in special slot 1, the requirement set in slot 2 and CodeResources in slot
3. The signature's components sit in files beside CodeResources, one per slot:

- ``CodeDirectory``: the primary CodeDirectory (the SHA-1 one when both are written);
- ``CodeRequirements-1``, ``-2``, ...: the alternate CodeDirectories (slots 0x1000, 0x1001, ...;
  Apple really names them after the requirements file);
- ``CodeRequirements``: the requirement set blob;
- ``CodeEntitlements``: the entitlements blob, when there is one;
- ``CodeSignature``: the CMS (DER, not wrapped in a blob); an empty file for ad-hoc signatures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..codesig.blobs import (
    ALTERNATE_CODE_DIRECTORY_MAX,
    CodeSignatureFormatError,
    Magic,
    Slot,
    decode_superblob,
    encode_blob,
    encode_superblob,
)
from ..codesig.codedirectory import CodeDirectory
from ..codesig.embedded_signature import EmbeddedSignature

CODE_DIRECTORY_FILE = "CodeDirectory"
REQUIREMENTS_FILE = "CodeRequirements"
ENTITLEMENTS_FILE = "CodeEntitlements"
SIGNATURE_FILE = "CodeSignature"


def alternate_file(index: int) -> str:
    """The file of the ``index``-th alternate CodeDirectory (0 -> ``CodeRequirements-1``)."""
    return f"{REQUIREMENTS_FILE}-{index + 1}"


def component_files() -> tuple[str, ...]:
    """Every file name a detached signature may use (what re-signing replaces)."""
    alternates = tuple(alternate_file(index) for index in range(ALTERNATE_CODE_DIRECTORY_MAX))
    return (CODE_DIRECTORY_FILE, REQUIREMENTS_FILE, ENTITLEMENTS_FILE, SIGNATURE_FILE, *alternates)


@dataclass(frozen=True)
class DetachedSignature:
    """A detached signature as read from disk, also as an :class:`EmbeddedSignature` so that the
    Mach-O checks (special slots, CMS, requirements) apply to it unchanged."""

    signature: EmbeddedSignature
    files: tuple[str, ...]  # the component files present, for messages


def has_detached_signature(signature_dir: Path) -> bool:
    return (signature_dir / CODE_DIRECTORY_FILE).is_file()


def read_detached_signature(signature_dir: Path) -> DetachedSignature | None:
    """The detached signature in ``signature_dir``; None when there is no CodeDirectory file.

    Raises :class:`CodeSignatureFormatError` when a component cannot be read or parsed."""
    primary = _read(signature_dir / CODE_DIRECTORY_FILE)
    if primary is None:
        return None
    present = [CODE_DIRECTORY_FILE]
    entries: list[tuple[int, bytes]] = [(Slot.CODE_DIRECTORY, primary)]
    for index in range(ALTERNATE_CODE_DIRECTORY_MAX):
        alternate = _read(signature_dir / alternate_file(index))
        if alternate is None:
            break
        present.append(alternate_file(index))
        entries.append((Slot.ALTERNATE_CODE_DIRECTORY + index, alternate))
    for slot, name in ((Slot.REQUIREMENTS, REQUIREMENTS_FILE), (Slot.ENTITLEMENTS, ENTITLEMENTS_FILE)):
        data = _read(signature_dir / name)
        if data is not None:
            present.append(name)
            entries.append((slot, data))
    cms = _read(signature_dir / SIGNATURE_FILE)
    if cms is not None:
        present.append(SIGNATURE_FILE)
        entries.append((Slot.SIGNATURE, encode_blob(Magic.BLOB_WRAPPER, cms)))
    superblob = decode_superblob(encode_superblob(Magic.DETACHED_SIGNATURE, sorted(entries)))
    directories = []
    for slot, data in entries:
        if slot == Slot.CODE_DIRECTORY or Slot.ALTERNATE_CODE_DIRECTORY <= slot < Slot.SIGNATURE:
            try:
                directories.append(CodeDirectory.parse(data))
            except CodeSignatureFormatError as exc:
                name = CODE_DIRECTORY_FILE if slot == Slot.CODE_DIRECTORY else alternate_file(slot - Slot.ALTERNATE_CODE_DIRECTORY)
                raise CodeSignatureFormatError(f"_CodeSignature/{name} is not a CodeDirectory: {exc}") from None
    signature = EmbeddedSignature(
        superblob=superblob,
        code_directories=tuple(directories),
        requirements=superblob.get(Slot.REQUIREMENTS),
        entitlements=superblob.get(Slot.ENTITLEMENTS),
        der_entitlements=None,
        cms=cms,
    )
    return DetachedSignature(signature, tuple(present))


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CodeSignatureFormatError(f"cannot read _CodeSignature/{path.name}: {exc.strerror or exc}") from None
