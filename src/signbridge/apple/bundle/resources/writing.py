"""Writing a bundle's resource seal: the CodeResources Apple's codesign writes, in Apple's layout."""

from __future__ import annotations

import binascii
import os
import plistlib
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

from ...codesig.codedirectory import HashType
from ..layout import Bundle
from .hashing import DigestCache, FilePath, Progress, hash_files
from .rules import (
    OPTIONAL,
    EntryKind,
    ResourceError,
    RuleSet,
    SealedEntry,
    default_rules,
    scan,
    seal_exclusions,
)
from .seal import hash_key

DEFAULT_HASH_TYPES = (HashType.SHA1, HashType.SHA256)


class NestedCodeNotSignedError(ResourceError):
    """Nested code must be signed before the bundle around it is sealed."""


@dataclass(frozen=True)
class NestedCode:
    """What a bundle's seal records about nested code: its cdhash and designated requirement text."""

    cdhash: bytes
    requirement: str


def _seal_entries(
    bundle: Bundle,
) -> tuple[dict[str, object], dict[str, object], list[SealedEntry], list[SealedEntry]]:
    """The bundle's seal rules (``files`` and ``files2``) and what each seals: regular files only
    for ``files``."""
    rules1, rules2 = default_rules(bundle.is_shallow)
    exclusions = seal_exclusions(bundle.content_root, bundle.executable_path)
    entries2 = scan(bundle.content_root, RuleSet.from_plist(rules2, exclusions))
    entries1 = [
        entry
        for entry in scan(bundle.content_root, RuleSet.from_plist(rules1, exclusions))
        if entry.is_regular_file
    ]
    return rules1, rules2, entries1, entries2


def _hashed_names(entries1: Sequence[SealedEntry], entries2: Sequence[SealedEntry]) -> list[str]:
    """The files whose digests the seal stores, sorted."""
    names = {entry.path for entry in entries2 if entry.kind == EntryKind.FILE}
    names.update(entry.path for entry in entries1)
    return sorted(names)


def _sealed_paths(bundle: Bundle, names: Sequence[str]) -> list[FilePath]:
    root = os.fspath(bundle.content_root)
    return [f"{root}/{name}" for name in names]


def seal_digest_types(hash_types: Sequence[HashType]) -> tuple[HashType, ...]:
    """The digests computed of each sealed file: ``hash_types`` for ``files2``, SHA-1 for ``files``."""
    return tuple(dict.fromkeys((*hash_types, HashType.SHA1)))


def start_sealing(bundle: Bundle, hash_types: Sequence[HashType]) -> DigestCache:
    """Start hashing the files the bundle's seal will store digests of, on a thread of its own,
    before its nested code is signed (which replaces nested Mach-O files: those are left for
    later). Pass the cache to :func:`build_code_resources`; :meth:`DigestCache.finish` it when
    signing stops early."""
    _, _, entries1, entries2 = _seal_entries(bundle)
    later = {entry.path for entry in entries1 if entry.kind == EntryKind.NESTED_MACHO}
    cache = DigestCache()
    names = [name for name in _hashed_names(entries1, entries2) if name not in later]
    cache.start(_sealed_paths(bundle, names), seal_digest_types(hash_types))
    return cache


def build_code_resources(
    bundle: Bundle,
    nested_info: Mapping[str | Path, NestedCode],
    *,
    hash_types: Sequence[HashType] = DEFAULT_HASH_TYPES,
    executor: Executor | None = None,
    progress: Progress | None = None,
    cache: DigestCache | None = None,
) -> bytes:
    """The bundle's CodeResources as Apple writes it (XML plist bytes).

    ``nested_info`` maps each nested code item (its path relative to the content root, such as
    ``Frameworks/Demo.framework``, or its absolute path) to its cdhash and designated requirement;
    every nested item must be there, signed first. ``hash_types`` are the files2 digests (Apple
    uses the CodeDirectory digests: SHA-256 alone writes only ``hash2``). ``cache``: digests
    computed ahead (:func:`start_sealing`).
    """
    rules1, rules2, entries1, entries2 = _seal_entries(bundle)
    nested = {_seal_key(bundle, key): value for key, value in nested_info.items()}
    names = _hashed_names(entries1, entries2)
    files = _sealed_paths(bundle, names)
    by_file = hash_files(files, seal_digest_types(hash_types), executor=executor, progress=progress, cache=cache)
    digests = {name: by_file[file] for name, file in zip(names, files, strict=True)}

    keys = [(hash_key(hash_type), hash_type) for hash_type in hash_types]

    files2: dict[str, object] = {}
    for entry in entries2:
        seal: dict[str, object]
        if entry.is_nested:
            code = nested.get(entry.path)
            if code is None:
                raise NestedCodeNotSignedError(
                    f"nested code is not signed: {bundle.display_path(entry.path)} (sign it first)"
                )
            seal = {"cdhash": code.cdhash, "requirement": code.requirement}
        elif entry.kind == EntryKind.SYMLINK:
            seal = {"symlink": os.readlink(bundle.content_root / entry.path)}
        else:
            found = digests[entry.path]
            seal = {key: found[hash_type] for key, hash_type in keys}
        if entry.flags & OPTIONAL:
            seal["optional"] = True
        files2[entry.path] = seal["hash"] if list(seal) == ["hash"] else seal

    files: dict[str, object] = {}
    for entry in entries1:
        sha1 = digests[entry.path][HashType.SHA1]
        files[entry.path] = sha1 if entry.flags == 0 else {"hash": sha1, "optional": bool(entry.flags & OPTIONAL)}

    return serialize_code_resources(
        {"files": files, "files2": files2, "rules": rules1, "rules2": rules2}
    )


