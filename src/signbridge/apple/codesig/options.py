"""What ``codesign -s`` is asked for and what it reports: the options (what the flags mean), the
errors, the reporter the engine tells what it does, the result per piece of code, and the default
identifiers.

Messages do not name the path; the command line prefixes it, as Apple's does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ...errors import SignbridgeError, UsageError
from ..plist import plist_dict
from ..trust import CertificateKind, classify_certificate
from .blobs import CodeSignatureFormatError
from .codedirectory import CodeDirectoryFlags, HashType
from .signed_code import FLAG_NAMES

if TYPE_CHECKING:
    from ...crypto.identity import Identity
    from .cms_signing import Timestamper

_SETTABLE_FLAGS = frozenset(name for name, _ in FLAG_NAMES if name not in ("adhoc", "linker-signed"))


# --- errors ---------------------------------------------------------------------------------------


class CodesignError(SignbridgeError):
    """Signing could not be done; the input is unchanged."""


class AlreadySignedError(CodesignError):
    """The code carries a signature and ``--force`` was not given."""

    def __init__(self) -> None:
        super().__init__("is already signed")


class UnsignedNestedCodeError(CodesignError):
    """Nested code is not signed, and ``--deep`` was not given to sign it."""

    def __init__(self, subcomponent: Path) -> None:
        super().__init__("code object is not signed at all")
        self.subcomponent = str(subcomponent)


class FlagsError(UsageError):
    """``--options`` names a flag codesign does not know."""


class UnreadableCodeError(CodesignError):
    """The code (or part of a bundle) cannot be read or written."""


# --- options --------------------------------------------------------------------------------------


def parse_flags(text: str) -> int:
    """The CodeDirectory flags of an ``-o`` value: names (unique prefixes allowed) or a number."""
    value = text.strip()
    if not value:
        raise FlagsError("--options needs a comma-separated list of flags, e.g. runtime")
    try:
        return int(value, 0)
    except ValueError:
        pass
    flags = 0
    for raw in value.split(","):
        word = raw.strip().lower()
        exact = [(name, bit) for name, bit in FLAG_NAMES if name == word]
        matches = exact or [(name, bit) for name, bit in FLAG_NAMES if name.startswith(word) and word]
        if len(matches) != 1 or matches[0][0] not in _SETTABLE_FLAGS:
            known = ", ".join(name for name, _ in FLAG_NAMES if name in _SETTABLE_FLAGS)
            reason = "is ambiguous" if len(matches) > 1 else "is not a flag codesign can set"
            raise FlagsError(f'--options: "{raw.strip()}" {reason}; the flags are {known}')
        flags |= matches[0][1]
    return flags


def parse_digest_algorithms(text: str) -> tuple[HashType, ...]:
    """``--digest-algorithm sha1,sha256``: the CodeDirectory hash types, SHA-1 first when present."""
    types = []
    for name in text.split(","):
        try:
            types.append(HashType.from_name(name.strip()))
        except CodeSignatureFormatError as exc:
            raise UsageError(f"--digest-algorithm: {exc}") from None
    ordered = tuple(dict.fromkeys(types))
    if HashType.SHA1 in ordered:
        ordered = (HashType.SHA1, *(t for t in ordered if t != HashType.SHA1))
    return ordered


@dataclass(frozen=True)
class CodesignOptions:
    """What ``codesign -s`` was asked for. ``flags`` are CodeDirectoryFlags (``-o``).

    ``timestamp_url`` is the TSA to ask (None: no timestamp); ``timestamp`` overrides it with a
    ready :data:`signbridge.apple.codesig.cms_signing.Timestamper`. ``entitlements`` are the bytes of the file
    given with ``--entitlements`` (XML or binary plist).
    """

    identifier: str | None = None
    prefix: str | None = None
    force: bool = False
    flags: int = 0
    runtime_version: int | None = None
    entitlements: bytes | None = None
    hash_types: tuple[HashType, ...] | None = None
    timestamp_url: str | None = None
    timestamp: Timestamper | None = None
    deep: bool = False
    signing_time: datetime | None = None


def notarization_warnings(identity: Identity | None, options: CodesignOptions, *, executable: bool = True) -> list[str]:
    """What a Developer ID signature made with ``options`` lacks for notarization (one line each);
    the hardened runtime concerns code (``executable``), not disk images."""
    if identity is None or classify_certificate(identity.certificate) is not CertificateKind.DEVELOPER_ID_APPLICATION:
        return []
    found = []
    if options.timestamp_url is None and options.timestamp is None:
        found.append("signing with a Developer ID identity without --timestamp: the notary service will reject it "
                     "(The signature does not include a secure timestamp.)")
    if executable and not options.flags & CodeDirectoryFlags.RUNTIME:
        found.append("signing with a Developer ID identity without --options runtime: the notary service will reject "
                     "executables (The executable does not have the hardened runtime enabled.)")
    return found


Progress = Callable[[int, int], None]
"""Called with (work done, total work): bytes for a Mach-O file, files for a resource seal."""


class Reporter(Protocol):
    """Where the engine tells the user what it does (the command line prefixes the path)."""

    def note(self, path: Path, message: str) -> None: ...

    def progress(self, description: str) -> contextlib.AbstractContextManager[Progress]:
        """A context whose value is called with (done, total) as the work advances."""
        ...


class QuietReporter:
    """A reporter that keeps notes in a list and shows no progress."""

    def __init__(self) -> None:
        self.notes: list[tuple[Path, str]] = []

    def note(self, path: Path, message: str) -> None:
        self.notes.append((path, message))

    @contextlib.contextmanager
    def progress(self, description: str) -> Iterator[Progress]:
        yield lambda done, total: None


# --- results --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignedCode:
    """What :func:`sign_code` did to one piece of code."""

    path: Path
    identifier: str
    format: str  # as ``codesign -d`` names it: "Mach-O thin (arm64)", "app bundle with ..."
    cdhash: bytes  # of the preferred slice's preferred CodeDirectory
    requirement: str | None  # the designated requirement's text
    nested: tuple[SignedCode, ...] = field(default=(), repr=False)


# --- identifiers ----------------------------------------------------------------------------------


def canonical_identifier(name: str) -> str:
    """Apple's default identifier for a file: the base name without its final (non-numeric)
    extension, and without numeric suffixes after the first (``libfrotz7.3.5.dylib`` -> ``libfrotz7``,
    ``mumble.77.plugin`` -> ``mumble.77``)."""
    text = name.rsplit("/", 1)[-1]
    dot = text.rfind(".")
    if dot >= 0 and dot + 1 < len(text) and not text[dot + 1].isdigit():
        text = text[:dot]
    if not text or text[0] in "0123456789.":
        return text
    position = len(text) - 1
    while position >= 0 and text[position] in "0123456789.":
        position -= 1
    position += 1
    if position < len(text) and text[position] == ".":
        position += 1
    while position < len(text) and text[position].isdigit():
        position += 1
    return text[:position]


def default_identifier(path: Path, info_plist: bytes | None, prefix: str | None) -> str:
    """The identifier codesign uses when ``-i`` is not given: CFBundleIdentifier, else the
    canonical file name, with ``--prefix`` prepended when that has no dot."""
    bundle_id = bundle_identifier(info_plist)
    if bundle_id:
        return bundle_id
    name = canonical_identifier(path.name)
    if prefix and "." not in name:
        return prefix + name
    return name


def bundle_identifier(info_plist: bytes | None) -> str | None:
    if not info_plist:
        return None
    info = plist_dict(info_plist)
    value = info.get("CFBundleIdentifier") if info is not None else None
    return value if isinstance(value, str) and value else None


def replacing_note(state: str) -> str:
    """What codesign says when ``-f`` replaces a signature in ``state`` ("signed" or "invalid")."""
    return "replacing existing signature" if state == "signed" else "replacing invalid existing signature"
