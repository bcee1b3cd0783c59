"""Checking a bundle against its stored resource seal: what was added, modified or is missing,
and whether its nested code still has the cdhash the seal records.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

from ....errors import SignbridgeError
from ...codesig.codedirectory import HashType
from ..layout import Bundle
from .hashing import Progress, hash_files
from .rules import EntryKind, RuleSet, SealedEntry, scan, seal_exclusions
from .seal import FileSeal, read_code_resources

NestedCheck = Callable[[Path], bytes]


class SealProblemKind(enum.Enum):
    """What is wrong with a sealed path, in Apple's words."""

    ADDED = "file added"
    MODIFIED = "file modified"
    MISSING = "file missing"
    NESTED_MODIFIED = "nested code modified"
    NESTED_INVALID = "nested code invalid"


@dataclass(frozen=True)
class SealProblem:
    """One way the bundle on disk differs from its seal; ``path`` is relative to the bundle root
    (``Contents/Resources/x``), ``detail`` says why nested code does not verify."""

    kind: SealProblemKind
    path: str
    detail: str = ""

    def __str__(self) -> str:
        text = f"{self.kind.value}: {self.path}"
        return f"{text}: {self.detail}" if self.detail else text


def verify_code_resources(
    bundle: Bundle,
    stored: bytes,
    nested_check: NestedCheck,
    *,
    executor: Executor | None = None,
    progress: Progress | None = None,
) -> list[SealProblem]:
    """Compare the bundle on disk with its stored seal; the problems, none when intact.

    A file is added, modified or missing; nested code is modified when its cdhash differs from
    the seal. ``nested_check`` gets the absolute path of each nested bundle or Mach-O file and
    returns its cdhash; it raises a SignbridgeError when that code does not verify (a
    :attr:`SealProblemKind.NESTED_INVALID` problem).
    """
    seal = read_code_resources(stored)
    files = seal.files
    exclusions = seal_exclusions(bundle.content_root, bundle.executable_path)
    entries = scan(bundle.content_root, RuleSet.from_plist(seal.rules, exclusions))
    if seal.version == 1:
        entries = [entry for entry in entries if entry.is_regular_file]
    on_disk = {entry.path: entry for entry in entries}

    needed: set[HashType] = set()
    to_hash = []
    for path, entry in on_disk.items():
        stored_seal = files.get(path)
        if stored_seal is not None and stored_seal.digests and entry.is_regular_file:
            needed.update(stored_seal.digests)
            to_hash.append(bundle.content_root / path)
    digests = hash_files(to_hash, sorted(needed), executor=executor, progress=progress)

    problems: list[SealProblem] = []
    for path in sorted(set(on_disk) | set(files)):
        shown = bundle.display_path(path)
        stored_seal, entry = files.get(path), on_disk.get(path)
        if stored_seal is None:
            problems.append(SealProblem(SealProblemKind.ADDED, shown))
        elif entry is None:
            if not stored_seal.optional:
                problems.append(SealProblem(SealProblemKind.MISSING, shown))
        elif stored_seal.cdhash is not None:
            problems.extend(_check_nested(bundle, entry, stored_seal.cdhash, shown, nested_check))
        elif not _matches(bundle, entry, stored_seal, digests):
            problems.append(SealProblem(SealProblemKind.MODIFIED, shown))
    return problems


def _matches(
    bundle: Bundle, entry: SealedEntry, seal: FileSeal, digests: Mapping[Path, Mapping[HashType, bytes]]
) -> bool:
    path = bundle.content_root / entry.path
    if seal.symlink is not None:
        return entry.kind == EntryKind.SYMLINK and os.readlink(path) == seal.symlink
    if not seal.digests or not entry.is_regular_file:
        return False
    actual = digests[path]
    return all(actual.get(hash_type) == value for hash_type, value in seal.digests.items())


def _check_nested(
    bundle: Bundle, entry: SealedEntry, cdhash: bytes, shown: str, nested_check: NestedCheck
) -> list[SealProblem]:
    if not entry.is_nested:
        return [SealProblem(SealProblemKind.NESTED_MODIFIED, shown)]
    try:
        actual = nested_check(bundle.content_root / entry.path)
    except SignbridgeError as error:
        return [SealProblem(SealProblemKind.NESTED_INVALID, shown, str(error))]
    if actual != cdhash:
        return [SealProblem(SealProblemKind.NESTED_MODIFIED, shown)]
    return []
