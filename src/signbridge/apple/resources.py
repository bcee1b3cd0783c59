"""The resource seal of a bundle: ``_CodeSignature/CodeResources``.

CodeResources is an XML property list with four keys:

- ``rules`` / ``rules2``: which paths (relative to the bundle's content root, ``Contents/`` or
  ``Versions/A/``) are sealed, as regular expressions with ``omit``, ``optional``, ``nested`` and
  ``weight``; the rule of highest weight that matches a path decides (an omitting rule wins a tie,
  as Apple's seals show). A stored seal's rules are untrusted: :class:`RuleSet` evaluates them
  with RE2 in linear time (POSIX syntax, bounded count, length and weight). signbridge writes
  Apple's defaults: the ``Resources/`` rules for bundles with a ``Contents`` or ``Versions``
  directory, the iOS-style rules (everything at the root is a resource, nothing is nested code)
  for shallow bundles.
- ``files`` (version 1): SHA-1 of every regular file the v1 rules select.
- ``files2`` (version 2): per path a dict of digests (``hash`` = SHA-1, ``hash2`` = SHA-256), a
  ``{symlink: target}``, or for nested code ``{cdhash, requirement}``; ``optional`` when the rule
  says so.

Scanning follows Apple's ResourceBuilder: symbolic links are never followed; a directory that
matches a ``nested`` rule and whose name contains a dot is nested code (a bundle) and is not entered;
a regular file that matches a ``nested`` rule is nested code when it is a Mach-O file. Apple would
sign a non-Mach-O file there (a script) with a detached signature; signbridge seals it as a plain
resource, which Apple's verifier accepts. Excluded always: ``_CodeSignature``, ``CodeResources``
(where a stapled ticket lives), ``_MASReceipt`` and the main executable.

Every file is read once for all its digests, on one pool thread per core (hashlib releases the
GIL); a signer may start hashing a bundle's files on a thread of its own before the seal is built
(:func:`start_sealing`).
"""

from __future__ import annotations

import binascii
import collections
import enum
import functools
import hashlib
import math
import os
import plistlib
import queue
import re
import struct
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import re2

from ..errors import SignbridgeError
from .codedirectory import HashType
from .macho_constants import (
    FAT_MAGIC,
    FAT_MAGIC_64,
    MAX_FAT_ARCHES,
    MH_CIGAM,
    MH_CIGAM_64,
    MH_MAGIC,
    MH_MAGIC_64,
)
from .plist import load_plist_dict, optional_key, require

if TYPE_CHECKING:
    from .bundle import Bundle

OPTIONAL = 0x01
OMITTED = 0x02
NESTED = 0x04
EXCLUSION = 0x10

READ_CHUNK = 1 << 20
DEFAULT_HASH_TYPES = (HashType.SHA1, HashType.SHA256)

Progress = Callable[[int, int], None]
NestedCheck = Callable[[Path], bytes]


class ResourceError(SignbridgeError):
    """The bundle's resources could not be read or sealed."""


class UnreadableFileError(ResourceError):
    """A file or directory inside the bundle cannot be read."""


class ResourceSealError(ResourceError):
    """A stored CodeResources is not a valid resource seal."""


class NestedCodeNotSignedError(ResourceError):
    """Nested code must be signed before the bundle around it is sealed."""


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


# --- hashing ----------------------------------------------------------------------------------------


FileIdentity = tuple[int, int, int, int, int]
FilePath = str | Path  # a Path, or a str where thousands are made (building Paths costs more)


def hash_file(
    path: FilePath, hash_types: Sequence[HashType], buffer: bytearray | None = None
) -> dict[HashType, bytes]:
    """Digests of one file, read once, into ``buffer`` when given (a thread hashing many files
    reuses one)."""
    return _hash_identified(path, hash_types, buffer)[1]


def _identity(status: os.stat_result) -> FileIdentity:
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns


def _hash_identified(
    path: FilePath, hash_types: Sequence[HashType], buffer: bytearray | None
) -> tuple[FileIdentity, dict[HashType, bytes]]:
    """The file's digests and the identity of the file they are of, taken before it was read."""
    hashers = {hash_type: hashlib.new(hash_type.hashlib_name) for hash_type in hash_types}
    view = memoryview(buffer if buffer is not None else bytearray(READ_CHUNK))
    try:
        with open(path, "rb", buffering=0) as stream:
            identity = _identity(os.fstat(stream.fileno()))
            while count := stream.readinto(view):
                chunk = view[:count]
                for hasher in hashers.values():
                    hasher.update(chunk)
    except OSError as error:
        raise UnreadableFileError(f"cannot read {path}: {error.strerror}") from error
    return identity, {hash_type: hasher.digest()[: hash_type.size] for hash_type, hasher in hashers.items()}