def _seal_key(bundle: Bundle, key: str | Path) -> str:
    if isinstance(key, Path) and key.is_absolute():
        return key.relative_to(bundle.content_root).as_posix()
    return Path(key).as_posix()


_REAL = re.compile(rb"<real>(-?\d+)\.0</real>")


def serialize_code_resources(plist: Mapping[str, object]) -> bytes:
    """Apple's XML plist layout: sorted keys, tab indents, whole-number reals without ``.0``.

    The bytes are :func:`plistlib.dumps`'s (XML, sorted keys) with that one change, written by
    :class:`_SealWriter`, which is several times faster on a seal of thousands of files.
    """
    lines: list[bytes] = [plistlib.dumps({})[: -len(b'<plist version="1.0">\n<dict/>\n</plist>\n')]]
    lines.append(b'<plist version="1.0">\n')
    _SealWriter(lines).value(dict(plist), 0)
    lines.append(b"</plist>\n")
    return _REAL.sub(rb"<real>\1</real>", b"".join(lines))


_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;"})
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_SPECIAL = re.compile(r"[\x00-\x08\x0b\x0c\x0d-\x1f&<>]")


def _line_bytes(level: int) -> int:
    """How many bytes plistlib puts on one base64 line of a ``<data>`` element at ``level``."""
    return (max(16, 76 - 8 * level) // 4) * 3


class _SealWriter:
    """plistlib's XML writer for the types a seal holds, as lines appended to a list."""

    def __init__(self, lines: list[bytes]) -> None:
        self.append = lines.append

    def text(self, element: str, text: str, level: int) -> None:
        if _SPECIAL.search(text):
            if _CONTROL.search(text):
                raise ValueError("strings can't contain control characters; use bytes instead")
            text = text.replace("\r\n", "\n").replace("\r", "\n").translate(_ESCAPES)
        self.append(b"\t" * level + f"<{element}>{text}</{element}>\n".encode())

    def value(self, value: object, level: int) -> None:
        indent = b"\t" * level
        if isinstance(value, str):
            self.text("string", value, level)
        elif value is True or value is False:
            self.append(indent + (b"<true/>\n" if value else b"<false/>\n"))
        elif isinstance(value, int):
            if not -1 << 63 <= value < 1 << 64:
                raise OverflowError(value)
            self.append(indent + b"<integer>%d</integer>\n" % value)
        elif isinstance(value, float):
            self.append(indent + f"<real>{value!r}</real>\n".encode())
        elif isinstance(value, dict):
            if not value:
                self.append(indent + b"<dict/>\n")
                return
            self.append(indent + b"<dict>\n")
            one_line = _line_bytes(level + 1)
            for key, item in sorted(value.items()):
                if not isinstance(key, str):
                    raise TypeError("keys must be strings")
                self.text("key", key, level + 1)
                if isinstance(item, bytes) and 0 < len(item) <= one_line:  # a digest, inline
                    self.append(b"%s\t<data>\n%s\t%s%s\t</data>\n" % (indent, indent, binascii.b2a_base64(item), indent))
                else:
                    self.value(item, level + 1)
            self.append(indent + b"</dict>\n")
        elif isinstance(value, bytes | bytearray):
            self.append(indent + b"<data>\n")
            chunk = _line_bytes(level)
            for start in range(0, len(value), chunk):
                self.append(indent + binascii.b2a_base64(value[start : start + chunk]))
            self.append(indent + b"</data>\n")
        elif isinstance(value, list | tuple):
            if not value:
                self.append(indent + b"<array/>\n")
                return
            self.append(indent + b"<array>\n")
            for item in value:
                self.value(item, level + 1)
            self.append(indent + b"</array>\n")
        else:
            raise TypeError(f"unsupported type: {type(value)}")
