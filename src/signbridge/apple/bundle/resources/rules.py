"""Resource seal rules and what they select: Apple's default rules, the evaluator of stored ones
(:class:`RuleSet`), the exclusions every seal has, and the scan of a bundle's content root.
"""

from __future__ import annotations

import enum
import functools
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import re2

from ....errors import SignbridgeError
from ...macho.constants import (
    FAT_MAGIC,
    FAT_MAGIC_64,
    MAX_FAT_ARCHES,
    MH_CIGAM,
    MH_CIGAM_64,
    MH_MAGIC,
    MH_MAGIC_64,
)

OPTIONAL = 0x01
OMITTED = 0x02
NESTED = 0x04
EXCLUSION = 0x10


class ResourceError(SignbridgeError):
    """The bundle's resources could not be read or sealed."""


class UnreadableFileError(ResourceError):
    """A file or directory inside the bundle cannot be read."""


class ResourceSealError(ResourceError):
    """A stored CodeResources is not a valid resource seal."""


# --- rules ------------------------------------------------------------------------------------------

_RESOURCES = "^Resources/"


def _localization_rules(prefix: str) -> dict[str, object]:
    """Localizations are optional, except Base.lproj; locversion.plist files are left out."""
    return {
        prefix + r".*\.lproj/": {"optional": True, "weight": 1000.0},
        prefix + r"Base\.lproj/": {"weight": 1010.0},
        prefix + r".*\.lproj/locversion.plist$": {"omit": True, "weight": 1100.0},
    }


# Files at the top of the content root that every version-2 seal treats alike.
_TOP_LEVEL_RULES2: dict[str, object] = {
    "^.*": True,
    r".*\.dSYM($|/)": {"weight": 11.0},
    r"^(.*/)?\.DS_Store$": {"omit": True, "weight": 2000.0},
    r"^Info\.plist$": {"omit": True, "weight": 20.0},
    r"^version\.plist$": {"weight": 20.0},
    r"^embedded\.provisionprofile$": {"weight": 20.0},
    "^PkgInfo$": {"omit": True, "weight": 20.0},
}

# Apple's defaults for a bundle with a Resources directory (bundlediskrep.cpp, reference §3.2).
# Weights are reals in Apple's plists.
DEFAULT_RULES: dict[str, object] = {
    "^version.plist$": True,
    _RESOURCES: True,
    **_localization_rules(_RESOURCES),
}
DEFAULT_RULES2: dict[str, object] = {
    **_TOP_LEVEL_RULES2,
    "^[^/]+$": {"nested": True, "weight": 10.0},
    "^(Frameworks|SharedFrameworks|PlugIns|Plug-ins|XPCServices|Helpers|MacOS|Library/"
    "(Automator|Spotlight|LoginItems))/": {"nested": True, "weight": 10.0},
    _RESOURCES: {"weight": 20.0},
    **_localization_rules(_RESOURCES),
}

# Apple's defaults for shallow bundles (iOS apps, app extensions, DriverKit and system extensions):
# what current codesign writes for a .dext, and what iOS apps carry. Nothing is nested code.
SHALLOW_RULES: dict[str, object] = {"^.*": True, "^version.plist$": True, **_localization_rules("^")}
SHALLOW_RULES2: dict[str, object] = {**_TOP_LEVEL_RULES2, **_localization_rules("^")}


def default_rules(shallow: bool) -> tuple[dict[str, object], dict[str, object]]:
    """The (``rules``, ``rules2``) codesign writes for a bundle of this layout."""
    return (SHALLOW_RULES, SHALLOW_RULES2) if shallow else (DEFAULT_RULES, DEFAULT_RULES2)


# Seal rules come from the signature, and anyone can re-seal a bundle ad hoc with rules of their
# choosing: they are POSIX extended regular expressions (Apple compiles them with regcomp and
# REG_EXTENDED), evaluated here by RE2, which takes time linear in the path whatever the pattern.
# Constructs RE2 cannot evaluate in linear time (back-references) are refused, as are patterns
# POSIX does not define (Perl's \d, look-around); Apple's own rules all compile.
MAX_RULES = 128
MAX_PATTERN_LENGTH = 1024
MAX_WEIGHT = 0xFFFFFFFF  # Apple keeps a rule's weight in an unsigned 32-bit integer

