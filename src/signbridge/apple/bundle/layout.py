"""Bundles: layout discovery, validation, nested code and signing order.

Three layouts are understood:

- deep: ``Foo.app/Contents/{Info.plist, MacOS/<CFBundleExecutable>, Resources/, _CodeSignature/}``,
  used by macOS applications, app extensions (``.appex``), XPC services (``.xpc``) and plug-ins;
- shallow (iOS-style): ``Foo.app/{Info.plist, <CFBundleExecutable>, _CodeSignature/}``, used by
  iOS apps and their extensions and by DriverKit (``.dext``) and system extensions;
- versioned frameworks, ``Foo.framework/Versions/A/{<CFBundleExecutable>, Resources/Info.plist,
  _CodeSignature/}`` with ``Versions/Current -> A`` and top-level symlinks into ``Versions/Current``.

A bundle whose Info.plist names no CFBundleExecutable (a resource-only ``.bundle``, a Safari web
app) has no main executable: its signature is detached, in files under ``_CodeSignature/``.
Paths inside the seal are relative to the content root (``Contents``, ``Versions/A`` or the bundle
itself); messages show paths relative to the bundle root.

Opening a bundle validates it as codesign does before signing: no symbolic link may point outside
the bundle, every file must be readable, and nothing may sit unsealed in the bundle's root.

Replacing a bundle safely, in a staged copy: :mod:`.staging`.
"""

from __future__ import annotations

import enum
import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from ...errors import SignbridgeError
from ..plist import load_plist_dict
from .resources.rules import (
    EntryKind,
    RuleSet,
    UnreadableFileError,
    default_rules,
    is_macho_file,
    scan,
    seal_exclusions,
)

__all__ = [
    "Bundle",
    "BundleError",
    "BundleKind",
    "BundleLayoutError",
    "BundleSymlinkError",
    "InfoPlistError",
    "NotABundleError",
    "UnreadableFileError",
    "UnsealedContentError",
    "bundle_format",
    "check_nesting",
    "sign_bundle_plan",
]

log = logging.getLogger(__name__)

CODE_SIGNATURE_DIR = "_CodeSignature"
CODE_RESOURCES = "CodeResources"

# Bounds for hostile input: bundles inside bundles (real apps nest three or four deep) and
# directories inside a bundle.
MAX_NESTING = 16
MAX_DIRECTORY_DEPTH = 128

# Files Apple tolerates beside Contents/ in a bundle's root (BundleDiskRep::setup).
_APP_ROOT_EXTRAS = frozenset({".LSOverride", ".DS_Store", "Icon\r", ".SoftwareDepot.tracking"})


class BundleError(SignbridgeError):
    """A bundle cannot be signed or verified as it is laid out."""


class NotABundleError(BundleError):
    """The path is not a bundle directory."""


class BundleLayoutError(BundleError):
    """A required part of the bundle is missing or malformed."""


class InfoPlistError(BundleError):
    """The bundle's Info.plist cannot be read as a property list dictionary."""


class BundleSymlinkError(BundleError):
    """A symbolic link in the bundle points outside it (or is absolute)."""


class UnsealedContentError(BundleError):
    """Something sits where no seal can cover it (the bundle root, a framework's root)."""


class BundleKind(enum.StrEnum):
    APPLICATION = "app"
    FRAMEWORK = "framework"
    APP_EXTENSION = "appex"
    XPC_SERVICE = "xpc"
    DRIVER_EXTENSION = "dext"
    SYSTEM_EXTENSION = "systemextension"
    PLUGIN = "bundle"

    @classmethod
    def from_path(cls, path: Path) -> BundleKind:
        suffix = path.suffix.lower().lstrip(".")
        for kind in cls:
            if kind.value == suffix:
                return kind
        return cls.PLUGIN


