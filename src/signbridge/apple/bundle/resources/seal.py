"""A stored resource seal read back: the version that governs, its rules and each file's seal."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ...codesig.codedirectory import HashType
from ...plist import load_plist_dict, optional_key, require
from .rules import MAX_RULES, ResourceSealError


def hash_key(hash_type: HashType) -> str:
    """The files2 key of a digest: ``hash`` for SHA-1, ``hash<type number>`` otherwise."""
    return "hash" if hash_type == HashType.SHA1 else f"hash{int(hash_type)}"


def _hash_type_of_key(key: str) -> HashType | None:
    if key == "hash":
        return HashType.SHA1
    if key.startswith("hash") and key[4:].isdigit():
        try:
            return HashType(int(key[4:]))
        except ValueError:
            return None
    return None


@dataclass(frozen=True)
class FileSeal:
    """One ``files``/``files2`` entry, typed: digests of a file, a symbolic link's target, or
    nested code's cdhash and requirement."""

    digests: Mapping[HashType, bytes] = field(default_factory=dict)
    symlink: str | None = None
    cdhash: bytes | None = None
    requirement: str | None = None
    optional: bool = False

    @classmethod
    def from_plist(cls, path: str, value: object) -> FileSeal:
        if isinstance(value, bytes):
            return cls({HashType.SHA1: value})
        what = f"the seal of {path!r} in the sealed resource directory"
        entry = require(value, dict, what, ResourceSealError)
        digests = {}
        for key, digest in entry.items():
            hash_type = _hash_type_of_key(key)
            if hash_type is not None:
                digests[hash_type] = require(digest, bytes, f"{what}: {key}", ResourceSealError)
        return cls(
            digests,
            symlink=optional_key(entry, "symlink", str, what, ResourceSealError),
            cdhash=optional_key(entry, "cdhash", bytes, what, ResourceSealError),
            requirement=optional_key(entry, "requirement", str, what, ResourceSealError),
            optional=entry.get("optional") is True,
        )


@dataclass(frozen=True)
class StoredSeal:
    """A CodeResources as read from a signed bundle: the version that governs (2 when it has
    ``files2``), that version's rules (checked when evaluated) and its file seals."""

    version: int
    rules: Mapping[str, object]
    files: Mapping[str, FileSeal]

    @property
    def nested(self) -> tuple[str, ...]:
        """The paths sealed as nested code (those with a designated requirement)."""
        return tuple(sorted(path for path, seal in self.files.items() if seal.requirement is not None))


def read_code_resources(data: bytes) -> StoredSeal:
    """Read a stored CodeResources; :class:`ResourceSealError` when it is not a valid seal."""
    what = "the sealed resource directory (CodeResources)"
    plist = load_plist_dict(data, what, ResourceSealError)
    version = 2 if "files2" in plist or "rules2" in plist else 1
    files_key, rules_key = ("files2", "rules2") if version == 2 else ("files", "rules")
    if files_key not in plist or rules_key not in plist:
        raise ResourceSealError(f"{what} has no {rules_key} and {files_key}")
    rules = require(plist[rules_key], dict, f"{what}: {rules_key}", ResourceSealError)
    files = require(plist[files_key], dict, f"{what}: {files_key}", ResourceSealError)
    if len(rules) > MAX_RULES:
        raise ResourceSealError(f"{what} has {len(rules)} resource rules; at most {MAX_RULES} are read")
    return StoredSeal(version, rules, {path: FileSeal.from_plist(path, value) for path, value in files.items()})