_RULE_OPTIONS = re2.Options()
_RULE_OPTIONS.posix_syntax = True
_RULE_OPTIONS.one_line = True  # without REG_NEWLINE, ^ and $ match only at the ends of the path
_RULE_OPTIONS.dot_nl = True
_RULE_OPTIONS.never_capture = True
_RULE_OPTIONS.log_errors = False


@functools.lru_cache(maxsize=512)
def _compile_rule(pattern: str) -> re2._Regexp:
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise ResourceSealError(
            f"resource rule {pattern[:40]!r}... is longer than {MAX_PATTERN_LENGTH} characters"
        )
    try:
        return re2.compile(pattern.encode("utf-8"), _RULE_OPTIONS)
    except UnicodeEncodeError:
        raise ResourceSealError(f"resource rule {pattern!r} is not valid Unicode") from None
    except re2.error as error:
        reason = error.args[0].decode(errors="replace") if error.args and isinstance(error.args[0], bytes) else error
        raise ResourceSealError(
            f"invalid resource rule {pattern!r}: {reason} (rules are POSIX extended regular expressions "
            "without back-references)"
        ) from None


@functools.lru_cache(maxsize=64)
def _rule_matcher(patterns: tuple[str, ...]) -> re2.Set:
    """All patterns in one RE2 set (each already compiled alone, so each is valid)."""
    matcher = re2.Set.SearchSet(_RULE_OPTIONS)
    for pattern in patterns:
        try:
            matcher.Add(pattern.encode("utf-8"))
        except re2.error:
            raise ResourceSealError(f"invalid resource rule {pattern!r}") from None
    matcher.Compile()
    return matcher


def literal_rule(path: str, flags: int = EXCLUSION) -> ResourceRule:
    """A rule that matches exactly ``path``."""
    return ResourceRule("^" + re2.escape(path) + "$", 0, flags)


@dataclass(frozen=True)
class ResourceRule:
    pattern: str
    weight: int = 1
    flags: int = 0
    regex: re2._Regexp = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "regex", _compile_rule(self.pattern))

    @classmethod
    def from_plist(cls, pattern: str, value: object) -> ResourceRule:
        """A rule as CodeResources stores it: ``true``, ``false`` (omit) or a dict of options."""
        if isinstance(value, bool):
            return cls(pattern, 1, 0 if value else OMITTED)
        if not isinstance(value, dict):
            raise ResourceSealError(f"resource rule {pattern!r} is neither a boolean nor a dictionary")
        weight = value.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ResourceSealError(f"resource rule {pattern!r} has a weight that is not a number")
        if not (math.isfinite(weight) and 0 <= weight <= MAX_WEIGHT):
            raise ResourceSealError(
                f"resource rule {pattern!r} has the weight {weight}; weights are finite numbers from 0 to {MAX_WEIGHT}"
            )
        flags = 0
        for key, flag in (("omit", OMITTED), ("optional", OPTIONAL), ("nested", NESTED)):
            if value.get(key) is True:
                flags |= flag
        return cls(pattern, int(weight), flags)


@dataclass(frozen=True)
class RuleSet:
    """Resource rules plus the exclusions Apple adds for the bundle at hand: the one evaluator of
    seal rules. All rules are matched in one pass over the path (an RE2 set)."""

    rules: tuple[ResourceRule, ...]
    _matcher: re2.Set = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.rules) > MAX_RULES:
            raise ResourceSealError(f"the seal has {len(self.rules)} resource rules; at most {MAX_RULES} are read")
        object.__setattr__(self, "_matcher", _rule_matcher(tuple(rule.pattern for rule in self.rules)))

    @classmethod
    def from_plist(cls, rules: object, exclusions: Iterable[ResourceRule] = ()) -> RuleSet:
        if not isinstance(rules, dict):
            raise ResourceSealError("the resource rules are not a dictionary of patterns")
        if len(rules) > MAX_RULES:
            raise ResourceSealError(f"the seal has {len(rules)} resource rules; at most {MAX_RULES} are read")
        parsed = [ResourceRule.from_plist(pattern, value) for pattern, value in rules.items()]
        return cls((*exclusions, *parsed))

    def _matching(self, path: str) -> list[int]:
        text = os.fsencode(path)
        found = self._matcher.Match(text)
        if not found:  # an RE2 set reports nothing when its DFA runs out of memory: ask each rule
            found = [n for n, rule in enumerate(self.rules) if rule.regex.search(text)]
        return sorted(found)

    def find(self, path: str) -> ResourceRule | None:
        """The deciding rule: an exclusion at once, else the matching rule of highest weight (of
        equal weights, an omitting one: ``^Info\\.plist$`` beats ``^`` in older iOS seals)."""
        best: ResourceRule | None = None
        for index in self._matching(path):
            rule = self.rules[index]
            if rule.flags & EXCLUSION:
                return rule
            if best is None or rule.weight > best.weight or rule.weight == best.weight and rule.flags & OMITTED and not best.flags & OMITTED:
                best = rule
        return best