@dataclass(frozen=True, eq=False)
class Bundle:
    """A bundle on disk. Use :meth:`open`, which validates it."""

    root: Path
    kind: BundleKind
    content_root: Path  # Contents/ or Versions/<current>/: what the seal's paths are relative to
    info_plist_path: Path
    info_plist: dict = field(repr=False)
    executable_path: Path | None  # None: no main executable, the signature is detached

    @property
    def is_shallow(self) -> bool:
        return self.content_root == self.root

    @property
    def signature_dir(self) -> Path:
        return self.content_root / CODE_SIGNATURE_DIR

    @property
    def identifier(self) -> str | None:
        value = self.info_plist.get("CFBundleIdentifier")
        return value if isinstance(value, str) and value else None

    @property
    def resources_dir(self) -> Path:
        return self.content_root / "Resources"

    @property
    def code_resources_path(self) -> Path:
        return self.content_root / CODE_SIGNATURE_DIR / CODE_RESOURCES

    @property
    def is_versioned(self) -> bool:
        return self.content_root.parent.name == "Versions"

    def display_path(self, sealed_path: str) -> str:
        """A sealed path as messages show it: relative to the bundle root (``Contents/Resources/x``)."""
        return (self.content_root / sealed_path).relative_to(self.root).as_posix()

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Bundle:
        given = Path(path)
        if not given.exists():
            raise NotABundleError(f"{given}: no such file or directory")
        root = given.resolve()
        if not root.is_dir():
            raise NotABundleError(f"{given} is not a bundle (not a directory)")
        if (root / "Contents").is_dir():
            content_root = root / "Contents"
            info_plist_path = content_root / "Info.plist"
            executable_dir = content_root / "MacOS"
        elif (root / "Versions").is_dir():
            content_root = root / "Versions" / _current_version(root)
            info_plist_path = content_root / "Resources" / "Info.plist"
            executable_dir = content_root
        elif (root / "Info.plist").is_file():
            content_root = root
            info_plist_path = root / "Info.plist"
            executable_dir = root
        else:
            raise NotABundleError(
                f"{given} is not a bundle (no Info.plist, Contents/ or Versions/ directory)"
            )

        info_plist = _read_info_plist(info_plist_path, root)
        name = info_plist.get("CFBundleExecutable")
        executable = None
        if name is not None:
            if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
                raise BundleLayoutError(
                    f"{info_plist_path.relative_to(root)} names an invalid main executable "
                    f"(CFBundleExecutable = {name!r})"
                )
            executable = executable_dir / name
            if not executable.is_file() or executable.is_symlink():
                raise BundleLayoutError(
                    f"the main executable {executable.relative_to(root)} (CFBundleExecutable) is missing "
                    "or not a regular file"
                )
        bundle = cls(
            root=root,
            kind=BundleKind.from_path(root),
            content_root=content_root,
            info_plist_path=info_plist_path,
            info_plist=info_plist,
            executable_path=executable,
        )
        bundle.validate()
        return bundle

    def moved_to(self, root: Path) -> Bundle:
        """This bundle as a copy of it at ``root`` (see :func:`~signbridge.apple.bundle.staging.staged_bundle`) is: the same layout and
        Info.plist, already validated, at other paths."""

        def moved(path: Path) -> Path:
            return root / path.relative_to(self.root)

        executable = moved(self.executable_path) if self.executable_path is not None else None
        return replace(
            self,
            root=root,
            content_root=moved(self.content_root),
            info_plist_path=moved(self.info_plist_path),
            executable_path=executable,
        )

    def validate(self) -> None:
        """Raise a specific BundleError for unsealable content, outward symlinks, unreadable files."""
        if self.is_versioned:
            _validate_framework_root(self.root, self.content_root.name)
        elif not self.is_shallow:
            for entry in sorted(os.listdir(self.root)):
                path = self.root / entry
                if entry == "Contents":
                    continue
                if entry in _APP_ROOT_EXTRAS and path.is_file() and not path.is_symlink():
                    continue
                raise UnsealedContentError(f"unsealed contents present in the bundle root: {entry}")
        _validate_tree(self.root)

    def nested(self) -> list[Bundle | Path]:
        """This bundle's own nested code (what its seal records as such), innermost first.

        Nested bundles come back opened; loose nested Mach-O files (extra executables in MacOS/,
        dylibs in Frameworks/, ...) as absolute paths. Deeper paths come first, as rcodesign
        orders them, so nothing is listed before code that sits inside it.
        """
        rules2 = default_rules(self.is_shallow)[1]
        rules = RuleSet.from_plist(rules2, seal_exclusions(self.content_root, self.executable_path))
        entries = [entry for entry in scan(self.content_root, rules) if entry.is_nested]
        entries.sort(key=lambda entry: (-entry.path.count("/"), entry.path))
        items: list[Bundle | Path] = []
        for entry in entries:
            path = self.content_root / entry.path
            items.append(Bundle.open(path) if entry.kind == EntryKind.NESTED_BUNDLE else path)
        return items

    def sealed_code(self) -> list[Bundle | Path]:
        """Code in this bundle's code locations that its seal covers file by file instead of as
        nested code: a ``.dext`` in ``Library/SystemExtensions``, an iOS app's plug-ins,
        frameworks and loose dylibs in ``Frameworks/``. ``--deep`` signs (and verifies) them
        before the bundle around them."""
        nested = {item.root if isinstance(item, Bundle) else item for item in self.nested()}
        found: list[Bundle | Path] = []
        for location in _CODE_LOCATIONS:
            directory = self.content_root / location
            if directory.is_symlink() or not directory.is_dir():
                continue
            for entry in sorted(os.listdir(directory)):
                path = directory / entry
                if path in nested or path.is_symlink():
                    continue
                if path.is_dir() and "." in entry and _looks_like_bundle(path):
                    found.append(Bundle.open(path))
                elif path.is_file() and location == "Frameworks" and is_macho_file(path):
                    found.append(path)
        return found


def bundle_format(bundle: Bundle, executable_format: str | None) -> str:
    """``app bundle with Mach-O ...`` for applications, ``bundle with Mach-O ...`` for the rest;
    ``bundle`` alone for a bundle without a main executable."""
    prefix = "app bundle" if bundle.kind is BundleKind.APPLICATION else "bundle"
    return f"{prefix} with {executable_format}" if executable_format else prefix