class DigestCache:
    """Digests of files hashed ahead of time on a thread of their own (while this one signs
    nested code), for :func:`hash_files` to take instead of reading the files again.

    An entry is taken only while its file is the one hashed: same device, inode, size,
    modification and change time. Signing writes a changed file anew and renames it into place,
    so a file signed since it was hashed is a new inode and is hashed again.
    """

    def __init__(self) -> None:
        self._found: dict[FilePath, tuple[FileIdentity, dict[HashType, bytes]]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, paths: Sequence[FilePath], hash_types: Sequence[HashType]) -> None:
        """Hash ``paths`` in order on a new thread until all are done or :meth:`finish` is called."""

        def run() -> None:
            buffer = bytearray(READ_CHUNK)
            for path in paths:
                if self._stop.is_set():
                    return
                try:
                    self._found[path] = _hash_identified(path, hash_types, buffer)
                except UnreadableFileError:
                    continue  # not cached: hash_files reads it again and reports the error
        self._thread = threading.Thread(target=run, name="seal digests", daemon=True)
        self._thread.start()

    def finish(self, *, stop: bool = True) -> None:
        """Return when the thread has let go of the files: at once (``stop``, what is not hashed
        yet stays so) or when it has hashed all of them."""
        if stop:
            self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def take(self, path: FilePath, hash_types: Sequence[HashType]) -> dict[HashType, bytes] | None:
        """The digests of ``path`` as it is now, when they were computed ahead; else None."""
        entry = self._found.pop(path, None)
        if entry is None:
            return None
        identity, digests = entry
        try:
            current = _identity(os.lstat(path))
        except OSError:
            return None
        if current != identity or any(hash_type not in digests for hash_type in hash_types):
            return None
        return digests


def hash_files(
    paths: Sequence[FilePath],
    hash_types: Sequence[HashType],
    *,
    executor: Executor | None = None,
    progress: Progress | None = None,
    cache: DigestCache | None = None,
) -> dict[FilePath, dict[HashType, bytes]]:
    """Digests of many files, each read once for all of them, on one thread per core of the pool;
    ``progress(done, total)`` after each file. Digests ``cache`` computed ahead are taken first."""
    known: dict[FilePath, dict[HashType, bytes]] = {}
    if cache is not None:
        cache.finish()
        for path in paths:
            if (digests := cache.take(path, hash_types)) is not None:
                known[path] = digests
    if not known:
        missing, advance = paths, progress
    else:
        missing = [path for path in paths if path not in known]

        def advance(done: int, _: int) -> None:
            if progress is not None:
                progress(done + len(known), len(paths))

    if executor is None:
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            hashed = _hash_in(pool, missing, hash_types, advance)
    else:
        hashed = _hash_in(executor, missing, hash_types, advance)
    return {path: known[path] if path in known else hashed[path] for path in paths} if known else hashed


def _hash_in(
    executor: Executor, paths: Sequence[FilePath], hash_types: Sequence[HashType], progress: Progress | None
) -> dict[FilePath, dict[HashType, bytes]]:
    """One task per core takes the next file until none is left (a task per file cost more in
    the pool's bookkeeping than hashing a small file); this thread collects the results."""
    total = len(paths)
    if progress is not None:
        progress(0, total)
    pending = collections.deque(enumerate(paths))
    finished: queue.SimpleQueue[tuple[int, dict[HashType, bytes] | BaseException]] = queue.SimpleQueue()
    stop = threading.Event()

    def work() -> None:
        buffer = bytearray(READ_CHUNK)
        while not stop.is_set():
            try:
                index, path = pending.popleft()
            except IndexError:
                return
            try:
                finished.put((index, hash_file(path, hash_types, buffer)))
            except BaseException as error:
                finished.put((index, error))  # for this thread to raise
                raise

    workers = [executor.submit(work) for _ in range(min(os.cpu_count() or 1, total))]
    results: list[dict[HashType, bytes]] = [{} for _ in paths]
    try:
        for done in range(1, total + 1):
            index, outcome = finished.get()
            if isinstance(outcome, BaseException):
                raise outcome
            results[index] = outcome
            if progress is not None:
                progress(done, total)
    finally:
        stop.set()
        wait(workers)  # no thread reads the files once this returns
    return dict(zip(paths, results, strict=True))


# --- building ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NestedCode:
    """What a bundle's seal records about nested code: its cdhash and designated requirement text."""

    cdhash: bytes
    requirement: str


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
                    f"nested code is not signed: {display_path(bundle, entry.path)} (sign it first)"
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


def display_path(bundle: Bundle, sealed_path: str) -> str:
    """A sealed path as messages show it: relative to the bundle root (``Contents/Resources/x``)."""
    return (bundle.content_root / sealed_path).relative_to(bundle.root).as_posix()


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


# --- verification -----------------------------------------------------------------------------------


def verify_code_resources(
    bundle: Bundle,
    stored: bytes,
    nested_check: NestedCheck,
    *,
    executor: Executor | None = None,
    progress: Progress | None = None,
) -> list[str]:
    """Compare the bundle on disk with its stored seal; one message per problem, none when intact.

    Messages are Apple's: ``file added: …``, ``file modified: …``, ``file missing: …``, plus
    ``nested code modified: …`` when nested code's cdhash differs from the seal. ``nested_check``
    gets the absolute path of each nested bundle or Mach-O file and returns its cdhash; it raises a
    SignbridgeError when that code does not verify (reported as ``nested code invalid: …``).
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

    problems: list[str] = []
    for path in sorted(set(on_disk) | set(files)):
        shown = display_path(bundle, path)
        stored_seal, entry = files.get(path), on_disk.get(path)
        if stored_seal is None:
            problems.append(f"file added: {shown}")
        elif entry is None:
            if not stored_seal.optional:
                problems.append(f"file missing: {shown}")
        elif stored_seal.cdhash is not None:
            problems.extend(_check_nested(bundle, entry, stored_seal.cdhash, shown, nested_check))
        elif not _matches(bundle, entry, stored_seal, digests):
            problems.append(f"file modified: {shown}")
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
) -> list[str]:
    if not entry.is_nested:
        return [f"nested code modified: {shown}"]
    try:
        actual = nested_check(bundle.content_root / entry.path)
    except SignbridgeError as error:
        return [f"nested code invalid: {shown}: {error}"]
    if actual != cdhash:
        return [f"nested code modified: {shown}"]
    return []