def seal_exclusions(content_root: Path, executable: Path | None) -> list[ResourceRule]:
    """What Apple's BundleDiskRep keeps out of every seal: signature files and the main executable."""
    exclusions = [literal_rule("_CodeSignature"), literal_rule("CodeResources"), literal_rule("_MASReceipt")]
    if executable is not None:
        exclusions.append(literal_rule(executable.relative_to(content_root).as_posix()))
    return exclusions


# --- scanning ---------------------------------------------------------------------------------------


class EntryKind(enum.Enum):
    FILE = "file"
    SYMLINK = "symlink"
    NESTED_BUNDLE = "nested bundle"
    NESTED_MACHO = "nested Mach-O"


@dataclass(frozen=True)
class SealedEntry:
    path: str  # relative to the content root, "/"-separated
    kind: EntryKind
    flags: int

    @property
    def is_nested(self) -> bool:
        return self.kind in (EntryKind.NESTED_BUNDLE, EntryKind.NESTED_MACHO)

    @property
    def is_regular_file(self) -> bool:
        return self.kind in (EntryKind.FILE, EntryKind.NESTED_MACHO)


def is_macho_file(path: Path) -> bool:
    """Whether the file starts like a thin or universal Mach-O file."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(8)
    except OSError as error:
        raise UnreadableFileError(f"cannot read {path}: {error.strerror}") from error
    if len(head) < 4:
        return False
    magic = struct.unpack_from(">I", head)[0]
    if magic in (MH_MAGIC, MH_CIGAM, MH_MAGIC_64, MH_CIGAM_64):
        return True
    if magic in (FAT_MAGIC, FAT_MAGIC_64) and len(head) == 8:
        return 0 < struct.unpack_from(">I", head, 4)[0] <= MAX_FAT_ARCHES
    return False


def scan(content_root: Path, rules: RuleSet) -> list[SealedEntry]:
    """Every path the rules seal under ``content_root``, sorted by path (walked without recursion,
    so a deep directory tree costs no stack)."""
    entries: list[SealedEntry] = []
    pending = [(content_root, "")]
    while pending:
        directory, prefix = pending.pop()
        pending.extend(_scan_directory(directory, prefix, rules, entries))
    entries.sort(key=lambda entry: entry.path)
    return entries


def _scan_directory(directory: Path, prefix: str, rules: RuleSet, out: list[SealedEntry]) -> list[tuple[Path, str]]:
    """Seal the entries of one directory; returns the subdirectories still to enter."""
    try:
        with os.scandir(directory) as iterator:
            children = sorted(iterator, key=lambda child: child.name)
    except OSError as error:
        raise UnreadableFileError(f"cannot read directory {directory}: {error.strerror}") from error
    subdirectories = []
    for child in children:
        relative = prefix + child.name
        rule = rules.find(relative)
        if child.is_symlink():
            if rule is not None and not rule.flags & (OMITTED | EXCLUSION):
                out.append(SealedEntry(relative, EntryKind.SYMLINK, rule.flags & ~NESTED))
        elif child.is_dir(follow_symlinks=False):
            if rule is not None and rule.flags & NESTED and "." in child.name:
                out.append(SealedEntry(relative, EntryKind.NESTED_BUNDLE, rule.flags))
            elif rule is None or not rule.flags & EXCLUSION:
                subdirectories.append((Path(child.path), relative + "/"))
        elif rule is not None and not rule.flags & (OMITTED | EXCLUSION):
            if not child.is_file(follow_symlinks=False):
                raise ResourceError(f"{child.path} is not a regular file, a directory or a symbolic link")
            nested = rule.flags & NESTED and is_macho_file(Path(child.path))
            kind = EntryKind.NESTED_MACHO if nested else EntryKind.FILE
            out.append(SealedEntry(relative, kind, rule.flags if nested else rule.flags & ~NESTED))
    return subdirectories