def check_nesting(depth: int, where: Path) -> None:
    """Refuse bundles nested more than :data:`MAX_NESTING` deep inside one another."""
    if depth > MAX_NESTING:
        raise BundleLayoutError(f"{where} is nested more than {MAX_NESTING} bundles deep; refusing to go further")


def sign_bundle_plan(bundle: Bundle, depth: int = 0) -> list[Path]:
    """Everything to sign, in order: nested code innermost first, ``bundle.root`` itself last.

    A directory in the list is a bundle: build its CodeResources (its nested code is signed by
    then), write it, then sign its main executable with Info.plist in slot 1 and CodeResources in
    slot 3. A file is a loose nested Mach-O: sign it as a file.
    """
    check_nesting(depth, bundle.root)
    plan: list[Path] = []
    for item in [*bundle.sealed_code(), *bundle.nested()]:
        if isinstance(item, Bundle):
            plan.extend(sign_bundle_plan(item, depth + 1))
        else:
            plan.append(item)
    plan.append(bundle.root)
    return plan


# Where bundles keep code (besides the nested-code rules): Apple's code locations.
_CODE_LOCATIONS = (
    "Frameworks",
    "SharedFrameworks",
    "PlugIns",
    "Plug-ins",
    "Extensions",
    "XPCServices",
    "Library/SystemExtensions",
    "Watch",
    "AppClips",
)


def _looks_like_bundle(path: Path) -> bool:
    return any((path / marker).exists() for marker in ("Info.plist", "Contents", "Versions"))


# --- layout helpers ---------------------------------------------------------------------------------


def _current_version(root: Path) -> str:
    current = root / "Versions" / "Current"
    if not current.is_symlink():
        raise BundleLayoutError("a versioned framework needs Versions/Current, a symbolic link to a version")
    target = os.readlink(current)
    if not re.fullmatch(r"(\./)?[^./][^/]*", target) or not (root / "Versions" / target).is_dir():
        raise BundleLayoutError(
            f"Versions/Current must point to a version directory beside it, not to {target!r}"
        )
    return Path(target).name


def _read_info_plist(path: Path, root: Path) -> dict:
    shown = path.relative_to(root)
    try:
        data = path.read_bytes()
    except FileNotFoundError as error:
        raise BundleLayoutError(f"{shown} is missing") from error
    except OSError as error:
        raise UnreadableFileError(f"cannot read {shown}: {error.strerror}") from error
    return load_plist_dict(data, str(shown), InfoPlistError)


def _validate_framework_root(root: Path, version: str) -> None:
    """Apple's rules for a framework's top level: only Versions/ and symlinks into the current version."""
    current = f"(Current|{re.escape(version)})"
    for entry in sorted(os.listdir(root)):
        path = root / entry
        if entry == "Versions" and path.is_dir() and not path.is_symlink():
            continue
        if entry in (".DS_Store", "module.map") and path.is_file() and not path.is_symlink():
            continue
        if path.is_symlink() and re.fullmatch(rf"(\./)?Versions/{current}/{re.escape(entry)}", os.readlink(path)):
            continue
        raise UnsealedContentError(
            f"unsealed contents present in the root directory of an embedded framework: {entry}"
        )
    for entry in sorted(os.listdir(root / "Versions")):
        path = root / "Versions" / entry
        if entry == "Current" or (path.is_dir() and not path.is_symlink()):
            continue
        if entry == ".DS_Store" and path.is_file() and not path.is_symlink():
            continue
        raise UnsealedContentError(
            f"unsealed contents present in the root directory of an embedded framework: Versions/{entry}"
        )


def _validate_tree(root: Path) -> None:
    pending = [(str(root), "", 0)]
    while pending:
        directory, prefix, depth = pending.pop()
        try:
            with os.scandir(directory) as iterator:
                children = sorted(iterator, key=lambda child: child.name)
        except OSError as error:
            where = prefix.rstrip("/") or "."
            raise UnreadableFileError(f"cannot read directory {where}: {error.strerror}") from error
        for child in children:
            shown = prefix + child.name
            if child.is_symlink():
                _check_symlink(root, child.path, shown)
            elif child.is_file(follow_symlinks=False):
                _check_readable(child.path, shown)
            elif child.is_dir(follow_symlinks=False):
                if depth + 1 > MAX_DIRECTORY_DEPTH:
                    raise BundleLayoutError(f"{shown} lies more than {MAX_DIRECTORY_DEPTH} directories deep")
                pending.append((child.path, shown + "/", depth + 1))
            else:
                raise BundleError(f"{shown} is not a regular file, directory or symbolic link")


def _check_symlink(root: Path, path: str, shown: str) -> None:
    target = os.readlink(path)
    inside = os.path.normpath(os.path.join(os.path.dirname(shown), target))
    if os.path.isabs(target) or inside == ".." or inside.startswith("../"):
        raise BundleSymlinkError(
            f"invalid destination for symbolic link in bundle: {shown} -> {target} (points outside the bundle)"
        )


def _check_readable(path: str, shown: str) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        raise UnreadableFileError(f"cannot read {shown}: {error.strerror}") from error
    os.close(descriptor)
